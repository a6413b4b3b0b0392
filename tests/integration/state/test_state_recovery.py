"""Recovery with M-of-N shares, backup and restore, and the audit log, end to end.

One CAS is initialised with three recovery keys (any two recover it), serves, is backed up
while serving, loses its key file, is recovered by two holders, and its backup is restored
onto a fresh CAS. The audit log records all of it and verifies; no secret value ever appears
in a log, an audit export or a backup.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import free_port
from tests.integration.state.conftest import Owner, StateCas, assert_no_secret_in

from cloister.cas import audit
from cloister.errors import StoreError
from cloister.store import Keyring, Store


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, check: bool = True) -> Result:
    """The `cloister` command, run in this process (its start-up costs seconds on a busy box)."""
    from typer.testing import CliRunner

    from cloister.cli.main import app

    got = CliRunner().invoke(app, list(args))
    if got.exception is not None and not isinstance(got.exception, SystemExit):
        raise got.exception
    out = Result(got.exit_code, got.stdout, got.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"cloister {' '.join(args)} failed: {out.stderr}")
    return out


def _share(tmp_path: Path, request: Path, holder: int) -> Path:
    out = tmp_path / f"share-{request.stem}-{holder}.json"
    cli("cas", "recovery-share", str(request), "--key", str(tmp_path / f"r{holder}.pem"),
        "--out", str(out))  # fmt: skip
    return out


def test_recover_backup_restore_and_audit(tmp_path: Path, owner: Owner) -> None:
    pubs = [
        cli("cas", "recovery-keygen", "--out", str(tmp_path / f"r{i}.pem")).stdout.strip()
        for i in (1, 2, 3)
    ]
    (tmp_path / "r2.pub").write_text(pubs[1])
    data = tmp_path / "cas"
    cli("cas", "init", "--data-dir", str(data), "--simulation", "--recovery-key", pubs[0],
        "--recovery-key", str(tmp_path / "r2.pub"), "--recovery-key", pubs[2],
        "--recovery-threshold", "2")  # fmt: skip
    cas = StateCas(data, tmp_path / "home", free_port(), tmp_path / "cas.log")
    cas.start()
    try:
        with cas.client() as c:
            owner.create(c)
            first = owner.activate(c)
            backup = tmp_path / "backup.cbk"
            cli("cas", "backup", "--data-dir", str(data), "--out", str(backup))  # while serving
            owner.update(c, 1)
            assert owner.activate(c) == {**first, "APP_TOKEN": first["APP_TOKEN"]}
    finally:
        cas.stop()

    # The key file is lost: the CAS cannot start, and says how to recover.
    (data / "store.key").unlink()
    (data / "state-head").unlink()
    code, out = cas.serve_expecting_refusal()
    assert code == 4 and "cloister cas recover" in out
    request = tmp_path / "request.json"
    cli("cas", "recover", "--data-dir", str(data), "--simulation", "--request-out", str(request))
    assert first["APP_PASSWORD"] not in request.read_text()
    shares = [_share(tmp_path, request, 1), _share(tmp_path, request, 3)]
    # One share is not enough; a share for another request does not open.
    r = cli("cas", "recover", "--data-dir", str(data), "--simulation", "--share", str(shares[0]),
            check=False)  # fmt: skip
    assert r.returncode == 1 and "too-few-shares" in r.stderr
    cli("cas", "recover", "--data-dir", str(data), "--simulation",
        "--share", str(shares[0]), "--share", str(shares[1]))  # fmt: skip
    cas.start()
    try:
        with cas.client() as c:
            again = owner.activate(c)
            assert again["APP_PASSWORD"] == first["APP_PASSWORD"]
    finally:
        cas.stop()

    # The backup onto new hardware: a fresh data directory, two other holders.
    fresh = StateCas(tmp_path / "new", tmp_path / "home", free_port(), tmp_path / "new.log")
    req2 = tmp_path / "request2.json"
    cli("cas", "restore", str(backup), "--data-dir", str(fresh.data_dir), "--simulation",
        "--request-out", str(req2))  # fmt: skip
    shares2 = [_share(tmp_path, req2, 2), _share(tmp_path, req2, 3)]
    restored = cli("cas", "restore", str(backup), "--data-dir", str(fresh.data_dir),
                   "--simulation", "--share", str(shares2[0]),
                   "--share", str(shares2[1]))  # fmt: skip
    assert "restored" in restored.stdout
    fresh.start()
    try:
        with fresh.client() as c:
            back = owner.activate(c)
            assert back["APP_PASSWORD"] == first["APP_PASSWORD"]
    finally:
        fresh.stop()
    # A second restore onto the same CAS is refused: it would roll it back.
    r = cli("cas", "restore", str(backup), "--data-dir", str(fresh.data_dir), "--simulation",
            "--key-file", str(fresh.data_dir / "store.key"), check=False)  # fmt: skip
    assert r.returncode == 1 and "restore-would-roll-back" in r.stderr

    # The audit logs of both CAS verify and tell the story.
    exports = []
    for d in (data, fresh.data_dir):
        out_file = tmp_path / f"audit-{d.name}.jsonl"
        cli("audit", "export", "--data-dir", str(d), "--out", str(out_file))
        shown = cli("audit", "verify", str(out_file)).stdout
        assert "audit log OK" in shown
        exports.append(out_file)
    events = [json.loads(line) for line in exports[0].read_text().splitlines()[:-1]]
    kinds = {e["event"] for e in events}
    assert {"init", "cas-start", "cas-stop", "session-create", "session-update", "activation",
            "backup", "recovery"} <= kinds  # fmt: skip
    restored_events = [json.loads(x)["event"] for x in exports[1].read_text().splitlines()[:-1]]
    assert "restore" in restored_events and "recovery" not in restored_events
    logs = [tmp_path / "cas.log", tmp_path / "new.log", *exports, backup, request, req2]
    assert_no_secret_in(logs, owner.secrets)


# --- the audit log's verification, against every kind of tampering --------------------------


@pytest.fixture
def exported(tmp_path: Path) -> list[str]:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}", Keyring.of([Keyring.new_key()]))
    log = audit.AuditLog(store, clock=lambda: 1000.0)
    log.record("cas-start", simulation=True)
    for i in range(6):
        log.record("activation", outcome="accepted" if i % 2 else "refused", session=f"s{i}")
    log.record("cas-stop")
    lines = list(audit.export_lines(store, now=2000.0))
    store.close()
    return lines


def _edit(lines: list[str], i: int, **changes: object) -> list[str]:
    doc = json.loads(lines[i])
    doc.update(changes)
    return [*lines[:i], json.dumps(doc), *lines[i + 1 :]]


def test_an_intact_export_verifies(exported: list[str]) -> None:
    report = audit.verify(exported)
    assert report.entries == 8 and report.events["activation"] == 6


@pytest.mark.parametrize(
    ("what", "change", "message"),
    [
        ("an entry edited", lambda ls: _edit(ls, 3, outcome="accepted"), "entry 4 was edited"),
        ("an entry deleted", lambda ls: ls[:2] + ls[3:], "deleted"),
        ("two entries swapped", lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "reordered"),
        ("the end cut off", lambda ls: ls[:5], "truncated"),
        ("entries cut off before the trailer", lambda ls: ls[:5] + ls[-1:], "truncated"),
        ("a line duplicated", lambda ls: [ls[0], *ls], "seq"),
        ("the trailer edited", lambda ls: _edit(ls, -1, sig="00" * 64), "trailer"),
        ("shuffled", lambda ls: random.Random(1).sample(ls, len(ls)), "does not verify"),
    ],
)
def test_tampering_with_an_export_is_refused(
    exported: list[str], what: str, change: object, message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        audit.verify(change(exported))  # type: ignore[operator]


def test_a_pinned_key_refuses_a_log_signed_by_another(exported: list[str]) -> None:
    with pytest.raises(StoreError, match="another key"):
        audit.verify(exported, public_key="11" * 32)


def test_audit_verify_exit_codes(exported: list[str], tmp_path: Path) -> None:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(exported) + "\n")
    bad.write_text("\n".join(exported[:3] + exported[4:]) + "\n")
    assert cli("audit", "verify", str(good)).returncode == 0
    r = cli("audit", "verify", str(bad), check=False)
    assert r.returncode == 4 and "audit-tampered" in r.stderr
