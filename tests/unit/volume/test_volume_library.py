"""The library front end: open()-like files, the namespace, commits, crashes and versions."""

from __future__ import annotations

import errno
import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import volume_helpers as h

from cloister import errors, volume


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[volume.Volume]:
    v = volume.create(str(tmp_path / "vol"), h.KEY, block_size=h.BLOCK)
    yield v
    v.close()


def test_text_round_trip_and_append(vol: volume.Volume) -> None:
    with vol.open("notes.txt", "w") as f:
        f.write("first line\nzweite Zeile ü\n")
    with vol.open("notes.txt", "a") as f:
        f.write("third\n")
    with vol.open("notes.txt") as f:
        assert f.readlines() == ["first line\n", "zweite Zeile ü\n", "third\n"]
    with vol.open("notes.txt", encoding="latin-1", errors="replace") as f:
        assert "first line" in f.read()


def test_binary_read_write_seek(vol: volume.Volume) -> None:
    data = bytes(random.Random(1).randbytes(3 * h.BLOCK + 123))
    with vol.open("blob", "wb") as f:
        assert f.write(data) == len(data)
    with vol.open("blob", "r+b") as f:
        f.seek(h.BLOCK - 2)
        f.write(b"XXXX")  # straddles a block boundary
        f.seek(-3, io.SEEK_END)
        assert f.read() == data[-3:]
        assert f.tell() == len(data)
        f.seek(10)
        assert f.read(5) == data[10:15]
    expected = data[: h.BLOCK - 2] + b"XXXX" + data[h.BLOCK + 2 :]
    assert vol.read_bytes("blob") == expected
    with vol.open("blob", "rb", buffering=0) as raw:
        buf = bytearray(h.BLOCK)
        raw.seek(h.BLOCK)
        assert raw.readinto(buf) == h.BLOCK
        assert bytes(buf) == expected[h.BLOCK : 2 * h.BLOCK]


def test_modes_behave_like_the_builtin_open(vol: volume.Volume) -> None:
    with pytest.raises(FileNotFoundError):
        vol.open("missing")
    vol.write_bytes("x", b"old content")
    with pytest.raises(FileExistsError):
        vol.open("x", "x")
    with vol.open("x", "w+b") as f:  # truncates, and reads back
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new"
    with vol.open("x", "ab+") as f:
        f.seek(0)
        f.write(b"!")  # appends whatever the position
        f.seek(0)
        assert f.read() == b"new!"
    with vol.open("x", "rb") as f, pytest.raises(io.UnsupportedOperation):
        f.write(b"no")
    with pytest.raises(ValueError):
        vol.open("x", "rw")
    with pytest.raises(ValueError):
        vol.open("x", "rb", encoding="utf-8")
    with pytest.raises(IsADirectoryError):
        vol.open("", "r")


def test_sparse_writes_and_truncation(vol: volume.Volume) -> None:
    with vol.open("sparse", "wb") as f:
        f.seek(5 * h.BLOCK + 7)
        f.write(b"end")
    data = vol.read_bytes("sparse")
    assert data == bytes(5 * h.BLOCK + 7) + b"end"
    with vol.open("sparse", "r+b") as f:
        f.truncate(h.BLOCK + 1)
    assert vol.read_bytes("sparse") == bytes(h.BLOCK + 1)
    with vol.open("sparse", "r+b") as f:
        f.truncate(3 * h.BLOCK)
    assert vol.read_bytes("sparse") == bytes(3 * h.BLOCK)
    assert vol.stat("sparse").size == 3 * h.BLOCK


def test_namespace_operations(vol: volume.Volume) -> None:
    vol.makedirs("a/b/c")
    vol.write_bytes("a/b/c/f", b"f")
    vol.write_bytes("a/g", b"g")
    assert vol.listdir() == ["a"]
    assert vol.listdir("a") == ["b", "g"]
    assert vol.isdir("a/b") and vol.isfile("a/g") and not vol.exists("nope")
    vol.rename("a/b", "z")
    assert vol.listdir() == ["a", "z"]
    assert vol.read_bytes("z/c/f") == b"f"
    vol.rename("a/g", "z/c/f")  # replaces, like os.replace
    assert vol.read_bytes("z/c/f") == b"g"
    assert list(vol.walk()) == ["z/c/f"]
    with pytest.raises(OSError) as err:
        vol.rmdir("z")
    assert err.value.errno == errno.ENOTEMPTY
    with pytest.raises(IsADirectoryError):
        vol.remove("z")
    with pytest.raises(FileNotFoundError):
        vol.open("nope/x", "w")
    with pytest.raises(OSError) as err:
        vol.rename("z", "z/c/inside")
    assert err.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        vol.open("../escape", "w")
    vol.remove("z/c/f")
    vol.rmdir("z/c")
    assert vol.listdir("z") == []


def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    directory = str(tmp_path / "vol")
    with volume.create(directory, h.KEY) as v:
        v.makedirs("etc/app")
        with v.open("etc/app/config.yaml", "w") as f:
            f.write("key: value\n")
        v.write_bytes("big", bytes(range(256)) * 4096)
        v.set_mode("big", 0o600)
        tag = v.sync()
    with volume.open_volume(directory, h.KEY, expected_root_tag=tag) as v:
        assert v.open("etc/app/config.yaml").read() == "key: value\n"
        assert v.read_bytes("big") == bytes(range(256)) * 4096
        assert v.stat("big").mode == 0o600
        assert v.verify() == tag


