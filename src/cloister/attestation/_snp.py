"""AMD SEV-SNP: report layout, TCB versions, VCEK/VLEK extensions and the certificate table.

Owns parsing, not judgement: the ``ATTESTATION_REPORT`` structure (SEV-SNP Firmware ABI
Specification, Table "ATTESTATION_REPORT Structure"), the ``TCB_VERSION`` layouts of Milan /
Genoa and of Turin, the X.509 extensions AMD puts in VCEK and VLEK certificates (AMD
"Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification", Table
"VCEK Certificate Extensions") and the certificate table of an extended report (GHCB
specification, ``SNP_GUEST_REQUEST`` extended request / Linux ``auxblob``).

Does not own: the verification order and reasons (``snp.py``).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from cryptography import x509

from cloister import limits
from cloister.attestation import _x509
from cloister.errors import MalformedEvidenceError

REPORT_SIZE = 0x4A0  # 1184 bytes
SIGNED_SIZE = 0x2A0  # the signature covers bytes [0, 0x2A0)
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7
POLICY_DEBUG_BIT = 19
PRODUCTS = ("Milan", "Genoa", "Turin")

_AMD_OID = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = _AMD_OID + "2"
OID_BL_SPL = _AMD_OID + "3.1"
OID_TEE_SPL = _AMD_OID + "3.2"
OID_SNP_SPL = _AMD_OID + "3.3"
OID_UCODE_SPL = _AMD_OID + "3.8"
OID_FMC_SPL = _AMD_OID + "3.9"
OID_HWID = _AMD_OID + "4"
OID_CSP_ID = _AMD_OID + "5"

# Certificate table GUIDs (GHCB spec §4.1.8.1 "SNP Extended Guest Request").
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
_TABLE_NAMES = {GUID_ARK: "ark", GUID_ASK: "ask", GUID_VCEK: "vcek", GUID_VLEK: "vlek"}
MAX_TABLE_ENTRIES = 16


def malformed(message: str) -> MalformedEvidenceError:
    return MalformedEvidenceError(message, reason="malformed-report")


@dataclass(frozen=True)
class TcbVersion:
    """A 64-bit ``TCB_VERSION``. Milan/Genoa: BL, TEE, 4 reserved, SNP, microcode (byte order);
    Turin: FMC, BL, TEE, SNP, 3 reserved, microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None

    @classmethod
    def from_raw(cls, raw: int, *, turin: bool) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], fmc=None)

    def as_dict(self) -> dict[str, int]:
        out = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True)
