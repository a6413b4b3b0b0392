"""SGX and TDX verification on a synthetic Intel PKI: the quote shapes, statuses and
revocations that no real vector has (see ``synthetic_dcap``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import synthetic_dcap as syn

from cloister.attestation import collateral, sgx, tdx
from cloister.errors import CollateralError, EvidenceError, MalformedEvidenceError

REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def pki() -> syn.Pki:
    return syn.Pki()


def _sgx(pki: syn.Pki, source: collateral.CollateralSource) -> sgx.SgxVerifier:
    return sgx.SgxVerifier(source, intel_roots=[pki.root_pem])


def _tdx(pki: syn.Pki, source: collateral.CollateralSource) -> tdx.TdxVerifier:
    return tdx.TdxVerifier(source, intel_roots=[pki.root_pem])


@pytest.mark.parametrize("version", [3, 4, 5])
def test_sgx_quote_versions(pki: syn.Pki, version: int) -> None:
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=version, tdx=False)
    claims = _sgx(pki, syn.StaticSource(syn.dcap_collateral(pki, False))).verify(q, now=syn.NOW)
    assert claims.report_data == REPORT_DATA
    assert claims.tcb_status == "UpToDate"
    assert claims.values["mrenclave"] == "aa" * 32
    assert (claims.values["isvprodid"], claims.values["isvsvn"]) == (3, 9)
    assert claims.values["quote_version"] == version


@pytest.mark.parametrize(("version", "td15", "major"), [(4, False, 0), (5, False, 0), (5, True, 1)])
def test_tdx_quote_versions_and_bodies(pki: syn.Pki, version: int, td15: bool, major: int) -> None:
    q = syn.quote(
        pki, syn.td_body(REPORT_DATA, td15=td15, module_major=major), version=version, tdx=True
    )
    claims = _tdx(pki, syn.StaticSource(syn.dcap_collateral(pki, True))).verify(q, now=syn.NOW)
    assert claims.report_data == REPORT_DATA
    assert claims.tcb_status == "UpToDate"
    assert claims.values["mrtd"] == "11" * 48
    assert claims.values["td_body"] == ("1.5" if td15 else "1.0")
    assert ("mrservicetd" in claims.values) is td15


def test_debug_is_reported_not_refused(pki: syn.Pki) -> None:
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA, debug=True), version=3, tdx=False)
    assert _sgx(pki, syn.StaticSource(syn.dcap_collateral(pki, False))).verify(q, now=syn.NOW).debug
    t = syn.quote(pki, syn.td_body(REPORT_DATA, td15=False, debug=True), version=4, tdx=True)
    assert _tdx(pki, syn.StaticSource(syn.dcap_collateral(pki, True))).verify(t, now=syn.NOW).debug


@pytest.mark.parametrize(
    ("status", "advisories"),
    [
        ("OutOfDate", ("INTEL-SA-00001",)),
        ("SWHardeningNeeded", ("INTEL-SA-00002", "INTEL-SA-00003")),
    ],
)
def test_status_and_advisories_come_from_the_level(
    pki: syn.Pki, status: str, advisories: tuple[str, ...]
) -> None:
    col = syn.dcap_collateral(
        pki, False, tcb=syn.tcb_info(False, status=status, advisories=advisories)
    )
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=4, tdx=False)
    claims = _sgx(pki, syn.StaticSource(col)).verify(q, now=syn.NOW)
    assert claims.tcb_status == status
    assert set(claims.advisory_ids) == set(advisories)


def test_a_revoked_tcb_level_is_refused(pki: syn.Pki) -> None:
    col = syn.dcap_collateral(pki, False, tcb=syn.tcb_info(False, status="Revoked"))
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=3, tdx=False)
    with pytest.raises(CollateralError) as info:
        _sgx(pki, syn.StaticSource(col)).verify(q, now=syn.NOW)
    assert info.value.reason == "tcb-revoked"


def test_a_revoked_pck_certificate_is_refused(pki: syn.Pki) -> None:
    col = syn.dcap_collateral(pki, False, revoked=(pki.pck.serial_number,))
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=3, tdx=False)
    with pytest.raises(CollateralError) as info:
        _sgx(pki, syn.StaticSource(col)).verify(q, now=syn.NOW)
    assert info.value.reason == "pck-revoked"


def test_a_platform_below_every_level_is_refused(pki: syn.Pki) -> None:
    col = syn.dcap_collateral(pki, True, tcb=syn.tcb_info(True, tdx_components=9))
    q = syn.quote(pki, syn.td_body(REPORT_DATA, td15=False), version=4, tdx=True)
    with pytest.raises(CollateralError) as info:
        _tdx(pki, syn.StaticSource(col)).verify(q, now=syn.NOW)
    assert info.value.reason == "no-matching-tcb-level"


def test_tcb_info_v2_verifies_sgx(pki: syn.Pki) -> None:
    col = syn.dcap_collateral(pki, False, tcb=syn.tcb_info(False, version=2, status="OutOfDate"))
    q = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=3, tdx=False)
    assert _sgx(pki, syn.StaticSource(col)).verify(q, now=syn.NOW).tcb_status == "OutOfDate"


def test_sgx_collateral_does_not_verify_tdx(pki: syn.Pki) -> None:
    q = syn.quote(pki, syn.td_body(REPORT_DATA, td15=False), version=4, tdx=True)
    with pytest.raises(CollateralError) as info:
        _tdx(pki, syn.StaticSource(syn.dcap_collateral(pki, False))).verify(q, now=syn.NOW)
    assert info.value.reason == "tcb-info-type-mismatch"


def test_a_quote_of_the_other_tee_is_refused(pki: syn.Pki) -> None:
    s = syn.quote(pki, syn.sgx_body(REPORT_DATA), version=4, tdx=False)
    t = syn.quote(pki, syn.td_body(REPORT_DATA, td15=False), version=4, tdx=True)
    with pytest.raises(MalformedEvidenceError):
        _tdx(pki, syn.StaticSource(syn.dcap_collateral(pki, True))).verify(s, now=syn.NOW)
    with pytest.raises(MalformedEvidenceError):
        _sgx(pki, syn.StaticSource(syn.dcap_collateral(pki, False))).verify(t, now=syn.NOW)


def test_certification_data_type_3_uses_a_supplied_pck_chain(pki: syn.Pki, tmp_path: Path) -> None:
    encrypted_ppid = bytes(384) + bytes(16) + bytes(2) + bytes(2)
    q = syn.quote(
        pki, syn.sgx_body(REPORT_DATA), version=3, tdx=False, cert_type=3, cert_data=encrypted_ppid
    )
    col = syn.dcap_collateral(pki, False)
    with_chain = syn.write_directory(tmp_path / "with", col, pki.pck_chain)
    claims = _sgx(pki, collateral.DirectorySource(with_chain)).verify(q, now=syn.NOW)
    assert claims.tcb_status == "UpToDate"
    without = syn.write_directory(tmp_path / "without", col)
    with pytest.raises(MalformedEvidenceError) as info:
        _sgx(pki, collateral.DirectorySource(without)).verify(q, now=syn.NOW)
    assert info.value.reason == "unsupported-cert-data"


@pytest.mark.parametrize(("version", "tdx_quote"), [(4, False), (5, False), (5, True)])
def test_every_signed_byte_of_synthetic_quotes_is_protected(
    pki: syn.Pki, version: int, tdx_quote: bool
) -> None:
    body = (
        syn.td_body(REPORT_DATA, td15=True, module_major=1)
        if tdx_quote
        else syn.sgx_body(REPORT_DATA)
    )
    q = syn.quote(pki, body, version=version, tdx=tdx_quote)
    verifier = (_tdx if tdx_quote else _sgx)(
        pki, syn.StaticSource(syn.dcap_collateral(pki, tdx_quote))
    )
    verifier.verify(q, now=syn.NOW)
    end = q.index(pki.pck_chain)
    for offset in range(end):
        mutated = bytearray(q)
        mutated[offset] ^= 0x01
        with pytest.raises(EvidenceError):
            verifier.verify(bytes(mutated), now=syn.NOW)
