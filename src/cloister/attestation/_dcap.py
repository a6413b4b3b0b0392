"""Intel DCAP, shared by the SGX and TDX verifiers: quote layout, PCK chain, collateral, TCB.

Owns the steps that SGX and TDX quotes have in common, each a small function that raises its
own ``EvidenceError`` with a stable reason code:

* parsing quotes v3/v4/v5 (Intel SGX ECDSA Quote Library API, "Quote Format"; Intel TDX DCAP
  Quoting Library API §A.3 for v4, §A.4 for v5) under ``limits.MAX_EVIDENCE_BYTES``;
* the PCK certificate chain to the Intel SGX Root CA, pinned by public key, and the SGX
  extension of the PCK certificate (Intel SGX PCK Certificate and CRL Profile §1.3.5);
* the QE report signature, the attestation-key binding and the quote signature;
* CRLs, TCB Info and QE Identity: issuer chains, signatures over the exact signed bytes,
  validity windows and identity matches (Intel PCS API v4; TCB Info v2/v3, Enclave Identity
  v2);
* TCB level selection and the status merging of Intel's Quote Verification Library (QVL).

Does not own: which steps a TEE runs in which order (``sgx.py``, ``tdx.py``), nor policy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cloister import limits
from cloister.attestation import _x509
from cloister.attestation._claims import Tee
from cloister.attestation._x509 import Window
from cloister.attestation.collateral import (
    CollateralCache,
    CollateralSource,
    DcapCollateral,
    DcapRequest,
    PckRequest,
)
from cloister.errors import (
    BindingError,
    CollateralError,
    MalformedEvidenceError,
    SignatureError,
)

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
    if version == 5:
        body_type = r.u16("the body type")
        body_size = r.u32("the body size")
        if _BODY_SIZES.get(body_type) != body_size:
            raise malformed(f"quote v5 body type {body_type} with size {body_size}")
        if (tee is Tee.SGX) != (body_type == BODY_SGX):
            raise MalformedEvidenceError(
                f"quote v5 body type {body_type} does not fit a {tee.value} quote",
                reason="unsupported-quote-version",
            )
    else:
        body_type = BODY_SGX if tee_type == TEE_SGX else BODY_TD10
        body_size = _BODY_SIZES[body_type]
    body = r.take(body_size, "the report body")
    signed = data[: r.pos]
    sig_len = r.u32("the signature data length")
    if r.pos + sig_len > len(data):
        raise malformed(f"signature data length {sig_len} runs past the quote ({len(data)} bytes)")
    s = _Reader(data, r.pos, r.pos + sig_len)
    signature = s.take(64, "the quote signature")
    attestation_key = s.take(64, "the attestation key")
    if version == 3:
        qe = s
    else:
        outer_type = s.u16("the certification data type")
        outer_size = s.u32("the certification data size")
        if outer_type != CERT_QE_REPORT:
            raise MalformedEvidenceError(
                f"outer certification data type {outer_type} is not QE report data (6)",
                reason="unsupported-cert-data",
            )
        qe = _Reader(data, s.pos, s.pos + outer_size)
        s.take(outer_size, "the QE report certification data")
    qe_report = qe.take(SGX_REPORT_SIZE, "the QE report")
    qe_report_signature = qe.take(64, "the QE report signature")
    qe_auth_data = qe.take(qe.u16("the QE authentication data size"), "the QE authentication data")
    cert_type = qe.u16("the certification data type")
    cert_data = qe.take(qe.u32("the certification data size"), "the certification data")
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


def verify_root(root: x509.Certificate, pins: frozenset[str]) -> None:
    """The root is self-signed with a pinned key (several issuances share one key: pin the key)."""
    if _x509.spki_sha256(root) not in pins:
        raise pck_chain_error("the chain does not end in a pinned Intel SGX Root CA key")
    if not _x509.issued_by(root, root):
        raise pck_chain_error("the Intel SGX Root CA certificate's self-signature does not verify")


def build_pck_chain(pem: bytes, pins: frozenset[str]) -> PckChain:
    """Parse, order and signature-check a PCK chain; ``pck-chain`` on any failure."""
    try:
        certs = _x509.order_chain(_x509.load_pem_certs(pem))
    except ValueError as exc:
        raise pck_chain_error(f"PCK certificate chain is unusable: {exc}") from None
    if len(certs) != 3:
        raise pck_chain_error(f"a PCK chain has 3 certificates, got {len(certs)}")
    leaf, ca, root = certs
    verify_root(root, pins)
    # Intel SGX PCK Certificate and CRL Profile §1.3: root → PCK Processor/Platform CA → PCK.
    if not _x509.issued_by(ca, root):
        raise pck_chain_error("the PCK CA certificate is not signed by the Intel SGX Root CA")
    if not _x509.issued_by(leaf, ca):
        raise pck_chain_error("the PCK certificate is not signed by its PCK CA")
    cn = ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ca_kind = _PCK_CA_KINDS.get(str(cn[0].value) if cn else "")
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
            f"the PCK certificate is {window.value} at {now.isoformat()}",
            reason=f"pck-cert-{window.value}",
        )
    for name, cert in (("PCK CA", chain.ca), ("Intel SGX Root CA", chain.root)):
        window = _x509.cert_window(cert, now)
        if window is not Window.VALID:
            raise CollateralError(
                f"the {name} certificate is {window.value} at {now.isoformat()}",
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


# --- collateral ------------------------------------------------------------------------------


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return parsed


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...] | None
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class ModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]  # (isvsvn, status, advisories)


@dataclass(frozen=True)
class TcbInfo:
    """A signature-verified TCB Info (PCS API v4 "TCB Info V2/V3")."""

    id: str  # "SGX" or "TDX" (v2 has no id and is SGX)
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    levels: tuple[TcbLevel, ...]
    tdx_module: ModuleIdentity | None
    tdx_module_identities: tuple[ModuleIdentity, ...]
    signing_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class QeIdentity:
    """A signature-verified Enclave Identity (QE for SGX, TD_QE for TDX)."""

    id: str
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]
    signing_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class Crl:
    crl: x509.CertificateRevocationList
    this_update: datetime
    next_update: datetime
    revoked: frozenset[int] = field(default_factory=frozenset)


def _hex(value: object, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    out = bytes.fromhex(value)
    if size is not None and len(out) != size:
        raise ValueError(f"expected {size} bytes")
    return out


def _status(level: Mapping[str, Any]) -> str:
    # TCB Info v1 said "status"; v2 and v3 say "tcbStatus".
    return str(level["tcbStatus"] if "tcbStatus" in level else level["status"])


def _levels_of_identity(items: object) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    if not isinstance(items, list):
        raise ValueError("tcbLevels is not a list")
    out = []
    for level in items:
        out.append(
            (
                int(level["tcb"]["isvsvn"]),
                _status(level),
                tuple(str(a) for a in level.get("advisoryIDs", [])),
            )
        )
    return tuple(out)


def _module_identity(d: Mapping[str, Any], default_id: str) -> ModuleIdentity:
    return ModuleIdentity(
        id=str(d.get("id", default_id)),
        mrsigner=_hex(d["mrsigner"]),
        attributes=_hex(d["attributes"]),
        attributes_mask=_hex(d["attributesMask"]),
        levels=_levels_of_identity(d.get("tcbLevels", [])),
    )


def _tcb_level(level: Mapping[str, Any], version: int) -> TcbLevel:
    tcb = level["tcb"]
    if version >= 3:
        sgx = tuple(int(c["svn"]) for c in tcb["sgxtcbcomponents"])
        tdx_raw = tcb.get("tdxtcbcomponents")
        tdx = tuple(int(c["svn"]) for c in tdx_raw) if tdx_raw is not None else None
    else:
        sgx = tuple(int(tcb[f"sgxtcbcomp{i:02d}svn"]) for i in range(1, 17))
        tdx = None
    if len(sgx) != 16 or (tdx is not None and len(tdx) != 16):
        raise ValueError("a TCB level has 16 SGX (and 16 TDX) components")
    return TcbLevel(
        sgx_components=sgx,
        pce_svn=int(tcb["pcesvn"]),
        tdx_components=tdx,
        status=_status(level),
        advisory_ids=tuple(str(a) for a in level.get("advisoryIDs", [])),
    )


def _json_object(body: bytes) -> Mapping[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def parse_tcb_info(body: bytes, chain: tuple[x509.Certificate, ...]) -> TcbInfo:
    d = _json_object(body)
    version = int(d["version"])
    if version not in (2, 3):
        raise ValueError(f"TCB Info version {version} is not supported")
    tcb_type = int(d.get("tcbType", 0))
    if tcb_type != 0:
        raise ValueError(f"TCB type {tcb_type} is not supported")
    module = d.get("tdxModule")
    return TcbInfo(
        id=str(d.get("id", "SGX")),
        version=version,
        issue_date=_parse_time(d["issueDate"]),
        next_update=_parse_time(d["nextUpdate"]),
        fmspc=_hex(d["fmspc"], 6),
        pce_id=_hex(d["pceId"], 2),
        levels=tuple(_tcb_level(level, version) for level in d["tcbLevels"]),
        tdx_module=_module_identity(module, "") if isinstance(module, dict) else None,
        tdx_module_identities=tuple(
            _module_identity(m, "") for m in d.get("tdxModuleIdentities", [])
        ),
        signing_chain=chain,
    )


def parse_qe_identity(body: bytes, chain: tuple[x509.Certificate, ...]) -> QeIdentity:
    d = _json_object(body)
    version = int(d["version"])
    if version != 2:
        raise ValueError(f"enclave identity version {version} is not supported")
    return QeIdentity(
        id=str(d["id"]),
        issue_date=_parse_time(d["issueDate"]),
        next_update=_parse_time(d["nextUpdate"]),
        miscselect=int.from_bytes(_hex(d["miscselect"], 4), "big"),
        miscselect_mask=int.from_bytes(_hex(d["miscselectMask"], 4), "big"),
        attributes=_hex(d["attributes"], 16),
        attributes_mask=_hex(d["attributesMask"], 16),
        mrsigner=_hex(d["mrsigner"], 32),
        isvprodid=int(d["isvprodid"]),
        levels=_levels_of_identity(d["tcbLevels"]),
        signing_chain=chain,
    )


def verify_signing_chain(
    pem: bytes | None, pins: frozenset[str], *, reason: str
) -> tuple[x509.Certificate, ...]:
    """A collateral issuer chain (TCB Signing → Root): ordered, signed, root key pinned."""
    if pem is None:
        raise CollateralError(
            "the collateral's issuer chain is missing", reason="collateral-missing"
        )
    try:
        certs = _x509.order_chain(_x509.load_pem_certs(pem))
    except ValueError as exc:
        raise SignatureError(
            f"the collateral issuer chain is unusable: {exc}", reason=reason
        ) from None
    root = certs[-1]
    if _x509.spki_sha256(root) not in pins or not _x509.issued_by(root, root):
        raise SignatureError(
            "the collateral issuer chain does not end in the pinned root", reason=reason
        )
    for child, parent in itertools.pairwise(certs):
        if not _x509.issued_by(child, parent):
            raise SignatureError("a collateral issuer certificate's signature fails", reason=reason)
    return tuple(certs)


def verify_signed_json(
    body: bytes | None,
    signature: bytes | None,
    chain: tuple[x509.Certificate, ...],
    *,
    reason: str,
) -> bytes:
    """ECDSA P-256/SHA-256 over the exact bytes ``body`` under the chain's leaf key."""
    if body is None or signature is None:
        raise CollateralError("signed collateral is missing", reason="collateral-missing")
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not ecdsa_p256_ok(key, signature, body):
        raise SignatureError("the collateral signature does not verify", reason=reason)
    return body


