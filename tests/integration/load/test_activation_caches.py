"""The caches on the activation path return what the store would, or nothing.

``SessionCache`` keys by the document's digest; ``SecretCache`` keeps only values made for the
session version being activated, and certificates only until they need renewal. Real store,
real secrets, fixed instants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.integration.load.agents import MEASUREMENT, SESSION

from cloister import secrets as secretlib
from cloister.cas import cache
from cloister.session import Session
from cloister.store import Keyring, Store

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_session_cache_parses_each_document_once_and_stays_bounded() -> None:
    sessions = cache.SessionCache(max_entries=2)
    doc = SESSION.format(name="a", measurement=MEASUREMENT.hex()).encode()
    first = sessions.load(doc)
    assert sessions.load(doc) is first and (sessions.hits, sessions.misses) == (1, 1)
    assert first == Session.from_yaml(doc)
    for name in ("b", "c", "d"):
        sessions.load(SESSION.format(name=name, measurement=MEASUREMENT.hex()).encode())
    assert len(sessions) == 2
    other = sessions.load(doc + b"\n# a comment changes the digest\n")
    assert other is not first and other.hash == first.hash


class CountingStore:
    """The resolver's view of the store, over a real ``Store``, counting reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0

    def create_secret(self, session: str, name: str, kind: str, make: Callable[[], bytes]) -> bytes:
        self.reads += 1
        return self.store.create_secret(session, name, kind, make)

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None:
        self.store.replace_secret(session, name, kind, value)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    s = Store.sqlite(tmp_path / "cas.db", Keyring.of([Keyring.new_key()]))
    return CountingStore(s)


def _value(kind: str, origin: str, **kw: object) -> bytes:
    return secretlib.SecretValue(kind, origin=origin, **kw).to_bytes()  # type: ignore[arg-type]


def test_values_of_this_version_are_served_from_the_cache(store: CountingStore) -> None:
    secrets = cache.SecretCache()
    made = _value("ascii", "v1", data=b"s3cret-value-0123456789")
    view = secrets.view(store, "v1", NOW)
    assert view.create_secret("app", "pw", "ascii", lambda: made) == made
    again = secrets.view(store, "v1", NOW + timedelta(seconds=1))
    assert again.create_secret("app", "pw", "ascii", lambda: b"never made") == made
    assert store.reads == 1 and secrets.hits == 1
    # Another version of the session, or another kind: the store is asked.
    secrets.view(store, "v2", NOW).create_secret("app", "pw", "ascii", lambda: b"unused")
    assert store.reads == 2


def test_a_value_made_for_another_version_is_never_cached(store: CountingStore) -> None:
    secrets = cache.SecretCache()
    old = _value("ascii", "v1", data=b"made-for-the-old-version")
    store.create_secret("app", "pw", "ascii", lambda: old)
    for _ in range(3):
        got = secrets.view(store, "v2", NOW).create_secret("app", "pw", "ascii", lambda: b"")
        assert got == old  # the resolver migrates it; until the store has the result, ask it
    assert store.reads == 4 and len(secrets) == 0


def test_a_replaced_value_is_forgotten(store: CountingStore) -> None:
    secrets = cache.SecretCache()
    first = _value("binary", "v1", data=b"\x01" * 32)
    second = _value("binary", "v1", data=b"\x02" * 32)
    view = secrets.view(store, "v1", NOW)
    view.create_secret("app", "tok", "binary", lambda: first)
    view.replace_secret("app", "tok", "binary", second)
    assert secrets.view(store, "v1", NOW).create_secret("app", "tok", "binary", bytes) == second


def test_certificates_leave_the_cache_when_they_need_renewal(store: CountingStore) -> None:
    doc = Session.from_yaml(SESSION.format(name="app", measurement=MEASUREMENT.hex()))
    ca_secret = doc.secret("ca")
    assert ca_secret is not None
    ca = replace(secretlib.generate(ca_secret, now=NOW), origin="v1")
    lifetime = ca.certificate().not_valid_after_utc - NOW
    secrets = cache.SecretCache(max_age=lifetime * 2)
    raw = ca.to_bytes()
    secrets.view(store, "v1", NOW).create_secret("app", "ca", "x509-ca", lambda: raw)
    secrets.view(store, "v1", NOW).create_secret("app", "ca", "x509-ca", bytes)
    assert store.reads == 1
    late = NOW + lifetime * 0.9  # less than a third of its life left: renewal is due
    assert secretlib.needs_renewal(ca, late)
    secrets.view(store, "v1", late).create_secret("app", "ca", "x509-ca", bytes)
    assert store.reads == 2


def test_entries_expire_and_the_cache_stays_bounded(store: CountingStore) -> None:
    secrets = cache.SecretCache(max_entries=3, max_age=timedelta(minutes=5))
    for i in range(10):
        value = _value("ascii", "v1", data=f"value-number-{i:04d}-padding".encode())
        secrets.view(store, "v1", NOW).create_secret("app", f"s{i}", "ascii", lambda v=value: v)
    assert len(secrets) == 3
    secrets.view(store, "v1", NOW + timedelta(minutes=6)).create_secret("app", "s9", "ascii", bytes)
    assert store.reads == 11
    # A clock that steps back does not make an entry valid for longer.
    secrets.view(store, "v1", NOW - timedelta(minutes=1)).create_secret("app", "s8", "ascii", bytes)
    assert store.reads == 12
