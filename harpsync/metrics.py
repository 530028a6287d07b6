"""The only prometheus-client import: the node's counters and gauges for ``/metrics``.

Prometheus conventions: counters end in ``_total``, durations are histograms in
seconds, and the ``_created`` series (one more line per counter, no use for a scrape
of one node) are switched off.
"""

from __future__ import annotations

import contextlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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
        # Per-request figures are plain numbers, turned into metrics when scraped:
        # prometheus_client takes a lock per increment, a few µs per request in all.
        self._op_counts: dict[tuple[str, int], int] = {}
        self._op_latency: dict[str, list[float]] = {}
        r.register(_OperationCounts(self._op_counts))
        self.clock_skew = Counter("harpsync_clock_skew_total",
                                  "Remote versions ahead of local wall time by more than "
                                  "replication.maxClockSkew", ["peer"], registry=r)
        self.txns_received = Counter("harpsync_replication_txns_received_total",
                                     "Transactions received from peers",
                                     ["peer", "database"], registry=r)
        self.bytes_received = Counter("harpsync_replication_bytes_received_total",
                                      "Bytes received on the link's sockets (as sent: "
                                      "compressed when the link compresses)",
                                      ["peer", "database"], registry=r)
        self.lag_txns = Gauge("harpsync_replication_lag_txns",
                              "Publisher log entries not yet applied", ["peer", "database"],
                              registry=r)
        self.compression_ratio = Gauge("harpsync_replication_compression_ratio",
                                       "Wire bytes per decoded byte received on the link",
                                       ["peer", "database"], registry=r)
        self.paused = Gauge("harpsync_replication_paused",
                            "1 while an operator has the link paused (its lag is unknown "
                            "then: harpsync_replication_lag_txns has no sample)",
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
        r.register(_OperationSeconds(self._op_latency))
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
                                  "Links re-established after they dropped (not after "
                                  "a pause, or a restart to change what they carry)",
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
        self._links: set[tuple[str, str]] = set()  # links with per-link gauges
        self._divergent: set[tuple[str, str, str]] = set()  # divergent_keys label sets
        r.register(_FunctionCounters(self._totals))

    def observe_operation(self, operation: str | None, status: int, seconds: float) -> None:
        """Count and time one answered request (failed ones as ``rejected``).

        Called on the event loop only (the scrape reads the tallies there too).
        """
        name = operation if status == 200 and operation else "rejected"
        key = (name, status)
        counts = self._op_counts
        counts[key] = counts.get(key, 0) + 1
        latency = self._op_latency.get(name)
        if latency is None:  # the sum, then one count per bucket and +Inf
            latency = self._op_latency[name] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        latency[0] += seconds
        # The first bucket whose upper bound is >= seconds, as prometheus_client counts.
        latency[1 + bisect_left(LATENCY_BUCKETS, seconds)] += 1

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

    def set_lag(self, peer: str, database: str, lag_txns: int | None) -> None:
        """The link's lag and paused gauges; ``None`` (paused: the lag is unknown)
        removes the lag series rather than keep the last value measured."""
        self.paused.labels(peer, database).set(1 if lag_txns is None else 0)
        if lag_txns is not None:
            self.lag_txns.labels(peer, database).set(lag_txns)
        else:
            with contextlib.suppress(KeyError):
                self.lag_txns.remove(peer, database)

    def set_compression_ratio(self, peer: str, database: str, ratio: float | None) -> None:
        """The link's current session's ratio; ``None`` (the link is down, or its new
        session received nothing yet) removes the series rather than keep the last."""
        if ratio:
            self.compression_ratio.labels(peer, database).set(round(ratio, 3))
        else:
            with contextlib.suppress(KeyError):
                self.compression_ratio.remove(peer, database)

    def keep_links(self, links: set[tuple[str, str]]) -> None:
        """Drop the per-link gauges of links not in ``links`` (``(peer, database)``): a
        removed peer or dropped database must not show its last values forever."""
        for key in self._links - links:
            for gauge in (self.lag_txns, self.paused, self.connected, self.compression_ratio,
                          self.copying, self.copy_done, self.copy_expected):
                with contextlib.suppress(KeyError):  # never set for this link
                    gauge.remove(*key)
        self._links = set(links)

    def forget_link(self, peer: str, database: str) -> None:
        """Drop every series of a link that is gone for good (its peer removed, its
        database dropped): the counters too, or each database ever dropped left its
        series behind for as long as the process runs. A link of that name made later
        counts from 0 again, which Prometheus reads as a counter reset."""
        for metric in (self.txns_received, self.bytes_received, self.apply_seconds,
                       self.reconnects, self.conflicts, self.dead_letters):
            with contextlib.suppress(KeyError):  # never counted for this link
                metric.remove(peer, database)
        self.keep_links(self._links - {(peer, database)})
        for key in [k for k in self._divergent if k[:2] == (peer, database)]:
            with contextlib.suppress(KeyError):
                self.divergent_keys.remove(*key)
            self._divergent.discard(key)

    def forget_peer(self, peer: str) -> None:
        """Drop the per-peer series of a removed peer (apply delay, clock skew)."""
        for metric in (self.apply_delay, self.clock_skew):
            with contextlib.suppress(KeyError):
                metric.remove(peer)

    def set_divergent(self, peer: str, database: str, table: str, keys: int) -> None:
        """Keys that differed from ``peer`` at the last verification of the table."""
        self.divergent_keys.labels(peer, database, table).set(keys)
        self._divergent.add((peer, database, table))

    def keep_peers(self, peers: set[str], tables: set[tuple[str, str]]) -> None:
        """Drop the verification gauges of peers not in ``peers`` (removed nodes) and of
        tables not in ``tables`` (``(database, table)``: dropped ones)."""
        for key in [k for k in self._divergent if k[0] not in peers or k[1:] not in tables]:
            with contextlib.suppress(KeyError):
                self.divergent_keys.remove(*key)
            self._divergent.discard(key)

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


class _OperationCounts:
    """``harpsync_operations_total`` by operation and status, from plain tallies."""

    def __init__(self, counts: dict[tuple[str, int], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("harpsync_operations_total", "Operations handled",
                                     labels=["operation", "status"])
        for (name, status), count in list(self._counts.items()):
            family.add_metric([name, str(status)], count)
        yield family


class _OperationSeconds:
    """``harpsync_operation_duration_seconds`` by operation, from plain tallies."""

    _BOUNDS = [floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf)]  # type: ignore[no-untyped-call]

    def __init__(self, latency: dict[str, list[float]]) -> None:
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "harpsync_operation_duration_seconds",
            "Time from request to response, per operation (failed requests: 'rejected')",
            labels=["operation"])
        for name, tally in list(self._latency.items()):
            buckets = []
            cumulative = 0.0
            for bound, count in zip(self._BOUNDS, tally[1:], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([name], buckets, tally[0])
        yield family


class _FunctionCounters:
    """Counters whose values live in other objects (the writer's tallies)."""

    def __init__(self, totals: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, read) in list(self._totals.items()):
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], float(read()))
            yield family
