"""An open encrypted volume: the live manifest, block IO, commits and recovery.

This module owns the state machine of one volume directory held by one writer: which blocks
are committed, which are dirty, how a commit is made durable and how a crashed writer's
leftovers are cleaned up. It owns no file-object semantics (``_file``) and no FUSE (``fuse``);
both front ends drive the same :class:`Volume` through its ``OpenFile`` methods.

Crash safety rests on three rules:

1. A block is never written into the slot that the last committed manifest names for it
   (``_slot_for``), so committed data is never overwritten in place.
2. A commit (``sync``) makes the data durable first, then writes the new manifest to a
   temporary file, fsyncs it, renames it over ``manifest`` and fsyncs the directory. The rename
   is the commit point; a crash before it leaves the previous generation intact.
3. Only after the rename are unreferenced data files deleted and data files trimmed, and a
   writer that opens a volume deletes whatever a crash left behind (``_recover``).

Freshness rests on the root tag: ``sync`` reports each new tag through ``on_sync`` and
reports a tag again before it commits the next generation, so at most one generation is ever
ahead of what the caller (the CAS) has acknowledged. ``open_volume`` therefore admits the
expected version, or the one generation that names it as its predecessor (unless ``strict``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import os
import queue
import stat as stat_module
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloister import errors
from cloister.volume import _format as fmt

SyncCallback = Callable[[str], None]
Clock = Callable[[], int]

_MAX_OPEN_DATA_FILES: Final = 64  # data file descriptors kept open between calls
_MAX_DIRTY_BLOCKS: Final = 64  # dirty plaintext blocks per file before they are sealed
_RUN_BLOCKS: Final = 16  # whole blocks encrypted into one buffer and written with one pwrite
_SYNCFS_THRESHOLD: Final = 16  # above this many files to flush, one syncfs(2) beats fsyncs
_WRITE_BEHIND_DEPTH: Final = 8  # sealed runs (up to 1 MiB each) queued for the writer thread
_WRITE_BEHIND_MIN_BLOCKS: Final = 4  # shorter runs are written at once: a handoff costs more
_SPARE_FILES: Final = 32  # empty data files the writer thread keeps ready for new files
_READ_AHEAD: Final = 8 * 1024 * 1024  # bytes fetched ahead of a sequential reader
_DEFAULT_FILE_MODE: Final = 0o644
_DEFAULT_DIR_MODE: Final = 0o755


def _integrity(message: str, reason: str, path: str | None = None) -> errors.VolumeIntegrityError:
    return errors.VolumeIntegrityError(message, path=path, reason=reason)


@dataclass(frozen=True)
class VolumeStat:
    """What ``Volume.stat`` reports about one path."""

    path: str
    is_dir: bool
    size: int
    mode: int
    mtime_ns: int


@dataclass(eq=False)
class OpenFile:
    """Runtime state of one regular file, shared by every handle on it (keyed by file id)."""

    rec: fmt.FileRecord
    path: str
    committed: bytes  # each block's slot in the last committed manifest
    cipher: AESGCM
    dirty: dict[int, bytearray] = field(default_factory=dict)
    cached: tuple[int, bytes | bytearray] | None = None  # the last block decrypted
    next_read: int = -1  # where a sequential reader would read next
    advised: int = 0  # physical offset up to which readahead was requested
    handles: int = 0
    unlinked: bool = False


class Volume:
    """An open volume. Not thread-safe: one thread (or one trio loop) drives it.

    The only other thread is the optional ``_WriteBehind`` writer, which touches nothing but
    ciphertext buffers and file descriptors handed to it.
    """

    def __init__(
        self,
        directory: str,
        keys: fmt.Keys,
        header: fmt.Header,
        manifest: fmt.Manifest,
        tag: fmt.RootTag,
        *,
        lock_fd: int,
        read_only: bool,
        on_sync: SyncCallback | None,
        clock: Clock,
    ) -> None:
        self.directory = directory
        self.block_size = header.block_size
        self.read_only = read_only
        self._keys = keys
        self._tag = tag
        self._records = manifest.records
        self._children: dict[str, set[str]] = {"": set()}
        for path, rec in self._records.items():
            if isinstance(rec, fmt.DirRecord):
                self._children.setdefault(path, set())
        for path in self._records:
            self._children.setdefault(fmt.parent_of(path), set()).add(path.rpartition("/")[2])
        self._root_mtime_ns = clock()
        self._lock_fd = lock_fd
        self._on_sync = on_sync
        self._clock = clock
        self._data_dir = os.path.join(directory, fmt.DATA_DIR)
        self._open: dict[bytes, OpenFile] = {}
        self._fds: OrderedDict[tuple[bytes, int], int] = OrderedDict()
        self._stride = fmt.record_stride(self.block_size)
        self._scratch = bytearray(self._stride)
        self._batch = bytearray(self._stride)
        self._zeros = bytes(self.block_size)
        # What the next commit has to do.
        self._modified = False
        self._unsynced: set[tuple[bytes, int]] = set()  # slot files with unsynced writes
        self._new_data_files = False
        self._changed: set[bytes] = set()  # fids whose block table changed
        self._doomed: set[bytes] = set()  # fids whose data file goes after the next commit
        self._pending_ack: str | None = None
        self._closed = False
        self._writer: _WriteBehind | None = None
        self._pending: set[bytes] = set()  # fids with writes queued on the writer thread

    def enable_write_behind(self) -> None:
        """Write sealed blocks on a second thread (the FUSE mount does; see ``_WriteBehind``)."""
        if self._writer is None and not self.read_only:
            self._writer = _WriteBehind(self._data_dir)

    def _drain(self) -> None:
        """Wait until every queued write reached its data file (before reading or syncing)."""
        if self._writer is not None:
            self._writer.drain()
            self._pending.clear()

    # --- version -------------------------------------------------------------------------

    @property
    def root_tag(self) -> str:
        """The tag of the last committed generation (uncommitted changes are not in it)."""
        return str(self._tag)

    @property
    def generation(self) -> int:
        return self._tag.generation

    @property
    def modified(self) -> bool:
        """Whether there are changes that the next ``sync`` would commit."""
        return self._modified

    # --- paths ---------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        p = fmt.normalize(path)
        return p == "" or p in self._records

    def isdir(self, path: str) -> bool:
        p = fmt.normalize(path)
        return p == "" or isinstance(self._records.get(p), fmt.DirRecord)

    def isfile(self, path: str) -> bool:
        return isinstance(self._records.get(fmt.normalize(path)), fmt.FileRecord)

    def stat(self, path: str) -> VolumeStat:
        p = fmt.normalize(path)
        if p == "":
            return VolumeStat("", True, 0, _DEFAULT_DIR_MODE, self._root_mtime_ns)
        rec = self._record(p)
        if isinstance(rec, fmt.DirRecord):
            return VolumeStat(p, True, 0, rec.mode, rec.mtime_ns)
        return VolumeStat(p, False, rec.size, rec.mode, rec.mtime_ns)

    def listdir(self, path: str = "") -> list[str]:
        p = fmt.normalize(path)
        if not self.isdir(p):
            self._record(p)  # FileNotFoundError if absent
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return sorted(self._children.get(p, ()))

    def directories(self) -> Iterator[str]:
        """Every directory's path (the root excepted), sorted: parents before children."""
        for path in sorted(self._records):
            if isinstance(self._records[path], fmt.DirRecord):
                yield path

    def walk(self) -> Iterator[str]:
        """Every regular file's path, sorted."""
        for path in sorted(self._records):
            if isinstance(self._records[path], fmt.FileRecord):
                yield path

    def mkdir(self, path: str, mode: int = _DEFAULT_DIR_MODE) -> None:
        self._check_writable()
        p = fmt.normalize(path)
        if p == "" or p in self._records:
            raise FileExistsError(errno.EEXIST, "file exists", path)
        self._parent_dir(p)
        self._add(p, fmt.DirRecord(mode & 0o7777, self._clock()))
        self._children[p] = set()

    def makedirs(self, path: str, *, exist_ok: bool = False) -> None:
        p = fmt.normalize(path)
        if self.isdir(p):
            if not exist_ok and p:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            return
        parent = fmt.parent_of(p)
        if parent and not self.isdir(parent):
            self.makedirs(parent, exist_ok=True)
        self.mkdir(p)

    def rmdir(self, path: str) -> None:
        self._check_writable()
        p = fmt.normalize(path)
        rec = self._record(p)
        if not isinstance(rec, fmt.DirRecord):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        if self._children.get(p):
            raise OSError(errno.ENOTEMPTY, "directory not empty", path)
        self._drop(p)
        del self._children[p]

    def remove(self, path: str) -> None:
        self._check_writable()
        p = fmt.normalize(path)
        rec = self._record(p)
        if isinstance(rec, fmt.DirRecord):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        self._drop(p)
        self._forget_file(rec)

    unlink = remove

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``, replacing a file or an empty directory there (os.replace)."""
        self._check_writable()
        s, d = fmt.normalize(src), fmt.normalize(dst)
        rec = self._record(s)
        if s == d:
            return
        self._parent_dir(d)
        if isinstance(rec, fmt.DirRecord) and (d + "/").startswith(s + "/"):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", dst)
        old = self._records.get(d)
        if old is not None:
            if isinstance(rec, fmt.DirRecord) and not isinstance(old, fmt.DirRecord):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", dst)
            if isinstance(old, fmt.DirRecord):
                if not isinstance(rec, fmt.DirRecord):
                    raise IsADirectoryError(errno.EISDIR, "is a directory", dst)
                if self._children.get(d):
                    raise OSError(errno.ENOTEMPTY, "directory not empty", dst)
                self._drop(d)
                del self._children[d]
            else:
                self._drop(d)
                self._forget_file(old)
        self._drop(s)
        self._add(d, rec)
        if isinstance(rec, fmt.DirRecord):
            # A directory's descendants move with it; the manifest is flat, so rename each.
            prefix = s + "/"
            moved = [p for p in self._records if p.startswith(prefix)]
            for old_path in moved:
                new_path = d + "/" + old_path[len(prefix) :]
                child = self._records.pop(old_path)
                self._records[new_path] = child
                if isinstance(child, fmt.FileRecord) and child.fid in self._open:
                    self._open[child.fid].path = new_path
            for old_path in [p for p in self._children if p == s or p.startswith(prefix)]:
                self._children[d + old_path[len(s) :]] = self._children.pop(old_path)
        elif rec.fid in self._open:
            self._open[rec.fid].path = d

    def data_files(self, path: str) -> list[str]:
        """The files under ``data/`` that hold a file's blocks (for inspection and tests)."""
        rec = self._record(fmt.normalize(path))
        if not isinstance(rec, fmt.FileRecord):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        names = [os.path.join(self._data_dir, fmt.data_name(rec.fid, s)) for s in (0, 1)]
        return [n for n in names if os.path.exists(n)]

    def set_mode(self, path: str, mode: int) -> None:
        self._check_writable()
        rec = self._record(fmt.normalize(path))
        rec.mode = mode & 0o7777
        self._modified = True

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        self._check_writable()
        rec = self._record(fmt.normalize(path))
        rec.mtime_ns = mtime_ns
        self._modified = True

    # --- files ---------------------------------------------------------------------------

    def open(
        self,
        path: str,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Open a file of the volume with the semantics of the built-in ``open``."""
        from cloister.volume import _file  # _file builds on this module

        return _file.open_file(self, path, mode, buffering, encoding, errors, newline)

    def read_bytes(self, path: str) -> bytes:
        f = self.acquire(path)
        try:
            return self.pread(f, 0, f.rec.size)
        finally:
            self.release(f)

    def write_bytes(self, path: str, data: bytes | bytearray | memoryview) -> None:
        f = self.acquire(path, create=True, truncate=True)
        try:
            self.pwrite(f, 0, data)
        finally:
            self.release(f)

    # --- open files (used by both front ends) --------------------------------------------

    def acquire(
        self,
        path: str,
        *,
        create: bool = False,
        exclusive: bool = False,
        truncate: bool = False,
        mode: int = _DEFAULT_FILE_MODE,
    ) -> OpenFile:
        """Take a handle on a regular file, creating or truncating it as asked."""
        p = fmt.normalize(path)
        rec = self._records.get(p)
        if rec is None and p != "":
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            self._check_writable()
            self._parent_dir(p)
            # Every file has a data file, even an empty one.
            spare = self._writer.spare_file() if self._writer is not None else None
            fid = spare[0] if spare is not None else os.urandom(fmt.FID_BYTES)
            rec = fmt.FileRecord(fid, 0, mode & 0o7777, self._clock(), bytearray(), bytearray())
            self._add(p, rec)
            f = self._state(p, rec)
            if spare is not None:
                self._adopt_fd((fid, 0), spare[1])
            else:
                self._fd(fid, create=True)
            self._new_data_files = True
            self._unsynced.add((rec.fid, 0))
            self._changed.add(rec.fid)
        elif exclusive:
            raise FileExistsError(errno.EEXIST, "file exists", path)
        elif rec is None or isinstance(rec, fmt.DirRecord):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        else:
            f = self._state(p, rec)
            if truncate and rec.size:
                self.ftruncate(f, 0)
        f.handles += 1
        return f

    def release(self, f: OpenFile) -> None:
        f.handles -= 1
        if f.handles == 0 and f.unlinked:
            self._open.pop(f.rec.fid, None)
            self._doomed.add(f.rec.fid)

    def pread(self, f: OpenFile, offset: int, size: int) -> bytes:
        out = bytearray(max(0, min(size, f.rec.size - offset)))
        n = self.preadinto(f, offset, memoryview(out))
        return bytes(out[:n]) if n != len(out) else bytes(out)

    def preadinto(self, f: OpenFile, offset: int, out: memoryview) -> int:
        """Read plaintext at ``offset`` into ``out``; full blocks decrypt straight into it."""
        size, bs = f.rec.size, self.block_size
        end = min(size, offset + len(out))
        if offset == f.next_read:
            self._read_ahead(f, end)
        f.next_read = end
        pos = offset
        while pos < end:
            index = pos // bs
            start = index * bs
            length = min(bs, size - start)
            lo, hi = pos - start, min(length, end - start)
            dst = out[pos - offset : pos - offset + hi - lo]
            if lo == 0 and hi == length and index not in f.dirty:
                self._open_block(f, index, length, dst)
            else:
                dst[:] = memoryview(self._plain_block(f, index))[lo:hi]
            pos = start + hi
        return max(0, end - offset)

    def _read_ahead(self, f: OpenFile, end: int) -> None:
        """Ask the kernel to fetch the next stretch of a sequentially read file.

        Reads are synchronous and one at a time (the FUSE loop is single-threaded), so
        without this every cold block would wait for the disk in turn.
        """
        start = fmt.record_offset(self.block_size, end // self.block_size)
        if start + _READ_AHEAD // 2 < f.advised:
            return
        begin = max(start, f.advised)
        f.advised = start + _READ_AHEAD
        for slot in (0, 1):
            fd = self._fds.get((f.rec.fid, slot))
            if fd is not None:
                os.posix_fadvise(fd, begin, f.advised - begin, os.POSIX_FADV_WILLNEED)

    def pwrite(self, f: OpenFile, offset: int, data: bytes | bytearray | memoryview) -> int:
        self._check_writable()
        src = memoryview(data).cast("B")
        count = len(src)
        if count == 0:
            return 0
        if offset > f.rec.size:
            self._grow(f, offset)
        bs, old_size = self.block_size, f.rec.size
        end = offset + count
        if end > old_size:
            # Bring the old partial last block into memory at its *old* length before the size
            # changes: its ciphertext on disk is only valid for that length.
            if old_size % bs:
                self._dirty_block(f, old_size // bs)
            self._resize_tables(f, end)
        size = f.rec.size
        pos = offset
        while pos < end:
            index = pos // bs
            start = index * bs
            length = min(bs, size - start)
            lo, hi = pos - start, min(length, end - start)
            piece = src[pos - offset : pos - offset + hi - lo]
            if lo == 0 and hi == length:
                # A run of whole blocks bound for the same slot goes out in one pwrite.
                run = [piece]
                slot = self._slot_for(f, index)
                f.dirty.pop(index, None)
                while len(run) < _RUN_BLOCKS and pos + len(run) * bs + bs <= end:
                    nxt = index + len(run)
                    if self._slot_for(f, nxt) != slot:
                        break
                    begin = nxt * bs - offset
                    run.append(src[begin : begin + bs])
                    f.dirty.pop(nxt, None)
                self._seal_run(f, index, run)
                pos = start + len(run) * bs
                continue
            else:
                block = self._dirty_block(f, index, length)
                block[lo:hi] = piece
                if f.cached is not None and f.cached[0] == index:
                    f.cached = None
            pos = start + hi
        f.rec.mtime_ns = self._clock()
        self._touch(f)
        if len(f.dirty) > _MAX_DIRTY_BLOCKS:
            self._flush(f)
        return count

    def ftruncate(self, f: OpenFile, size: int) -> None:
        self._check_writable()
        if size < 0:
            raise ValueError("negative size")
        bs, old = self.block_size, f.rec.size
        if size > old:
            self._grow(f, size)
        elif size < old:
            keep = fmt.block_count(size, bs)
            if size % bs:
                self._dirty_block(f, keep - 1)  # loaded at its old length, cut below
                del f.dirty[keep - 1][size % bs :]
            for index in [i for i in f.dirty if i >= keep]:
                del f.dirty[index]
            f.cached = None
            del f.rec.slots[keep:]
            del f.rec.tags[keep * fmt.TAG_BYTES :]
            f.rec.size = size
        f.rec.mtime_ns = self._clock()
        self._touch(f)

    # --- commit --------------------------------------------------------------------------

    def sync(self) -> str:
        """Commit every change as a new generation and return its root tag.

        (1) report a tag that the caller has not acknowledged yet; (2) seal dirty blocks;
        (3) make data files durable; (4) write, fsync and rename the new manifest, fsync the
        directory; (5) delete and trim what the new generation no longer references;
        (6) report the new tag through ``on_sync``.
        """
        self._check_open()
        if self.read_only:
            return self.root_tag
        self._drain()
        if self._pending_ack is not None:  # (1)
            self._report(self._pending_ack)
        if not self._modified:
            return self.root_tag
        for f in self._open.values():  # (2)
            self._flush(f)
        self._drain()
        self._make_durable()  # (3)
        manifest = fmt.Manifest(self._tag.generation + 1, self._tag.mac, self._records)
        raw = fmt.encode_manifest(manifest, self._keys, self.block_size)
        self._replace_manifest(raw)  # (4)
        self._tag = fmt.RootTag(manifest.generation, fmt.root_mac(self._keys, raw))
        self._modified = False
        self._collect()  # (5)
        self._pending_ack = str(self._tag)
        self._report(self._pending_ack)  # (6)
        return self.root_tag

    def verify(self, progress: Callable[[str, int], None] | None = None) -> str:
        """Check every block of every file and every data file's length; return the root tag.

        Raises ``VolumeIntegrityError`` naming the first file that fails, and ``ValueError``
        if there are uncommitted changes (verification is of a committed generation).
        """
        self._check_open()
        if self._modified:
            raise ValueError("the volume has uncommitted changes; sync() before verify()")
        out = memoryview(bytearray(self.block_size))
        for path in self.walk():
            rec = self._records[path]
            assert isinstance(rec, fmt.FileRecord)
            f = self._state(path, rec)
            extents = fmt.data_extents(self.block_size, rec.size, rec.slots)
            for slot, extent in enumerate(extents):
                physical = self._physical_size(f, slot, required=slot == 0 or extent > 0)
                if physical < extent:
                    raise _integrity("the file was truncated", "file-truncated", path)
                if physical > extent:
                    raise _integrity("the file was extended", "file-extended", path)
            for index in range(len(rec.slots)):
                length = min(self.block_size, rec.size - index * self.block_size)
                self._open_block(f, index, length, out[:length])
            if progress is not None:
                progress(path, rec.size)
        return self.root_tag

    def close(self) -> None:
        """Commit what is left (unless read-only) and release the volume."""
        if self._closed:
            return
        try:
            if not self.read_only:
                self.sync()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.stop()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            os.close(self._lock_fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals: records --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the volume is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise PermissionError(errno.EROFS, "the volume is open read-only")

    def _record(self, p: str) -> fmt.Record:
        rec = self._records.get(p)
        if rec is None:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", p or "/")
        return rec

    def _parent_dir(self, p: str) -> None:
        parent = fmt.parent_of(p)
        if parent and not isinstance(self._records.get(parent), fmt.DirRecord):
            if parent in self._records:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
            raise FileNotFoundError(errno.ENOENT, "no such directory", parent)

    def _add(self, p: str, rec: fmt.Record) -> None:
        self._records[p] = rec
        parent = fmt.parent_of(p)
        self._children[parent].add(p.rpartition("/")[2])
        self._touch_dir(parent)

    def _drop(self, p: str) -> None:
        del self._records[p]
        parent = fmt.parent_of(p)
        self._children[parent].discard(p.rpartition("/")[2])
        self._touch_dir(parent)

    def _touch_dir(self, p: str) -> None:
        now = self._clock()
        rec = self._records.get(p)
        if isinstance(rec, fmt.DirRecord):
            rec.mtime_ns = now
        elif p == "":
            self._root_mtime_ns = now
        self._modified = True

    def _forget_file(self, rec: fmt.FileRecord) -> None:
        f = self._open.get(rec.fid)
        if f is not None and f.handles:
            f.unlinked = True  # its data lives until the last handle goes (POSIX unlink)
            return
        self._open.pop(rec.fid, None)
        self._doomed.add(rec.fid)

    def _state(self, p: str, rec: fmt.FileRecord) -> OpenFile:
        f = self._open.get(rec.fid)
        if f is None:
            f = OpenFile(rec, p, bytes(rec.slots), self._keys.file_cipher(rec.fid))
            self._open[rec.fid] = f
        return f

    def _touch(self, f: OpenFile) -> None:
        self._modified = True
        self._changed.add(f.rec.fid)

    # --- internals: blocks ---------------------------------------------------------------

    def _fd(
        self, fid: bytes, slot: int = 0, *, create: bool = False, path: str | None = None
    ) -> int:
        key = (fid, slot)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        name = os.path.join(self._data_dir, fmt.data_name(fid, slot))
        try:
            fd = os.open(name, flags, 0o600)
        except FileNotFoundError:
            raise _integrity(
                "the file's data is missing", "file-missing", path or self._path_of(fid)
            ) from None
        self._adopt_fd(key, fd)
        return fd

    def _adopt_fd(self, key: tuple[bytes, int], fd: int) -> None:
        self._fds[key] = fd
        if len(self._fds) > _MAX_OPEN_DATA_FILES:
            (old_fid, _), old = self._fds.popitem(last=False)
            if old_fid in self._pending:
                self._drain()  # a queued write may still use the descriptor
            os.close(old)

    def _physical_size(self, f: OpenFile, slot: int, *, required: bool) -> int:
        name = os.path.join(self._data_dir, fmt.data_name(f.rec.fid, slot))
        if not required and not os.path.exists(name):
            return 0
        return os.fstat(self._fd(f.rec.fid, slot, path=f.path)).st_size

    def _path_of(self, fid: bytes) -> str | None:
        f = self._open.get(fid)
        if f is not None:
            return f.path
        for path, rec in self._records.items():
            if isinstance(rec, fmt.FileRecord) and rec.fid == fid:
                return path
        return None

    def _close_fds(self, fid: bytes) -> None:
        self._drain()
        for slot in (0, 1):
            fd = self._fds.pop((fid, slot), None)
            if fd is not None:
                os.close(fd)

    def _open_block(self, f: OpenFile, index: int, length: int, dst: memoryview) -> None:
        """Authenticate block ``index`` on disk and decrypt it into ``dst``.

        (1) the record is all there; (2) its tag is the one the manifest pins for this
        position; (3) AES-GCM under the file's key with (fid, index) as associated data opens
        it. A record whose tag differs but that opens under (2)'s key and (3)'s associated data
        is an older version of this very block: a rollback, reported as such.
        """
        rec = f.rec
        want = NONCE_AND_TAG + length
        slot = rec.slots[index]
        if rec.fid in self._pending:
            self._drain()
        buf = memoryview(self._scratch)[:want]
        fd = self._fd(rec.fid, slot, path=f.path)
        got = os.preadv(fd, [buf], fmt.record_offset(self.block_size, index))
        if got < want:  # (1)
            raise _integrity(f"the file was truncated (block {index})", "file-truncated", f.path)
        nonce, sealed = buf[: fmt.NONCE_BYTES], buf[fmt.NONCE_BYTES :]
        aad = fmt.block_aad(rec.fid, index)
        pinned = rec.tags[index * fmt.TAG_BYTES : (index + 1) * fmt.TAG_BYTES]
        if not fmt.equal(sealed[-fmt.TAG_BYTES :], pinned):  # (2)
            try:
                f.cipher.decrypt(nonce, sealed, aad)
            except InvalidTag:
                raise _integrity(
                    f"block {index} is not the one the manifest names (moved, swapped or changed)",
                    "block-mismatch",
                    f.path,
                ) from None
            raise _integrity(
                f"block {index} is an older version of itself", "block-rolled-back", f.path
            )
        try:  # (3)
            f.cipher.decrypt_into(nonce, sealed, aad, dst)
        except InvalidTag:
            raise _integrity(f"block {index} was changed", "block-corrupt", f.path) from None

    def _plain_block(self, f: OpenFile, index: int) -> bytes | bytearray:
        block = f.dirty.get(index)
        if block is not None:
            return block
        if f.cached is not None and f.cached[0] == index:
            return f.cached[1]
        length = min(self.block_size, f.rec.size - index * self.block_size)
        out = bytearray(length)
        self._open_block(f, index, length, memoryview(out))
        f.cached = (index, out)
        return out

    def _dirty_block(self, f: OpenFile, index: int, length: int = 0) -> bytearray:
        block = f.dirty.get(index)
        if block is None:
            if index < len(f.rec.slots):
                block = bytearray(self._plain_block(f, index))
            else:
                block = bytearray()
            f.dirty[index] = block
        if len(block) < length:
            block.extend(bytes(length - len(block)))
        return block

    def _slot_for(self, f: OpenFile, index: int) -> int:
        """Rule 1: the slot that the last committed manifest does not name for this block."""
        return 1 - f.committed[index] if index < len(f.committed) else 0

    def _seal(self, f: OpenFile, index: int, plain: bytes | bytearray | memoryview) -> None:
        """Encrypt one block into its free slot (rule 1)."""
        self._seal_run(f, index, [plain])

    def _seal_run(
        self, f: OpenFile, first: int, blocks: Sequence[bytes | bytearray | memoryview]
    ) -> None:
        """Encrypt consecutive blocks that share a free slot, and write them with one pwrite."""
        rec = f.rec
        slot = self._slot_for(f, first)
        stride = self._stride
        need = stride * len(blocks)
        if self._writer is not None and len(blocks) >= _WRITE_BEHIND_MIN_BLOCKS:
            buffer = self._writer.buffer(need)  # the writer thread's until it is written
        else:
            if len(self._batch) < need:
                self._batch = bytearray(need)
            buffer = self._batch
        out = memoryview(buffer)
        pos = 0
        for k, plain in enumerate(blocks):
            index = first + k
            nonce = os.urandom(fmt.NONCE_BYTES)
            end = pos + NONCE_AND_TAG + len(plain)
            out[pos : pos + fmt.NONCE_BYTES] = nonce
            aad = fmt.block_aad(rec.fid, index)
            f.cipher.encrypt_into(nonce, plain, aad, out[pos + fmt.NONCE_BYTES : end])
            rec.slots[index] = slot
            rec.tags[index * fmt.TAG_BYTES : (index + 1) * fmt.TAG_BYTES] = out[
                end - fmt.TAG_BYTES : end
            ]
            if f.cached is not None and f.cached[0] == index:
                f.cached = None
            pos = end if k == len(blocks) - 1 else pos + stride
        fd = self._fd(rec.fid, slot, create=slot == 1, path=f.path)
        if rec.fid in self._pending and len(blocks) < _WRITE_BEHIND_MIN_BLOCKS:
            self._drain()  # keep writes to one file in order
        if self._writer is not None and len(blocks) >= _WRITE_BEHIND_MIN_BLOCKS:
            self._writer.submit(fd, buffer, pos, fmt.record_offset(self.block_size, first))
            self._pending.add(rec.fid)
        elif os.pwrite(fd, out[:pos], fmt.record_offset(self.block_size, first)) != pos:
            raise OSError(errno.EIO, "short write to a data file", f.path)
        self._unsynced.add((rec.fid, slot))
        if slot == 1:
            self._new_data_files = True

    def _flush(self, f: OpenFile) -> None:
        for index in sorted(f.dirty):
            self._seal(f, index, f.dirty[index])
        f.dirty.clear()

    def _resize_tables(self, f: OpenFile, size: int) -> None:
        n = fmt.block_count(size, self.block_size)
        grow = n - len(f.rec.slots)
        if grow > 0:
            f.rec.slots.extend(bytes(grow))
            f.rec.tags.extend(bytes(grow * fmt.TAG_BYTES))
        f.rec.size = size

    def _grow(self, f: OpenFile, size: int) -> None:
        """Extend a file with zeros; every new block is sealed so that the manifest pins it."""
        bs, old = self.block_size, f.rec.size
        if old % bs:
            self._dirty_block(f, old // bs)  # at its old length, before the size changes
        first_new = fmt.block_count(old, bs)
        self._resize_tables(f, size)
        if old % bs:
            self._dirty_block(f, old // bs, min(bs, size - (old // bs) * bs))
        for index in range(first_new, len(f.rec.slots)):
            length = min(bs, size - index * bs)
            if length < bs:
                f.dirty[index] = bytearray(length)  # new: nothing on disk to load
            else:
                self._seal(f, index, self._zeros)
            if len(f.dirty) > _MAX_DIRTY_BLOCKS:
                self._flush(f)

    # --- internals: commit and recovery --------------------------------------------------

    def _make_durable(self) -> None:
        if len(self._unsynced) > _SYNCFS_THRESHOLD:
            syncfs(self._data_dir)
        else:
            for fid, slot in self._unsynced:
                if fid not in self._doomed:
                    os.fsync(self._fd(fid, slot))
            if self._new_data_files:
                _fsync_dir(self._data_dir)
        self._unsynced.clear()
        self._new_data_files = False

    def _replace_manifest(self, raw: bytes) -> None:
        tmp = os.path.join(self.directory, fmt.MANIFEST_TMP_NAME)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self.directory, fmt.MANIFEST_NAME))  # the commit point
        _fsync_dir(self.directory)

    def _collect(self) -> None:
        """After a commit: drop data files nobody references, trim the ones that shrank."""
        for fid in self._doomed:
            self._close_fds(fid)
            for slot in (0, 1):
                try:
                    os.unlink(os.path.join(self._data_dir, fmt.data_name(fid, slot)))
                except FileNotFoundError:
                    pass
        self._doomed.clear()
        for fid in self._changed:
            f = self._open.get(fid)
            if f is None or f.unlinked:
                continue
            f.committed = bytes(f.rec.slots)
            extents = fmt.data_extents(self.block_size, f.rec.size, f.rec.slots)
            for slot, extent in enumerate(extents):
                fd = self._fds.get((fid, slot))
                if fd is not None:
                    if os.fstat(fd).st_size > extent:
                        os.ftruncate(fd, extent)
                    continue
                # Not open: look by name rather than reopen (a commit may follow thousands of
                # new files); a slot file that was never created needs nothing.
                name = os.path.join(self._data_dir, fmt.data_name(fid, slot))
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(name).st_size > extent:
                        os.truncate(name, extent)
        self._changed.clear()
        # Clean files without handles need no runtime state until they are used again.
        self._open = {fid: f for fid, f in self._open.items() if f.handles}

    def _recover(self) -> None:
        """Remove what a crashed writer left: a half-written manifest, orphans, tails."""
        try:
            os.unlink(os.path.join(self.directory, fmt.MANIFEST_TMP_NAME))
        except FileNotFoundError:
            pass
        referenced: dict[str, int] = {}
        for rec in self._records.values():
            if isinstance(rec, fmt.FileRecord):
                extents = fmt.data_extents(self.block_size, rec.size, rec.slots)
                for slot in (0, 1):
                    referenced[fmt.data_name(rec.fid, slot)] = extents[slot]
        for name in os.listdir(self._data_dir):
            full = os.path.join(self._data_dir, name)
            extent = referenced.get(name)
            if extent is None:
                if stat_module.S_ISREG(os.lstat(full).st_mode):
                    os.unlink(full)
            elif os.lstat(full).st_size > extent:
                os.truncate(full, extent)

    def _report(self, tag: str) -> None:
        if self._on_sync is not None:
            self._on_sync(tag)
        self._pending_ack = None


NONCE_AND_TAG: Final = fmt.NONCE_BYTES + fmt.TAG_BYTES


class _WriteBehind:
    """A second thread that writes sealed records and creates data files ahead of need.

    Only ciphertext and empty files cross to the thread: slots, tags and the manifest are
    decided on the caller's thread before a record is queued. pwrite(2) and open(2) release
    the GIL, so copying into the page cache and creating inodes overlap with receiving and
    encrypting the next request. Whatever reads, syncs or closes a data file drains the queue
    first; a failed write fails every later drain, so a commit can never include data that
    did not reach its file. Spare data files that no manifest names are removed by the next
    writer's recovery if the process dies, and at close otherwise.
    """

    def __init__(self, data_dir: str) -> None:
        self._data_dir = data_dir
        self._queue: queue.Queue[tuple[int, bytearray, int, int] | None] = queue.Queue(
            maxsize=_WRITE_BEHIND_DEPTH
        )
        # Written buffers come back for reuse: a fresh megabyte costs page faults and zeroing.
        self._free: collections.deque[bytearray] = collections.deque()
        self._spares: collections.deque[tuple[bytes, int]] = collections.deque()
        self._refilling = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="volume-writer", daemon=True)
        self._thread.start()

    def buffer(self, size: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                return buf
        return bytearray(size)

    def submit(self, fd: int, buf: bytearray, length: int, offset: int) -> None:
        """Queue ``buf[:length]`` for ``offset`` of ``fd``; ``buf`` is the thread's from now."""
        self._check()
        self._queue.put((fd, buf, length, offset))

    def spare_file(self) -> tuple[bytes, int] | None:
        """A fresh, empty data file (its id and descriptor), if one is ready."""
        try:
            spare = self._spares.popleft()
        except IndexError:
            spare = None
        if len(self._spares) < _SPARE_FILES // 2 and not self._refilling:
            self._refilling = True
            self._queue.put((-1, bytearray(), 0, 0))  # a refill request
        return spare

    def drain(self) -> None:
        self._queue.join()
        self._check()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        while self._spares:
            fid, fd = self._spares.popleft()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._data_dir, fmt.data_name(fid, 0)))

    def _check(self) -> None:
        if self._error is not None:
            raise OSError(errno.EIO, f"a data file write failed: {self._error}")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fd, buf, length, offset = item
                if fd < 0:
                    self._refill()
                view = memoryview(buf)[:length]
                while view and self._error is None:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                view.release()
                if len(self._free) <= _WRITE_BEHIND_DEPTH:
                    self._free.append(buf)
            except OSError as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _refill(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while len(self._spares) < _SPARE_FILES:
            fid = os.urandom(fmt.FID_BYTES)
            fd = os.open(os.path.join(self._data_dir, fmt.data_name(fid, 0)), flags, 0o600)
            self._spares.append((fid, fd))
        self._refilling = False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: ctypes.CDLL | None = None


def syncfs(path: str) -> None:
    """syncfs(2) on the file system holding ``path``: one flush for many files."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


# --- creating and opening ----------------------------------------------------------------


def _read_bounded(path: str, limit: int, missing: str, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _integrity(f"the volume's {what} is missing", missing) from None
    try:
        if os.fstat(fd).st_size > limit:
            raise _integrity(f"the volume's {what} is too large", f"{what}-corrupt")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise _integrity(f"the volume's {what} is too large", f"{what}-corrupt")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _lock(directory: str, *, exclusive: bool) -> int:
    fd = os.open(
        os.path.join(directory, fmt.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise errors.ConflictError(
            f"the volume {directory} is in use by another process", reason="volume-in-use"
        ) from None
    return fd


def create(
    directory: str,
    key: bytes,
    *,
    block_size: int = fmt.DEFAULT_BLOCK_SIZE,
    on_sync: SyncCallback | None = None,
    clock: Clock = time.time_ns,
) -> Volume:
    """Create an empty volume in ``directory`` (absent or empty) and return it open."""
    fmt.check_block_size(block_size)
    if len(key) != fmt.KEY_BYTES:
        raise ValueError(f"a volume key is {fmt.KEY_BYTES} bytes, not {len(key)}")
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        raise FileExistsError(errno.EEXIST, "not an empty directory", directory)
    volume_id = os.urandom(fmt.VOLUME_ID_BYTES)
    keys = fmt.Keys.derive(key, volume_id)
    header = fmt.Header(block_size=block_size, volume_id=volume_id)
    lock_fd = _lock(directory, exclusive=True)
    os.mkdir(os.path.join(directory, fmt.DATA_DIR), 0o700)
    path = os.path.join(directory, fmt.HEADER_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, fmt.encode_header(header, keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    manifest = fmt.Manifest(0, bytes(fmt.MAC_BYTES), {})
    volume = Volume(
        directory,
        keys,
        header,
        manifest,
        fmt.RootTag(0, bytes(fmt.MAC_BYTES)),
        lock_fd=lock_fd,
        read_only=False,
        on_sync=on_sync,
        clock=clock,
    )
    volume._modified = True
    volume.sync()  # generation 1: the empty volume
    return volume


def open_volume(
    directory: str,
    key: bytes,
    *,
    expected_root_tag: str | None = None,
    strict: bool = False,
    read_only: bool = False,
    on_sync: SyncCallback | None = None,
    clock: Clock = time.time_ns,
) -> Volume:
    """Open a volume, authenticate it, and check that it is the expected version.

    (1) the header authenticates under the key; (2) the lock is free (one writer, or any
    number of readers); (3) the manifest authenticates and parses; (4) its root tag is
    ``expected_root_tag``, or - unless ``strict`` - the next generation, which names the
    expected one as its predecessor (a writer that crashed after committing and before
    reporting); (5) a writer removes what a crashed writer left behind.

    Without ``expected_root_tag`` a rollback of the whole volume cannot be detected; every
    other check still applies.
    """
    expected = fmt.RootTag.parse(expected_root_tag) if expected_root_tag is not None else None
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "no such volume directory", directory)
    raw_header = _read_bounded(
        os.path.join(directory, fmt.HEADER_NAME), fmt.header_length(), "header-missing", "header"
    )
    peeked = fmt.peek_header(raw_header)
    keys = fmt.Keys.derive(key, peeked.volume_id)
    header = fmt.check_header(raw_header, keys)  # (1)
    lock_fd = _lock(directory, exclusive=not read_only)  # (2)
    try:
        raw = _read_bounded(
            os.path.join(directory, fmt.MANIFEST_NAME),
            fmt.MAX_MANIFEST_BYTES,
            "manifest-missing",
            "manifest",
        )
        manifest = fmt.decode_manifest(raw, keys, header.block_size)  # (3)
        tag = fmt.RootTag(manifest.generation, fmt.root_mac(keys, raw))
        ahead = expected is not None and _check_version(tag, manifest, expected, strict)  # (4)
        volume = Volume(
            directory,
            keys,
            header,
            manifest,
            tag,
            lock_fd=lock_fd,
            read_only=read_only,
            on_sync=on_sync,
            clock=clock,
        )
    except BaseException:
        os.close(lock_fd)
        raise
    if not read_only:
        volume._recover()  # (5)
        if ahead:
            # The caller has not seen this generation yet: report it before anything new is
            # committed, so that at most one generation is ever unacknowledged.
            volume._pending_ack = str(tag)
            volume._report(str(tag))
    return volume


def _check_version(
    tag: fmt.RootTag, manifest: fmt.Manifest, expected: fmt.RootTag, strict: bool
) -> bool:
    """Raise unless ``tag`` is admitted; return whether it is one generation ahead."""
    if tag.generation == expected.generation and fmt.equal(tag.mac, expected.mac):
        return False
    if (
        not strict
        and tag.generation == expected.generation + 1
        and fmt.equal(manifest.previous_mac, expected.mac)
    ):
        return True
    if tag.generation < expected.generation:
        raise _integrity(
            f"the volume was rolled back to generation {tag.generation}"
            f" (expected {expected.generation})",
            "rollback",
        )
    raise _integrity(
        f"the volume is not the expected version (found generation {tag.generation},"
        f" expected {expected.generation})",
        "root-tag-mismatch",
    )
