"""Intel SGX DCAP ECDSA quotes (v3, v4, v5 with an SGX body) → verified ``Claims``.

The appraisal follows Intel's DCAP Quote Verification Library (``sgxAttestationVerifyQuote``)
and the PCS API v4 collateral rules; the shared mechanics are in ``_dcap``. The numbered
appraisal steps open ``SgxVerifier.verify``; the code labels each step ``# (n)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from cloister.attestation import _dcap, _dcap_steps, _dcap_tcb, _x509
from cloister.attestation._claims import Claims, Tee
from cloister.attestation.collateral import CollateralCache, CollateralSource

__all__ = ["SgxVerifier", "intel_root_pins"]


def intel_root_pins(extra_pem: Iterable[bytes] = ()) -> frozenset[str]:
    """SPKI SHA-256 pins: the shipped Intel SGX Root CA, plus any given PEM certificates."""
    pins = {
        _x509.spki_sha256(c) for c in _x509.load_pem_certs(_x509.root_pem("intel_sgx_root_ca.pem"))
    }
    for pem in extra_pem:
        pins.update(_x509.spki_sha256(c) for c in _x509.load_pem_certs(pem))
    return frozenset(pins)


class SgxVerifier:
    """Verifies SGX DCAP quotes against collateral from ``collateral``.

    ``intel_roots`` replaces the shipped Intel SGX Root CA (PEM certificates; their public keys
    become the pins). ``cache`` may be shared between verifiers; by default each verifier keeps
    its own, so a long-lived verifier is warm after its first quote per platform.
    """

    tee = Tee.SGX

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

        (1)  bounds, header: size limit, version 3/4/5 with TEE type SGX, ECDSA-256-with-P-256 key;
        (2)  layout: report body, signature data and certification data lengths are consistent;
        (3)  PCK chain: from the quote (certification data type 5) or the collateral source;
             ordered by issuer, each signature checked, ending in the Intel SGX Root CA whose
             public key is pinned (several issuances of that root exist);
        (4)  QE report signature under the PCK key;
        (5)  attestation-key binding: QE REPORTDATA = SHA-256(attestation key ‖ QE auth data) ‖ 0³²;
        (6)  quote signature over header ‖ body under the attestation key;
        (7)  PCK certificate, PCK CA and root validity windows at ``now``;
        (8)  collateral for the PCK certificate's FMSPC, PCE ID and PCK CA (cache, then source);
        (9)  TCB Info: issuer chain to the pinned root, signature over its exact bytes, id SGX,
             FMSPC and PCE ID equal to the PCK certificate's;
        (10) QE Identity: issuer chain, signature over its exact bytes, id QE;
        (11) TCB Info and QE Identity windows ``[issueDate, nextUpdate)`` and their signing
             certificates' windows at ``now``;
        (12) CRLs: root CA CRL signed by the root, PCK CRL signed by the PCK CA, both current at
             ``now``, revoking neither the PCK certificate nor the PCK CA;
        (13) the QE matches the QE Identity (MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES under
             their masks); its TCB level by ISVSVN;
        (14) the platform TCB level: the first level whose SGX components and PCESVN the PCK
             certificate's TCB meets;
        (15) TCB status: platform status merged with the QE's; ``Revoked`` is a rejection;
        (16) claims.
        """
        steps = self._steps
        _x509.require_aware(now)
        # (1) (2) bounds, header and layout
        quote = _dcap.parse_quote(evidence, tee=Tee.SGX)
        # (3)–(12) PCK chain, QE report, quote signature, collateral, windows, CRLs
        checked = steps.quote_and_collateral(quote, Tee.SGX, now)
        chain, qe, request = checked.chain, checked.qe, checked.request
        tcb, identity = checked.tcb, checked.identity
        # (13) QE Identity match and QE TCB level
        qe_status, qe_advisories = _dcap_tcb.match_qe_identity(qe, identity)
        # (14) platform TCB level
        level = _dcap_tcb.match_platform_level(tcb, chain.extension, None)
        # (15) TCB status
        status = _dcap_tcb.final_status([level.status, qe_status])
        # (16) claims
        report = _dcap.SgxReport.parse(quote.body)
        return Claims(
            tee=Tee.SGX,
            report_data=report.report_data,
            debug=report.debug,
            values={
                "mrenclave": report.mr_enclave.hex(),
                "mrsigner": report.mr_signer.hex(),
                "isvprodid": report.isv_prod_id,
                "isvsvn": report.isv_svn,
                "attributes": report.attributes.hex(),
                "miscselect": report.misc_select,
                "cpusvn": report.cpu_svn.hex(),
                "configsvn": report.config_svn,
                "configid": report.config_id.hex(),
                "isvextprodid": report.isv_ext_prod_id.hex(),
                "isvfamilyid": report.isv_family_id.hex(),
                "quote_version": quote.version,
                "fmspc": request.fmspc.lower(),
                "pce_id": request.pce_id.lower(),
                "qe_isvsvn": qe.isv_svn,
                "qe_tcb_status": qe_status,
            },
            tcb_status=status,
            advisory_ids=(*level.advisory_ids, *qe_advisories),
        )


def intel_root_pins_only(pems: Iterable[bytes]) -> frozenset[str]:
    pins = frozenset(_x509.spki_sha256(c) for pem in pems for c in _x509.load_pem_certs(pem))
    if not pins:
        raise ValueError("intel_roots names no certificate")
    return pins
