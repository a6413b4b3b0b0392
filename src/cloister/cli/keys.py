"""`cloister keys ...`: the owner's signing key."""

from __future__ import annotations

from pathlib import Path

import typer

from cloister.cli import _owner
from cloister.cli._errors import handle_errors, usage_error
from cloister.session import public_key_of

app = typer.Typer(help="Owner keys that sign sessions.", no_args_is_help=True)


@app.command("create")
@handle_errors
def create(
    key: Path | None = typer.Option(None, "--key", help="where to write the key"),
) -> None:
    """Create an owner key in $CLOISTER_HOME (default ~/.config/cloister); print its public key."""
    path = key or _owner.key_path()
    if path.exists():
        raise usage_error(f"{path} exists already; an owner key is never overwritten")
    print(public_key_of(_owner.create(path)))


@app.command("show")
@handle_errors
def show(key: Path | None = typer.Option(None, "--key", help="the owner key file")) -> None:
    """Print the owner's public key, as sessions' access_policy names it."""
    print(public_key_of(_owner.load(key)))
