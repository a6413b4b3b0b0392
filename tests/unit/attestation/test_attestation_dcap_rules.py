"""The DCAP rules one by one, on real parsed collateral varied with ``dataclasses.replace``:
TCB level selection, TDX module identities, QE identity, status convergence, windows, chains."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import pytest
from attestation_vectors import Case, case_named, first_accepted

from cloister.attestation import (
    Tee,
    _dcap,
    _dcap_collateral,
    _dcap_steps,
    _dcap_tcb,
    _x509,
    collateral,
    sgx,
    tdx,
)
from cloister.errors import CollateralError, EvidenceError, SignatureError

SGX = first_accepted("sgx")
TDX_V5 = case_named("tdx/automata-tdx-v5-alibaba-90c06f000000")
TDX_V4 = case_named("tdx/dcapqvl-tdx-v4-b0c06f000000")


@dataclasses.dataclass
class Parsed:
    quote: _dcap.Quote
    chain: _dcap.PckChain
    qe: _dcap.SgxReport
    tcb: _dcap_collateral.TcbInfo
    identity: _dcap_collateral.QeIdentity


def parsed(case: Case) -> Parsed:
    steps = _dcap_steps.DcapSteps(
        collateral.DirectorySource(case.collateral_dir),
        collateral.CollateralCache(),
        sgx.intel_root_pins(),
    )
    quote = _dcap.parse_quote(case.evidence, tee=case.tee)
    chain = steps.pck_chain(quote, case.tee)
    _, col, _ = steps.collateral(case.tee, chain, case.now)
    return Parsed(
        quote,
        chain,
        steps.qe_report(quote, chain),
        steps.tcb_info(col, case.tee, chain),
        steps.qe_identity(col, case.tee),
    )


# --- status convergence (QVL) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "other", "expected"),
    [
        ("UpToDate", None, "UpToDate"),
        ("UpToDate", "UpToDate", "UpToDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("OutOfDate", "OutOfDate", "OutOfDate"),
        ("UpToDate", "Revoked", "Revoked"),
    ],
)
def test_statuses_converge_as_the_qvl_does(platform: str, other: str | None, expected: str) -> None:
    assert _dcap_tcb.converge(platform, other) == expected


def test_revoked_is_a_rejection() -> None:
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.final_status(["Revoked"])
    assert info.value.reason == "tcb-revoked"
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.final_status(["UpToDate", "Revoked", None])
    assert info.value.reason == "tcb-revoked"
    with pytest.raises(CollateralError):
        _dcap_tcb.final_status(["NoSuchStatus"])
    assert _dcap_tcb.final_status(["OutOfDate", "UpToDate", None]) == "OutOfDate"


# --- platform TCB level -----------------------------------------------------------------------


def test_the_first_level_the_platform_meets_is_chosen() -> None:
    p = parsed(SGX)
    level = _dcap_tcb.match_platform_level(p.tcb, p.chain.extension, None)
    index = p.tcb.levels.index(level)
    # Every earlier level asks for more than the platform has.
    for earlier in p.tcb.levels[:index]:
        assert earlier.pce_svn > p.chain.extension.pce_svn or any(
            lv > have
            for lv, have in zip(
                earlier.sgx_components, p.chain.extension.tcb_components, strict=True
            )
        )


def test_a_revoked_platform_level_rejects_the_quote() -> None:
    p = parsed(SGX)
    level = _dcap_tcb.match_platform_level(p.tcb, p.chain.extension, None)
    revoked = dataclasses.replace(level, status="Revoked")
    tcb = dataclasses.replace(p.tcb, levels=(revoked,))
    chosen = _dcap_tcb.match_platform_level(tcb, p.chain.extension, None)
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.final_status([chosen.status, "UpToDate"])
    assert info.value.reason == "tcb-revoked"


def test_a_higher_pcesvn_requirement_does_not_match() -> None:
    p = parsed(SGX)
    level = _dcap_tcb.match_platform_level(p.tcb, p.chain.extension, None)
    too_high = dataclasses.replace(level, pce_svn=p.chain.extension.pce_svn + 1)
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.match_platform_level(
            dataclasses.replace(p.tcb, levels=(too_high,)), p.chain.extension, None
        )
    assert info.value.reason == "no-matching-tcb-level"


@pytest.mark.parametrize("case", [TDX_V4, TDX_V5], ids=lambda c: c.name)
def test_tdx_levels_need_tdx_components(case: Case) -> None:
    p = parsed(case)
    report = _dcap.TdReport.parse(p.quote.body)
    level = _dcap_tcb.match_platform_level(p.tcb, p.chain.extension, report.tee_tcb_svn)
    assert level.tdx_components is not None
    without = dataclasses.replace(level, tdx_components=None)
    with pytest.raises(CollateralError):
        _dcap_tcb.match_platform_level(
            dataclasses.replace(p.tcb, levels=(without,)), p.chain.extension, report.tee_tcb_svn
        )
    # Raise the requirement on a component that is always compared (index 2 onwards).
    demanding = list(level.tdx_components)
    demanding[2] = report.tee_tcb_svn[2] + 1
    raised = dataclasses.replace(level, tdx_components=tuple(demanding))
    with pytest.raises(CollateralError):
        _dcap_tcb.match_platform_level(
            dataclasses.replace(p.tcb, levels=(raised,)), p.chain.extension, report.tee_tcb_svn
        )


# --- TDX module identity -----------------------------------------------------------------------


def test_td15_module_identity_is_matched_by_major_version() -> None:
    p = parsed(TDX_V5)
    report = _dcap.TdReport.parse(p.quote.body)
    assert report.tee_tcb_svn[1] > 0
    status, _ = _dcap_tcb.match_tdx_module(p.tcb, report)
    assert status == "UpToDate"
    # Module SVN below every level of its identity: no match.
    old = dataclasses.replace(report, tee_tcb_svn=bytes([0]) + report.tee_tcb_svn[1:])
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.match_tdx_module(p.tcb, old)
    assert info.value.reason == "no-matching-tcb-level"
    # An identity that is not there.
    unknown = dataclasses.replace(
        report, tee_tcb_svn=report.tee_tcb_svn[:1] + b"\x7f" + report.tee_tcb_svn[2:]
    )
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.match_tdx_module(p.tcb, unknown)
    assert info.value.reason == "tdx-module-mismatch"
    # Another module signer.
    forged = dataclasses.replace(report, mr_signer_seam=b"\x01" * 48)
    with pytest.raises(CollateralError) as info:
        _dcap_tcb.match_tdx_module(p.tcb, forged)
    assert info.value.reason == "tdx-module-mismatch"


def test_td10_module_is_matched_against_tdx_module() -> None:
    p = parsed(TDX_V4)
    report = _dcap.TdReport.parse(p.quote.body)
    if report.tee_tcb_svn[1] == 0:
        assert _dcap_tcb.match_tdx_module(p.tcb, report) == (None, ())
    forced = dataclasses.replace(
        report, tee_tcb_svn=report.tee_tcb_svn[:1] + b"\x00" + report.tee_tcb_svn[2:]
    )
    assert _dcap_tcb.match_tdx_module(p.tcb, forced) == (None, ())
    forged = dataclasses.replace(forced, seam_attributes=b"\xff" * 8)
    with pytest.raises(CollateralError):
        _dcap_tcb.match_tdx_module(p.tcb, forged)


def test_an_outdated_module_makes_the_platform_outdated() -> None:
    p = parsed(TDX_V5)
    report = _dcap.TdReport.parse(p.quote.body)
    wanted = f"TDX_{report.tee_tcb_svn[1]:02X}"
    identities = tuple(
        dataclasses.replace(i, levels=((0, "OutOfDate", ("INTEL-SA-X",)),)) if i.id == wanted else i
        for i in p.tcb.tdx_module_identities
    )
    status, advisories = _dcap_tcb.match_tdx_module(
        dataclasses.replace(p.tcb, tdx_module_identities=identities), report
    )
    assert (status, advisories) == ("OutOfDate", ("INTEL-SA-X",))
    assert _dcap_tcb.final_status(["UpToDate", "UpToDate", status]) == "OutOfDate"


# --- QE identity --------------------------------------------------------------------------------


def test_qe_identity_fields_must_match() -> None:
    p = parsed(SGX)
    assert _dcap_tcb.match_qe_identity(p.qe, p.identity)[0] == "UpToDate"
    for change in (
        {"mrsigner": b"\x00" * 32},
        {"isvprodid": p.identity.isvprodid + 1},
        {"miscselect": p.identity.miscselect ^ 1, "miscselect_mask": 0xFFFFFFFF},
        {"attributes": bytes(16), "attributes_mask": b"\xff" * 16},
    ):
        with pytest.raises(CollateralError) as info:
            _dcap_tcb.match_qe_identity(p.qe, dataclasses.replace(p.identity, **change))
        assert info.value.reason == "qe-identity-mismatch"


def test_a_qe_below_every_level_is_revoked() -> None:
    p = parsed(SGX)
    identity = dataclasses.replace(p.identity, levels=((p.qe.isv_svn + 1, "UpToDate", ()),))
    assert _dcap_tcb.match_qe_identity(p.qe, identity) == ("Revoked", ())


# --- windows ------------------------------------------------------------------------------------


def test_collateral_windows_are_half_open_and_crls_closed() -> None:
    p = parsed(SGX)
    start = max(p.tcb.issue_date, p.identity.issue_date)
    _dcap_collateral.check_collateral_windows(p.tcb, p.identity, start)
    later = dataclasses.replace(p.identity, next_update=p.tcb.next_update + timedelta(days=9))
    with pytest.raises(CollateralError) as info:
        _dcap_collateral.check_collateral_windows(p.tcb, later, p.tcb.next_update)
    assert info.value.reason == "tcb-info-expired"  # nextUpdate itself is outside

    end = p.tcb.next_update
    crl = _dcap_collateral.Crl(crl=None, this_update=p.tcb.issue_date, next_update=end)  # type: ignore[arg-type]
    _dcap_collateral.check_crl(crl, end, name="pck", serial=1)  # nextUpdate itself is inside
    with pytest.raises(CollateralError) as info:
        _dcap_collateral.check_crl(crl, end + timedelta(seconds=1), name="pck", serial=1)
    assert info.value.reason == "pck-crl-expired"
    revoking = dataclasses.replace(crl, revoked=frozenset({7}))
    with pytest.raises(CollateralError) as info:
        _dcap_collateral.check_crl(revoking, p.tcb.issue_date, name="pck", serial=7)
    assert info.value.reason == "pck-revoked"


# --- chains -------------------------------------------------------------------------------------


def test_pck_chain_order_does_not_matter_but_completeness_does() -> None:
    p = parsed(SGX)
    certs = [p.chain.root, p.chain.leaf, p.chain.ca]
    assert _x509.order_chain(certs) == [p.chain.leaf, p.chain.ca, p.chain.root]
    for broken in (
        [p.chain.leaf, p.chain.root],
        [p.chain.leaf, p.chain.ca],
        [p.chain.leaf, p.chain.leaf, p.chain.ca, p.chain.root],
        [],
    ):
        with pytest.raises(ValueError):
            _x509.order_chain(broken)


def test_a_root_that_is_not_pinned_is_refused() -> None:
    with pytest.raises(SignatureError) as info:
        _dcap.build_pck_chain(parsed(SGX).quote.cert_data, _dcap.Anchors(frozenset({"00" * 32})))
    assert info.value.reason == "pck-chain"


def test_tcb_info_v2_is_read_as_sgx() -> None:
    v3 = json.loads((SGX.collateral_dir / "tcb_info_body.json").read_bytes())
    levels = []
    for level in v3["tcbLevels"]:
        tcb = {
            f"sgxtcbcomp{i + 1:02d}svn": c["svn"]
            for i, c in enumerate(level["tcb"]["sgxtcbcomponents"])
        }
        tcb["pcesvn"] = level["tcb"]["pcesvn"]
        levels.append({"tcb": tcb, "tcbDate": level["tcbDate"], "tcbStatus": level["tcbStatus"]})
    v2 = {
        k: v3[k] for k in ("issueDate", "nextUpdate", "fmspc", "pceId", "tcbEvaluationDataNumber")
    }
    v2.update(version=2, tcbType=0, tcbLevels=levels)
    info = _dcap_collateral.parse_tcb_info(json.dumps(v2).encode(), ())
    assert info.id == "SGX" and info.version == 2
    assert [lv.sgx_components for lv in info.levels] == [
        tuple(c["svn"] for c in lv["tcb"]["sgxtcbcomponents"]) for lv in v3["tcbLevels"]
    ]


def test_every_reason_is_an_evidence_error() -> None:
    # The vocabulary the CAS and the CLI report: each refusal carries a kebab-case reason.
    for case in (SGX, TDX_V4, TDX_V5):
        verifier = case.verifier()
        with pytest.raises(EvidenceError) as info:
            verifier.verify(case.evidence, now=case.now + timedelta(days=3650))
        assert info.value.reason == info.value.reason.lower() and " " not in info.value.reason
    assert Tee.SGX.value == "sgx"


def test_collateral_must_be_signed_by_the_tcb_signing_certificate() -> None:
    p = parsed(SGX)
    pem = b"".join(
        c.public_bytes(_x509.serialization.Encoding.PEM)
        for c in (p.chain.leaf, p.chain.ca, p.chain.root)
    )
    with pytest.raises(SignatureError) as info:
        _dcap_collateral.verify_signing_chain(
            pem, _dcap.Anchors(sgx.intel_root_pins()), reason="tcb-info-signature"
        )
    assert info.value.reason == "tcb-info-signature"


def test_a_shared_cache_does_not_leak_trust_between_pins() -> None:
    cache = collateral.CollateralCache()
    source = collateral.DirectorySource(SGX.collateral_dir)
    sgx.SgxVerifier(source, cache=cache).verify(SGX.evidence, now=SGX.now)
    other_root = (TDX_V5.collateral_dir / "tcb_info_issuer_chain.pem").read_bytes()
    other = _x509.load_pem_certs(other_root)[0]  # the TCB signing certificate: not a root
    stranger = sgx.SgxVerifier(
        source, cache=cache, intel_roots=[other.public_bytes(_x509.serialization.Encoding.PEM)]
    )
    with pytest.raises(SignatureError) as info:
        stranger.verify(SGX.evidence, now=SGX.now)
    assert info.value.reason == "pck-chain"


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError):
        SGX.verifier().verify(SGX.evidence, now=SGX.now.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("launch", "current", "expected"),
    [
        ("OutOfDate", "UpToDate", "TDRelaunchAdvised"),
        ("OutOfDate", "SWHardeningNeeded", "TDRelaunchAdvised"),
        ("OutOfDate", "ConfigurationNeeded", "TDRelaunchAdvisedConfigurationNeeded"),
        ("OutOfDateConfigurationNeeded", "UpToDate", "TDRelaunchAdvisedConfigurationNeeded"),
        ("OutOfDate", "OutOfDate", "OutOfDate"),
        ("UpToDate", "UpToDate", "UpToDate"),
        ("Revoked", "UpToDate", "Revoked"),
    ],
)
def test_relaunch_advice(launch: str, current: str, expected: str) -> None:
    assert _dcap_tcb.check_for_relaunch(launch, current) == expected


def test_a_td_launched_under_an_outdated_module_is_advised_to_relaunch() -> None:
    p = parsed(TDX_V5)
    report = _dcap.TdReport.parse(p.quote.body)
    assert report.tee_tcb_svn2 is not None
    # TDX_01 in this TCB Info: module SVN 4 is UpToDate, 2 is OutOfDate.
    launched = dataclasses.replace(report, tee_tcb_svn=bytes([2]) + report.tee_tcb_svn[1:])
    launch, _ = _dcap_tcb.match_tdx_module(p.tcb, launched)
    assert launch == "OutOfDate"
    current = tdx._current_module(p.tcb, p.chain, launched, "UpToDate")
    assert current is not None and current[0] == "UpToDate"
    merged = _dcap_tcb.merge(["UpToDate", "UpToDate", launch])
    assert _dcap_tcb.check_for_relaunch(merged, current[0]) == "TDRelaunchAdvised"
    # No TD-preserving update (TEE_TCB_SVN2 equal or zero): nothing to re-evaluate.
    assert tdx._current_module(p.tcb, p.chain, report, "UpToDate") is None
    zero = dataclasses.replace(launched, tee_tcb_svn2=bytes(16))
    assert tdx._current_module(p.tcb, p.chain, zero, "UpToDate") is None
