"""The owner's key on this machine: ``$CLOISTER_HOME/owner.key`` (Ed25519, PKCS#8 PEM, 0600)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister._files import write_private
from cloister.client import cloister_home
from cloister.errors import AccessDenied


def key_path(home: Path | None = None) -> Path:
    return (home or cloister_home()) / "owner.key"


def create(path: Path) -> ed25519.Ed25519PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem, exclusive=True)
    return key


def load(path: Path | None = None) -> ed25519.Ed25519PrivateKey:
    path = path or key_path()
    if not path.exists():
        raise AccessDenied(
            f"no owner key at {path}; create one with 'cloister keys create'", reason="no-owner-key"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AccessDenied(f"{path} is not an Ed25519 owner key", reason="bad-owner-key")
    return key