class Report:
    """The fields of an SNP attestation report that verification and claims use."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int
    cpuid_mod_id: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    signature_r: int
    signature_s: int

    @property
    def signed(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> int:
        return (self.flags >> 2) & 0x7

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.flags & 0x2)

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    def product_from_cpuid(self) -> str | None:
        """The product from CPUID family/model (report v3+); ``None`` when absent (v2)."""
        if self.version < 3 or self.cpuid_fam_id == 0:
            return None
        fam, model = self.cpuid_fam_id, self.cpuid_mod_id
        if fam == 0x19 and model <= 0x0F:
            return "Milan"
        if fam == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
            return "Genoa"
        if fam == 0x1A and model <= 0x1F:
            return "Turin"
        return "unknown"


def parse_report(data: bytes) -> Report:
    """Parse exactly one 1184-byte report; ``MalformedEvidenceError`` otherwise."""
    if len(data) != REPORT_SIZE:
        raise malformed(f"an SNP report is {REPORT_SIZE} bytes, got {len(data)}")

    def u32(off: int) -> int:
        return int.from_bytes(data[off : off + 4], "little")

    def u64(off: int) -> int:
        return int.from_bytes(data[off : off + 8], "little")

    return Report(
        raw=bytes(data),
        version=u32(0x00),
        guest_svn=u32(0x04),
        policy=u64(0x08),
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=u32(0x30),
        signature_algo=u32(0x34),
        current_tcb=u64(0x38),
        platform_info=u64(0x40),
        flags=u32(0x48),
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=u64(0x180),
        cpuid_fam_id=data[0x188],
        cpuid_mod_id=data[0x189],
        cpuid_step=data[0x18A],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=u64(0x1E0),
        launch_tcb=u64(0x1F0),
        # R and S are little-endian, zero-extended to 72 bytes (ABI "ECDSA P-384 signature").
        signature_r=int.from_bytes(data[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(data[0x2E8:0x330], "little"),
    )


def split_evidence(evidence: bytes) -> tuple[bytes, dict[str, bytes]]:
    """A report, optionally followed by its extended-report certificate table."""
    if len(evidence) > limits.MAX_EVIDENCE_BYTES:
        raise malformed(f"SNP evidence exceeds MAX_EVIDENCE_BYTES ({limits.MAX_EVIDENCE_BYTES})")
    if len(evidence) < REPORT_SIZE:
        raise malformed(f"an SNP report is {REPORT_SIZE} bytes, got {len(evidence)}")
    report, table = evidence[:REPORT_SIZE], evidence[REPORT_SIZE:]
    return report, (parse_cert_table(table) if table.strip(b"\0") else {})


def _guid(raw: bytes) -> uuid.UUID | None:
    # Hypervisors write the GUID either in RFC 4122 order or in the mixed-endian UEFI order.
    for candidate in (uuid.UUID(bytes=raw), uuid.UUID(bytes_le=raw)):
        if candidate in _TABLE_NAMES:
            return candidate
    return None


def parse_cert_table(table: bytes) -> dict[str, bytes]:
    """Entries ``{guid[16], offset u32, length u32}`` ending with a zero entry; offsets are
    from the table's start. Unknown GUIDs are skipped."""
    out: dict[str, bytes] = {}
    for i in range(MAX_TABLE_ENTRIES + 1):
        pos = i * 24
        if pos + 24 > len(table):
            raise malformed("the certificate table has no terminating entry")
        entry = table[pos : pos + 24]
        if entry == bytes(24):
            return out
        offset, length = struct.unpack_from("<II", entry, 16)
        if offset + length > len(table) or length > limits.MAX_COLLATERAL_ITEM_BYTES:
            raise malformed("a certificate table entry points outside the table")
        guid = _guid(entry[:16])
        if guid is not None:
            out[_TABLE_NAMES[guid]] = table[offset : offset + length]
    raise malformed(f"the certificate table has more than {MAX_TABLE_ENTRIES} entries")


def load_cert(data: bytes) -> x509.Certificate:
    """DER or PEM, one certificate."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return _x509.load_pem_certs(data, max_count=1)[0]
    return _x509.load_der_cert(data.rstrip(b"\0") if data.endswith(b"\0\0") else data)


@dataclass(frozen=True)
class EndorsementKey:
    """What a VCEK or VLEK certificate says about the chip: product, TCB and hardware ID."""

    product_name: str | None
    bootloader: int | None
    tee: int | None
    snp: int | None
    microcode: int | None
    fmc: int | None
    hwid: bytes | None
    csp_id: str | None


def _ext_values(cert: x509.Certificate) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.UnrecognizedExtension):
            out[ext.oid.dotted_string] = value.value
    return out


def _int_ext(values: dict[str, bytes], oid: str) -> int | None:
    raw = values.get(oid)
    return None if raw is None else _x509.der_int(_x509.der_one(raw))


def _string_ext(values: dict[str, bytes], oid: str) -> str | None:
    raw = values.get(oid)
    if raw is None:
        return None
    tlv = _x509.der_one(raw)
    if tlv.tag not in (0x16, 0x0C, 0x13):  # IA5String, UTF8String, PrintableString
        raise ValueError("expected a string")
    return tlv.content.decode("utf-8", "replace")


def endorsement_key(cert: x509.Certificate) -> EndorsementKey:
    values = _ext_values(cert)
    hwid = values.get(OID_HWID)
    if hwid is not None and len(hwid) in (66, 10) and hwid[0] == 0x04:
        hwid = _x509.der_one(hwid).content  # tolerate a DER-wrapped OCTET STRING
    return EndorsementKey(
        product_name=_string_ext(values, OID_PRODUCT_NAME),
        bootloader=_int_ext(values, OID_BL_SPL),
        tee=_int_ext(values, OID_TEE_SPL),
        snp=_int_ext(values, OID_SNP_SPL),
        microcode=_int_ext(values, OID_UCODE_SPL),
        fmc=_int_ext(values, OID_FMC_SPL),
        hwid=hwid,
        csp_id=_string_ext(values, OID_CSP_ID),
    )


def product_of_name(name: x509.Name) -> str | None:
    """``ARK-Milan``, ``SEV-Milan``, ``SEV-VLEK-Genoa`` → the product."""
    cn = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cn:
        return None
    suffix = str(cn[0].value).rsplit("-", 1)[-1]
    return suffix if suffix in PRODUCTS else None
