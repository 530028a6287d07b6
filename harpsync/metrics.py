"""The only prometheus-client import: the node's counters and gauges for ``/metrics``.

Prometheus conventions: counters end in ``_total``, durations are histograms in
seconds, and the ``_created`` series (one more line per counter, no use for a scrape
of one node) are switched off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, Metric

disable_created_metrics()  # type: ignore[no-untyped-call]

# Request latencies: a cached-login read takes well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """A per-node registry (several nodes may share one process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.operations = Counter("harpsync_operations_total", "Operations handled",
                                  ["operation", "status"], registry=r)
        self.clock_skew = Counter("harpsync_clock_skew_total",
                                  "Remote versions ahead of local wall time by more than "
                                  "replication.maxClockSkew", ["peer"], registry=r)
        self.txns_received = Counter("harpsync_replication_txns_received_total",
                                     "Transactions received from peers",
                                     ["peer", "database"], registry=r)
        self.bytes_received = Counter("harpsync_replication_bytes_received_total",
                                      "Replication bytes received", ["peer", "database"],
                                      registry=r)
        self.lag_txns = Gauge("harpsync_replication_lag_txns",
                              "Publisher log entries not yet applied", ["peer", "database"],
                              registry=r)
        self.compression_ratio = Gauge("harpsync_replication_compression_ratio",
                                       "Wire bytes per decoded byte received on the link",
                                       ["peer", "database"], registry=r)
        self.connected = Gauge("harpsync_replication_connected",
                               "1 while the link is connected", ["peer", "database"],
                               registry=r)
        self.conflicts = Counter("harpsync_replication_conflicts_total",
                                 "Changes held for manual review (manual_review policy)",
                                 ["peer", "database"], registry=r)
        self.dead_letters = Counter("harpsync_replication_dead_letters_total",
                                    "Changes moved to the dead letters (unappliable or "
                                    "refused by a policy)", ["peer", "database"], registry=r)
        self.conflicts_pending = Gauge("harpsync_replication_conflicts_pending",
                                       "Conflicts waiting for resolve_conflict", registry=r)
        self.dead_letters_pending = Gauge("harpsync_replication_dead_letters_pending",
                                          "Dead letters not reprocessed or deleted", registry=r)
        self.rss = Gauge("harpsync_process_rss_bytes", "Resident set size", registry=r)
        self._add_detail_metrics(r)
        self.divergent_keys = Gauge("harpsync_divergent_keys",
                                    "Keys that differed from the peer at the last verification",
                                    ["peer", "database", "table"], registry=r)
        self.last_verification = Gauge("harpsync_last_verification_timestamp_seconds",
                                       "Unix time of the last verification", registry=r)

    def _add_detail_metrics(self, r: CollectorRegistry) -> None:
        self.operation_seconds = Histogram(
            "harpsync_operation_duration_seconds",
            "Time from request to response, per operation (failed requests: 'rejected')",
            ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.apply_seconds = Histogram(
            "harpsync_replication_apply_seconds",
            "Time to apply one batch received from a peer (durable)", ["peer", "database"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.apply_delay = Histogram(
            "harpsync_replication_apply_delay_seconds",
            "From a transaction's commit on its origin (its version's wall time) to its "
            "apply here, per peer that delivered it", ["peer"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.group_size = Histogram("harpsync_writer_group_jobs",
                                    "Write jobs per group commit", buckets=GROUP_BUCKETS,
                                    registry=r)
        self.commit_seconds = Histogram(
            "harpsync_writer_commit_seconds",
            "Time to commit (and fsync) one group's transactions", buckets=LATENCY_BUCKETS,
            registry=r)
        self.reconnects = Counter("harpsync_replication_reconnects_total",
                                  "Links re-established after they dropped",
                                  ["peer", "database"], registry=r)
        self.copying = Gauge("harpsync_replication_copy_active",
                             "1 while a full copy runs on the link", ["peer", "database"],
                             registry=r)
        self.copy_done = Gauge("harpsync_replication_copy_records",
                               "Records received so far by the running full copy",
                               ["peer", "database"], registry=r)
        self.copy_expected = Gauge("harpsync_replication_copy_records_expected",
                                   "Records the running full copy will send",
                                   ["peer", "database"], registry=r)
        self.changes_clients = Gauge("harpsync_changes_clients",
                                     "Clients subscribed to the /changes feed", registry=r)
        self.changes_sent = Counter("harpsync_changes_sent_total",
                                    "Changes sent to /changes clients", registry=r)
        self.changes_dropped = Counter("harpsync_changes_dropped_total",
                                       "/changes clients dropped for falling behind",
                                       registry=r)
        self._totals: dict[str, tuple[str, Callable[[], float]]] = {}
        self._operation_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        r.register(_FunctionCounters(self._totals))

    def observe_operation(self, operation: str | None, status: int, seconds: float) -> None:
        """Count and time one answered request (failed ones as ``rejected``)."""
        name = operation if status == 200 and operation else "rejected"
        children = self._operation_children.get((name, status))
        if children is None:  # labels() validates and locks: look each pair up once
            children = (self.operations.labels(name, str(status)),
                        self.operation_seconds.labels(name))
            self._operation_children[(name, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_group(self, jobs: int, commit_seconds: float) -> None:
        """One group commit of the writer thread (called from that thread)."""
        self.group_size.observe(jobs)
        self.commit_seconds.observe(commit_seconds)

    def set_copy(self, peer: str, database: str, progress: dict[str, int] | None) -> None:
        """Full-copy progress of one link (``None``: no copy running)."""
        self.copying.labels(peer, database).set(0 if progress is None else 1)
        progress = progress or {}
        self.copy_done.labels(peer, database).set(progress.get("records_copied", 0))
        self.copy_expected.labels(peer, database).set(progress.get("records_total", 0))

    def count_total(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Expose a counter kept elsewhere as ``<name>_total`` (read at scrape time)."""
        self._totals[name] = (documentation, read)

    def bind(self, rss: Callable[[], float], commits: Callable[[], float],
             jobs: Callable[[], float]) -> None:
        self.rss.set_function(rss)
        # Counters kept by the writer thread (formerly gauges without ``_total``).
        self.count_total("harpsync_writer_commits", "Group commits so far", commits)
        self.count_total("harpsync_writer_jobs", "Write jobs so far", jobs)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def bind_pending(self, conflicts: Callable[[], float],
                     dead_letters: Callable[[], float]) -> None:
        self.conflicts_pending.set_function(conflicts)
        self.dead_letters_pending.set_function(dead_letters)


class _FunctionCounters:
    """Counters whose values live in other objects (the writer's tallies)."""

    def __init__(self, totals: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, read) in list(self._totals.items()):
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], float(read()))
            yield family
