"""The CAS's HTTP API (FastAPI). Thin: parse, call ``Cas``, map errors with one table."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

import pydantic
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloister import __version__, errors, limits, protocol
from cloister.cas import ratelimit
from cloister.cas.errors import status_for
from cloister.cas.service import Cas

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_T = TypeVar("_T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


# Every refusal has the one error body, always JSON (also on routes that answer plain text);
# documented so that clients and fuzzers can rely on it. 422: the request does not fit the
# documented shape (FastAPI's validation, re-shaped into the error body below).
_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {
        "model": protocol.ErrorBody,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for status in (400, 403, 404, 408, 409, 413, 422, 429, 503)
}


def _request_id() -> str:
    return uuid.uuid4().hex[:16]


def create_app(
    cas: Cas,
    *,
    clock: Clock = _utcnow,
    rate_limits: ratelimit.RateLimits | None = None,
    body_timeout: float = limits.HTTP_BODY_TIMEOUT_SECONDS,
) -> ratelimit.ASGIApp:
    """The API over ``cas``: FastAPI's routes inside the CAS's own ASGI middleware (rate limit,
    body bound, request id, the agent's routes). Rate limits default to ``limits``; pass
    ``Rate(0, 1)`` to lift one."""
    app = FastAPI(
        title="Cloister CAS",
        version=__version__,
        description="Configuration and attestation service: sessions, attestation, provisioning.",
        responses=_ERROR_RESPONSES,
    )
    store_bound = _StoreBound(limits.STORE_THREADS_PER_WORKER)

    @app.exception_handler(errors.Error)
    async def on_error(request: Request, exc: errors.Error) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        return _refused(exc, rid)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        return _error(_malformed([e.get("loc", ()) for e in exc.errors()]), rid, 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        reason = {400: "malformed-request", 404: "not-found", 405: "method-not-allowed"}
        error = errors.Error(str(exc.detail)[:200], reason=reason.get(exc.status_code, "http"))
        response = _error(error, rid, exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> str:
        # Unready when the database is unreachable or rollback/tampering was detected.
        await run_in_threadpool(cas.store.health)
        await run_in_threadpool(cas.store.get_meta, "identity-key")
        return "ready"

    @app.get("/v1/status")
    async def status() -> dict[str, object]:
        return {
            "version": __version__,
            "simulation": cas.simulation,
            "tees": sorted(t.value for t in cas.verifiers),
            "warning": "SIMULATION MODE: this CAS protects nothing" if cas.simulation else None,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = await run_in_threadpool(cas.metrics.render)
        return Response(content=body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/cas/evidence", response_model=protocol.CasEvidence)
    async def evidence(nonce: str = Query(pattern=r"^[0-9a-f]{64}$")) -> protocol.CasEvidence:
        return await run_in_threadpool(cas.evidence, nonce)

    # The two routes every starting workload calls are served by ``_AgentRoutes`` before
    # FastAPI's router; these declarations document them (OpenAPI) and are not reached.
    @app.post("/v1/nonces", response_model=protocol.NonceResponse)
    async def nonce() -> Response:
        return _json(cas.new_nonce(clock()))

    @app.post("/v1/sessions", response_model=protocol.SessionAccepted, status_code=201)
    async def create(body: protocol.SignedSession) -> protocol.SessionAccepted:
        return await run_in_threadpool(cas.create_session, body)

    @app.put("/v1/sessions/{name:path}", response_model=protocol.SessionAccepted)
    async def update(name: str, body: protocol.SignedSession) -> protocol.SessionAccepted:
        return await run_in_threadpool(cas.update_session, name, body)

    @app.get("/v1/sessions/{name:path}", response_model=protocol.SessionView)
    async def read(
        name: str,
        x_cloister_nonce: str = Header(pattern=r"^[0-9a-f]{64}$"),
        x_cloister_key: str = Header(max_length=512),
        x_cloister_signature: str = Header(max_length=512),
    ) -> protocol.SessionView:
        req = protocol.SignedRead(
            nonce=x_cloister_nonce, public_key=x_cloister_key, signature=x_cloister_signature
        )
        return await run_in_threadpool(cas.read_session, name, req, clock())

    @app.get("/v1/exists", response_model=protocol.ServiceExists)
    async def exists(
        session: str = Query(max_length=1024), service: str = Query(max_length=128)
    ) -> protocol.ServiceExists:
        return await run_in_threadpool(cas.service_exists, session, service)

    @app.get("/v1/public/{session:path}/{secret}", response_class=PlainTextResponse)
    async def public_secret(session: str, secret: str) -> str:
        """A secret its session publishes with ``export_public: true`` (no authentication)."""
        if (
            len(session) > limits.MAX_NAME_LENGTH * limits.MAX_SESSION_NAME_DEPTH
            or len(secret) > limits.MAX_NAME_LENGTH
        ):
            raise errors.NotFound("no such public secret", reason="no-such-public-secret")
        return await run_in_threadpool(cas.public_secret, session, secret, clock())

    @app.post("/v1/activate", response_model=protocol.ActivationResponse)
    async def activate(body: protocol.ActivationRequest) -> Response:  # see _AgentRoutes
        return _json(await store_bound(cas.activate, body, clock()))

    @app.post("/v1/volumes/tag", response_model=protocol.VolumeTagAccepted)
    async def volume_tag(body: protocol.VolumeTagReport) -> protocol.VolumeTagAccepted:
        """A workload reports a volume's new root tag, signed with its activation's key."""
        return await run_in_threadpool(cas.report_volume_tag, body)

    # Around FastAPI, outermost first: a refused client costs no body read and no routing;
    # every request gets an id; the agent's two routes never enter FastAPI (``_AgentRoutes``).
    agent_routes = _AgentRoutes(app, cas=cas, clock=clock, store_bound=store_bound)
    return ratelimit.RateLimitMiddleware(
        _BodyLimit(
            _RequestId(agent_routes), max_bytes=limits.MAX_REQUEST_BYTES, timeout=body_timeout
        ),
        rates=rate_limits or ratelimit.RateLimits(),
        new_request_id=_request_id,
    )


def _malformed(locations: Sequence[Sequence[object]]) -> errors.Error:
    """A 422's error: where the request is wrong, never what it held (no input echoed)."""
    where = sorted({".".join(str(p) for p in loc) for loc in locations[:8]})
    return errors.Error(
        "the request does not fit the API: " + ", ".join(where)[:400], reason="malformed-request"
    )


def _refused(exc: errors.Error, rid: str) -> JSONResponse:
    log.info("request %s refused: %s [%s]", rid, exc.message, exc.reason)
    return _error(exc, rid, status_for(exc))


def _json(model: protocol.Wire) -> Response:
    """A response model serialized once: FastAPI would validate our own model again first."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def _error(exc: errors.Error, rid: str, status: int) -> JSONResponse:
    body = protocol.ErrorBody(error=exc.reason, message=exc.message, request_id=rid)
    headers = {"X-Request-Id": rid}
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: a request body is read whole, within a size bound and a deadline.

    The size bound holds for chunked bodies too (no ``Content-Length``), counted as they arrive;
    a declared ``Content-Length`` above the bound is refused before a byte of the body is read.
    A body that does not arrive within ``timeout`` seconds of its headers gets 408 (a slow
    client must not hold a connection slot). Either way the connection is closed.
    """

    def __init__(self, app: ratelimit.ASGIApp, *, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(
        self, scope: ratelimit.Scope, receive: ratelimit.Receive, send: ratelimit.Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, "too-large", "request body too large")
            return
        if not chunked and (length is None or length == b"0"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > self.max_bytes:
                        await _refuse(send, 413, "too-large", "request body too large")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _refuse(send, 408, "request-timeout", "the request body came too slowly")
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> ratelimit.Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: ratelimit.Send, status: int, reason: str, message: str) -> None:
    rid = _request_id()
    body = protocol.ErrorBody(error=reason, message=message, request_id=rid)
    raw = body.model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                (b"connection", b"close"),
                (b"x-request-id", rid.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class _RequestId:
    """ASGI middleware: a request id in ``request.state`` and in every response's headers."""

    def __init__(self, app: ratelimit.ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: ratelimit.Scope, receive: ratelimit.Receive, send: ratelimit.Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: ratelimit.Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _StoreBound:
    """Runs the store-bound activation path in a bounded number of threads.

    Each activation reads the store once and ends in one write that is group-committed with
    the writes of the worker's other threads at the time (``Store.append_audit_claiming``):
    enough threads make the groups larger, more than the store's connection pool holds only
    wait inside it. Beyond ``limits.STORE_THREADS_PER_WORKER`` activations wait in the pool's
    queue (FIFO, holding no connection). A plain executor rather than anyio's thread limiter:
    its hop costs about a fifth less CPU (~90 instead of ~110 µs here).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None  # made on first use, in the worker

    async def __call__(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cas-store")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )


class _AgentRoutes:
    """ASGI middleware: ``POST /v1/nonces`` and ``POST /v1/activate``, before FastAPI's router.

    These two routes are what every starting workload calls, hundreds at once after a node
    failure or a rollout, and FastAPI's routing, dependency solving and response handling cost
    more CPU than the nonce itself and a tenth of an activation's. Here they are served with
    the same model, the same validation, the same error table and the same response bytes; the
    request id, body bound and rate limit around them are the same middleware as for every
    route, and all of it sits outside FastAPI's own middleware stack. FastAPI still declares
    both routes, for the OpenAPI document (``create_app``), and serves every other method and
    path.
    """

    def __init__(
        self,
        app: ratelimit.ASGIApp,
        *,
        cas: Cas,
        clock: Clock,
        store_bound: _StoreBound,
    ) -> None:
        self.app = app
        self.cas = cas
        self.clock = clock
        self.store_bound = store_bound
        self.routes = {"/v1/nonces": self._nonce, "/v1/activate": self._activate}

    async def __call__(
        self, scope: ratelimit.Scope, receive: ratelimit.Receive, send: ratelimit.Send
    ) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id", "-")
        response: Response
        try:
            body = await route(scope, receive)
        except _Unprocessable as exc:
            response = _error(exc.error, rid, 422)
        except errors.Error as exc:
            response = _refused(exc, rid)
        else:
            response = Response(content=body, media_type="application/json")
        await response(scope, receive, send)

    async def _nonce(self, _scope: ratelimit.Scope, _receive: ratelimit.Receive) -> bytes:
        # Stateless (an HMAC over an expiry and random bytes): no store, no thread.
        return self.cas.new_nonce(self.clock()).model_dump_json().encode()

    async def _activate(self, scope: ratelimit.Scope, receive: ratelimit.Receive) -> bytes:
        body = await _read_body(receive)
        if not _is_json(scope):  # as FastAPI: a body model wants a JSON content type
            raise _Unprocessable(_malformed([("body",)]))
        try:
            req = protocol.ActivationRequest.model_validate_json(body)
        except pydantic.ValidationError as exc:
            raise _Unprocessable(_malformed([("body", *e["loc"]) for e in exc.errors()])) from None
        response = await self.store_bound(self.cas.activate, req, self.clock())
        return response.model_dump_json().encode()


class _Unprocessable(Exception):
    """The request does not fit the API's shape: 422, as FastAPI's own validation answers."""

    def __init__(self, error: errors.Error) -> None:
        super().__init__(error.message)
        self.error = error


async def _read_body(receive: ratelimit.Receive) -> bytes:
    """The whole body (``_BodyLimit`` outside has bounded and timed it already)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise errors.Error("the client went away", reason="malformed-request")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_json(scope: ratelimit.Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (
                kind.startswith(b"application/") and kind.endswith(b"+json")
            )
    return False