@pytest.mark.parametrize("write_behind", [False, True])
def test_random_operations_match_a_model(vol: volume.Volume, write_behind: bool) -> None:
    if write_behind:
        vol.enable_write_behind()  # as the FUSE mount runs it
    rng = random.Random(5)
    model = bytearray()
    f = vol.open("model", "w+b", buffering=0)
    for step in range(400):
        op = rng.random()
        if op < 0.55:
            offset = rng.randrange(0, len(model) + 2 * h.BLOCK)
            data = rng.randbytes(rng.choice([1, 17, h.BLOCK - 1, h.BLOCK, 3 * h.BLOCK + 5]))
            f.seek(offset)
            f.write(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(data)] = data
        elif op < 0.7:
            size = rng.randrange(0, len(model) + h.BLOCK + 1)
            f.truncate(size)
            model = model[:size] + bytes(max(0, size - len(model)))
        elif op < 0.9:
            offset = rng.randrange(0, len(model) + 1)
            f.seek(offset)
            n = rng.randrange(1, 3 * h.BLOCK)
            assert f.read(n) == bytes(model[offset : offset + n])
        else:
            vol.sync()
        if step % 50 == 0:
            assert vol.read_bytes("model") == bytes(model)
    f.close()
    tag = vol.sync()
    assert vol.read_bytes("model") == bytes(model)
    assert vol.verify() == tag


@pytest.mark.parametrize("write_behind", [False, True])
def test_a_crash_leaves_the_last_committed_version(tmp_path: Path, write_behind: bool) -> None:
    """Copy the directory at arbitrary moments, as a kill -9 would leave it, and reopen it."""
    directory = tmp_path / "vol"
    states: dict[str, dict[str, bytes]] = {}
    v = volume.create(str(directory), h.KEY, block_size=h.BLOCK)
    if write_behind:
        v.enable_write_behind()
    v.write_bytes("f", b"v1" * h.BLOCK)
    tag = v.sync()
    states[tag] = {"f": b"v1" * h.BLOCK}
    crashes = []
    for n in range(3):
        with v.open("f", "r+b") as f:
            for i in range(4):
                f.seek(i * h.BLOCK + 100)
                f.write(f"write {n}.{i}".encode() * 500)  # partly sealed, partly dirty
                crashes.append((tag, h.snapshot(directory, tmp_path / f"crash{n}.{i}")))
        v.write_bytes(f"new{n}", b"new file")
        if n == 2:
            v.remove("f")
        crashes.append((tag, h.snapshot(directory, tmp_path / f"crash{n}.x")))
        tag = v.sync()
        states[tag] = {p: v.read_bytes(p) for p in v.walk()}
    v.close()
    for expected, crashed in crashes:
        with volume.open_volume(str(crashed), h.KEY, expected_root_tag=expected) as reopened:
            assert reopened.root_tag == expected
            assert {p: reopened.read_bytes(p) for p in reopened.walk()} == states[expected]
            assert reopened.verify() == expected


def test_slot_files_are_trimmed_even_when_not_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloister.volume import _volume

    monkeypatch.setattr(_volume, "_MAX_OPEN_DATA_FILES", 1)  # every other file evicts it
    directory = str(tmp_path / "vol")
    with volume.create(directory, h.KEY, block_size=h.BLOCK) as v:
        v.write_bytes("a", b"a" * 2 * h.BLOCK)
        v.sync()
        for round_ in range(3):  # block 0 moves to slot 1, back to slot 0, and to slot 1
            with v.open("a", "r+b") as f:
                f.write(bytes([round_]) * h.BLOCK)
            v.write_bytes(f"other{round_}", b"evicts a's descriptors")
            tag = v.sync()
        v.write_bytes("a", b"short")  # both slot files shrink
        tag = v.sync()
    with volume.open_volume(directory, h.KEY, expected_root_tag=tag, read_only=True) as v:
        assert v.verify() == tag
        assert v.read_bytes("a") == b"short"


def test_on_sync_reports_each_commit_and_retries_a_failed_report(tmp_path: Path) -> None:
    reported: list[str] = []
    fail = [True]

    def report(tag: str) -> None:
        if fail[0]:
            fail[0] = False
            raise errors.BackendUnavailable("the CAS is down")
        reported.append(tag)

    directory = str(tmp_path / "vol")
    volume.create(directory, h.KEY).close()
    v = volume.open_volume(directory, h.KEY, on_sync=report)
    v.write_bytes("a", b"1")
    with pytest.raises(errors.BackendUnavailable):
        v.sync()
    first = v.root_tag  # committed on disk, not yet acknowledged
    v.write_bytes("a", b"2")
    second = v.sync()  # reports the pending tag first, then commits and reports the new one
    assert reported == [first, second]
    v.close()


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    directory = str(tmp_path / "vol")
    with volume.create(directory, h.KEY):
        with pytest.raises(errors.ConflictError) as err:
            volume.open_volume(directory, h.KEY)
        assert err.value.reason == "volume-in-use"


def test_misuse_is_a_value_error(tmp_path: Path, vol: volume.Volume) -> None:
    with pytest.raises(ValueError):
        volume.create(str(tmp_path / "short"), b"short key")
    with pytest.raises(ValueError):
        volume.create(str(tmp_path / "odd"), h.KEY, block_size=5000)
    with pytest.raises(ValueError):
        volume.open_volume(vol.directory, h.KEY, expected_root_tag="not a tag")
    vol.write_bytes("x", b"uncommitted")
    with pytest.raises(ValueError):
        vol.verify()
    with pytest.raises(FileExistsError):
        volume.create(vol.directory, h.KEY)


def test_read_only_volumes_refuse_writes(tmp_path: Path) -> None:
    directory = str(tmp_path / "vol")
    volume.create(directory, h.KEY).close()
    with volume.open_volume(directory, h.KEY, read_only=True) as v:
        with pytest.raises(PermissionError):
            v.write_bytes("x", b"x")
        with pytest.raises(PermissionError):
            v.mkdir("d")
        with pytest.raises(PermissionError):
            v.open("x", "a")
