"""Nonces that cost the CAS nothing until they are used.

A nonce is 32 bytes, sent as 64 hex digits::

    expiry (4 bytes, seconds since the epoch, big-endian)
    random (12 bytes)
    tag    (16 bytes: HMAC-SHA-256 over the version label and the 16 bytes above, truncated)

Issuing one writes nothing: its expiry and its authenticity travel inside it, under a key
that every worker and replica of this CAS reads from the store (``NonceKeys.load``). The store
records a nonce only when a request uses it (``Store.claim_nonce``, or in the same
transaction as the activation's audit entry), and a second use finds that record. So a
nonce is fresh (its random part is unpredictable), short-lived (its expiry is authenticated)
and single-use across workers and restarts (the store says so), and a client that asks for
a million nonces and uses none costs no storage at all.

Checking a nonce (``NonceKeys.check``) needs no store: a forged, altered or expired nonce is
refused before any other work is done for its request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cloister import limits
from cloister.errors import BindingError

_LABEL: Final = b"cloister-nonce-v1\x00"
_EXPIRY_BYTES: Final = 4
_RANDOM_BYTES: Final = 12
_TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
STORE_KEY: Final = "nonce-key"  # the meta row that holds the MAC key

assert _EXPIRY_BYTES + _RANDOM_BYTES + _TAG_BYTES == limits.NONCE_BYTES


@dataclass(frozen=True)
class Nonce:
    hex: str
    expires_at: float


class NonceKeys:
    """Makes and checks this CAS's authenticated nonces. Holds the MAC key only."""

    def __init__(self, key: bytes, *, random: Callable[[int], bytes] = os.urandom) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a nonce key has {KEY_BYTES} bytes")
        self._key = key
        self._random = random

    @classmethod
    def load(cls, get_or_create: Callable[[str, Callable[[], bytes]], bytes]) -> NonceKeys:
        """The key shared by every worker and replica: one sealed, chained row of the store."""
        return cls(get_or_create(STORE_KEY, lambda: os.urandom(KEY_BYTES)))

    def _tag(self, body: bytes) -> bytes:
        return hmac.digest(self._key, _LABEL + body, hashlib.sha256)[:_TAG_BYTES]

    def issue(self, now: float) -> Nonce:
        expires = int(now + limits.NONCE_TTL_SECONDS)
        body = struct.pack(">I", expires) + self._random(_RANDOM_BYTES)
        return Nonce((body + self._tag(body)).hex(), float(expires))

    def check(self, nonce_hex: str, now: float) -> Nonce:
        """The nonce, if this CAS made it and it has not expired; else ``BindingError``.

        Whether it was used before is the store's to say (``Store.claim_nonce``).
        """
        try:
            raw = bytes.fromhex(nonce_hex)
        except ValueError:
            raw = b""
        if len(raw) != limits.NONCE_BYTES:
            raise BindingError("the nonce is malformed", reason="nonce-invalid")
        body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise BindingError("the nonce was not issued by this CAS", reason="nonce-invalid")
        (expires,) = struct.unpack(">I", body[:_EXPIRY_BYTES])
        if expires <= now:
            raise BindingError("the nonce has expired", reason="nonce-invalid")
        if expires > now + limits.NONCE_TTL_SECONDS + 1:
            # Only a holder of the key could make one; refuse it all the same.
            raise BindingError("the nonce expires too late", reason="nonce-invalid")
        return Nonce(nonce_hex, float(expires))


def replayed() -> BindingError:
    return BindingError("the nonce was used before", reason="nonce-invalid")
