"""Per-client rate limits for the CAS's API: one token bucket per (client IP, endpoint class).

What it owns: the buckets, and an ASGI middleware that refuses a request with 429 and a
``Retry-After`` header when its client's bucket is empty. What it does not own: deciding who a
client is beyond the TCP peer address (a ``X-Forwarded-For`` header is the client's own claim,
so it is ignored), and anything shared between processes.

The buckets live **in each worker process**, not in the store: a rate limit is an availability
guard, not a security decision, and putting it in the database would cost a write per request
on exactly the path it protects. With ``W`` worker processes a client can therefore get up to
``W`` times the configured rate; ``cloister cas serve`` documents this on its flags.

The table of buckets is bounded (``limits.MAX_RATE_LIMITED_CLIENTS``): when it is full, buckets
that have refilled completely are dropped (they carry no state), then the least recently used.
Every decision takes ``now`` (a monotonic clock in seconds).
"""

from __future__ import annotations

import enum
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from cloister import limits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Endpoint(enum.Enum):
    """What a request costs the CAS, for rate limiting."""

    ACTIVATION = "activation"  # /v1/nonces and /v1/activate: what agents call
    SESSION = "session"  # /v1/sessions/** and /v1/exists: what owners and the operator call


def classify(path: str) -> Endpoint | None:
    """The rate-limit class of a request path, or ``None`` for the unlimited ones (health)."""
    if path in ("/v1/nonces", "/v1/activate"):
        return Endpoint.ACTIVATION
    if path == "/v1/sessions" or path.startswith("/v1/sessions/") or path == "/v1/exists":
        return Endpoint.SESSION
    return None


@dataclass(frozen=True)
class Rate:
    """``per_second`` tokens refill continuously up to ``burst``; ``per_second == 0`` is off."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_second < 0 or self.burst < 1:
            raise ValueError("a rate needs per_second >= 0 and burst >= 1")

    @property
    def unlimited(self) -> bool:
        return self.per_second == 0


@dataclass(frozen=True)
class RateLimits:
    activation: Rate = Rate(limits.ACTIVATION_RATE_PER_SECOND, limits.ACTIVATION_BURST)
    session: Rate = Rate(limits.SESSION_RATE_PER_SECOND, limits.SESSION_BURST)

    def for_endpoint(self, endpoint: Endpoint) -> Rate:
        return self.activation if endpoint is Endpoint.ACTIVATION else self.session


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBuckets:
    """Token buckets keyed by client; bounded in number. Not thread-safe (one event loop)."""

    def __init__(self, rates: RateLimits, *, max_clients: int = limits.MAX_RATE_LIMITED_CLIENTS):
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.rates = rates
        self.max_clients = max_clients
        self._buckets: OrderedDict[tuple[str, Endpoint], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, endpoint: Endpoint, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until a token is available."""
        rate = self.rates.for_endpoint(endpoint)
        if rate.unlimited:
            return 0.0
        key = (client, endpoint)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = _Bucket(rate.burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            # A clock that steps back never refills a bucket.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(rate.burst, bucket.tokens + elapsed * rate.per_second)
            bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate.per_second

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_clients:
            return
        # Full buckets carry no state: forgetting them changes no decision.
        for key in [k for k, b in self._buckets.items() if self._full(k[1], b, now)]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)

    def _full(self, endpoint: Endpoint, bucket: _Bucket, now: float) -> bool:
        rate = self.rates.for_endpoint(endpoint)
        return bucket.tokens + max(0.0, now - bucket.updated) * rate.per_second >= rate.burst


class RateLimitMiddleware:
    """ASGI middleware: 429 with ``Retry-After`` (whole seconds, at least 1) when over the rate.

    The refusal has the CAS's usual error body (``protocol.ErrorBody``), built here rather than
    by raising, so that a flood of refusals costs as little as possible.
    """

    def __init__(
        self,
        app: ASGIApp,
        rates: RateLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        new_request_id: Callable[[], str],
    ) -> None:
        self.app = app
        self.buckets = TokenBuckets(rates)
        self.clock = clock
        self.new_request_id = new_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = classify(scope.get("path", ""))
        client = scope.get("client")
        if endpoint is None or not client:
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(str(client[0]), endpoint, self.clock())
        if wait <= 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, int(wait + 0.999))
        rid = self.new_request_id()
        body = json.dumps(
            {
                "error": "rate-limited",
                "message": f"too many {endpoint.value} requests from this client; "
                f"retry after {retry_after} s",
                "request_id": rid,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
