"""The collateral cache: entries are used only inside their validity window, verified artifacts
are memoized by their exact bytes, and failures are never cached."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from attestation_vectors import Case, all_cases, make_verifier

from cloister.attestation import Tee, collateral
from cloister.errors import CollateralError, EvidenceError

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class _Counting:
    """A collateral source that counts how often it is asked."""

    def __init__(self, case: Case) -> None:
        self.inner = collateral.DirectorySource(case.collateral_dir)
        self.calls = 0

    def dcap_collateral(self, request: collateral.DcapRequest) -> collateral.DcapCollateral:
        self.calls += 1
        return self.inner.dcap_collateral(request)

    def pck_chain(self, request: collateral.PckRequest) -> bytes:
        return self.inner.pck_chain(request)

    def snp_collateral(self, request: collateral.SnpRequest) -> collateral.SnpCollateral:
        self.calls += 1
        return self.inner.snp_collateral(request)


def test_an_entry_is_used_only_inside_its_window() -> None:
    cache = collateral.CollateralCache()
    cache.put("k", "v", T0, T0 + timedelta(days=1))
    assert cache.get("k", T0 - timedelta(seconds=1)) is None
    cache.put("k", "v", T0, T0 + timedelta(days=1))
    assert cache.get("k", T0) == "v"
    assert cache.get("k", T0 + timedelta(hours=23)) == "v"
    assert cache.get("k", T0 + timedelta(days=1)) is None  # nextUpdate is exclusive
    assert cache.get("k", T0) is None  # and the stale entry is gone


def test_empty_windows_are_not_stored() -> None:
    cache = collateral.CollateralCache()
    cache.put("k", "v", T0, T0)
    assert cache.get("k", T0) is None


def test_the_cache_is_bounded() -> None:
    cache = collateral.CollateralCache(max_entries=2)
    for i in range(3):
        cache.put(i, i, T0, T0 + timedelta(days=1))
        cache.memo("m", bytes([i]), lambda i=i: i)
    assert cache.get(0, T0) is None and cache.get(2, T0) == 2
    with pytest.raises(ValueError):
        collateral.CollateralCache(max_entries=0)


def test_failures_are_not_memoized() -> None:
    cache = collateral.CollateralCache()

    def fail() -> int:
        raise CollateralError("no", reason="x")

    for _ in range(2):
        with pytest.raises(CollateralError):
            cache.memo("k", b"data", fail)
    assert cache.memo("k", b"data", lambda: 1) == 1
    assert cache.memo("k", b"data", lambda: 2) == 1


@pytest.mark.parametrize("case", [c for c in all_cases() if c.accept], ids=lambda c: c.name)
def test_a_warm_verification_asks_the_source_once_and_memoizes_signatures(case: Case) -> None:
    source = _Counting(case)
    cache = collateral.CollateralCache()
    verifier = make_verifier(case.tee, source, cache)
    first = verifier.verify(case.evidence, now=case.now)
    misses = cache.misses
    for _ in range(3):
        assert verifier.verify(case.evidence, now=case.now) == first
    assert source.calls == 1
    assert cache.misses == misses  # nothing re-verified but the evidence's own signature


@pytest.mark.parametrize(
    "case",
    [c for c in all_cases() if c.accept and c.tee in (Tee.SGX, Tee.TDX)],
    ids=lambda c: c.name,
)
def test_cached_collateral_does_not_outlive_its_window(case: Case) -> None:
    source = _Counting(case)
    verifier = make_verifier(case.tee, source, collateral.CollateralCache())
    verifier.verify(case.evidence, now=case.now)
    later = case.now + timedelta(days=400)
    with pytest.raises(EvidenceError) as info:
        verifier.verify(case.evidence, now=later)
    assert info.value.reason.endswith("expired")
    assert source.calls == 2  # the cache refused its stale entry and asked again
