"""Mutual attestation: two services that trust only their session's CA talk over mutual TLS.

Both services activate against a real CAS process with (simulated) evidence; each receives a
certificate for its own activation key, issued by the session CA, and the CA as ``:chain``.
Real TLS 1.3 handshakes with Python's ``ssl``: the services accept each other, and a third
party with a certificate from another CA, or with none, is refused by both.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from tests.conftest import CasProcess

from cloister import pki, protocol
from cloister.agent import activation
from cloister.agent.evidence import SimulatedProvider
from cloister.attestation import simulated
from cloister.client import CasClient, pin_path
from cloister.session import Session, public_key_of, signatures

MEASUREMENT = bytes(range(32))

SESSION = f"""
name: mesh-demo
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: alpha
    environment:
      CERT: $$SCONE::alpha_tls:crt$$
      TRUST: $$SCONE::alpha_tls:chain$$
    attestation: [{{tee: simulation, measurement: {MEASUREMENT.hex()}}}]
  - name: beta
    environment:
      CERT: $$SCONE::beta_tls:crt$$
      TRUST: $$SCONE::beta_tls:chain$$
    attestation: [{{tee: simulation, measurement: {MEASUREMENT.hex()}}}]
secrets:
  - {{name: ca, kind: x509-ca, common_name: Mesh demo CA}}
  - {{name: alpha_tls, kind: x509, issuer: ca, dns: alpha.local, endpoint: server}}
  - {{name: beta_tls, kind: x509, issuer: ca, common_name: beta, endpoint: client}}
"""


@dataclass(frozen=True)
class Identity:
    cert: str  # PEM
    key: str  # PEM
    trust: str  # PEM CA certificates


def _files(identity: Identity, tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.write_text(identity.cert)
    key.write_text(identity.key)
    return cert, key


def server_context(identity: Identity, tmp: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(*_files(identity, tmp, name))
    ctx.load_verify_locations(cadata=identity.trust)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the client must prove it is an attested service
    return ctx


def client_context(identity: Identity | None, trust: str, tmp: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=trust)
    if identity is not None:
        ctx.load_cert_chain(*_files(identity, tmp, name))
    return ctx


@pytest.fixture
def identities(cas: CasProcess, tmp_path: Path) -> Iterator[dict[str, Identity]]:
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    session = Session.from_yaml(SESSION)
    signed = protocol.SignedSession(
        session=SESSION,
        signatures=[
            protocol.SessionSignature(
                public_key=public_key_of(key),
                signature=signatures.sign(key, "create", session.hash),
            )
        ],
    )
    out: dict[str, Identity] = {}
    with CasClient(cas.url, cert_pem=pin_path(cas.url, cas.home).read_bytes()) as client:
        client.create_session(signed)
        provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)
        for name in ("alpha", "beta"):
            got = activation.activate(client, provider, "mesh-demo", name)
            env = got.bundle.environment
            out[name] = Identity(env["CERT"], got.tls_key_pem(), env["TRUST"])
    yield out


def outsider(tmp: Path) -> Identity:
    """A third party with a certificate that looks right but comes from another CA."""
    now = datetime.now(UTC)
    ca_key, ca = pki.new_ca("Mesh demo CA", now=now, valid_for=timedelta(days=1))
    key = pki.new_key()
    cert = pki.issue(
        ca_key=ca_key, ca_cert=ca, public_key=key.public_key(), common_name="alpha.local",
        usage="server-client", now=now, valid_for=timedelta(hours=1), dns=["alpha.local"],
    )  # fmt: skip
    return Identity(pki.pem(cert) + pki.pem(ca), pki.key_pem(key), pki.pem(ca))


class OneConnection:
    """Accept one TLS connection in a thread; record the peer's name or the failure."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peer: str | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._serve, args=(ctx,), daemon=True)
        self.thread.start()

    def _serve(self, ctx: ssl.SSLContext) -> None:
        conn, _ = self.sock.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                cert = tls.getpeercert()
                self.peer = dict(x[0] for x in cert["subject"])["commonName"] if cert else None
                tls.sendall(b"hello " + (self.peer or "").encode())
        except (ssl.SSLError, OSError) as exc:
            self.error = exc
        finally:
            self.sock.close()

    def join(self) -> None:
        self.thread.join(timeout=30)


