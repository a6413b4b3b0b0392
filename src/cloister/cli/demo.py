"""`cloister demo`: a CAS on its embedded default and a confidential two-service application.

Every step uses the real parts a user runs: a CAS over HTTPS with its SQLite store, an owner
key, a signed session, and the agent starting two unmodified programs that then talk mutual
TLS with certificates only attested workloads can get. Only the TEE is simulated.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel

from cloister.attestation import simulated

console = Console(stderr=False)
PROGRAMS = Path(__file__).parent / "demo_programs"

SESSION = """\
name: demo
version: "0.3"
security:
  attestation:
    tolerate: [simulation]
services:
  - name: server
    image_name: server-image
    command: ["{python}", "{programs}/server.py"]
    environment:
      PORT: {port}
      DB_PASSWORD: $$SCONE::db_password$$
      DEMO_CONFIG: {files}/server/server.conf
    attestation:
      - tee: simulation
        measurement: {server_measurement}
  - name: client
    image_name: client-image
    command: ["{python}", "{programs}/client.py"]
    environment:
      SERVER_PORT: {port}
      DB_PASSWORD: $$SCONE::db_password$$
      CLIENT_CERT: {files}/client/client.crt
      CLIENT_KEY: {files}/client/client.key
      CA_CERT: {files}/client/ca.crt
    attestation:
      - tee: simulation
        measurement: {client_measurement}
secrets:
  - name: db_password
    kind: ascii
    size: 24
  - name: demo_ca
    kind: x509-ca
    common_name: Demo session CA
  - name: server_cert
    kind: x509
    issuer: demo_ca
    common_name: server
    dns: [server.demo, localhost]
    endpoint: server
  - name: client_cert
    kind: x509
    issuer: demo_ca
    common_name: client
    endpoint: client
images:
  - name: server-image
    injection_files:
      - path: {files}/server/server.conf
        content: |
          cert={files}/server/server.crt
          key={files}/server/server.key
          ca={files}/server/ca.crt
      - path: {files}/server/server.crt
        content: $$SCONE::server_cert:crt$$$$SCONE::server_cert:chain$$
      - path: {files}/server/server.key
        content: $$SCONE::server_cert:key$$
      - path: {files}/server/ca.crt
        content: $$SCONE::demo_ca:crt$$
  - name: client-image
    injection_files:
      - path: {files}/client/client.crt
        content: $$SCONE::client_cert:crt$$$$SCONE::client_cert:chain$$
      - path: {files}/client/client.key
        content: $$SCONE::client_cert:key$$
      - path: {files}/client/ca.crt
        content: $$SCONE::demo_ca:crt$$
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds:.0f}s")


class _Steps:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.n = 0

    def say(self, text: str) -> None:
        self.n += 1
        console.print(f"\n[bold cyan]{self.n}. {text}[/]")

    def cloister(self, *args: str) -> str:
        shown = " ".join(a if len(a) < 60 else "…" for a in args)
        console.print(f"   [dim]$ cloister {shown}[/]")
        out = subprocess.run(
            [sys.executable, "-m", "cloister", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            console.print(f"[red]{out.stderr.strip()}[/]")
            raise typer.Exit(1)
        for line in out.stdout.strip().splitlines():
            console.print(f"   {line}")
        return out.stdout.strip()


def demo(
    workdir: Path | None = typer.Option(None, "--workdir", help="keep the demo's files here"),
) -> None:
    """Start a CAS on its embedded default and run a confidential two-service application."""
    console.print(
        Panel(
            "Cloister demo: a CAS, a signed session and two attested services talking mutual TLS.\n"
            "[yellow]SIMULATION MODE: no TEE on this machine; the attestation protects nothing.[/]",
            expand=False,
        )
    )
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - private mkdtemp
    with tempfile.TemporaryDirectory(
        prefix="cloister-demo-", dir=str(workdir) if workdir else shm
    ) as tmp:
        _run(Path(tmp))


def _run(root: Path) -> None:
    env = dict(os.environ, CLOISTER_HOME=str(root / "home"), CLOISTER_LOG_LEVEL="ERROR")
    steps = _Steps(env)
    cas_port, app_port = _free_port(), _free_port()
    url = f"https://127.0.0.1:{cas_port}"

    steps.say(f"Start a CAS (simulation, SQLite store in {root / 'cas'})")
    cas = subprocess.Popen(
        [sys.executable, "-m", "cloister", "cas", "serve", "--simulation",
         "--data-dir", str(root / "cas"), "--listen", f"127.0.0.1:{cas_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [cas]
    try:
        _wait_port(cas_port, cas)
        console.print(f"   CAS serving on {url}")
        steps.say("Attest the CAS and pin its identity")
        steps.cloister("cas", "attest", url, "--allow-simulation")
        steps.say("Create the owner's signing key")
        steps.cloister("keys", "create")
        steps.say("Measure the two unmodified programs")
        server_m = simulated.measure_files([PROGRAMS / "server.py"]).hex()
        client_m = simulated.measure_files([PROGRAMS / "client.py"]).hex()
        steps.cloister("measure", str(PROGRAMS / "server.py"))
        steps.cloister("measure", str(PROGRAMS / "client.py"))
        steps.say("Write, check, sign and upload the session")
        session_file = root / "session.yaml"
        session_file.write_text(
            SESSION.format(
                python=sys.executable,
                programs=PROGRAMS,
                port=app_port,
                files=root / "files",
                server_measurement=server_m,
                client_measurement=client_m,
            )
        )
        steps.cloister("session", "check", str(session_file))
        steps.cloister("session", "create", str(session_file), "--cas", url)
        steps.say("Start the server under the agent: attest, receive certificate, password, config")
        agent = [
            sys.executable,
            "-m",
            "cloister",
            "run",
            "--cas",
            url,
            "--session",
            "demo",
            "--simulation",
        ]
        server = subprocess.Popen(
            [*agent, "--service", "server", "--measure", str(PROGRAMS / "server.py")], env=env
        )
        procs.append(server)
        _wait_port(app_port, server)
        steps.say("Start the client under the agent; it calls the server over mutual TLS")
        client = subprocess.run(
            [*agent, "--service", "client", "--measure", str(PROGRAMS / "client.py")],
            env=env, timeout=60, check=False,
        )  # fmt: skip
        server.wait(timeout=30)
        ok = client.returncode == 0 and server.returncode == 0
        steps.say("Result")
        if ok:
            console.print(
                "   [green]The call succeeded: both services were attested, received their "
                "secrets in memory, and authenticated each other with session certificates.[/]"
            )
        else:
            console.print(
                f"   [red]The call failed (client {client.returncode}, "
                f"server {server.returncode}).[/]"
            )
            raise typer.Exit(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
