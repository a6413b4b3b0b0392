"""A synthetic Intel DCAP world for the shapes no real vector has.

It builds a private root (named like Intel's, pinned through ``intel_roots=``), a PCK CA and a
PCK certificate with an SGX extension, a TCB signing certificate, signed TCB Info and QE
Identity, CRLs, and quotes v3/v4/v5 with SGX, TD 1.0 and TD 1.5 bodies, exactly in the layouts
the verifiers parse. Real vectors remain the reference; this covers SGX v4/v5, TDX v5 with a
TD 1.0 body, revoked TCB levels and certificates, TCB Info v2 and non-type-5 certification
data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cloister.attestation import collateral

NOW = datetime(2025, 6, 1, tzinfo=UTC)
FMSPC = bytes.fromhex("00906ed50000")
PCE_ID = bytes.fromhex("0000")
QE_MRSIGNER = bytes(range(32))
SGX_EXT = "1.2.840.113741.1.13.1"


# --- DER, just enough for the SGX extension ----------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(oid) + value)


def sgx_extension(components: list[int], pce_svn: int, cpu_svn: bytes) -> bytes:
    tcb = b"".join(_pair(f"{SGX_EXT}.2.{i + 1}", _int(c)) for i, c in enumerate(components))
    tcb += _pair(f"{SGX_EXT}.2.17", _int(pce_svn)) + _pair(f"{SGX_EXT}.2.18", _tlv(0x04, cpu_svn))
    return _tlv(
        0x30,
        _pair(f"{SGX_EXT}.1", _tlv(0x04, bytes(16)))
        + _pair(f"{SGX_EXT}.2", _tlv(0x30, tcb))
        + _pair(f"{SGX_EXT}.3", _tlv(0x04, PCE_ID))
        + _pair(f"{SGX_EXT}.4", _tlv(0x04, FMSPC))
        + _pair(f"{SGX_EXT}.5", _tlv(0x0A, b"\x00")),
    )


# --- certificates ----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Synthetic Test PKI"),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    serial: int,
    ca: bool,
    extra: x509.ExtensionType | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    pck_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    tcb_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    components: list[int] = field(default_factory=lambda: [5] * 16)
    pce_svn: int = 13

    def __post_init__(self) -> None:
        root_cn = "Intel SGX Root CA"
        self.root = _cert(root_cn, self.root_key, root_cn, self.root_key, serial=1, ca=True)
        self.ca = _cert(
            "Intel SGX PCK Processor CA", self.ca_key, root_cn, self.root_key, serial=2, ca=True
        )
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXT), sgx_extension(self.components, self.pce_svn, bytes(16))
        )
        self.pck = _cert(
            "Intel SGX PCK Certificate",
            self.pck_key,
            "Intel SGX PCK Processor CA",
            self.ca_key,
            serial=77,
            ca=False,
            extra=ext,
        )
        self.tcb_signer = _cert(
            "Intel SGX TCB Signing", self.tcb_key, root_cn, self.root_key, serial=3, ca=False
        )

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def pck_chain(self) -> bytes:
        return _pem(self.pck, self.ca, self.root)

    def crl(
        self,
        issuer: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        revoked: tuple[int, ...] = (),
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(NOW - timedelta(days=1))
            .next_update(NOW + timedelta(days=29))
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - timedelta(days=2))
                .build()
            )
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- collateral --------------------------------------------------------------------------------


def _window() -> dict[str, object]:
    return {
        "issueDate": (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nextUpdate": (NOW + timedelta(days=29)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def tcb_info(
    tdx: bool,
    *,
    status: str = "UpToDate",
    advisories: tuple[str, ...] = (),
    version: int = 3,
    sgx_components: int = 5,
    tdx_components: int = 1,
) -> dict[str, object]:
    level_tcb: dict[str, object]
    if version == 2:
        level_tcb = {f"sgxtcbcomp{i:02d}svn": sgx_components for i in range(1, 17)}
        level_tcb["pcesvn"] = 13
    else:
        level_tcb = {"sgxtcbcomponents": [{"svn": sgx_components}] * 16, "pcesvn": 13}
        if tdx:
            # Bytes 0-1 of TEE_TCB_SVN are the module's SVN and major version.
            level_tcb["tdxtcbcomponents"] = [{"svn": 0}] * 2 + [{"svn": tdx_components}] * 14
    level: dict[str, object] = {
        "tcb": level_tcb,
        "tcbDate": "2024-01-01T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    body: dict[str, object] = {}
    if version == 3:
        body["id"] = "TDX" if tdx else "SGX"
    body.update(version=version, **_window())
    body.update(
        fmspc=FMSPC.hex().upper(), pceId=PCE_ID.hex().upper(), tcbType=0, tcbEvaluationDataNumber=17
    )
    if tdx:
        body["tdxModule"] = {
            "mrsigner": "00" * 48,
            "attributes": "00" * 8,
            "attributesMask": "FF" * 8,
        }
        body["tdxModuleIdentities"] = [
            {
                "id": "TDX_01",
                "mrsigner": "00" * 48,
                "attributes": "00" * 8,
                "attributesMask": "FF" * 8,
                "tcbLevels": [
                    {
                        "tcb": {"isvsvn": 2},
                        "tcbDate": "2024-01-01T00:00:00Z",
                        "tcbStatus": "UpToDate",
                    }
                ],
            }
        ]
    body["tcbLevels"] = [level]
    return body


def qe_identity(tdx: bool) -> dict[str, object]:
    body: dict[str, object] = {"id": "TD_QE" if tdx else "QE", "version": 2, **_window()}
    body.update(
        tcbEvaluationDataNumber=17,
        miscselect="00000000",
        miscselectMask="FFFFFFFF",
        attributes="11000000000000000000000000000000",
        attributesMask="FBFFFFFFFFFFFFFF0000000000000000",
        mrsigner=QE_MRSIGNER.hex().upper(),
        isvprodid=2 if tdx else 1,
        tcbLevels=[
            {"tcb": {"isvsvn": 4}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate"}
        ],
    )
    return body


def dcap_collateral(
    pki: Pki, tdx: bool, *, tcb: dict[str, object] | None = None, revoked: tuple[int, ...] = ()
) -> collateral.DcapCollateral:
    tcb_body = json.dumps(tcb or tcb_info(tdx), separators=(",", ":")).encode()
    qe_body = json.dumps(qe_identity(tdx), separators=(",", ":")).encode()
    signers = _pem(pki.tcb_signer, pki.root)
    return collateral.DcapCollateral(
        tcb_info_body=tcb_body,
        tcb_info_signature=_raw_sig(pki.tcb_key, tcb_body),
        tcb_info_issuer_chain=signers,
        qe_identity_body=qe_body,
        qe_identity_signature=_raw_sig(pki.tcb_key, qe_body),
        qe_identity_issuer_chain=signers,
        pck_crl=pki.crl(pki.ca, pki.ca_key, revoked),
        root_ca_crl=pki.crl(pki.root, pki.root_key),
    )


def write_directory(
    path: Path, col: collateral.DcapCollateral, pck_chain: bytes | None = None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    assert (
        col.tcb_info_body
        and col.tcb_info_signature
        and col.qe_identity_body
        and col.qe_identity_signature
    )
    (path / "tcb_info_body.json").write_bytes(col.tcb_info_body)
    (path / "tcb_info_signature.hex").write_text(col.tcb_info_signature.hex())
    (path / "tcb_info_issuer_chain.pem").write_bytes(col.tcb_info_issuer_chain or b"")
    (path / "qe_identity_body.json").write_bytes(col.qe_identity_body)
    (path / "qe_identity_signature.hex").write_text(col.qe_identity_signature.hex())
    (path / "qe_identity_issuer_chain.pem").write_bytes(col.qe_identity_issuer_chain or b"")
    (path / "pck_crl.der").write_bytes(col.pck_crl or b"")
    (path / "root_ca_crl.der").write_bytes(col.root_ca_crl or b"")
    if pck_chain is not None:
        (path / "pck_chain.pem").write_bytes(pck_chain)
    return path


class StaticSource:
    """Serves one ``DcapCollateral`` (and optionally a PCK chain)."""

    def __init__(self, col: collateral.DcapCollateral, pck_chain: bytes | None = None) -> None:
        self.col = col
        self.chain = pck_chain

    def dcap_collateral(self, request: collateral.DcapRequest) -> collateral.DcapCollateral:
        return self.col

    def pck_chain(self, request: collateral.PckRequest) -> bytes:
        if self.chain is None:
            raise collateral._missing("PCK chain")
        return self.chain

    def snp_collateral(self, request: collateral.SnpRequest) -> collateral.SnpCollateral:
        raise collateral._missing("SNP collateral")


# --- quotes --------------------------------------------------------------------------------------


def sgx_body(report_data: bytes, *, debug: bool = False, mrenclave: bytes = b"\xaa" * 32) -> bytes:
    body = bytearray(384)
    body[48] = 0x07 if debug else 0x05  # ATTRIBUTES.FLAGS: INIT | (DEBUG) | MODE64BIT
    body[64:96] = mrenclave
    body[128:160] = b"\xbb" * 32
    struct.pack_into("<HH", body, 256, 3, 9)
    body[320:384] = report_data
    return bytes(body)


def td_body(report_data: bytes, *, td15: bool, module_major: int = 0, debug: bool = False) -> bytes:
    body = bytearray(648 if td15 else 584)
    body[0:16] = bytes([3, module_major]) + bytes([1] * 14)  # TEE_TCB_SVN
    body[120] = 0x01 if debug else 0x00  # TD_ATTRIBUTES.DEBUG
    body[136:184] = b"\x11" * 48  # MRTD
    body[520:584] = report_data
    if td15:
        body[584:600] = body[0:16]  # TEE_TCB_SVN2: no TD-preserving update
    return bytes(body)


def _qe_report(attestation_key: bytes, auth_data: bytes, tdx: bool) -> bytes:
    report = bytearray(384)
    report[48] = 0x11
    report[128:160] = QE_MRSIGNER
    struct.pack_into("<HH", report, 256, 2 if tdx else 1, 6)
    report[320:352] = hashlib.sha256(attestation_key + auth_data).digest()
    return bytes(report)


def quote(
    pki: Pki,
    body: bytes,
    *,
    version: int,
    tdx: bool,
    cert_type: int = 5,
    cert_data: bytes | None = None,
) -> bytes:
    att = ec.generate_private_key(ec.SECP256R1())
    att_pub = att.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    header = (
        struct.pack("<HHIHH", version, 2, 0x81 if tdx else 0, 0, 0)
        + bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
        + bytes(20)
    )
    if version == 5:
        body_type = 1 if not tdx else (3 if len(body) == 648 else 2)
        signed = header + struct.pack("<HI", body_type, len(body)) + body
    else:
        signed = header + body
    auth = b"\x5a" * 32
    qe = _qe_report(att_pub, auth, tdx)
    chain = pki.pck_chain if cert_data is None else cert_data
    inner = qe + _raw_sig(pki.pck_key, qe) + struct.pack("<H", len(auth)) + auth
    inner += struct.pack("<HI", cert_type, len(chain)) + chain
    if version >= 4:
        inner = struct.pack("<HI", 6, len(inner)) + inner
    sig_data = _raw_sig(att, signed) + att_pub + inner
    return signed + struct.pack("<I", len(sig_data)) + sig_data
