"""Mesh proxies against plain TCP and against the TLS tunnels a user would pick instead.

Paths, each from a plain client to a plain server on 127.0.0.1:

- ``plain``: direct TCP, the floor;
- ``mesh``: egress proxy → ingress proxy, each its own ``python -m cloister.mesh`` process (as
  in a deployment, where every pod runs its own), mutual TLS 1.3 with identity checks;
- ``stunnel4``: client-mode stunnel → server-mode stunnel, mutual TLS 1.3, chain and host name
  verified, client certificate required (Debian's stunnel4); once with its default TLS session
  resumption and once without (the mesh never resumes: every connection gets a full handshake
  and a fresh certificate check);
- ``socat``: ``socat`` OPENSSL client → OPENSSL-LISTEN server with the same certificates
  (forks one process per connection).

Figures: one-way throughput (MB/s, best of three runs), request/response on one connection
(64-byte echo: requests per second and latency percentiles), and a new connection per request
(connect, handshake, one echo, close), and the CPU time (user + system) the tunnel processes
spent per GB, per request and per connection: on a busy machine the wall-clock figures move
with the load, the CPU figures much less. Prints a table. Run: ``python benchmarks/mesh.py``;
``--quick`` for a short run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CHUNK = 256 * 1024
REQUEST = 64


# -- certificates (a session CA and two services, as the CAS would issue them) -----------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("bench session CA"))
        .issuer_name(_name("bench session CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for service in ("api", "web"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{service}.bench"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(f"{service}.bench"),
                        x509.UniformResourceIdentifier(f"cloister://bench/{service}"),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{service}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{service}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


# -- the plain server: sink-and-ack for throughput, echo for requests ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A threaded plain TCP server. The first byte of a connection picks the mode:
    ``T`` + 8-byte length: sink that many bytes then answer ``k``; ``E``: echo 64-byte requests.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = _recv_exact(conn, 1)
            if mode == b"T":
                left = int.from_bytes(_recv_exact(conn, 8), "big")
                buf = bytearray(CHUNK)
                while left > 0:
                    n = conn.recv_into(buf, min(CHUNK, left))
                    if not n:
                        return
                    left -= n
                conn.sendall(b"k")
            elif mode == b"E":
                while True:
                    req = _recv_exact(conn, REQUEST)
                    if not req:
                        return
                    conn.sendall(req)

    def close(self) -> None:
        self.sock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return bytes(buf)


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


# -- measurements -----------------------------------------------------------------------------


def throughput(port: int, size: int) -> float:
    """MB/s (10^6 bytes) of a one-way transfer of ``size`` bytes, until the server's ack."""
    payload = os.urandom(CHUNK)
    with _connect(port) as conn:
        start = time.perf_counter()
        conn.sendall(b"T" + size.to_bytes(8, "big"))
        left = size
        while left > 0:
            n = min(left, CHUNK)
            conn.sendall(payload if n == CHUNK else payload[:n])
            left -= n
        if conn.recv(1) != b"k":
            raise RuntimeError("transfer did not complete")
        return size / (time.perf_counter() - start) / 1e6


