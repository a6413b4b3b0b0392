"""The hash chain of the store's changes, its in-memory view, and the signed head kept outside.

Every change to a protected row (meta, sessions, secrets, audit, kit) appends one entry::

    hash(n) = SHA-256("cloister-chain-v1" ‖ n ‖ hash(n-1) ‖ table ‖ key ‖ digest(row))
    mac(n)  = HMAC-SHA-256(chain key, hash(n))

in the same transaction as the row itself. ``ChainState`` replays the entries, checks every
link and MAC, and remembers the digest each row must have now; the store compares rows against
it on every read that matters. ``HeadFile`` keeps the newest head this CAS has seen outside the
database, signed with the state key, so that a database restored to an older state (whose own
chain is consistent, only shorter or forked) is told apart from one that merely moved on.

What it does not do: decide which rows are protected (the store does) or see values: digests
are taken over sealed bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloister.errors import RollbackError

GENESIS = bytes(32)
# Bounds a head file read from the untrusted disk before parsing it.
MAX_HEAD_FILE_BYTES = 4096


def derive(store_key: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from the store key (HKDF-SHA-256)."""
    return HKDF(hashes.SHA256(), 32, salt=b"cloister-store-v1", info=purpose).derive(store_key)


def _frame(h: hashlib._Hash, part: bytes | str | int) -> None:
    if isinstance(part, int):
        part = str(part)
    if isinstance(part, str):
        part = part.encode()
    h.update(len(part).to_bytes(4, "big"))
    h.update(part)


def row_digest(table: str, key: str, fields: Sequence[bytes | str | int]) -> bytes:
    """The digest of one row as stored (sealed values included), length-framed."""
    h = hashlib.sha256(b"cloister-row-v1")
    for part in (table, key, *fields):
        _frame(h, part)
    return h.digest()


def link(seq: int, prev: bytes, table: str, key: str, digest: bytes) -> bytes:
    h = hashlib.sha256(b"cloister-chain-v1")
    for part in (seq, prev, table, key, digest):
        _frame(h, part)
    return h.digest()


@dataclass(frozen=True)
class Entry:
    seq: int
    prev: bytes
    table: str
    key: str
    digest: bytes
    hash: bytes
    mac: bytes


class ChainKeys:
    """The MAC key(s) of the chain and the signing key of heads, derived from the store keys.

    The newest store key MACs and signs; every store key's MAC key verifies (rotation).
    """

    def __init__(self, store_keys: Sequence[bytes]) -> None:
        self._macs = [derive(k, b"chain-mac") for k in store_keys]
        self.signer = ed25519.Ed25519PrivateKey.from_private_bytes(
            derive(store_keys[0], b"state-signing")
        )
        self.verifiers = [
            ed25519.Ed25519PrivateKey.from_private_bytes(derive(k, b"state-signing")).public_key()
            for k in store_keys
        ]

    def mac(self, entry_hash: bytes) -> bytes:
        return hmac.new(self._macs[0], entry_hash, "sha256").digest()

    def check_mac(self, entry_hash: bytes, mac: bytes) -> bool:
        return any(
            hmac.compare_digest(hmac.new(k, entry_hash, "sha256").digest(), mac) for k in self._macs
        )

    def sign(self, message: bytes) -> bytes:
        return self.signer.sign(message)

    def check_signature(self, signature: bytes, message: bytes) -> bool:
        for pub in self.verifiers:
            try:
                pub.verify(signature, message)
                return True
            except InvalidSignature:
                continue
        return False

    def entry(self, seq: int, prev: bytes, table: str, key: str, digest: bytes) -> Entry:
        h = link(seq, prev, table, key, digest)
        return Entry(seq, prev, table, key, digest, h, self.mac(h))


def tampered(what: str) -> RollbackError:
    return RollbackError(f"rollback or tampering detected: {what}", reason="rollback")


@dataclass
class ChainState:
    """What the verified chain says the database must hold now."""

    head_seq: int = 0
    head_hash: bytes = GENESIS
    # (table, key) -> (seq of its newest change, digest it must have)
    rows: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    # session name -> (seq, newest version)
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)
    # newest audit entry: (audit seq, entry hash)
    audit_head: tuple[int, bytes] = (0, GENESIS)
    hashes: list[bytes] = field(default_factory=list)

    def hash_at(self, seq: int) -> bytes | None:
        if seq == 0:
            return GENESIS
        return self.hashes[seq - 1] if 0 < seq <= len(self.hashes) else None

    def apply(self, e: Entry, keys: ChainKeys) -> None:
        if e.seq != self.head_seq + 1:
            raise tampered(f"chain entry {e.seq} follows {self.head_seq} (an entry is missing)")
        if e.prev != self.head_hash:
            raise tampered(f"chain entry {e.seq} does not link to entry {self.head_seq}")
        if link(e.seq, e.prev, e.table, e.key, e.digest) != e.hash:
            raise tampered(f"chain entry {e.seq} was edited")
        if not keys.check_mac(e.hash, e.mac):
            raise tampered(f"chain entry {e.seq} does not carry this CAS's MAC")
        self.head_seq, self.head_hash = e.seq, e.hash
        self.hashes.append(e.hash)
        self.rows[(e.table, e.key)] = (e.seq, e.digest)
        if e.table == "sessions":
            name, version = json.loads(e.key)
            self.versions[str(name)] = (e.seq, int(version))
        elif e.table == "audit":
            aseq, _, ahash = e.key.partition("/")
            self.audit_head = (int(aseq), bytes.fromhex(ahash))

    def apply_all(self, entries: Iterable[Entry], keys: ChainKeys) -> None:
        for e in entries:
            self.apply(e, keys)


@dataclass(frozen=True)
class Head:
    seq: int
    hash: bytes


class HeadFile:
    """The newest chain head this CAS has seen, signed, kept beside the store key.

    In simulation this is a file in the data directory; in a TEE it would be sealed to the TEE
    like the store key. It is written after every change this CAS makes or learns of, with
    write-to-temporary, fsync, rename: a crash leaves the previous head, never a torn one.
    """

    def __init__(self, path: Path, *, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        self._written = -1

    @staticmethod
    def _message(seq: int, h: bytes) -> bytes:
        return b"cloister-state-head-v1\x00" + seq.to_bytes(8, "big") + h

    def read(self, keys: ChainKeys) -> Head | None:
        try:
            raw = self.path.read_bytes()[: MAX_HEAD_FILE_BYTES + 1]
        except FileNotFoundError:
            return None
        try:
            if len(raw) > MAX_HEAD_FILE_BYTES:
                raise ValueError("too large")
            doc = json.loads(raw)
            seq, h, sig = int(doc["seq"]), bytes.fromhex(doc["hash"]), bytes.fromhex(doc["sig"])
            if seq < 0 or len(h) != 32:
                raise ValueError("out of range")
        except (ValueError, KeyError, TypeError):
            raise tampered(f"the state head {self.path} is unreadable") from None
        if not keys.check_signature(sig, self._message(seq, h)):
            raise tampered(f"the state head {self.path} is not signed by this CAS's state key")
        self._written = max(self._written, seq)
        return Head(seq, h)

    def write(self, head: Head, keys: ChainKeys) -> None:
        if not self.writable or head.seq <= self._written:
            return
        doc = {
            "seq": head.seq,
            "hash": head.hash.hex(),
            "sig": keys.sign(self._message(head.seq, head.hash)).hex(),
        }
        # One temporary file per writer: several CAS processes may share a data directory.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self._written = head.seq
