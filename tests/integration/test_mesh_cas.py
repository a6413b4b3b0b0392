"""The attested mesh from a session: plain TCP programs under the agent, CAS-issued certificates.

Two unmodified programs that speak plain TCP on loopback (a server and a client) run under
``cloister run``; the session gives the server an ingress rule that allows the client, and the
client an egress rule to the server. The agent starts the mesh with certificates the CAS issued
from the session's CA for each workload's own key. A tap between the two workloads sees only
TLS; a third service that the server does not allow is refused.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import CasProcess, free_port

from cloister.attestation import simulated
from cloister.errors import Error, SessionError
from cloister.session import Session

pytestmark = pytest.mark.timeout(180)

IO_TIMEOUT = 15.0  # seconds any socket operation of the test may block

SERVER = """\
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
port, log, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
srv = socket.create_server(("127.0.0.1", port))
open(ready, "w").write("ready")
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(15)
        data = b""
        try:
            while not data.endswith(b"\\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            with open(log, "ab") as f:
                f.write(data)
            conn.sendall(b"echo:" + data)
        except OSError:
            pass
"""

CLIENT = """\
import socket, sys
port, message, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
reply = b""
try:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(message.encode() + b"\\n")
        while chunk := conn.recv(4096):
            reply += chunk
except OSError:
    pass
open(out, "wb").write(reply)
"""


class Tap:
    """A TCP relay on the untrusted network between two workloads; keeps every byte it saw."""

    def __init__(self, target_port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._sockets.append(conn)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), IO_TIMEOUT)
            except OSError:
                continue
            self._sockets.append(upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._accepter.join(IO_TIMEOUT)
        for t in self._threads:
            t.join(IO_TIMEOUT)
        for s in self._sockets:
            s.close()


def _session(m: dict[str, str], ingress: int, app: int, egress: int, target: str) -> str:
    return f"""
name: meshdemo
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: server
    attestation: [{{tee: simulation, measurement: {m["server"]}}}]
    mesh:
      ingress: [{{port: {ingress}, app_port: {app}, allow_from: [client]}}]
  - name: client
    attestation: [{{tee: simulation, measurement: {m["client"]}}}]
    mesh:
      egress: [{{port: {egress}, target: "{target}", service: server}}]
  - name: intruder
    attestation: [{{tee: simulation, measurement: {m["client"]}}}]
    mesh:
      egress: [{{port: {egress}, target: "{target}", service: server}}]
secrets:
  - {{name: mesh-ca, kind: x509-ca, common_name: Mesh CA}}
"""


def _agent(cas: CasProcess, service: str, program: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "cloister", "run", "--cas", cas.url, "--session", "meshdemo",
        "--service", service, "--simulation", "--measure", str(program), "--",
        sys.executable, str(program), *args,
    ]  # fmt: skip


@pytest.fixture
def programs(tmp_path: Path) -> dict[str, Path]:
    out = {"server": tmp_path / "server.py", "client": tmp_path / "client.py"}
    out["server"].write_text(SERVER)
    out["client"].write_text(CLIENT)
    return out


@contextlib.contextmanager
def _server_agent(
    cas: CasProcess, program: Path, app_port: int, tmp: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log, ready = tmp / "server-received.log", tmp / "server-ready"
    with open(tmp / "server-agent.log", "wb") as agent_log:
        proc = subprocess.Popen(
            _agent(cas, "server", program, str(app_port), str(log), str(ready)),
            env=cas.env,
            stdout=agent_log,
            stderr=agent_log,
        )
        try:
            deadline = time.monotonic() + 90
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp / "server-agent.log").read_text())
                time.sleep(0.05)
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_plain_programs_talk_through_the_attested_mesh_and_strangers_are_refused(
    cas: CasProcess, tmp_path: Path, programs: dict[str, Path]
) -> None:
    m = {name: simulated.measure_files([p]).hex() for name, p in programs.items()}
    ingress, app, egress = free_port(), free_port(), free_port()
    tap = Tap(ingress)
    try:
        doc = tmp_path / "session.yaml"
        doc.write_text(_session(m, ingress, app, egress, f"127.0.0.1:{tap.port}"))
        cas.cli("session", "create", str(doc), "--cas", cas.url)
        with _server_agent(cas, programs["server"], app, tmp_path) as (server, received):
            out = tmp_path / "client.out"
            message = "attack at dawn " + "x" * 64
            client = subprocess.run(
                _agent(cas, "client", programs["client"], str(egress), message, str(out)),
                env=cas.env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert client.returncode == 0, client.stderr
            assert out.read_bytes() == b"echo:" + message.encode() + b"\n"

            stranger = tmp_path / "intruder.out"
            intruder = subprocess.run(
                _agent(cas, "intruder", programs["client"], str(egress), "let me in",
                       str(stranger)),
                env=cas.env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert intruder.returncode == 0, intruder.stderr  # the program ran; the mesh refused
            assert stranger.read_bytes() == b""
            assert server.poll() is None
        assert server.returncode == 0  # SIGTERM reached the program through the agent
        assert received.read_bytes() == message.encode() + b"\n"  # the intruder never got in
    finally:
        tap.close()
    seen = bytes(tap.seen)
    assert len(seen) > len(message)  # traffic crossed the tap ...
    assert b"attack at dawn" not in seen and b"let me in" not in seen  # ... only as TLS
    assert b"PRIVATE KEY" not in seen
    server_log = (tmp_path / "server-agent.log").read_text()
    assert "PRIVATE KEY" not in server_log
    assert "refused cloister://meshdemo/intruder" in server_log  # the refusal names the caller


BASE = """
name: demo
version: "0.3"
security: {attestation: {tolerate: [simulation]}}
services:
  - name: api
    attestation: [{tee: simulation, measurement: "%s"}]
    mesh: {ingress: [{port: 8443, app_port: 8080, allow_from: [web, batch.other]}]}
  - name: web
    attestation: [{tee: simulation, measurement: "%s"}]
    mesh: {egress: [{port: 15000, target: "api:8443", service: api}], dns: [web.example.com]}
secrets: [{name: ca, kind: x509-ca}]
""".replace("%s", "ab" * 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("allow_from: [web,", "allow_from: [nobody,"), "does not define"),
        (("service: api}", "service: API.Other}"), "DNS labels"),
        (("[web.example.com]", "[api.demo]"), "identity of service 'api'"),
        (("name: demo\n", "name: Demo_x\n"), "lower-case DNS label"),
        (("[{name: ca, kind: x509-ca}]", "[{name: ca, kind: x509-ca}, {name: c2, kind: x509-ca}]"),
         "name the mesh's CA"),
        (("secrets: [{name: ca, kind: x509-ca}]", "secrets: []"), "0 x509-ca"),
        (("port: 15000", "port: 8443, app_port: 1"), "app_port"),
    ],
)  # fmt: skip
def test_mesh_sessions_are_checked_at_load_time(change: tuple[str, str], message: str) -> None:
    Session.from_yaml(BASE)
    with pytest.raises(SessionError) as refused:
        Session.from_yaml(BASE.replace(*change))
    assert message in refused.value.message


# --- Kubernetes: sconify writes mesh.egress, the webhook points the app at it ---------------

K8S = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          image: web:1
          command: [/app/web]
          env:
            - {name: DATABASE, value: "db:5432"}
            - {name: CACHE, value: "cache:6379"}
            - {name: REPLICA, value: "db-replica:5432"}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  template:
    spec:
      containers: [{name: db, image: postgres:16, command: [postgres]}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-replica}
spec: {ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: cache}
spec: {ports: [{port: 6379}]}
"""


def test_sconify_egress_hints_become_mesh_egress_rules_the_webhook_points_at() -> None:
    from cloister.k8s import _patch, sconify

    result = sconify.sconify(sconify.load_documents(K8S), tee="simulation", session="shop")
    web = next(d for d in result.manifests if d["metadata"]["name"] == "web")
    template = web["spec"]["template"]
    hint = template["metadata"]["annotations"]["cloister.io/egress"]
    assert hint == "cache=6379,db=5432,db-replica=5432"
    rules = next(s for s in result.session["services"] if s["name"] == "web")["mesh"]["egress"]
    # db-replica's own port is taken by db on loopback: it gets the first spare one.
    assert rules == [
        {"port": 6379, "target": "cache:6379", "service": sconify.FILL_IN},
        {"port": 5432, "target": "db:5432", "service": "db"},
        {"port": 15000, "target": "db-replica:5432", "service": sconify.FILL_IN},
    ]
    assert any("mesh.egress[cache].service" in f for f in result.fill_in)
    assert {"name": "mesh-ca", "kind": "x509-ca", "common_name": "Mesh CA"} in result.session[
        "secrets"
    ]
    # The application's own configuration is left as it was.
    web_env = next(s for s in result.session["services"] if s["name"] == "web")["environment"]
    assert web_env["DATABASE"] == "db:5432"

    pod = {
        "metadata": {"name": "web-1", "annotations": {
            **template["metadata"]["annotations"], "cloister.io/mesh-ports": "8443",
            "cloister.io/volumes-root": "/var/lib/encrypted"}},
        "spec": template["spec"],
    }  # fmt: skip
    config = _patch.InjectConfig(cas_url="https://cas:8081", cas_cert_pem="PEM", agent_image="a")
    plan = _patch.plan(pod)
    assert plan is not None
    out = _patch.mutate(pod, plan, config)
    container = out["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CLOISTER_EGRESS_DB"] == "127.0.0.1:5432"
    assert env["CLOISTER_EGRESS_CACHE"] == "127.0.0.1:6379"
    assert env["CLOISTER_EGRESS_DB_REPLICA"] == "127.0.0.1:15000"
    assert env["CLOISTER_VOLUMES_ROOT"] == "/var/lib/encrypted"
    assert {"name": "mesh-8443", "containerPort": 8443, "protocol": "TCP"} in container["ports"]

    bad = copy.deepcopy(pod)
    bad["metadata"]["annotations"]["cloister.io/egress"] = "db=99999"
    with pytest.raises(Error, match=r"cloister\.io/egress"):
        _patch.plan(bad)
