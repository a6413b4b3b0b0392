"""Prometheus metrics of one CAS (prometheus_client), in a registry of its own.

Counters are read from ``Cas.events`` at scrape time, so the service keeps one source of
truth; histograms are fed by the store (``Store.observe``) and by timing the verifiers. No label
ever carries a secret or a session name: results, reasons and operation names only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloister.attestation import Claims, Tee, Verifier

if TYPE_CHECKING:
    from cloister.cas.service import Cas

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EventsCollector(Collector):
    def __init__(self, cas: Cas) -> None:
        self._cas = cas

    def collect(self) -> Iterator[Metric]:
        events = self._cas.events
        act = CounterMetricFamily(
            "cloister_activations", "Activations by result.", labels=["result"]
        )
        for result, n in sorted(dict(events.activations).items()):
            act.add_metric([result], n)
        ref = CounterMetricFamily(
            "cloister_refusals", "Refused activations by reason.", labels=["reason"]
        )
        for reason, n in sorted(dict(events.refusals).items()):
            ref.add_metric([reason], n)
        sessions = GaugeMetricFamily("cloister_sessions_total", "Sessions in the store.")
        sessions.add_metric([], self._cas.store.count_sessions())
        healthy = GaugeMetricFamily(
            "cloister_store_intact", "1 unless rollback or tampering was detected."
        )
        healthy.add_metric([], 0 if self._cas.store.failure else 1)
        yield from (act, ref, sessions, healthy)


class Metrics:
    def __init__(self, cas: Cas) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EventsCollector(cas))
        self.verification = Histogram(
            "cloister_verification_seconds",
            "Time to verify one piece of evidence.",
            ["tee"],
            registry=self.registry,
            buckets=_BUCKETS,
        )
        self.store = Histogram(
            "cloister_store_seconds",
            "Time of one store transaction.",
            ["operation"],
            registry=self.registry,
            buckets=_BUCKETS,
        )
        cas.store.observe = self.observe_store

    def observe_store(self, operation: str, seconds: float) -> None:
        self.store.labels(operation).observe(seconds)

    def timed(self, tee: str, verifier: Verifier) -> Verifier:
        return _TimedVerifier(verifier, self.verification.labels(tee).observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TimedVerifier:
    """A verifier that reports how long each ``verify`` took."""

    def __init__(self, inner: Verifier, observe: Callable[[float], None]) -> None:
        self._inner = inner
        self._observe = observe

    @property
    def tee(self) -> Tee:
        return self._inner.tee

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        t0 = time.perf_counter()
        try:
            return self._inner.verify(evidence, now=now)
        finally:
            self._observe(time.perf_counter() - t0)