def load_crl(der: bytes | None, issuer: x509.Certificate, *, what: str) -> Crl:
    """A CRL signed by ``issuer``: parsed, signature-checked, its revoked serials indexed."""
    if der is None:
        raise CollateralError(f"the {what} is missing", reason="collateral-missing")
    try:
        crl = _x509.load_der_crl(der)
    except ValueError:
        raise CollateralError(
            f"the {what} cannot be parsed", reason="malformed-collateral"
        ) from None
    if crl.issuer != issuer.subject:
        raise CollateralError(
            f"the {what} is not issued by {issuer.subject.rfc4514_string()}", reason="crl-issuer"
        )
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise SignatureError(f"the {what} signature does not verify", reason="crl-signature")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CollateralError(f"the {what} has no nextUpdate", reason="malformed-collateral")
    return Crl(crl, crl.last_update_utc, next_update, frozenset(r.serial_number for r in crl))


# --- windows ----------------------------------------------------------------------------------


def collateral_window(not_before: datetime, not_after: datetime, now: datetime) -> Window:
    """TCB Info and identities are valid on ``[issueDate, nextUpdate)``."""
    return _x509.within(now, not_before, not_after, inclusive_end=False)


def check_collateral_windows(tcb: TcbInfo, qe: QeIdentity, now: datetime) -> None:
    """TCB Info and QE Identity are inside their windows (one reason names one item; two, both)."""
    failures = [
        (name, w)
        for name, w in (
            ("tcb-info", collateral_window(tcb.issue_date, tcb.next_update, now)),
            ("qe-identity", collateral_window(qe.issue_date, qe.next_update, now)),
        )
        if w is not Window.VALID
    ]
    if not failures:
        return
    if len(failures) == 2 and failures[0][1] == failures[1][1]:
        raise CollateralError(
            f"TCB Info and QE Identity are both {failures[0][1].value} at {now.isoformat()}",
            reason=f"collateral-{failures[0][1].value}",
        )
    name, window = failures[0]
    raise CollateralError(
        f"the {name} is {window.value} at {now.isoformat()}", reason=f"{name}-{window.value}"
    )


