"""Encrypted volume throughput: a plain directory, the library, the FUSE mount and gocryptfs.

All four run in one process tree on the same disk, one after the other, with the same
workloads:

- sequential write of ``--size`` bytes in 1 MiB requests (page cache), then the fsync alone;
- sequential read in 1 MiB requests, cold (page cache dropped, needs root) and warm;
- random 4 KiB reads and random 4 KiB writes (then fsync) inside that file;
- creating ``--files`` files of 4 KiB, then making them durable (sync(2) for the plain
  directory and gocryptfs, a commit for the library and the mount).

Prints one table: throughput per backend, then ratios (higher is better for the volume).

    .venv/bin/python benchmarks/volume.py [--size 1G] [--files 5000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cloister import volume

MiB = 1024 * 1024
REQUEST = MiB
SMALL = 4096
KEY = os.urandom(32)


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


class Backend:
    """A place to put files, with OS-level file IO (plain, FUSE, gocryptfs)."""

    name = "plain"

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        pass

    def durable(self) -> None:
        os.sync()

    # Sequential IO ------------------------------------------------------------------------

    def write_seq(self, name: str, size: int, buf: bytes) -> None:
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size // len(buf)):
                os.write(fd, buf)
        finally:
            os.close(fd)

    def fsync(self, name: str) -> None:
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_seq(self, name: str, out: bytearray) -> int:
        fd = os.open(self.root / name, os.O_RDONLY)
        view, total = memoryview(out), 0
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
        return total

    def random_reads(self, name: str, offsets: list[int]) -> None:
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            for off in offsets:
                os.pread(fd, SMALL, off)
        finally:
            os.close(fd)

    def random_writes(self, name: str, offsets: list[int], buf: bytes) -> None:
        fd = os.open(self.root / name, os.O_WRONLY)
        try:
            for off in offsets:
                os.pwrite(fd, buf, off)
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_files(self, count: int, buf: bytes) -> None:
        d = self.root / "small"
        d.mkdir()
        for i in range(count):
            fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, buf)
            os.close(fd)
        self.durable()


class Fuse(Backend):
    name = "fuse"

    def __init__(self, root: Path, work: Path) -> None:
        super().__init__(root)
        self.volume_dir = work / "volume"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True)
        volume.create(str(self.volume_dir), KEY).close()
        code = (
            "import sys; from cloister import volume;"
            f"volume.mount({str(self.volume_dir)!r}, {str(self.root)!r}, {KEY!r})"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        _wait_mounted(self.root, self.proc)

    def stop(self) -> None:
        volume.umount(str(self.root))
        assert self.proc is not None
        self.proc.wait()

    def durable(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the mount commits on fsync of a directory
        finally:
            os.close(fd)


class Gocryptfs(Backend):
    name = "gocryptfs"

    def __init__(self, root: Path, work: Path) -> None:
        super().__init__(root)
        self.cipher_dir = work / "gocryptfs-cipher"

    def start(self) -> None:
        self.root.mkdir(parents=True)
        self.cipher_dir.mkdir()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        pw = ["-extpass", "echo benchmark-password"]
        subprocess.run(["gocryptfs", "-init", "-q", *pw, str(self.cipher_dir)], check=True, **quiet)
        subprocess.run(
            ["gocryptfs", "-q", *pw, str(self.cipher_dir), str(self.root)], check=True, **quiet
        )

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.root)], check=True)


class Library(Backend):
    name = "library"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.vol: volume.Volume | None = None

    def start(self) -> None:
        self.vol = volume.create(str(self.root), KEY)

    def stop(self) -> None:
        assert self.vol is not None
        self.vol.close()

    @property
    def v(self) -> volume.Volume:
        assert self.vol is not None
        return self.vol

    def durable(self) -> None:
        self.v.sync()

    def write_seq(self, name: str, size: int, buf: bytes) -> None:
        with self.v.open(name, "wb", buffering=0) as f:
            for _ in range(size // len(buf)):
                f.write(buf)

    def fsync(self, name: str) -> None:
        self.v.sync()

    def read_seq(self, name: str, out: bytearray) -> int:
        view, total = memoryview(out), 0
        with self.v.open(name, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        return total

    def random_reads(self, name: str, offsets: list[int]) -> None:
        buf = memoryview(bytearray(SMALL))
        with self.v.open(name, "rb", buffering=0) as f:
            for off in offsets:
                f.seek(off)
                f.readinto(buf)

    def random_writes(self, name: str, offsets: list[int], buf: bytes) -> None:
        with self.v.open(name, "r+b", buffering=0) as f:
            for off in offsets:
                f.seek(off)
                f.write(buf)
        self.v.sync()

    def create_files(self, count: int, buf: bytes) -> None:
        self.v.mkdir("small")
        for i in range(count):
            with self.v.open(f"small/f{i:05d}", "wb", buffering=0) as f:
                f.write(buf)
        self.durable()


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not os.path.ismount(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"could not mount {path}")
        time.sleep(0.02)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(backend: Backend, size: int, files: int, ops: int) -> dict[str, float]:
    rng = random.Random(7)
    buf = os.urandom(REQUEST)
    small = os.urandom(SMALL)
    out = bytearray(REQUEST)
    offsets = [rng.randrange(0, size // SMALL) * SMALL for _ in range(ops)]
    results: dict[str, float] = {}
    backend.start()
    try:
        results["seq write"] = size / timed(lambda: backend.write_seq("big", size, buf)) / 1e6
        results["fsync after seq write"] = size / timed(lambda: backend.fsync("big")) / 1e6
        if drop_caches():
            results["seq read, cold"] = size / timed(lambda: backend.read_seq("big", out)) / 1e6
        results["seq read, warm"] = size / timed(lambda: backend.read_seq("big", out)) / 1e6
        results["random 4K reads"] = ops / timed(lambda: backend.random_reads("big", offsets))
        results["random 4K writes+fsync"] = ops / timed(
            lambda: backend.random_writes("big", offsets, small)
        )
        results[f"create {files} files"] = files / timed(lambda: backend.create_files(files, small))
    finally:
        backend.stop()
    return results


UNITS = {
    "seq write": "MB/s",
    "fsync after seq write": "MB/s",
    "seq read, cold": "MB/s",
    "seq read, warm": "MB/s",
    "random 4K reads": "op/s",
    "random 4K writes+fsync": "op/s",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="bytes of the sequential file (1G)")
    parser.add_argument("--files", type=int, default=5000, help="small files to create")
    parser.add_argument("--ops", type=int, default=20000, help="random 4 KiB operations")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--only", default="", help="comma-separated backends to run (all)")
    args = parser.parse_args()
    size = parse_size(args.size) // REQUEST * REQUEST
    work = Path(tempfile.mkdtemp(prefix="cloister-bench-", dir=args.dir))
    backends: list[Backend] = [Backend(work / "plain"), Library(work / "library")]
    try:
        import pyfuse3  # noqa: F401

        backends.append(Fuse(work / "fuse-mnt", work))
    except ImportError:
        print("pyfuse3 missing: no FUSE figures", file=sys.stderr)
    if shutil.which("gocryptfs"):
        backends.append(Gocryptfs(work / "gocryptfs-mnt", work))
    else:
        print("gocryptfs missing: no gocryptfs figures", file=sys.stderr)
    if args.only:
        backends = [b for b in backends if b.name in args.only.split(",")]
    table: dict[str, dict[str, float]] = {}
    try:
        for backend in backends:
            print(f"running {backend.name} ...", file=sys.stderr, flush=True)
            table[backend.name] = run(backend, size, args.files, args.ops)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(table, size, args.files)


def print_table(table: dict[str, dict[str, float]], size: int, files: int) -> None:
    names = list(table)
    rows = list(table[names[0]])
    ratios = [
        (a, b)
        for a, b in (("library", "plain"), ("fuse", "plain"), ("fuse", "gocryptfs"))
        if a in table and b in table
    ]
    head = ["workload", *names, *(f"{a}/{b}" for a, b in ratios)]
    lines = [head]
    for row in rows:
        unit = UNITS.get(row, "files/s")
        cells = [f"{row} ({unit})", *(f"{table[n].get(row, float('nan')):,.0f}" for n in names)]
        cells += [f"{table[a][row] / table[b][row]:.2f}x" for a, b in ratios]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print(f"\nsequential file {size // MiB} MiB, 1 MiB requests; {files} files of 4 KiB")
    for i, line in enumerate(lines):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("ratios compare throughput: above 1.00x the first is faster")


if __name__ == "__main__":
    main()
