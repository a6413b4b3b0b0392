"""The DCAP steps bound to pinned roots, a collateral source and a cache.

``sgx.py`` and ``tdx.py`` call these in the order their docstrings number. Everything that
does not depend on time is memoized in the ``CollateralCache`` by the exact bytes it was
computed from; every window is checked against ``now`` on every call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509

from cloister.attestation._claims import Tee
from cloister.attestation._dcap import (
    Anchors,
    PckChain,
    Quote,
    SgxReport,
    build_pck_chain,
    check_pck_windows,
    pck_chain_pem,
    verify_attestation_key_binding,
    verify_qe_report,
    verify_quote_signature,
)
from cloister.attestation._dcap_collateral import (
    Crl,
    QeIdentity,
    TcbInfo,
    check_collateral_windows,
    check_crl,
    check_signing_chain_windows,
    load_crl,
    parse_qe_identity,
    parse_tcb_info,
    verify_signed_json,
    verify_signing_chain,
)
from cloister.attestation._x509 import framed
from cloister.attestation.collateral import (
    CollateralCache,
    CollateralSource,
    DcapCollateral,
    DcapRequest,
)
from cloister.errors import CollateralError

T = TypeVar("T")


@dataclass(frozen=True)
class Checked:
    """What steps (3)–(12) established about a quote: a chain to the pinned root, a genuine
    QE report and quote signature, and collateral that verified and is valid now."""

    chain: PckChain
    qe: SgxReport
    request: DcapRequest
    tcb: TcbInfo
    identity: QeIdentity


class DcapSteps:
    """The DCAP steps, bound to pinned roots, a collateral source and a cache.

    ``sgx.py`` and ``tdx.py`` call these in the order their docstrings number.
    """

    def __init__(
        self, source: CollateralSource, cache: CollateralCache, pins: frozenset[str]
    ) -> None:
        self.source = source
        self.cache = cache
        self.pins = pins
        self.anchors = Anchors(pins)
        # Memo keys carry the pins: a cache shared by verifiers with different roots must not
        # hand one of them a chain that only the other's roots endorse.
        self._tag = hashlib.sha256("\0".join(sorted(pins)).encode()).digest()

    def _memo(self, kind: str, material: bytes, build: Callable[[], T]) -> T:
        return self.cache.memo(kind, self._tag + material, build)

    def _signing_chain(self, pem: bytes, *, reason: str) -> tuple[x509.Certificate, ...]:
        # TCB Info and QE Identity usually share one issuer chain: check it once.
        return self._memo(
            "signing-chain", pem, lambda: verify_signing_chain(pem, self.anchors, reason=reason)
        )

    def pck_chain(self, quote: Quote, tee: Tee) -> PckChain:
        pem = pck_chain_pem(quote, self.source, tee)
        return self._memo("pck-chain", pem, lambda: build_pck_chain(pem, self.anchors))

    def qe_report(self, quote: Quote, chain: PckChain) -> SgxReport:
        """QE report signature and attestation-key binding, memoized per (PCK key, QE report)."""
        material = framed(
            chain.fingerprints[0],
            quote.qe_report,
            quote.qe_report_signature,
            quote.attestation_key,
            quote.qe_auth_data,
        )

        def check() -> SgxReport:
            verify_qe_report(quote, chain)
            verify_attestation_key_binding(quote)
            return SgxReport.parse(quote.qe_report)

        return self._memo("qe-report", material, check)

    def quote_signature(self, quote: Quote) -> None:
        verify_quote_signature(quote)

    def tcb_info(self, col: DcapCollateral, tee: Tee, chain: PckChain) -> TcbInfo:
        body, sig, pem = col.tcb_info_body, col.tcb_info_signature, col.tcb_info_issuer_chain
        if body is None or sig is None or pem is None:
            raise CollateralError(
                "no TCB Info is available for this platform", reason="collateral-missing"
            )

        def build() -> TcbInfo:
            signers = self._signing_chain(pem, reason="tcb-info-signature")
            verify_signed_json(body, sig, signers, reason="tcb-info-signature")
            try:
                return parse_tcb_info(body, signers)
            except (ValueError, KeyError, TypeError) as exc:
                raise CollateralError(
                    f"TCB Info is malformed: {exc}", reason="malformed-collateral"
                ) from None

        info = self._memo("tcb-info", framed(pem, sig, body), build)
        expected_id = "TDX" if tee is Tee.TDX else "SGX"
        if info.id != expected_id or (tee is Tee.TDX and info.version < 3):
            raise CollateralError(
                f"TCB Info is for {info.id}, not {expected_id}", reason="tcb-info-type-mismatch"
            )
        # PCS API v4: TCB Info is per FMSPC (and PCE ID); it must be the platform's.
        if info.fmspc != chain.extension.fmspc:
            raise CollateralError(
                f"TCB Info is for FMSPC {info.fmspc.hex()}, the PCK certificate says "
                f"{chain.extension.fmspc.hex()}",
                reason="tcb-info-fmspc-mismatch",
            )
        if info.pce_id != chain.extension.pce_id:
            raise CollateralError(
                "TCB Info is for another PCE ID", reason="tcb-info-pceid-mismatch"
            )
        return info

    def qe_identity(self, col: DcapCollateral, tee: Tee) -> QeIdentity:
        body, sig, pem = (
            col.qe_identity_body,
            col.qe_identity_signature,
            col.qe_identity_issuer_chain,
        )
        if body is None or sig is None or pem is None:
            raise CollateralError("no QE Identity is available", reason="collateral-missing")

        def build() -> QeIdentity:
            signers = self._signing_chain(pem, reason="qe-identity-signature")
            verify_signed_json(body, sig, signers, reason="qe-identity-signature")
            try:
                return parse_qe_identity(body, signers)
            except (ValueError, KeyError, TypeError) as exc:
                raise CollateralError(
                    f"QE Identity is malformed: {exc}", reason="malformed-collateral"
                ) from None

        identity = self._memo("qe-identity", framed(pem, sig, body), build)
        expected = "TD_QE" if tee is Tee.TDX else "QE"
        if identity.id != expected:
            raise CollateralError(
                f"QE Identity is for {identity.id}, not {expected}",
                reason="qe-identity-type-mismatch",
            )
        return identity

    def windows(self, tcb: TcbInfo, qe: QeIdentity, now: datetime) -> None:
        check_collateral_windows(tcb, qe, now)
        check_signing_chain_windows(tcb.signing_chain, now)
        check_signing_chain_windows(qe.signing_chain, now)

    def crls(
        self, col: DcapCollateral, chain: PckChain, tcb: TcbInfo, qe: QeIdentity, now: datetime
    ) -> tuple[Crl, Crl]:
        """Root CA CRL (signed by the root) and PCK CRL (by the PCK CA): current, not revoking."""
        root_der, pck_der = col.root_ca_crl, col.pck_crl
        if root_der is None or pck_der is None:
            raise CollateralError(
                "the CRLs for this platform are missing", reason="collateral-missing"
            )
        root = self._memo(
            "root-crl",
            framed(chain.fingerprints[2], root_der),
            lambda: load_crl(root_der, chain.root, what="Intel SGX Root CA CRL"),
        )
        pck = self._memo(
            "pck-crl",
            framed(chain.fingerprints[1], pck_der),
            lambda: load_crl(pck_der, chain.ca, what="PCK CRL"),
        )
        check_crl(pck, now, name="pck", serial=chain.leaf.serial_number)
        check_crl(root, now, name="root", serial=chain.ca.serial_number)
        for cert in (*tcb.signing_chain[:-1], *qe.signing_chain[:-1]):
            if cert.serial_number in root.revoked:
                raise CollateralError(
                    "the TCB signing certificate is revoked", reason="tcb-signing-revoked"
                )
        return root, pck

    def quote_and_collateral(self, quote: Quote, tee: Tee, now: datetime) -> Checked:
        """Steps (3)–(12), the same for SGX and TDX quotes."""
        # (3) PCK chain to the pinned root
        chain = self.pck_chain(quote, tee)
        # (4) (5) QE report signature and attestation-key binding
        qe = self.qe_report(quote, chain)
        # (6) quote signature
        self.quote_signature(quote)
        # (7) PCK chain windows
        check_pck_windows(chain, now)
        # (8) collateral
        request, col, cached = self.collateral(tee, chain, now)
        # (9) TCB Info
        tcb = self.tcb_info(col, tee, chain)
        # (10) QE Identity
        identity = self.qe_identity(col, tee)
        # (11) collateral windows
        self.windows(tcb, identity, now)
        # (12) CRLs
        crls = self.crls(col, chain, tcb, identity, now)
        if not cached:
            self.remember(request, col, tcb, identity, crls)
        return Checked(chain, qe, request, tcb, identity)

    def remember(
        self,
        request: DcapRequest,
        col: DcapCollateral,
        tcb: TcbInfo,
        qe: QeIdentity,
        crls: tuple[Crl, Crl],
    ) -> None:
        """Cache collateral that verified, for the intersection of its windows."""
        start = max(tcb.issue_date, qe.issue_date, crls[0].this_update, crls[1].this_update)
        end = min(tcb.next_update, qe.next_update, crls[0].next_update, crls[1].next_update)
        self.cache.put(("dcap", self.source, request), col, start, end)

    def collateral(
        self, tee: Tee, chain: PckChain, now: datetime
    ) -> tuple[DcapRequest, DcapCollateral, bool]:
        """Collateral from the cache while valid at ``now``, else from the source."""
        request = DcapRequest(
            tee=tee,
            fmspc=chain.extension.fmspc.hex().upper(),
            pce_id=chain.extension.pce_id.hex().upper(),
            ca=chain.ca_kind,
        )
        # Keyed by source too: one cache may serve verifiers with different sources.
        cached = self.cache.get(("dcap", self.source, request), now)
        if isinstance(cached, DcapCollateral):
            return request, cached, True
        return request, self.source.dcap_collateral(request), False
