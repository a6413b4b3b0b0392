"""AMD SEV-SNP attestation reports (version 2 and later; VCEK or VLEK; Milan, Genoa, Turin).

The appraisal follows the SEV-SNP Firmware ABI Specification ("Attestation", the
``ATTESTATION_REPORT`` structure and its signature) and AMD's VCEK/KDS specification for the
certificates; the layouts are in ``_snp``. The numbered appraisal steps open
``SnpVerifier.verify``; the code labels each step ``# (n)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cloister.attestation import _snp, _x509
from cloister.attestation._claims import Claims, ClaimValue, Tee
from cloister.attestation._x509 import Window
from cloister.attestation.collateral import (
    CollateralCache,
    CollateralSource,
    SnpCollateral,
    SnpRequest,
)
from cloister.errors import CollateralError, MalformedEvidenceError, SignatureError

__all__ = ["SnpVerifier", "amd_ark_pins"]


def amd_ark_pins() -> dict[str, str]:
    """SPKI SHA-256 of the shipped ARK of each product."""
    return {
        product: _x509.spki_sha256(
            _x509.load_pem_certs(_x509.root_pem(f"amd_{product.lower()}_ark.pem"))[0]
        )
        for product in _snp.PRODUCTS
    }


@dataclass(frozen=True)
class _Chain:
    """A signature-checked VCEK/VLEK → ASK/ASVK → ARK chain and the VCEK's extensions."""

    key_cert: x509.Certificate
    signer: x509.Certificate
    ark: x509.Certificate
    key: ec.EllipticCurvePublicKey
    endorsement: _snp.EndorsementKey


class SnpVerifier:
    """Verifies SNP reports. ``product`` fixes the product for v2 reports (which do not say);
    ``ark_pins`` maps product → SPKI SHA-256 to replace the shipped ARKs (tests)."""

    tee = Tee.SNP

    def __init__(
        self,
        collateral: CollateralSource,
        *,
        cache: CollateralCache | None = None,
        product: str | None = None,
        ark_pins: Mapping[str, str] | None = None,
    ) -> None:
        if product is not None and product not in _snp.PRODUCTS:
            raise ValueError(f"product must be one of {_snp.PRODUCTS}")
        self._source = collateral
        self._cache = cache or CollateralCache()
        self._product = product
        self._pins = dict(ark_pins) if ark_pins is not None else amd_ark_pins()
        # Memo keys carry the pins (see ``_dcap_steps.DcapSteps``).
        self._tag = hashlib.sha256(repr(sorted(self._pins.items())).encode()).digest()

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        """Verify ``evidence`` at ``now``; raise an ``EvidenceError`` naming the failed step.

        (1)  bounds and layout: a 1184-byte report, optionally followed by the extended report's
             certificate table; version ≥ 2; SIGNATURE_ALGO is ECDSA P-384 with SHA-384;
             SIGNING_KEY is VCEK or VLEK; MASK_CHIP_KEY is clear;
        (2)  product: from CPUID family/model (report v3+), else from the verifier's configuration
             or the collateral's certificate names;
        (3)  certificates: VCEK/VLEK, ASK/ASVK and ARK from the certificate table, else from the
             collateral source (keyed by product, chip and reported TCB); ASK/ASVK and ARK default
             to the shipped ones for the product;
        (4)  ARK: its public key is the one pinned for the product, and it is self-signed;
        (5)  ASK (VCEK) or ASVK (VLEK) is signed by the ARK (RSASSA-PSS, SHA-384);
        (6)  the VCEK/VLEK is signed by the ASK/ASVK and holds a P-384 key;
        (7)  validity windows of VCEK/VLEK, ASK/ASVK and ARK at ``now``;
        (8)  the certificate is for this product (its productName extension);
        (9)  REPORTED_TCB equals the certificate's TCB extensions (BL, TEE, SNP, microcode; FMC on
             Turin);
        (10) CHIP_ID equals the VCEK's hwID (VCEK only; Turin's hwID is the first 8 bytes);
        (11) the report signature over bytes [0, 0x2A0) under the VCEK/VLEK;
        (12) claims (no TCB status: SNP reports its TCB in ``values``).
        """
        _x509.require_aware(now)
        # (1) bounds and layout
        raw, table = _snp.split_evidence(evidence)
        report = _snp.parse_report(raw)
        kind = _check_layout(report)
        # (2) product, as far as the report says
        product = report.product_from_cpuid()
        if product == "unknown":
            raise MalformedEvidenceError(
                f"CPUID family {report.cpuid_fam_id:#x} model {report.cpuid_mod_id:#x} is not a "
                "supported SNP product",
                reason="unsupported-product",
            )
        if product is not None and self._product is not None and product != self._product:
            raise CollateralError(
                f"the report is from {product}, not {self._product}", reason="product-mismatch"
            )
        product = product or self._product
        # (3) certificates
        col, cache_key, cached = self._collateral(report, kind, product, table, now)
        if product is None:
            material = _x509.framed(
                *(b or b"" for b in (col.ark, col.ask, col.asvk, col.vcek, col.vlek))
            )
            product = self._cache.memo(
                "snp-product", kind.encode() + material, lambda: _product_of(col, kind)
            )
        # (4) (5) (6) ARK pinned, ASK/ASVK and VCEK/VLEK signatures
        chain = self._chain(col, kind, product)
        # (7) windows
        _check_windows(chain, kind, now)
        if cache_key is not None and not cached:
            self._cache.put(
                cache_key,
                col,
                max(c.not_valid_before_utc for c in (chain.key_cert, chain.signer, chain.ark)),
                min(c.not_valid_after_utc for c in (chain.key_cert, chain.signer, chain.ark)),
            )
        # (8) product of the certificate
        _check_product(chain.endorsement, product, kind)
        # (9) reported TCB against the certificate
        tcb = _snp.TcbVersion.from_raw(report.reported_tcb, turin=product == "Turin")
        _check_reported_tcb(tcb, chain.endorsement, kind)
        # (10) chip ID (VCEK only)
        if kind == "vcek":
            _check_chip_id(report, chain.endorsement, product)
        # (11) report signature
        _check_signature(report, chain.key)
        # (12) claims
        return _claims(report, product, kind, tcb, chain.endorsement)

    def _collateral(
        self,
        report: _snp.Report,
        kind: str,
        product: str | None,
        table: Mapping[str, bytes],
        now: datetime,
    ) -> tuple[SnpCollateral, tuple[object, ...] | None, bool]:
        if kind in table:
            col = SnpCollateral(
                vcek=table.get("vcek"),
                vlek=table.get("vlek"),
                ask=table.get("ask") if kind == "vcek" else None,
                ark=table.get("ark"),
            )
            return col, None, False
        # Keyed by source too: one cache may serve verifiers with different sources.
        key = ("snp", self._source, product, kind, report.chip_id, report.reported_tcb)
        hit = self._cache.get(key, now)
        if isinstance(hit, SnpCollateral):
            return hit, key, True
        request = SnpRequest(
            product=product,
            signing_key=kind,
            chip_id=report.chip_id,
            reported_tcb=report.reported_tcb,
        )
        return self._source.snp_collateral(request), key, False

    def _chain(self, col: SnpCollateral, kind: str, product: str | None) -> _Chain:
        key_der = col.vcek if kind == "vcek" else col.vlek
        if key_der is None:
            raise CollateralError(
                f"no {kind.upper()} certificate is available", reason="collateral-missing"
            )
        if product is None:
            raise CollateralError("the SNP product is unknown", reason="product-mismatch")
        signer_name = "ask" if kind == "vcek" else "asvk"
        signer_pem = (col.ask if kind == "vcek" else col.asvk) or _x509.root_pem(
            f"amd_{product.lower()}_{signer_name}.pem"
        )
        ark_pem = col.ark or _x509.root_pem(f"amd_{product.lower()}_ark.pem")
        material = _x509.framed(
            self._tag, product.encode(), kind.encode(), key_der, signer_pem, ark_pem
        )
        return self._cache.memo(
            "snp-chain",
            material,
            lambda: _build_chain(key_der, signer_pem, ark_pem, kind, product, self._pins),
        )


