"""``get_replication_status``: one entry per (peer, database) stream, seed 001 style.

harpsync's link states map onto the stream states: ``paused``; ``snapshot`` while a
full copy runs (also after ``resync_required``); ``catching_up`` while connecting for
the first time or streaming with entries left to apply; ``running`` when streaming and
caught up; ``failed`` after an error while the link reconnects, or while entries are
held back for clock skew. ``errors_last_hour`` is counted to the minute (the link keeps
a count per minute, so that a link failing often keeps a bounded record).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from harpsync.errors import BadRequestError
from harpsync.replication.subscriber import Subscriber
from harpsync.storage import deadletters
from harpsync.storage.conflicts import iso_ms
from harpsync.storage.hlc import wall_ms_of

if TYPE_CHECKING:
    from harpsync.replication.seams import StatusSource

HOUR = 3600.0


def stream_state(sub: Subscriber) -> str:
    """The seed-001 state of a link."""
    if sub.paused or sub.state == "paused":
        return "paused"
    if sub.state in ("copying", "resync_required"):
        return "snapshot"
    if sub.state == "clock_skew":
        return "failed"
    if sub.state == "streaming":
        return "catching_up" if sub.lag_txns() else "running"
    return "failed" if sub.last_error is not None and sub.failures else "catching_up"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_ms(ts * 1000)


def stream_entry(rep: StatusSource, sub: Subscriber, letters: list[dict[str, Any]],
                 conflicts: list[dict[str, Any]]) -> dict[str, Any]:
    row = rep.rows.get(sub.peer, {})
    db = rep.storage.databases.get(sub.database)
    durable = int(db.cursor(sub.peer).get("seq", 0)) if db is not None else 0
    now = time.time()
    policies = {s["table"]: s["conflict"] for s in row.get("subscriptions") or []
                if s.get("database", "data") == sub.database and s.get("conflict")}
    return {
        "name": f"{sub.peer}/{sub.database}",
        "node": sub.peer,
        "database": sub.database,
        "state": stream_state(sub),
        "link_state": sub.state,
        "connected": sub.connected,
        "last_event": None if not sub.last_version else {
            "version": sub.last_version,
            "time": iso_ms(wall_ms_of(sub.last_version)),
            "received_at": _iso(sub.last_received_local)},
        "last_checkpoint": {"sequence": max(sub.committed_seq, durable),
                            "time": _iso(sub.checkpoint_at)},
        "lag_seconds": None if sub.lag_unknown else round(sub.lag_ms() / 1000, 3),
        "lag_events": None if sub.lag_unknown else sub.lag_txns(),
        "bytes_replicated": sub.bytes_received,
        "events_replicated": sub.txns_received,
        "errors_last_hour": sub.errors_since(now - HOUR),
        "last_error": sub.last_error,
        "last_error_at": _iso(sub.last_error_at),
        "conflict": str(row.get("conflict") or rep.default_conflict),
        "conflict_tables": policies,
        "dead_letters": sum(1 for r in letters if r.get("peer") == sub.peer
                            and r.get("database") == sub.database),
        "conflicts": sum(1 for r in conflicts if r.get("peer") == sub.peer
                         and r.get("database") == sub.database),
    }


def replication_status(rep: StatusSource, node: str | None,
                       database: str | None) -> list[dict[str, Any]]:
    """The streams of this node, optionally of one peer and/or one database.

    Raises:
        BadRequestError: ``node`` is not a peer of this node, or ``database`` does
            not exist.
    """
    if node is not None and node not in rep.rows:
        raise BadRequestError(f"node '{node}' is not a peer of this node")
    if database is not None and database not in rep.storage.databases:
        raise BadRequestError(f"database '{database}' does not exist")
    letters = deadletters.rows_of(rep.storage, deadletters.DEAD_LETTERS)
    conflicts = deadletters.rows_of(rep.storage, deadletters.CONFLICTS)
    return [stream_entry(rep, sub, letters, conflicts)
            for (peer, db), sub in sorted(rep.subscribers.items())
            if (node is None or peer == node) and (database is None or db == database)]

