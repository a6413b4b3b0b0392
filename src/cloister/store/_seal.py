"""Sealing values at rest: AES-256-GCM under a keyring, the row's identity as associated data.

The newest key seals; every key in the ring opens (``rotate`` re-seals under the newest), as
``cryptography``'s ``MultiFernet`` does. Binding the row's identity (table and key) as
associated data means a sealed value moved to another row no longer opens.

Sealed value layout: ``b"\\x01" ‖ key id (4) ‖ nonce (12) ‖ ciphertext+tag``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloister.errors import StoreError

_VERSION = b"\x01"
KEY_BYTES = 32


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"cloister-store-key-id\x00" + key).digest()[:4]


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise ValueError("a keyring holds one or more 32-byte keys, newest first")

    @classmethod
    def of(cls, keys: Sequence[bytes]) -> Keyring:
        return cls(tuple(keys))

    @staticmethod
    def new_key() -> bytes:
        return os.urandom(KEY_BYTES)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        key = self.keys[0]
        nonce = os.urandom(12)
        return _VERSION + _key_id(key) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 1 + 4 + 12 + 16 or sealed[:1] != _VERSION:
            raise StoreError("a sealed value is malformed", reason="store-tampered")
        kid, nonce, body = sealed[1:5], sealed[5:17], sealed[17:]
        for key in self.keys:
            if _key_id(key) == kid:
                try:
                    return AESGCM(key).decrypt(nonce, body, aad)
                except InvalidTag:
                    break
        raise StoreError(
            f"a sealed value does not open for {aad.decode(errors='replace')}",
            reason="store-tampered",
        )

    def rotate(self, sealed: bytes, aad: bytes) -> bytes:
        return self.seal(self.open(sealed, aad), aad)
