"""`cloister measure PATH...`: the simulated measurement of a program."""

from __future__ import annotations

from pathlib import Path

import typer

from cloister.attestation import simulated
from cloister.cli._errors import usage_error


def measure(
    paths: list[Path] = typer.Argument(..., help="the files that make up the program"),
) -> None:
    """Print the measurement (lowercase hex) of a program: a digest over the named files."""
    try:
        print(simulated.measure_files(paths).hex())
    except OSError as exc:
        raise usage_error(f"cannot read {exc.filename}: {exc.strerror}") from None
