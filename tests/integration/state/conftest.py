"""Real CAS processes over SQLite and over a throwaway PostgreSQL cluster (tests/pg.py).

Sessions are signed and uploaded, and workloads activated, in-process over HTTPS (the agent's
own activation code with simulated evidence), so that the tests can keep every secret the run
generated and look for it in every log.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from tests import pg
from tests.conftest import CasProcess, free_port

from cloister import protocol
from cloister.agent import activation
from cloister.agent.evidence import SimulatedProvider
from cloister.attestation import simulated
from cloister.client import CasClient
from cloister.session import Session, public_key_of, signatures

MEASUREMENT = bytes(range(32))
SERVE_FLAGS = ("--workers", "1", "--session-rate", "100000", "--session-burst", "100000",
               "--activation-rate", "100000", "--activation-burst", "100000")  # fmt: skip


@dataclass
class StateCas(CasProcess):
    """A CAS process with rate limits lifted and one worker (the tests count its writes)."""

    extra: tuple[str, ...] = SERVE_FLAGS

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cloister", "cas", "serve", "--simulation",
               "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
               *self.extra]  # fmt: skip
        return cmd + (["--db", self.db] if self.db else [])

    def start(self) -> None:
        from tests.conftest import wait_port

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    def serve_expecting_refusal(self) -> tuple[int, str]:
        """Run `cas serve` that must not come up; its exit code and output."""
        out = subprocess.run(self.command(), env=self.env, capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
        with open(self.log, "a") as log:
            log.write(out.stdout + out.stderr)
        return out.returncode, out.stdout + out.stderr

    def client(self) -> CasClient:
        cert = ssl.get_server_certificate(("127.0.0.1", self.port)).encode()
        return CasClient(self.url, cert_pem=cert)

    def replica(self, tmp_path: Path, name: str) -> StateCas:
        """A second CAS on the same database, provisioned with the store key and head."""
        other = StateCas(tmp_path / name, self.home, free_port(), tmp_path / f"{name}.log",
                         db=self.db)  # fmt: skip
        other.data_dir.mkdir(mode=0o700)
        for f in ("store.key", "state-head", "simulation-platform.key"):
            shutil.copy(self.data_dir / f, other.data_dir / f)
        return other


@dataclass
class Owner:
    """The session owner: signs, uploads and updates one session; remembers every secret."""

    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)
    hash: str | None = None
    secrets: set[str] = field(default_factory=set)
    last: protocol.Bundle | None = None

    def text(self, generation: int) -> str:
        pred = f"predecessor: {self.hash}\n" if self.hash else ""
        return f"""name: app
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: app
    command: ["/bin/app", "--generation", "{generation}"]
    environment:
      APP_PASSWORD: $$SCONE::password$$
      APP_TOKEN: $$SCONE::token:hex$$
    attestation: [{{tee: simulation, measurement: {MEASUREMENT.hex()}}}]
secrets:
  - {{name: password, kind: ascii, size: 24}}
  - {{name: token, kind: binary, size: 16}}
{pred}"""

    def signed(self, text: str, operation: str) -> protocol.SignedSession:
        digest = Session.from_yaml(text).hash
        return protocol.SignedSession(
            session=text,
            signatures=[protocol.SessionSignature(
                public_key=public_key_of(self.key),
                signature=signatures.sign(self.key, operation, digest))],
        )  # fmt: skip

    def create(self, client: CasClient) -> protocol.SessionAccepted:
        got = client.create_session(self.signed(self.text(0), "create"))
        self.hash = got.hash
        return got

    def update(self, client: CasClient, generation: int) -> protocol.SessionAccepted:
        got = client.update_session("app", self.signed(self.text(generation), "update"))
        self.hash = got.hash
        return got

    def activate(self, client: CasClient) -> dict[str, str]:
        provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)
        got = activation.activate_once(client, provider, "app", "app")
        self.last = got.bundle
        env = dict(got.bundle.environment)
        self.secrets.update(env.values())
        self.secrets.add(got.tls_key_pem())
        return env


def assert_no_secret_in(paths: list[Path], secrets: set[str]) -> None:
    """No secret value this run generated appears in any of these files."""
    assert secrets
    for path in paths:
        text = path.read_text(errors="replace")
        for value in secrets:
            assert value not in text, f"a secret value appears in {path.name}"


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def sqlite_cas(tmp_path: Path) -> Iterator[StateCas]:
    proc = StateCas(tmp_path / "cas", tmp_path / "home", free_port(), tmp_path / "cas.log")
    yield proc
    proc.stop()


@pytest.fixture
def pg_cluster() -> pg.PostgresCluster:
    return pg.shared_cluster()


@pytest.fixture
def pg_cas(tmp_path: Path, pg_cluster: pg.PostgresCluster) -> Iterator[StateCas]:
    proc = StateCas(tmp_path / "cas", tmp_path / "home", free_port(), tmp_path / "cas.log",
                    db=pg_cluster.new_database())  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_cas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateCas]:
    db = None if request.param == "sqlite" else pg.shared_cluster().new_database()
    proc = StateCas(tmp_path / "cas", tmp_path / "home", free_port(), tmp_path / "cas.log",
                    db=db)  # fmt: skip
    yield proc
    proc.stop()


def env_without_ci() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CI"}