def talk(ctx: ssl.SSLContext, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="alpha.local") as tls:
            return tls.recv(100)


def test_attested_services_talk_and_outsiders_are_refused_by_both(
    identities: dict[str, Identity],
) -> None:
    alpha, beta = identities["alpha"], identities["beta"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # (1) beta (client) and alpha (server) accept each other: mutual attestation.
        server = OneConnection(server_context(alpha, tmp, "alpha"))
        assert talk(client_context(beta, beta.trust, tmp, "beta"), server.port) == b"hello beta"
        server.join()
        assert server.error is None and server.peer == "beta"
        # (2) alpha refuses a client whose certificate comes from another CA ...
        stranger = outsider(tmp)
        server = OneConnection(server_context(alpha, tmp, "alpha"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            talk(client_context(stranger, alpha.trust, tmp, "stranger"), server.port)
        server.join()
        assert isinstance(server.error, ssl.SSLError) and server.peer is None
        # ... and a client with no certificate at all.
        server = OneConnection(server_context(alpha, tmp, "alpha"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            talk(client_context(None, alpha.trust, tmp, "none"), server.port)
        server.join()
        assert isinstance(server.error, ssl.SSLError)
        # (3) beta refuses a server that presents the outsider's certificate for alpha's name.
        server = OneConnection(server_context(stranger, tmp, "stranger"))
        with pytest.raises(ssl.SSLCertVerificationError):
            talk(client_context(beta, beta.trust, tmp, "beta"), server.port)
        server.join()
        assert server.peer is None


def test_ca_rotation_keeps_peers_of_the_old_ca_trusted_during_the_overlap(
    cas: CasProcess, identities: dict[str, Identity]
) -> None:
    beta_before = identities["beta"]  # activated under the first CA
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    old = Session.from_yaml(SESSION)
    # A changed CA definition rotates its key (docs/session-language.md, "CA rotation").
    text = SESSION.replace("Mesh demo CA", "Mesh demo CA 2") + f"predecessor: {old.hash}\n"
    new = Session.from_yaml(text)
    signed = protocol.SignedSession(
        session=text,
        signatures=[
            protocol.SessionSignature(
                public_key=public_key_of(key), signature=signatures.sign(key, "update", new.hash)
            )
        ],
    )
    with CasClient(cas.url, cert_pem=pin_path(cas.url, cas.home).read_bytes()) as client:
        client.update_session("mesh-demo", signed)
        provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)
        got = activation.activate(client, provider, "mesh-demo", "alpha")
    env = got.bundle.environment
    alpha_after = Identity(env["CERT"], got.tls_key_pem(), env["TRUST"])
    # The new activation trusts both CAs during the overlap window.
    assert alpha_after.trust.count("BEGIN CERTIFICATE") == 2
    assert beta_before.trust.strip() in alpha_after.trust
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # alpha (new CA) accepts beta's certificate from the old CA (the client side is given
        # the new trust bundle here; what this step checks is alpha's acceptance) ...
        server = OneConnection(server_context(alpha_after, tmp, "alpha"))
        ctx = client_context(beta_before, alpha_after.trust, tmp, "beta")
        assert talk(ctx, server.port) == b"hello beta"
        server.join()
        assert server.error is None and server.peer == "beta"
        # ... while beta, activated before the rotation, knows only the old CA until it is
        # restarted: it refuses alpha's new certificate (the documented rolling restart).
        server = OneConnection(server_context(alpha_after, tmp, "alpha"))
        with pytest.raises(ssl.SSLCertVerificationError):
            talk(client_context(beta_before, beta_before.trust, tmp, "beta"), server.port)
        server.join()
