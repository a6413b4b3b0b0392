"""Hardware evidence providers against a temporary directory tree that plays the kernel.

Gramine's ``/dev/attestation`` is plain files (the quote file holds a real vector quote). For
configfs-tsm, ``_FakeTsm`` emulates what the kernel does behind the attribute files: it fills a
new report entry, counts writes in ``generation`` and answers ``inblob`` with a real vector's
evidence in ``outblob`` (and, for SNP, the certificate table in ``auxblob``). The evidence the
providers return is then verified by the real verifiers.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from cloister.agent import evidence_hw
from cloister.attestation import Tee, _x509, collateral, sgx, snp, tdx
from cloister.errors import BackendUnavailable, BindingError

TESTDATA = Path(
    os.environ.get(
        "CLOISTER_TESTDATA",
        Path(__file__).resolve().parents[3] / ".." / "shared" / "testdata" / "attestation",
    )
)


def _accepted(tee: str, want: str = "") -> tuple[Path, dict[str, object]]:
    for path in sorted((TESTDATA / tee).iterdir()):
        spec = json.loads((path / "case.json").read_text())
        if spec["expect"] == "accept" and want in path.name:
            return path, spec
    raise AssertionError(f"no accepted {tee} vector")


def _now(spec: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(spec["verify_at"]).replace("Z", "+00:00"))


def _report_data(spec: dict[str, object]) -> bytes:
    claims = spec["claims"]
    assert isinstance(claims, dict)
    return bytes.fromhex(claims["report_data"])


# --- Gramine ------------------------------------------------------------------------------------


def _gramine(tmp_path: Path, quote: bytes, kind: str = "dcap") -> Path:
    root = tmp_path / "dev" / "attestation"
    root.mkdir(parents=True)
    (root / "attestation_type").write_text(kind + "\n")
    (root / "quote").write_bytes(quote)
    (root / "user_report_data").write_bytes(b"")
    return root


def test_gramine_quote_is_bound_and_verifies(tmp_path: Path) -> None:
    case, spec = _accepted("sgx")
    root = _gramine(tmp_path, (case / "evidence.bin").read_bytes())
    provider = evidence_hw.GramineProvider(root)
    assert provider.tee is Tee.SGX
    quote = provider.evidence(_report_data(spec))
    assert (root / "user_report_data").read_bytes() == _report_data(spec)
    claims = sgx.SgxVerifier(collateral.DirectorySource(case / "collateral")).verify(
        quote, now=_now(spec)
    )
    assert claims.report_data == _report_data(spec)


def test_gramine_stale_quote_is_refused(tmp_path: Path) -> None:
    case, _ = _accepted("sgx")
    root = _gramine(tmp_path, (case / "evidence.bin").read_bytes())
    with pytest.raises(BindingError):
        evidence_hw.GramineProvider(root).evidence(b"\x01" * 64)


def test_gramine_without_dcap_is_unavailable(tmp_path: Path) -> None:
    root = _gramine(tmp_path, b"", kind="none")
    assert not evidence_hw.GramineProvider.available(root)
    with pytest.raises(BackendUnavailable):
        evidence_hw.GramineProvider(root).evidence(bytes(64))
    with pytest.raises(BackendUnavailable):
        evidence_hw.GramineProvider(tmp_path / "missing").evidence(bytes(64))


def test_report_data_must_be_64_bytes(tmp_path: Path) -> None:
    root = _gramine(tmp_path, b"")
    with pytest.raises(ValueError):
        evidence_hw.GramineProvider(root).evidence(b"short")


# --- configfs-tsm ---------------------------------------------------------------------------------


def _der(path: Path) -> bytes:
    return _x509.load_pem_certs(path.read_bytes())[0].public_bytes(_x509.serialization.Encoding.DER)


def _cert_table(entries: list[tuple[uuid.UUID, bytes]], *, mixed_endian: bool = False) -> bytes:
    header_size = 24 * (len(entries) + 1)
    header = b""
    body = b""
    for guid, blob in entries:
        raw = guid.bytes_le if mixed_endian else guid.bytes
        header += raw + struct.pack("<II", header_size + len(body), len(blob))
        body += blob
    return header + bytes(24) + body


class _FakeTsm(evidence_hw.TsmProvider):
    """configfs-tsm's kernel side, emulated with plain files."""

    provider_name = "tdx_guest"
    outblob = b""
    auxblob = b""
    interfering_writes = 0  # extra generation bumps, as if another process wrote inblob

    def _create_entry(self) -> Path:
        entry = super()._create_entry()
        (entry / "provider").write_text(self.provider_name + "\n")
        (entry / "generation").write_text("0\n")
        for name in ("inblob", "outblob", "auxblob", "privlevel"):
            (entry / name).write_bytes(b"")
        return entry

    def _remove_entry(self, entry: Path) -> None:
        for child in entry.iterdir():
            child.unlink()
        super()._remove_entry(entry)

    def _write_attr(self, entry: Path, name: str, data: bytes) -> None:
        super()._write_attr(entry, name, data)
        bump = 1
        if name == "inblob":
            (entry / "outblob").write_bytes(type(self).outblob)
            (entry / "auxblob").write_bytes(type(self).auxblob)
            if type(self).interfering_writes:
                type(self).interfering_writes -= 1
                bump += 1
        generation = int((entry / "generation").read_text()) + bump
        (entry / "generation").write_text(f"{generation}\n")


