"""Assembling and serving a CAS: data directory, store, identity, verifiers, TLS 1.3 server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cloister import limits
from cloister._files import write_private
from cloister.attestation import Tee, Verifier, simulated
from cloister.cas import api, ratelimit, recovery
from cloister.cas.identity import Identity, SimulatedSelf
from cloister.cas.service import Cas, cas_measurement
from cloister.errors import BackendUnavailable

log = logging.getLogger(__name__)

SIMULATION_BANNER = (
    "SIMULATION MODE: this CAS runs without a TEE. Its state, keys and evidence protect "
    "nothing. Use it for development and tests only."
)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    simulation: bool
    db_url: str | None = None
    hostnames: Sequence[str] = ()
    # Where hardware verifiers get collateral: an offline directory (the layout of a case's
    # ``collateral/`` folder), else Intel PCS or a PCCS, and AMD KDS.
    collateral_dir: Path | None = None
    pccs_url: str | None = None
    kds_url: str | None = None


def hardware_tee_present() -> bool:
    return Path("/dev/attestation").exists() or Path("/sys/kernel/config/tsm/report").exists()


def build(settings: Settings, *, now: datetime | None = None) -> Cas:
    """A ready ``Cas`` over the data directory (created with mode 0700 when missing)."""
    now = now or datetime.now(UTC)
    if not settings.simulation:
        if not hardware_tee_present():
            raise BackendUnavailable(
                "no TEE found (neither /dev/attestation nor configfs-tsm); "
                "pass --simulation to run an unprotected development CAS"
            )
        raise BackendUnavailable(
            "sealing the store key to a hardware TEE is not available in this version; "
            "pass --simulation to run an unprotected development CAS"
        )
    log.warning(SIMULATION_BANNER)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Verifies the store's hash chain and every row against the signed head kept beside the
    # key: a rolled-back or edited database stops the CAS here (RollbackError, logged).
    store = recovery.open_store(settings.data_dir, settings.db_url, create_key=True)
    recovery.record_start(store, simulation=settings.simulation)
    platform = simulated.SimulatedPlatform.load_or_create(
        settings.data_dir / "simulation-platform.key"
    )
    self_evidence = SimulatedSelf(platform, cas_measurement())
    identity = Identity.load_or_create(
        store, hostnames=settings.hostnames, now=now, self_evidence=self_evidence
    )
    verifiers: dict[Tee, Verifier] = {Tee.SIMULATION: simulated.SimulatedVerifier()}
    verifiers.update(hardware_verifiers(settings))
    return Cas(
        store,
        identity,
        verifiers,
        self_evidence=self_evidence,
    )


def hardware_verifiers(settings: Settings) -> dict[Tee, Verifier]:
    """SGX, TDX and SNP verifiers sharing one collateral cache (warm after the first quote)."""
    from cloister.attestation import collateral, verifier_for

    cache = collateral.CollateralCache()
    dcap: collateral.CollateralSource
    amd: collateral.CollateralSource
    if settings.collateral_dir is not None:
        dcap = amd = collateral.DirectorySource(settings.collateral_dir)
    else:
        pcs, kds = settings.pccs_url, settings.kds_url
        dcap = collateral.PcsSource(pcs) if pcs else collateral.PcsSource()
        amd = collateral.KdsSource(kds) if kds else collateral.KdsSource()
    return {
        Tee.SGX: verifier_for(Tee.SGX, collateral=dcap, cache=cache),
        Tee.TDX: verifier_for(Tee.TDX, collateral=dcap, cache=cache),
        Tee.SNP: verifier_for(Tee.SNP, collateral=amd, cache=cache),
    }


def tls_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3 only, with the CAS's identity key. The key touches only a memory-backed file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # No session tickets: an agent is a new process that never resumes, and making two
    # tickets per connection costs the CAS and every client CPU for nothing.
    ctx.num_tickets = 0
    # mkdtemp makes a private 0700 directory; /dev/shm keeps the key off the disk.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(identity.cert_pem())
        write_private(key, identity.key_pem(), exclusive=True)
        ctx.load_cert_chain(cert, key)
    return ctx


class _TLSConfig(uvicorn.Config):
    """uvicorn's config with our own TLS 1.3 context instead of one built from files."""

    def __init__(self, app: Any, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._context = context

    def load(self) -> None:
        super().load()
        self.ssl = self._context


@dataclass(frozen=True)
class ServeOptions:
    """How the HTTP server treats its clients: rate limits and the slow-client timeouts."""

    rate_limits: ratelimit.RateLimits = field(default_factory=ratelimit.RateLimits)
    header_timeout: float = limits.HTTP_HEADER_TIMEOUT_SECONDS
    body_timeout: float = limits.HTTP_BODY_TIMEOUT_SECONDS


class _GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request headers.

    uvicorn closes idle keep-alive connections, but a client that sends a request one byte at
    a time, or opens a connection and sends nothing, holds its slot for ever; httptools itself
    bounds no header size. Here, whenever the connection waits for a request's headers (from
    the connection's start, and from the first byte of each later request), a deadline runs
    and the bytes received are counted: past ``header_timeout`` the connection is closed, past
    ``max_header_bytes`` it gets 431 and is closed. The body has its own deadline and bound in
    ``api._BodyLimit``.
    """

    header_timeout: float = limits.HTTP_HEADER_TIMEOUT_SECONDS
    max_header_bytes: int = limits.MAX_HTTP_HEADER_BYTES
    _deadline: asyncio.TimerHandle | None = None
    _header_bytes: int = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            # Still waiting for (the rest of) a request's headers.
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._disarm()
                self.transport.write(_HEADERS_TOO_LARGE)
                self.transport.close()
                return
            self._arm()
        else:
            self._header_bytes = 0
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)


def _protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    return type("GuardedHttp", (_GuardedHttp,), {"header_timeout": header_timeout})


def make_server(
    cas: Cas, host: str, port: int, options: ServeOptions | None = None
) -> uvicorn.Server:
    options = options or ServeOptions()
    config = _TLSConfig(
        api.create_app(cas, rate_limits=options.rate_limits, body_timeout=options.body_timeout),
        tls_context(cas.identity),
        host=host,
        port=port,
        http=_protocol(options.header_timeout),
        # uvloop's event loop and TLS, and httptools' parser: a third less CPU per connection
        # than asyncio's pure-Python TLS and h11 (measured with benchmarks/activation.py).
        loop="uvloop",
        # The client is the TCP peer; X-Forwarded-* is the client's own claim (rate limits).
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=limits.HTTP_KEEP_ALIVE_SECONDS,
        limit_concurrency=limits.MAX_HTTP_CONNECTIONS,
    )
    return uvicorn.Server(config)


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    workers: int,
    options: ServeOptions,
    cpu_affinity: bool = False,
) -> None:
    """Serve with ``workers`` processes that share one listening socket and nothing else.

    Each worker builds its own ``Cas`` (store connections, caches, rate-limit buckets) from
    ``settings`` after the fork; what they share is what the store shares. The parent creates
    the data directory, keys and identity once first, so that no two workers race to create
    them, then only forwards SIGTERM/SIGINT and waits. If a worker dies, the others are
    stopped and the CAS exits non-zero, for its supervisor (Kubernetes) to restart it.

    ``cpu_affinity`` pins worker ``i`` to the ``i``-th CPU this process may run on (see
    ``worker_cpus``): a worker then keeps its caches, and activations see a steadier latency
    on a busy machine (docs/performance.md).
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    cpus = worker_cpus(workers, sorted(os.sched_getaffinity(0))) if cpu_affinity else None
    if workers == 1:
        make_server(build(settings), host, port, options).run()
        return
    build(settings).store.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every response waits for the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(limits.MAX_HTTP_CONNECTIONS)
    sock.set_inheritable(True)
    pids: list[int] = []
    parent = os.getpid()
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                if cpus is not None:
                    os.sched_setaffinity(0, {cpus[i]})
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent(parent)
                make_server(build(settings), host, port, options).run(sockets=[sock])
            except BaseException:  # a worker reports and exits, never returns to the parent's code
                log.exception("CAS worker %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    sock.close()
    _supervise(pids)


def worker_cpus(workers: int, allowed: Sequence[int]) -> list[int] | None:
    """The CPU for each worker, or ``None`` (with a warning) when pinning cannot help.

    One worker stays unpinned: its threads that release the GIL (SQLite, fsync) may then run
    on another core. Fewer CPUs than workers would put two workers on one CPU.
    """
    if workers == 1:
        log.warning("--cpu-affinity: a single worker is not pinned")
        return None
    if len(allowed) < workers:
        log.warning(
            "--cpu-affinity: %d workers but only %d CPU(s) allowed; workers are not pinned",
            workers,
            len(allowed),
        )
        return None
    return list(allowed[:workers])


def _die_with_parent(parent: int) -> None:
    """A worker whose supervisor is killed (even with SIGKILL) must not go on serving alone:
    it would hold the port, and a restarted CAS could not bind it."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _supervise(pids: list[int]) -> None:
    alive = set(pids)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while alive:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        alive.discard(pid)
        if not stopping:
            log.error("CAS worker %d exited (%d); stopping the others", pid, code)
            status = 1
            stop(signal.SIGTERM, None)
    if status:
        raise SystemExit(status)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
