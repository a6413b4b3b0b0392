"""TLS contexts for the mesh, and the mapping of handshake failures to refusal reasons.

Both contexts speak TLS 1.3 only and require a certificate from the other side that chains to
the session CA bundle. The server context sends no session tickets: every connection is a full
handshake with a fresh certificate check, so a revoked-by-rotation CA stops working at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from typing import Final

from cloister import errors
from cloister.mesh.config import TlsMaterial

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) that get their own refusal reason.
_VERIFY_REASONS: Final = {
    9: "certificate-not-yet-valid",
    10: "certificate-expired",
    2: "untrusted-issuer",  # unable to get issuer certificate
    18: "untrusted-issuer",  # self-signed leaf
    19: "untrusted-issuer",  # self-signed certificate in chain
    20: "untrusted-issuer",  # unable to get local issuer certificate
    21: "untrusted-issuer",  # unable to verify the first certificate
    62: "wrong-peer",  # host name mismatch: the certificate names another service
}
# OpenSSL reason strings (SSL_R_*) of handshake failures, grouped.
_SSL_REASONS: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer-refused",
    "WRONG_VERSION_NUMBER": "not-tls",
    "HTTP_REQUEST": "not-tls",
    "HTTPS_PROXY_REQUEST": "not-tls",
    "PACKET_LENGTH_TOO_LONG": "not-tls",
    "RECORD_LAYER_FAILURE": "not-tls",
    "UNEXPECTED_RECORD": "not-tls",
    "UNSUPPORTED_PROTOCOL": "protocol-version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol-version",
    "NO_PROTOCOLS_AVAILABLE": "protocol-version",
}


def refusal_reason(exc: BaseException) -> str:
    """A stable kebab-case reason for a failed handshake, for counters and logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad-certificate")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _SSL_REASONS:
            return _SSL_REASONS[reason]
        if "ALERT" in reason:
            return "peer-refused"
        return "handshake-failed"
    if isinstance(exc, TimeoutError):
        return "handshake-timeout"
    return "handshake-failed"


@contextlib.contextmanager
def _as_path(pem: bytes, name: str) -> Iterator[str]:
    """Hand inline PEM to OpenSSL as a path without writing it to any file system."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:  # pragma: no cover - Linux only, as the workloads are
        raise ValueError("inline PEM needs os.memfd_create (Linux); give a file instead")
    fd = memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _base(tls: TlsMaterial, purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 strictness (what Python 3.13 turns on by default): CA certificates must be
    # marked as such, leaves must carry the key identifiers the CAS puts in.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    else:
        assert tls.ca_pem is not None
        ctx.load_verify_locations(cadata=tls.ca_pem)
    with contextlib.ExitStack() as stack:
        if tls.cert_file is not None:
            cert = str(tls.cert_file)
        else:
            assert tls.cert_pem is not None
            cert = stack.enter_context(_as_path(tls.cert_pem.encode(), "mesh-cert"))
        if tls.key_file is not None:
            key = str(tls.key_file)
        else:
            assert tls.key_pem is not None
            key = stack.enter_context(_as_path(tls.key_pem.get_secret_value().encode(), "k"))
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(tls: TlsMaterial) -> ssl.SSLContext:
    """The ingress side: present the service certificate, require the caller's."""
    ctx = _base(tls, ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0
    return ctx


def client_context(tls: TlsMaterial) -> ssl.SSLContext:
    """The egress side: present the service certificate, check the peer's name in-handshake."""
    ctx = _base(tls, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = False
    return ctx


def check_material(tls: TlsMaterial) -> None:
    """Load the material into both contexts; raise ``SessionError`` if OpenSSL refuses it."""
    try:
        server_context(tls)
        client_context(tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise errors.SessionError(
            f"TLS material does not load: {exc}", reason="invalid-mesh-tls"
        ) from None
