"""Abuse limits of the CAS, one test each, against a real CAS over HTTPS on loopback.

Request size (declared and chunked), header size, nonce expiry and single use (across workers
too), nonces that cost no storage until used, per-client rate limits with 429 and Retry-After
(activation and session endpoints), and timeouts on slow clients (slow headers, idle
connections, slow bodies).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from tests.integration.load.agents import (
    TunedCas,
    activation_request,
    create_session,
    start_cas,
)

from cloister import errors, limits, protocol
from cloister.cas import ratelimit, server
from cloister.client import CasClient, pinned_context

# Small limits so that each one is reached with a handful of requests. A refill of one token
# per 20 s means that no test here depends on how fast the machine is.
FLAGS = ("--workers", "1", "--activation-rate", "0.05", "--activation-burst", "6",
         "--session-rate", "0.05", "--session-burst", "4",
         "--header-timeout", "1", "--body-timeout", "1")  # fmt: skip


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunedCas]:
    cas = start_cas(tmp_path_factory.mktemp("abuse"), *FLAGS)
    try:
        yield cas
    finally:
        cas.stop()


@pytest.fixture
def unlimited(tmp_path: Path) -> Iterator[TunedCas]:
    cas = start_cas(tmp_path, "--workers", "1", "--activation-rate", "0", "--session-rate", "0")
    try:
        yield cas
    finally:
        cas.stop()


def _is_error_body(resp: object, status: int, code: str) -> None:
    assert isinstance(resp, httpx.Response)
    assert resp.status_code == status, resp.text
    body = protocol.ErrorBody.model_validate_json(resp.content)
    assert body.error == code and body.request_id == resp.headers["x-request-id"]


# --- request size ----------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(limited: TunedCas) -> None:
    # Only the headers are sent: the CAS answers 413 without waiting for 2 MiB of body.
    with _tls(limited) as conn:
        conn.sendall(
            b"POST /v1/status HTTP/1.1\r\nHost: cas\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {limits.MAX_REQUEST_BYTES + 1}\r\n\r\n".encode()
        )
        reply = _read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"error":"too-large"' in reply.replace(b" ", b"")


def test_a_chunked_body_over_the_limit_is_refused(unlimited: TunedCas) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        piece = b"x" * 65536
        for _ in range(limits.MAX_REQUEST_BYTES // len(piece) + 8):  # bounded: just over
            sent += len(piece)
            yield piece

    with unlimited.http() as http:
        try:
            resp = http.post("/v1/activate", content=chunks())
        except httpx.HTTPError:  # the CAS may close while we still send
            resp = None
    if resp is not None:
        assert "content-length" not in resp.request.headers
        _is_error_body(resp, 413, "too-large")
    # A small chunked body goes through to validation as usual.
    with unlimited.http() as http:
        resp = http.post("/v1/activate", content=iter([b"{", b"}"]))
    assert resp.status_code == 422


# --- nonces ----------------------------------------------------------------------------------


def test_a_nonce_is_single_use_over_https(unlimited: TunedCas, tmp_path: Path) -> None:
    create_session(unlimited, tmp_path)
    with CasClient(unlimited.url, cert_pem=unlimited.pin) as client:
        req = activation_request(client.nonce().nonce).request
        assert client.activate(req).sealed_bundle
        with pytest.raises(errors.AccessDenied) as replay:
            client.activate(req)
        assert replay.value.reason == "nonce-invalid"
        unknown = activation_request("ab" * 32).request
        with pytest.raises(errors.AccessDenied) as never_issued:
            client.activate(unknown)
        assert never_issued.value.reason == "nonce-invalid"


def test_a_nonce_expires(in_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    nonce = in_process.new_nonce(now).nonce
    late = now + timedelta(seconds=limits.NONCE_TTL_SECONDS + 1)
    # The session does not even need to exist: the nonce is checked first.
    with pytest.raises(errors.BindingError) as expired:
        in_process.activate(activation_request(nonce).request, late)
    assert expired.value.reason == "nonce-invalid"


def test_issuing_nonces_stores_nothing(in_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client that asks for nonces and never uses them costs the CAS no storage."""
    now = datetime.now(UTC)
    issued = [in_process.new_nonce(now).nonce for _ in range(1000)]
    assert len(set(issued)) == 1000
    assert in_process.store.count_claimed_nonces() == 0
    # A used nonce is remembered, refused or accepted: here refused (no such session).
    with pytest.raises(errors.NotFound):
        in_process.activate(activation_request(issued[0]).request, now)
    assert in_process.store.count_claimed_nonces() == 1
    with pytest.raises(errors.BindingError) as replay:
        in_process.activate(activation_request(issued[0]).request, now)
    assert replay.value.reason == "nonce-invalid"


def test_a_nonce_is_single_use_across_workers(tmp_path: Path) -> None:
    """Two CAS processes on one data directory: a nonce one issued is used once, on either."""
    settings = server.Settings(data_dir=tmp_path / "cas", simulation=True)
    first = server.build(settings)
    second = server.build(settings)
    try:
        now = datetime.now(UTC)
        nonce = first.new_nonce(now).nonce
        with pytest.raises(errors.NotFound):  # used (no such session), on the other worker
            second.activate(activation_request(nonce).request, now)
        with pytest.raises(errors.BindingError) as replay:
            first.activate(activation_request(nonce).request, now)
        assert replay.value.reason == "nonce-invalid"
    finally:
        first.store.close()
        second.store.close()


