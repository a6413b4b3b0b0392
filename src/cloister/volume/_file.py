"""The ``open()``-like front end: Python file objects over files in an open volume.

This module owns mode parsing and the raw file object; buffering and text decoding are the
standard library's own ``io`` classes, layered exactly as the built-in ``open`` layers them.
Writes reach the volume when the buffered layer flushes; they become durable when the volume
commits (``Volume.sync`` or ``Volume.close``), never merely because a file was closed.
"""

from __future__ import annotations

import errno
import io
from typing import IO, Any, cast

from cloister.volume._volume import OpenFile, Volume

_MODE_CHARS = frozenset("rwaxbt+")


class VolumeFileIO(io.RawIOBase):
    """Unbuffered binary access to one file of a volume, with its own position."""

    def __init__(
        self, volume: Volume, f: OpenFile, *, readable: bool, writable: bool, append: bool
    ) -> None:
        super().__init__()
        self._volume = volume
        self._f = f
        self._readable = readable
        self._writable = writable
        self._append = append
        self._pos = 0
        self._released = False

    @property
    def name(self) -> str:
        return self._f.path

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._check("read", self._readable)
        view = memoryview(buffer).cast("B")
        n = self._volume.preadinto(self._f, self._pos, view)
        self._pos += n
        return n

    def readall(self) -> bytes:
        self._check("read", self._readable)
        data = self._volume.pread(self._f, self._pos, max(0, self._f.rec.size - self._pos))
        self._pos += len(data)
        return data

    def write(self, b: Any) -> int:
        self._check("write", self._writable)
        if self._append:
            self._pos = self._f.rec.size  # O_APPEND: every write lands at the end
        n = self._volume.pwrite(self._f, self._pos, b)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check("seek", True)
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._f.rec.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check("tell", True)
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._check("truncate", self._writable)
        size = self._pos if size is None else size
        self._volume.ftruncate(self._f, size)
        return size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a volume file has no OS file descriptor")

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._volume.release(self._f)
        super().close()

    def _check(self, what: str, allowed: bool) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.name!r}")
        if not allowed:
            raise io.UnsupportedOperation(f"file not open for {what}")


def open_file(
    volume: Volume,
    path: str,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> IO[Any]:
    """Open ``path`` in ``volume`` with the semantics of the built-in ``open``.

    Text defaults to UTF-8, whatever the locale: a volume moves between machines.
    """
    chars = set(mode)
    if len(mode) != len(chars) or not chars <= _MODE_CHARS:
        raise ValueError(f"invalid mode: {mode!r}")
    primary = chars & set("rwax")
    if len(primary) != 1 or ("b" in chars and "t" in chars):
        raise ValueError(f"invalid mode: {mode!r}")
    binary = "b" in chars
    if binary and (encoding is not None or errors is not None or newline is not None):
        raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
    if binary is False and buffering == 0:
        raise ValueError("can't have unbuffered text I/O")
    (kind,) = primary
    update = "+" in chars
    if (kind != "r" or update) and volume.read_only:
        raise PermissionError(errno.EROFS, "the volume is open read-only", path)
    f = volume.acquire(
        path,
        create=kind != "r",
        exclusive=kind == "x",
        truncate=kind == "w",
    )
    raw = VolumeFileIO(
        volume,
        f,
        readable=kind == "r" or update,
        writable=kind != "r" or update,
        append=kind == "a",
    )
    if kind == "a":
        raw.seek(0, io.SEEK_END)
    if buffering == 0:
        return cast(IO[Any], raw)
    size = volume.block_size if buffering in (-1, 1) else buffering
    buffered: io.BufferedIOBase
    if update:
        buffered = io.BufferedRandom(raw, size)
    elif kind == "r":
        buffered = io.BufferedReader(raw, size)
    else:
        buffered = io.BufferedWriter(raw, size)
    if binary:
        return cast(IO[Any], buffered)
    text = io.TextIOWrapper(
        buffered,
        encoding=encoding or "utf-8",
        errors=errors,
        newline=newline,
        line_buffering=buffering == 1,
    )
    text.mode = mode  # type: ignore[misc]
    return text
