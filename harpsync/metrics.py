"""The only prometheus-client import: the node's counters and gauges for ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


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
        self.rss = Gauge("harpsync_process_rss_bytes", "Resident set size", registry=r)
        self.commits = Gauge("harpsync_writer_commits", "Group commits so far", registry=r)
        self.jobs = Gauge("harpsync_writer_jobs", "Write jobs so far", registry=r)
        self.divergent_keys = Gauge("harpsync_divergent_keys",
                                    "Keys that differed from the peer at the last verification",
                                    ["peer", "database", "table"], registry=r)
        self.last_verification = Gauge("harpsync_last_verification_timestamp_seconds",
                                       "Unix time of the last verification", registry=r)

    def count_operation(self, operation: str | None, status: int) -> None:
        """Count one answered request; failed ones are counted without their name
        (it may be anything a client sent)."""
        self.operations.labels(operation if status == 200 else "rejected", str(status)).inc()

    def bind(self, rss: Callable[[], float], commits: Callable[[], float],
             jobs: Callable[[], float]) -> None:
        self.rss.set_function(rss)
        self.commits.set_function(commits)
        self.jobs.set_function(jobs)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
