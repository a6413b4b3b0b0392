"""`cloister cas init | recover | recovery-share | recovery-keygen | backup | restore`.

The CAS's state as an owner handles it: recovery keys and M-of-N recovery of the store key,
encrypted backups and explicit, audited restores. The work is in ``cloister.cas.recovery``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from cloister.cas import audit, recovery
from cloister.cli._errors import handle_errors, usage_error
from cloister.errors import BackendUnavailable

_DATA_DIR = typer.Option(..., "--data-dir", help="the CAS's data directory")
_DB = typer.Option(None, "--db", help="database URL (default: SQLite in DATA_DIR)")
_SIMULATION = typer.Option(
    False, "--simulation", help="keep the store key in a file (protects nothing; development)"
)


def _need_simulation(simulation: bool) -> None:
    if not simulation:
        raise BackendUnavailable(
            "sealing the store key to a hardware TEE is not available in this version; "
            "pass --simulation to keep it in a key file (development only)"
        )


def _recipient(text: str) -> str:
    path = Path(text)
    if not text.startswith("x25519:") and path.is_file():
        text = path.read_text().strip()
    try:
        return recovery.format_public(recovery.parse_public(text))
    except ValueError as exc:
        raise usage_error(f"--recovery-key {text!r}: {exc}") from None


def _read_files(paths: list[Path]) -> list[bytes]:
    try:
        return [p.read_bytes()[: recovery.MAX_DOC_BYTES + 1] for p in paths]
    except OSError as exc:
        raise usage_error(str(exc)) from None


def recovery_keygen(
    out: Path = typer.Option(..., "--out", help="where to write the private key (PEM, 0600)"),
) -> None:
    """Make a recovery key pair for one share holder; print the public key to give the CAS."""
    if out.exists():
        raise usage_error(f"{out} exists already; a recovery key is never overwritten")
    print(recovery.new_recovery_key(out))


@handle_errors
def init(
    data_dir: Path = _DATA_DIR,
    db: str | None = _DB,
    simulation: bool = _SIMULATION,
    recovery_key: list[str] = typer.Option(
        ..., "--recovery-key", help="a holder's public key (x25519:...) or a file holding it"
    ),
    recovery_threshold: int = typer.Option(
        ..., "--recovery-threshold", help="how many holders together can recover the store key"
    ),
) -> None:
    """Create the store key and database of a new CAS and split the key M-of-N for recovery."""
    _need_simulation(simulation)
    recipients = [_recipient(r) for r in recovery_key]
    try:
        store, kit = recovery.init(data_dir, db, recipients, recovery_threshold)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    audit.AuditLog(store).record(
        "init", threshold=recovery_threshold, recipients=recipients, key_id=kit["key_id"]
    )
    store.close()
    print(f"CAS initialised in {data_dir}: any {recovery_threshold} of {len(recipients)} "
          "recovery keys can recover its store key")  # fmt: skip


def _request(kit: dict[str, object], data_dir: Path, out: Path) -> None:
    req = recovery.request(kit, data_dir / recovery.EPHEMERAL_FILE)
    out.write_text(json.dumps(req, sort_keys=True))
    print(f"recovery request for store key {str(kit['key_id'])[:16]}, to be sealed to "
          f"{req['ephemeral']}")  # fmt: skip
    print(f"recovery request written to {out}; each holder runs "
          f"`cloister cas recovery-share --key THEIR_KEY {out} --out SHARE`")  # fmt: skip


@handle_errors
def recover(
    data_dir: Path = _DATA_DIR,
    db: str | None = _DB,
    simulation: bool = _SIMULATION,
    request_out: Path | None = typer.Option(
        None, "--request-out", help="step 1: write a recovery request for the share holders"
    ),
    share: list[Path] = typer.Option([], "--share", help="step 2: a holder's re-sealed share"),
) -> None:
    """Bring a CAS whose store key is lost (or on new hardware) back from M recovery shares."""
    _need_simulation(simulation)
    if (request_out is None) == (not share):
        raise usage_error("give either --request-out (step 1) or --share ... (step 2)")
    if request_out is not None:
        _request(recovery.kit_of(data_dir, db), data_dir, request_out)
        return
    try:
        store, head = recovery.recover(data_dir, db, _read_files(share))
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    audit.AuditLog(store).record("recovery", shares=len(share), head=head.seq)
    store.close()
    print(f"store key recovered into {data_dir}; state at change {head.seq} adopted")


@handle_errors
def recovery_share(
    request: Path = typer.Argument(..., help="the recovering CAS's recovery request"),
    key: Path = typer.Option(..., "--key", help="your recovery private key"),
    out: Path = typer.Option(..., "--out", help="where to write your re-sealed share"),
) -> None:
    """Open your share of the store key and seal it to the recovering CAS only."""
    try:
        doc = recovery.reshare(_read_files([request])[0], recovery.load_private(key))
    except (ValueError, OSError) as exc:
        raise usage_error(str(exc)) from None
    out.write_text(json.dumps(doc, sort_keys=True))
    print(f"share {doc['x']} of store key {doc['key_id'][:16]} sealed to {doc['ephemeral']} "
          f"in {out}: hand it only to the CAS that showed you this key")  # fmt: skip


@handle_errors
def backup(
    data_dir: Path = _DATA_DIR,
    db: str | None = _DB,
    out: Path = typer.Option(..., "--out", help="the backup file to write"),
) -> None:
    """Write an encrypted, consistent backup of a CAS's state (it may keep serving)."""
    store = recovery.open_store(data_dir, db, head_writable=False)
    try:
        key = (data_dir / recovery.KEY_FILE).read_bytes()
        head = recovery.backup(store, key, out, now=time.time())
        audit.AuditLog(store).record("backup", head=head.seq, file=out.name[:200])
    finally:
        store.close()
    print(f"backup of change {head.seq} written to {out}")


