"""`cloister volume ...`: create, mount, verify and migrate encrypted volumes by hand.

Inside a cluster the CAS holds each volume's key and root tag and the agent mounts the volume;
these commands are for everything outside that path: trying the format, migrating existing
data in and out, and checking a volume. The key comes from ``--key-file`` (32 raw bytes, mode
0600); a root tag from ``--tag``, or from ``--tag-file`` which ``mount`` keeps current. Every
command that changes a volume prints the new root tag as its last line.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cloister import volume
from cloister.cli._errors import handle_errors, usage_error

app = typer.Typer(help="Encrypted volumes: create, mount, verify, migrate.", no_args_is_help=True)

_CHUNK = 1024 * 1024  # bytes copied per read while migrating

KEY_FILE = typer.Option(..., "--key-file", help="file holding the 32-byte volume key")
TAG = typer.Option(None, "--tag", help="the expected root tag: refuse any other version")


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise usage_error(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(key) != volume.KEY_BYTES:
        raise usage_error(f"{path} must hold exactly {volume.KEY_BYTES} bytes, not {len(key)}")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        print(f"cloister: warning: {path} is readable by others", file=sys.stderr)
    return key


def _create_key(path: Path) -> bytes:
    key = os.urandom(volume.KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _read_tag_file(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    return path.read_text().strip() or None


def _tag_writer(path: Path) -> volume.SyncCallback:
    def write(tag: str) -> None:
        # Atomic replace: a crash leaves the old tag or the new one, never half of one.
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, tag.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        print(tag, flush=True)

    return write


def _volume_dir(path: Path) -> str:
    if not path.is_dir():
        raise usage_error(f"{path} is not a directory")
    return str(path)


@contextmanager
def _progress(total: int, what: str) -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(what, total=total)
        yield progress


def _advance(progress: Progress, n: int) -> None:
    progress.advance(progress.task_ids[0], n)


@app.command("create")
@handle_errors
def create(
    directory: Path = typer.Argument(..., help="an absent or empty directory"),
    key_file: Path = KEY_FILE,
    block_size: int = typer.Option(volume.DEFAULT_BLOCK_SIZE, help="bytes per block"),
) -> None:
    """Create an empty volume (and a new random key in --key-file if it does not exist)."""
    key = _read_key(key_file) if key_file.exists() else _create_key(key_file)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise usage_error(f"{directory} exists and is not an empty directory")
    try:
        vol = volume.create(str(directory), key, block_size=block_size)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    with vol:
        print(vol.root_tag)


@app.command("mount")
@handle_errors
def mount(
    directory: Path = typer.Argument(..., help="the volume directory"),
    mountpoint: Path = typer.Argument(..., help="an existing empty directory"),
    key_file: Path = KEY_FILE,
    tag: str | None = TAG,
    tag_file: Path | None = typer.Option(
        None, "--tag-file", help="read the expected root tag here; write each new one back"
    ),
    commit_interval: float = typer.Option(
        volume.DEFAULT_COMMIT_INTERVAL, help="seconds between automatic commits"
    ),
) -> None:
    """Mount a volume with FUSE and serve it in the foreground until `umount`."""
    key = _read_key(key_file)
    if not mountpoint.is_dir():
        raise usage_error(f"{mountpoint} is not a directory")
    expected = tag or _read_tag_file(tag_file)
    on_sync = _tag_writer(tag_file) if tag_file is not None else None
    try:
        final = volume.mount(
            _volume_dir(directory),
            str(mountpoint),
            key,
            expected_root_tag=expected,
            on_sync=on_sync,
            commit_interval=commit_interval,
        )
    except ImportError:
        raise usage_error("mounting needs pyfuse3 and trio: pip install 'cloister[fuse]'") from None
    except (ValueError, RuntimeError) as exc:  # pyfuse3 reports a failed mount as RuntimeError
        raise usage_error(f"cannot mount {mountpoint}: {exc}") from None
    print(final)


@app.command("umount")
@handle_errors
def umount(mountpoint: Path = typer.Argument(..., help="where the volume is mounted")) -> None:
    """Commit a mounted volume and unmount it."""
    if not os.path.ismount(mountpoint):
        raise usage_error(f"{mountpoint} is not a mount point")
    try:
        volume.umount(str(mountpoint))
    except OSError as exc:
        raise usage_error(f"cannot unmount {mountpoint}: {exc.strerror}") from None


@app.command("verify")
@handle_errors
def verify(
    directory: Path = typer.Argument(..., help="the volume directory"),
    key_file: Path = KEY_FILE,
    tag: str | None = typer.Option(None, "--tag", help="fail unless the volume is this version"),
) -> None:
    """Check every block of every file; print the root tag last.

    Read-only: a volume whose writer crashed shows the tails of uncommitted writes as
    "file-extended" until a writer (mount, encrypt) opens it once and trims them.
    """
    key = _read_key(key_file)
    try:
        vol = volume.open_volume(
            _volume_dir(directory), key, expected_root_tag=tag, strict=True, read_only=True
        )
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    with vol:
        paths = list(vol.walk())
        total = sum(vol.stat(p).size for p in paths)
        with _progress(total, "verifying") as progress:
            tag_found = vol.verify(lambda _path, size: _advance(progress, size))
        print(f"verified {len(paths)} files, {total} bytes")
        print(tag_found)


@app.command("encrypt")
@handle_errors
def encrypt(
    source: Path = typer.Argument(..., help="a directory (or one file) to add"),
    directory: Path = typer.Argument(..., help="the volume directory"),
    key_file: Path = KEY_FILE,
    tag: str | None = TAG,
) -> None:
    """Add SOURCE's files to the volume, replacing files at the same paths."""
    key = _read_key(key_file)
    if not source.exists():
        raise usage_error(f"{source} does not exist")
    files = [(source, source.name)] if source.is_file() else list(_tree(source))
    with volume.open_volume(_volume_dir(directory), key, expected_root_tag=tag) as vol:
        if source.is_dir():
            for sub in sorted(p for p in source.rglob("*") if p.is_dir() and not p.is_symlink()):
                vol.makedirs(sub.relative_to(source).as_posix(), exist_ok=True)
        total = sum(src.stat().st_size for src, _ in files)
        with _progress(total, "encrypting") as progress:
            for src, rel in files:
                parent = rel.rpartition("/")[0]
                if parent:
                    vol.makedirs(parent, exist_ok=True)
                _copy_in(vol, src, rel, progress)
        print(f"encrypted {len(files)} files, {total} bytes")
        print(vol.sync())