def _check_layout(report: _snp.Report) -> str:
    if report.version < 2:
        raise MalformedEvidenceError(
            f"SNP report version {report.version} is not supported",
            reason="unsupported-report-version",
        )
    if report.signature_algo != _snp.SIG_ALGO_ECDSA_P384_SHA384:
        raise MalformedEvidenceError(
            f"signature algorithm {report.signature_algo} is not ECDSA P-384/SHA-384",
            reason="unsupported-signature-algorithm",
        )
    if report.mask_chip_key:
        raise SignatureError("the report is unsigned (MASK_CHIP_KEY)", reason="report-signature")
    if report.signing_key == _snp.SIGNING_KEY_VCEK:
        return "vcek"
    if report.signing_key == _snp.SIGNING_KEY_VLEK:
        return "vlek"
    raise MalformedEvidenceError(
        f"signing key {report.signing_key} is neither VCEK nor VLEK",
        reason="unsupported-signing-key",
    )


def _product_of(col: SnpCollateral, kind: str) -> str | None:
    """A v2 report does not name its product: take it from the certificates' issuer names."""
    for blob in (col.ark, col.ask if kind == "vcek" else col.asvk):
        if blob:
            try:
                product = _snp.product_of_name(_snp.load_cert(blob).subject)
            except ValueError:
                continue
            if product is not None:
                return product
    key_der = col.vcek if kind == "vcek" else col.vlek
    if key_der:
        try:
            return _snp.product_of_name(_snp.load_cert(key_der).issuer)
        except ValueError:
            return None
    return None


def _chain_error(kind: str, message: str) -> SignatureError:
    return SignatureError(message, reason=f"{kind}-chain")


