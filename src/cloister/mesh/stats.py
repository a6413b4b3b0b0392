"""In-process counters of the mesh, readable directly and as Prometheus text.

Counting is a dictionary increment on the event path (no locks: the proxies run on one event
loop); the Prometheus collector reads the dictionaries only when scraped. Each ``MeshStats`` has
its own registry, so two meshes in one process (or in one test run) never share counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["MeshStats"]

_Key = tuple[str, str]  # (direction, listener)


class MeshStats:
    """Counters per direction (``ingress``/``egress``) and listener (its port, as text)."""

    def __init__(self) -> None:
        self.accepted: Counter[_Key] = Counter()  # authorised and connected through
        self.refused: Counter[tuple[str, str, str]] = Counter()  # ..., reason
        self.upstream_errors: Counter[_Key] = Counter()  # app or peer unreachable
        self.closed_idle: Counter[_Key] = Counter()
        self.bytes_out: Counter[_Key] = Counter()  # plaintext from the app, sent encrypted
        self.bytes_in: Counter[_Key] = Counter()  # plaintext delivered to the app
        self.active: Counter[_Key] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def refusals(self, direction: str | None = None, reason: str | None = None) -> int:
        """How many connections were refused, optionally for one direction and reason."""
        return sum(
            n
            for (d, _, r), n in self.refused.items()
            if (direction is None or d == direction) and (reason is None or r == reason)
        )

    def render(self) -> bytes:
        """The counters in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, stats: MeshStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        labels = ["direction", "listener"]
        for name, doc, values in (
            ("connections", "Connections authorised and forwarded.", s.accepted),
            (
                "upstream_errors",
                "Connections whose app or peer could not be reached.",
                s.upstream_errors,
            ),
            ("idle_closed", "Connections closed for being idle.", s.closed_idle),
            ("sent_bytes", "Plaintext bytes from the app, sent encrypted.", s.bytes_out),
            ("received_bytes", "Plaintext bytes delivered to the app.", s.bytes_in),
        ):
            family = CounterMetricFamily(f"cloister_mesh_{name}", doc, labels=labels)
            for key, n in sorted(values.items()):
                family.add_metric(list(key), n)
            yield family
        refused = CounterMetricFamily(
            "cloister_mesh_refused",
            "Connections refused, by reason.",
            labels=[*labels, "reason"],
        )
        for key3, n in sorted(s.refused.items()):
            refused.add_metric(list(key3), n)
        yield refused
        active = GaugeMetricFamily(
            "cloister_mesh_active_connections", "Connections open now.", labels=labels
        )
        for key, n in sorted(s.active.items()):
            active.add_metric(list(key), n)
        yield active
