"""A real FUSE mount of an encrypted volume, used by unmodified programs, and killed with -9.

Needs /dev/fuse and pyfuse3. In CI (CI=true) their absence is a failure, not a skip: these are
the only tests of the mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloister import errors, volume

pytestmark = pytest.mark.fuse

KEY = bytes(range(32))


def _require_fuse() -> None:
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        missing.append("pyfuse3 (pip install 'cloister[fuse]')")
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        missing.append("fusermount3 (apt-get install fuse3)")
    if missing:
        message = "FUSE tests need " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide them", pytrace=False)
        pytest.skip(message)


class Mount:
    """`cloister volume mount` in a child process, as the agent would run it."""

    def __init__(self, tmp: Path, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.key_file = tmp / "key"
        self.tag_file = tmp / "tag"
        command = [
            sys.executable,
            "-m",
            "cloister",
            "volume",
            "mount",
            str(directory),
            str(self.mountpoint),
            "--key-file",
            str(self.key_file),
            "--tag-file",
            str(self.tag_file),
            *extra,
        ]
        self.log = open(tmp / "mount.log", "ab")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=self.log)

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + 90  # the CLI imports a lot on a busy machine
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited with {self.proc.returncode}: {self._log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the volume did not mount: {self._log()}")
            time.sleep(0.02)

    def umount(self, *, cli: bool = False) -> int:
        if cli:
            command = [sys.executable, "-m", "cloister", "volume", "umount", str(self.mountpoint)]
            subprocess.run(command, check=True)
        else:
            volume.umount(str(self.mountpoint))
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        # The kernel keeps a dead FUSE mount until it is detached.
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def tag(self) -> str:
        return self.tag_file.read_text().strip()

    def _log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Mount]]:
    _require_fuse()
    (tmp_path / "key").write_bytes(KEY)
    os.chmod(tmp_path / "key", 0o600)
    directory = tmp_path / "vol"
    with volume.create(str(directory), KEY) as vol:
        (tmp_path / "tag").write_text(vol.root_tag)
    mount = Mount(tmp_path, directory)
    try:
        mount.wait_mounted()
        yield tmp_path, mount
    finally:
        mount.close()


def _sh(script: str, cwd: Path) -> str:
    return subprocess.run(
        ["sh", "-ec", script], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def test_unmodified_programs_read_and_write(mounted: tuple[Path, Mount]) -> None:
    tmp, mount = mounted
    source = tmp / "source.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    _sh(
        f"""
        echo hello > greeting
        echo again >> greeting
        mkdir -p etc/app
        cp /etc/os-release etc/app/
        dd if={source} of=big bs=1M status=none
        cmp {source} big
        mv etc/app etc/moved
        dd if=/dev/zero of=sparse bs=1 count=1 seek=200000 status=none
        truncate -s 100 sparse
        touch empty
        rm -f etc/moved/nonexistent
        ln -s greeting link 2>/dev/null && exit 3 || true
        """,
        mount.mountpoint,
    )
    assert sorted(os.listdir(mount.mountpoint)) == ["big", "empty", "etc", "greeting", "sparse"]
    assert mount.path("greeting").read_text() == "hello\nagain\n"
    assert mount.path("sparse").stat().st_size == 100
    assert mount.umount(cli=True) == 0
    with volume.open_volume(str(mount.directory), KEY, expected_root_tag=mount.tag()) as vol:
        assert vol.read_bytes("big") == source.read_bytes()
        assert vol.read_bytes("greeting") == b"hello\nagain\n"
        assert vol.read_bytes("etc/moved/os-release") == Path("/etc/os-release").read_bytes()
        assert vol.read_bytes("sparse") == bytes(100)
        assert vol.verify() == mount.tag()


def test_fsync_commits_and_reports_the_tag(mounted: tuple[Path, Mount]) -> None:
    _, mount = mounted
    before = mount.tag()
    _sh("echo durable > f && sync f", mount.mountpoint)
    after = mount.tag()
    assert after != before
    assert int(after.split(":")[0]) == int(before.split(":")[0]) + 1


def test_tampered_data_reads_as_eio_and_rollback_refuses_the_mount(
    mounted: tuple[Path, Mount],
) -> None:
    tmp, mount = mounted
    _sh("echo first > f && sync f", mount.mountpoint)
    old = tmp / "old"
    shutil.copytree(mount.directory, old, ignore=shutil.ignore_patterns("lock"))
    _sh("echo second > f && echo more > g", mount.mountpoint)
    assert mount.umount() == 0

    # A rolled-back volume never appears in the file system: the mount exits with code 4.
    shutil.rmtree(mount.directory)
    shutil.copytree(old, mount.directory)
    again = Mount(tmp, mount.directory)
    assert again.proc.wait(timeout=60) == 4
    assert "rollback" in again._log()
    again.close()

    # A changed byte in the data reads as EIO, naming nothing the attacker could use.
    with volume.open_volume(str(mount.directory), KEY) as vol:
        [data] = vol.data_files("f")
    with open(data, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with volume.open_volume(str(mount.directory), KEY, read_only=True) as vol:
        mount.tag_file.write_text(vol.root_tag)
    third = Mount(tmp, mount.directory)
    try:
        third.wait_mounted()
        with pytest.raises(OSError) as err:
            third.path("f").read_bytes()
        assert "Input/output error" in str(err.value)
    finally:
        third.close()


def test_kill_9_at_any_moment_leaves_a_committed_version(tmp_path: Path) -> None:
    """Kill the mount process while unmodified programs write through it, several times.

    After each kill the volume must open against the last reported root tag, verify, and hold
    for every file either exactly its last synced content or something an earlier commit
    could have caught: never bytes that no program wrote.
    """
    _require_fuse()
    (tmp_path / "key").write_bytes(KEY)
    os.chmod(tmp_path / "key", 0o600)
    directory = tmp_path / "vol"
    with volume.create(str(directory), KEY) as vol:
        (tmp_path / "tag").write_text(vol.root_tag)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(48 * 1024 * 1024))
    src = source.read_bytes()
    synced = b"synced version\n" * 1000

    for round_, delay in enumerate((0.05, 0.3, 0.8, 1.5)):
        mount = Mount(tmp_path, directory, "--commit-interval", "0.1")
        try:
            mount.wait_mounted()
            mount.path("stable").write_bytes(synced)
            _sh("sync stable", mount.mountpoint)
            writers = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    f"dd if={source} of=big bs=64k status=none; "
                    f"for i in $(seq 200); do echo {round_}-$i > small-$i; done",
                ],
                cwd=mount.mountpoint,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)  # let the writers get somewhere, then pull the plug
        finally:
            mount.close()  # SIGKILL, then detach the dead mount
        writers.wait(timeout=60)

        tag = mount.tag()
        with volume.open_volume(str(directory), KEY, expected_root_tag=tag) as vol:
            assert vol.read_bytes("stable") == synced
            if vol.exists("big"):
                big = vol.read_bytes("big")
                assert len(big) <= len(src)
                # Writeback may hand pages over out of order, so a commit can catch a hole
                # (zeros) before it is filled; anything else must be exactly what dd wrote.
                for start in range(0, len(big), 65536):
                    piece = big[start : start + 65536]
                    assert piece == src[start : start + len(piece)] or not any(piece)
            for name in vol.listdir():
                if name.startswith("small-"):
                    content = vol.read_bytes(name)
                    assert content in (b"", f"{round_}-{name[6:]}\n".encode())
            assert vol.verify() == vol.root_tag
            for name in vol.listdir():
                if name.startswith("small-") or name == "big":
                    vol.remove(name)
            (tmp_path / "tag").write_text(vol.sync())


def test_sigterm_commits_and_unmounts(mounted: tuple[Path, Mount]) -> None:
    _, mount = mounted
    _sh("echo 'not fsynced by anyone' > late", mount.mountpoint)
    # Still open at SIGTERM: its data is only in the kernel's page cache (writeback caching).
    held = os.open(mount.path("held-open"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(held, b"in the kernel's page cache only")
        mount.proc.send_signal(signal.SIGTERM)  # how an agent stops its mount child
        assert mount.proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(OSError):
            os.close(held)
    assert not os.path.ismount(mount.mountpoint)
    with volume.open_volume(str(mount.directory), KEY, expected_root_tag=mount.tag()) as vol:
        assert vol.read_bytes("late") == b"not fsynced by anyone\n"
        assert vol.read_bytes("held-open") == b"in the kernel's page cache only"


def test_a_second_writer_is_refused_while_mounted(mounted: tuple[Path, Mount]) -> None:
    _, mount = mounted
    with pytest.raises(errors.ConflictError):
        volume.open_volume(str(mount.directory), KEY)
    with contextlib.suppress(Exception):
        mount.umount()