def check_signing_chain_windows(chain: tuple[x509.Certificate, ...], now: datetime) -> None:
    # Time validity of the issuance actually supplied (several TCB-signing issuances exist).
    for cert in chain:
        window = _x509.cert_window(cert, now)
        if window is not Window.VALID:
            raise CollateralError(
                f"collateral signing certificate {cert.subject.rfc4514_string()} is {window.value}",
                reason=f"tcb-signing-cert-{window.value}",
            )


def check_crl(crl: Crl, now: datetime, *, name: str, serial: int) -> None:
    """RFC 5280 §6.3.3: the CRL is current (``[thisUpdate, nextUpdate]``) and ``serial`` absent."""
    window = _x509.within(now, crl.this_update, crl.next_update, inclusive_end=True)
    if window is not Window.VALID:
        raise CollateralError(
            f"the {name} CRL is {window.value} at {now.isoformat()}",
            reason=f"{name}-crl-{window.value}",
        )
    if serial in crl.revoked:
        raise CollateralError(
            f"certificate {serial:#x} is revoked by the {name} CRL", reason=f"{name}-revoked"
        )


# --- TCB matching -----------------------------------------------------------------------------

UP_TO_DATE = "UpToDate"
OUT_OF_DATE = "OutOfDate"
REVOKED = "Revoked"
_KNOWN_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)


