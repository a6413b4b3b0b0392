"""Every hardware vector gives its expected verdict, reason and claims, cold and warm."""

from __future__ import annotations

import pytest
from attestation_vectors import TESTDATA, Case, all_cases, reason_class, same_reason

from cloister import attestation
from cloister.attestation import Tee, collateral
from cloister.errors import EvidenceError

CASES = all_cases()


def test_the_vectors_are_there() -> None:
    # A missing checkout of ../shared must fail loudly, not collect zero cases.
    assert TESTDATA.is_dir(), f"test vectors not found at {TESTDATA} (set CLOISTER_TESTDATA)"
    assert {c.tee for c in CASES} == {Tee.SGX, Tee.TDX, Tee.SNP}
    assert any(c.accept for c in CASES) and any(not c.accept for c in CASES)


def _check(case: Case, verify: object) -> None:
    assert callable(verify)
    if case.accept:
        claims = verify(case.evidence, now=case.now)
        assert claims.tee is case.tee
        assert claims.tcb_status == case.spec["tcb_status"]
        assert set(claims.advisory_ids) == set(case.spec["advisory_ids"])
        out = claims.to_json()
        for name, value in case.spec["claims"].items():
            assert out[name] == value, name
        assert claims.debug is case.spec["claims"]["debug"]
        return
    with pytest.raises(EvidenceError) as info:
        verify(case.evidence, now=case.now)
    expected = case.spec["reject_reason"]
    assert same_reason(case, info.value.reason), (expected, info.value.reason, info.value.message)
    if info.value.reason == expected:
        assert isinstance(info.value, reason_class(expected)), type(info.value)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vector_cold(case: Case) -> None:
    _check(case, case.verifier().verify)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vector_warm_gives_the_same_outcome(case: Case) -> None:
    cache = collateral.CollateralCache()
    verifier = case.verifier(cache)
    for _ in range(3):
        _check(case, verifier.verify)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vector_through_the_registry(case: Case) -> None:
    verifier = attestation.verifier_for(
        case.tee, collateral=collateral.DirectorySource(case.collateral_dir)
    )
    assert verifier.tee is case.tee
    _check(case, verifier.verify)


def test_a_warm_cache_is_shared_across_tees_without_mixing_them() -> None:
    cache = collateral.CollateralCache()
    for case in CASES:
        _check(case, case.verifier(cache).verify)
    for case in reversed(CASES):
        _check(case, case.verifier(cache).verify)
