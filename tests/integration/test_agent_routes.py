"""The agent's two routes (``POST /v1/nonces``, ``POST /v1/activate``) are served before
FastAPI's router (``api._AgentRoutes``): they must answer exactly as the documented API does,
with the request id, the error body and the error table of every other route."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
from tests.integration.load.agents import activation_request

from cloister import protocol
from cloister.cas import api, ratelimit
from cloister.cas.service import Cas

_UNLIMITED = ratelimit.RateLimits(activation=ratelimit.Rate(0, 1), session=ratelimit.Rate(0, 1))


@pytest.fixture
def cas(in_process: Cas) -> Cas:
    return in_process


def _call(cas: Cas, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.create_app(cas, rate_limits=_UNLIMITED))
        async with httpx.AsyncClient(transport=transport, base_url="https://cas") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


def _refusal(resp: httpx.Response, status: int, reason: str) -> protocol.ErrorBody:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = protocol.ErrorBody.model_validate_json(resp.content)
    assert body.error == reason
    assert body.request_id == resp.headers["x-request-id"]
    return body


def test_a_nonce_is_issued_with_a_request_id(cas: Cas) -> None:
    resp = _call(cas, "POST", "/v1/nonces")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert len(resp.headers["x-request-id"]) == 16
    nonce = protocol.NonceResponse.model_validate_json(resp.content).nonce
    assert len(bytes.fromhex(nonce)) == 32
    # Each request its own nonce and its own id.
    again = _call(cas, "POST", "/v1/nonces")
    assert protocol.NonceResponse.model_validate_json(again.content).nonce != nonce
    assert again.headers["x-request-id"] != resp.headers["x-request-id"]


def test_an_activation_without_a_json_content_type_is_unprocessable(cas: Cas) -> None:
    nonce = cas.new_nonce(datetime.now(UTC)).nonce
    body = activation_request(nonce).request.model_dump_json()
    resp = _call(cas, "POST", "/v1/activate", content=body, headers={"content-type": "text/plain"})
    assert _refusal(resp, 422, "malformed-request").message.endswith(": body")
    # Nothing was done for it: the nonce is still unused.
    assert cas.store.count_claimed_nonces() == 0


def test_an_activation_that_is_not_json_is_unprocessable(cas: Cas) -> None:
    resp = _call(
        cas,
        "POST",
        "/v1/activate",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    _refusal(resp, 422, "malformed-request")


def test_an_activation_names_the_fields_it_lacks_and_echoes_nothing(cas: Cas) -> None:
    secret_looking = "s3cr3t-" * 4
    resp = _call(cas, "POST", "/v1/activate", json={"tee": "simulation", "csr": secret_looking})
    body = _refusal(resp, 422, "malformed-request")
    for field in ("body.evidence", "body.nonce", "body.session", "body.service"):
        assert field in body.message
    assert secret_looking not in resp.text


def test_an_activation_refusal_has_the_status_of_the_error_table(cas: Cas) -> None:
    nonce = cas.new_nonce(datetime.now(UTC)).nonce
    resp = _call(
        cas,
        "POST",
        "/v1/activate",
        json=activation_request(nonce, session="nowhere").request.model_dump(),
    )
    _refusal(resp, 404, "no-such-session")
    # A nonce this CAS never issued: refused before any other work.
    forged = activation_request("ab" * 32).request.model_dump()
    _refusal(_call(cas, "POST", "/v1/activate", json=forged), 403, "nonce-invalid")


def test_other_methods_on_the_agent_routes_reach_fastapi(cas: Cas) -> None:
    _refusal(_call(cas, "GET", "/v1/activate"), 405, "method-not-allowed")
    _refusal(_call(cas, "PUT", "/v1/nonces"), 405, "method-not-allowed")


def test_the_agent_routes_stay_in_the_openapi_document(cas: Cas) -> None:
    paths = _call(cas, "GET", "/openapi.json").json()["paths"]
    assert "post" in paths["/v1/nonces"]
    schema = paths["/v1/activate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ActivationRequest")
