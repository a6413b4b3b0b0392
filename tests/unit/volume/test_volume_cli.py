"""`cloister volume ...` end to end through the Typer app: keys, migration, verification."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import volume_helpers as h
from typer.testing import CliRunner

from cloister.cli.main import app

runner = CliRunner()


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["volume", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def created(tmp_path: Path) -> tuple[Path, Path, str]:
    key, directory = tmp_path / "key", tmp_path / "vol"
    code, out, err = _run("create", directory, "--key-file", key)
    assert code == 0, err
    return directory, key, out.strip().splitlines()[-1]


def test_create_makes_a_private_random_key(created: tuple[Path, Path, str]) -> None:
    _, key, tag = created
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert tag.startswith("1:")


def test_create_reuses_an_existing_key(tmp_path: Path, created: tuple[Path, Path, str]) -> None:
    _, key, _ = created
    before = key.read_bytes()
    code, _, err = _run("create", tmp_path / "second", "--key-file", key)
    assert code == 0, err
    assert key.read_bytes() == before


def test_encrypt_verify_decrypt_round_trip(tmp_path: Path, created: tuple[Path, Path, str]) -> None:
    directory, key, _ = created
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    (src / "top.txt").write_text("top")
    (src / "sub" / "deeper" / "data.bin").write_bytes(os.urandom(300_000))
    os.chmod(src / "top.txt", 0o640)
    code, out, err = _run("encrypt", src, directory, "--key-file", key)
    assert code == 0, err
    tag = out.strip().splitlines()[-1]
    assert "encrypted 2 files" in out

    code, out, err = _run("verify", directory, "--key-file", key, "--tag", tag)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == tag

    dest = tmp_path / "dest"
    code, out, err = _run("decrypt", directory, dest, "--key-file", key, "--tag", tag)
    assert code == 0, err
    assert (dest / "top.txt").read_text() == "top"
    assert (dest / "empty-dir").is_dir()
    assert stat.S_IMODE((dest / "top.txt").stat().st_mode) == 0o640
    data = (src / "sub" / "deeper" / "data.bin").read_bytes()
    assert (dest / "sub" / "deeper" / "data.bin").read_bytes() == data

    # Encrypting again replaces files at the same paths and moves the volume on.
    (src / "top.txt").write_text("replaced")
    code, out, err = _run("encrypt", src / "top.txt", directory, "--key-file", key, "--tag", tag)
    assert code == 0, err
    code, out, err = _run("verify", directory, "--key-file", key, "--tag", tag)
    assert code == 4
    assert "root-tag-mismatch" in err


def test_tampering_exits_4_and_names_the_file(
    tmp_path: Path, created: tuple[Path, Path, str]
) -> None:
    directory, key, _ = created
    src = tmp_path / "one.txt"
    src.write_bytes(b"x" * 200_000)
    code, out, _ = _run("encrypt", src, directory, "--key-file", key)
    tag = out.strip().splitlines()[-1]
    [data] = [p for p in (directory / "data").iterdir()]
    h.flip_byte(data, 5000)
    code, out, err = _run("verify", directory, "--key-file", key, "--tag", tag)
    assert code == 4
    assert "block-corrupt" in err
    code, _, err = _run("decrypt", directory, tmp_path / "out", "--key-file", key)
    assert code == 4
    assert not (tmp_path / "out" / "one.txt").exists()


def test_usage_errors_exit_2(tmp_path: Path, created: tuple[Path, Path, str]) -> None:
    directory, key, _ = created
    bad_key = tmp_path / "bad"
    bad_key.write_bytes(b"short")
    assert _run("verify", directory, "--key-file", bad_key)[0] == 2
    assert _run("verify", directory, "--key-file", tmp_path / "absent")[0] == 2
    assert _run("verify", tmp_path / "nothing", "--key-file", key)[0] == 2
    assert _run("verify", directory, "--key-file", key, "--tag", "garbage")[0] == 2
    assert _run("create", directory, "--key-file", key)[0] == 2  # not empty
    assert _run("umount", tmp_path)[0] == 2  # not a mount point


def test_a_wrong_key_exits_4(tmp_path: Path, created: tuple[Path, Path, str]) -> None:
    directory, _, _ = created
    other = tmp_path / "other-key"
    other.write_bytes(os.urandom(32))
    os.chmod(other, 0o600)
    code, _, err = _run("verify", directory, "--key-file", other)
    assert code == 4
    assert "wrong-key" in err
