"""dcap-qvl as an independent oracle: on every SGX and TDX vector, Cloister's verdict, TCB
status and advisories agree with it, or the test names why they may not."""

from __future__ import annotations

import dcap_qvl
import pytest
from attestation_vectors import Case, all_cases

from cloister.attestation import _dcap
from cloister.errors import EvidenceError

CASES = all_cases("sgx") + all_cases("tdx")


def _read(case: Case, name: str) -> bytes:
    path = case.collateral_dir / name
    return path.read_bytes() if path.exists() else b""


def _qvl(case: Case) -> tuple[str | None, list[str], str | None]:
    """(status, advisories, error message) from dcap-qvl on the same quote and collateral."""
    col = dcap_qvl.QuoteCollateralV3(
        _read(case, "pck_crl_issuer_chain.pem").decode(),
        _read(case, "root_ca_crl.der"),
        _read(case, "pck_crl.der"),
        _read(case, "tcb_info_issuer_chain.pem").decode(),
        _read(case, "tcb_info_body.json").decode(),
        bytes.fromhex(_read(case, "tcb_info_signature.hex").decode()),
        _read(case, "qe_identity_issuer_chain.pem").decode(),
        _read(case, "qe_identity_body.json").decode(),
        bytes.fromhex(_read(case, "qe_identity_signature.hex").decode()),
    )
    try:
        report = dcap_qvl.verify(case.evidence, col, int(case.now.timestamp()))
    except ValueError as exc:
        return None, [], str(exc)
    return report.status, list(report.advisory_ids), None


def _qvl_policy_refusal(case: Case, message: str) -> str | None:
    """Why dcap-qvl refuses evidence that DCAP itself accepts, when it is one of its fixed
    policies (it refuses debug enclaves/TDs and a non-zero MR_SERVICETD)."""
    tee = case.tee.value
    quote = _dcap.parse_quote(case.evidence, tee=case.tee)
    if tee == "tdx":
        report = _dcap.TdReport.parse(quote.body)
        if "MR service TD" in message and report.mr_service_td and any(report.mr_service_td):
            return "non-zero MR_SERVICETD"
        if "debug" in message.lower() and report.debug:
            return "debug TD"
    elif "debug" in message.lower() and _dcap.SgxReport.parse(quote.body).debug:
        return "debug enclave"
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cloister_agrees_with_dcap_qvl(case: Case) -> None:
    status, advisories, error = _qvl(case)
    try:
        claims = case.verifier().verify(case.evidence, now=case.now)
    except EvidenceError:
        # Both reject. (The reasons differ in wording; the vectors pin Cloister's reasons.)
        assert error is not None, f"dcap-qvl accepts ({status}) what Cloister rejects"
        return
    if error is not None:
        why = _qvl_policy_refusal(case, error)
        assert why is not None, f"dcap-qvl rejects what Cloister accepts: {error}"
        return
    assert claims.tcb_status == status
    assert set(claims.advisory_ids) == set(advisories)


def test_the_oracle_accepts_something() -> None:
    # Guard against an oracle that agrees only because it rejects everything.
    assert any(_qvl(c)[0] is not None for c in CASES)
