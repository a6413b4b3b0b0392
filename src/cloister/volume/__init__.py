"""Encrypted volumes: files on an untrusted disk, plaintext only inside the workload.

This package owns the volume format (``_format``, described in ``docs/volume-format.md``),
the state of an open volume and its commits (``_volume``), the ``open()``-like library front
end (``_file``) and the FUSE front end (``fuse``, which needs the ``fuse`` extra: pyfuse3 and
trio, imported only when a volume is mounted). It does not own keys or tags: the CAS generates
each volume's 32-byte key and keeps its latest root tag; the agent passes both in.

What it protects: confidentiality of contents and names, integrity of every byte, of each
file's length and of the binding of paths to files, and - against the root tag the caller
keeps - freshness of the whole volume. Tampering raises
:class:`cloister.errors.VolumeIntegrityError` with the volume path (``path``) and one of
these ``reason`` values:

=====================  =====================================================================
``wrong-key``          the header does not authenticate: wrong key, or the header changed
``header-missing``     the directory has no volume header
``manifest-missing``   the manifest was deleted
``manifest-corrupt``   the manifest was changed (or is not from this volume)
``rollback``           the volume is an older generation than the expected root tag
``root-tag-mismatch``  the volume is some other version than the expected root tag
``file-missing``       a file's data was deleted
``file-truncated``     a file's data is shorter than the manifest pins
``file-extended``      a file's data is longer than the manifest pins (``verify``)
``block-corrupt``      a byte of a block changed
``block-mismatch``     a block is not the one pinned at its position: swapped, reordered,
                       moved from another file, or its tag changed
``block-rolled-back``  a block is an older version of itself (a file rolled back)
=====================  =====================================================================

API for the CAS and the agent::

    vol = volume.create(directory, key)                 # -> Volume, generation 1, open
    tag = vol.root_tag                                  # "<generation>:<64 hex>"
    vol = volume.open_volume(directory, key, expected_root_tag=tag,
                             on_sync=report)            # report(tag) after every commit
    tag = vol.sync()                                    # commit; returns the new root tag
    vol.close()                                         # sync() and release the lock
    volume.mount(directory, mountpoint, key, expected_root_tag=tag,
                 on_sync=report)                        # blocks until unmounted; run it in
                                                        # a child process
    volume.umount(mountpoint)                           # commit, then unmount

``on_sync`` is called with each new root tag after the commit is durable and before ``sync``
returns (FUSE: before ``fsync`` returns). If it raises, the commit stays on disk and the tag
is reported again before the next commit, so at most one generation is ever ahead of what the
CAS acknowledged; ``open_volume`` admits that one generation (it names its predecessor) unless
``strict=True``, and reports it through ``on_sync`` at once.

Library front end::

    with volume.open_volume(d, key, expected_root_tag=tag) as vol:
        with vol.open("logs/app.txt", "a") as f:       # text and binary, r/w/a/x, +, seek
            f.write("hello\\n")
        vol.listdir("logs"); vol.rename("a", "b"); vol.remove("b"); vol.makedirs("x/y")
        vol.stat("logs/app.txt").size

A :class:`Volume` is not thread-safe, and one writer process holds a volume at a time.
"""

from __future__ import annotations

import time
from typing import Final

from cloister.volume._format import DEFAULT_BLOCK_SIZE, KEY_BYTES
from cloister.volume._volume import (
    Clock,
    SyncCallback,
    Volume,
    VolumeStat,
    create,
    open_volume,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_COMMIT_INTERVAL",
    "KEY_BYTES",
    "Clock",
    "SyncCallback",
    "Volume",
    "VolumeStat",
    "create",
    "mount",
    "open_volume",
    "umount",
]

DEFAULT_COMMIT_INTERVAL: Final = 5.0  # seconds between commits of a mounted volume


def mount(
    directory: str,
    mountpoint: str,
    key: bytes,
    *,
    expected_root_tag: str | None = None,
    on_sync: SyncCallback | None = None,
    commit_interval: float = DEFAULT_COMMIT_INTERVAL,
    clock: Clock = time.time_ns,
) -> str:
    """Mount the volume with FUSE and serve it until it is unmounted; return the final tag.

    Blocks; SIGTERM and SIGINT unmount cleanly. Needs pyfuse3 and trio (the ``fuse`` extra).
    """
    from cloister.volume import fuse  # lazy: pyfuse3 is optional

    return fuse.mount(
        directory,
        mountpoint,
        key,
        expected_root_tag=expected_root_tag,
        on_sync=on_sync,
        commit_interval=commit_interval,
        clock=clock,
    )


def umount(mountpoint: str) -> None:
    """Ask a mounted volume to commit, then unmount it."""
    from cloister.volume import fuse

    fuse.umount(mountpoint)