def _fake(name: str, outblob: bytes, auxblob: bytes = b"", interfering: int = 0) -> type[_FakeTsm]:
    return type(
        "Fake",
        (_FakeTsm,),
        {
            "provider_name": name,
            "outblob": outblob,
            "auxblob": auxblob,
            "interfering_writes": interfering,
        },
    )


def test_tsm_tdx_quote_is_bound_and_verifies(tmp_path: Path) -> None:
    case, spec = _accepted("tdx")
    fake = _fake("tdx_guest", (case / "evidence.bin").read_bytes())
    provider = fake(tmp_path)
    assert provider.tee is Tee.TDX
    quote = provider.evidence(_report_data(spec))
    claims = tdx.TdxVerifier(collateral.DirectorySource(case / "collateral")).verify(
        quote, now=_now(spec)
    )
    assert claims.report_data == _report_data(spec)
    assert list(tmp_path.iterdir()) == []  # every report entry was removed


@pytest.mark.parametrize("mixed_endian", [False, True])
def test_tsm_snp_report_carries_its_certificates(tmp_path: Path, mixed_endian: bool) -> None:
    case, spec = _accepted("snp", "vcek")
    col = case / "collateral"
    table = _cert_table(
        [
            (uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"), (col / "vcek.der").read_bytes()),
            (
                uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),
                _der(col / "ask.pem"),
            ),
            (
                uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
                _der(col / "ark.pem"),
            ),
        ],
        mixed_endian=mixed_endian,
    )
    root = tmp_path / "report"
    root.mkdir()
    provider = _fake("sev_guest", (case / "evidence.bin").read_bytes(), table)(root, privlevel=0)
    assert provider.tee is Tee.SNP
    evidence = provider.evidence(_report_data(spec))
    assert evidence.endswith(table)
    # No collateral directory at all: everything comes from the certificate table.
    empty = tmp_path / "empty"
    empty.mkdir()
    claims = snp.SnpVerifier(collateral.DirectorySource(empty)).verify(evidence, now=_now(spec))
    assert claims.report_data == _report_data(spec)


def test_tsm_retries_when_another_writer_interferes(tmp_path: Path) -> None:
    case, spec = _accepted("tdx")
    fake = _fake("tdx_guest", (case / "evidence.bin").read_bytes(), interfering=1)
    assert fake(tmp_path).evidence(_report_data(spec))
    always = _fake("tdx_guest", (case / "evidence.bin").read_bytes(), interfering=10)
    with pytest.raises(BackendUnavailable):
        always(tmp_path).evidence(_report_data(spec))


def test_tsm_refuses_a_report_for_other_data(tmp_path: Path) -> None:
    case, _ = _accepted("tdx")
    with pytest.raises(BindingError):
        _fake("tdx_guest", (case / "evidence.bin").read_bytes())(tmp_path).evidence(b"\x07" * 64)


def test_tsm_unknown_provider_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable):
        _fake("arm_cca_guest", b"")(tmp_path)


def test_detect_prefers_gramine_then_tsm_then_nothing(tmp_path: Path) -> None:
    case, _ = _accepted("tdx")
    tsm_root = tmp_path / "tsm"
    tsm_root.mkdir()
    fake = _fake("tdx_guest", (case / "evidence.bin").read_bytes())
    gramine = _gramine(tmp_path, b"")
    found = evidence_hw.detect(gramine_root=gramine, tsm_root=tsm_root, tsm_provider=fake)
    assert isinstance(found, evidence_hw.GramineProvider)
    found = evidence_hw.detect(gramine_root=tmp_path / "none", tsm_root=tsm_root, tsm_provider=fake)
    assert isinstance(found, evidence_hw.TsmProvider) and found.tee is Tee.TDX
    # A configfs directory whose kernel side does not answer is not a TEE.
    assert evidence_hw.detect(gramine_root=tmp_path / "none", tsm_root=tsm_root) is None
    assert evidence_hw.detect(gramine_root=tmp_path / "none", tsm_root=tmp_path / "none") is None
