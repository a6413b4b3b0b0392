"""The on-disk format of an encrypted volume: keys, header, blocks, manifest and root tag.

This module owns the bytes. It knows nothing about open files, caches or FUSE; it turns keys
and records into ciphertext and back, and raises :class:`~cloister.errors.VolumeIntegrityError`
with a stable ``reason`` when something on disk is not what the key says it must be.
``docs/volume-format.md`` is the prose version of this module; keep the two in step.

A volume directory holds::

    volume       header: magic, version, block size, volume id, HMAC under the header key
    manifest     the encrypted manifest of the current generation (replaced by rename)
    data/<fid>   slot 0 of each block of a regular file, named by its random file id
    data/<fid>.1 slot 1 of each block (created when a committed block is first overwritten)
    lock         an empty file that the one writer holds an exclusive flock(2) on

Keys (all HKDF-SHA256 from the 32-byte volume key, salt = the 16-byte volume id)::

    header key    info = "cloister/volume/v1/header"
    manifest key  info = "cloister/volume/v1/manifest"
    root key      info = "cloister/volume/v1/root"
    file key      info = "cloister/volume/v1/file" || fid        (one key per file)

A block record is ``nonce(12) || AES-256-GCM(file key, nonce, plaintext, aad)`` with
``aad = fid || u64 block index``; its 16-byte GCM tag is also pinned in the manifest. Each
block index has two slots, one in each slot file, at the same offset; a write goes to the
slot that the last committed manifest does *not* name, so a crash can never damage committed
data (copy-on-write at block granularity).

The root tag of a generation is ``"<generation>:<hex HMAC-SHA256(root key, manifest file)>"``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloister import errors, limits

FORMAT_VERSION: Final = 1
KEY_BYTES: Final = 32
VOLUME_ID_BYTES: Final = 16
FID_BYTES: Final = 16
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAC_BYTES: Final = 32

DEFAULT_BLOCK_SIZE: Final = 64 * 1024
MIN_BLOCK_SIZE: Final = 4 * 1024
MAX_BLOCK_SIZE: Final = 1024 * 1024

# Bounds checked before anything read from the untrusted disk is parsed or allocated.
MAX_MANIFEST_BYTES: Final = limits.MAX_VOLUME_MANIFEST_BYTES
MAX_PATH_BYTES: Final = limits.MAX_VOLUME_PATH_BYTES
MAX_NAME_BYTES: Final = limits.MAX_VOLUME_NAME_BYTES

HEADER_NAME: Final = "volume"
MANIFEST_NAME: Final = "manifest"
MANIFEST_TMP_NAME: Final = "manifest.tmp"
DATA_DIR: Final = "data"
LOCK_NAME: Final = "lock"

_HEADER_MAGIC: Final = b"CLVOLHDR"
_MANIFEST_MAGIC: Final = b"CLVOLMAN"
_HEADER = struct.Struct(">8sHI16s")  # magic, version, block size, volume id
_HEADER_BYTES: Final = _HEADER.size + MAC_BYTES
_MANIFEST_PREFIX = struct.Struct(">8sHQ12s")  # magic, version, generation, nonce
_ENTRY = struct.Struct(">BIqH")  # kind, mode, mtime_ns, path length
_FILE = struct.Struct(">16sQ")  # fid, size
_BLOCK_AAD = struct.Struct(">16sQ")  # fid, block index

KIND_FILE: Final = 1
KIND_DIR: Final = 2


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def equal(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """Constant-time comparison of two MACs or tags."""
    return constant_time.bytes_eq(bytes(a), bytes(b))


def _integrity(message: str, reason: str, path: str | None = None) -> errors.VolumeIntegrityError:
    return errors.VolumeIntegrityError(message, path=path, reason=reason)


# --- keys --------------------------------------------------------------------------------


def _derive(key: bytes, volume_id: bytes, info: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=volume_id,
        info=b"cloister/volume/v1/" + info,
    ).derive(key)


@dataclass(frozen=True)
class Keys:
    """Every key of one volume, derived once when it is opened."""

    volume_key: bytes
    volume_id: bytes
    header: bytes
    manifest: AESGCM
    root: bytes

    @classmethod
    def derive(cls, key: bytes, volume_id: bytes) -> Keys:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a volume key is {KEY_BYTES} bytes, not {len(key)}")
        return cls(
            volume_key=bytes(key),
            volume_id=volume_id,
            header=_derive(key, volume_id, b"header"),
            manifest=AESGCM(_derive(key, volume_id, b"manifest")),
            root=_derive(key, volume_id, b"root"),
        )

    def file_cipher(self, fid: bytes) -> AESGCM:
        # One key per file: a block moved into another file fails under that file's key even
        # before its associated data is compared, and the nonce space is per file.
        return AESGCM(_derive(self.volume_key, self.volume_id, b"file" + fid))


# --- header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    block_size: int
    volume_id: bytes


def check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )


def encode_header(header: Header, keys: Keys) -> bytes:
    body = _HEADER.pack(_HEADER_MAGIC, FORMAT_VERSION, header.block_size, header.volume_id)
    return body + mac(keys.header, body)


def peek_header(raw: bytes) -> Header:
    """Parse the header without authenticating it: only to learn the volume id for HKDF."""
    if len(raw) != _HEADER_BYTES:
        raise _integrity("the volume header has the wrong length", "header-malformed")
    magic, version, block_size, volume_id = _HEADER.unpack_from(raw)
    if magic != _HEADER_MAGIC:
        raise _integrity("the volume header has the wrong magic", "header-malformed")
    if version != FORMAT_VERSION:
        raise _integrity(f"unsupported volume format version {version}", "unsupported-version")
    return Header(block_size=block_size, volume_id=volume_id)


def check_header(raw: bytes, keys: Keys) -> Header:
    """Authenticate the header; a wrong key and a changed header look the same on purpose."""
    header = peek_header(raw)
    if not equal(mac(keys.header, raw[: _HEADER.size]), raw[_HEADER.size :]):
        raise _integrity("wrong volume key, or the volume header was changed", "wrong-key")
    # Checked only after the MAC: a block size outside the bounds is then a bug, not an attack.
    check_block_size(header.block_size)
    return header


def header_length() -> int:
    return _HEADER_BYTES


# --- blocks ------------------------------------------------------------------------------


def record_stride(block_size: int) -> int:
    """Bytes between consecutive slots in a data file: one full block record."""
    return NONCE_BYTES + block_size + TAG_BYTES


def record_offset(block_size: int, index: int) -> int:
    # Block i of a slot file sits at i strides, whatever the other slot holds: a file that
    # was written once is one contiguous run, which the kernel's readahead recognizes.
    return index * record_stride(block_size)


def block_aad(fid: bytes, index: int) -> bytes:
    return _BLOCK_AAD.pack(fid, index)


def data_extents(block_size: int, size: int, slots: bytes | bytearray) -> tuple[int, int]:
    """The exact length of each slot file of a file whose manifest entry is (size, slots)."""
    n = len(slots)
    if n == 0:
        return (0, 0)
    stride = record_stride(block_size)
    extents = [0, 0]
    last = slots[n - 1]
    extents[last] = (n - 1) * stride + NONCE_BYTES + (size - (n - 1) * block_size) + TAG_BYTES
    other = slots.rfind(b"\x01" if last == 0 else b"\x00", 0, n - 1)
    if other >= 0:
        extents[1 - last] = (other + 1) * stride
    return (extents[0], extents[1])


# --- root tag ----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RootTag:
    """A volume version: its generation and the MAC over its manifest file."""

    generation: int
    mac: bytes

    def __str__(self) -> str:
        return f"{self.generation}:{self.mac.hex()}"

    @classmethod
    def parse(cls, text: str) -> RootTag:
        generation, sep, mac_hex = text.strip().partition(":")
        try:
            mac = bytes.fromhex(mac_hex)
            gen = int(generation, 10)
        except ValueError:
            raise ValueError(f"not a volume root tag: {text!r}") from None
        if not sep or len(mac) != MAC_BYTES or gen < 1 or not generation.isdigit():
            raise ValueError(f"not a volume root tag: {text!r}")
        return cls(generation=gen, mac=mac)


def root_mac(keys: Keys, manifest_file: bytes) -> bytes:
    return mac(keys.root, manifest_file)


# --- manifest ----------------------------------------------------------------------------


@dataclass
class FileRecord:
    """One regular file as the manifest binds it: identity, size, and each block's slot and tag."""

    fid: bytes
    size: int
    mode: int
    mtime_ns: int
    slots: bytearray
    tags: bytearray


