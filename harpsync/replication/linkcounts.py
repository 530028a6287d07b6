"""The counters of the links (``/metrics`` and ``cluster_status``), kept per (peer,
database) across the links made for it.

A link is re-made when its peer's row changes (``update_node``, ``configure_cluster``):
the new one counts on from the old one's transactions and bytes, as the Prometheus
counters do, so the two views agree. A link gone for good (its peer removed, its
database dropped) loses its counts and its series, so that label sets do not pile up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from harpsync.metrics import Metrics
from harpsync.storage.hlc import wall_ms_of

Key = tuple[str, str]


class LinkCounts:
    """The per-link metric children and the retired links' counts."""

    def __init__(self, metrics: Metrics, wall_now_ms: Callable[[], float]) -> None:
        self.metrics = metrics
        self._wall_now_ms = wall_now_ms
        # Each link's metric children, looked up once: ``labels()`` costs a lock and a
        # tuple key per call, and a link applies one batch per write on its origin.
        self._children: dict[Key, tuple[Any, Any, Any, Any]] = {}
        # Transactions and bytes received by retired links, until re-made or forgotten.
        self._ended: dict[Key, tuple[int, int]] = {}
        self._bytes_seen: dict[Key, int] = {}  # wire bytes counted so far, per link

    def _link(self, key: Key) -> tuple[Any, Any, Any, Any]:
        """``txns_received``, ``bytes_received``, ``apply_delay`` and ``apply_seconds``."""
        children = self._children.get(key)
        if children is None:
            m, (peer, database) = self.metrics, key
            children = (m.txns_received.labels(peer, database),
                        m.bytes_received.labels(peer, database),
                        m.apply_delay.labels(peer), m.apply_seconds.labels(peer, database))
            self._children[key] = children
        return children

    def received(self, key: Key, txns: int, last_version: int) -> None:
        txns_received, _, apply_delay, _ = self._link(key)
        txns_received.inc(txns)
        if last_version and txns:
            # From the newest applied transaction's commit on its origin to now.
            delay_ms = self._wall_now_ms() - wall_ms_of(last_version)
            apply_delay.observe(max(0, delay_ms) / 1000.0)

    def sync_bytes(self, key: Key, total: int) -> None:
        """Bring ``bytes_received`` up to the link's wire bytes ``total`` (its
        ``bytes_received``, carried over re-made links): the counter and
        ``cluster_status`` count the same bytes. Before, the counter summed the decoded
        entries applied (no copy, no compression), a number under the same name that
        agreed with nothing in cluster_status."""
        seen = self._bytes_seen.get(key, 0)
        if total > seen:
            self._link(key)[1].inc(total - seen)
            self._bytes_seen[key] = total

    def apply_seconds(self, key: Key, seconds: float) -> None:
        self._link(key)[3].observe(seconds)

    def retired(self, key: Key, txns: int, size: int) -> None:
        self._ended[key] = (txns, size)

    def carried(self, key: Key) -> tuple[int, int]:
        """What a link re-made for ``key`` counts on from (0, 0 for a new one)."""
        return self._ended.pop(key, (0, 0))

    def forget(self, wanted: set[Key], peers: Iterable[str]) -> list[Key]:
        """Drop the counts and series of retired links not in ``wanted``; returns them."""
        known = set(peers)
        gone = [k for k in self._ended if k not in wanted]
        for key in gone:
            del self._ended[key]
            self._children.pop(key, None)
            self._bytes_seen.pop(key, None)
            self.metrics.forget_link(*key)
            if key[0] not in known:
                self.metrics.forget_peer(key[0])
        return gone