# --- rate limits -----------------------------------------------------------------------------


def test_activation_endpoints_are_rate_limited_per_client(limited: TunedCas) -> None:
    with limited.http() as http:
        statuses = [http.post("/v1/nonces") for _ in range(10)]
        health = [http.get("/healthz").status_code for _ in range(10)]
    assert [r.status_code for r in statuses[:6]] == [200] * 6  # the burst
    refused = statuses[6:]
    for resp in refused:
        _is_error_body(resp, 429, "rate-limited")
        assert int(resp.headers["retry-after"]) >= 1
    assert health == [200] * 10  # health checks are not limited
    # The client library turns 429 into RateLimited with the server's Retry-After.
    with CasClient(limited.url, cert_pem=limited.pin) as client:
        with pytest.raises(errors.RateLimited) as limited_exc:
            client.nonce()
    assert limited_exc.value.retry_after >= 1


def test_session_endpoints_are_rate_limited_per_client(limited: TunedCas) -> None:
    with limited.http() as http:
        codes = [
            http.get("/v1/exists", params={"session": "nope", "service": "x"}).status_code
            for _ in range(8)
        ]
    assert codes[:4] == [404] * 4 and set(codes[4:]) == {429}


def test_token_buckets_refill_and_stay_bounded() -> None:
    rates = ratelimit.RateLimits(activation=ratelimit.Rate(2.0, 3), session=ratelimit.Rate(0, 1))
    buckets = ratelimit.TokenBuckets(rates, max_clients=4)
    act = ratelimit.Endpoint.ACTIVATION
    assert [buckets.take("a", act, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", act, 0.0) == pytest.approx(0.5)  # one token at 2/s
    assert buckets.take("a", act, 0.5) == 0.0
    assert buckets.take("b", act, 0.5) == 0.0  # another client has its own bucket
    assert buckets.take("a", act, 0.4) > 0  # a clock stepping back refills nothing
    assert buckets.take("a", ratelimit.Endpoint.SESSION, 0.0) == 0.0  # rate 0: unlimited
    for i in range(100):
        buckets.take(f"10.0.0.{i}", act, 1.0 + i)
    assert len(buckets) <= 4
    assert ratelimit.classify("/v1/activate") is act
    assert ratelimit.classify("/v1/sessions/a/b") is ratelimit.Endpoint.SESSION
    assert ratelimit.classify("/healthz") is None


# --- slow clients ----------------------------------------------------------------------------


def _tls(cas: TunedCas) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", cas.port), timeout=30)
    return pinned_context(cas.pin).wrap_socket(raw)


def _closed_by_server(conn: ssl.SSLSocket, drip: bytes, *, steps: int) -> bool:
    """Send ``drip`` one byte at a time, 0.25 s apart, at most ``steps`` bytes; True once the
    server has closed the connection."""
    conn.settimeout(0.25)
    for i in range(steps):
        try:
            if conn.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except (ConnectionError, ssl.SSLError):
            return True
        try:
            conn.sendall(drip[i % len(drip) : i % len(drip) + 1])
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def test_slow_headers_are_cut_off(limited: TunedCas) -> None:
    with _tls(limited) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: cas\r\n")
        # One header byte every 0.25 s never completes; the 1 s header deadline closes it.
        assert _closed_by_server(conn, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", steps=120)


def test_a_silent_connection_is_closed(limited: TunedCas) -> None:
    with _tls(limited) as conn:
        conn.settimeout(30)
        started = time.monotonic()
        try:
            data = conn.recv(4096)
        except (ConnectionError, ssl.SSLError):
            data = b""
        assert data == b"" and time.monotonic() - started < 30


def test_oversized_headers_get_431(limited: TunedCas) -> None:
    """Headers beyond 16 KiB are refused as they arrive, whether or not they ever end."""
    with _tls(limited) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: cas\r\n")
        for _ in range(40):  # 40 KiB of headers that never end
            try:
                conn.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            except (ConnectionError, ssl.SSLError, OSError):
                break
        reply = _read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    # Headers within the bound are served as before, on a new connection.
    with _tls(limited) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: cas\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_slow_body_gets_408(limited: TunedCas) -> None:
    with _tls(limited) as conn:
        conn.sendall(
            b"POST /v1/status HTTP/1.1\r\nHost: cas\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"tee": '
        )
        reply = _read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request-timeout" in reply


def _read_reply(conn: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes (bounded: 64 KiB, 30 s per read)."""
    conn.settimeout(30)
    reply = b""
    while len(reply) < 65536:
        try:
            chunk = conn.recv(4096)
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        reply += chunk
    return reply


def test_an_idle_keep_alive_connection_is_closed(limited: TunedCas) -> None:
    with _tls(limited) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: cas\r\n\r\n")
        conn.settimeout(30)
        reply = b""
        while b"ok" not in reply:
            chunk = conn.recv(4096)
            assert chunk, "closed before answering"
            reply += chunk
        # uvicorn's keep-alive timeout closes the idle connection.
        try:
            assert conn.recv(4096) == b""
        except (ConnectionError, ssl.SSLError):
            pass
