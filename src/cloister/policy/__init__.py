"""Claims × a service's rules → ``Appraisal``. Never parses bytes.

A service's ``attestation`` list compiles to ``AnyOf(AllOf(rule, ...), ...)``: the evidence is
accepted when every rule of at least one alternative holds. Around the measurement rules sit
the platform rules that the session's ``security.attestation`` relaxes by name only:

(1) the TEE kind matches the alternative (simulation only where the session tolerates it);
(2) the measurement constraints of the alternative hold;
(3) a debug enclave / TD / guest passes only with ``debug-mode`` tolerated;
(4) the TCB status passes: ``UpToDate``, or a weaker status whose every component is tolerated
    by name (``Revoked`` never); advisories of a non-UpToDate TCB must each be ignored by ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cloister.attestation import Claims, Tee
from cloister.errors import AppraisalError
from cloister.policy._rules import AllOf, AnyOf, Rule, compile_alternative
from cloister.session import Service
from cloister.session._models import AttestationSecurity

__all__ = ["AllOf", "AnyOf", "Appraisal", "Rule", "appraise", "explain", "tcb_status_allowed"]

log = logging.getLogger(__name__)

# The tolerations each component of Intel's TCB status needs (DCAP QVL status names).
_TCB_NEEDS: dict[str, frozenset[str]] = {
    "UpToDate": frozenset(),
    "SWHardeningNeeded": frozenset({"software-hardening-needed"}),
    "ConfigurationNeeded": frozenset({"configuration-needed"}),
    "ConfigurationAndSWHardeningNeeded": frozenset(
        {"configuration-needed", "software-hardening-needed"}
    ),
    "OutOfDate": frozenset({"outdated-tcb"}),
    "OutOfDateConfigurationNeeded": frozenset({"outdated-tcb", "configuration-needed"}),
    # TD 1.5: the TDX module was updated underneath a running TD; only a relaunch brings the
    # TD to the new TCB, so until then it runs on an older one (Intel QVL's relaunch check).
    "TDRelaunchAdvised": frozenset({"outdated-tcb"}),
    "TDRelaunchAdvisedConfigurationNeeded": frozenset({"outdated-tcb", "configuration-needed"}),
}


@dataclass(frozen=True)
class Appraisal:
    """The evidence of ``service`` is acceptable; ``alternative`` is the index that matched."""

    service: str
    tee: Tee
    alternative: int
    tolerated: tuple[str, ...]


def tcb_status_allowed(status: str, tolerate: frozenset[str]) -> str | None:
    """``None`` when ``status`` passes under ``tolerate``, else the reason it does not."""
    if status == "Revoked":
        return "tcb-revoked"
    needs = _TCB_NEEDS.get(status)
    if needs is None:
        return "tcb-status-unknown"
    missing = needs - tolerate
    return f"tcb-not-tolerated:{','.join(sorted(missing))}" if missing else None


def appraise(claims: Claims, service: Service, security: AttestationSecurity) -> Appraisal:
    """Accept ``claims`` for ``service`` or raise ``AppraisalError`` saying why not."""
    tolerate = frozenset(security.tolerate)
    # (1) simulation only where tolerated by name
    if claims.simulated:
        if "simulation" not in tolerate:
            raise AppraisalError(
                "simulation evidence, and the session does not tolerate simulation",
                reason="simulation-not-tolerated",
            )
        log.warning("SIMULATION: service %s accepted simulated evidence", service.name)
    # (2) measurement rules: any alternative whose rules all hold
    rules = AnyOf(tuple(compile_alternative(alt) for alt in service.attestation))
    index = rules.first_match(claims)
    if index is None:
        raise AppraisalError(
            f"the evidence matches none of service {service.name!r}'s attestation alternatives",
            reason="measurement-mismatch",
        )
    # (3) debug
    used: list[str] = ["simulation"] if claims.simulated else []
    if claims.debug:
        if "debug-mode" not in tolerate:
            raise AppraisalError("the workload runs in debug mode", reason="debug-not-tolerated")
        used.append("debug-mode")
    # (4) TCB status and advisories
    if claims.tcb_status is not None:
        why = tcb_status_allowed(claims.tcb_status, tolerate)
        if why is not None:
            raise AppraisalError(f"TCB status {claims.tcb_status} is not accepted", reason=why)
        if claims.tcb_status != "UpToDate":
            used.extend(sorted(_TCB_NEEDS[claims.tcb_status]))
            ignored = set(security.ignore_advisories)
            open_advisories = [a for a in claims.advisory_ids if a not in ignored]
            if open_advisories and "*" not in ignored:
                raise AppraisalError(
                    f"advisories not ignored by the session: {', '.join(open_advisories)}",
                    reason="advisory-not-ignored",
                )
    return Appraisal(service.name, claims.tee, index, tuple(used))


def explain(claims: Claims, service: Service, security: AttestationSecurity) -> list[str]:
    """Why ``claims`` would be refused for ``service``, one line per reason; empty if accepted.

    For the owner's eyes only (``cloister session explain``): it names expected and actual
    measurements, which an unauthenticated caller of the CAS is never told.
    """
    try:
        appraise(claims, service, security)
    except AppraisalError as exc:
        lines = [f"refused: {exc.message} [{exc.reason}]"]
        if exc.reason == "measurement-mismatch":
            for i, alt in enumerate(service.attestation):
                why = compile_alternative(alt).why_not(claims)
                lines.append(f"  attestation[{i}] ({alt.tee}): {why}")
        return lines
    return []