@dataclass
class DirRecord:
    mode: int
    mtime_ns: int


Record = FileRecord | DirRecord


@dataclass
class Manifest:
    generation: int
    previous_mac: bytes  # the MAC of the generation this one replaced (zeros for the first)
    records: dict[str, Record]


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def encode_manifest(manifest: Manifest, keys: Keys, block_size: int) -> bytes:
    parts: list[bytes | bytearray] = [
        manifest.previous_mac,
        struct.pack(">I", len(manifest.records)),
    ]
    for path, rec in manifest.records.items():
        name = path.encode()
        if isinstance(rec, FileRecord):
            n = block_count(rec.size, block_size)
            if len(rec.slots) != n or len(rec.tags) != n * TAG_BYTES:
                raise ValueError(f"inconsistent block table for {path!r}")
            parts += (_ENTRY.pack(KIND_FILE, rec.mode, rec.mtime_ns, len(name)), name)
            parts += (_FILE.pack(rec.fid, rec.size), rec.slots, rec.tags)
        else:
            parts += (_ENTRY.pack(KIND_DIR, rec.mode, rec.mtime_ns, len(name)), name)
    plaintext = b"".join(parts)
    nonce = os.urandom(NONCE_BYTES)
    prefix = _MANIFEST_PREFIX.pack(_MANIFEST_MAGIC, FORMAT_VERSION, manifest.generation, nonce)
    return prefix + keys.manifest.encrypt(nonce, plaintext, prefix + keys.volume_id)


