"""Arbitrary input to every loader and binary parser: only Cloister's own errors, never a crash.

Hypothesis, derandomized (a fixed seed per test) and bounded in examples, over:

* the session loader (``Session.from_yaml``): arbitrary bytes, arbitrary YAML documents, and
  documents that look like sessions but are wrong in arbitrary places → ``SessionError``;
* the attestation parsers and verifiers (SGX and TDX DCAP quotes, TD and enclave reports, SNP
  reports, certificate tables and certificates, simulated evidence) → the ``EvidenceError``
  family only, whatever entry points ``attestation`` has;
* the other parsers of bytes that cross a trust boundary: sealed store values
  (``StoreError``), encrypted-volume headers and manifests (``VolumeIntegrityError``).
"""

from __future__ import annotations

import string
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloister import errors
from cloister.attestation import Tee, collateral, simulated
from cloister.session import Session
from cloister.store import Keyring

NOW = datetime(2026, 1, 1, tzinfo=UTC)

PROPERTY = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _only(kind: type[errors.Error], fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call ``fn``; a refusal must be a ``kind``, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except kind:
        return None


# --- the session loader ------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["$$SCONE::x$$", "$$SCONE::ca:crt$$", "0.3", "simulation", "CREATOR"]),
)
_yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), inner, max_size=5),
    ),
    max_leaves=25,
)
_session_keys = st.sampled_from(
    ["name", "version", "predecessor", "access_policy", "security", "services", "secrets",
     "images", "volumes", "attestation", "environment", "command", "kind", "issuer",
     "injection_files", "tolerate", "measurement", "mrenclave", "tee", "export", "import"]
)  # fmt: skip

VALID = """\
name: prop
version: "0.3"
security: {attestation: {tolerate: [simulation]}}
services:
  - name: app
    command: ["/app", "$$SCONE::pw$$"]
    attestation: [{tee: simulation, measurement: %s}]
secrets:
  - {name: pw, kind: ascii, size: 12}
  - {name: ca, kind: x509-ca}
  - {name: tls, kind: x509, issuer: ca}
""" % ("ab" * 32)


def test_the_valid_base_document_loads() -> None:
    assert Session.from_yaml(VALID).name == "prop"


@PROPERTY
@given(raw=st.binary(max_size=2048))
def test_session_loader_on_arbitrary_bytes(raw: bytes) -> None:
    _only(errors.SessionError, Session.from_yaml, raw)


@PROPERTY
@given(text=st.text(max_size=1024))
def test_session_loader_on_arbitrary_text(text: str) -> None:
    _only(errors.SessionError, Session.from_yaml, text)


@PROPERTY
@given(doc=st.dictionaries(_session_keys, _yaml_values, max_size=8))
def test_session_loader_on_arbitrary_yaml_documents(doc: dict[str, object]) -> None:
    _only(errors.SessionError, Session.from_yaml, yaml.safe_dump(doc))


