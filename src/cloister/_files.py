"""Writing files only their owner may read: keys, key shares, rendered secrets.

One place for the details that each such write needs: mode 0600 from the moment the file
exists (never widened by the umask or a leftover file), the data on disk before the file is
visible under its name, and either "never overwrite" (a new key must not replace an old one)
or an atomic replace (readers see the old or the new content, never a mix).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600, fsynced, creating the parent (0700).

    ``exclusive``: refuse (``FileExistsError``) when ``path`` exists; otherwise replace it
    atomically through a temporary file beside it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path if exclusive else path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # a leftover temporary file keeps its old mode otherwise
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if not exclusive:
        target.replace(path)
