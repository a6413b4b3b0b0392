"""The whole exception tree of Cloister, drawn once.

::

    Error                          anything Cloister refuses, with a stable ``code``
    ├── SessionError               a session document is invalid (load-time checks)
    ├── EvidenceError              evidence is not genuine, bound or well-formed
    │   ├── MalformedEvidenceError     cannot be parsed, or a length is out of bounds
    │   ├── SignatureError             a signature over evidence or collateral fails
    │   ├── CollateralError            collateral missing, expired, not yet valid, mismatched
    │   └── BindingError               report data does not bind the expected nonce and key
    ├── AppraisalError             genuine evidence that the session's rules do not accept
    ├── AccessDenied               the caller is not allowed to do this (signature, policy)
    ├── ConflictError              a write lost a race or names the wrong predecessor
    ├── NotFound                   the named object does not exist (or is not visible)
    ├── StoreError                 persistent state is unreadable, tampered or rolled back
    │   └── RollbackError              the store is older than the head the CAS last signed
    ├── VolumeIntegrityError       an encrypted volume was changed, swapped or rolled back
    ├── RateLimited                too many requests; retry after ``retry_after`` seconds
    └── BackendUnavailable         a database, CAS or collateral service cannot be reached

Misuse of an API by its caller (wrong types, impossible arguments) stays ``ValueError`` and
``TypeError``: those are bugs, not refusals.

Every class carries a stable kebab-case ``code``. The CAS maps classes to HTTP statuses and the
CLI to exit codes in one table each (``cloister.cas.errors``, ``cloister.cli.errors``); the
detailed ``reason`` goes to the audit log and to the owner, never to an unauthenticated caller.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AppraisalError",
    "BackendUnavailable",
    "BindingError",
    "CollateralError",
    "ConflictError",
    "Error",
    "EvidenceError",
    "MalformedEvidenceError",
    "NotFound",
    "RateLimited",
    "RollbackError",
    "SessionError",
    "SignatureError",
    "StoreError",
    "VolumeIntegrityError",
]


class Error(Exception):
    """Base of every refusal Cloister makes.

    ``reason`` is a stable kebab-case tag that programs can match (for evidence it follows the
    ``reject_reason`` vocabulary of the attestation test vectors); the message is for people.
    """

    code = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class SessionError(Error):
    code = "invalid-session"


class EvidenceError(Error):
    code = "invalid-evidence"


class MalformedEvidenceError(EvidenceError):
    code = "malformed-evidence"


class SignatureError(EvidenceError):
    code = "bad-signature"


class CollateralError(EvidenceError):
    code = "bad-collateral"


class BindingError(EvidenceError):
    code = "bad-binding"


class AppraisalError(Error):
    code = "not-accepted"


class AccessDenied(Error):
    code = "access-denied"


class ConflictError(Error):
    code = "conflict"


class NotFound(Error):
    code = "not-found"


class StoreError(Error):
    code = "store-error"


class RollbackError(StoreError):
    code = "rollback-detected"


class VolumeIntegrityError(Error):
    code = "volume-integrity"

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.path = path


class RateLimited(Error):
    code = "rate-limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(Error):
    code = "backend-unavailable"
