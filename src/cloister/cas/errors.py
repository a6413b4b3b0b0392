"""The one table from Cloister's errors to HTTP statuses.

Callers get the stable ``reason`` code, a short message and a request id; nothing in either
ever contains a secret value. The CAS logs the same request id with the refusal.
"""

from __future__ import annotations

from cloister import errors

_TABLE: tuple[tuple[type[errors.Error], int], ...] = (
    (errors.MalformedEvidenceError, 400),
    (errors.SessionError, 400),
    (errors.EvidenceError, 403),
    (errors.AppraisalError, 403),
    (errors.AccessDenied, 403),
    (errors.NotFound, 404),
    (errors.ConflictError, 409),
    (errors.RateLimited, 429),
    (errors.StoreError, 503),
    (errors.BackendUnavailable, 503),
    (errors.Error, 400),
)


def status_for(exc: errors.Error) -> int:
    for cls, status in _TABLE:
        if isinstance(exc, cls):
            return status
    return 400