@PROPERTY
@given(
    path=st.lists(st.sampled_from(["services", 0, "attestation", "secrets", 1, "name", "kind",
                                   "security", "command", 2, "issuer"]), min_size=1, max_size=4),
    value=_yaml_values,
)  # fmt: skip
def test_session_loader_on_a_valid_session_broken_in_one_place(
    path: list[object], value: object
) -> None:
    doc = yaml.safe_load(VALID)
    node: object = doc
    for step in path[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            break
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    _only(errors.SessionError, Session.from_yaml, yaml.safe_dump(doc))


@PROPERTY
@given(cut=st.integers(min_value=0, max_value=len(VALID)), junk=st.text(max_size=8))
def test_session_loader_on_truncated_and_spliced_documents(cut: int, junk: str) -> None:
    _only(errors.SessionError, Session.from_yaml, VALID[:cut] + junk + VALID[cut:][: cut % 7])


def test_session_loader_refuses_yaml_bombs_and_oversize_input() -> None:
    bomb = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(errors.SessionError):
        Session.from_yaml(bomb)
    with pytest.raises(errors.SessionError):
        Session.from_yaml(b"#" * (2 * 1024 * 1024))


# --- attestation: every parser and verifier on arbitrary bytes ---------------------------------

_evidence_bytes = st.one_of(
    st.binary(max_size=6000),
    # Plausible prefixes: DCAP quote versions 3-5 with SGX/TDX TEE types, SNP report versions.
    st.tuples(
        st.sampled_from([b"\x03\x00\x02\x00", b"\x04\x00\x02\x00", b"\x05\x00\x02\x00",
                         b"\x02\x00\x00\x00", b"\x03\x00\x00\x00", b"\x04\x00\x00\x00"]),
        st.sampled_from([b"\x00\x00\x00\x00", b"\x81\x00\x00\x00"]),
        st.binary(min_size=0, max_size=5000),
    ).map(b"".join),
)  # fmt: skip


def _dcap_parsers() -> list[object]:
    from cloister.attestation import _dcap

    out: list[object] = [lambda b: _dcap.parse_quote(b, tee=Tee.SGX)]
    out.append(lambda b: _dcap.parse_quote(b, tee=Tee.TDX))
    for cls in ("SgxReport", "TdReport"):
        if hasattr(_dcap, cls):
            out.append(getattr(_dcap, cls).parse)
    return out


def _snp_parsers() -> list[object]:
    from cloister.attestation import _snp

    # ``load_cert`` is left out: its contract is ValueError, which its callers translate.
    out: list[object] = []
    for name in ("parse_report", "split_evidence", "parse_cert_table"):
        if hasattr(_snp, name):
            out.append(getattr(_snp, name))
    return out


def _verifiers(directory: Path) -> list[object]:
    from cloister.attestation import sgx, snp, tdx

    source = collateral.DirectorySource(directory)
    return [
        sgx.SgxVerifier(source),
        tdx.TdxVerifier(source),
        snp.SnpVerifier(source),
        simulated.SimulatedVerifier(),
    ]


@PROPERTY
@given(data=_evidence_bytes)
def test_attestation_parsers_on_arbitrary_bytes(data: bytes) -> None:
    for parse in [*_dcap_parsers(), *_snp_parsers()]:
        _only(errors.EvidenceError, parse, data)  # type: ignore[arg-type]


@PROPERTY
@given(data=_evidence_bytes)
def test_attestation_verifiers_on_arbitrary_bytes(tmp_path_factory, data: bytes) -> None:  # type: ignore[no-untyped-def]
    # No collateral at all: whatever the bytes, the answer is a refusal from the family.
    empty = tmp_path_factory.getbasetemp() / "no-collateral"
    empty.mkdir(exist_ok=True)
    for verifier in _verifiers(empty):
        _only(errors.EvidenceError, verifier.verify, data, now=NOW)  # type: ignore[attr-defined]


@PROPERTY
@given(measurement=st.binary(min_size=32, max_size=32), rd=st.binary(min_size=64, max_size=64),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
       cut=st.integers(0, 10_000))  # fmt: skip
def test_simulated_evidence_mutated_is_refused_within_the_family(
    measurement: bytes, rd: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    quote = bytearray(simulated.SimulatedPlatform.generate().quote(measurement, rd))
    for pos, bit in flips:
        quote[pos % len(quote)] ^= bit
    data = bytes(quote[: max(0, len(quote) - cut % (len(quote) + 1))] if cut % 3 else quote)
    claims = _only(errors.EvidenceError, simulated.SimulatedVerifier().verify, data, now=NOW)
    if claims is not None and not flips and cut % 3 == 0:
        assert claims.report_data == rd


# --- other bytes that cross a trust boundary -------------------------------------------------


@PROPERTY
@given(sealed=st.binary(max_size=512), aad=st.binary(max_size=64))
def test_sealed_store_values_refuse_with_store_error(sealed: bytes, aad: bytes) -> None:
    ring = Keyring.of([bytes(range(32))])
    assert _only(errors.StoreError, ring.open, sealed, aad) is None


@PROPERTY
@given(raw=st.binary(max_size=256))
def test_volume_header_and_manifest_prefix_refuse_with_volume_integrity_error(raw: bytes) -> None:
    from cloister.volume import _format

    _only(errors.VolumeIntegrityError, _format.peek_header, raw)
    _only(errors.VolumeIntegrityError, _format.manifest_generation, raw)
