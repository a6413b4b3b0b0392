"""The FUSE front end: a mounted volume that unmodified programs read and write.

This module owns the translation from the kernel's inode-and-handle protocol (pyfuse3 over
libfuse 3) to an open :class:`~cloister.volume._volume.Volume`, the commit schedule of a
mounted volume, and mounting and unmounting. The format and its checks stay in ``_format``
and ``_volume``; an integrity failure surfaces to programs as ``EIO`` and is logged with its
reason and path.

When data is committed: on ``fsync``/``fdatasync`` of any file (``sync FILE``), on ``fsync``
of any directory, every ``commit_interval`` seconds when something changed, and on unmount.
``fsync`` returns only after the new root tag was reported through ``on_sync``. A mount
process killed at any moment leaves the last committed generation on disk.

Speed: the volume has one writer (it holds the volume's lock), so the kernel may cache
entries, attributes and pages: entry and attribute timeouts are long, ``keep_cache`` keeps
page caches across opens, and writeback caching lets the kernel merge small writes into
1 MiB requests. Handlers never await, so one pyfuse3 task serves all requests; the volume's
writer thread writes sealed blocks and creates data files ahead of need meanwhile, and
sequential readers get the kernel to fetch data files ahead of them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import pyfuse3
import trio

from cloister import errors
from cloister.volume import _volume

log = logging.getLogger(__name__)

_CACHE_SECONDS: Final = 60.0  # entry/attribute timeouts: nobody else can change the volume
_ROOT: Final = pyfuse3.ROOT_INODE

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errno(fn: F) -> F:
    """Turn Python and Cloister errors into the errno a program expects."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except errors.VolumeIntegrityError as exc:
            log.error("volume integrity: %s [%s] path=%s", exc.message, exc.reason, exc.path)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except errors.Error as exc:
            log.error("volume: %s [%s]", exc.message, exc.reason)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    return wrapper  # type: ignore[return-value]


def _name(raw: bytes) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    if "/" in name or name in ("", ".", ".."):
        raise pyfuse3.FUSEError(errno.EINVAL)
    return name


