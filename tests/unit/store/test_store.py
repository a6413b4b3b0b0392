"""The store against both backends: sealing, races, nonces, and rollback/tamper evidence.

Every test takes ``db_url`` (conftest.py): it runs once on SQLite and once on PostgreSQL.
Tampering is done the way an attacker with the database would: plain SQL on the tables.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloister.errors import BackendUnavailable, ConflictError, RollbackError, StoreError
from cloister.store import Claim, Head, HeadFile, Keyring, Store, load_or_create_key
from cloister.store._chain import ChainKeys


@pytest.fixture
def key() -> Keyring:
    return Keyring.of([Keyring.new_key()])


@pytest.fixture
def head(tmp_path: Path) -> Path:
    return tmp_path / "state-head"


@pytest.fixture
def store(db_url: str, key: Keyring, head: Path) -> Iterator[Store]:
    s = Store.open(db_url, key, head_file=head)
    yield s
    s.close()


def sql(db_url: str, statement: str, **params: object) -> list[sa.Row[tuple[object, ...]]]:
    """Plain SQL on the database, as someone with access to it (not the CAS) would run it."""
    url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as c:
            res = c.execute(sa.text(statement), params)
            return list(res) if res.returns_rows else []
    finally:
        engine.dispose()


def reopen(db_url: str, key: Keyring, head: Path) -> Store:
    return Store.open(db_url, key, head_file=head)


def replica(db_url: str, key: Keyring, head: Path, tmp_path: Path) -> Store:
    """A second CAS on the same database, provisioned with the store key and a head."""
    shutil.copy(head, tmp_path / "other-head")
    return Store.open(db_url, key, head_file=tmp_path / "other-head")


# --- sealing --------------------------------------------------------------------------------


def test_values_are_sealed_at_rest(db_url: str, store: Store) -> None:
    store.create_secret("s", "password", "ascii", lambda: b"very-secret-value")
    raw = b"".join(bytes(r[0]) for r in sql(db_url, "select value from secrets"))
    assert raw and b"very-secret-value" not in raw
    assert store.get_secret("s", "password") == ("ascii", b"very-secret-value")


def test_a_sealed_value_bound_to_another_row_does_not_open() -> None:
    ring = Keyring.of([Keyring.new_key()])
    sealed = ring.seal(b"A", b"secrets/s/a/ascii")
    with pytest.raises(StoreError, match="does not open"):
        ring.open(sealed, b"secrets/s/b/ascii")


def test_a_value_moved_to_another_row_is_refused(db_url: str, store: Store) -> None:
    store.create_secret("s", "a", "ascii", lambda: b"A")
    store.create_secret("s", "b", "ascii", lambda: b"B")
    (sealed_a,) = sql(db_url, "select value from secrets where name='a'")[0]
    sql(db_url, "update secrets set value=:v where name='b'", v=sealed_a)
    with pytest.raises(RollbackError, match=r"rollback .*secrets row"):
        store.get_secret("s", "b")


def test_wrong_key_cannot_open(db_url: str, store: Store, tmp_path: Path) -> None:
    store.create_secret("s", "a", "ascii", lambda: b"A")
    with pytest.raises(StoreError, match="MAC"):
        Store.open(db_url, Keyring.of([Keyring.new_key()]))


def test_keyring_rotation_keeps_old_values_readable() -> None:
    old, new = Keyring.new_key(), Keyring.new_key()
    sealed = Keyring.of([old]).seal(b"v", b"row")
    ring = Keyring.of([new, old])
    assert ring.open(sealed, b"row") == b"v"
    rotated = ring.rotate(sealed, b"row")
    assert Keyring.of([new]).open(rotated, b"row") == b"v"


def test_store_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "d" / "store.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key


def test_schema_is_migrated_by_alembic(db_url: str, store: Store) -> None:
    assert sql(db_url, "select version_num from alembic_version") == [("0001",)]


# --- races, within one process and across replicas ------------------------------------------


def _race(n: int, fn: object) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_secret_is_created_exactly_once_under_a_race(
    db_url: str, store: Store, key: Keyring, head: Path, tmp_path: Path
) -> None:
    # Half the racers use a second Store on the same database: a second replica.
    other = replica(db_url, key, head, tmp_path)
    results: list[bytes] = []

    def worker(i: int) -> None:
        s = store if i % 2 else other
        results.append(s.create_secret("s", "x", "ascii", lambda: f"value-{i}".encode()))

    _race(8, worker)
    other.close()
    assert len(results) == 8 and len(set(results)) == 1
    assert store.get_secret("s", "x") == ("ascii", results[0])


def test_one_of_several_updates_of_one_predecessor_wins(
    db_url: str, store: Store, key: Keyring, head: Path, tmp_path: Path
) -> None:
    store.create_session("s", "a" * 64, "creator", b"v1")
    other = replica(db_url, key, head, tmp_path)
    outcomes: list[str] = []

    def update(i: int) -> None:
        try:
            (store if i % 2 else other).update_session("s", "a" * 64, f"{i:064x}", b"v2")
            outcomes.append("ok")
        except ConflictError as exc:
            assert exc.reason == "stale-predecessor"
            outcomes.append("conflict")

    _race(6, update)
    other.close()
    assert outcomes.count("ok") == 1 and outcomes.count("conflict") == 5
    current = store.current_session("s")
    assert current is not None and current.version == 2


def test_a_replica_follows_the_other_replicas_changes(
    db_url: str, store: Store, key: Keyring, head: Path, tmp_path: Path
) -> None:
    other = replica(db_url, key, head, tmp_path)
    store.create_session("s", "a" * 64, "creator", b"v1")
    record = other.current_session("s")
    assert record is not None and record.document == b"v1"
    assert other.head() == store.head()
    # The other replica's own head file now knows this change, too.
    assert HeadFile(tmp_path / "other-head").read(ChainKeys(key.keys)) == store.head()
    other.close()


def test_a_claimed_nonce_cannot_be_claimed_again(store: Store) -> None:
    assert store.claim_nonce("n1", expires_at=100.0)
    assert not store.claim_nonce("n1", expires_at=100.0)
    assert store.claim_nonce("n2", expires_at=100.0)
    assert store.count_claimed_nonces() == 2
    with pytest.raises(ValueError, match="at most 128"):
        store.claim_nonce("x" * 129, expires_at=100.0)


def test_an_audit_entry_and_its_nonce_claim_are_one_write(store: Store) -> None:
    claim = Claim("n1", 1_000.0, {"event": "activation", "outcome": "refused"})
    first, fresh = store.append_audit_claiming({"event": "activation"}, claim, now=10.0)
    assert fresh and first.body["event"] == "activation" and "outcome" not in first.body
    again, fresh = store.append_audit_claiming({"event": "activation"}, claim, now=11.0)
    assert not fresh and again.body["outcome"] == "refused"  # the replay is what was recorded
    assert [r.body["seq"] for r in store.audit_records()] == [1, 2]
    # A claim made on its own is seen by the audit path, and the other way round.
    assert not store.claim_nonce("n1", expires_at=1_000.0)
    assert store.claim_nonce("n2", expires_at=1_000.0)
    _, fresh = store.append_audit_claiming(
        {"event": "activation"}, Claim("n2", 1_000.0, {}), now=12.0
    )
    assert not fresh


def test_expired_claims_are_forgotten(store: Store) -> None:
    store.claim_nonce("old", expires_at=100.0)
    store.claim_nonce("live", expires_at=10_000.0)
    # The audit path purges claims that expired more than a minute before its clock.
    store.append_audit({"event": "tick"}, now=100.0 + 61)
    assert store.count_claimed_nonces() == 1
    assert store.claim_nonce("old", expires_at=10_000.0)  # gone; a CAS refuses it as expired
    assert not store.claim_nonce("live", expires_at=10_000.0)


def queue_while_busy(store: Store, threads: list[threading.Thread]) -> None:
    """Start ``threads`` (each appends one audit entry) while another writer holds the lock,
    and let go once all of them are queued: they must then share one group commit."""
    with store._write_lock:
        for t in threads:
            t.start()
        while len(store._queue) < len(threads):
            threading.Event().wait(0.001)
    for t in threads:
        t.join()


def test_concurrent_audit_entries_share_one_transaction(store: Store, head: Path) -> None:
    """Group commit: entries queued while another write holds the lock go in one transaction."""
    ops: list[str] = []
    store.observe = lambda op, _seconds: ops.append(op)
    results: list[tuple[object, bool]] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                store.append_audit_claiming(
                    {"event": "activation", "n": i}, Claim(f"n{i % 4}", 1e9, {"dup": i}), now=1.0
                )
            )
        )
        for i in range(8)
    ]
    queue_while_busy(store, threads)
    assert ops.count("audit") == 1
    records = store.audit_records()
    assert [r.body["seq"] for r in records] == list(range(1, 9))
    # Four distinct nonces among eight entries: four were new, four were replays.
    assert sorted(fresh for _, fresh in results) == [False] * 4 + [True] * 4
    assert sum("dup" in r.body for r in records) == 4
    assert HeadFile(head).read(store._chain_keys) == store.head()


def test_a_failed_group_commit_fails_every_entry_in_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append_audit({"event": "before"}, now=1.0)

    def broken(batch: object, c: object) -> list[object]:
        raise BackendUnavailable("the database went away")

    monkeypatch.setattr(store, "_audit_puts", broken)
    failures: list[BaseException] = []

    def append(i: int) -> None:
        try:
            store.append_audit({"event": "lost", "n": i}, now=2.0)
        except BackendUnavailable as exc:
            failures.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
    queue_while_busy(store, threads)
    assert len(failures) == 4
    monkeypatch.undo()
    assert [r.body["event"] for r in store.audit_records()] == ["before"]
    store.append_audit({"event": "after"}, now=3.0)  # the store still works


# --- rollback and tamper evidence -----------------------------------------------------------


def _fill(store: Store) -> None:
    store.get_or_create_meta("identity-key", lambda: b"k" * 32)
    store.create_session("app", "a" * 64, "owner", b"v1")
    store.update_session("app", "a" * 64, "b" * 64, b"v2")
    store.create_secret("app", "password", "ascii", lambda: b"p1")
    store.create_secret("app", "token", "ascii", lambda: b"t1")


TAMPERING = {
    "newest session version deleted": "delete from sessions where version = 2",
    "session row edited": "update sessions set creator = 'mallory' where version = 1",
    "secret deleted": "delete from secrets where name = 'token'",
    "secrets swapped": (
        "update secrets set value = (select s2.value from secrets s2 where s2.name <> secrets.name)"
    ),
    "meta row duplicated under a new name": (
        "insert into meta (k, v) select 'identity-key-2', v from meta where k = 'identity-key'"
    ),
    "chain entry deleted": "delete from changes where seq = 3",
    "chain entry edited": "update changes set tbl = 'meta' where seq = 2",
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_tampering_is_refused_at_open(
    what: str, db_url: str, store: Store, key: Keyring, head: Path
) -> None:
    _fill(store)
    store.close()
    sql(db_url, TAMPERING[what])
    with pytest.raises(RollbackError, match="rollback or tampering detected"):
        reopen(db_url, key, head)


@pytest.mark.parametrize(
    "what", ["newest session version deleted", "secret deleted", "secrets swapped"]
)
def test_tampering_is_refused_on_read_and_then_everything_is(
    what: str, db_url: str, store: Store
) -> None:
    _fill(store)
    sql(db_url, TAMPERING[what])
    with pytest.raises(RollbackError, match="rollback"):
        store.current_session("app")
        store.get_secret("app", "token")
        store.get_secret("app", "password")
    assert store.failure is not None
    with pytest.raises(RollbackError):
        store.health()
    with pytest.raises(RollbackError):
        store.create_secret("app", "new", "ascii", lambda: b"n")


# File copies are the SQLite case; for PostgreSQL, tests/integration/state replays a pg_dump.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_old_copy_of_the_database_is_refused(
    db_url: str, store: Store, key: Keyring, head: Path, tmp_path: Path
) -> None:
    _fill(store)
    store.close()
    db = Path(db_url.removeprefix("sqlite:///"))
    shutil.copy(db, tmp_path / "old.db")
    s = reopen(db_url, key, head)
    s.update_session("app", "b" * 64, "c" * 64, b"v3")
    s.close()
    shutil.copy(tmp_path / "old.db", db)
    for extra in db.parent.glob("cas.db-*"):
        extra.unlink()
    with pytest.raises(RollbackError, match="restored to an older state"):
        reopen(db_url, key, head)


def test_a_rolled_back_database_is_noticed_while_serving(db_url: str, store: Store) -> None:
    _fill(store)
    sql(db_url, "delete from changes where seq > 2")
    sql(db_url, "delete from secrets")
    with pytest.raises(RollbackError, match="no longer holds change"):
        store.get_secret("app", "password")


def test_a_missing_or_foreign_head_is_refused(
    db_url: str, store: Store, key: Keyring, head: Path
) -> None:
    _fill(store)
    store.close()
    head.unlink()
    with pytest.raises(RollbackError, match="no state head"):
        reopen(db_url, key, head)
    foreign = ChainKeys([Keyring.new_key()])
    HeadFile(head).write(Head(1, b"\x01" * 32), foreign)
    with pytest.raises(RollbackError, match="not signed"):
        reopen(db_url, key, head)


def test_an_unreachable_database_is_unavailable(key: Keyring) -> None:
    with pytest.raises(BackendUnavailable):
        Store.open("postgresql://nobody@127.0.0.1:1/none", key)


# --- audit, dump and load -------------------------------------------------------------------


def test_audit_entries_chain_and_are_sealed(db_url: str, store: Store) -> None:
    a = store.append_audit({"event": "cas-start"}, now=1.0)
    b = store.append_audit({"event": "session-create", "session": "app"}, now=2.0)
    assert b.body["prev"] == a.hash.hex() and b.body["seq"] == 2
    assert [r.body for r in store.audit_records()] == [a.body, b.body]
    raw = b"".join(bytes(r[0]) for r in sql(db_url, "select body from audit"))
    assert b"session-create" not in raw


def test_dump_and_load_into_a_fresh_database(
    db_url: str, store: Store, key: Keyring, tmp_path: Path
) -> None:
    _fill(store)
    store.append_audit({"event": "backup"}, now=3.0)
    dump = store.dump()
    target = Store.open(f"sqlite:///{tmp_path / 'fresh.db'}", key, head_file=tmp_path / "h2")
    assert target.load(dump) == store.head()
    record = target.current_session("app")
    assert record is not None and record.version == 2
    assert target.get_secret("app", "token") == ("ascii", b"t1")
    with pytest.raises(ConflictError):
        target.load(dump)
    target.close()
