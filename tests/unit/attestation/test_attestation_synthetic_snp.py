"""SNP verification end to end on a synthetic AMD PKI: a Turin VCEK report and a Genoa VLEK
report, which no real vector has. The private ARKs are pinned through ``ark_pins=``."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cloister.attestation import _snp, _x509, collateral, snp
from cloister.errors import CollateralError, EvidenceError, SignatureError

NOW = datetime(2025, 6, 1, tzinfo=UTC)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD = "1.3.6.1.4.1.3704.1."


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _int_ext(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(raw)]) + raw


def _ia5(text: str) -> bytes:
    return bytes([0x16, len(text)]) + text.encode()


def _cert(
    subject: str,
    key: object,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    extensions: dict[str, bytes] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30))
        .not_valid_after(NOW + timedelta(days=365))
    )
    for oid, value in (extensions or {}).items():
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)


class AmdWorld:
    """ARK → ASK/ASVK → VCEK/VLEK for one product, and reports signed by the endorsement key."""

    def __init__(self, product: str) -> None:
        self.product = product
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.signer_key = rsa.generate_private_key(65537, 2048)
        self.ek_key = ec.generate_private_key(ec.SECP384R1())
        self.ark = _cert(f"ARK-{product}", self.ark_key, f"ARK-{product}", self.ark_key)
        self.ask = _cert(f"SEV-{product}", self.signer_key, f"ARK-{product}", self.ark_key)
        self.asvk = _cert(f"SEV-VLEK-{product}", self.signer_key, f"ARK-{product}", self.ark_key)

    @property
    def turin(self) -> bool:
        return self.product == "Turin"

    def endorsement(self, kind: str, tcb: dict[str, int], chip_id: bytes) -> x509.Certificate:
        ext = {
            AMD + "1": _int_ext(1 if self.turin else 0),
            AMD + "2": _ia5(self.product if kind == "vlek" else f"{self.product}-B0"),
            AMD + "3.1": _int_ext(tcb["bootloader"]),
            AMD + "3.2": _int_ext(tcb["tee"]),
            AMD + "3.3": _int_ext(tcb["snp"]),
            AMD + "3.8": _int_ext(tcb["microcode"]),
        }
        if self.turin:
            ext[AMD + "3.9"] = _int_ext(tcb["fmc"])
        if kind == "vcek":
            ext[AMD + "4"] = chip_id[:8] if self.turin else chip_id
            return _cert("SEV-VCEK", self.ek_key, f"SEV-{self.product}", self.signer_key, ext)
        ext[AMD + "5"] = _ia5("CN=cloud.example")
        return _cert("SEV-VLEK", self.ek_key, f"SEV-VLEK-{self.product}", self.signer_key, ext)

    def report(self, kind: str, tcb: dict[str, int], chip_id: bytes, report_data: bytes) -> bytes:
        r = bytearray(_snp.REPORT_SIZE)
        struct.pack_into("<IIQ", r, 0, 3, 7, 0x30000)  # version 3, guest SVN 7, policy
        struct.pack_into("<I", r, 0x34, 1)  # ECDSA P-384 with SHA-384
        struct.pack_into("<I", r, 0x48, (1 if kind == "vlek" else 0) << 2)
        r[0x50:0x90] = report_data
        r[0x90:0xC0] = b"\x42" * 48
        if self.turin:
            raw = bytes(
                [tcb["fmc"], tcb["bootloader"], tcb["tee"], tcb["snp"], 0, 0, 0, tcb["microcode"]]
            )
            r[0x188:0x18B] = bytes([0x1A, 0x02, 0x00])
        else:
            raw = bytes([tcb["bootloader"], tcb["tee"], 0, 0, 0, 0, tcb["snp"], tcb["microcode"]])
            r[0x188:0x18B] = bytes([0x19, 0x11, 0x01])
        r[0x180:0x188] = raw
        r[0x1A0:0x1E0] = chip_id
        sig = self.ek_key.sign(bytes(r[: _snp.SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        rs, ss = decode_dss_signature(sig)
        r[0x2A0:0x2E8] = rs.to_bytes(72, "little")
        r[0x2E8:0x330] = ss.to_bytes(72, "little")
        return bytes(r)

    def directory(self, path: Path, kind: str, ek: x509.Certificate) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{kind}.der").write_bytes(ek.public_bytes(serialization.Encoding.DER))
        signer = self.ask if kind == "vcek" else self.asvk
        (path / ("ask.pem" if kind == "vcek" else "asvk.pem")).write_bytes(
            signer.public_bytes(serialization.Encoding.PEM)
        )
        (path / "ark.pem").write_bytes(self.ark.public_bytes(serialization.Encoding.PEM))
        return path

    def verifier(self, path: Path) -> snp.SnpVerifier:
        pins = dict(snp.amd_ark_pins())
        pins[self.product] = _x509.spki_sha256(self.ark)
        return snp.SnpVerifier(collateral.DirectorySource(path), ark_pins=pins)


TCB = {"fmc": 1, "bootloader": 4, "tee": 0, "snp": 23, "microcode": 72}
CHIP = bytes(range(64))
DATA = b"\x99" * 64


@pytest.fixture(scope="module")
def turin() -> AmdWorld:
    return AmdWorld("Turin")


@pytest.fixture(scope="module")
def genoa() -> AmdWorld:
    return AmdWorld("Genoa")


def test_a_turin_vcek_report_verifies(turin: AmdWorld, tmp_path: Path) -> None:
    ek = turin.endorsement("vcek", TCB, CHIP)
    claims = turin.verifier(turin.directory(tmp_path, "vcek", ek)).verify(
        turin.report("vcek", TCB, CHIP, DATA), now=NOW
    )
    assert claims.report_data == DATA
    assert claims.values["product"] == "Turin"
    assert claims.values["reported_tcb_fmc"] == 1
    assert claims.values["reported_tcb_snp"] == 23
    assert claims.values["guest_svn"] == 7


def test_turin_chip_id_is_its_first_8_bytes(turin: AmdWorld, tmp_path: Path) -> None:
    ek = turin.endorsement("vcek", TCB, CHIP)
    other = CHIP[:8] + b"\xff" * 56  # only the first 8 bytes are the hardware ID on Turin
    assert turin.verifier(turin.directory(tmp_path, "vcek", ek)).verify(
        turin.report("vcek", TCB, other, DATA), now=NOW
    )
    wrong = b"\xff" + CHIP[1:]
    with pytest.raises(CollateralError) as info:
        turin.verifier(turin.directory(tmp_path, "vcek", ek)).verify(
            turin.report("vcek", TCB, wrong, DATA), now=NOW
        )
    assert info.value.reason == "chip-id-mismatch"


def test_turin_fmc_spl_is_compared(turin: AmdWorld, tmp_path: Path) -> None:
    ek = turin.endorsement("vcek", {**TCB, "fmc": 2}, CHIP)
    with pytest.raises(CollateralError) as info:
        turin.verifier(turin.directory(tmp_path, "vcek", ek)).verify(
            turin.report("vcek", TCB, CHIP, DATA), now=NOW
        )
    assert info.value.reason == "reported-tcb-mismatch"


def test_a_genoa_vlek_report_verifies_without_chip_id(genoa: AmdWorld, tmp_path: Path) -> None:
    ek = genoa.endorsement("vlek", TCB, CHIP)
    claims = genoa.verifier(genoa.directory(tmp_path, "vlek", ek)).verify(
        genoa.report("vlek", TCB, bytes(64), DATA), now=NOW
    )
    assert claims.values["signing_key"] == "vlek"
    assert claims.values["product"] == "Genoa"
    assert claims.values["csp_id"] == "CN=cloud.example"


def test_a_vlek_chain_under_another_ark_is_refused(genoa: AmdWorld, tmp_path: Path) -> None:
    other = AmdWorld("Genoa")  # same names, other keys: the ASVK does not verify under it
    ek = genoa.endorsement("vlek", TCB, CHIP)
    path = genoa.directory(tmp_path, "vlek", ek)
    (path / "ark.pem").write_bytes(other.ark.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(SignatureError) as info:
        genoa.verifier(path).verify(genoa.report("vlek", TCB, bytes(64), DATA), now=NOW)
    assert info.value.reason == "vlek-chain"


def test_every_signed_byte_of_a_turin_report_is_protected(turin: AmdWorld, tmp_path: Path) -> None:
    ek = turin.endorsement("vcek", TCB, CHIP)
    verifier = turin.verifier(turin.directory(tmp_path, "vcek", ek))
    report = turin.report("vcek", TCB, CHIP, DATA)
    verifier.verify(report, now=NOW)
    for offset in range(0, _snp.SIGNED_SIZE + 144, 3):
        mutated = bytearray(report)
        mutated[offset] ^= 0x01
        with pytest.raises(EvidenceError):
            verifier.verify(bytes(mutated), now=NOW)
