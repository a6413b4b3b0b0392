"""The CAS's stateless nonces: genuine, unexpired and unaltered, or refused before any work."""

from __future__ import annotations

import pytest

from cloister import errors, limits
from cloister.cas.nonces import KEY_BYTES, NonceKeys

NOW = 1_800_000_000.0


@pytest.fixture
def keys() -> NonceKeys:
    return NonceKeys(b"k" * KEY_BYTES)


def test_an_issued_nonce_checks_until_it_expires(keys: NonceKeys) -> None:
    nonce = keys.issue(NOW)
    assert len(bytes.fromhex(nonce.hex)) == limits.NONCE_BYTES
    assert nonce.expires_at == int(NOW + limits.NONCE_TTL_SECONDS)
    assert keys.check(nonce.hex, NOW + 1) == nonce
    assert keys.check(nonce.hex, nonce.expires_at - 0.5) == nonce
    with pytest.raises(errors.BindingError, match="expired") as expired:
        keys.check(nonce.hex, nonce.expires_at)
    assert expired.value.reason == "nonce-invalid"


def test_nonces_are_unpredictable(keys: NonceKeys) -> None:
    assert len({keys.issue(NOW).hex for _ in range(1000)}) == 1000


@pytest.mark.parametrize("byte", [0, 3, 4, 15, 16, 31])
def test_a_nonce_altered_anywhere_is_refused(keys: NonceKeys, byte: int) -> None:
    raw = bytearray(bytes.fromhex(keys.issue(NOW).hex))
    raw[byte] ^= 0x01
    with pytest.raises(errors.BindingError, match="not issued by this CAS"):
        keys.check(raw.hex(), NOW)


def test_another_cas_s_nonce_is_refused(keys: NonceKeys) -> None:
    other = NonceKeys(b"o" * KEY_BYTES).issue(NOW)
    with pytest.raises(errors.BindingError, match="not issued by this CAS"):
        keys.check(other.hex, NOW)


@pytest.mark.parametrize("text", ["", "ab", "zz" * 32, "ab" * 31, "ab" * 33])
def test_a_malformed_nonce_is_refused(keys: NonceKeys, text: str) -> None:
    with pytest.raises(errors.BindingError, match="malformed"):
        keys.check(text, NOW)


def test_a_nonce_that_expires_too_late_is_refused(keys: NonceKeys) -> None:
    """Only the key's holder could make one; a clock that jumped back must not extend it."""
    far = keys.issue(NOW + 3600)
    with pytest.raises(errors.BindingError, match="too late"):
        keys.check(far.hex, NOW)


def test_a_nonce_key_has_its_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NonceKeys(b"short")
