"""`cloister audit export | verify`: the CAS's audit log as JSON lines, and checking one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import typer

from cloister.cas import audit, recovery
from cloister.cli._errors import handle_errors, usage_error

app = typer.Typer(help="The CAS's audit log.", no_args_is_help=True)


def _bounded_lines(f: TextIO) -> Iterator[str]:
    """Lines of an untrusted file, none read past the bound (a longer one is cut, and refused)."""
    while line := f.readline(audit.MAX_LINE_BYTES + 1):
        yield line
        if len(line) > audit.MAX_LINE_BYTES:
            return


@app.command("export")
@handle_errors
def export(
    data_dir: Path = typer.Option(..., "--data-dir", help="the CAS's data directory"),
    db: str | None = typer.Option(None, "--db", help="database URL (default: SQLite in DATA_DIR)"),
    out: Path = typer.Option(..., "--out", help="the JSON lines file to write"),
) -> None:
    """Export the audit log (it may keep serving), closed by a signed trailer."""
    store = recovery.open_store(data_dir, db, head_writable=False)
    try:
        n = audit.export(store, out, now=time.time())
        key = store.audit_public_key().hex()
    finally:
        store.close()
    print(f"{n} audit entries written to {out}")
    print(f"signed by {key}")


@app.command("verify")
@handle_errors
def verify(
    file: Path = typer.Argument(..., help="an exported audit log"),
    public_key: str | None = typer.Option(
        None, "--public-key", help="the CAS's audit key (hex) the log must be signed with"
    ),
) -> None:
    """Check an exported audit log: edits, deletions, reordering and truncation are refused."""
    try:
        with open(file, encoding="utf-8") as f:
            report = audit.verify(_bounded_lines(f), public_key=public_key)
    except (OSError, UnicodeDecodeError) as exc:
        raise usage_error(str(exc)) from None
    events = ", ".join(f"{k} {v}" for k, v in sorted(report.events.items()))
    print(f"audit log OK: {report.entries} entries ({events})")
    print(f"signed by {report.public_key}" + ("" if public_key else " (not pinned)"))
