"""Every single-byte change inside the signed parts of accepted evidence is rejected.

For each accepted DCAP quote: every byte of header ‖ body and of the signature data up to the
PCK chain (quote signature, attestation key, QE report, its signature, QE authentication data
and every length and type field). For one quote per DCAP TEE also every byte of the embedded
PEM chain, where a change may only be accepted if it leaves the certificates' DER untouched
(PEM whitespace). For each accepted SNP report: every byte of the signed region [0, 0x2A0) and
of the signature's R and S.
"""

from __future__ import annotations

import pytest
from attestation_vectors import Case, all_cases

from cloister.attestation import Tee, _dcap, _snp, _x509, collateral
from cloister.errors import EvidenceError

ACCEPTED = [c for c in all_cases() if c.accept]
DCAP_ACCEPTED = [c for c in ACCEPTED if c.tee in (Tee.SGX, Tee.TDX)]
SNP_ACCEPTED = [c for c in ACCEPTED if c.tee is Tee.SNP]


def _flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def _cert_data_offset(case: Case) -> tuple[int, int]:
    """Where the embedded PCK chain starts and ends in the quote."""
    evidence = case.evidence
    quote = _dcap.parse_quote(evidence, tee=case.tee)
    start = evidence.index(quote.cert_data, len(quote.signed))
    return start, start + len(quote.cert_data)


def _rejected(verifier: object, data: bytes, case: Case) -> bool:
    try:
        verifier.verify(data, now=case.now)  # type: ignore[attr-defined]
    except EvidenceError:
        return True
    return False


@pytest.mark.parametrize("case", DCAP_ACCEPTED, ids=lambda c: c.name)
def test_every_byte_before_the_pck_chain_is_protected(case: Case) -> None:
    verifier = case.verifier(collateral.CollateralCache())
    verifier.verify(case.evidence, now=case.now)  # warm
    end, _ = _cert_data_offset(case)
    survivors = [o for o in range(end) if not _rejected(verifier, _flipped(case.evidence, o), case)]
    assert survivors == []


@pytest.mark.parametrize("tee", [Tee.SGX, Tee.TDX])
def test_every_byte_of_the_embedded_pck_chain_is_protected(tee: Tee) -> None:
    case = next(c for c in DCAP_ACCEPTED if c.tee is tee)
    verifier = case.verifier(collateral.CollateralCache())
    start, end = _cert_data_offset(case)
    original = [
        c.public_bytes(_x509.serialization.Encoding.DER)
        for c in _x509.load_pem_certs(case.evidence[start:end])
    ]
    for offset in range(start, end):
        mutated = _flipped(case.evidence, offset)
        if _rejected(verifier, mutated, case):
            continue
        # Accepted: the change must not have touched any certificate's DER.
        after = [
            c.public_bytes(_x509.serialization.Encoding.DER)
            for c in _x509.load_pem_certs(mutated[start:end])
        ]
        assert after == original, f"offset {offset:#x} changed a certificate and was accepted"


@pytest.mark.parametrize("case", DCAP_ACCEPTED, ids=lambda c: c.name)
def test_padding_after_the_signature_data_is_ignored(case: Case) -> None:
    verifier = case.verifier()
    claims = verifier.verify(case.evidence + bytes(100), now=case.now)
    assert claims.tcb_status == case.spec["tcb_status"]


@pytest.mark.parametrize("case", SNP_ACCEPTED, ids=lambda c: c.name)
def test_every_signed_byte_of_an_snp_report_is_protected(case: Case) -> None:
    verifier = case.verifier(collateral.CollateralCache())
    verifier.verify(case.evidence, now=case.now)  # warm
    signature_end = _snp.SIGNED_SIZE + 2 * 72
    survivors = [
        o for o in range(signature_end) if not _rejected(verifier, _flipped(case.evidence, o), case)
    ]
    assert survivors == []


@pytest.mark.parametrize("case", DCAP_ACCEPTED + SNP_ACCEPTED, ids=lambda c: c.name)
def test_truncation_is_rejected(case: Case) -> None:
    verifier = case.verifier(collateral.CollateralCache())
    evidence = case.evidence
    if case.tee is Tee.SNP:
        cuts = range(0, _snp.REPORT_SIZE, 37)
    else:
        _, end = _cert_data_offset(case)
        cuts = range(0, end, 53)
    for cut in cuts:
        assert _rejected(verifier, evidence[:cut], case), cut
