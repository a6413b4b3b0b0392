"""Shared helpers for the volume tests: a small volume with known contents, and raw-disk edits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cloister import volume
from cloister.volume import _format

KEY = bytes(range(32))
BLOCK = 4096  # the smallest block size, so that multi-block files stay small
STRIDE = _format.record_stride(BLOCK)


def block_content(name: str, index: int, length: int = BLOCK) -> bytes:
    """Distinct, recognizable plaintext for block ``index`` of file ``name``."""
    seed = f"{name}:{index}:".encode()
    return (seed * (length // len(seed) + 1))[:length]


def file_content(name: str, blocks: int, tail: int = 0) -> bytes:
    return (
        b"".join(block_content(name, i) for i in range(blocks))
        + block_content(name, blocks, tail)[:tail]
    )


def make_volume(root: Path) -> tuple[Path, str]:
    """A committed volume with a.txt and b.txt (5 blocks and a tail each) and d/c.bin."""
    directory = root / "vol"
    with volume.create(str(directory), KEY, block_size=BLOCK) as vol:
        vol.write_bytes("a.txt", file_content("a.txt", 5, 100))
        vol.write_bytes("b.txt", file_content("b.txt", 5, 100))
        vol.mkdir("d")
        vol.write_bytes("d/c.bin", file_content("d/c.bin", 2))
        tag = vol.sync()
    return directory, tag


def data_files(directory: Path, path: str) -> list[str]:
    with volume.open_volume(str(directory), KEY, read_only=True) as vol:
        return vol.data_files(path)


def slot0(directory: Path, path: str) -> str:
    return data_files(directory, path)[0]


def read_record(data_file: str, index: int) -> bytes:
    with open(data_file, "rb") as f:
        f.seek(index * STRIDE)
        return f.read(STRIDE)


def write_record(data_file: str, index: int, record: bytes) -> None:
    with open(data_file, "r+b") as f:
        f.seek(index * STRIDE)
        f.write(record)


def flip_byte(file: str | Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def snapshot(directory: Path, to: Path) -> Path:
    shutil.copytree(directory, to)
    os.unlink(to / _format.LOCK_NAME)
    return to


def restore(snap: Path, directory: Path) -> None:
    shutil.rmtree(directory)
    shutil.copytree(snap, directory)


def read_all(directory: Path, tag: str | None = None) -> dict[str, bytes]:
    """Open the volume as the CAS would and read every file; raises on any integrity error."""
    with volume.open_volume(str(directory), KEY, expected_root_tag=tag, read_only=True) as vol:
        return {path: vol.read_bytes(path) for path in vol.walk()}
