"""The mesh as the agent runs it: ``python -m cloister.mesh`` processes between plain programs.

A plain TCP echo server stands for the called application, a plain socket for the calling one;
neither knows about TLS. Two mesh processes (the caller's egress, the callee's ingress) carry
the traffic; a third, for a service the callee does not allow, is refused, and the refusal shows
up in the callee's log (both identities) and in its Prometheus counters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT = 10.0  # seconds any socket operation of the test may block


def _meshpki() -> ModuleType:
    # The unit tests' test CA, shared by path: tests/ is not a package.
    path = Path(__file__).parents[1] / "unit" / "mesh" / "meshpki.py"
    spec = importlib.util.spec_from_file_location("meshpki_integration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


class EchoServer:
    """A plain TCP echo server in a thread; counts connections and bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    self.received += data
                    conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.sock.close()
        self._accepter.join(IO_TIMEOUT)
        for t in self._threads:
            t.join(IO_TIMEOUT)


class MeshProcess:
    def __init__(self, config: dict[str, object], path: Path) -> None:
        path.write_text(json.dumps(config))
        self.log = path.with_suffix(".log")
        self._log = open(self.log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloister.mesh", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "CLOISTER_LOG_LEVEL": "INFO"},
        )
        assert self.proc.stdout is not None
        line = self._readline_bounded()
        assert line.startswith("cloister-mesh ready"), line
        self.ports = dict(item.split("=") for item in line.split()[2:])

    def _readline_bounded(self) -> str:
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline().decode()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(IO_TIMEOUT)
        if not result:
            self.stop()
            raise AssertionError(f"mesh did not start; log: {self.log.read_text()}")
        return result[0].strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return code


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        try:
            conn.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
            return bytes(got)
        except ConnectionError:
            return b""


def _wait_for_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged: {path.read_text()}"
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def test_plain_programs_talk_through_mesh_processes(tmp_path: Path, echo: EchoServer) -> None:
    pki = _meshpki()
    ca = pki.TestCA()
    metrics_port = _free_port()
    api_tls = pki.write_files(tmp_path, "api", ca.issue("api.demo"), ca)
    web_tls = pki.write_files(tmp_path, "web", ca.issue("web.demo"), ca)
    evil_tls = pki.write_files(tmp_path, "evil", ca.issue("evil.demo"), ca)

    ingress = MeshProcess(
        {
            "identity": "api.demo",
            "tls": api_tls,
            "ingress": [
                {"port": 0, "bind": "127.0.0.1", "app_port": echo.port, "allow_from": ["web.demo"]}
            ],
            "metrics_port": metrics_port,
        },
        tmp_path / "api.json",
    )
    procs = [ingress]
    try:
        target = f"127.0.0.1:{ingress.ports['ingress']}"
        web = MeshProcess(
            {
                "identity": "web.demo",
                "tls": web_tls,
                "egress": [{"port": 0, "target": target, "peer": "api.demo"}],
            },
            tmp_path / "web.json",
        )
        procs.append(web)
        evil = MeshProcess(
            {
                "identity": "evil.demo",
                "tls": evil_tls,
                "egress": [{"port": 0, "target": target, "peer": "api.demo"}],
            },
            tmp_path / "evil.json",
        )
        procs.append(evil)

        payload = os.urandom(1 << 20)
        assert _exchange(int(web.ports["egress"]), payload) == payload
        connections_before = echo.connections
        assert _exchange(int(evil.ports["egress"]), b"let me in") == b""

        ingress.proc.send_signal(signal.SIGHUP)  # re-read the TLS files, keep serving
        _wait_for_log(ingress.log, "TLS material reloaded")
        assert _exchange(int(web.ports["egress"]), b"after reload") == b"after reload"

        with socket.create_connection(("127.0.0.1", metrics_port), timeout=IO_TIMEOUT) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            metrics = b""
            while chunk := conn.recv(65536):
                metrics += chunk
        assert b'reason="not-allowed"} 1.0' in metrics
        assert b"cloister_mesh_connections_total" in metrics
    finally:
        codes = [p.stop() for p in procs]

    assert codes == [0] * len(procs)  # SIGTERM is a clean stop
    assert connections_before == 1 and echo.connections == 2
    assert bytes(echo.received) == payload + b"after reload"
    log = ingress.log.read_text()
    assert "refused cloister://demo/evil" in log and "service api.demo" in log
    assert "PRIVATE KEY" not in log


def test_an_invalid_configuration_exits_with_status_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"identity": "api.demo", "ingress": []}))
    done = subprocess.run(
        [sys.executable, "-m", "cloister.mesh", "--config", str(path)],
        capture_output=True,
        timeout=IO_TIMEOUT * 3,
        check=False,
    )
    assert done.returncode == 2
    assert b"invalid mesh configuration" in done.stderr