def manifest_generation(raw: bytes) -> int:
    """The generation a manifest file claims, before authenticating it (for error reasons)."""
    if len(raw) < _MANIFEST_PREFIX.size + TAG_BYTES:
        raise _integrity("the manifest is too short", "manifest-corrupt")
    magic, version, generation, _nonce = _MANIFEST_PREFIX.unpack_from(raw)
    if magic != _MANIFEST_MAGIC or version != FORMAT_VERSION:
        raise _integrity("the manifest has the wrong magic or version", "manifest-corrupt")
    return int(generation)


def decode_manifest(raw: bytes, keys: Keys, block_size: int) -> Manifest:
    """Authenticate and parse a manifest file.

    (1) the prefix is well formed; (2) AES-GCM under the manifest key, with the prefix and the
    volume id as associated data, authenticates everything; (3) the plaintext parses exactly,
    with no bytes left over; (4) every path is canonical and every parent is a directory.
    """
    generation = manifest_generation(raw)  # (1)
    prefix = raw[: _MANIFEST_PREFIX.size]
    nonce = prefix[-NONCE_BYTES:]
    try:  # (2)
        plain = keys.manifest.decrypt(nonce, raw[_MANIFEST_PREFIX.size :], prefix + keys.volume_id)
    except InvalidTag:
        raise _integrity("the manifest fails authentication", "manifest-corrupt") from None
    try:  # (3)
        records, previous = _parse_records(memoryview(plain), block_size)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise _integrity(f"the manifest is malformed: {exc}", "manifest-malformed") from None
    for path in records:  # (4)
        parent = parent_of(path)
        if parent and not isinstance(records.get(parent), DirRecord):
            raise _integrity(
                "the manifest names a file outside any directory", "manifest-malformed", path
            )
    return Manifest(generation=generation, previous_mac=previous, records=records)


def _parse_records(view: memoryview, block_size: int) -> tuple[dict[str, Record], bytes]:
    previous = bytes(view[:MAC_BYTES])
    (count,) = struct.unpack_from(">I", view, MAC_BYTES)
    pos = MAC_BYTES + 4
    records: dict[str, Record] = {}
    for _ in range(count):
        kind, mode, mtime_ns, name_len = _ENTRY.unpack_from(view, pos)
        pos += _ENTRY.size
        if pos + name_len > len(view):
            raise ValueError("truncated entry")
        path = str(view[pos : pos + name_len], "utf-8")
        pos += name_len
        if normalize(path) != path or path in records:
            raise ValueError(f"non-canonical or repeated path {path!r}")
        if kind == KIND_FILE:
            fid, size = _FILE.unpack_from(view, pos)
            pos += _FILE.size
            n = block_count(size, block_size)
            slots = bytearray(view[pos : pos + n])
            pos += n
            tags = bytearray(view[pos : pos + n * TAG_BYTES])
            pos += n * TAG_BYTES
            if len(slots) != n or len(tags) != n * TAG_BYTES or max(slots, default=0) > 1:
                raise ValueError(f"bad block table for {path!r}")
            records[path] = FileRecord(fid, size, mode, mtime_ns, slots, tags)
        elif kind == KIND_DIR:
            records[path] = DirRecord(mode, mtime_ns)
        else:
            raise ValueError(f"unknown entry kind {kind}")
    if pos != len(view):
        raise ValueError("trailing bytes")
    return records, previous


# --- paths -------------------------------------------------------------------------------


def normalize(path: str) -> str:
    """The canonical form of a volume path: relative, '/'-separated, no '.', '..' or NUL.

    The root directory is the empty string. Raises ``ValueError`` for paths that could escape
    or alias (misuse by the caller, not an attack on the disk).
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or "\0" in part or len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"invalid volume path {path!r}")
    canonical = "/".join(parts)
    if len(canonical.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"volume path too long: {path[:64]!r}...")
    return canonical


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def data_name(fid: bytes, slot: int) -> str:
    """The name of a file's slot file in ``data/``: its random id, and ".1" for slot 1."""
    return fid.hex() if slot == 0 else fid.hex() + ".1"
