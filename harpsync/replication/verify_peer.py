"""The peer side of verify and repair: the ``verify_*`` requests another node's
verifier sends to this one (``verifier.py`` is the asking side).

A peer learns nothing about a table it does not share with this node; it reads keys
and records only of a table this node publishes to it; and a repair it sends lands
only in a table this node receives from it, under this node's conflict policies and
clock-skew bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from harpsync.errors import BadRequestError
from harpsync.replication import peers, transport
from harpsync.replication.verify_rows import wire_bytes
from harpsync.storage import compare, rowhash
from harpsync.storage.store import SYSTEM

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

# Records a verify message carries at most (and a frame's quarter, ``answer_budget``).
ANSWER_BYTES = 16 * 1024 * 1024


def answer_budget() -> int:
    """Bytes of records one verify message may carry (well inside a frame)."""
    return min(ANSWER_BYTES, transport.MAX_FRAME // 4)


def copying(sub: Any, db: Any) -> bool:
    """Whether a subscriber is receiving a full copy, or has one still to come: its
    database ``db`` holds no cursor from the peer yet (a new pairing starts with a
    copy, once the link connects) or an interrupted copy's. Before, a verification
    after one side's copy that ran before the other side's copy had begun compared a
    table not copied yet: it recorded every row as a difference and ended."""
    if sub is None:
        return False
    if getattr(sub, "copy_progress", None) is not None:
        return True
    cursor = db.cursor(sub.peer)
    return not cursor or "copy" in cursor


def applied_seq(sub: Any) -> int:
    """How far a subscriber has applied its peer's log (as ``lag_txns`` counts it)."""
    if sub is None:
        return 0
    applied = int(sub.committed_seq)
    if sub.backlog() == 0 and sub.caught_up_seq >= sub.received_seq:
        applied = max(applied, int(sub.caught_up_seq))
    return applied


