"""Intel DCAP quotes, shared by the SGX and TDX verifiers: layout, PCK chain, signatures.

Owns:

* parsing quotes v3/v4/v5 (Intel SGX ECDSA Quote Library API, "Quote Format"; Intel TDX DCAP
  Quoting Library API §A.3 for v4, §A.4 for v5) under ``limits.MAX_EVIDENCE_BYTES``, and the
  SGX and TD report bodies;
* the PCK certificate chain to the Intel SGX Root CA, pinned by public key, and the SGX
  extension of the PCK certificate (Intel SGX PCK Certificate and CRL Profile §1.3.5);
* the QE report signature, the attestation-key binding and the quote signature.

Collateral (TCB Info, QE Identity, CRLs) is in ``_dcap_collateral``, TCB level selection in
``_dcap_tcb``, and the steps composed for a verifier in ``_dcap_steps``. Each function raises
its own ``EvidenceError`` with a stable reason code.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cloister import limits
from cloister.attestation import _x509
from cloister.attestation._claims import Tee
from cloister.attestation._x509 import Window
from cloister.attestation.collateral import CollateralSource, PckRequest
from cloister.errors import BindingError, CollateralError, MalformedEvidenceError, SignatureError

# --- quote layout ----------------------------------------------------------------------------

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
CERT_PCK_CHAIN = 5  # PCK leaf ‖ PCK CA ‖ root, PEM
CERT_QE_REPORT = 6  # QE report certification data (quote v4/v5)
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3  # quote v5 body types
_BODY_SIZES = {BODY_SGX: SGX_REPORT_SIZE, BODY_TD10: TD10_REPORT_SIZE, BODY_TD15: TD15_REPORT_SIZE}

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_PCK_CA_KINDS = {
    "Intel SGX PCK Processor CA": "processor",
    "Intel SGX PCK Platform CA": "platform",
}


def malformed(message: str) -> MalformedEvidenceError:
    return MalformedEvidenceError(message, reason="malformed-quote")


@dataclass(frozen=True)
class Quote:
    """The parts of a DCAP quote that verification reads. ``signed`` is header ‖ body."""

    version: int
    tee_type: int
    att_key_type: int
    header: bytes
    body_type: int
    body: bytes
    signed: bytes
    signature: bytes  # raw r‖s over ``signed``
    attestation_key: bytes  # raw x‖y of the P-256 attestation key
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


class _Reader:
    """Bounded little-endian reads: any overrun is a ``malformed-quote``."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise malformed(f"quote too short for {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def parse_quote(data: bytes, *, tee: Tee) -> Quote:
    """Split a quote into its parts, checking every length field before using it.

    Bytes after the declared signature data are ignored: some stacks hand out quotes in
    fixed-size zero-padded buffers.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise malformed("evidence must be bytes")
    data = bytes(data)
    if len(data) > limits.MAX_EVIDENCE_BYTES:
        raise MalformedEvidenceError(
            f"quote exceeds MAX_EVIDENCE_BYTES ({limits.MAX_EVIDENCE_BYTES})",
            reason="malformed-quote",
        )
    r = _Reader(data)
    header = r.take(HEADER_SIZE, "the header")
    version, att_key_type, tee_type = struct.unpack_from("<HHI", header)
    _check_version(version, tee_type, tee)
    if att_key_type != ATT_KEY_ECDSA_P256:
        raise MalformedEvidenceError(
            f"attestation key type {att_key_type} is not ECDSA-256-with-P-256",
            reason="unsupported-attestation-key-type",
        )
    body_type, body_size = _body_descriptor(r, version, tee_type, tee)
    body = r.take(body_size, "the report body")
    signed = data[: r.pos]
    sig_len = r.u32("the signature data length")
    if r.pos + sig_len > len(data):
        raise malformed(f"signature data length {sig_len} runs past the quote ({len(data)} bytes)")
    s = _Reader(data, r.pos, r.pos + sig_len)
    signature = s.take(64, "the quote signature")
    attestation_key = s.take(64, "the attestation key")
    qe = s if version == 3 else _qe_certification_data(s)
    qe_report = qe.take(SGX_REPORT_SIZE, "the QE report")
    qe_report_signature = qe.take(64, "the QE report signature")
    qe_auth_data = qe.take(qe.u16("the QE authentication data size"), "the QE authentication data")
    cert_type = qe.u16("the certification data type")
    cert_data = qe.take(qe.u32("the certification data size"), "the certification data")
    # Every declared length must be used up exactly: no slack for bytes nobody checks.
    if qe.pos != qe.end or s.pos != s.end:
        raise malformed("signature data length does not match its contents")
    return Quote(
        version=version,
        tee_type=tee_type,
        att_key_type=att_key_type,
        header=header,
        body_type=body_type,
        body=body,
        signed=signed,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        cert_type=cert_type,
        cert_data=cert_data,
    )


def _body_descriptor(r: _Reader, version: int, tee_type: int, tee: Tee) -> tuple[int, int]:
    """Body type and size: implied by the header before v5, a descriptor from v5 on."""
    if version != 5:
        body_type = BODY_SGX if tee_type == TEE_SGX else BODY_TD10
        return body_type, _BODY_SIZES[body_type]
    body_type = r.u16("the body type")
    body_size = r.u32("the body size")
    if _BODY_SIZES.get(body_type) != body_size:
        raise malformed(f"quote v5 body type {body_type} with size {body_size}")
    if (tee is Tee.SGX) != (body_type == BODY_SGX):
        raise MalformedEvidenceError(
            f"quote v5 body type {body_type} does not fit a {tee.value} quote",
            reason="unsupported-quote-version",
        )
    return body_type, body_size


def _qe_certification_data(s: _Reader) -> _Reader:
    """Quote v4/v5 wrap the QE report in certification data of type 6."""
    outer_type = s.u16("the certification data type")
    outer_size = s.u32("the certification data size")
    if outer_type != CERT_QE_REPORT:
        raise MalformedEvidenceError(
            f"outer certification data type {outer_type} is not QE report data (6)",
            reason="unsupported-cert-data",
        )
    qe = _Reader(s.data, s.pos, s.pos + outer_size)
    s.take(outer_size, "the QE report certification data")
    return qe


def _check_version(version: int, tee_type: int, tee: Tee) -> None:
    # SGX: quote v3 (tee_type field reserved, zero), v4 and v5; TDX: v4 and v5 with 0x81.
    if tee is Tee.SGX:
        ok = tee_type == TEE_SGX and version in (3, 4, 5)
    else:
        ok = tee_type == TEE_TDX and version in (4, 5)
    if not ok:
        raise MalformedEvidenceError(
            f"quote version {version} with TEE type {tee_type:#x} is not a supported "
            f"{tee.value} quote",
            reason="unsupported-quote-version",
        )


@dataclass(frozen=True)
class SgxReport:
    """An SGX REPORTBODY (Intel SDM Vol. 3D §38.15; 384 bytes)."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_ext_prod_id: bytes
    isv_family_id: bytes
    config_id: bytes
    report_data: bytes

    @classmethod
    def parse(cls, b: bytes) -> SgxReport:
        if len(b) != SGX_REPORT_SIZE:
            raise malformed("an SGX report body is 384 bytes")
        return cls(
            cpu_svn=b[0:16],
            misc_select=int.from_bytes(b[16:20], "little"),
            isv_ext_prod_id=b[32:48],
            attributes=b[48:64],
            mr_enclave=b[64:96],
            mr_signer=b[128:160],
            config_id=b[192:256],
            isv_prod_id=int.from_bytes(b[256:258], "little"),
            isv_svn=int.from_bytes(b[258:260], "little"),
            config_svn=int.from_bytes(b[260:262], "little"),
            isv_family_id=b[304:320],
            report_data=b[320:384],
        )

    @property
    def debug(self) -> bool:
        # ATTRIBUTES.FLAGS bit 1 is DEBUG (SDM Vol. 3D §38.7.1).
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReport:
    """A TD quote body: TD 1.0 (584 bytes), or TD 1.5 (648 bytes: + TEE_TCB_SVN2, MR_SERVICETD)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None

    @classmethod
    def parse(cls, b: bytes) -> TdReport:
        if len(b) not in (TD10_REPORT_SIZE, TD15_REPORT_SIZE):
            raise malformed("a TD report body is 584 or 648 bytes")
        td15 = len(b) == TD15_REPORT_SIZE
        return cls(
            tee_tcb_svn=b[0:16],
            mr_seam=b[16:64],
            mr_signer_seam=b[64:112],
            seam_attributes=b[112:120],
            td_attributes=b[120:128],
            xfam=b[128:136],
            mr_td=b[136:184],
            mr_config_id=b[184:232],
            mr_owner=b[232:280],
            mr_owner_config=b[280:328],
            rtmrs=(b[328:376], b[376:424], b[424:472], b[472:520]),
            report_data=b[520:584],
            tee_tcb_svn2=b[584:600] if td15 else None,
            mr_service_td=b[600:648] if td15 else None,
        )

    @property
    def debug(self) -> bool:
        # TD_ATTRIBUTES bit 0 is DEBUG (TDX Module ABI spec, TDREPORT).
        return bool(self.td_attributes[0] & 0x01)


# --- PCK certificate chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class PckExtension:
    """The Intel SGX extension of a PCK certificate (PCK Certificate and CRL Profile §1.3.5)."""

    ppid: bytes
    tcb_components: tuple[int, ...]  # 16 SGX TCB component SVNs
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def _pck_extension(cert: x509.Certificate) -> PckExtension:
    ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    raw: bytes = ext.value  # type: ignore[attr-defined]
    seq = _x509.der_one(raw)
    values: dict[str, _x509.Der] = {}
    for item in _x509.der_children(seq.content):
        oid_tlv, val = list(_x509.der_children(item.content))[:2]
        values[_x509.der_oid(oid_tlv)] = val
    base = SGX_EXTENSION_OID.dotted_string
    tcb: dict[str, _x509.Der] = {}
    for item in _x509.der_children(values[base + ".2"].content):
        oid_tlv, val = list(_x509.der_children(item.content))[:2]
        tcb[_x509.der_oid(oid_tlv)] = val
    comps = tuple(_x509.der_int(tcb[f"{base}.2.{i}"]) for i in range(1, 17))
    return PckExtension(
        ppid=values[base + ".1"].content,
        tcb_components=comps,
        pce_svn=_x509.der_int(tcb[f"{base}.2.17"]),
        cpu_svn=tcb[f"{base}.2.18"].content,
        pce_id=values[base + ".3"].content,
        fmspc=values[base + ".4"].content,
        sgx_type=_x509.der_int(values[base + ".5"]),
    )


@dataclass(frozen=True)
class PckChain:
    """A PCK chain whose signatures were checked up to a pinned root key (times are not)."""

    leaf: x509.Certificate
    ca: x509.Certificate
    root: x509.Certificate
    extension: PckExtension
    ca_kind: str  # "processor" | "platform"
    leaf_key: ec.EllipticCurvePublicKey
    fingerprints: tuple[bytes, bytes, bytes]  # SHA-256 of leaf, CA, root: cache keys


def pck_chain_error(message: str) -> SignatureError:
    return SignatureError(message, reason="pck-chain")


class Anchors:
    """The pinned Intel SGX Root CA keys, and the root certificates already seen self-signed.

    Several issuances of the root share one key, so the key is what is pinned; a root
    certificate is accepted when its key is pinned *and* its own signature verifies (a root
    whose signature bytes were altered keeps its key). One check per distinct certificate
    per verifier: the PCK chain and both collateral chains usually carry the same root.
    """

    def __init__(self, pins: frozenset[str]) -> None:
        if not pins:
            raise ValueError("pin at least one root key")
        self.pins = pins
        self._self_signed: set[bytes] = set()

    def root_ok(self, root: x509.Certificate) -> bool:
        if _x509.spki_sha256(root) not in self.pins:
            return False
        fingerprint = root.fingerprint(hashes.SHA256())
        if fingerprint in self._self_signed:
            return True
        if not _x509.issued_by(root, root):
            return False
        self._self_signed.add(fingerprint)
        return True


def verify_root(root: x509.Certificate, anchors: Anchors) -> None:
    """The chain ends in a pinned, self-signed Intel SGX Root CA."""
    if _x509.spki_sha256(root) not in anchors.pins:
        raise pck_chain_error("the chain does not end in a pinned Intel SGX Root CA key")
    if not anchors.root_ok(root):
        raise pck_chain_error("the Intel SGX Root CA certificate's self-signature does not verify")


def build_pck_chain(pem: bytes, anchors: Anchors) -> PckChain:
    """Parse, order and signature-check a PCK chain; ``pck-chain`` on any failure.

    Built by hand rather than with ``cryptography.x509.verification``, whose policies are Web
    PKI profiles (SAN and EKU requirements, one trust store of certificates): Intel's chain is
    pinned by *key* across root issuances, its shape is fixed (root → PCK Processor/Platform CA
    → PCK) and its time checks must name which certificate failed.
    """
    try:
        certs = _x509.order_chain(_x509.load_pem_certs(pem))
    except ValueError as exc:
        raise pck_chain_error(f"PCK certificate chain is unusable: {exc}") from None
    if len(certs) != 3:
        raise pck_chain_error(f"a PCK chain has 3 certificates, got {len(certs)}")
    leaf, ca, root = certs
    verify_root(root, anchors)
    # Intel SGX PCK Certificate and CRL Profile §1.3: root → PCK Processor/Platform CA → PCK.
    if not _x509.issued_by(ca, root):
        raise pck_chain_error("the PCK CA certificate is not signed by the Intel SGX Root CA")
    if not _x509.issued_by(leaf, ca):
        raise pck_chain_error("the PCK certificate is not signed by its PCK CA")
    ca_kind = _PCK_CA_KINDS.get(_x509.common_name(ca) or "")
    if ca_kind is None:
        raise pck_chain_error("the PCK certificate's issuer is not an Intel SGX PCK CA")
    try:
        extension = _pck_extension(leaf)
    except (x509.ExtensionNotFound, KeyError, ValueError):
        raise pck_chain_error("the PCK certificate lacks a well-formed SGX extension") from None
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise pck_chain_error("the PCK certificate key is not ECDSA P-256")
    fingerprints = (
        leaf.fingerprint(hashes.SHA256()),
        ca.fingerprint(hashes.SHA256()),
        root.fingerprint(hashes.SHA256()),
    )
    return PckChain(leaf, ca, root, extension, ca_kind, key, fingerprints)


def pck_chain_pem(quote: Quote, collateral: CollateralSource, tee: Tee) -> bytes:
    """The PCK chain: inside the quote (type 5), else from the collateral source."""
    if quote.cert_type == CERT_PCK_CHAIN:
        return quote.cert_data
    request = PckRequest(tee=tee, cert_type=quote.cert_type, cert_data=quote.cert_data)
    try:
        return collateral.pck_chain(request)
    except CollateralError as exc:
        if exc.reason != "collateral-missing":
            raise
        raise MalformedEvidenceError(
            f"certification data type {quote.cert_type} carries no PCK chain and none was supplied",
            reason="unsupported-cert-data",
        ) from None


def check_pck_windows(chain: PckChain, now: datetime) -> None:
    """Each certificate of the PCK chain is within ``[notBefore, notAfter]`` at ``now``."""
    window = _x509.cert_window(chain.leaf, now)
    if window is not Window.VALID:
        raise CollateralError(
            f"the PCK certificate is {window.words} at {now.isoformat()}",
            reason=f"pck-cert-{window.value}",
        )
    for name, cert in (("PCK CA", chain.ca), ("Intel SGX Root CA", chain.root)):
        window = _x509.cert_window(cert, now)
        if window is not Window.VALID:
            raise CollateralError(
                f"the {name} certificate is {window.words} at {now.isoformat()}",
                reason=f"pck-chain-{window.value}",
            )


# --- signatures over the quote ---------------------------------------------------------------


def _raw_to_der(sig: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))


def ecdsa_p256_ok(key: ec.EllipticCurvePublicKey, sig: bytes, message: bytes) -> bool:
    if len(sig) != 64:
        return False
    try:
        key.verify(_raw_to_der(sig), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_qe_report(quote: Quote, chain: PckChain) -> None:
    """The PCK key signed the QE report (SGX ECDSA QuoteLibReference §"QE Report Signature")."""
    if not ecdsa_p256_ok(chain.leaf_key, quote.qe_report_signature, quote.qe_report):
        raise SignatureError(
            "the QE report signature does not verify under the PCK key",
            reason="qe-report-signature",
        )


def verify_attestation_key_binding(quote: Quote) -> None:
    """QE REPORTDATA = SHA-256(attestation key ‖ QE authentication data) ‖ 32 zero bytes."""
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report[320:384] != expected:
        raise BindingError(
            "the QE report does not bind the quote's attestation key",
            reason="attestation-key-binding",
        )


def attestation_key(quote: Quote) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key
        )
    except ValueError:
        raise SignatureError(
            "the attestation key is not a P-256 point", reason="quote-signature"
        ) from None


def verify_quote_signature(quote: Quote) -> None:
    """The attestation key signed header ‖ body."""
    if not ecdsa_p256_ok(attestation_key(quote), quote.signature, quote.signed):
        raise SignatureError(
            "the quote signature does not verify under the attestation key",
            reason="quote-signature",
        )
