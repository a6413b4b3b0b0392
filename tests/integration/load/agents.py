"""Helpers for the load, abuse and leak tests: a CAS with chosen server flags, sessions, and
activation requests crafted the way an agent makes them (simulation evidence)."""

from __future__ import annotations

import base64
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.x509.oid import NameOID
from tests.conftest import CasProcess, free_port, wait_port

from cloister import protocol
from cloister.attestation import binding, simulated
from cloister.client import pin_path, pinned_context


@dataclass
class TunedCas(CasProcess):
    """``CasProcess`` with extra ``cloister cas serve`` flags (workers, limits, timeouts)."""

    extra: list[str] = field(default_factory=list)

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cloister", "cas", "serve", "--simulation",
               "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
               *self.extra]  # fmt: skip
        if self.db:
            cmd += ["--db", self.db]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    @property
    def pin(self) -> bytes:
        return pin_path(self.url, self.home).read_bytes()

    def http(self, timeout: float = 30.0) -> httpx.Client:
        """A plain HTTP client that trusts exactly the pinned CAS (for raw requests)."""
        return httpx.Client(base_url=self.url, verify=pinned_context(self.pin), timeout=timeout)


def start_cas(tmp_path: Path, *extra: str) -> TunedCas:
    cas = TunedCas(tmp_path / "cas", tmp_path / "home", free_port(), tmp_path / "cas.log",
                   extra=list(extra))  # fmt: skip
    cas.start()
    try:
        cas.cli("cas", "attest", cas.url, "--allow-simulation")
        cas.cli("keys", "create")
    except BaseException:
        cas.stop()
        raise
    return cas


MEASUREMENT = bytes.fromhex("5a" * 32)

SESSION = """\
name: {name}
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: web
    image_name: web-image
    command: ["/web", "--db-password", "$$SCONE::db_password$$"]
    environment:
      API_TOKEN: $$SCONE::api_token:hex$$
    attestation: [{{tee: simulation, measurement: {measurement}}}]
  - name: worker
    environment:
      API_TOKEN: $$SCONE::api_token:hex$$
    attestation: [{{tee: simulation, measurement: {measurement}}}]
secrets:
  - {{name: db_password, kind: ascii, size: 24}}
  - {{name: api_token, kind: binary, size: 32}}
  - {{name: ca, kind: x509-ca, common_name: Load CA}}
  - {{name: tls, kind: x509, issuer: ca, common_name: web, dns: [web.local], endpoint: server}}
images:
  - name: web-image
    injection_files:
      - path: /run/web/tls.crt
        content: $$SCONE::tls:chain$$
      - path: /run/web/ca.crt
        content: $$SCONE::ca:crt$$
      - path: /run/web/app.conf
        content: "password=$$SCONE::db_password$$"
"""


def create_session(cas: CasProcess, tmp_path: Path, name: str = "load") -> str:
    f = tmp_path / f"{name}.yaml"
    f.write_text(SESSION.format(name=name, measurement=MEASUREMENT.hex()))
    return cas.cli("session", "create", str(f), "--cas", cas.url).stdout.strip()


@dataclass
class Crafted:
    request: protocol.ActivationRequest
    tls_key: ec.EllipticCurvePrivateKey


def activation_request(
    nonce: str, *, session: str = "load", service: str = "web", measurement: bytes = MEASUREMENT
) -> Crafted:
    """An activation request as the agent builds it: fresh keys, CSR, evidence bound to both."""
    kem, dh = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    hpke_pub = kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
    tls = ec.generate_private_key(ec.SECP256R1())
    spki = tls.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rd = binding.report_data_for(
        bytes.fromhex(nonce), protocol.activation_key_material(hpke_pub, spki)
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(tls, hashes.SHA256())
    )
    quote = simulated.SimulatedPlatform.generate().quote(measurement, rd)
    req = protocol.ActivationRequest(
        tee="simulation",
        evidence=base64.b64encode(quote).decode(),
        nonce=nonce,
        hpke_public_key=base64.b64encode(hpke_pub).decode(),
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
        session=session,
        service=service,
    )
    return Crafted(req, tls)