def _build_chain(
    key_der: bytes,
    signer_pem: bytes,
    ark_pem: bytes,
    kind: str,
    product: str,
    pins: Mapping[str, str],
) -> _Chain:
    try:
        key_cert = _snp.load_cert(key_der)
        signer = _snp.load_cert(signer_pem)
        ark = _snp.load_cert(ark_pem)
    except ValueError as exc:
        raise _chain_error(
            kind, f"a certificate of the {kind.upper()} chain cannot be parsed: {exc}"
        ) from None
    # (4) the ARK is the pinned key of this product and signed itself
    if _x509.spki_sha256(ark) != pins.get(product):
        raise _chain_error(kind, f"the ARK is not the pinned AMD root key for {product}")
    if not _x509.issued_by(ark, ark):
        raise _chain_error(kind, "the ARK's self-signature does not verify")
    # (5) ASK/ASVK by the ARK
    if not _x509.issued_by(signer, ark):
        raise _chain_error(
            kind, f"the {'ASK' if kind == 'vcek' else 'ASVK'} is not signed by the ARK"
        )
    # (6) VCEK/VLEK by the ASK/ASVK
    if not _x509.issued_by(key_cert, signer):
        raise _chain_error(kind, f"the {kind.upper()} is not signed by its AMD signing key")
    key = key_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise _chain_error(kind, f"the {kind.upper()} key is not ECDSA P-384")
    try:
        endorsement = _snp.endorsement_key(key_cert)
    except ValueError as exc:
        raise _chain_error(kind, f"the {kind.upper()} extensions are malformed: {exc}") from None
    return _Chain(key_cert, signer, ark, key, endorsement)


def _check_windows(chain: _Chain, kind: str, now: datetime) -> None:
    signer = "ask" if kind == "vcek" else "asvk"
    for name, cert in ((kind, chain.key_cert), (signer, chain.signer), ("ark", chain.ark)):
        window = _x509.cert_window(cert, now)
        if window is not Window.VALID:
            raise CollateralError(
                f"the {name.upper()} certificate is {window.words} at {now.isoformat()}",
                reason=f"{name}-{window.value}",
            )


def _check_product(endorsement: _snp.EndorsementKey, product: str | None, kind: str) -> None:
    name = endorsement.product_name
    # productName is e.g. "Milan-B0" in VCEKs and "Milan" in VLEKs.
    if name is not None and product is not None and name.split("-", 1)[0] != product:
        raise CollateralError(
            f"the {kind.upper()} is for {name}, the report is from {product}",
            reason="product-mismatch",
        )


def _check_reported_tcb(tcb: _snp.TcbVersion, endorsement: _snp.EndorsementKey, kind: str) -> None:
    expected = {
        "bootloader": endorsement.bootloader,
        "tee": endorsement.tee,
        "snp": endorsement.snp,
        "microcode": endorsement.microcode,
    }
    if tcb.fmc is not None:
        expected["fmc"] = endorsement.fmc
    actual = tcb.as_dict()
    wrong = [k for k, v in expected.items() if v is None or actual[k] != v]
    if wrong:
        raise CollateralError(
            f"REPORTED_TCB differs from the {kind.upper()}'s TCB in {', '.join(wrong)}",
            reason="reported-tcb-mismatch",
        )


def _check_chip_id(
    report: _snp.Report, endorsement: _snp.EndorsementKey, product: str | None
) -> None:
    hwid = endorsement.hwid
    chip = report.chip_id[:8] if product == "Turin" else report.chip_id
    if hwid is None or hwid != chip:
        raise CollateralError(
            "CHIP_ID differs from the VCEK's hardware ID", reason="chip-id-mismatch"
        )


def _check_signature(report: _snp.Report, key: ec.EllipticCurvePublicKey) -> None:
    try:
        key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.signed,
            ec.ECDSA(hashes.SHA384()),
        )
    except (InvalidSignature, ValueError):
        raise SignatureError(
            "the report signature does not verify under the endorsement key",
            reason="report-signature",
        ) from None


def _claims(
    report: _snp.Report,
    product: str | None,
    kind: str,
    tcb: _snp.TcbVersion,
    ek: _snp.EndorsementKey,
) -> Claims:
    turin = product == "Turin"
    values: dict[str, ClaimValue] = {
        "measurement": report.measurement.hex(),
        "host_data": report.host_data.hex(),
        "chip_id": report.chip_id.hex(),
        "policy": report.policy,
        "vmpl": report.vmpl,
        "product": product or "",
        "signing_key": kind,
        "version": report.version,
        "guest_svn": report.guest_svn,
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "report_id_ma": report.report_id_ma.hex(),
        "platform_info": report.platform_info,
        "reported_tcb": report.reported_tcb,
        "current_tcb": report.current_tcb,
        "committed_tcb": report.committed_tcb,
        "launch_tcb": report.launch_tcb,
    }
    for name, value in tcb.as_dict().items():
        values[f"reported_tcb_{name}"] = value
    for field_name, raw in (
        ("current_tcb", report.current_tcb),
        ("committed_tcb", report.committed_tcb),
    ):
        for name, value in _snp.TcbVersion.from_raw(raw, turin=turin).as_dict().items():
            values[f"{field_name}_{name}"] = value
    if ek.csp_id is not None:
        values["csp_id"] = ek.csp_id
    return Claims(tee=Tee.SNP, report_data=report.report_data, debug=report.debug, values=values)
