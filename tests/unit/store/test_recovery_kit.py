"""The recovery kit: M-of-N shares sealed to recovery keys, re-sealed to the recovering CAS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from cloister.cas import recovery
from cloister.errors import AccessDenied
from cloister.store import Keyring


@pytest.fixture
def holders() -> list[x25519.X25519PrivateKey]:
    return [x25519.X25519PrivateKey.generate() for _ in range(3)]


def _kit(store_key: bytes, holders: list[x25519.X25519PrivateKey], m: int) -> dict[str, object]:
    return recovery.make_kit(
        store_key, [recovery.format_public(h.public_key()) for h in holders], m
    )


def test_two_of_three_holders_recover_the_key_without_seeing_it(
    holders: list[x25519.X25519PrivateKey], tmp_path: Path
) -> None:
    key = Keyring.new_key()
    kit = _kit(key, holders, 2)
    assert key.hex() not in json.dumps(kit)
    req = json.dumps(recovery.request(kit, tmp_path / "eph.key")).encode()
    shares = [json.dumps(recovery.reshare(req, h)).encode() for h in (holders[0], holders[2])]
    for s in shares:
        assert key.hex() not in s.decode()
    got, xs = recovery.combine(kit, shares, tmp_path / "eph.key")
    assert got == key and xs == [1, 3]


def test_one_share_is_not_enough_and_duplicates_do_not_count(
    holders: list[x25519.X25519PrivateKey], tmp_path: Path
) -> None:
    kit = _kit(Keyring.new_key(), holders, 2)
    req = json.dumps(recovery.request(kit, tmp_path / "eph.key")).encode()
    share = json.dumps(recovery.reshare(req, holders[1])).encode()
    with pytest.raises(AccessDenied, match="1 distinct share"):
        recovery.combine(kit, [share, share], tmp_path / "eph.key")


def test_a_stranger_holds_no_share(holders: list[x25519.X25519PrivateKey], tmp_path: Path) -> None:
    kit = _kit(Keyring.new_key(), holders, 2)
    req = json.dumps(recovery.request(kit, tmp_path / "eph.key")).encode()
    with pytest.raises(AccessDenied, match="no share"):
        recovery.reshare(req, x25519.X25519PrivateKey.generate())


def test_a_share_for_another_request_does_not_open(
    holders: list[x25519.X25519PrivateKey], tmp_path: Path
) -> None:
    kit = _kit(Keyring.new_key(), holders, 2)
    old = json.dumps(recovery.request(kit, tmp_path / "old.key")).encode()
    stale = json.dumps(recovery.reshare(old, holders[0])).encode()
    req = json.dumps(recovery.request(kit, tmp_path / "eph.key")).encode()
    fresh = json.dumps(recovery.reshare(req, holders[1])).encode()
    with pytest.raises(AccessDenied, match="another recovery request"):
        recovery.combine(kit, [stale, fresh], tmp_path / "eph.key")


def test_an_altered_share_is_refused(
    holders: list[x25519.X25519PrivateKey], tmp_path: Path
) -> None:
    kit = _kit(Keyring.new_key(), holders, 2)
    req = json.dumps(recovery.request(kit, tmp_path / "eph.key")).encode()
    docs = [recovery.reshare(req, h) for h in holders[:2]]
    sealed = bytearray(docs[1]["sealed"].encode())
    sealed[10] = ord("A") if sealed[10] != ord("A") else ord("B")
    docs[1]["sealed"] = sealed.decode()
    with pytest.raises(AccessDenied):
        recovery.combine(kit, [json.dumps(d).encode() for d in docs], tmp_path / "eph.key")


def test_kit_parameters_are_checked(holders: list[x25519.X25519PrivateKey]) -> None:
    pubs = [recovery.format_public(h.public_key()) for h in holders]
    with pytest.raises(ValueError):
        recovery.make_kit(Keyring.new_key(), pubs, 4)
    with pytest.raises(ValueError):
        recovery.make_kit(Keyring.new_key(), [pubs[0], pubs[0]], 1)
    with pytest.raises(ValueError):
        recovery.parse_public("ed25519:AAAA")
