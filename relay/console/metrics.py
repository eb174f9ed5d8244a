"""/metrics in Prometheus' text format: totals and gauges read from the spool, so every worker is counted.

The spool keeps its totals in the same transactions as the mail they count, which makes them right with
several workers and across restarts. Connections are counted in memory by the process that accepts them
(the relay, or the supervisor with listen.workers > 1), which is the one that serves the console.
No label holds an address, a subject or a message id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.console.words import DECISIONS
from relay.spool.interface import DELIVERY_SECONDS_BUCKETS, HistoryState, SpoolMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SpoolCollector(Collector):
    """Yields the metrics of the spool snapshot taken just before the scrape."""

    def __init__(self) -> None:
        self.snapshot: SpoolMetrics | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        counters = snapshot.counters
        messages = CounterMetricFamily(
            "privacy_relay_messages", "Messages by the relay's decision (refused ones included)", labels=["decision"]
        )
        for decision in DECISIONS:
            messages.add_metric([decision], counters.get(("messages_total", decision), 0.0))
        yield messages
        copies = CounterMetricFamily(
            "privacy_relay_copies", "Attempts to send a copy, by their result", labels=["result"]
        )
        for result in (HistoryState.DELIVERED, HistoryState.DEFERRED, HistoryState.BOUNCED):
            copies.add_metric([result], counters.get(("copies_total", result), 0.0))
        yield copies
        queue = GaugeMetricFamily("privacy_relay_queue_copies", "Copies in the spool, by state", labels=["state"])
        for state in (HistoryState.QUEUED, HistoryState.DEFERRED, HistoryState.SENDING):
            queue.add_metric([state], snapshot.queue_copies.get(state, 0))
        yield queue
        oldest = snapshot.oldest_received_at
        yield GaugeMetricFamily(
            "privacy_relay_queue_oldest_seconds",
            "Age of the oldest message with copies still to send (0: none)",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )
        yield GaugeMetricFamily(
            "privacy_relay_held_messages", "Messages held for review (policy.action: hold)", value=snapshot.held
        )
        count = counters.get(("delivery_seconds_count", ""), 0.0)
        buckets, cumulative = [], 0.0
        for bound in DELIVERY_SECONDS_BUCKETS:
            cumulative += counters.get(("delivery_seconds_bucket", repr(bound)), 0.0)
            buckets.append((repr(bound), cumulative))
        yield HistogramMetricFamily(
            "privacy_relay_delivery_seconds",
            "Seconds from a message's acceptance to the upstream's 250 for a copy",
            buckets=[*buckets, ("+Inf", count)],
            sum_value=counters.get(("delivery_seconds_sum", ""), 0.0),
        )
        upstream_up = GaugeMetricFamily(
            "privacy_relay_upstream_up",
            "1 when the last attempt through this upstream got an answer, 0 when it could not connect or log in",
            labels=["upstream"],
        )
        last_delivery = GaugeMetricFamily(
            "privacy_relay_upstream_last_delivery_timestamp_seconds",
            "When this upstream last accepted a copy (Unix time)",
            labels=["upstream"],
        )
        for (name, label), value in sorted(counters.items()):
            if name == "upstream_up":
                upstream_up.add_metric([label], value)
            elif name == "upstream_last_delivery":
                last_delivery.add_metric([label], value)
        yield upstream_up
        yield last_delivery


class ConsoleMetrics:
    """The registry behind /metrics; count_connection() may be called from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._connections = Counter(
            "privacy_relay_smtp_connections",
            "SMTP connections accepted (refused ones included)",
            registry=self.registry,
        )
        self._spool = _SpoolCollector()
        self.registry.register(self._spool)

    def count_connection(self) -> None:
        self._connections.inc()

    def render(self, snapshot: SpoolMetrics | None) -> bytes:
        """The text exposition; snapshot None (direct delivery) leaves only the connection count."""
        self._spool.snapshot = snapshot
        return generate_latest(self.registry)
