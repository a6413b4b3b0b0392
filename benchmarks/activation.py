"""Activation throughput: N concurrent agents against one CAS on this machine.

Everything is real except the TEE: each agent fetches a nonce, makes its ephemeral ML-KEM-768 +
X25519 and P-256 keys and a CSR, produces simulation evidence bound to them, activates over
HTTPS (TLS 1.3, pinned CAS identity, a new connection per activation as a starting pod would),
and opens its sealed bundle. The session gives the service generated secrets, a certificate
from the session's CA for the agent's own key, and an injected file, so every activation issues
a certificate, renders templates and seals a bundle.

The CAS is ``cloister cas serve --simulation --workers W --cpu-affinity`` (rate limits lifted)
in its own process tree. The agents run in separate client processes (threads inside each), so
that the client's Python does not share a GIL with the CAS; on a 2-core machine they still share
the cores, and the table says what the clients cost. They speak HTTP/1.1 over the pinned TLS
context, with requests written whole and responses parsed by ``httptools`` (a load generator
should leave the cores to the server), and run the agent's own ``activation.prepare`` and
``Attempt.open``; ``--agent-client`` uses the agent's httpx client.

Load is a closed loop by default (every agent activates again at once); ``--rate R`` offers
R activations per second instead, taken by whichever agent is free, with latency counted from
when each was due (no coordinated omission).

Per backend (SQLite, and PostgreSQL when its binaries are installed: a throwaway cluster is
started as the ``postgres`` user on a free loopback port) and per N, the table shows
activations per second, latency percentiles of whole activations (nonce, keys, evidence,
activate, unseal), errors, the CAS's CPU (cores busy, and milliseconds per activation, all
worker processes together), its peak resident memory (sum over worker processes), and the
clients' CPU per activation.

Usage: ``python benchmarks/activation.py [--agents 1,16,64,256] [--seconds 8] [--workers W]
[--clients K] [--backends sqlite,postgres] [--rate 0,100] [--agent-client] [--profile DIR]
[--no-cpu-affinity]``. The CAS runs with ``--cpu-affinity`` unless told otherwise.
``--profile`` records the CAS with py-spy (when installed) at the largest N.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import pwd
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httptools

from cloister import protocol
from cloister.agent import activation
from cloister.agent.evidence import SimulatedProvider
from cloister.attestation import simulated
from cloister.client import CasClient, pinned_context

MEASUREMENT = hashlib.sha256(b"benchmark workload v1").digest()  # any 32 bytes will do

SESSION = """\
name: bench
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: app
    image_name: app-image
    command: ["/app", "--password", "$$SCONE::password$$"]
    environment:
      APP_TOKEN: $$SCONE::token:hex$$
    attestation: [{{tee: simulation, measurement: {measurement}}}]
secrets:
  - {{name: password, kind: ascii, size: 24}}
  - {{name: token, kind: binary, size: 32}}
  - {{name: ca, kind: x509-ca, common_name: Bench CA}}
  - {{name: tls, kind: x509, issuer: ca, common_name: app, dns: [app.local], endpoint: server}}
images:
  - name: app-image
    injection_files:
      - path: /run/app/tls.crt
        content: $$SCONE::tls:chain$$
      - path: /run/app/app.conf
        content: "password=$$SCONE::password$$"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the CAS exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# --- PostgreSQL: a throwaway cluster --------------------------------------------------------


def _pg_bindir() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


