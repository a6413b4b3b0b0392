"""The ingress and egress proxies, and the ``Mesh`` that runs them side by side.

- **Ingress** (one listener per ``IngressRule``): accepts TCP on the public port, completes a
  TLS 1.3 handshake that requires a client certificate from the session CA, then checks the
  caller's identity against ``allow_from``. Only an authorised caller causes a connection to
  the application on loopback; a refused one is reset before a single byte is decrypted.
- **Egress** (one listener per ``EgressRule``): accepts the application's plaintext connection
  on a loopback port, connects to the target, and completes a TLS 1.3 handshake in which
  OpenSSL checks the server certificate against the session CA and the expected identity; the
  identity is checked once more, exactly, before the application's bytes are read.

This module owns listening, admission (connection limits), authorisation decisions, counters
and refusal logs. The byte relay and the TLS state machine are in ``_link``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Callable
from typing import ClassVar, Final

from cloister.mesh import _tls
from cloister.mesh._link import Link, Scratch
from cloister.mesh.config import EgressRule, IngressRule, MeshConfig
from cloister.mesh.stats import MeshStats

__all__ = ["READY_LINE", "Mesh", "run_egress", "run_ingress", "run_mesh", "serve"]

logger = logging.getLogger("cloister.mesh")

READY_LINE: Final = "cloister-mesh ready"
LISTEN_BACKLOG: Final = 512
MAX_REFUSAL_LOGS_PER_SECOND: Final = 20  # per listener; the counters count every event
METRICS_REQUEST_TIMEOUT: Final = 5.0  # seconds for a scraper to send its request head
MAX_METRICS_REQUEST_BYTES: Final = 8192


class Listener:
    """A listening socket and the connections it accepted."""

    direction: ClassVar[str]

    def __init__(self, mesh: Mesh, bind: str, port: int) -> None:
        self.mesh = mesh
        self.loop = mesh.loop
        self.bind = bind
        self.port = port
        self.links: set[Link] = set()
        self.idle_timeout = mesh.config.limits.idle_timeout
        self._server: asyncio.Server | None = None
        self._log_window = 0
        self._logged = 0
        self._suppressed = 0

    @property
    def name(self) -> str:
        return f"{self.direction} :{self.port}"

    @property
    def _key(self) -> tuple[str, str]:
        return (self.direction, str(self.port))

    async def start(self) -> None:
        self._server = await self.loop.create_server(
            self._accept, self.bind, self.port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close(abort=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    def _new_link(self, *, server_side: bool, server_hostname: str | None) -> Link:
        bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = self.mesh.server_ctx if server_side else self.mesh.client_ctx
        assert ctx is not None
        sslobj = ctx.wrap_bio(
            bio_in, bio_out, server_side=server_side, server_hostname=server_hostname
        )
        return Link(self, sslobj, bio_in, bio_out, self.mesh.scratch)

    def _admit(self, link: Link, transport: asyncio.Transport) -> bool:
        peer = transport.get_extra_info("peername")
        link.remote = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(self.links) >= self.mesh.config.limits.max_connections:
            link.refuse("capacity", "too many open connections")
            return False
        self.links.add(link)
        limits = self.mesh.config.limits
        link.arm_setup_timer(limits.handshake_timeout + limits.connect_timeout)
        return True

    # -- events from links ----------------------------------------------------------------

    def net_made(self, link: Link) -> None:
        raise NotImplementedError

    def plain_made(self, link: Link) -> None:
        raise NotImplementedError

    def authorise(self, link: Link) -> None:
        raise NotImplementedError

    def opened(self, link: Link) -> None:
        self.mesh.stats.accepted[self._key] += 1
        self.mesh.stats.active[self._key] += 1

    def closed(self, link: Link, was_open: bool) -> None:
        self.links.discard(link)
        if was_open:
            stats = self.mesh.stats
            stats.active[self._key] -= 1
            stats.bytes_out[self._key] += link.sent
            stats.bytes_in[self._key] += link.received

    def idle_closed(self, link: Link) -> None:
        self.mesh.stats.closed_idle[self._key] += 1

    def upstream_failed(self, link: Link, exc: BaseException) -> None:
        self.mesh.stats.upstream_errors[self._key] += 1
        if self._may_log():
            reason = str(exc) or type(exc).__name__
            logger.warning("mesh %s: %s unreachable: %s", self.name, self._upstream(), reason)

    def refused(self, link: Link, reason: str, detail: str) -> None:
        self.mesh.stats.refused[(*self._key, reason)] += 1
        if self._may_log():
            logger.warning("mesh %s: %s", self.name, self._refusal_text(link, reason, detail))

    def _refusal_text(self, link: Link, reason: str, detail: str) -> str:
        raise NotImplementedError

    def _upstream(self) -> str:
        raise NotImplementedError

    def _may_log(self) -> bool:
        window = int(time.monotonic())
        if window != self._log_window:
            if self._suppressed:
                logger.warning(
                    "mesh %s: %d more refusals and upstream errors not logged",
                    self.name,
                    self._suppressed,
                )
            self._log_window, self._logged, self._suppressed = window, 0, 0
        if self._logged >= MAX_REFUSAL_LOGS_PER_SECOND:
            self._suppressed += 1
            return False
        self._logged += 1
        return True


class IngressListener(Listener):
    direction = "ingress"

    def __init__(self, mesh: Mesh, rule: IngressRule) -> None:
        super().__init__(mesh, str(rule.bind), rule.port)
        self.rule = rule

    def _accept(self) -> asyncio.BaseProtocol:
        return self._new_link(server_side=True, server_hostname=None).net_leg

    def net_made(self, link: Link) -> None:
        assert link.net is not None
        self._admit(link, link.net)

    def plain_made(self, link: Link) -> None:
        assert link.plain is not None
        link.plain.pause_reading()  # until start(): nothing flows before both legs are ready

    def authorise(self, link: Link) -> None:
        assert link.peer is not None
        caller = link.peer.first_of(self.rule.allow_from)
        if caller is None:
            link.refuse("not-allowed", "caller is not in allow_from")
            return
        link.authorised_as = caller
        link.pending = self.loop.create_task(self._connect_app(link))

    async def _connect_app(self, link: Link) -> None:
        try:
            async with asyncio.timeout(self.mesh.config.limits.connect_timeout):
                await self.loop.create_connection(
                    lambda: link.plain_leg, str(self.rule.app_host), self.rule.app_port
                )
        except (OSError, TimeoutError) as exc:
            link.upstream_failed(exc)
            return
        link.start()

    def _refusal_text(self, link: Link, reason: str, detail: str) -> str:
        caller = link.peer.describe() if link.peer is not None else "unauthenticated caller"
        return (
            f"service {self.mesh.config.identity} refused {caller} from {link.remote}: "
            f"{reason} ({detail})"
        )

    def _upstream(self) -> str:
        return f"application at {self.rule.app_host}:{self.rule.app_port}"


class EgressListener(Listener):
    direction = "egress"

    def __init__(self, mesh: Mesh, rule: EgressRule) -> None:
        super().__init__(mesh, str(rule.bind), rule.port)
        self.rule = rule

    def _accept(self) -> asyncio.BaseProtocol:
        return self._new_link(server_side=False, server_hostname=self.rule.peer.dns_name).plain_leg

    def plain_made(self, link: Link) -> None:
        assert link.plain is not None
        link.plain.pause_reading()  # the app's bytes wait in its socket until the peer is known
        if self._admit(link, link.plain):
            link.pending = self.loop.create_task(self._connect_peer(link))

    async def _connect_peer(self, link: Link) -> None:
        try:
            async with asyncio.timeout(self.mesh.config.limits.connect_timeout):
                await self.loop.create_connection(
                    lambda: link.net_leg, self.rule.target_host, self.rule.target_port
                )
        except (OSError, TimeoutError) as exc:
            link.upstream_failed(exc)

    def net_made(self, link: Link) -> None:
        link.handshake_step()  # sends the ClientHello

    def authorise(self, link: Link) -> None:
        # OpenSSL matched the DNS name in the handshake; this also refuses a wildcard SAN and a
        # URI SAN that names another service (see identity.py).
        assert link.peer is not None
        if not link.peer.is_(self.rule.peer):
            link.refuse("wrong-peer", f"expected {self.rule.peer}")
            return
        link.authorised_as = self.rule.peer
        link.start()

    def _refusal_text(self, link: Link, reason: str, detail: str) -> str:
        peer = link.peer.describe() if link.peer is not None else "the peer"
        return (
            f"service {self.mesh.config.identity} refused {peer} at {self.rule.target} "
            f"(expected {self.rule.peer}) for app connection {link.remote}: {reason} ({detail})"
        )

    def _upstream(self) -> str:
        return f"peer {self.rule.peer} at {self.rule.target}"


class Mesh:
    """The listeners of one service's configuration, on the running event loop.

    ``async with Mesh(config) as mesh:`` binds every listener (``ingress_ports`` and
    ``egress_ports`` then hold the bound ports, useful with port 0) and closes them, and every
    connection, on exit. ``reload_tls()`` re-reads the TLS material for new connections (the
    agent calls it after the CAS renewed the certificate or rotated the CA).
    """

    def __init__(
        self,
        config: MeshConfig,
        *,
        stats: MeshStats | None = None,
        ingress: bool = True,
        egress: bool = True,
    ) -> None:
        self.config = config
        self.stats = stats if stats is not None else MeshStats()
        self.loop = asyncio.get_running_loop()
        self.scratch = Scratch()
        self.server_ctx: ssl.SSLContext | None = None
        self.client_ctx: ssl.SSLContext | None = None
        self.ingress: list[IngressListener] = (
            [IngressListener(self, r) for r in config.ingress] if ingress else []
        )
        self.egress: list[EgressListener] = (
            [EgressListener(self, r) for r in config.egress] if egress else []
        )
        self._metrics: asyncio.Server | None = None
        self.metrics_port: int | None = None

    @property
    def ingress_ports(self) -> list[int]:
        return [lst.port for lst in self.ingress]

    @property
    def egress_ports(self) -> list[int]:
        return [lst.port for lst in self.egress]

    def reload_tls(self) -> None:
        """Build fresh TLS contexts from the configured material; open connections keep theirs."""
        if self.ingress:
            self.server_ctx = _tls.server_context(self.config.tls)
        if self.egress:
            self.client_ctx = _tls.client_context(self.config.tls)

    async def start(self) -> None:
        self.reload_tls()
        try:
            for listener in (*self.ingress, *self.egress):
                await listener.start()
            if self.config.metrics_port is not None:
                self._metrics = await asyncio.start_server(
                    self._serve_metrics, "127.0.0.1", self.config.metrics_port
                )
                self.metrics_port = self._metrics.sockets[0].getsockname()[1]
        except BaseException:
            await self.aclose()
            raise
        logger.info(
            "mesh for %s: ingress %s, egress %s",
            self.config.identity,
            self.ingress_ports,
            self.egress_ports,
        )

    async def aclose(self) -> None:
        for listener in (*self.ingress, *self.egress):
            await listener.aclose()
        if self._metrics is not None:
            self._metrics.close()
            await self._metrics.wait_closed()
            self._metrics = None

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        await self.loop.create_future()  # until cancelled

    async def _serve_metrics(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(METRICS_REQUEST_TIMEOUT):
                await reader.readuntil(b"\r\n\r\n")
            body = self.stats.render()
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


OnReady = Callable[[Mesh], None]


async def _run(
    config: MeshConfig, stats: MeshStats | None, on_ready: OnReady | None, **which: bool
) -> None:
    async with Mesh(config, stats=stats, **which) as mesh:
        if on_ready is not None:
            on_ready(mesh)
        await mesh.serve_forever()


async def run_ingress(
    config: MeshConfig, *, stats: MeshStats | None = None, on_ready: OnReady | None = None
) -> None:
    """Run the ingress rules of ``config`` until cancelled."""
    await _run(config, stats, on_ready, ingress=True, egress=False)


async def run_egress(
    config: MeshConfig, *, stats: MeshStats | None = None, on_ready: OnReady | None = None
) -> None:
    """Run the egress rules of ``config`` until cancelled."""
    await _run(config, stats, on_ready, ingress=False, egress=True)


async def run_mesh(
    config: MeshConfig, *, stats: MeshStats | None = None, on_ready: OnReady | None = None
) -> None:
    """Run every rule of ``config`` until cancelled."""
    await _run(config, stats, on_ready, ingress=True, egress=True)


async def serve(config: MeshConfig, *, announce: bool = True) -> None:
    """Run every rule of ``config`` as a process's main task, until SIGTERM or SIGINT.

    SIGHUP re-reads the TLS material (``Mesh.reload_tls``). With ``announce``, prints
    ``cloister-mesh ready ingress=PORT ... egress=PORT ...`` on standard output once every
    listener is bound, so that a parent process (the agent) can wait for it.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with Mesh(config) as mesh:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload, mesh)
        try:
            if announce:
                ports = [f"ingress={p}" for p in mesh.ingress_ports]
                ports += [f"egress={p}" for p in mesh.egress_ports]
                print(READY_LINE, *ports, flush=True)
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def _reload(mesh: Mesh) -> None:
    try:
        mesh.reload_tls()
    except (OSError, ssl.SSLError, ValueError) as exc:
        # Keep serving with the material already loaded; the agent sees the log line.
        logger.error("mesh: TLS material not reloaded, keeping the current one: %s", exc)
    else:
        logger.info("mesh: TLS material reloaded")
