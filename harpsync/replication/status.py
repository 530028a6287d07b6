"""``cluster_status``: Harper's shape per connection and socket, plus harpsync's fields."""

from __future__ import annotations

from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from harpsync.replication import peers
from harpsync.replication.applier import QUEUE_LIMIT
from harpsync.replication.subscriber import Subscriber
from harpsync.security import describe_ca_pem
from harpsync.storage.hlc import version_to_ms, wall_ms_of

if TYPE_CHECKING:
    from harpsync.replication.publisher import Publisher
    from harpsync.replication.seams import StatusSource


def http_date(ts: float | None) -> str | None:
    return None if ts is None else formatdate(ts, usegmt=True)


def _socket(rep: StatusSource, sub: Subscriber) -> dict[str, Any]:
    pubs = rep.publishers.get((sub.peer, sub.database), set())
    pub = max(pubs, key=lambda p: p.sent_seq, default=None)
    if sub.link is not None:
        sub.latency_ms = sub.link.latency_ms
    # Compression is the current session's: a link that is down has none (before, it
    # showed the last session's until the next one had received something).
    session = sub.session if sub.connected else None
    ratio = session.compression_ratio if session is not None else None
    out: dict[str, Any] = {
        "database": sub.database,
        "connected": sub.connected,
        "latency": round(sub.latency_ms, 3) if sub.latency_ms is not None else None,
        "thread_id": 1,
        "threadId": 1,
        "nodes": [sub.peer],
        "lastCommitConfirmed": http_date(pub.last_ack_time if pub else None),
        "lastReceivedRemoteTime": http_date(wall_ms_of(sub.last_version) / 1000
                                            if sub.last_version else None),
        "lastReceivedLocalTime": http_date(sub.last_received_local),
        "lastReceivedVersion": version_to_ms(sub.last_version) if sub.last_version else 0,
        "lastReceivedStatus": "Receiving" if sub.lag_txns() else "Waiting",
        "backPressurePercent": round(100 * sub.backlog() / QUEUE_LIMIT),
        "state": sub.state,
        # Null while paused: unknown, not the last lag measured before the pause.
        "lag_ms": None if sub.lag_unknown else round(sub.lag_ms(), 1),
        "lag_txns": None if sub.lag_unknown else sub.lag_txns(),
        "sent_seq": pub.sent_seq if pub else 0,
        "received_seq": sub.received_seq,
        "committed_seq": sub.committed_seq,
        "acked_seq": _acked(rep, sub, pub),
        "bytes_received": sub.bytes_received,
        "compression": session.compression if session is not None else None,
        "compression_ratio": round(ratio, 3) if ratio else None,
        "txns_received": sub.txns_received,
        "last_error": sub.last_error,
        "last_error_at": http_date(sub.last_error_at),
    }
    if pub is not None and pub.sending_since is not None:
        out["sendingMessage"] = http_date(pub.sending_since)
    if sub.copy_progress is not None:
        out["copy"] = dict(sub.copy_progress)
    verified = rep.verified.get((sub.peer, sub.database))
    if verified is not None:
        out["verified"] = {**verified, "at": http_date(verified["at"])}
    return {k: v for k, v in out.items() if v is not None
            or k in ("last_error", "last_error_at", "latency", "lag_ms", "lag_txns")}


def _acked(rep: StatusSource, sub: Subscriber, pub: Publisher | None) -> int:
    """How far the peer acknowledged this node's log. Its subscribe (not a copy's) says
    it too: a peer that reconnected showed 0 until its next ack. With no session, the
    replicator's last ack (lowered by a subscribe from further back), or after this
    node's restart the last subscribe's position."""
    if pub is not None:
        asked = pub.session.subscription
        start = asked.after_seq if asked is not None and not asked.copy else 0
        return max(pub.acked_seq, start)
    key = (sub.peer, sub.database)
    return rep.acks[key] if key in rep.acks else rep.positions.get(key, 0)


def refresh_gauges(rep: StatusSource) -> None:
    """Set the per-link gauges ``/metrics`` shows: lag, connected, compression ratio and
    copy progress (``cluster_status`` only reports; it sets nothing)."""
    metrics = rep.metrics
    links = dict(rep.subscribers)
    metrics.keep_links(set(links))
    metrics.keep_peers(set(rep.rows), {(name, table) for name, db
                                       in list(rep.storage.databases.items())
                                       for table in list(db.tables)})
    for (peer, database), sub in sorted(links.items()):
        metrics.set_lag(peer, database, None if sub.lag_unknown else sub.lag_txns())
        rep.counts.sync_bytes((peer, database), sub.bytes_received)
        metrics.connected.labels(peer, database).set(1 if sub.connected else 0)
        ratio = sub.session.compression_ratio if sub.connected and sub.session else None
        metrics.set_compression_ratio(peer, database, ratio)
        metrics.set_copy(peer, database, sub.copy_progress)


def cluster_status(rep: StatusSource) -> dict[str, Any]:
    connections = []
    for name, row in sorted(rep.rows.items()):
        subs = [s for (peer, _db), s in sorted(rep.subscribers.items()) if peer == name]
        connections.append({
            "name": name,
            "url": row.get("url"),
            "replicates": bool(row.get("replicates", row.get("subscriptions") is None)),
            "subscriptions": row.get("subscriptions"),
            "shard": row.get("shard"),
            # Harper's: the peer's CA (the one its certificates must chain to here).
            "ca_info": describe_ca_pem(row.get("ca")),
            "database_sockets": [_socket(rep, s) for s in subs],
        })
    return {"type": "cluster-status", "connections": connections, "node_name": rep.node_name,
            "url": rep.url, "is_enabled": True, "certificate": rep.keys.certificate_info()}


__all__ = ["cluster_status", "peers", "refresh_gauges"]
