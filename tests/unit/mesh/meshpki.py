"""A test CA shaped like a session's ``x509-ca`` secret, and service certificates from it.

Certificates follow the convention of ``cloister.mesh.identity``: a DNS SAN
``<service>.<session>`` and, unless told otherwise, a URI SAN ``cloister://<session>/<service>``;
both server and client usage, as one service certificate serves ingress and egress. They carry
the extensions RFC 5280 asks for (``VERIFY_X509_STRICT`` checks them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloister.mesh import ServiceIdentity, TlsMaterial

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


class TestCA:
    """A session CA: an EC P-256 self-signed CA certificate that issues service certificates."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, name: str = "demo session CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
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
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        identity: str,
        *,
        extra_dns: tuple[str, ...] = (),
        dns: tuple[str, ...] | None = None,
        uri: str | None = "default",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A service certificate for ``identity`` (``<service>.<session>``).

        ``dns`` replaces the DNS SANs (to make a certificate that breaks the convention),
        ``uri`` replaces the URI SAN (None: no URI SAN).
        """
        ident = ServiceIdentity.parse(identity)
        key = ec.generate_private_key(ec.SECP256R1())
        dns_names = (ident.dns_name, *extra_dns) if dns is None else dns
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(ident.uri if uri == "default" else uri))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident.dns_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 7 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
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
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def material(issued: Issued, *cas: TestCA) -> TlsMaterial:
    """Inline TLS material: the service's certificate and key, and a bundle of ``cas``."""
    return TlsMaterial(
        cert_pem=issued.cert_pem.decode(),
        key_pem=issued.key_pem.decode(),
        ca_pem=b"".join(ca.cert_pem for ca in cas).decode(),
    )


def write_files(directory: Path, name: str, issued: Issued, *cas: TestCA) -> dict[str, str]:
    """Write the material as files; returns the ``tls`` section of a JSON configuration."""
    paths = {
        "cert_file": directory / f"{name}.crt",
        "key_file": directory / f"{name}.key",
        "ca_file": directory / f"{name}-ca.pem",
    }
    paths["cert_file"].write_bytes(issued.cert_pem)
    paths["key_file"].write_bytes(issued.key_pem)
    paths["key_file"].chmod(0o600)
    paths["ca_file"].write_bytes(b"".join(ca.cert_pem for ca in cas))
    return {k: str(v) for k, v in paths.items()}