def request_response(port: int, count: int) -> tuple[float, list[float]]:
    """Requests per second and per-request latencies (s) on one connection."""
    req = os.urandom(REQUEST)
    times: list[float] = []
    with _connect(port) as conn:
        conn.sendall(b"E")
        for _ in range(count // 10):  # warm-up
            conn.sendall(req)
            _recv_exact(conn, REQUEST)
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            conn.sendall(req)
            if _recv_exact(conn, REQUEST) != req:
                raise RuntimeError("echo mismatch")
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
    return count / total, times


def connect_per_request(port: int, count: int) -> list[float]:
    req = os.urandom(REQUEST)
    times: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        with _connect(port) as conn:
            conn.sendall(b"E" + req)
            if _recv_exact(conn, REQUEST) != req:
                raise RuntimeError("echo mismatch")
        times.append(time.perf_counter() - t0)
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- the tunnels ------------------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


RUNNING: dict[int, list[subprocess.Popen[bytes]]] = {}  # front port → tunnel processes


NO_CPU_FIGURES: set[int] = set()  # paths whose CPU cannot be attributed (socat forks)


def cpu_seconds(port: int) -> float:
    """User + system CPU of a path's tunnel processes (0 where it cannot be attributed)."""
    if port in NO_CPU_FIGURES:
        return 0.0
    total = 0.0
    for proc in RUNNING.get(port, []):
        with open(f"/proc/{proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def processes(*cmds: tuple[list[str], int]) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    RUNNING[cmds[-1][1]] = procs
    try:
        for cmd, port in cmds:
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            wait_port(port, procs[-1])
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def mesh_path(d: Path, server_port: int) -> tuple[contextlib.AbstractContextManager[None], int]:
    front, back = free_port(), free_port()
    ingress = {
        "identity": "api.bench",
        "tls": {"cert_file": f"{d}/api.crt", "key_file": f"{d}/api.key", "ca_file": f"{d}/ca.crt"},
        "ingress": [
            {
                "port": back,
                "bind": "127.0.0.1",
                "app_port": server_port,
                "allow_from": ["web.bench"],
            }
        ],
    }
    egress = {
        "identity": "web.bench",
        "tls": {"cert_file": f"{d}/web.crt", "key_file": f"{d}/web.key", "ca_file": f"{d}/ca.crt"},
        "egress": [{"port": front, "target": f"127.0.0.1:{back}", "peer": "api.bench"}],
    }
    (d / "ingress.json").write_text(json.dumps(ingress))
    (d / "egress.json").write_text(json.dumps(egress))
    py = [sys.executable, "-m", "cloister.mesh", "--config"]
    return processes(
        ([*py, str(d / "ingress.json")], back), ([*py, str(d / "egress.json")], front)
    ), front


def stunnel_path(
    d: Path, server_port: int, *, resume: bool = True
) -> tuple[contextlib.AbstractContextManager[None], int]:
    front, back = free_port(), free_port()
    common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
    tag = "" if resume else "-noresume"
    service = "" if resume else "sessionResume = no\n"
    (d / f"st-server{tag}.conf").write_text(
        common
        + f"[ingress]\n{service}accept = 127.0.0.1:{back}\nconnect = 127.0.0.1:{server_port}\n"
        f"cert = {d}/api.crt\nkey = {d}/api.key\nCAfile = {d}/ca.crt\n"
        "verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n"
    )
    (d / f"st-client{tag}.conf").write_text(
        common + f"[egress]\n{service}client = yes\naccept = 127.0.0.1:{front}\n"
        f"connect = 127.0.0.1:{back}\ncert = {d}/web.crt\nkey = {d}/web.key\n"
        f"CAfile = {d}/ca.crt\nverifyChain = yes\ncheckHost = api.bench\n"
        "sslVersionMin = TLSv1.3\n"
    )
    return processes(
        (["stunnel4", str(d / f"st-server{tag}.conf")], back),
        (["stunnel4", str(d / f"st-client{tag}.conf")], front),
    ), front


def socat_path(d: Path, server_port: int) -> tuple[contextlib.AbstractContextManager[None], int]:
    front, back = free_port(), free_port()
    server = (
        f"OPENSSL-LISTEN:{back},bind=127.0.0.1,reuseaddr,fork,cert={d}/api.crt,"
        f"key={d}/api.key,cafile={d}/ca.crt,verify=1,openssl-min-proto-version=TLS1.3"
    )
    client = (
        f"OPENSSL:127.0.0.1:{back},cert={d}/web.crt,key={d}/web.key,cafile={d}/ca.crt,"
        "verify=1,commonname=api.bench,openssl-min-proto-version=TLS1.3"
    )
    # Its work happens in a child per connection, counted only once the child is reaped.
    NO_CPU_FIGURES.add(front)
    return processes(
        (["socat", server, f"TCP:127.0.0.1:{server_port},nodelay"], back),
        (["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork,nodelay", client], front),
    ), front


# -- main ---------------------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    mbps: float
    rps: float
    p50: float
    p95: float
    p99: float
    conn_p50: float
    conn_p99: float
    cpu_per_gb: float  # CPU seconds of the tunnel processes per GB carried
    cpu_per_request: float  # ... per request on one connection
    cpu_per_connection: float  # ... per new connection


def measure(ports: dict[str, int], args: argparse.Namespace) -> list[Row]:
    """Interleaved rounds, so that a busy moment of the machine does not favour one path."""
    size = args.megabytes * 1024 * 1024
    mbps: dict[str, list[float]] = {name: [] for name in ports}
    lat: dict[str, list[float]] = {name: [] for name in ports}
    rr_time: dict[str, float] = dict.fromkeys(ports, 0.0)
    conn: dict[str, list[float]] = {name: [] for name in ports}
    cpu: dict[str, float] = dict.fromkeys(ports, 0.0)
    cpu_rr: dict[str, float] = dict.fromkeys(ports, 0.0)
    cpu_conn: dict[str, float] = dict.fromkeys(ports, 0.0)
    for port in ports.values():
        throughput(port, size // 8)  # warm-up
    for _ in range(args.rounds):
        for name, port in ports.items():
            before = cpu_seconds(port)
            mbps[name].append(throughput(port, size))
            cpu[name] += cpu_seconds(port) - before
            before = cpu_seconds(port)
            rps, times = request_response(port, args.requests // args.rounds)
            cpu_rr[name] += cpu_seconds(port) - before
            lat[name] += times
            rr_time[name] += len(times) / rps
            before = cpu_seconds(port)
            conn[name] += connect_per_request(port, args.connections // args.rounds)
            cpu_conn[name] += cpu_seconds(port) - before
    return [
        Row(
            name,
            max(mbps[name]),
            len(lat[name]) / rr_time[name],
            pct(lat[name], 50),
            pct(lat[name], 95),
            pct(lat[name], 99),
            statistics.median(conn[name]),
            pct(conn[name], 99),
            cpu[name] / (args.rounds * size / 1e9),
            cpu_rr[name] / len(lat[name]),
            cpu_conn[name] / len(conn[name]),
        )
        for name in ports
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--megabytes", type=int, default=512, help="MiB per throughput run")
    parser.add_argument("--requests", type=int, default=15000)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.requests, args.connections = 64, 3000, 60
    server = Server()
    with (
        tempfile.TemporaryDirectory(prefix="cloister-bench-mesh-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        d = Path(tmp)
        make_pki(d)
        ports = {"plain TCP": server.port}
        paths = [("cloister mesh", mesh_path)]
        if shutil.which("stunnel4"):
            paths.append(("stunnel4 pair", stunnel_path))
            paths.append(
                ("stunnel4 pair, no resumption", functools.partial(stunnel_path, resume=False))
            )
        if shutil.which("socat"):
            paths.append(("socat openssl pair", socat_path))
        for name, make in paths:
            ctx, port = make(d, server.port)
            stack.enter_context(ctx)
            ports[name] = port
        rows = measure(ports, args)
    server.close()
    print_table(rows, args)
    return 0


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\nloopback, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"{args.megabytes} MiB per transfer (best of {args.rounds}), {args.requests} requests of "
        f"{REQUEST} B on one connection, {args.connections} connections, "
        f"{args.rounds} interleaved rounds\n"
    )
    head = (
        "| path | throughput MB/s | requests/s | p50 µs | p95 µs | p99 µs "
        "| added p50 µs | new conn p50 ms | new conn p99 ms | tunnel CPU s/GB "
        "| tunnel CPU µs/request | tunnel CPU ms/conn |"
    )
    print(head)
    print("|" + "---|" * 12)
    base = rows[0].p50
    for r in rows:
        print(
            f"| {r.path} | {r.mbps:,.0f} | {r.rps:,.0f} | {r.p50 * 1e6:.0f} | {r.p95 * 1e6:.0f} "
            f"| {r.p99 * 1e6:.0f} | {(r.p50 - base) * 1e6:+.0f} | {r.conn_p50 * 1e3:.2f} "
            f"| {r.conn_p99 * 1e3:.2f} | {r.cpu_per_gb:.2f} | {r.cpu_per_request * 1e6:.0f} "
            f"| {r.cpu_per_connection * 1e3:.2f} |".replace("| 0.00 |", "| – |").replace(
                "| 0 |", "| – |"
            )
        )


if __name__ == "__main__":
    sys.exit(main())
