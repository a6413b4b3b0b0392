"""Caches on the CAS's activation path, keyed by content so that they can never go stale.

What it owns: a bounded, thread-safe memo of parsed sessions, keyed by the SHA-256 of the
stored document's bytes. A session document never changes under its digest, and a parsed
``Session`` is immutable, so a hit returns exactly what parsing again would. What it does not
own: anything the store decides. Nonces, secrets and session versions are read from the store
on every activation; only the pure work of turning bytes into a ``Session`` is skipped.

Each worker process has its own cache (nothing here is shared between processes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from cloister.session import Session

MAX_CACHED_SESSIONS = 256  # parsed documents kept per worker process


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