def _tree(root: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                print(f"cloister: skipping {path}: not a regular file", file=sys.stderr)
                continue
            yield path, path.relative_to(root).as_posix()


def _copy_in(vol: volume.Volume, src: Path, rel: str, progress: Progress) -> None:
    with open(src, "rb") as fin, vol.open(rel, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            _advance(progress, len(chunk))
    vol.set_mode(rel, stat.S_IMODE(src.stat().st_mode))


@app.command("decrypt")
@handle_errors
def decrypt(
    directory: Path = typer.Argument(..., help="the volume directory"),
    dest: Path = typer.Argument(..., help="where to write the plaintext files"),
    key_file: Path = KEY_FILE,
    tag: str | None = TAG,
) -> None:
    """Write every file of the volume under DEST (after checking each one)."""
    key = _read_key(key_file)
    with volume.open_volume(
        _volume_dir(directory), key, expected_root_tag=tag, read_only=True
    ) as vol:
        paths = list(vol.walk())
        total = sum(vol.stat(p).size for p in paths)
        dest.mkdir(parents=True, exist_ok=True)
        for path in vol.directories():
            (dest / path).mkdir(mode=vol.stat(path).mode, exist_ok=True)
        with _progress(total, "decrypting") as progress:
            for path in paths:
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".cloister-partial")
                # Each block is checked before it is returned; a file appears under its name
                # only once all of it was read and checked.
                with vol.open(path, "rb") as fin, open(partial, "wb") as fout:
                    while chunk := fin.read(_CHUNK):
                        fout.write(chunk)
                        _advance(progress, len(chunk))
                os.chmod(partial, vol.stat(path).mode)
                os.replace(partial, target)
        print(f"decrypted {len(paths)} files, {total} bytes")
        print(vol.root_tag)
