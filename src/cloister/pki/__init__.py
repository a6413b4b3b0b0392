"""The policy-controlled CA: CA certificates, server and client certificates.

Receives keys and names decided elsewhere (the session, the activation); never raw evidence.
Every function that issues takes ``now``. Keys are ECDSA P-256 unless the caller gives one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12 as _pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloister import limits

__all__ = [
    "EVIDENCE_OID",
    "CertificateKey",
    "PublicKey",
    "Usage",
    "csr_public_key",
    "evidence_extension",
    "evidence_in",
    "issue",
    "new_ca",
    "new_key",
    "pkcs12",
]

# Private arc for the RA-TLS style extension that carries a CAS's evidence in its TLS
# certificate (cf. the Intel RA-TLS and the IETF "attested TLS" drafts): a UUID-based OID
# (X.667 2.25.<128-bit>), so no registration is needed. Non-critical: ordinary TLS clients skip it.
EVIDENCE_OID = x509.ObjectIdentifier("2.25.199455120735432624453651553367592813457")
MAX_EVIDENCE_EXTENSION_BYTES = 96 * 1024

Usage = Literal["server", "client", "server-client"]
CertificateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_BACKDATE = timedelta(minutes=5)  # tolerate clock skew between the CAS and its clients


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: CertificateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def new_ca(
    common_name: str, *, now: datetime, valid_for: timedelta, key: CertificateKey | None = None
) -> tuple[CertificateKey, x509.Certificate]:
    """A self-signed CA that may issue end-entity certificates only (path length 0)."""
    key = key or new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, _hash_for(key))
    )
    return key, cert


def issue(
    *,
    ca_key: CertificateKey,
    ca_cert: x509.Certificate,
    public_key: PublicKey,
    common_name: str,
    usage: Usage | None,
    now: datetime,
    valid_for: timedelta,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> x509.Certificate:
    """An end-entity certificate for ``public_key``, issued by the CA, never outliving it.

    ``usage`` adds an Extended Key Usage; ``None`` adds none (SCONE: no ``endpoint``). A
    certificate whose issuer is itself (``ca_cert`` is the leaf's own self-signed template)
    is made by ``self_signed``.
    """
    not_after = min(now + valid_for, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(_EKU[usage]), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
    )
    return builder.sign(ca_key, _hash_for(ca_key))


_EKU = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server-client": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}


def self_signed(
    *,
    key: CertificateKey,
    common_name: str,
    usage: Usage | None,
    now: datetime,
    valid_for: timedelta,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> x509.Certificate:
    """An end-entity certificate signed by its own key (SCONE: an x509 without issuer)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(_EKU[usage]), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, _hash_for(key))


def pkcs12(
    name: str, key: CertificateKey, cert: x509.Certificate, chain: Sequence[x509.Certificate]
) -> bytes:
    """A PKCS#12 archive of key, certificate and chain, readable with the empty password.

    SCONE encrypts under the empty password; ``cryptography`` refuses an empty password, so
    the archive is written unencrypted, which every reader opens with the empty password too.
    It only ever travels inside a sealed bundle into an attested workload.
    """
    return _pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, list(chain) or None, serialization.NoEncryption()
    )


def evidence_extension(evidence: bytes) -> x509.UnrecognizedExtension:
    """The RA-TLS style extension that carries ``evidence`` in a certificate."""
    if len(evidence) > MAX_EVIDENCE_EXTENSION_BYTES:
        raise ValueError("evidence too large for a certificate extension")
    return x509.UnrecognizedExtension(EVIDENCE_OID, evidence)


def evidence_in(cert: x509.Certificate) -> bytes | None:
    """The evidence a certificate carries in its RA-TLS extension, or ``None``."""
    try:
        ext = cert.extensions.get_extension_for_oid(EVIDENCE_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    if len(value.value) > MAX_EVIDENCE_EXTENSION_BYTES:
        raise ValueError("the certificate's evidence extension is too large")
    return value.value


def spki_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def csr_public_key(csr_pem: bytes) -> PublicKey:
    """The public key of a certificate signing request whose self-signature verifies."""
    if len(csr_pem) > limits.MAX_CSR_BYTES:
        raise ValueError("certificate signing request too large")
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise InvalidSignature("the CSR's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("unsupported CSR key type")
    return key


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: CertificateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
