"""The CAS's HTTP API (FastAPI). Thin: parse, call ``Cas``, map errors with one table."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from cloister import __version__, errors, limits, protocol
from cloister.cas.errors import status_for
from cloister.cas.service import Cas

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(cas: Cas, *, clock: Clock = _utcnow) -> FastAPI:
    app = FastAPI(
        title="Cloister CAS",
        version=__version__,
        description="Configuration and attestation service: sessions, attestation, provisioning.",
    )

    @app.middleware("http")
    async def request_id_and_limits(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        rid = uuid.uuid4().hex[:16]
        request.state.request_id = rid
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.MAX_REQUEST_BYTES):
            return _error(errors.Error("request body too large", reason="too-large"), rid, 413)
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        return response

    @app.exception_handler(errors.Error)
    async def on_error(request: Request, exc: errors.Error) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        log.info("request %s refused: %s [%s]", rid, exc.message, exc.reason)
        return _error(exc, rid, status_for(exc))

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> str:
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
    async def metrics() -> str:
        lines = ["# TYPE cloister_activations_total counter"]
        for result, n in sorted(cas.events.activations.items()):
            lines.append(f'cloister_activations_total{{result="{result}"}} {n}')
        lines.append("# TYPE cloister_refusals_total counter")
        for reason, n in sorted(cas.events.refusals.items()):
            lines.append(f'cloister_refusals_total{{reason="{reason}"}} {n}')
        return "\n".join(lines) + "\n"

    @app.get("/v1/cas/evidence", response_model=protocol.CasEvidence)
    async def evidence(nonce: str = Query(pattern=r"^[0-9a-f]{64}$")) -> protocol.CasEvidence:
        return await run_in_threadpool(cas.evidence, nonce)

    @app.post("/v1/nonces", response_model=protocol.NonceResponse)
    async def nonce() -> protocol.NonceResponse:
        return await run_in_threadpool(cas.new_nonce, clock())

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

    @app.post("/v1/activate", response_model=protocol.ActivationResponse)
    async def activate(body: protocol.ActivationRequest) -> protocol.ActivationResponse:
        return await run_in_threadpool(cas.activate, body, clock())

    return app


def _error(exc: errors.Error, rid: str, status: int) -> JSONResponse:
    body = protocol.ErrorBody(error=exc.reason, message=exc.message, request_id=rid)
    headers = {"X-Request-Id": rid}
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