class _Operations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, volume: _volume.Volume) -> None:
        super().__init__()
        self._vol = volume
        self._uid, self._gid = os.getuid(), os.getgid()
        self._inode_path: dict[int, str] = {_ROOT: ""}
        self._path_inode: dict[str, int] = {"": _ROOT}
        self._next_inode = _ROOT + 1
        self._files: dict[int, tuple[int, _volume.OpenFile]] = {}  # fh -> (inode, file)
        self._orphans: dict[int, _volume.OpenFile] = {}  # unlinked inodes still open
        self._dirs: dict[int, list[str]] = {}
        self._next_fh = 1

    # --- inodes --------------------------------------------------------------------------

    def _inode(self, path: str) -> int:
        inode = self._path_inode.get(path)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._path_inode[path] = inode
            self._inode_path[inode] = path
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._inode_path[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        base = self._path(parent)
        return f"{base}/{_name(name)}" if base else _name(name)

    def _forget_path(self, path: str) -> None:
        inode = self._path_inode.pop(path, None)
        if inode is not None:
            del self._inode_path[inode]

    def _move_paths(self, src: str, dst: str) -> None:
        prefix = src + "/"
        for old in [p for p in self._path_inode if p == src or p.startswith(prefix)]:
            inode = self._path_inode.pop(old)
            new = dst + old[len(src) :]
            self._path_inode[new] = inode
            self._inode_path[inode] = new

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        orphan = self._orphans.get(inode)
        if orphan is not None:
            rec = orphan.rec
            is_dir, size, mode, mtime = False, rec.size, rec.mode, rec.mtime_ns
        else:
            st = self._vol.stat(self._path(inode))
            is_dir, size, mode, mtime = st.is_dir, st.size, st.mode, st.mtime_ns
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = _CACHE_SECONDS
        attrs.attr_timeout = _CACHE_SECONDS
        attrs.st_mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | mode
        attrs.st_nlink = 2 if is_dir else 1
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_rdev = 0
        attrs.st_size = size
        attrs.st_blksize = self._vol.block_size
        attrs.st_blocks = -(-size // 512)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        return attrs

    def _new_fh(self, inode: int, f: _volume.OpenFile) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = (inode, f)
        return fh

    # --- operations ----------------------------------------------------------------------

    @_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            parent = self._path(parent_inode).rpartition("/")[0]
            return self._attrs(self._inode(parent))
        path = self._child(parent_inode, name)
        if not self._vol.exists(path):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._inode(path))

    async def forget(self, inode_list: Any) -> None:
        # Inode numbers stay assigned for the life of the mount: the map is small, and a
        # number never names two files.
        return None

    @_errno
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode)

    @_errno
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        path = self._path(inode) if inode not in self._orphans else None
        if fields.update_size:
            if fh is not None and fh in self._files:
                self._vol.ftruncate(self._files[fh][1], attr.st_size)
            elif path is not None:
                f = self._vol.acquire(path)
                try:
                    self._vol.ftruncate(f, attr.st_size)
                finally:
                    self._vol.release(f)
        if path is not None:
            if fields.update_mode:
                self._vol.set_mode(path, stat.S_IMODE(attr.st_mode))
            if fields.update_mtime:
                self._vol.set_mtime(path, attr.st_mtime_ns)
        # Owners are not stored: every file belongs to whoever mounted the volume.
        return self._attrs(inode)

    @_errno
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # only files and directories are stored
        path = self._child(parent_inode, name)
        self._vol.release(self._vol.acquire(path, create=True, exclusive=True, mode=mode))
        return self._attrs(self._inode(path))

    @_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        self._vol.mkdir(path, stat.S_IMODE(mode))
        return self._attrs(self._inode(path))

    @_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        inode = self._path_inode.get(path)
        open_file = next((f for i, f in self._files.values() if i == inode), None)
        self._vol.remove(path)
        if open_file is not None and inode is not None:
            self._orphans[inode] = open_file
        self._forget_path(path)

    @_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        self._vol.rmdir(path)
        self._forget_path(path)

    @_errno
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        src = self._child(parent_inode_old, name_old)
        dst = self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and self._vol.exists(dst):
            raise pyfuse3.FUSEError(errno.EEXIST)
        replaced = self._path_inode.get(dst)
        self._vol.rename(src, dst)
        if replaced is not None and src != dst:
            open_file = next((f for i, f in self._files.values() if i == replaced), None)
            if open_file is not None:
                self._orphans[replaced] = open_file
            self._forget_path(dst)
        self._move_paths(src, dst)

    @_errno
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode in self._orphans:
            raise pyfuse3.FUSEError(errno.ENOENT)
        f = self._vol.acquire(self._path(inode), truncate=bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=self._new_fh(inode, f), keep_cache=True)

    @_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        f = self._vol.acquire(
            path,
            create=True,
            exclusive=bool(flags & os.O_EXCL),
            truncate=bool(flags & os.O_TRUNC),
            mode=stat.S_IMODE(mode),
        )
        inode = self._inode(path)
        return (pyfuse3.FileInfo(fh=self._new_fh(inode, f), keep_cache=True), self._attrs(inode))

    @_errno
    async def read(self, fh: int, off: int, size: int) -> Any:  # any buffer will do
        f = self._files[fh][1]
        out = bytearray(max(0, min(size, f.rec.size - off)))
        return memoryview(out)[: self._vol.preadinto(f, off, memoryview(out))]

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self._vol.pwrite(self._files[fh][1], off, buf)

    async def flush(self, fh: int) -> None:
        return None

    @_errno
    async def release(self, fh: int) -> None:
        inode, f = self._files.pop(fh)
        self._vol.release(f)
        if f.handles == 0:
            self._orphans.pop(inode, None)

    @_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._vol.sync()

    @_errno
    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = [path, *self._vol.listdir(path)]
        return fh

    @_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        base, *names = self._dirs[fh]
        for index in range(start_id, len(names)):
            path = f"{base}/{names[index]}" if base else names[index]
            if not self._vol.exists(path):
                continue  # removed since opendir
            attrs = self._attrs(self._inode(path))
            if not pyfuse3.readdir_reply(token, names[index].encode(), attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._vol.sync()

    @_errno
    async def statfs(self, ctx: Any) -> Any:
        st = os.statvfs(self._vol.directory)
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = st.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        out.f_files, out.f_ffree, out.f_favail = st.f_files, st.f_ffree, st.f_favail
        out.f_namemax = 255
        return out


async def _commit_periodically(volume: _volume.Volume, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        if volume.modified:
            try:
                volume.sync()
            except (OSError, errors.Error) as exc:
                # The next fsync reports the failure to a program; keep serving reads.
                log.error("volume commit failed: %s", exc)


async def _stop_on_signals(mountpoint: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            # Pages that programs wrote and the kernel still caches must reach the volume
            # before the loop stops: syncfs(2) from a thread, while this loop serves the writes.
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(_volume.syncfs, mountpoint)
            pyfuse3.terminate()
            return


async def _serve(volume: _volume.Volume, mountpoint: str, commit_interval: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_periodically, volume, commit_interval)
        nursery.start_soon(_stop_on_signals, mountpoint)
        # Handlers never await, so one task serves every request; more would only churn.
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def mount(
    directory: str,
    mountpoint: str,
    key: bytes,
    *,
    expected_root_tag: str | None = None,
    on_sync: _volume.SyncCallback | None = None,
    commit_interval: float = 5.0,
    clock: _volume.Clock = time.time_ns,
) -> str:
    """Open the volume, mount it at ``mountpoint`` and serve until unmounted.

    Returns the root tag of the final commit. Integrity and version checks happen before the
    mount exists, so a refused volume never appears in the file system.
    """
    if commit_interval <= 0:
        raise ValueError("commit_interval must be positive")
    volume = _volume.open_volume(
        directory, key, expected_root_tag=expected_root_tag, on_sync=on_sync, clock=clock
    )
    volume.enable_write_behind()
    try:
        options = set(pyfuse3.default_options)
        options.update({"fsname=cloister", "subtype=cloister"})
        pyfuse3.init(_Operations(volume), mountpoint, options)
        try:
            trio.run(_serve, volume, mountpoint, commit_interval)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        volume.close()  # the final commit, after the kernel sent every write
    return volume.root_tag


def umount(mountpoint: str) -> None:
    """Commit a mounted volume, then unmount it.

    syncfs(2) first hands the mount every page the kernel still caches; the fsync of the root
    directory then commits them.
    """
    _volume.syncfs(mountpoint)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(errno.EBUSY, result.stderr.strip() or "unmount failed", mountpoint)
