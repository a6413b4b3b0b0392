"""The CloisterSession operator: relay signed sessions from Kubernetes to the CAS.

What it owns: watching ``CloisterSession`` resources (group ``cloister.io``, ``v1alpha1``),
uploading each one's document and signatures to the CAS, and writing the CAS's verdict into
the resource's ``status`` (``hash``, ``accepted``, ``reason``, ``observedGeneration`` and an
``Accepted`` condition whose message is the CAS's explanation).

What it does not own, on purpose (DESIGN §1): any secret or any decision. The operator holds
no key; it cannot sign, forge or change a session, because the CAS checks the owners'
signatures over the exact document. It trusts the CAS only through a pinned certificate, so a
cluster that redirects it reaches nobody. Everything it reports is advisory: an owner who
wants certainty asks the CAS.

Rules of the relay:

- A document without ``predecessor`` is created (``POST /v1/sessions``); one with a
  ``predecessor`` updates that session (``PUT /v1/sessions/{name}``). The document decides,
  not the operator: a spec edit that carries a new signed version is forwarded as an update.
- A refusal by the CAS ("unsigned", "not-authorized", "stale-predecessor", an invalid document)
  is final for that generation: the status says ``accepted: false`` with the CAS's reason, and
  the handler ends with ``kopf.PermanentError`` so nothing retries in a loop. Only an
  unreachable or rate-limiting CAS (``BackendUnavailable``, ``RateLimited``) is retried, with
  exponential backoff.
- Re-uploading what the CAS already holds is not an error: when a create finds the session
  existing, or an update finds its predecessor stale, the operator asks the CAS for the
  session's current hash and reports ``accepted: true`` if it is this document's. So an
  operator restart, or a session first uploaded with the CLI, converges.
- Deleting a resource leaves the session in the CAS: the CAS has no deletion endpoint, and a
  deletion would have to be signed by an owner anyway. The operator logs it and posts an
  event; it adds no finalizer, so it can never block a deletion.

kopf keeps its bookkeeping in ``status.kopf`` (never in annotations) and does not scan the
cluster, so the operator needs no more than the chart's role: read sessions, patch their status,
create events.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

import kopf
from pydantic import ValidationError

from cloister import errors, protocol
from cloister.client import CasClient
from cloister.session import Session

__all__ = ["GROUP", "PLURAL", "VERSION", "OperatorConfig", "build_registry", "run"]

log = logging.getLogger(__name__)

GROUP: Final = "cloister.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "cloistersessions"
CONDITION: Final = "Accepted"
# Retries of an unreachable CAS: 5 s, 10 s, 20 s, ... capped at 5 minutes.
BACKOFF_FIRST: Final = 5.0
BACKOFF_MAX: Final = 300.0
# Reasons that leave a generation undecided, so a restarted operator tries it again.
_UNDECIDED: Final = ("backend-unavailable", "rate-limited")


@dataclass
class OperatorConfig:
    """Where the CAS is and the certificate that pins it (PEM, public)."""

    cas_url: str
    cas_cert_pem: bytes
    timeout: float = 30.0
    _clients: dict[str, CasClient] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self, url: str | None) -> CasClient:
        """A pinned client for ``url`` (a resource's ``spec.cas``) or the default CAS.

        Every URL is held to the same pinned certificate: ``spec.cas`` can choose where the
        request goes, never whom the operator trusts.
        """
        target = (url or self.cas_url).rstrip("/")
        with self._lock:
            if target not in self._clients:
                self._clients[target] = CasClient(
                    target, cert_pem=self.cas_cert_pem, timeout=self.timeout
                )
            return self._clients[target]

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()


@dataclass(frozen=True)
class Verdict:
    """What the status will say about one generation of a resource."""

    accepted: bool | None  # None: not known yet (the CAS could not be asked)
    hash: str
    reason: str
    message: str


# --- the relay (no kopf in here, so it reads as the rules above) -----------------------------


def relay(config: OperatorConfig, spec: Mapping[str, Any]) -> Verdict:
    """Upload one resource's signed session and return the CAS's verdict.

    Raises ``BackendUnavailable`` or ``RateLimited`` when the CAS cannot decide now.
    """
    text = spec.get("session")
    if not isinstance(text, str):
        return Verdict(False, "", "invalid-resource", "spec.session must be a string")
    try:
        session = Session.from_yaml(text)
    except errors.SessionError as exc:
        # The CAS runs the same loader and would refuse it for the same reason.
        return Verdict(False, "", exc.reason, f"the session document is invalid: {exc.message}")
    try:
        signed = protocol.SignedSession(
            session=text,
            signatures=[
                protocol.SessionSignature(
                    public_key=str(s.get("publicKey", "")), signature=str(s.get("signature", ""))
                )
                for s in spec.get("signatures") or []
                if isinstance(s, Mapping)
            ],
        )
    except ValidationError as exc:
        return Verdict(False, session.hash, "invalid-resource", f"spec is malformed: {exc}")
    url = spec.get("cas") if isinstance(spec.get("cas"), str) else None
    if url is not None and not url.startswith("https://"):
        # Plain HTTP would bypass the pinned certificate altogether.
        return Verdict(False, session.hash, "insecure-cas-url", f"spec.cas must be https://: {url}")
    client = config.client(url)
    creating = session.document.predecessor is None
    try:
        if creating:
            accepted = client.create_session(signed)
        else:
            accepted = client.update_session(session.name, signed)
    except (errors.BackendUnavailable, errors.RateLimited):
        raise
    except errors.ConflictError as exc:
        # "session-exists" or "stale-predecessor": fine if the CAS already holds this document.
        if exc.reason in ("session-exists", "stale-predecessor") and _is_current(client, session):
            return Verdict(
                True,
                session.hash,
                "current",
                f"the CAS already holds session {session.name!r} at this hash",
            )
        return Verdict(False, session.hash, exc.reason, exc.message)
    except errors.Error as exc:
        return Verdict(False, session.hash, exc.reason, exc.message)
    verb = "created" if creating else "updated"
    return Verdict(
        True,
        accepted.hash,
        verb,
        f"session {accepted.name!r} {verb} in the CAS (version {accepted.version})",
    )


def _is_current(client: CasClient, session: Session) -> bool:
    """Whether the CAS's current version of ``session`` is exactly this document.

    ``/v1/exists`` reports the current hash; it needs a service name, so a session without
    services cannot be checked and counts as not current.
    """
    services = session.document.services
    if not services:
        return False
    try:
        found = client.exists(session.name, services[0].name)
    except errors.Error:
        return False
    return found.session_hash == session.hash


# --- status ----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_status(
    patch: MutableMapping[str, Any],
    status: Mapping[str, Any],
    generation: int | None,
    verdict: Verdict,
) -> None:
    cond_status = {True: "True", False: "False", None: "Unknown"}[verdict.accepted]
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION), None)
    since = _now()
    if previous is not None and previous.get("status") == cond_status:
        since = str(previous.get("lastTransitionTime") or since)
    condition: dict[str, Any] = {
        "type": CONDITION,
        "status": cond_status,
        "reason": verdict.reason,
        "message": verdict.message[:32768],
        "lastTransitionTime": since,
    }
    out = patch.setdefault("status", {})
    out["accepted"] = bool(verdict.accepted)
    # kube-apiserver reads "" in a merge patch as null, which the schema refuses: omit instead.
    out["hash"] = verdict.hash or None
    # An accepted session has no reason; null removes the field (JSON merge patch).
    out["reason"] = None if verdict.accepted else verdict.reason
    if generation is not None:
        out["observedGeneration"] = generation
        condition["observedGeneration"] = generation
    out["conditions"] = [condition]


# --- kopf wiring -----------------------------------------------------------------------------


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to ``config``."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Bookkeeping in the status subresource: the operator never writes spec or metadata.
        settings.persistence.progress_storage = kopf.StatusProgressStorage(
            field="status.kopf.progress"
        )
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
            field="status.kopf.last-handled-configuration"
        )
        settings.peering.standalone = True
        # No cluster scanning: it would need list/watch on namespaces and CRDs, which the
        # chart's least-privilege role does not grant. The CRD must exist at start (the chart
        # installs it first); namespaces are served as named, or all of them.
        settings.scanning.disabled = True
        settings.posting.level = logging.WARNING

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        config.close()

    def upload(
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
        meta: Mapping[str, Any],
        body: Any,
        patch: MutableMapping[str, Any],
        retry: int,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        **_: Any,
    ) -> None:
        generation = meta.get("generation")
        try:
            verdict = relay(config, spec)
        except errors.RateLimited as exc:
            _unknown(patch, status, generation, spec, exc)
            raise kopf.TemporaryError(exc.message, delay=max(1.0, exc.retry_after)) from None
        except errors.BackendUnavailable as exc:
            _unknown(patch, status, generation, spec, exc)
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(retry, 16))
            raise kopf.TemporaryError(exc.message, delay=delay) from None
        write_status(patch, status, generation, verdict)
        if not verdict.accepted:
            # Final for this generation: a new, correctly signed spec is the only way forward.
            kopf.event(
                body,
                type="Warning",
                reason="SessionRefused",
                message=f"{verdict.reason}: {verdict.message}",
            )
            raise kopf.PermanentError(f"the CAS refused the session: {verdict.reason}")
        logger.info("%s (hash %s)", verdict.message, verdict.hash)

    kopf.on.create(*resource, registry=registry, id="upload")(upload)
    kopf.on.update(*resource, registry=registry, id="upload", field="spec")(upload)

    @kopf.on.resume(*resource, registry=registry, id="upload")
    def resume(status: Mapping[str, Any], meta: Mapping[str, Any], **kwargs: Any) -> None:
        # A restart re-uploads only what was never decided: the verdict of a generation stands.
        decided = (
            status.get("observedGeneration") == meta.get("generation")
            and status.get("reason") not in _UNDECIDED
        )
        if not decided:
            upload(status=status, meta=meta, **kwargs)

    @kopf.on.event(*resource, registry=registry)
    def deleted(type: str, name: str, namespace: str | None, body: Any, **_: Any) -> None:
        if type != "DELETED":
            return
        text = (body.get("spec") or {}).get("session", "")
        try:
            session_name = Session.from_yaml(text).name
        except errors.SessionError:
            session_name = "(invalid document)"
        # The CAS keeps it: there is no deletion endpoint, and the operator could not sign one.
        log.warning(
            "CloisterSession %s/%s deleted; session %s stays in the CAS",
            namespace,
            name,
            session_name,
        )
        kopf.event(
            body,
            type="Normal",
            reason="SessionKept",
            message=f"resource deleted; session {session_name} stays in the CAS",
        )

    return registry


def _unknown(
    patch: MutableMapping[str, Any],
    status: Mapping[str, Any],
    generation: int | None,
    spec: Mapping[str, Any],
    exc: errors.Error,
) -> None:
    try:
        digest = Session.from_yaml(str(spec.get("session", ""))).hash
    except errors.SessionError:
        digest = ""
    verdict = Verdict(None, digest, exc.reason, f"the CAS cannot decide now: {exc.message}")
    write_status(patch, status, generation, verdict)


def run(config: OperatorConfig, namespaces: Collection[str] = ()) -> None:
    """Run the operator until it is stopped (SIGINT/SIGTERM); every namespace by default."""
    registry = build_registry(config)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
        )
    )