# -- the peer side -----------------------------------------------------------------------
PeerHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def peer_handlers(rep: Replicator) -> dict[str, PeerHandler]:
    """The ``verify_*`` requests a peer's verifier sends to this node."""
    storage = rep.storage

    def target(peer: str, body: dict[str, Any], receive: bool = False) -> tuple[Any, Any]:
        """The table a request names, if it replicates with ``peer`` (into this node,
        for a repair); a peer learns nothing about tables it does not share."""
        database, table = str(body.get("database")), str(body.get("table"))
        row = rep.rows.get(peer)
        if database == SYSTEM or not rep.replicates_database(database) or row is None:
            raise BadRequestError(f"database '{database}' does not replicate with {peer}")
        found = storage.table(database, table)
        incarnation = body.get("incarnation")
        if incarnation is not None and incarnation != found[1].version:
            # Dropped and re-created here since the peer's verify began (its drop may
            # not have reached the peer yet): this table's rows are not the ones it
            # compares, and taking them would put them into the old incarnation there.
            raise BadRequestError(f"table '{database}.{table}' was re-created on "
                                  f"{rep.node_name} during the verify: verify again")
        directions = [peers.subscribe_tables(row, database)]
        if not receive:
            directions.append(peers.publish_tables(row, database))
        if not any(d is not False and peers.table_allowed(database, table, d)
                   for d in directions):
            raise BadRequestError(f"table '{database}.{table}' does not replicate with {peer}")
        return found

    async def tables(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """The names of the database's tables that replicate with ``peer`` (either
        way): the asker reports those it lacks. It learns no other table's name."""
        database = str(body.get("database"))
        row = rep.rows.get(peer)
        if database == SYSTEM or not rep.replicates_database(database) or row is None:
            raise BadRequestError(f"database '{database}' does not replicate with {peer}")
        db = storage.databases.get(database)
        directions = [d for d in (peers.subscribe_tables(row, database),
                                  peers.publish_tables(row, database)) if d is not False]
        names = sorted(db.tables) if db is not None else []
        return {"tables": [t for t in names
                           if any(peers.table_allowed(database, t, d) for d in directions)]}

    def applied(peer: str, database: str) -> int:
        return applied_seq(rep.subscribers.get((peer, database)))

    async def top(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        pending = storage.databases.get(str(body.get("database")))
        if (pending is not None and str(body.get("table")) not in pending.tables
                and copying(rep.subscribers.get((peer, pending.name)), pending)):
            # A table of a database created since the join comes with this node's
            # first copy from the peer: not there yet is no difference.
            return {"copying": True, "format": rowhash.FORMAT}
        db, table = target(peer, body)
        if body.get("deep"):
            await storage.write(compare.rebuild_job(storage, db.name, table.name))
        return {"incarnation": table.version,
                "top": await asyncio.to_thread(compare.top_hash, db, table),
                "copying": copying(rep.subscribers.get((peer, db.name)), db),
                "format": rowhash.FORMAT, "dry_run": True,
                "head": db.head_seq, "applied": applied(peer, db.name)}

    async def ranges(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        db, table = target(peer, body)
        starts = [wire_bytes(s) for s in body.get("starts") or []]
        if not starts or starts[0] != b"" or starts != sorted(starts):
            raise BadRequestError("'starts' must be sorted and begin with b''")
        return {"hashes": await asyncio.to_thread(compare.range_hashes, db, table, starts)}

    def parse_ranges(body: dict[str, Any]) -> list[compare.Range]:
        return [(wire_bytes(lo), None if hi is None else wire_bytes(hi))
                for lo, hi in body.get("ranges") or []]

    def published(peer: str, db: Any, table: Any) -> bool:
        """Whether this node sends the table to ``peer`` (which may then read it)."""
        publish = peers.publish_tables(rep.rows.get(peer) or {}, db.name)
        return publish is not False and peers.table_allowed(db.name, table.name, publish)

    async def buckets(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        db, table = target(peer, body)
        ranges = parse_ranges(body)
        subs = body.get("subs")
        if subs is None and not published(peer, db, table):
            # Bucket starts are keys of this node's rows: not for a peer that may not
            # read the table (an earlier release asks so).
            raise BadRequestError(f"table '{db.name}.{table.name}' is not published to "
                                  f"{peer}: its keys are not listed")
        found = await asyncio.to_thread(compare.buckets_in, db, table, ranges)
        if subs is None:
            return {"buckets": [[[s, h] for s, h in items] for items in found]}
        if not isinstance(subs, list) or len(subs) != len(ranges):
            raise BadRequestError("'subs' must hold one list of starts per range")
        hashes = []
        for (lo, _hi), starts, items in zip(ranges, subs, found, strict=True):
            starts = [wire_bytes(s) for s in starts or []]
            if not starts or starts[0] != lo or starts != sorted(starts):
                raise BadRequestError("each 'subs' list must be sorted and begin with its "
                                      "range's start")
            hashes.append(rowhash.combine(items, starts))
        return {"hashes": hashes}

    async def rows(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        db, table = target(peer, body)
        if not published(peer, db, table):
            # Its keys are not the peer's to read: it compares its own keys one by one.
            return {"by_key": True}
        # At most a budget of keys per answer (every row of a large table can be in
        # the differing buckets, say against an emptied node): the asker asks on from
        # "next", the first key left out.
        # (An asker of an earlier release, not sending "paged", would take a cut answer
        # for complete: it gets every row, as before.)
        budget = answer_budget() if body.get("paged") else 1 << 62
        found, stop = await asyncio.to_thread(compare.rows_in_bounded, db, table,
                                              parse_ranges(body), budget)
        target(peer, body)  # still the incarnation asked about once read
        answer: dict[str, Any] = {"rows": [[[k, d] for k, d in rows] for rows in found]}
        if stop is not None:
            answer["next"] = [stop[0], stop[1]]
        return answer

    async def keys(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        db, table = target(peer, body)
        wanted = [wire_bytes(k) for k in body.get("keys") or []]
        # Whole records only of a table this node sends the peer: one it only receives
        # from it may be compared (digests, versions), not read.
        records = bool(body.get("records")) and published(peer, db, table)
        found = await asyncio.to_thread(compare.read_rows, db, table, wanted, records,
                                        answer_budget() if records else None)
        target(peer, body)  # still the incarnation asked about once read
        # The origins this node takes only some tables from (not from the peer itself):
        # their rows the peer holds and this node lacks are no difference (``repair``
        # below would not store them either), and only this node knows its limits.
        return {"rows": found, "applied": applied(peer, db.name), "head": db.head_seq,
                "limits": rep.origin_tables(peer, db.name)}

    async def repair(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        db, table = target(peer, body, receive=True)
        # Not rows of an origin this node does not take this table from (the peer does
        # not know this node's limits).
        limits = rep.origin_tables(peer, db.name)
        rows_in = [(wire_bytes(k), list(row)) for k, row in body.get("rows") or []
                   if not (isinstance(row, list) and len(row) > 2 and row[2] in limits
                           and table.name not in limits[row[2]])]
        # This node's conflict policies for the rows' origins, as for replicated rows.
        review = rep.review(peer, db.name)
        out = await storage.write(compare.repair_job(
            storage, db.name, table.name, int(body.get("incarnation", -1)), rows_in, review,
            bool(body.get("dry_run"))))
        rep.note_review(peer, db.name, review)
        return dict(out)

    return {"verify_tables": tables, "verify_top": top, "verify_ranges": ranges,
            "verify_buckets": buckets, "verify_rows": rows, "verify_keys": keys,
            "verify_repair": repair}