def match_qe_identity(qe: SgxReport, identity: QeIdentity) -> tuple[str, tuple[str, ...]]:
    """QE report against the QE Identity; its TCB status by ISVSVN (QVL ``EnclaveIdentityV2``)."""
    masked = int.from_bytes(
        bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True)), "big"
    )
    expected_attrs = int.from_bytes(
        bytes(a & m for a, m in zip(identity.attributes, identity.attributes_mask, strict=True)),
        "big",
    )
    if (
        qe.mr_signer != identity.mrsigner
        or qe.isv_prod_id != identity.isvprodid
        or qe.misc_select & identity.miscselect_mask
        != identity.miscselect & identity.miscselect_mask
        or masked != expected_attrs
    ):
        raise CollateralError(
            "the quoting enclave does not match the QE Identity", reason="qe-identity-mismatch"
        )
    for isvsvn, status, advisories in identity.levels:
        if isvsvn <= qe.isv_svn:
            return status, advisories
    # QVL: an ISVSVN below every level is a revoked QE.
    return REVOKED, ()


def match_platform_level(tcb: TcbInfo, ext: PckExtension, tee_tcb_svn: bytes | None) -> TcbLevel:
    """The first TCB level (Intel orders them newest first) that the platform meets."""
    for level in tcb.levels:
        if ext.pce_svn < level.pce_svn:
            continue
        if any(p < lv for p, lv in zip(ext.tcb_components, level.sgx_components, strict=True)):
            continue
        if tee_tcb_svn is not None:
            if level.tdx_components is None:
                continue
            # TDX 1.5+: with a TDX module major version (byte 1) above 0, bytes 0 and 1 are the
            # module's SVN and version and are matched by its module identity instead.
            start = 2 if tee_tcb_svn[1] > 0 else 0
            if any(tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
                continue
        return level
    raise CollateralError(
        "no TCB level of the TCB Info matches the platform (TCB not supported)",
        reason="no-matching-tcb-level",
    )


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    if len(value) != len(expected) or len(mask) != len(value):
        return False
    return all(v & m == e & m for v, e, m in zip(value, expected, mask, strict=True))


def match_tdx_module(tcb: TcbInfo, report: TdReport) -> tuple[str | None, tuple[str, ...]]:
    """The TDX module against the TCB Info's ``tdxModule`` / ``tdxModuleIdentities``.

    TDX 1.0 modules (TEE_TCB_SVN byte 1 is 0) are matched against ``tdxModule``; later ones
    against the identity ``TDX_<major version>``, whose TCB level gives a status (QVL
    ``TcbInfoV3``, TDX module identity checks).
    """
    major = report.tee_tcb_svn[1]
    if major == 0:
        module = tcb.tdx_module
        if module is None:
            raise CollateralError("TCB Info carries no tdxModule", reason="tdx-module-mismatch")
        if report.mr_signer_seam != module.mrsigner or not _masked_equal(
            report.seam_attributes, module.attributes, module.attributes_mask
        ):
            raise CollateralError(
                "the TDX module is not the one TCB Info names", reason="tdx-module-mismatch"
            )
        return None, ()
    wanted = f"TDX_{major:02X}"
    for identity in tcb.tdx_module_identities:
        if identity.id.upper() != wanted:
            continue
        if report.mr_signer_seam != identity.mrsigner or not _masked_equal(
            report.seam_attributes, identity.attributes, identity.attributes_mask
        ):
            raise CollateralError(
                f"the TDX module does not match {wanted}", reason="tdx-module-mismatch"
            )
        for isvsvn, status, advisories in identity.levels:
            if isvsvn <= report.tee_tcb_svn[0]:
                return status, advisories
        raise CollateralError(
            f"no TCB level of {wanted} matches TDX module SVN {report.tee_tcb_svn[0]}",
            reason="no-matching-tcb-level",
        )
    raise CollateralError(
        f"TCB Info has no TDX module identity {wanted}", reason="tdx-module-mismatch"
    )


def converge(platform: str, other: str | None) -> str:
    """Merge a QE or TDX module status into the platform status (QVL status convergence)."""
    if other is None or other == UP_TO_DATE:
        return platform
    if other == REVOKED:
        return REVOKED
    if other == OUT_OF_DATE:
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return OUT_OF_DATE
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


def final_status(statuses: Sequence[str | None]) -> str:
    platform = statuses[0]
    assert platform is not None
    for other in statuses[1:]:
        platform = converge(platform, other)
    if platform not in _KNOWN_STATUSES:
        raise CollateralError(f"unknown TCB status {platform!r}", reason="malformed-collateral")
    if platform == REVOKED:
        # The vectors' "accept" requires a matching level whose status is not Revoked.
        raise CollateralError("the platform's TCB is revoked", reason="tcb-revoked")
    return platform


# --- the shared pipeline, step by step ---------------------------------------------------------


@dataclass(frozen=True)
class Appraised:
    """The result of the collateral steps: the TCB status and advisories, and the collateral ids."""

    status: str
    advisory_ids: tuple[str, ...]
    fmspc: str
    pce_id: str


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

    def pck_chain(self, quote: Quote, tee: Tee) -> PckChain:
        pem = pck_chain_pem(quote, self.source, tee)
        return self.cache.memo("pck-chain", pem, lambda: build_pck_chain(pem, self.pins))

    def qe_report(self, quote: Quote, chain: PckChain) -> SgxReport:
        """QE report signature and attestation-key binding, memoized per (PCK key, QE report)."""
        material = (
            chain.fingerprints[0]
            + quote.qe_report
            + quote.qe_report_signature
            + quote.attestation_key
            + quote.qe_auth_data
        )

        def check() -> SgxReport:
            verify_qe_report(quote, chain)
            verify_attestation_key_binding(quote)
            return SgxReport.parse(quote.qe_report)

        return self.cache.memo("qe-report", material, check)

    def quote_signature(self, quote: Quote) -> None:
        verify_quote_signature(quote)

    def tcb_info(self, col: DcapCollateral, tee: Tee, chain: PckChain) -> TcbInfo:
        body, sig, pem = col.tcb_info_body, col.tcb_info_signature, col.tcb_info_issuer_chain
        if body is None or sig is None or pem is None:
            raise CollateralError(
                "no TCB Info is available for this platform", reason="collateral-missing"
            )

        def build() -> TcbInfo:
            signers = verify_signing_chain(pem, self.pins, reason="tcb-info-signature")
            verify_signed_json(body, sig, signers, reason="tcb-info-signature")
            try:
                return parse_tcb_info(body, signers)
            except (ValueError, KeyError, TypeError) as exc:
                raise CollateralError(
                    f"TCB Info is malformed: {exc}", reason="malformed-collateral"
                ) from None

        info = self.cache.memo("tcb-info", pem + b"\0" + sig + body, build)
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
            signers = verify_signing_chain(pem, self.pins, reason="qe-identity-signature")
            verify_signed_json(body, sig, signers, reason="qe-identity-signature")
            try:
                return parse_qe_identity(body, signers)
            except (ValueError, KeyError, TypeError) as exc:
                raise CollateralError(
                    f"QE Identity is malformed: {exc}", reason="malformed-collateral"
                ) from None

        identity = self.cache.memo("qe-identity", pem + b"\0" + sig + body, build)
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
        self, col: DcapCollateral, chain: PckChain, tcb: TcbInfo, now: datetime
    ) -> tuple[Crl, Crl]:
        """Root CA CRL (signed by the root) and PCK CRL (by the PCK CA): current, not revoking."""
        root_der, pck_der = col.root_ca_crl, col.pck_crl
        if root_der is None or pck_der is None:
            raise CollateralError(
                "the CRLs for this platform are missing", reason="collateral-missing"
            )
        root = self.cache.memo(
            "root-crl",
            chain.fingerprints[2] + root_der,
            lambda: load_crl(root_der, chain.root, what="Intel SGX Root CA CRL"),
        )
        pck = self.cache.memo(
            "pck-crl",
            chain.fingerprints[1] + pck_der,
            lambda: load_crl(pck_der, chain.ca, what="PCK CRL"),
        )
        check_crl(pck, now, name="pck", serial=chain.leaf.serial_number)
        check_crl(root, now, name="root", serial=chain.ca.serial_number)
        for cert in tcb.signing_chain[:-1]:
            if cert.serial_number in root.revoked:
                raise CollateralError(
                    "the TCB signing certificate is revoked", reason="tcb-signing-revoked"
                )
        return root, pck

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
