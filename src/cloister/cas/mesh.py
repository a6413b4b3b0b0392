"""The mesh, CAS side: a meshed service's certificate, trusted CAs and rules for its bundle.

This module owns how a service's ``mesh:`` section becomes the bundle's ``mesh`` part: the
certificate it issues for the workload's own key (the activation's CSR key) from the session's
mesh CA, carrying the identity that ``cloister.mesh.identity`` defines (DNS SAN
``<service>.<session>`` and URI SAN ``cloister://<session>/<service>``) plus the DNS names the
session adds; the CA bundle to trust; and the rules with every service name turned into an
identity. It does not run proxies (the agent starts ``cloister.mesh``), and never sees the
workload's private key. See ``docs/mesh-in-sessions.md``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloister import mesh, pki, protocol
from cloister import secrets as secretlib
from cloister.errors import SessionError
from cloister.session import Service, Session

VALIDITY: Final = secretlib.DEFAULT_VALIDITY  # never beyond the CA's own end
_BACKDATE: Final = timedelta(minutes=5)  # clock skew between the CAS and the workloads


def identity(session: str, name: str) -> mesh.ServiceIdentity:
    """A service name as the session writes it: ``api`` (this session) or ``api.other``."""
    if "." in name:
        return mesh.ServiceIdentity.parse(name.lower())
    return mesh.ServiceIdentity(service=name, session=session)


def ca_name(session: Session, service: Service) -> str:
    """The x509-ca that issues this service's mesh certificate (the loader checked it)."""
    assert service.mesh is not None
    if service.mesh.ca is not None:
        return service.mesh.ca
    (only,) = [n for n, k in session.kinds().items() if k == "x509-ca"]
    return only


def for_service(
    session: Session,
    service: Service,
    resolver: secretlib.Resolver,
    *,
    now: datetime,
) -> protocol.BundleMesh | None:
    """The bundle's mesh part for ``service``, or ``None`` if the service is not meshed."""
    if service.mesh is None:
        return None
    if resolver.workload_key is None:
        raise SessionError("a mesh certificate needs the workload's key", reason="no-workload-key")
    name = ca_name(session, service)
    ca = resolver.value(name)
    if not ca.has_private_key():
        raise SessionError(
            f"service {service.name!r}: the mesh CA {name!r} has no private key here (an "
            "imported CA without its key cannot issue)",
            reason="issuer-key-unavailable",
        )
    me = identity(session.name, service.name)
    cert = issue(
        ca_key=ca.private_key(),
        ca_cert=ca.certificate(),
        public_key=resolver.workload_key,
        who=me,
        dns=service.mesh.dns,
        now=now,
    )
    trusted = "".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        for der in ca.trusted_cas(now)
    )
    return protocol.BundleMesh(
        identity=me.dns_name,
        certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
        ca=trusted,
        ingress=[
            protocol.BundleMeshIngress(
                port=r.port,
                app_port=r.app_port,
                allow_from=[identity(session.name, n).dns_name for n in r.allow_from],
            )
            for r in service.mesh.ingress
        ],
        egress=[
            protocol.BundleMeshEgress(
                port=r.port, target=r.target, peer=identity(session.name, r.service).dns_name
            )
            for r in service.mesh.egress
        ],
    )


def issue(
    *,
    ca_key: pki.CertificateKey,
    ca_cert: x509.Certificate,
    public_key: pki.PublicKey,
    who: mesh.ServiceIdentity,
    dns: list[str],
    now: datetime,
) -> x509.Certificate:
    """A leaf for both ends of mutual TLS (serverAuth + clientAuth), named by ``who``.

    Shaped like ``pki.issue`` (which has no URI SANs): critical basic constraints and key
    usage, the issuer's key identifier, so that OpenSSL's strict X.509 checks accept it.
    """
    not_after = min(now + VALIDITY, ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.DNSName(who.dns_name)]
    sans += [x509.DNSName(d) for d in dns if d.lower() != who.dns_name]
    sans.append(x509.UniformResourceIdentifier(who.uri))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who.dns_name)]))
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
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    ca_public = ca_cert.public_key()
    if isinstance(
        ca_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    ):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(ca_key, algorithm)
