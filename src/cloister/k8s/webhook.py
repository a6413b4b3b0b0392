"""The mutating admission webhook: pods annotated ``cloister.io/session`` start under the agent.

It serves ``admission.k8s.io/v1`` AdmissionReview at ``POST /mutate`` over HTTPS. For a pod
that names a session (see ``cloister.k8s._patch`` for every annotation), it

1. plans the rewrite, refusing a pod it cannot rewrite (no service, no known command, bad
   annotation) with a message that names the pod and the container;
2. asks the CAS (pinned certificate) whether the session and each service exist, and refuses
   the pod with a message naming the missing one, so a typo fails at ``kubectl apply`` and not
   as a crash loop on a node; an unreachable CAS refuses too (fail closed: the pod could not
   activate anyway);
3. answers with a JSONPatch that makes the agent the entrypoint of each annotated container.

What it does not own: any secret or decision (DESIGN §1). The webhook holds no key and needs no
Kubernetes API access; it only places the agent, the CAS address and the CAS's public
certificate. A cluster admin who bypasses or changes it can stop a workload from getting its
configuration, never give it someone else's: the CAS decides on hardware evidence alone.

Which namespaces it sees is the MutatingWebhookConfiguration's business: the chart and the tests
select namespaces labelled ``cloister.io/injection=enabled``.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from cloister import errors
from cloister.client import CasClient
from cloister.k8s import _patch

__all__ = ["MAX_REVIEW_BYTES", "InjectConfig", "create_app", "review", "serve"]

log = logging.getLogger(__name__)

InjectConfig = _patch.InjectConfig

# The API server sends at most old + new object of an etcd-sized (1.5 MiB) pod, plus framing.
MAX_REVIEW_BYTES: Final = 8 * 1024 * 1024
API_VERSION: Final = "admission.k8s.io/v1"


def review(body: Any, config: InjectConfig, cas: CasClient) -> dict[str, Any]:
    """The AdmissionReview response to the AdmissionReview request ``body``."""
    if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
        raise ValueError("not an AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise ValueError("an AdmissionReview without request.uid")
    uid = request["uid"]
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind")
    if kind != "Pod" or request.get("operation") != "CREATE" or not isinstance(pod, dict):
        return _wrap(response)
    try:
        plan = _patch.plan(pod, request.get("namespace"))
        if plan is None:
            return _wrap(response)
        _check_cas(plan, cas)
        mutated = _patch.mutate(pod, plan, config)
    except errors.Error as exc:
        log.info("refused %s: %s", _patch.pod_label(pod, request.get("namespace")), exc.message)
        response["allowed"] = False
        response["status"] = {"code": 403, "reason": "Forbidden", "message": exc.message}
        return _wrap(response)
    ops = _patch.json_patch(pod, mutated)
    log.info(
        "pod %s: %s under the agent for session %s",
        plan.pod,
        ", ".join(t.container for t in plan.targets),
        plan.session,
    )
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return _wrap(response)


def _check_cas(plan: _patch.Plan, cas: CasClient) -> None:
    for service in plan.services:
        try:
            cas.exists(plan.session, service)
        except errors.NotFound as exc:
            if exc.reason == "no-such-service":
                what = f"service {service!r} does not exist in session {plan.session!r}"
            else:
                what = f"session {plan.session!r} does not exist"
            raise errors.Error(
                f"pod {plan.pod}: {what} in the CAS at {cas.url}", reason=exc.reason
            ) from None
        except errors.BackendUnavailable as exc:
            raise errors.Error(
                f"pod {plan.pod}: cannot check session {plan.session!r} with the CAS: "
                f"{exc.message}",
                reason=exc.reason,
            ) from None
        except errors.Error as exc:
            raise errors.Error(
                f"pod {plan.pod}: the CAS refused to look up session {plan.session!r} "
                f"service {service!r}: {exc.message}",
                reason=exc.reason,
            ) from None


def _wrap(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def create_app(config: InjectConfig, cas: CasClient) -> FastAPI:
    app = FastAPI(title="Cloister admission webhook", docs_url=None, redoc_url=None)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.post("/mutate")
    async def mutate(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_REVIEW_BYTES):
            return JSONResponse({"error": "request too large"}, status_code=413)
        raw = await request.body()
        if len(raw) > MAX_REVIEW_BYTES:
            return JSONResponse({"error": "request too large"}, status_code=413)
        try:
            body = json.loads(raw)
            result = await run_in_threadpool(review, body, config, cas)
        except (ValueError, json.JSONDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(result)

    return app


def serve(
    config: InjectConfig,
    cas: CasClient,
    *,
    host: str,
    port: int,
    certfile: str,
    keyfile: str,
) -> None:
    """Serve the webhook over HTTPS until stopped."""
    import uvicorn

    uvicorn.run(
        create_app(config, cas),
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level="warning",
        access_log=False,
    )