@contextlib.contextmanager
def postgres_cluster(root: Path) -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port, as the postgres user; yields a URL."""
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    pg = pwd.getpwnam("postgres")
    root.mkdir(parents=True, exist_ok=True)
    os.chown(root, pg.pw_uid, pg.pw_gid)
    port = free_port()
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    data = root / "data"
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "server.log"), "-o",
        f"-p {port} -k {root} -h 127.0.0.1 -c max_connections=300", "start")  # fmt: skip
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "cas")
        yield f"postgresql://postgres@127.0.0.1:{port}/cas"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")


# --- the CAS process tree -------------------------------------------------------------------


@dataclass
class Cas:
    proc: subprocess.Popen[bytes]
    url: str
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, CLOISTER_HOME=str(self.home), CLOISTER_LOG_LEVEL="WARNING")

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "cloister", *args],
            env=self.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"cloister {' '.join(args)}: {out.stderr}")
        return out.stdout

    def pids(self) -> list[int]:
        """The CAS's process and its workers."""
        out = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            out += [int(p) for p in children.split()]
        return out

    def cpu_seconds(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def peak_rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        return total / 1024


def start_cas(tmp: Path, workers: int, db: str | None, *, cpu_affinity: bool) -> Cas:
    port = free_port()
    home = tmp / "home"
    log = open(tmp / "cas.log", "ab")
    cmd = [sys.executable, "-m", "cloister", "cas", "serve", "--simulation",
           "--data-dir", str(tmp / "cas"), "--listen", f"127.0.0.1:{port}",
           "--workers", str(workers), "--activation-rate", "0", "--session-rate", "0"]  # fmt: skip
    if db:
        cmd += ["--db", db]
    if cpu_affinity:
        cmd += ["--cpu-affinity"]
    env = dict(os.environ, CLOISTER_HOME=str(home), CLOISTER_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    log.close()
    wait_port(port, proc)
    cas = Cas(proc, f"https://127.0.0.1:{port}", home)
    cas.cli("cas", "attest", cas.url, "--allow-simulation")
    cas.cli("keys", "create")
    measurement = MEASUREMENT.hex()
    session = tmp / "session.yaml"
    session.write_text(SESSION.format(measurement=measurement))
    cas.cli("session", "create", str(session), "--cas", cas.url)
    return cas


def stop_cas(cas: Cas) -> None:
    cas.proc.terminate()
    try:
        cas.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        cas.proc.kill()
        cas.proc.wait()


# --- the agents -------------------------------------------------------------------------------


@dataclass
class ClientResult:
    latencies: list[float]
    errors: dict[str, int]
    cpu_seconds: float


class LeanTransport:
    """The load generator's HTTP: one pinned TLS 1.3 connection per activation, requests
    written whole and responses read with ``httptools`` (the parser the CAS itself uses).

    A load generator should leave the cores to the server it measures (as wrk does): the
    agent's httpx client costs the client several times more CPU per request, and even the
    standard library's ``http.client`` spends more on parsing response headers (through the
    ``email`` package) than on the TLS handshake. Every step of the protocol is still done:
    nonce, own keys, evidence, CSR, activation, unseal; responses are checked for status,
    length and framing.
    """

    def __init__(self, url: str, cert_pem: bytes, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.context = pinned_context(cert_pem)
        self.timeout = timeout
        self.authority = f"{self.host}:{self.port}".encode()

    def activate(self, provider: SimulatedProvider) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.context.wrap_socket(raw) as conn:
            nonce = protocol.NonceResponse.model_validate_json(self._post(conn, b"/v1/nonces", b""))
            attempt = activation.prepare(nonce.nonce, provider, "bench", "app")
            body = attempt.request.model_dump_json().encode()
            resp = protocol.ActivationResponse.model_validate_json(
                self._post(conn, b"/v1/activate", body)
            )
            attempt.open(resp)

    def _post(self, conn: ssl.SSLSocket, path: bytes, body: bytes) -> bytes:
        conn.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, self.authority, len(body), body)
        )
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        while not response.complete:
            data = conn.recv(65536)
            if not data:
                raise RuntimeError("the CAS closed the connection mid-response")
            parser.feed_data(data)
        status = parser.get_status_code()
        data = b"".join(response.body)
        if status != 200:
            try:
                reason = protocol.ErrorBody.model_validate_json(data).error
            except ValueError:
                reason = f"http-{status}"
            raise RuntimeError(reason)
        return data


class _Response:
    """``httptools`` callbacks: the body, and whether the message is complete."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = False

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class AgentTransport:
    """The agent's own client (``CasClient``, httpx), one per activation as in a new pod."""

    def __init__(self, url: str, cert_pem: bytes, timeout: float) -> None:
        self.url, self.cert_pem, self.timeout = url, cert_pem, timeout

    def activate(self, provider: SimulatedProvider) -> None:
        with CasClient(self.url, cert_pem=self.cert_pem, timeout=self.timeout) as client:
            activation.activate_once(client, provider, "bench", "app")


@dataclass(frozen=True)
class Load:
    """What the client processes do: ``rate`` 0 is a closed loop (every agent activates again
    as soon as it is done); otherwise activations are due at a constant ``rate`` per second in
    all, taken by whichever agent is free, and latency counts from when one was due, so that
    a CAS that falls behind is charged for the wait (no coordinated omission)."""

    rate: float
    agent_client: bool


def _client_process(
    url: str,
    cert_pem: bytes,
    agents: int,
    load: Load,
    share: tuple[int, int],
    window: tuple[float, float, float],
    out: mp.Queue,
) -> None:
    """One client process: ``agents`` threads activating until the window's end."""
    # Simulation warns on every evidence; one client process would print thousands.
    logging.getLogger("cloister").setLevel(logging.ERROR)
    start, warmup, end = window
    provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)
    transport_type = AgentTransport if load.agent_client else LeanTransport
    transport = transport_type(url, cert_pem, 60.0)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    # Open loop: this process takes every ``procs``-th slot of the schedule, from ``index``.
    index, procs = share
    interval = procs / load.rate if load.rate > 0 else 0.0
    next_slot = [0]

    def due() -> float:
        if load.rate <= 0:
            return time.time()
        with lock:
            i = next_slot[0]
            next_slot[0] += 1
        t = start + (i + index / procs) * interval
        delay = t - time.time()
        if delay > 0:
            time.sleep(delay)
        return t

    def agent() -> None:
        while time.time() < start:
            time.sleep(min(0.01, max(0.0, start - time.time())))
        while True:
            t0 = due()
            if t0 >= end:
                return
            try:
                transport.activate(provider)
                ok, reason = True, ""
            except Exception as exc:
                ok, reason = False, getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            t1 = time.time()
            if warmup <= t1 <= end:  # completed within the measured window
                with lock:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors[reason] = errors.get(reason, 0) + 1

    threads = [threading.Thread(target=agent, daemon=True) for _ in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put(ClientResult(latencies, errors, usage.ru_utime + usage.ru_stime))


@dataclass
class Row:
    backend: str
    load: str
    agents: int
    rate: float
    p50: float
    p95: float
    p99: float
    errors: int
    cas_cores: float
    cas_ms: float
    cas_rss_mb: float
    client_ms: float


def run_load(
    cas: Cas, backend: str, agents: int, clients: int, seconds: float, warmup: float, load: Load
) -> Row:
    cert_pem = (cas.home / "cas").glob("*.pem").__next__().read_bytes()
    procs_n = max(1, min(clients, agents))
    shares = [agents // procs_n + (1 if i < agents % procs_n else 0) for i in range(procs_n)]
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    start = time.time() + 1.5  # time for the client processes to start and import
    warm_end = start + warmup
    end = warm_end + seconds
    window = (start, warm_end, end)
    procs = [
        ctx.Process(
            target=_client_process,
            args=(cas.url, cert_pem, n, load, (i, procs_n), window, queue),
        )
        for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    while time.time() < warm_end:
        time.sleep(0.005)
    cpu0 = cas.cpu_seconds()
    while time.time() < end:
        time.sleep(0.005)
    cpu1 = cas.cpu_seconds()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    latencies = sorted(x for r in results for x in r.latencies)
    errors = sum(n for r in results for n in r.errors.values())
    for r in results:
        for reason, n in r.errors.items():
            print(f"  {backend} N={agents}: {n} × {reason}", file=sys.stderr)
    done = len(latencies)
    cas_cpu = cpu1 - cpu0
    client_cpu = sum(r.cpu_seconds for r in results)  # whole client lifetime, warm-up included
    client_window = seconds + warmup + 1.5

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    client_done = max(1, done * client_window / seconds)
    return Row(
        backend=backend,
        load=f"{load.rate:.0f}/s" if load.rate > 0 else "closed",
        agents=agents,
        rate=done / seconds,
        p50=pct(0.50),
        p95=pct(0.95),
        p99=pct(0.99),
        errors=errors,
        cas_cores=cas_cpu / seconds,
        cas_ms=1000 * cas_cpu / max(1, done),
        cas_rss_mb=cas.peak_rss_mb(),
        client_ms=1000 * client_cpu / client_done,
    )


def profile(cas: Cas, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy is not installed; no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(cas.proc.pid), "--subprocesses", "--rate", "250", "--gil",
         "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def print_table(rows: list[Row], workers: int, clients: int, *, pinned: bool) -> None:
    print()
    placement = "each pinned to its own CPU" if pinned else "unpinned"
    print(f"CAS: {workers} worker process(es), {placement}; agents in up to {clients} client "
          f"processes; {os.cpu_count()} cores shared by both.")  # fmt: skip
    header = (
        "| backend | load | agents | activations/s | p50 ms | p95 ms | p99 ms | errors "
        "| CAS cores busy | CAS CPU ms/act | CAS peak RSS MB | client CPU ms/act |"
    )
    print(header)
    print("|---" * 12 + "|")
    for r in rows:
        print(f"| {r.backend} | {r.load} | {r.agents} | {r.rate:.0f} | {r.p50:.1f} | {r.p95:.1f} "
              f"| {r.p99:.1f} | {r.errors} | {r.cas_cores:.2f} | {r.cas_ms:.2f} "
              f"| {r.cas_rss_mb:.0f} | {r.client_ms:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1,16,64,256")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", type=int, default=4, help="client processes at most")
    parser.add_argument(
        "--no-cpu-affinity",
        action="store_true",
        help="leave the CAS's workers unpinned (the default pins each to its own CPU)",
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--rate",
        default="0",
        help="offered activations/s, comma-separated; 0 is a closed loop (the default)",
    )
    parser.add_argument(
        "--agent-client",
        action="store_true",
        help="agents use the agent's own httpx client instead of the lean load generator",
    )
    args = parser.parse_args()
    counts = [int(x) for x in args.agents.split(",")]
    loads = [Load(float(r), args.agent_client) for r in args.rate.split(",")]
    rows: list[Row] = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix=f"cloister-bench-{backend}-") as d:
            tmp = Path(d)
            os.chmod(tmp, 0o755)  # noqa: S103 - the postgres user must reach its cluster
            with contextlib.ExitStack() as stack:
                db = None
                if backend == "postgres":
                    if _pg_bindir() is None:
                        print("PostgreSQL is not installed: skipped", file=sys.stderr)
                        continue
                    db = stack.enter_context(postgres_cluster(tmp / "pg"))
                cas = start_cas(tmp, args.workers, db, cpu_affinity=not args.no_cpu_affinity)
                stack.callback(stop_cas, cas)
                for load in loads:
                    for n in counts:
                        spy = None
                        if args.profile is not None and n == max(counts):
                            args.profile.mkdir(parents=True, exist_ok=True)
                            name = f"cas-{backend}-{n}-{load.rate:.0f}.folded.txt"
                            seconds = args.warmup + args.seconds + 1.5
                            spy = profile(cas, args.profile / name, seconds)
                        row = run_load(
                            cas, backend, n, args.clients, args.seconds, args.warmup, load
                        )
                        if spy is not None:
                            spy.wait(timeout=60)
                        rows.append(row)
                        print(f"{backend} {row.load} N={n}: {row.rate:.0f}/s p99 {row.p99:.1f} "
                              f"ms errors {row.errors}", file=sys.stderr)  # fmt: skip
    print_table(rows, args.workers, args.clients, pinned=not args.no_cpu_affinity)
    fingerprint = hashlib.sha256(repr(rows).encode()).hexdigest()[:8]
    print(f"\n(run {fingerprint}; python benchmarks/activation.py {' '.join(sys.argv[1:])})")


if __name__ == "__main__":
    main()
