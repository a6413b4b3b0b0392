"""The signed state head outside the database: two slots, written in place, newest wins."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cloister.errors import RollbackError
from cloister.store import Head, HeadFile, Keyring
from cloister.store._chain import SLOT_BYTES, ChainKeys


@pytest.fixture
def keys() -> ChainKeys:
    return ChainKeys([Keyring.new_key()])


def head(seq: int) -> Head:
    return Head(seq, bytes([seq % 256]) * 32)


def test_writes_alternate_slots_and_the_newest_is_read(tmp_path: Path, keys: ChainKeys) -> None:
    path = tmp_path / "state-head"
    for seq in (1, 2, 3):
        HeadFile(path).write(head(seq), keys)
    raw = path.read_bytes()
    assert len(raw) == 2 * SLOT_BYTES
    seqs = sorted(json.loads(raw[i : i + SLOT_BYTES])["seq"] for i in (0, SLOT_BYTES))
    assert seqs == [2, 3]  # the previous head survives beside the newest
    assert HeadFile(path).read(keys) == head(3)
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_older_head_never_replaces_a_newer_one(tmp_path: Path, keys: ChainKeys) -> None:
    """Two processes on one data directory: one that lags behind writes nothing."""
    path = tmp_path / "state-head"
    ahead, behind = HeadFile(path), HeadFile(path)
    ahead.write(head(5), keys)
    ahead.write(head(6), keys)
    behind.write(head(4), keys)
    behind.write(head(2), keys)
    assert HeadFile(path).read(keys) == head(6)


def test_a_torn_slot_leaves_the_previous_head(
    tmp_path: Path, keys: ChainKeys, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state-head"
    HeadFile(path).write(head(1), keys)
    HeadFile(path).write(head(2), keys)  # slot 1
    with open(path, "r+b") as f:  # a crash halfway through writing slot 1
        f.seek(SLOT_BYTES + 20)
        f.write(b"\x00" * 40)
    with caplog.at_level(logging.WARNING):
        assert HeadFile(path).read(keys) == head(1)
    assert "slot 1 is unreadable" in caplog.text


def test_a_head_no_slot_of_which_verifies_is_refused(tmp_path: Path, keys: ChainKeys) -> None:
    path = tmp_path / "state-head"
    HeadFile(path).write(head(1), ChainKeys([Keyring.new_key()]))
    with pytest.raises(RollbackError, match="not signed by this CAS"):
        HeadFile(path).read(keys)
    path.write_bytes(b"{not json" + b" " * 300)
    with pytest.raises(RollbackError, match="unreadable"):
        HeadFile(path).read(keys)
    path.write_bytes(b" " * 5000)
    with pytest.raises(RollbackError, match="unreadable"):
        HeadFile(path).read(keys)


def test_a_head_file_of_one_document_still_reads(tmp_path: Path, keys: ChainKeys) -> None:
    """The format of earlier versions: a single JSON document. The next write keeps it."""
    path = tmp_path / "state-head"
    legacy = HeadFile(path)
    legacy.write(head(7), keys)
    doc = path.read_bytes()[:SLOT_BYTES].rstrip()
    path.write_bytes(doc)
    assert HeadFile(path).read(keys) == head(7)
    HeadFile(path).write(head(8), keys)
    assert HeadFile(path).read(keys) == head(8)
    path.write_bytes(doc)
    HeadFile(path).write(head(9), keys)  # into slot 1, past the short first document
    assert HeadFile(path).read(keys) == head(9)


def test_an_empty_head_file_is_no_head(tmp_path: Path, keys: ChainKeys) -> None:
    path = tmp_path / "state-head"
    assert HeadFile(path).read(keys) is None
    path.write_bytes(b"")
    assert HeadFile(path).read(keys) is None
