"""The SNP rules one by one: layout fields, product detection (CPUID, configuration,
certificates), pinned ARKs, VCEK/VLEK kinds, chip ID, Turin's TCB layout, certificate tables."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from attestation_vectors import TESTDATA, Case, case_named

from cloister.attestation import _snp, _x509, collateral, snp
from cloister.errors import CollateralError, EvidenceError, MalformedEvidenceError, SignatureError

MILAN_V2 = case_named("snp/virtee-milan-vcek")
MILAN_VLEK_V3 = case_named("snp/trustee-milan-vlek")
GENOA_V3 = case_named("snp/trustee-genoa-vcek-reconstructed")
TURIN = TESTDATA / "_pki" / "amd" / "turin"


def _edit(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def _reason(case: Case, evidence: bytes, verifier: snp.SnpVerifier | None = None) -> str:
    with pytest.raises(EvidenceError) as info:
        (verifier or case.verifier()).verify(evidence, now=case.now)
    return info.value.reason


def test_products_come_from_cpuid_in_v3_reports() -> None:
    assert _snp.parse_report(GENOA_V3.evidence).product_from_cpuid() == "Genoa"
    assert _snp.parse_report(MILAN_VLEK_V3.evidence).product_from_cpuid() == "Milan"
    assert _snp.parse_report(MILAN_V2.evidence).product_from_cpuid() is None
    turin = _edit(GENOA_V3.evidence, 0x188, bytes([0x1A, 0x02]))
    assert _snp.parse_report(turin).product_from_cpuid() == "Turin"
    unknown = _edit(GENOA_V3.evidence, 0x188, bytes([0x17, 0x31]))
    assert _reason(GENOA_V3, unknown) == "unsupported-product"


def test_v2_reports_take_the_product_from_configuration_or_certificates() -> None:
    source = collateral.DirectorySource(MILAN_V2.collateral_dir)
    assert snp.SnpVerifier(source, product="Milan").verify(MILAN_V2.evidence, now=MILAN_V2.now)
    assert (
        _reason(MILAN_V2, MILAN_V2.evidence, snp.SnpVerifier(source, product="Genoa"))
        == "vcek-chain"
    )
    with pytest.raises(ValueError):
        snp.SnpVerifier(source, product="Naples")


def test_a_configured_product_must_match_the_report() -> None:
    source = collateral.DirectorySource(GENOA_V3.collateral_dir)
    assert (
        _reason(GENOA_V3, GENOA_V3.evidence, snp.SnpVerifier(source, product="Milan"))
        == "product-mismatch"
    )


def test_arks_are_pinned_per_product() -> None:
    source = collateral.DirectorySource(MILAN_V2.collateral_dir)
    pins = snp.amd_ark_pins()
    swapped = {"Milan": pins["Genoa"], "Genoa": pins["Milan"], "Turin": pins["Turin"]}
    assert (
        _reason(MILAN_V2, MILAN_V2.evidence, snp.SnpVerifier(source, ark_pins=swapped))
        == "vcek-chain"
    )


def test_a_genoa_chain_does_not_endorse_a_milan_report(tmp_path: Path) -> None:
    for name in ("vcek.der", "ask.pem", "ark.pem"):
        src = (
            GENOA_V3.collateral_dir / name if name != "vcek.der" else MILAN_V2.collateral_dir / name
        )
        (tmp_path / name).write_bytes(src.read_bytes())
    verifier = snp.SnpVerifier(collateral.DirectorySource(tmp_path))
    assert _reason(MILAN_V2, MILAN_V2.evidence, verifier) == "vcek-chain"


def test_layout_fields_are_checked() -> None:
    e = MILAN_V2.evidence
    assert _reason(MILAN_V2, _edit(e, 0, struct.pack("<I", 1))) == "unsupported-report-version"
    assert (
        _reason(MILAN_V2, _edit(e, 0x34, struct.pack("<I", 2))) == "unsupported-signature-algorithm"
    )
    flags = struct.unpack_from("<I", e, 0x48)[0]
    assert _reason(MILAN_V2, _edit(e, 0x48, struct.pack("<I", flags | 0x2))) == "report-signature"
    assert (
        _reason(MILAN_V2, _edit(e, 0x48, struct.pack("<I", flags | 7 << 2)))
        == "unsupported-signing-key"
    )
    # Claims VLEK, but the collateral has a VCEK only.
    assert (
        _reason(MILAN_V2, _edit(e, 0x48, struct.pack("<I", flags | 1 << 2))) == "collateral-missing"
    )
    assert _reason(MILAN_V2, e[:-1]) == "malformed-report"


def test_chip_id_must_be_the_vceks() -> None:
    e = MILAN_V2.evidence
    other = _edit(e, 0x1A0, bytes(b ^ 0xFF for b in e[0x1A0:0x1A8]))
    assert _reason(MILAN_V2, other) == "chip-id-mismatch"


def test_reported_tcb_must_be_the_certificates() -> None:
    e = MILAN_V2.evidence
    bumped = _edit(e, 0x187, bytes([e[0x187] + 1]))  # microcode SPL
    assert _reason(MILAN_V2, bumped) == "reported-tcb-mismatch"


def test_turin_tcb_layout_and_8_byte_hwid() -> None:
    vcek = _x509.load_der_cert((TURIN / "vcek_turin.der").read_bytes())
    ek = _snp.endorsement_key(vcek)
    assert (ek.fmc, ek.bootloader, ek.tee, ek.snp, ek.microcode) == (0, 0, 0, 0, 9)
    assert ek.hwid is not None and len(ek.hwid) == 8
    raw = int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 9]), "little")
    tcb = _snp.TcbVersion.from_raw(raw, turin=True)
    assert (tcb.fmc, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (1, 2, 3, 4, 9)
    milan = _snp.TcbVersion.from_raw(raw, turin=False)
    assert (milan.bootloader, milan.tee, milan.snp, milan.microcode, milan.fmc) == (
        1,
        2,
        0,
        9,
        None,
    )


def test_a_turin_report_is_checked_up_to_its_signature(tmp_path: Path) -> None:
    # No signed Turin report exists in the vectors: build one whose every field matches the
    # real Turin VCEK; everything but the (absent) signature must then pass.
    vcek_der = (TURIN / "vcek_turin.der").read_bytes()
    ek = _snp.endorsement_key(_x509.load_der_cert(vcek_der))
    assert ek.hwid is not None
    report = bytearray(_snp.REPORT_SIZE)
    struct.pack_into("<I", report, 0, 3)
    struct.pack_into("<I", report, 0x34, 1)
    report[0x180:0x188] = bytes([0, 0, 0, 0, 0, 0, 0, 9])
    report[0x188:0x18A] = bytes([0x1A, 0x02])
    report[0x1A0:0x1A8] = ek.hwid
    (tmp_path / "vcek.der").write_bytes(vcek_der)
    chain = _x509.load_pem_certs((TURIN / "cert_chain_turin.pem").read_bytes())
    (tmp_path / "ask.pem").write_bytes(chain[0].public_bytes(_x509.serialization.Encoding.PEM))
    verifier = snp.SnpVerifier(collateral.DirectorySource(tmp_path))
    now = _x509.load_der_cert(vcek_der).not_valid_before_utc
    with pytest.raises(SignatureError) as info:
        verifier.verify(bytes(report), now=now)
    assert info.value.reason == "report-signature"
    wrong_tcb = bytes(report[:0x180]) + bytes([1, 0, 0, 0, 0, 0, 0, 9]) + bytes(report[0x188:])
    with pytest.raises(CollateralError) as tcb_info:
        verifier.verify(wrong_tcb, now=now)
    assert tcb_info.value.reason == "reported-tcb-mismatch"


def _der(path: Path) -> bytes:
    return _x509.load_pem_certs(path.read_bytes())[0].public_bytes(_x509.serialization.Encoding.DER)


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    size = 24 * (len(entries) + 1)
    head, body = b"", b""
    for guid, blob in entries:
        head += guid + struct.pack("<II", size + len(body), len(blob))
        body += blob
    return head + bytes(24) + body


def test_certificate_tables_are_bounded() -> None:
    vcek = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
    assert _snp.parse_cert_table(_table([(vcek, b"abc"), (b"\x11" * 16, b"zz")])) == {
        "vcek": b"abc"
    }
    with pytest.raises(MalformedEvidenceError):
        _snp.parse_cert_table(_table([(vcek, b"abc")])[:30])  # no terminator
    bad = bytearray(_table([(vcek, b"abc")]))
    struct.pack_into("<I", bad, 20, 10_000)
    with pytest.raises(MalformedEvidenceError):
        _snp.parse_cert_table(bytes(bad))
    with pytest.raises(MalformedEvidenceError):
        _snp.parse_cert_table(_table([(vcek, b"a")] * 17))


def test_a_report_with_its_certificate_table_needs_no_collateral(tmp_path: Path) -> None:
    col = MILAN_V2.collateral_dir
    table = _table(
        [
            (
                uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes,
                (col / "vcek.der").read_bytes(),
            ),
            (uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes, _der(col / "ask.pem")),
            (uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes, _der(col / "ark.pem")),
        ]
    )
    verifier = snp.SnpVerifier(collateral.DirectorySource(tmp_path))
    claims = verifier.verify(MILAN_V2.evidence + table, now=MILAN_V2.now)
    assert claims.values["product"] == "Milan"
