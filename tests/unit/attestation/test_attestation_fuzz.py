"""Parsers and verifiers never raise anything but the ``EvidenceError`` family on arbitrary
input: random bytes, mutated real evidence, and mutated collateral (hypothesis, derandomized)."""

from __future__ import annotations

import dataclasses

from attestation_vectors import Case, all_cases, make_verifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloister.attestation import Tee, _dcap, _snp, collateral
from cloister.errors import CollateralError, EvidenceError, MalformedEvidenceError

ACCEPTED = {
    tee: next(c for c in all_cases(tee.value) if c.accept) for tee in (Tee.SGX, Tee.TDX, Tee.SNP)
}
FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _verify_or_refuse(
    case: Case, evidence: bytes, source: collateral.CollateralSource | None = None
) -> None:
    verifier = make_verifier(case.tee, source or collateral.DirectorySource(case.collateral_dir))
    try:
        verifier.verify(evidence, now=case.now)
    except EvidenceError:
        pass


@FUZZ
@given(data=st.binary(max_size=4096))
def test_dcap_quote_parser_on_arbitrary_bytes(data: bytes) -> None:
    for tee in (Tee.SGX, Tee.TDX):
        try:
            _dcap.parse_quote(data, tee=tee)
        except MalformedEvidenceError:
            pass


@FUZZ
@given(data=st.binary(min_size=0, max_size=1400))
def test_snp_parsers_on_arbitrary_bytes(data: bytes) -> None:
    try:
        _snp.parse_report(_snp.split_evidence(data)[0])
    except MalformedEvidenceError:
        pass
    try:
        _snp.parse_cert_table(data)
    except MalformedEvidenceError:
        pass


@FUZZ
@given(tee=st.sampled_from([Tee.SGX, Tee.TDX, Tee.SNP]), data=st.binary(max_size=2048))
def test_verifiers_on_arbitrary_bytes(tee: Tee, data: bytes) -> None:
    _verify_or_refuse(ACCEPTED[tee], data)


@FUZZ
@given(
    tee=st.sampled_from([Tee.SGX, Tee.TDX, Tee.SNP]),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_verifiers_on_mutated_evidence(
    tee: Tee, edits: list[tuple[int, bytes]], cut: int | None
) -> None:
    case = ACCEPTED[tee]
    data = bytearray(case.evidence)
    for offset, value in edits:
        at = offset % len(data)
        data[at : at + len(value)] = value
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    _verify_or_refuse(case, bytes(data))


class _MutatedSource:
    """The vectors' collateral with one field replaced or mutated."""

    def __init__(self, case: Case, field: str, value: bytes | None) -> None:
        self._inner = collateral.DirectorySource(case.collateral_dir)
        self._field = field
        self._value = value

    def dcap_collateral(self, request: collateral.DcapRequest) -> collateral.DcapCollateral:
        return dataclasses.replace(
            self._inner.dcap_collateral(request), **{self._field: self._value}
        )

    def pck_chain(self, request: collateral.PckRequest) -> bytes:
        return self._inner.pck_chain(request)

    def snp_collateral(self, request: collateral.SnpRequest) -> collateral.SnpCollateral:
        return dataclasses.replace(
            self._inner.snp_collateral(request), **{self._field: self._value}
        )


DCAP_FIELDS = [f.name for f in dataclasses.fields(collateral.DcapCollateral)]
SNP_FIELDS = [f.name for f in dataclasses.fields(collateral.SnpCollateral)]


@FUZZ
@given(data=st.data())
def test_verifiers_on_mutated_collateral(data: st.DataObject) -> None:
    tee = data.draw(st.sampled_from([Tee.SGX, Tee.TDX, Tee.SNP]))
    case = ACCEPTED[tee]
    fields = SNP_FIELDS if tee is Tee.SNP else DCAP_FIELDS
    field = data.draw(st.sampled_from(fields))
    source = collateral.DirectorySource(case.collateral_dir)
    if tee is Tee.SNP:
        original = getattr(
            source.snp_collateral(collateral.SnpRequest(None, "vcek", b"", 0)), field
        )
    else:
        original = getattr(
            source.dcap_collateral(collateral.DcapRequest(tee, "", "", "processor")), field
        )
    if original and data.draw(st.booleans()):
        at = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
        value: bytes | None = (
            original[:at] + data.draw(st.binary(min_size=1, max_size=4)) + original[at + 1 :]
        )
    else:
        value = data.draw(st.one_of(st.none(), st.binary(max_size=512)))
    _verify_or_refuse(case, case.evidence, _MutatedSource(case, field, value))


@FUZZ
@given(body=st.binary(max_size=512), key=st.sampled_from([b"tcbInfo", b"enclaveIdentity"]))
def test_pcs_response_parsing_on_arbitrary_bytes(body: bytes, key: bytes) -> None:
    for data in (body, b'{"' + key + b'":' + body):
        try:
            collateral._signed_object(data, key)
        except CollateralError:
            pass
        try:
            collateral._signature_hex(data)
        except CollateralError:
            pass
