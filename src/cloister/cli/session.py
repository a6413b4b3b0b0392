"""`cloister session ...`: check, hash, create, update and read sessions."""

from __future__ import annotations

import base64
from pathlib import Path

import typer

from cloister import protocol
from cloister.cli import _owner
from cloister.cli._errors import handle_errors, usage_error
from cloister.client import CasClient
from cloister.session import Session, public_key_of, signatures

app = typer.Typer(help="Sessions: the owner's signed policies.", no_args_is_help=True)

KeyOpt = typer.Option(None, "--key", help="owner key file (default $CLOISTER_HOME/owner.key)")


def _load(file: Path) -> tuple[str, Session]:
    try:
        text = file.read_text()
    except OSError as exc:
        raise usage_error(f"cannot read {file}: {exc.strerror}") from None
    return text, Session.from_yaml(text)


def _signed(
    text: str, session: Session, operation: str, key: Path | None
) -> protocol.SignedSession:
    owner = _owner.load(key)
    sig = signatures.sign(owner, operation, session.hash)
    return protocol.SignedSession(
        session=text,
        signatures=[protocol.SessionSignature(public_key=public_key_of(owner), signature=sig)],
    )


@app.command("check")
@handle_errors
def check(file: Path) -> None:
    """Validate a session file; print what is wrong, or its hash."""
    _, session = _load(file)
    print(f"{session.name}: valid (hash {session.hash})")


@app.command("hash")
@handle_errors
def hash_(file: Path) -> None:
    """Print the session's hash (what an update names as its predecessor)."""
    print(_load(file)[1].hash)


@app.command("create")
@handle_errors
def create(file: Path, cas: str = typer.Option(..., "--cas"), key: Path | None = KeyOpt) -> None:
    """Sign a new session and upload it; prints its hash."""
    text, session = _load(file)
    with CasClient(cas) as client:
        accepted = client.create_session(_signed(text, session, "create", key))
    print(accepted.hash)


@app.command("update")
@handle_errors
def update(file: Path, cas: str = typer.Option(..., "--cas"), key: Path | None = KeyOpt) -> None:
    """Sign an update (its predecessor names the current hash) and upload it; prints its hash."""
    text, session = _load(file)
    with CasClient(cas) as client:
        accepted = client.update_session(session.name, _signed(text, session, "update", key))
    print(accepted.hash)


@app.command("show")
@handle_errors
def show(name: str, cas: str = typer.Option(..., "--cas"), key: Path | None = KeyOpt) -> None:
    """Print the current version of a session (needs a key allowed to read it)."""
    with CasClient(cas) as client:
        owner = _owner.load(key)
        nonce = client.nonce().nonce
        sig = base64.b64encode(owner.sign(protocol.read_payload(name, nonce))).decode()
        view = client.read_session(
            name, protocol.SignedRead(nonce=nonce, public_key=public_key_of(owner), signature=sig)
        )
    print(f"# session {view.name} version {view.version} hash {view.hash}")
    print(view.session, end="" if view.session.endswith("\n") else "\n")
