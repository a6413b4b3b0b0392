"""The proxies over real sockets on 127.0.0.1, with certificates from a test session CA.

Topology of most tests: a plain client → egress (service web.demo) → ingress (service
api.demo) → a plain echo application. Every test runs in its own event loop under a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshpki import DAY, NOW, Issued, TestCA, material

from cloister.mesh import (
    EgressRule,
    IngressRule,
    Mesh,
    MeshConfig,
    MeshLimits,
    MeshStats,
    TlsMaterial,
    run_egress,
    run_ingress,
)

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0  # seconds any single scenario may take before it counts as hung


@dataclass
class Pki:
    ca: TestCA
    other_ca: TestCA
    api: Issued  # the called service
    web: Issued  # an allowed caller
    evil: Issued  # a caller the rule does not name
    foreign: Issued  # web.demo, but from another CA
    expired: Issued  # web.demo, expired yesterday
    wildcard: Issued  # *.demo
    web_as_evil: Issued  # DNS web.demo, URI cloister://demo/evil


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other = TestCA(), TestCA("another session CA")
    return Pki(
        ca=ca,
        other_ca=other,
        api=ca.issue("api.demo"),
        web=ca.issue("web.demo"),
        evil=ca.issue("evil.demo"),
        foreign=other.issue("web.demo"),
        expired=ca.issue("web.demo", not_before=NOW - 3 * DAY, not_after=NOW - DAY),
        wildcard=ca.issue("api.demo", dns=("*.demo",), uri=None),
        web_as_evil=ca.issue("web.demo", uri="cloister://demo/evil"),
    )


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND):
            await scenario()

    asyncio.run(bounded())


@dataclass
class App:
    """A plain TCP application on loopback: echoes, and records what it received."""

    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    resets: int = 0
    port: int = 0
    half_close: bool = False  # read until EOF, then answer, then close

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.half_close:
                data = await reader.read()
                self.received += data
                writer.write(b"got %d bytes" % len(data))
                await writer.drain()
            else:
                while data := await reader.read(65536):
                    self.received += data
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            self.resets += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def app_server(app: App) -> AsyncIterator[App]:
    server = await asyncio.start_server(app.handle, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()
        await server.wait_closed()


def server_config(
    pki: Pki,
    app_port: int,
    *,
    cert: Issued | None = None,
    cas: tuple[TestCA, ...] = (),
    **limits: Any,
) -> MeshConfig:
    return MeshConfig(
        identity="api.demo",
        tls=material(cert or pki.api, *(cas or (pki.ca,))),
        ingress=(IngressRule(port=0, app_port=app_port, allow_from=("web.demo", "ops.demo")),),
        limits=MeshLimits(**limits),
    )


def client_config(
    pki: Pki,
    target_port: int,
    *,
    cert: Issued | None = None,
    cas: tuple[TestCA, ...] = (),
    peer: str = "api.demo",
    **limits: Any,
) -> MeshConfig:
    return MeshConfig(
        identity="web.demo",
        tls=material(cert or pki.web, *(cas or (pki.ca,))),
        egress=(EgressRule(port=0, target=f"127.0.0.1:{target_port}", peer=peer),),
        limits=MeshLimits(**limits),
    )


async def exchange(port: int, payload: bytes, *, half_close: bool = False) -> bytes:
    """A plain client: send ``payload``, return everything the other side sent until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
            return await reader.read()
        got = bytearray()
        while len(got) < len(payload):
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            got += chunk
        return bytes(got)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def refused_exchange(port: int) -> bytes:
    """A plain client whose connection should be cut: returns what it got (expected: nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"secret request")
        await writer.drain()
        return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


Chain = Callable[[Mesh, Mesh], Awaitable[None]]


async def through_mesh(
    pki: Pki,
    app: App,
    body: Chain,
    *,
    server: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
) -> None:
    async with (
        app_server(app),
        Mesh(server_config(pki, app.port, **(server or {}))) as ingress,
        Mesh(client_config(pki, ingress.ingress_ports[0], **(client or {}))) as egress,
    ):
        await body(ingress, egress)


# -- the happy path -------------------------------------------------------------------------


def test_unmodified_client_and_server_talk_through_the_mesh(pki: Pki) -> None:
    app = App()
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def body(ingress: Mesh, egress: Mesh) -> None:
        assert await exchange(egress.egress_ports[0], payload) == payload
        assert await exchange(egress.egress_ports[0], b"second") == b"second"
        await until(lambda: ingress.stats.active[("ingress", str(ingress.ingress_ports[0]))] == 0)
        key = ("ingress", str(ingress.ingress_ports[0]))
        assert ingress.stats.accepted[key] == 2
        assert ingress.stats.bytes_in[key] == len(payload) + 6
        assert ingress.stats.refusals() == 0 and egress.stats.refusals() == 0

    run(lambda: through_mesh(pki, app, body))
    assert bytes(app.received) == payload + b"second"


def test_half_close_is_carried_both_ways(pki: Pki) -> None:
    # The client shuts down its write side and then reads the answer: FIN → close_notify → FIN.
    app = App(half_close=True)

    async def body(ingress: Mesh, egress: Mesh) -> None:
        answer = await exchange(egress.egress_ports[0], b"x" * 100_000, half_close=True)
        assert answer == b"got 100000 bytes"

    run(lambda: through_mesh(pki, app, body))


def test_a_tap_between_the_proxies_sees_no_plaintext(pki: Pki) -> None:
    app = App()
    marker = b"PLAINTEXT-MARKER-" * 4096
    tapped = bytearray()
    taps_done: list[bool] = []

    async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                tapped.extend(data)
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except ConnectionError:
            pass

    async def scenario() -> None:
        async with (
            app_server(app),
            Mesh(server_config(pki, app.port)) as ingress,
        ):

            async def tap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                r2, w2 = await asyncio.open_connection("127.0.0.1", ingress.ingress_ports[0])
                await asyncio.gather(relay(reader, w2), relay(r2, writer))
                for w in (w2, writer):
                    w.close()
                    with contextlib.suppress(ConnectionError):
                        await w.wait_closed()
                taps_done.append(True)

            tap_server = await asyncio.start_server(tap, "127.0.0.1", 0)
            tap_port = tap_server.sockets[0].getsockname()[1]
            try:
                async with Mesh(client_config(pki, tap_port)) as egress:
                    assert await exchange(egress.egress_ports[0], marker) == marker
                    await until(lambda: bool(taps_done))  # both proxies closed their sides
            finally:
                tap_server.close()
                await tap_server.wait_closed()

    run(scenario)
    assert len(tapped) > len(marker)  # both directions went through the tap
    assert tapped[0] == 0x16  # a TLS handshake record opens the stream
    assert b"PLAINTEXT-MARKER" not in tapped
    assert b"web.demo" not in tapped[200:]  # certificates travel encrypted in TLS 1.3


def test_ca_rotation_trusts_every_ca_in_the_bundle(pki: Pki) -> None:
    new_ca = TestCA("rotated session CA")
    app = App()

    async def body(ingress: Mesh, egress: Mesh) -> None:
        assert await exchange(egress.egress_ports[0], b"across CAs") == b"across CAs"

    run(
        lambda: through_mesh(
            pki,
            app,
            body,
            server={"cas": (pki.ca, new_ca)},
            client={"cert": new_ca.issue("web.demo"), "cas": (pki.ca, new_ca)},
        )
    )


def test_a_truncated_stream_resets_the_app_connection(pki: Pki, tmp_path: Any) -> None:
    # A caller (or an attacker on the path) ends the TCP stream without TLS close_notify.
    app = App()
    (tmp_path / "c.pem").write_bytes(pki.web.cert_pem)
    (tmp_path / "k.pem").write_bytes(pki.web.key_pem)
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    def truncating_client(port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        with raw, ctx.wrap_socket(raw, server_hostname="api.demo") as tls:
            tls.sendall(b"partial request")
            tls.recv(100)  # the echo: the app has the bytes
            tls.shutdown(socket.SHUT_WR)  # a bare FIN: SSLSocket.shutdown skips close_notify
            with contextlib.suppress(OSError):
                tls.recv(100)

    async def scenario() -> None:
        async with app_server(app), Mesh(server_config(pki, app.port)) as ingress:
            await asyncio.to_thread(truncating_client, ingress.ingress_ports[0])
            await until(lambda: app.resets == 1)

    run(scenario)
    assert app.received == b"partial request"


def test_reload_picks_up_rotated_material(pki: Pki, tmp_path: Any) -> None:
    from meshpki import write_files

    app = App()
    new_ca = TestCA("rotated session CA")
    files = write_files(tmp_path, "api", pki.api, pki.ca)

    async def scenario() -> None:
        async with app_server(app):
            cfg = MeshConfig(
                identity="api.demo",
                tls=TlsMaterial(**files),
                ingress=(IngressRule(port=0, app_port=app.port, allow_from=("web.demo",)),),
            )
            async with Mesh(cfg) as ingress:
                port = ingress.ingress_ports[0]
                new_web = new_ca.issue("web.demo")
                async with Mesh(client_config(pki, port, cert=new_web, cas=(pki.ca,))) as egress:
                    assert await refused_exchange(egress.egress_ports[0]) == b""
                    await until(lambda: ingress.stats.refusals("ingress", "untrusted-issuer") == 1)
                    write_files(tmp_path, "api", new_ca.issue("api.demo"), pki.ca, new_ca)
                    ingress.reload_tls()
                async with Mesh(client_config(pki, port, cert=new_web, cas=(new_ca,))) as egress:
                    assert await exchange(egress.egress_ports[0], b"rotated") == b"rotated"

    run(scenario)


# -- refusals at the ingress ----------------------------------------------------------------


def _assert_refused_at_ingress(
    pki: Pki, cert: Issued, reason: str, cas: tuple[TestCA, ...] = ()
) -> None:
    app = App()

    async def body(ingress: Mesh, egress: Mesh) -> None:
        assert await refused_exchange(egress.egress_ports[0]) == b""
        await until(lambda: ingress.stats.refusals() == 1)
        assert ingress.stats.refusals("ingress", reason) == 1
        assert sum(ingress.stats.accepted.values()) == 0

    run(lambda: through_mesh(pki, app, body, client={"cert": cert, "cas": cas}))
    assert app.connections == 0
    assert app.received == b""


def test_caller_not_in_allow_from_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    _assert_refused_at_ingress(pki, pki.evil, "not-allowed")
    logged = " ".join(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert "api.demo" in logged and "cloister://demo/evil" in logged
    assert "PRIVATE KEY" not in caplog.text


def test_uri_naming_another_service_is_refused(pki: Pki) -> None:
    _assert_refused_at_ingress(pki, pki.web_as_evil, "not-allowed")


def test_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    _assert_refused_at_ingress(pki, pki.foreign, "untrusted-issuer", cas=(pki.ca,))


def test_expired_certificate_is_refused(pki: Pki) -> None:
    _assert_refused_at_ingress(pki, pki.expired, "certificate-expired")


def test_plain_tcp_to_the_public_port_is_refused(pki: Pki) -> None:
    app = App()

    async def scenario() -> None:
        async with app_server(app), Mesh(server_config(pki, app.port)) as ingress:
            assert await refused_exchange(ingress.ingress_ports[0]) == b""
            await until(lambda: ingress.stats.refusals() == 1)
            assert ingress.stats.refusals("ingress", "not-tls") == 1

    run(scenario)
    assert app.connections == 0


def test_a_silent_client_is_cut_at_the_handshake_timeout(pki: Pki) -> None:
    app = App()

    async def scenario() -> None:
        async with (
            app_server(app),
            Mesh(
                server_config(pki, app.port, handshake_timeout=0.2, connect_timeout=0.1)
            ) as ingress,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", ingress.ingress_ports[0])
            try:
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            assert ingress.stats.refusals("ingress", "handshake-timeout") == 1

    run(scenario)
    assert app.connections == 0


def test_tls12_client_is_refused(pki: Pki, tmp_path: Any) -> None:
    app = App()
    (tmp_path / "c.pem").write_bytes(pki.web.cert_pem)
    (tmp_path / "k.pem").write_bytes(pki.web.key_pem)
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    async def scenario() -> None:
        async with app_server(app), Mesh(server_config(pki, app.port)) as ingress:
            with pytest.raises(ssl.SSLError):
                await asyncio.open_connection(
                    "127.0.0.1", ingress.ingress_ports[0], ssl=ctx, server_hostname="api.demo"
                )
            await until(lambda: ingress.stats.refusals() == 1)
            assert ingress.stats.refusals("ingress", "protocol-version") == 1

    run(scenario)
    assert app.connections == 0


def test_connections_beyond_the_limit_are_refused(pki: Pki) -> None:
    app = App()

    async def body(ingress: Mesh, egress: Mesh) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", egress.egress_ports[0])
        try:
            writer.write(b"first")
            assert await reader.readexactly(5) == b"first"
            assert await refused_exchange(egress.egress_ports[0]) == b""
            assert egress.stats.refusals("egress", "capacity") == 1
        finally:
            writer.close()
            await writer.wait_closed()

    run(lambda: through_mesh(pki, app, body, client={"max_connections": 1}))


def test_idle_connections_are_closed(pki: Pki) -> None:
    app = App()

    async def body(ingress: Mesh, egress: Mesh) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", egress.egress_ports[0])
        try:
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            assert await reader.read() == b""  # then nothing, until the proxy gives up
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert sum(egress.stats.closed_idle.values()) == 1

    run(lambda: through_mesh(pki, app, body, client={"idle_timeout": 0.2}))


def test_unreachable_app_is_counted(pki: Pki) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def scenario() -> None:
        async with (
            Mesh(server_config(pki, dead_port)) as ingress,
            Mesh(client_config(pki, ingress.ingress_ports[0])) as egress,
        ):
            assert await refused_exchange(egress.egress_ports[0]) == b""
            await until(lambda: sum(ingress.stats.upstream_errors.values()) == 1)

    run(scenario)


# -- refusals at the egress -----------------------------------------------------------------


def _assert_refused_at_egress(pki: Pki, server_cert: Issued, reason: str) -> None:
    app = App()

    async def body(ingress: Mesh, egress: Mesh) -> None:
        assert await refused_exchange(egress.egress_ports[0]) == b""
        await until(lambda: egress.stats.refusals() == 1)
        assert egress.stats.refusals("egress", reason) == 1

    run(lambda: through_mesh(pki, app, body, server={"cert": server_cert}))
    assert app.connections == 0


def test_egress_refuses_a_server_that_is_another_service(pki: Pki) -> None:
    # OpenSSL's host name check fails inside the handshake.
    _assert_refused_at_egress(pki, pki.evil, "wrong-peer")


def test_egress_refuses_a_wildcard_certificate(pki: Pki) -> None:
    # OpenSSL accepts *.demo for api.demo; the exact check after the handshake does not.
    _assert_refused_at_egress(pki, pki.wildcard, "wrong-peer")


def test_egress_refuses_a_server_from_another_ca(pki: Pki) -> None:
    _assert_refused_at_egress(pki, pki.other_ca.issue("api.demo"), "untrusted-issuer")


def test_stats_render_as_prometheus_text(pki: Pki) -> None:
    stats = MeshStats()
    stats.refused[("ingress", "8443", "not-allowed")] += 2
    stats.accepted[("ingress", "8443")] += 5
    text = stats.render().decode()
    assert (
        'cloister_mesh_refused_total{direction="ingress",listener="8443",reason="not-allowed"} 2.0'
        in text
    )
    assert 'cloister_mesh_connections_total{direction="ingress",listener="8443"} 5.0' in text


# -- stream integrity and back-pressure -----------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(min_size=1, max_size=300_000), min_size=1, max_size=6))
def test_any_write_pattern_arrives_intact(pki: Pki, chunks: list[bytes]) -> None:
    app = App(half_close=True)
    payload = b"".join(chunks)

    async def body(ingress: Mesh, egress: Mesh) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", egress.egress_ports[0])
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            assert await reader.read() == b"got %d bytes" % len(payload)
        finally:
            writer.close()
            await writer.wait_closed()

    run(lambda: through_mesh(pki, app, body))
    assert bytes(app.received) == payload


def test_a_slow_app_pushes_back_instead_of_filling_memory(pki: Pki) -> None:
    total = 48 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = hashlib.sha256()
    for i in range(total // len(block)):
        sent.update(block[i % 7 :] + block[: i % 7])
    state: dict[str, Any] = {}

    async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await state["release"].wait()  # reads nothing until released
        got = hashlib.sha256()
        while data := await reader.read(1 << 20):
            got.update(data)
            await asyncio.sleep(0)  # a slow reader: the proxy's write queue stays busy
        state["got"] = got.hexdigest()
        writer.close()
        await writer.wait_closed()

    async def scenario() -> None:
        state["release"] = asyncio.Event()
        server = await asyncio.start_server(slow_app, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with (
                Mesh(server_config(pki, port)) as ingress,
                Mesh(client_config(pki, ingress.ingress_ports[0])) as egress,
            ):
                _, writer = await asyncio.open_connection("127.0.0.1", egress.egress_ports[0])

                async def push() -> None:
                    for i in range(total // len(block)):
                        writer.write(block[i % 7 :] + block[: i % 7])  # no two alike in a row
                        await writer.drain()
                    writer.write_eof()

                pusher = asyncio.create_task(push())
                listener = ingress.ingress[0]
                await until(
                    lambda: any(
                        link.plain is not None and link.plain.get_write_buffer_size() > 0
                        for link in listener.links
                    )
                )
                await asyncio.sleep(0.2)  # let the pipeline fill as far as it will
                for mesh in (ingress, egress):
                    for lst in (*mesh.ingress, *mesh.egress):
                        for link in lst.links:
                            for t in (link.plain, link.net):
                                assert t is None or t.get_write_buffer_size() <= 3 * 1024 * 1024
                assert not pusher.done()  # 48 MiB did not fit into the proxies
                state["release"].set()
                await pusher
                await until(lambda: "got" in state)
                writer.close()
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)
    assert state["got"] == sent.hexdigest()  # every byte, in order, despite the queueing


def test_run_functions_serve_until_cancelled(pki: Pki) -> None:
    app = App()

    async def scenario() -> None:
        async with app_server(app):
            ready: asyncio.Queue[Mesh] = asyncio.Queue()
            stats = MeshStats()
            ingress_task = asyncio.create_task(
                run_ingress(server_config(pki, app.port), stats=stats, on_ready=ready.put_nowait)
            )
            ingress = await ready.get()
            assert ingress.stats is stats and not ingress.egress
            egress_task = asyncio.create_task(
                run_egress(client_config(pki, ingress.ingress_ports[0]), on_ready=ready.put_nowait)
            )
            egress = await ready.get()
            assert await exchange(egress.egress_ports[0], b"via run_*") == b"via run_*"
            for task in (egress_task, ingress_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with pytest.raises(OSError):  # the listener is gone
                await asyncio.open_connection("127.0.0.1", egress.egress_ports[0])
            assert sum(stats.accepted.values()) == 1

    run(scenario)
