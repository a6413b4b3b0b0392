"""The encrypted store: sealing, races, single-use nonces, values created once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from cloister.errors import ConflictError, StoreError
from cloister.store import Keyring, Store, load_or_create_key


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.sqlite(tmp_path / "cas.db", Keyring.of([Keyring.new_key()]))


def test_values_are_sealed_at_rest(tmp_path: Path, store: Store) -> None:
    store.create_secret("s", "password", "ascii", lambda: b"very-secret-value")
    raw = (tmp_path / "cas.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("cas.db-*")
    )
    assert b"very-secret-value" not in raw
    assert store.get_secret("s", "password") == ("ascii", b"very-secret-value")


def test_a_value_moved_to_another_row_does_not_open(tmp_path: Path, store: Store) -> None:
    store.create_secret("s", "a", "ascii", lambda: b"A")
    store.create_secret("s", "b", "ascii", lambda: b"B")
    db = sqlite3.connect(tmp_path / "cas.db")
    (sealed_a,) = db.execute("select value from secrets where name='a'").fetchone()
    db.execute("update secrets set value=? where name='b'", (sealed_a,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="does not open"):
        store.get_secret("s", "b")


def test_wrong_key_cannot_open(tmp_path: Path, store: Store) -> None:
    store.create_secret("s", "a", "ascii", lambda: b"A")
    other = Store.sqlite(tmp_path / "cas.db", Keyring.of([Keyring.new_key()]))
    with pytest.raises(StoreError):
        other.get_secret("s", "a")


def test_keyring_rotation_keeps_old_values_readable() -> None:
    old, new = Keyring.new_key(), Keyring.new_key()
    sealed = Keyring.of([old]).seal(b"v", b"row")
    ring = Keyring.of([new, old])
    assert ring.open(sealed, b"row") == b"v"
    rotated = ring.rotate(sealed, b"row")
    assert Keyring.of([new]).open(rotated, b"row") == b"v"


def test_secret_is_created_exactly_once_under_a_race(store: Store) -> None:
    results: list[bytes] = []
    calls = []

    def make() -> bytes:
        calls.append(1)
        return f"value-{threading.get_ident()}".encode()

    def worker() -> None:
        results.append(store.create_secret("s", "x", "ascii", make))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert store.get_secret("s", "x") == ("ascii", results[0])


def test_one_of_several_updates_of_one_predecessor_wins(store: Store) -> None:
    store.create_session("s", "a" * 64, "creator", b"v1")
    outcomes: list[str] = []

    def update(i: int) -> None:
        try:
            store.update_session("s", "a" * 64, f"{i:064x}", b"v2")
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=update, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1 and outcomes.count("conflict") == 5
    current = store.current_session("s")
    assert current is not None and current.version == 2


def test_nonces_are_single_use_and_expire(store: Store) -> None:
    store.add_nonce("n1", expires_at=100.0)
    assert store.consume_nonce("n1", now=50.0)
    assert not store.consume_nonce("n1", now=51.0)
    store.add_nonce("n2", expires_at=100.0)
    assert not store.consume_nonce("n2", now=100.0)
    assert not store.consume_nonce("unknown", now=1.0)


def test_store_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "d" / "store.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key
