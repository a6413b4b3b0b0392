"""Every attack on an encrypted volume, performed on the real files, and the error it gets.

The attacker owns the disk: it can flip, move, copy, truncate, extend, delete and restore any
file under the volume directory, but does not know the key. The CAS keeps the root tag.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import volume_helpers as h

from cloister import errors, volume
from cloister.volume import _format


def _refused(directory: Path, tag: str | None, *, path: str | None, reason: str) -> None:
    """Reading or verifying the volume must fail with exactly this reason, naming ``path``."""
    with pytest.raises(errors.VolumeIntegrityError) as read_err:
        h.read_all(directory, tag)
    assert read_err.value.reason == reason
    assert read_err.value.path == path
    with pytest.raises(errors.VolumeIntegrityError) as verify_err:
        with volume.open_volume(str(directory), h.KEY, expected_root_tag=tag, read_only=True) as v:
            v.verify()
    assert (verify_err.value.reason, verify_err.value.path) == (reason, path)


@pytest.fixture
def vol(tmp_path: Path) -> tuple[Path, str]:
    return h.make_volume(tmp_path)


# --- a changed byte --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (0, "block-corrupt"),  # the nonce
        (_format.NONCE_BYTES + 7, "block-corrupt"),  # the ciphertext
        (h.STRIDE - 1, "block-mismatch"),  # the GCM tag, which the manifest pins
    ],
)
def test_a_changed_byte_in_a_block_is_detected(
    vol: tuple[Path, str], where: int, reason: str
) -> None:
    directory, tag = vol
    h.flip_byte(h.slot0(directory, "b.txt"), 2 * h.STRIDE + where)
    _refused(directory, tag, path="b.txt", reason=reason)


def test_every_byte_of_a_data_file_is_covered(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    data = h.slot0(directory, "d/c.bin")
    size = os.path.getsize(data)
    # Every byte of the first record, then a stride through the rest of the file.
    for offset in [*range(0, h.STRIDE, 1), *range(h.STRIDE, size, 211), size - 1]:
        h.flip_byte(data, offset)
        with pytest.raises(errors.VolumeIntegrityError) as err:
            h.read_all(directory, tag)
        assert err.value.path == "d/c.bin"
        assert err.value.reason in ("block-corrupt", "block-mismatch")
        h.flip_byte(data, offset)
    assert h.read_all(directory, tag)["d/c.bin"] == h.file_content("d/c.bin", 2)


def test_every_byte_of_the_manifest_is_covered(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    manifest = directory / _format.MANIFEST_NAME
    for offset in range(os.path.getsize(manifest)):
        h.flip_byte(manifest, offset)
        with pytest.raises(errors.VolumeIntegrityError) as err:
            h.read_all(directory, tag)
        assert err.value.reason == "manifest-corrupt"
        with pytest.raises(errors.VolumeIntegrityError):
            h.read_all(directory, None)  # even without a root tag to compare against
        h.flip_byte(manifest, offset)


def test_every_byte_of_the_header_is_covered(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    header = directory / _format.HEADER_NAME
    for offset in range(os.path.getsize(header)):
        h.flip_byte(header, offset)
        with pytest.raises(errors.VolumeIntegrityError) as err:
            h.read_all(directory, tag)
        assert err.value.reason in ("wrong-key", "header-malformed", "unsupported-version")
        h.flip_byte(header, offset)


def test_the_wrong_key_is_refused(vol: tuple[Path, str]) -> None:
    directory, _ = vol
    with pytest.raises(errors.VolumeIntegrityError) as err:
        volume.open_volume(str(directory), bytes(32))
    assert err.value.reason == "wrong-key"


# --- blocks moved ----------------------------------------------------------------------


def test_blocks_swapped_within_a_file_are_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    data = h.slot0(directory, "a.txt")
    one, three = h.read_record(data, 1), h.read_record(data, 3)
    h.write_record(data, 1, three)
    h.write_record(data, 3, one)
    _refused(directory, tag, path="a.txt", reason="block-mismatch")


def test_blocks_reordered_within_a_file_are_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    data = h.slot0(directory, "a.txt")
    records = [h.read_record(data, i) for i in range(5)]
    for i, record in enumerate(records[1:] + records[:1]):
        h.write_record(data, i, record)
    _refused(directory, tag, path="a.txt", reason="block-mismatch")


def test_blocks_swapped_between_files_are_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    a, b = h.slot0(directory, "a.txt"), h.slot0(directory, "b.txt")
    ra, rb = h.read_record(a, 2), h.read_record(b, 2)
    h.write_record(a, 2, rb)
    h.write_record(b, 2, ra)
    _refused(directory, tag, path="a.txt", reason="block-mismatch")


def test_files_swapped_between_paths_are_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    a, b = h.slot0(directory, "a.txt"), h.slot0(directory, "b.txt")
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    _refused(directory, tag, path="a.txt", reason="block-mismatch")


# --- length ----------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 100 + 28, h.STRIDE + 128])
def test_truncation_is_detected(vol: tuple[Path, str], cut: int) -> None:
    directory, tag = vol
    data = h.slot0(directory, "b.txt")
    os.truncate(data, os.path.getsize(data) - cut)
    _refused(directory, tag, path="b.txt", reason="file-truncated")


def test_extension_with_a_valid_block_is_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    data = h.slot0(directory, "d/c.bin")
    record = h.read_record(data, 1)
    with open(data, "ab") as f:
        f.write(record)  # a well-formed record of this very file, as a sixth block
    # Readers never read past what the manifest pins, so they see the committed content...
    assert h.read_all(directory, tag)["d/c.bin"] == h.file_content("d/c.bin", 2)
    # ...and verification reports the extension.
    with volume.open_volume(str(directory), h.KEY, expected_root_tag=tag, read_only=True) as v:
        with pytest.raises(errors.VolumeIntegrityError) as err:
            v.verify()
    assert (err.value.reason, err.value.path) == ("file-extended", "d/c.bin")
    # A writer that opens the volume trims bytes no manifest references (a crashed writer
    # leaves such tails), after which the volume verifies again.
    with volume.open_volume(str(directory), h.KEY, expected_root_tag=tag) as v:
        assert v.verify() == tag


def test_extension_of_a_file_through_an_older_manifest_is_a_rollback(
    vol: tuple[Path, str], tmp_path: Path
) -> None:
    directory, _ = vol
    snap = h.snapshot(directory, tmp_path / "old")
    with volume.open_volume(str(directory), h.KEY) as v:
        with v.open("a.txt", "r+b") as f:
            f.truncate(10)
        tag = v.sync()
    shutil.copy(snap / _format.MANIFEST_NAME, directory / _format.MANIFEST_NAME)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, tag)
    assert err.value.reason == "rollback"


# --- rollback --------------------------------------------------------------------------


def test_a_single_file_rolled_back_is_detected(vol: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = vol
    old_slot0 = Path(h.slot0(directory, "a.txt")).read_bytes()
    # Two overwrites: block 1 goes to slot 1, then back to slot 0 with newer content.
    with volume.open_volume(str(directory), h.KEY) as v:
        for version in (b"second", b"third"):
            with v.open("a.txt", "r+b") as f:
                f.seek(h.BLOCK + 10)
                f.write(version)
            tag = v.sync()
    Path(h.slot0(directory, "a.txt")).write_bytes(old_slot0)
    _refused(directory, tag, path="a.txt", reason="block-rolled-back")


def test_the_whole_volume_rolled_back_is_detected(vol: tuple[Path, str], tmp_path: Path) -> None:
    directory, first = vol
    snap = h.snapshot(directory, tmp_path / "old")
    with volume.open_volume(str(directory), h.KEY, expected_root_tag=first) as v:
        v.write_bytes("a.txt", b"newer")
        v.sync()
        v.write_bytes("a.txt", b"newest")
        latest = v.sync()
    h.restore(snap, directory)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, latest)
    assert err.value.reason == "rollback"
    assert h.read_all(directory, first)["a.txt"] == h.file_content("a.txt", 5, 100)


def test_the_manifest_alone_rolled_back_is_detected(vol: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = vol
    snap = h.snapshot(directory, tmp_path / "old")
    with volume.open_volume(str(directory), h.KEY) as v:
        v.remove("b.txt")
        v.sync()
        v.write_bytes("c.txt", b"c")
        tag = v.sync()
    shutil.copy(snap / _format.MANIFEST_NAME, directory / _format.MANIFEST_NAME)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, tag)
    assert err.value.reason == "rollback"


def test_a_forked_version_is_refused(vol: tuple[Path, str], tmp_path: Path) -> None:
    directory, first = vol
    fork = h.snapshot(directory, tmp_path / "fork")
    with volume.open_volume(str(directory), h.KEY, expected_root_tag=first) as v:
        v.write_bytes("a.txt", b"one future")
        v.sync()
        v.write_bytes("a.txt", b"one future, later")
        tag = v.sync()
    with volume.open_volume(str(fork), h.KEY, expected_root_tag=first) as v:
        v.write_bytes("a.txt", b"another future")
        v.sync()
        v.write_bytes("a.txt", b"another future, later")
        v.sync()
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(fork, tag)
    assert err.value.reason == "root-tag-mismatch"


def test_one_unacknowledged_generation_is_admitted_unless_strict(vol: tuple[Path, str]) -> None:
    directory, first = vol
    with volume.open_volume(str(directory), h.KEY, expected_root_tag=first) as v:
        v.write_bytes("a.txt", b"committed, then the writer died before reporting")
        ahead = v.sync()
    reported: list[str] = []
    with volume.open_volume(
        str(directory), h.KEY, expected_root_tag=first, on_sync=reported.append
    ) as v:
        assert v.root_tag == ahead
        assert reported == [ahead]  # reported at once, before anything else is committed
    with pytest.raises(errors.VolumeIntegrityError) as err:
        volume.open_volume(str(directory), h.KEY, expected_root_tag=first, strict=True)
    assert err.value.reason == "root-tag-mismatch"


def test_a_generation_two_ahead_is_refused(vol: tuple[Path, str]) -> None:
    directory, first = vol
    with volume.open_volume(str(directory), h.KEY) as v:
        for n in range(2):
            v.write_bytes("a.txt", b"x" * n)
            v.sync()
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, first)
    assert err.value.reason == "root-tag-mismatch"


# --- missing pieces --------------------------------------------------------------------


def test_a_missing_file_is_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    os.unlink(h.slot0(directory, "d/c.bin"))
    _refused(directory, tag, path="d/c.bin", reason="file-missing")


def test_a_missing_second_slot_is_detected(vol: tuple[Path, str]) -> None:
    directory, _ = vol
    with volume.open_volume(str(directory), h.KEY) as v:
        with v.open("a.txt", "r+b") as f:
            f.write(b"overwrite block 0")  # block 0 now lives in slot 1
        tag = v.sync()
    slots = h.data_files(directory, "a.txt")
    assert len(slots) == 2
    os.unlink(slots[1])
    _refused(directory, tag, path="a.txt", reason="file-missing")


def test_a_missing_manifest_is_detected(vol: tuple[Path, str]) -> None:
    directory, tag = vol
    os.unlink(directory / _format.MANIFEST_NAME)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, tag)
    assert err.value.reason == "manifest-missing"


def test_a_manifest_from_another_volume_is_refused(vol: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = vol
    other, _ = h.make_volume(tmp_path / "other")  # same key, another volume id
    shutil.copy(other / _format.MANIFEST_NAME, directory / _format.MANIFEST_NAME)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, None)
    assert err.value.reason == "manifest-corrupt"


# --- confidentiality -------------------------------------------------------------------


def test_names_and_contents_never_reach_the_disk(vol: tuple[Path, str]) -> None:
    directory, _ = vol
    on_disk = b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())
    names = b"".join(p.name.encode() for p in directory.rglob("*"))
    for secret in (b"a.txt", b"b.txt", b"c.bin", b"a.txt:1:", b"d/c.bin:0:"):
        assert secret not in on_disk
        assert secret not in names


# --- the parser behind the MAC ----------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",  # nothing at all
        bytes(32) + b"\x00\x00\x00\x01",  # one entry announced, none present
        bytes(32) + b"\x00\x00\x00\x01" + b"\x01" + bytes(12) + b"\x00\x10" + b"short",
        bytes(32) + b"\x00\x00\x00\x01" + b"\x02" + bytes(12) + b"\x00\x04" + b"../x",
        bytes(32) + b"\x00\x00\x00\x01" + b"\x07" + bytes(12) + b"\x00\x01" + b"x",
        bytes(32) + b"\x00\x00\x00\x00" + b"trailing",
    ],
)
def test_a_manifest_that_authenticates_but_does_not_parse_is_refused(
    vol: tuple[Path, str], plaintext: bytes
) -> None:
    """Defense in depth behind the MAC: only a bug or a stolen key could get here."""
    directory, _ = vol
    header = _format.peek_header((directory / _format.HEADER_NAME).read_bytes())
    keys = _format.Keys.derive(h.KEY, header.volume_id)
    good = (directory / _format.MANIFEST_NAME).read_bytes()
    prefix = good[:30]
    nonce = prefix[-_format.NONCE_BYTES :]
    forged = prefix + keys.manifest.encrypt(nonce, plaintext, prefix + keys.volume_id)
    (directory / _format.MANIFEST_NAME).write_bytes(forged)
    with pytest.raises(errors.VolumeIntegrityError) as err:
        h.read_all(directory, None)
    assert err.value.reason == "manifest-malformed"
