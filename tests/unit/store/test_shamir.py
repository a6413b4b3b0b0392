"""Shamir sharing over GF(256): the field's arithmetic, then splitting and combining."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.store import shamir


def _slow_mul(a: int, b: int) -> int:
    """Carry-less multiplication reduced by x^8 + x^4 + x^3 + x + 1, bit by bit (the reference)."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return out


def test_multiplication_matches_the_bitwise_definition_everywhere() -> None:
    for a, b in itertools.product(range(256), repeat=2):
        assert shamir.mul(a, b) == _slow_mul(a, b)


def test_known_products_from_fips_197() -> None:
    # FIPS-197 §4.2: {57} • {83} = {c1}, and {57} • {13} = {fe}.
    assert shamir.mul(0x57, 0x83) == 0xC1
    assert shamir.mul(0x57, 0x13) == 0xFE


def test_every_nonzero_element_has_an_inverse() -> None:
    for a in range(1, 256):
        assert shamir.mul(a, shamir.inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        shamir.inv(0)


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5)])
def test_any_threshold_of_shares_recovers_the_secret(m: int, n: int) -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, m, n)
    assert [x for x, _ in shares] == list(range(1, n + 1))
    for subset in itertools.combinations(shares, m):
        assert shamir.combine(list(subset)) == secret


def test_fewer_shares_give_a_wrong_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine(shares[:2]) != secret


def test_one_share_below_the_threshold_is_uniform() -> None:
    # With threshold 2, a single share of a fixed byte takes every value across splits:
    # it carries no information about the secret.
    seen = {shamir.split(b"\x2a", 2, 2)[0][1][0] for _ in range(4000)}
    assert len(seen) > 250


def test_malformed_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        shamir.split(b"k", 3, 2)
    with pytest.raises(ValueError):
        shamir.split(b"", 1, 1)
    with pytest.raises(ValueError):
        shamir.combine([(1, b"a"), (1, b"b")])
    with pytest.raises(ValueError):
        shamir.combine([(1, b"a"), (2, b"bc")])
    with pytest.raises(ValueError):
        shamir.combine([])


@settings(max_examples=50, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), m=st.integers(1, 6), extra=st.integers(0, 4))
def test_split_then_combine_round_trips(secret: bytes, m: int, extra: int) -> None:
    shares = shamir.split(secret, m, m + extra)
    assert shamir.combine(shares[extra:]) == secret
