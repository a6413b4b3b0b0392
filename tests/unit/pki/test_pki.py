"""The CA's certificates: usage, self-signed end entities, PKCS#12 and the RA-TLS extension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import pkcs12

from cloister import pki

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_no_endpoint_means_no_extended_key_usage() -> None:
    ca_key, ca = pki.new_ca("CA", now=NOW, valid_for=timedelta(days=10))
    leaf = pki.issue(
        ca_key=ca_key, ca_cert=ca, public_key=pki.new_key().public_key(), common_name="x",
        usage=None, now=NOW, valid_for=timedelta(days=1),
    )  # fmt: skip
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    leaf.verify_directly_issued_by(ca)


def test_a_leaf_never_outlives_its_ca() -> None:
    ca_key, ca = pki.new_ca("CA", now=NOW, valid_for=timedelta(days=1))
    leaf = pki.issue(
        ca_key=ca_key, ca_cert=ca, public_key=pki.new_key().public_key(), common_name="x",
        usage="server", now=NOW, valid_for=timedelta(days=30),
    )  # fmt: skip
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc


def test_self_signed_end_entity_is_not_a_ca() -> None:
    key = pki.new_key()
    cert = pki.self_signed(
        key=key, common_name="svc", usage="client", now=NOW, valid_for=timedelta(days=1),
        dns=["svc.local"], ips=["::1"],
    )  # fmt: skip
    cert.verify_directly_issued_by(cert)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_pkcs12_opens_with_the_empty_password() -> None:
    ca_key, ca = pki.new_ca("CA", now=NOW, valid_for=timedelta(days=1))
    key, cert, extra = pkcs12.load_key_and_certificates(pki.pkcs12("n", ca_key, ca, [ca]), b"")
    assert cert == ca and extra == [ca] and key is not None


def test_evidence_extension_round_trips_and_is_bounded() -> None:
    key, cert = pki.new_ca("CA", now=NOW, valid_for=timedelta(days=1))
    assert pki.evidence_in(cert) is None
    with pytest.raises(ValueError, match="too large"):
        pki.evidence_extension(b"x" * (pki.MAX_EVIDENCE_EXTENSION_BYTES + 1))
    ext = pki.evidence_extension(b"simulation\x00quote")
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject).issuer_name(cert.subject).public_key(key.public_key())
        .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
        .add_extension(ext, critical=False)
    )  # fmt: skip
    signed = builder.sign(key, hashes.SHA256())
    assert pki.evidence_in(signed) == b"simulation\x00quote"
