"""The chain's digests are a storage format: every database a CAS ever wrote is verified with
them at start. These vectors pin the framing (label, then each part as a 4-byte big-endian
length and its bytes; ints as decimal text, strings as UTF-8)."""

from __future__ import annotations

import hashlib

from cloister.store import _chain


def _by_hand(label: bytes, parts: list[bytes]) -> bytes:
    h = hashlib.sha256(label)
    for part in parts:
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def test_a_row_digest_is_the_framed_sha256_of_its_parts() -> None:
    got = _chain.row_digest("sessions", "k", [b"a", "x", 3])
    assert got.hex() == "a00c8c71b2043e457730d40d965d6dbd311b5a09141b13ce2df26485ee378405"
    assert got == _by_hand(b"cloister-row-v1", [b"sessions", b"k", b"a", b"x", b"3"])


def test_a_chain_link_is_the_framed_sha256_of_its_parts() -> None:
    got = _chain.link(5, b"p", "t", "k", b"d")
    assert got.hex() == "c7ccf9b0bbd043aa45bd935f405613599cb80ad6eec644770f7e8374c34f9c10"
    assert got == _by_hand(b"cloister-chain-v1", [b"5", b"p", b"t", b"k", b"d"])


def test_framing_keeps_parts_apart() -> None:
    assert _chain.row_digest("t", "k", ["ab", "c"]) != _chain.row_digest("t", "k", ["a", "bc"])
