"""`cloister session ...`: check, hash, diff, sign, create, update and read sessions.

Several owners can sign one document offline: each runs ``cloister session sign FILE``,
which adds their signature to ``FILE.sig.json`` (the document's text and the signatures
collected so far); whoever uploads passes ``--signatures FILE.sig.json`` to ``create`` or
``update``. A signature covers the operation and the session's hash, nothing else.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import typer
from pydantic import ValidationError

from cloister import protocol
from cloister.cli import _owner
from cloister.cli._errors import handle_errors, usage_error
from cloister.client import CasClient
from cloister.errors import AccessDenied
from cloister.session import Session, diff, public_key_of, signatures

app = typer.Typer(help="Sessions: the owner's signed policies.", no_args_is_help=True)

KeyOpt = typer.Option(None, "--key", help="owner key file (default $CLOISTER_HOME/owner.key)")


def _load(file: Path) -> tuple[str, Session]:
    try:
        text = file.read_text()
    except OSError as exc:
        raise usage_error(f"cannot read {file}: {exc.strerror}") from None
    return text, Session.from_yaml(text)


def _signed(
    text: str,
    session: Session,
    operation: str,
    key: Path | None,
    collected: Path | None = None,
) -> protocol.SignedSession:
    """The document with the collected signatures and, when there is an owner key, its own."""
    sigs = _read_bundle(collected, session, operation).signatures if collected else []
    if collected is None or key is not None or _owner.key_path().exists():
        owner = _owner.load(key)
        mine = public_key_of(owner)
        if all(s.public_key != mine for s in sigs):
            sig = signatures.sign(owner, operation, session.hash)
            sigs = [*sigs, protocol.SessionSignature(public_key=mine, signature=sig)]
    return protocol.SignedSession(session=text, signatures=sigs)


def _operation(session: Session) -> str:
    return "update" if session.document.predecessor else "create"


def _read_bundle(path: Path, session: Session, operation: str) -> protocol.SignedSession:
    try:
        raw = json.loads(path.read_text())
        bundle = protocol.SignedSession.model_validate(
            {"session": raw["session"], "signatures": raw["signatures"]}
        )
    except OSError as exc:
        raise usage_error(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, ValidationError):
        raise usage_error(
            f"{path} is not a signature file made by 'cloister session sign'"
        ) from None
    if Session.from_yaml(bundle.session).hash != session.hash:
        raise usage_error(f"{path} holds signatures over another version of the document")
    if raw.get("operation", operation) != operation:
        raise usage_error(f"{path} holds signatures for {raw.get('operation')}, not {operation}")
    return bundle


@app.command("check")
@handle_errors
def check(file: Path) -> None:
    """Validate a session file; print what is wrong, or its hash and any warnings."""
    _, session = _load(file)
    for warning in session.warnings:
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    print(f"{session.name}: valid (hash {session.hash})")


@app.command("diff")
@handle_errors
def diff_(old: Path, new: Path) -> None:
    """Show what NEW changes against OLD (services, measurements, secrets, access)."""
    _, a = _load(old)
    _, b = _load(new)
    lines = diff.diff(a.document, b.document, a.hash)
    for warning in b.warnings:
        lines.append(f"! warning: {warning}")
    print("\n".join(lines) if lines else "no change")


@app.command("sign")
@handle_errors
def sign(
    file: Path,
    key: Path | None = KeyOpt,
    output: Path | None = typer.Option(None, "--output", help="default: FILE.sig.json"),
) -> None:
    """Add this owner's signature to FILE.sig.json (for create or update, by predecessor)."""
    text, session = _load(file)
    operation = _operation(session)
    out = output or file.with_name(file.name + ".sig.json")
    sigs: list[protocol.SessionSignature] = []
    if out.exists():
        sigs = list(_read_bundle(out, session, operation).signatures)
    owner = _owner.load(key)
    mine = public_key_of(owner)
    sigs = [s for s in sigs if s.public_key != mine]
    sigs.append(
        protocol.SessionSignature(
            public_key=mine, signature=signatures.sign(owner, operation, session.hash)
        )
    )
    body = {
        "session": text,
        "hash": session.hash,
        "operation": operation,
        "signatures": [s.model_dump() for s in sigs],
    }
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{out}: {len(sigs)} signature(s) for {operation} of {session.name} ({session.hash})")


SigsOpt = typer.Option(
    None, "--signatures", help="signature file from 'cloister session sign' to upload"
)


@app.command("hash")
@handle_errors
def hash_(file: Path) -> None:
    """Print the session's hash (what an update names as its predecessor)."""
    print(_load(file)[1].hash)


@app.command("create")
@handle_errors
def create(
    file: Path,
    cas: str = typer.Option(..., "--cas"),
    key: Path | None = KeyOpt,
    collected: Path | None = SigsOpt,
) -> None:
    """Sign a new session and upload it; prints its hash."""
    text, session = _load(file)
    signed = _signed(text, session, "create", key, collected)
    if not signed.signatures:
        raise AccessDenied("no signature to upload", reason="unsigned")
    with CasClient(cas) as client:
        accepted = client.create_session(signed)
    print(accepted.hash)


@app.command("update")
@handle_errors
def update(
    file: Path,
    cas: str = typer.Option(..., "--cas"),
    key: Path | None = KeyOpt,
    collected: Path | None = SigsOpt,
) -> None:
    """Sign an update (its predecessor names the current hash) and upload it; prints its hash."""
    text, session = _load(file)
    signed = _signed(text, session, "update", key, collected)
    with CasClient(cas) as client:
        accepted = client.update_session(session.name, signed)
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
