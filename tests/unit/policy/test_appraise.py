"""Appraisal of claims against a service's rules: deny by default, relax only by name."""

from __future__ import annotations

import pytest

from cloister import policy
from cloister.attestation import Claims, Tee
from cloister.errors import AppraisalError
from cloister.session import Session

M = "11" * 32
SIGNER = "22" * 32


def _session(tolerate: str = "[]", ignore: str = "[]", extra_alt: str = "") -> Session:
    return Session.from_yaml(
        f"""
name: p
version: "0.3"
security: {{attestation: {{tolerate: {tolerate}, ignore_advisories: {ignore}}}}}
services:
  - name: s
    attestation:
      - mrenclave: ["{M}"]
      - mrsigner: "{SIGNER}"
        isvprodid: 7
        isvsvn: 3
{extra_alt}
"""
    )


def _sgx(**values: object) -> Claims:
    tcb = values.pop("tcb_status", "UpToDate")
    adv = values.pop("advisory_ids", ())
    debug = bool(values.pop("debug", False))
    base: dict[str, object] = {
        "mrenclave": "00" * 32,
        "mrsigner": "00" * 32,
        "isvprodid": 0,
        "isvsvn": 0,
    }
    base.update(values)
    return Claims(Tee.SGX, b"\0" * 64, debug, base, tcb, tuple(adv))  # type: ignore[arg-type]


def _appraise(session: Session, claims: Claims) -> policy.Appraisal:
    svc = session.service("s")
    assert svc is not None
    return policy.appraise(claims, svc, session.document.security.attestation)


def test_mrenclave_alternative_accepts() -> None:
    assert _appraise(_session(), _sgx(mrenclave=M)).alternative == 0


def test_mrsigner_alternative_needs_product_and_svn_floor() -> None:
    s = _session()
    assert _appraise(s, _sgx(mrsigner=SIGNER, isvprodid=7, isvsvn=3)).alternative == 1
    assert _appraise(s, _sgx(mrsigner=SIGNER, isvprodid=7, isvsvn=9)).alternative == 1
    for bad in (
        _sgx(mrsigner=SIGNER, isvprodid=7, isvsvn=2),
        _sgx(mrsigner=SIGNER, isvprodid=8, isvsvn=3),
    ):
        with pytest.raises(AppraisalError, match="matches none"):
            _appraise(s, bad)


def test_debug_needs_debug_mode_tolerated() -> None:
    with pytest.raises(AppraisalError) as err:
        _appraise(_session(), _sgx(mrenclave=M, debug=True))
    assert err.value.reason == "debug-not-tolerated"
    assert _appraise(_session("[debug-mode]"), _sgx(mrenclave=M, debug=True)).tolerated == (
        "debug-mode",
    )


@pytest.mark.parametrize(
    ("status", "tolerate", "ok"),
    [
        ("SWHardeningNeeded", "[]", False),
        ("SWHardeningNeeded", "[software-hardening-needed]", True),
        ("ConfigurationAndSWHardeningNeeded", "[software-hardening-needed]", False),
        (
            "ConfigurationAndSWHardeningNeeded",
            "[software-hardening-needed, configuration-needed]",
            True,
        ),
        ("OutOfDate", "[]", False),
        ("OutOfDate", "[outdated-tcb]", True),
        ("Revoked", "[outdated-tcb, software-hardening-needed, configuration-needed]", False),
        ("TDRelaunchAdvised", "[]", False),
        ("TDRelaunchAdvised", "[outdated-tcb]", True),
        ("TDRelaunchAdvisedConfigurationNeeded", "[outdated-tcb]", False),
        ("SomethingNew", "[outdated-tcb]", False),
    ],
)
def test_tcb_status_passes_only_when_each_component_is_tolerated(
    status: str, tolerate: str, ok: bool
) -> None:
    claims = _sgx(mrenclave=M, tcb_status=status, advisory_ids=["INTEL-SA-00001"])
    session = _session(tolerate, '["INTEL-SA-00001"]')
    if ok:
        _appraise(session, claims)
    else:
        with pytest.raises(AppraisalError):
            _appraise(session, claims)


def test_advisories_of_a_weak_tcb_must_be_ignored_by_id() -> None:
    claims = _sgx(
        mrenclave=M,
        tcb_status="SWHardeningNeeded",
        advisory_ids=["INTEL-SA-00615", "INTEL-SA-00289"],
    )
    with pytest.raises(AppraisalError) as err:
        _appraise(_session("[software-hardening-needed]", '["INTEL-SA-00615"]'), claims)
    assert err.value.reason == "advisory-not-ignored" and "INTEL-SA-00289" in err.value.message
    _appraise(
        _session("[software-hardening-needed]", '["INTEL-SA-00615", "INTEL-SA-00289"]'), claims
    )


def test_simulation_is_refused_unless_tolerated() -> None:
    sim = Claims(Tee.SIMULATION, b"\0" * 64, False, {"measurement": M})
    with pytest.raises(AppraisalError) as err:
        _appraise(_session(), sim)
    assert err.value.reason == "simulation-not-tolerated"
    s = _session("[simulation]", extra_alt=f"      - {{tee: simulation, measurement: '{M}'}}")
    assert _appraise(s, sim).tolerated == ("simulation",)


def test_evidence_of_another_tee_never_matches_an_sgx_rule() -> None:
    tdx = Claims(Tee.TDX, b"\0" * 64, False, {"mrenclave": M, "mrtd": M})
    with pytest.raises(AppraisalError):
        _appraise(_session(), tdx)


def test_empty_rule_sets_refuse_to_exist() -> None:
    with pytest.raises(ValueError):
        policy.AllOf(())
    with pytest.raises(ValueError):
        policy.AnyOf(())
