"""Caches on the CAS's activation path, keyed so that a hit returns what the store would.

What it owns:

* ``SessionCache``: parsed sessions, keyed by the SHA-256 of the stored document's bytes. A
  document never changes under its digest and a parsed ``Session`` is immutable, so a hit is
  exactly what parsing again would give.
* ``SecretCache``: stored secret values, keyed by (session, secret, kind, the hash of the
  session version being activated). It keeps only values that cannot change while that
  version is current: a stored value is rewritten only when it was made for another session
  version (its ``origin``; migrated on the first activation of the new version), when its
  kind changes (a new version), or when its certificate needs renewal. So a value is kept only
  if its ``origin`` is this version, and a certificate only until it needs renewal (checked at
  every hit with the activation's ``now``); after that the store is asked again, and it has
  the value another worker may have renewed. A hit is also refused after ``max_age`` (defence
  in depth against a writer this reasoning does not know of).

What it does not own: anything the store decides. Nonces, session versions and the creation of
secrets (exactly once, across all processes) stay in the store; the cache only skips reading a
value back that is already known.

Each worker process has its own caches (nothing here is shared between processes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from cloister import secrets as secretlib
from cloister.session import Session

MAX_CACHED_SESSIONS = 256  # parsed documents kept per worker process
MAX_CACHED_SECRETS = 4096  # stored secret values kept per worker process
SECRET_MAX_AGE = timedelta(minutes=5)


class SessionCache:
    """``Session.from_yaml`` with a bounded LRU memo keyed by the document's digest."""

    def __init__(self, max_entries: int = MAX_CACHED_SESSIONS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, Session] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, document: bytes) -> Session:
        """The parsed session of ``document`` (raises what ``Session.from_yaml`` raises)."""
        key = hashlib.sha256(document).digest()
        with self._lock:
            session = self._entries.get(key)
            if session is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return session
        # Parse outside the lock: two threads may parse the same document once each, which
        # costs a little CPU and changes no result.
        session = Session.from_yaml(document)
        with self._lock:
            self.misses += 1
            self._entries[key] = session
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return session


_SecretKey = tuple[str, str, str, str]  # session, secret name, kind, session version hash


class SecretStore(Protocol):
    """What the secrets resolver needs of a store (``Store`` is one)."""

    def create_secret(
        self, session: str, name: str, kind: str, make: Callable[[], bytes]
    ) -> bytes: ...

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None: ...


class SecretCache:
    """Stored secret values of the session versions being activated (see the module docs)."""

    def __init__(
        self, max_entries: int = MAX_CACHED_SECRETS, max_age: timedelta = SECRET_MAX_AGE
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_age = max_age
        self._lock = threading.Lock()
        self._entries: OrderedDict[_SecretKey, tuple[bytes, secretlib.SecretValue, datetime]]
        self._entries = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def view(self, store: SecretStore, version: str, now: datetime) -> _CachedStore:
        """The ``SecretStore`` one activation of session version ``version`` at ``now`` uses."""
        return _CachedStore(self, store, version, now)

    def get(self, key: _SecretKey, now: datetime) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            raw, value, stored_at = entry
            if not stored_at <= now < stored_at + self.max_age or _renewable_now(value, now):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return raw

    def put(self, key: _SecretKey, raw: bytes, now: datetime) -> None:
        try:
            value = secretlib.SecretValue.from_bytes(raw)
        except (ValueError, KeyError, TypeError):
            return  # not a value this cache understands: always read it from the store
        # Only a value made (or migrated) for this very version is final for it.
        if value.origin != key[3] or value.kind != key[2] or _renewable_now(value, now):
            return
        with self._lock:
            self.misses += 1
            self._entries[key] = (raw, value, now)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, session: str, name: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == session and k[1] == name]:
                del self._entries[key]


def _renewable_now(value: secretlib.SecretValue, now: datetime) -> bool:
    return value.cert is not None and secretlib.needs_renewal(value, now)


class _CachedStore:
    """A ``SecretStore`` for one activation: reads through the cache, writes to the store."""

    def __init__(self, cache: SecretCache, store: SecretStore, version: str, now: datetime) -> None:
        self._cache = cache
        self._store = store
        self._version = version
        self._now = now

    def create_secret(self, session: str, name: str, kind: str, make: Callable[[], bytes]) -> bytes:
        key = (session, name, kind, self._version)
        raw = self._cache.get(key, self._now)
        if raw is None:
            raw = self._store.create_secret(session, name, kind, make)
            self._cache.put(key, raw, self._now)
        return raw

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None:
        self._cache.forget(session, name)
        self._store.replace_secret(session, name, kind, value)
