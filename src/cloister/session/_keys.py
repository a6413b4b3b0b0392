"""Owner keys and the signatures owners put on sessions.

An owner key is Ed25519. It is written ``ed25519:<base64 of the 32 raw bytes>`` in sessions
and on the wire (a PEM SubjectPublicKeyInfo is accepted too). A signature covers a domain
separator, the operation and the session's hash, so a signature made to create a session
cannot be replayed as an update, nor one over another document.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

PREFIX = "ed25519:"
_DOMAIN = b"cloister-session-signature-v1\x00"
OPERATIONS = frozenset({"create", "update", "delete"})


def parse_public_key(text: str) -> bytes:
    """The raw 32 bytes of an owner public key written as ``ed25519:...`` or PEM."""
    text = text.strip()
    if text.startswith(PREFIX):
        try:
            raw = base64.b64decode(text[len(PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"owner key {text[:24]!r}... is not valid base64") from None
        if len(raw) != 32:
            raise ValueError("an ed25519 owner key is 32 bytes")
        return raw
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError("owner keys must be Ed25519")
        return key.public_bytes_raw()
    raise ValueError(
        f"{text[:24]!r} is not CREATOR, NONE or an owner public key ('ed25519:<base64>' or PEM)"
    )


def format_public_key(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode()


def public_key_of(key: ed25519.Ed25519PrivateKey) -> str:
    return format_public_key(key.public_key().public_bytes_raw())


def payload(operation: str, session_hash: str) -> bytes:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    return _DOMAIN + operation.encode() + b"\x00" + bytes.fromhex(session_hash)


def sign(key: ed25519.Ed25519PrivateKey, operation: str, session_hash: str) -> str:
    """A base64 signature by ``key`` over ``operation`` of the session with ``session_hash``."""
    return base64.b64encode(key.sign(payload(operation, session_hash))).decode()


def verify(public_key: bytes, signature_b64: str, operation: str, session_hash: str) -> bool:
    try:
        sig = base64.b64decode(signature_b64, validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            sig, payload(operation, session_hash)
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
