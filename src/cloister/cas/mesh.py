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
from cryptography.hazmat.primitives import serialization

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
    """A leaf for both ends of mutual TLS (serverAuth + clientAuth), named by ``who``: its
    identity as DNS and URI names, then the configured DNS names."""
    return pki.issue(
        ca_key=ca_key,
        ca_cert=ca_cert,
        public_key=public_key,
        common_name=who.dns_name,
        usage="server-client",
        now=now,
        valid_for=VALIDITY,
        dns=[who.dns_name, *(d for d in dns if d.lower() != who.dns_name)],
        uris=[who.uri],
    )
