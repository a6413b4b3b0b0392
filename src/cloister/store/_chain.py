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

import fcntl
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloister.errors import RollbackError

log = logging.getLogger(__name__)

GENESIS = bytes(32)
# Bounds a head file read from the untrusted disk before parsing it.
MAX_HEAD_FILE_BYTES = 4096
# A slot of the head file: one signed head, padded; well within one disk sector.
SLOT_BYTES = 256


def derive(store_key: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from the store key (HKDF-SHA-256)."""
    return HKDF(hashes.SHA256(), 32, salt=b"cloister-store-v1", info=purpose).derive(store_key)


def _framed(label: bytes, parts: Iterable[bytes | str | int]) -> bytes:
    """``label`` and each part as a 4-byte big-endian length and the part (ints as decimal
    text, strings as UTF-8): one buffer, hashed at once."""
    out = [label]
    for part in parts:
        if isinstance(part, int):
            part = str(part)
        if isinstance(part, str):
            part = part.encode()
        out += (len(part).to_bytes(4, "big"), part)
    return b"".join(out)


def row_digest(table: str, key: str, fields: Sequence[bytes | str | int]) -> bytes:
    """The digest of one row as stored (sealed values included), length-framed."""
    return hashlib.sha256(_framed(b"cloister-row-v1", (table, key, *fields))).digest()


def link(seq: int, prev: bytes, table: str, key: str, digest: bytes) -> bytes:
    return hashlib.sha256(_framed(b"cloister-chain-v1", (seq, prev, table, key, digest))).digest()


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
    like the store key. It is written after every change this CAS makes or learns of (once per
    group commit), before that change is acknowledged.

    Two slots of ``SLOT_BYTES`` each hold a signed head; a write goes, in place, into the slot
    that does not hold the newest head and is flushed to the disk (``fdatasync``). A crash
    in the middle of a write can only tear that slot: the other still holds the previous
    head. Writers in several processes take an exclusive ``flock`` and never replace a newer
    head with an older one. Reading takes the newest slot that verifies; a slot that does not
    verify beside one that does is reported (a torn write, or an edit that at most shows the
    previous head, which an older copy of the whole file would show as well); if none
    verifies, the head is refused. A one-document file of earlier versions reads as slot 0.
    """

    def __init__(self, path: Path, *, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        self._written = -1

    @staticmethod
    def _message(seq: int, h: bytes) -> bytes:
        return b"cloister-state-head-v1\x00" + seq.to_bytes(8, "big") + h

    @staticmethod
    def _parse(slot: bytes) -> tuple[int, bytes, bytes] | None:
        """A slot's (seq, hash, signature); None if empty; ValueError if unreadable."""
        if not slot.strip(b"\x00 \n"):
            return None
        try:
            doc = json.loads(slot.rstrip(b"\x00"))
            seq, h, sig = int(doc["seq"]), bytes.fromhex(doc["hash"]), bytes.fromhex(doc["sig"])
        except (ValueError, KeyError, TypeError):
            raise ValueError("unreadable") from None
        if seq < 0 or len(h) != 32:
            raise ValueError("out of range")
        return seq, h, sig

    def read(self, keys: ChainKeys) -> Head | None:
        try:
            raw = self.path.read_bytes()[: MAX_HEAD_FILE_BYTES + 1]
        except FileNotFoundError:
            return None
        if len(raw) > MAX_HEAD_FILE_BYTES:
            raise tampered(f"the state head {self.path} is unreadable")
        valid: list[Head] = []
        problems: list[str] = []
        for i, slot in enumerate(_slots(raw)):
            try:
                parsed = self._parse(slot)
            except ValueError:
                problems.append(f"slot {i} is unreadable")
                continue
            if parsed is None:
                continue
            seq, h, sig = parsed
            if keys.check_signature(sig, self._message(seq, h)):
                valid.append(Head(seq, h))
            else:
                problems.append(f"slot {i} is not signed by this CAS's state key")
        if not valid:
            if not problems:
                return None
            reason = (
                "is not signed by this CAS's state key"
                if all("signed" in p for p in problems)
                else "is unreadable"
            )
            raise tampered(f"the state head {self.path} {reason}")
        head = max(valid, key=lambda v: v.seq)
        for problem in problems:
            log.warning("state head %s: %s; using head %d", self.path, problem, head.seq)
        self._written = max(self._written, head.seq)
        return head

    def write(self, head: Head, keys: ChainKeys) -> None:
        if not self.writable or head.seq <= self._written:
            return
        doc = {
            "seq": head.seq,
            "hash": head.hash.hex(),
            "sig": keys.sign(self._message(head.seq, head.hash)).hex(),
        }
        record = json.dumps(doc).encode().ljust(SLOT_BYTES, b" ")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # other CAS processes on this data directory
            current = os.pread(fd, 2 * SLOT_BYTES, 0)
            seqs = []
            for slot in _slots(current):
                try:
                    parsed = self._parse(slot)
                except ValueError:
                    parsed = None
                seqs.append(-1 if parsed is None else parsed[0])
            if max(seqs) >= head.seq:
                self._written = max(seqs)  # another process recorded this head or a newer one
                return
            # Overwrite the older slot; the newest head stays intact until this one is durable.
            target = 0 if seqs[0] <= seqs[1] else 1
            os.pwrite(fd, record, target * SLOT_BYTES)
            os.fdatasync(fd)
        finally:
            os.close(fd)  # releases the lock
        self._written = head.seq


def _slots(raw: bytes) -> tuple[bytes, bytes]:
    return raw[:SLOT_BYTES], raw[SLOT_BYTES : 2 * SLOT_BYTES]
