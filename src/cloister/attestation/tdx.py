"""Intel TDX quotes (v4 with a TD 1.0 body; v5 with a TD 1.0 or TD 1.5 body) → ``Claims``.

The appraisal follows Intel's DCAP Quote Verification Library for TDX (``tee_verify_quote``)
and the PCS API v4 TDX collateral; the shared mechanics are in ``_dcap``. The numbered
appraisal steps open ``TdxVerifier.verify``; the code labels each step ``# (n)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from cloister.attestation import _dcap, _dcap_collateral, _dcap_steps, _dcap_tcb, _x509
from cloister.attestation._claims import Claims, ClaimValue, Tee
from cloister.attestation.collateral import CollateralCache, CollateralSource
from cloister.attestation.sgx import intel_root_pins, intel_root_pins_only
from cloister.errors import CollateralError

__all__ = ["TdxVerifier"]


class TdxVerifier:
    """Verifies TDX quotes against collateral from ``collateral`` (see ``SgxVerifier``)."""

    tee = Tee.TDX

    def __init__(
        self,
        collateral: CollateralSource,
        *,
        cache: CollateralCache | None = None,
        intel_roots: Iterable[bytes] | None = None,
    ) -> None:
        pins = intel_root_pins() if intel_roots is None else intel_root_pins_only(intel_roots)
        self._steps = _dcap_steps.DcapSteps(collateral, cache or CollateralCache(), pins)

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        """Verify ``evidence`` at ``now``; raise an ``EvidenceError`` naming the failed step.

        (1)  bounds, header: size limit, version 4/5 with TEE type TDX (0x81), ECDSA P-256 key;
        (2)  layout: v5 body descriptor (type 2 = TD 1.0, 3 = TD 1.5) and size, signature data and
             certification data lengths (QE report certification data, then the PCK chain);
        (3)  PCK chain: ordered by issuer, each signature checked, ending in the pinned Intel SGX
             Root CA public key;
        (4)  QE report signature under the PCK key;
        (5)  attestation-key binding: QE REPORTDATA = SHA-256(attestation key ‖ QE auth data) ‖ 0³²;
        (6)  quote signature over header ‖ (descriptor ‖) body under the attestation key;
        (7)  PCK certificate, PCK CA and root validity windows at ``now``;
        (8)  collateral for the FMSPC, PCE ID and PCK CA (cache, then source);
        (9)  TCB Info: issuer chain to the pinned root, signature over its exact bytes, id TDX
             (version 3), FMSPC and PCE ID equal to the PCK certificate's;
        (10) QE Identity: issuer chain, signature, id TD_QE;
        (11) TCB Info and QE Identity windows ``[issueDate, nextUpdate)`` and their signing
             certificates' windows;
        (12) CRLs: root CA CRL and PCK CRL signed, current, revoking neither PCK nor PCK CA;
        (13) the TD QE matches its identity; its TCB level by ISVSVN;
        (14) the platform TCB level: SGX components and PCESVN from the PCK certificate, TDX
             components from TEE_TCB_SVN (bytes 0–1 skipped when a module identity applies);
        (15) the TDX module: MRSIGNER_SEAM and SEAM_ATTRIBUTES against ``tdxModule`` (TDX 1.0) or
             the identity ``TDX_<major>`` and its TCB level by module SVN (TDX 1.5+);
        (16) TD 1.5: the same evaluation (14)–(15) for TEE_TCB_SVN2, the TDX module running now;
             a TD launched under a module that is out of date on a platform that is no longer
             gets ``TDRelaunchAdvised`` (QVL ``TDRelaunchCheck``); advisories of both count;
        (17) TCB status: platform, QE and module statuses merged; ``Revoked`` is a rejection;
        (18) claims.
        """
        steps = self._steps
        _x509.require_aware(now)
        # (1) (2) bounds, header and layout
        quote = _dcap.parse_quote(evidence, tee=Tee.TDX)
        report = _dcap.TdReport.parse(quote.body)
        # (3)–(12) PCK chain, QE report, quote signature, collateral, windows, CRLs
        checked = steps.quote_and_collateral(quote, Tee.TDX, now)
        chain, qe, request = checked.chain, checked.qe, checked.request
        tcb, identity = checked.tcb, checked.identity
        # (13) TD QE identity match and its TCB level
        qe_status, qe_advisories = _dcap_tcb.match_qe_identity(qe, identity)
        # (14) platform TCB level, TDX components included
        level = _dcap_tcb.match_platform_level(tcb, chain.extension, report.tee_tcb_svn)
        # (15) TDX module identity
        module_status, module_advisories = _dcap_tcb.match_tdx_module(tcb, report)
        status = _dcap_tcb.merge([level.status, qe_status, module_status])
        advisories = (*level.advisory_ids, *qe_advisories, *module_advisories)
        # (16) TD 1.5: the module running now, and the relaunch advice
        current = _current_module(tcb, chain, report, qe_status)
        if current is not None:
            status = _dcap_tcb.check_for_relaunch(status, current[0])
            advisories = (*advisories, *current[1])
        # (17) TCB status
        status = _dcap_tcb.accepted_status(status)
        # (18) claims
        values: dict[str, ClaimValue] = {
            "mrtd": report.mr_td.hex(),
            "rtmr0": report.rtmrs[0].hex(),
            "rtmr1": report.rtmrs[1].hex(),
            "rtmr2": report.rtmrs[2].hex(),
            "rtmr3": report.rtmrs[3].hex(),
            "mrconfigid": report.mr_config_id.hex(),
            "mrowner": report.mr_owner.hex(),
            "mrownerconfig": report.mr_owner_config.hex(),
            "mrseam": report.mr_seam.hex(),
            "mrsignerseam": report.mr_signer_seam.hex(),
            "seam_attributes": report.seam_attributes.hex(),
            "td_attributes": report.td_attributes.hex(),
            "xfam": report.xfam.hex(),
            "tee_tcb_svn": report.tee_tcb_svn.hex(),
            "quote_version": quote.version,
            "td_body": "1.5" if report.mr_service_td is not None else "1.0",
            "fmspc": request.fmspc.lower(),
            "pce_id": request.pce_id.lower(),
            "qe_isvsvn": qe.isv_svn,
            "qe_tcb_status": qe_status,
        }
        if module_status is not None:
            values["tdx_module_tcb_status"] = module_status
        if report.mr_service_td is not None and report.tee_tcb_svn2 is not None:
            values["mrservicetd"] = report.mr_service_td.hex()
            values["tee_tcb_svn2"] = report.tee_tcb_svn2.hex()
        return Claims(
            tee=Tee.TDX,
            report_data=report.report_data,
            debug=report.debug,
            values=values,
            tcb_status=status,
            advisory_ids=advisories,
        )


def _current_module(
    tcb: _dcap_collateral.TcbInfo,
    chain: _dcap.PckChain,
    report: _dcap.TdReport,
    qe_status: str,
) -> tuple[str, tuple[str, ...]] | None:
    """Status and advisories for TEE_TCB_SVN2 (TD 1.5), or ``None`` when there is nothing to
    evaluate: a TD 1.0 body, an all-zero TEE_TCB_SVN2 (no TD-preserving update), the same
    value as TEE_TCB_SVN, or no level for it (the launch status then stands)."""
    svn2 = report.tee_tcb_svn2
    if svn2 is None or not any(svn2) or svn2 == report.tee_tcb_svn:
        return None
    try:
        level = _dcap_tcb.match_platform_level(tcb, chain.extension, svn2)
        module_status, module_advisories = _dcap_tcb.match_tdx_module(tcb, report, svn2)
    except CollateralError:
        return None
    status = _dcap_tcb.merge([level.status, qe_status, module_status])
    return status, (*level.advisory_ids, *module_advisories)