@handle_errors
def restore(
    file: Path = typer.Argument(..., help="a backup written by `cloister cas backup`"),
    data_dir: Path = _DATA_DIR,
    db: str | None = _DB,
    simulation: bool = _SIMULATION,
    request_out: Path | None = typer.Option(
        None, "--request-out", help="step 1: write a recovery request for the share holders"
    ),
    share: list[Path] = typer.Option([], "--share", help="step 2: a holder's re-sealed share"),
    key_file: Path | None = typer.Option(
        None, "--key-file", help="the store key file, where it survived (instead of shares)"
    ),
    accept_older_state: bool = typer.Option(
        False, "--accept-older-state", help="replace this data directory's newer state head"
    ),
) -> None:
    """Restore a backup onto a fresh CAS: an explicit, audited step back to the backup's state."""
    _need_simulation(simulation)
    try:
        bk = recovery.Backup.read(file)
    except (ValueError, OSError) as exc:
        raise usage_error(str(exc)) from None
    if request_out is not None:
        _request(bk.kit(), data_dir, request_out)
        return
    if key_file is not None:
        store_key = key_file.read_bytes()
    elif share:
        try:
            store_key, _ = recovery.combine(
                bk.kit(), _read_files(share), data_dir / recovery.EPHEMERAL_FILE
            )
        except ValueError as exc:
            raise usage_error(str(exc)) from None
    else:
        raise usage_error("give --request-out (step 1), --share ... (step 2) or --key-file")
    store, head = recovery.restore(data_dir, db, bk, store_key, accept_older=accept_older_state)
    (data_dir / recovery.EPHEMERAL_FILE).unlink(missing_ok=True)
    audit.AuditLog(store).record(
        "restore",
        head=head.seq,
        backup_created_at=bk.header.get("created_at"),
        accepted_older_state=accept_older_state,
    )
    store.close()
    print(f"backup restored into {data_dir}: state at change {head.seq}")


def register(app: typer.Typer) -> None:
    """Add these commands to the `cloister cas` group."""
    app.command("init")(init)
    app.command("recover")(recover)
    app.command("recovery-share")(recovery_share)
    app.command("recovery-keygen")(handle_errors(recovery_keygen))
    app.command("backup")(backup)
    app.command("restore")(restore)
