"""A client of the CAS's HTTP API, for owners (CLI), workloads (agent) and the operator.

The CAS is trusted by pinning: ``cloister cas attest`` verifies the CAS's evidence once and
stores its identity certificate under ``$CLOISTER_HOME/cas/``; every later connection accepts
exactly that certificate and nothing else. Transport failures become ``BackendUnavailable``;
refusals come back as the ``Error`` subclass of their HTTP status, with the CAS's stable code.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import ssl
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ValidationError

from cloister import errors, protocol

M = TypeVar("M", bound=BaseModel)

_STATUS_ERRORS: dict[int, type[errors.Error]] = {
    400: errors.SessionError,
    403: errors.AccessDenied,
    404: errors.NotFound,
    409: errors.ConflictError,
    413: errors.SessionError,
    503: errors.BackendUnavailable,
}


def cloister_home() -> Path:
    # Path.home() only when needed: a container may have neither HOME nor a passwd entry.
    explicit = os.environ.get("CLOISTER_HOME")
    return Path(explicit) if explicit else Path.home() / ".config" / "cloister"


def pin_path(url: str, home: Path | None = None) -> Path:
    parts = urlsplit(url)
    tag = f"{parts.hostname}_{parts.port or 443}".replace(":", "_")
    return (home or cloister_home()) / "cas" / f"{tag}.pem"


def pinned_context(cert_pem: bytes) -> ssl.SSLContext:
    """Accept exactly the pinned CAS certificate (by key), over TLS 1.3."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cert_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The pin is the identity: a CAS in a cluster is reached under many names.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@functools.lru_cache(maxsize=16)
def _shared_context(cert_pem: bytes) -> ssl.SSLContext:
    """One context per pinned certificate for every client of this process (none changes it
    after this): loading the pin costs more than a TLS handshake's share of the client."""
    return pinned_context(cert_pem)


def fingerprint(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


class CasClient:
    def __init__(self, url: str, *, cert_pem: bytes | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if cert_pem is None:
            path = pin_path(url)
            if not path.exists():
                raise errors.AccessDenied(
                    f"no pinned identity for the CAS at {url}; "
                    f"run 'cloister cas attest {url}' first",
                    reason="cas-not-pinned",
                )
            cert_pem = path.read_bytes()
        self._http = httpx.Client(
            base_url=self.url, verify=_shared_context(cert_pem), timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.BackendUnavailable(f"cannot reach the CAS at {self.url}: {exc}") from None
        if resp.status_code >= 400:
            raise _error_from(resp)
        try:
            return model.model_validate_json(resp.content)
        except ValidationError:
            raise errors.BackendUnavailable("the CAS sent a response that cannot be read") from None

    def status(self) -> dict[str, Any]:
        try:
            resp = self._http.get("/v1/status")
        except httpx.HTTPError as exc:
            raise errors.BackendUnavailable(f"cannot reach the CAS at {self.url}: {exc}") from None
        if resp.status_code >= 400:
            raise _error_from(resp)
        result: dict[str, Any] = resp.json()
        return result

    def nonce(self) -> protocol.NonceResponse:
        return self._call("POST", "/v1/nonces", protocol.NonceResponse)

    def evidence(self, nonce: str) -> protocol.CasEvidence:
        return self._call("GET", "/v1/cas/evidence", protocol.CasEvidence, params={"nonce": nonce})

    def create_session(self, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        return self._call(
            "POST", "/v1/sessions", protocol.SessionAccepted, json=signed.model_dump()
        )

    def update_session(self, name: str, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        return self._call(
            "PUT", f"/v1/sessions/{name}", protocol.SessionAccepted, json=signed.model_dump()
        )

    def read_session(self, name: str, read: protocol.SignedRead) -> protocol.SessionView:
        headers = {
            "X-Cloister-Nonce": read.nonce,
            "X-Cloister-Key": read.public_key,
            "X-Cloister-Signature": read.signature,
        }
        return self._call("GET", f"/v1/sessions/{name}", protocol.SessionView, headers=headers)

    def exists(self, session: str, service: str) -> protocol.ServiceExists:
        return self._call(
            "GET",
            "/v1/exists",
            protocol.ServiceExists,
            params={"session": session, "service": service},
        )

    def activate(self, req: protocol.ActivationRequest) -> protocol.ActivationResponse:
        return self._call(
            "POST", "/v1/activate", protocol.ActivationResponse, json=req.model_dump()
        )


def _error_from(resp: httpx.Response) -> errors.Error:
    try:
        body = protocol.ErrorBody.model_validate_json(resp.content)
        code, message = body.error, f"{body.message} (request {body.request_id})"
    except ValidationError:
        code, message = "http-error", f"the CAS answered HTTP {resp.status_code}"
    if resp.status_code == 429:
        retry = float(resp.headers.get("Retry-After", "1"))
        return errors.RateLimited(message, retry_after=retry)
    cls = _STATUS_ERRORS.get(resp.status_code, errors.Error)
    return cls(message, reason=code)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
