"""Verify and repair: compare a table's hashes with a peer's, then only what differs.

The exchange runs over the peer's ``/.node`` endpoint (mutual TLS, one request per
round, like ``cluster_network``; the peer answers in ``verify_peer.py``):

1. ``verify_top``: the peer's top hash (one stored value), incarnation, row-digest
   layout, log head, and whether it is receiving a full copy from this node. Equal tops
   end it; unequal ones while a copy runs either way end it too (``busy``: the
   verification after a copy waits for the other way's copy to end, then runs again).
2. ``verify_ranges``: the peer's hashes over this node's coarse ranges (about one per
   4096 rows); only ranges that differ go on.
3. ``verify_buckets``: the peer's hashes over this node's buckets (about 32 rows each)
   in those ranges (a peer of an earlier release answers its own buckets, compared over
   the union of both sides' boundaries). The peer never lists its bucket starts: they
   are keys of its rows.
4. ``verify_rows``: ``key -> row digest`` of the rows in the buckets that differ. A
   peer lists its keys only of a table it publishes to this node; otherwise (this node
   only sends the table) this node's own keys there are the candidates.
5. ``verify_keys``: the candidate keys are read again on both sides, once each side has
   applied the other's log up to the head it had when the verify began (or a deadline
   passed), so writes still in flight are not reported; keys written after the verify
   began are left to replication.

So identical tables cost one small round, and k differences cost about k buckets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harpsync import codec
from harpsync.errors import (
    BadRequestError,
    HarpsyncError,
    NotFoundError,
    missing_is_bad_request,
)
from harpsync.replication import peers
from harpsync.replication.membership import node_request
from harpsync.replication.verify_peer import (
    answer_budget,
    applied_seq,
    copying,
    peer_handlers,
)
from harpsync.storage import compare, rowhash
from harpsync.storage.keys import decode_id, encode_id
from harpsync.storage.store import SYSTEM

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

log = logging.getLogger(__name__)

MAX_KEYS = 100
SETTLE_SECONDS = 5.0
# How long the verification after a full copy waits for a copy the other way to end.
AFTER_COPY_WAIT = 3600.0
KEY_CHUNK = 2000
REPAIR_CHUNK = 500
BOTH, PULL, PUSH = "both", "pull", "push"


@dataclass
class Pair:
    """One (peer, database, table) to compare, and which way it replicates."""

    peer: str
    url: str
    database: str
    table: str
    direction: str  # both; pull: this node receives only; push: it sends only


@dataclass
class Outcome:
    """What comparing one pair found."""

    pair: Pair
    in_sync: bool = True
    differences: list[tuple[bytes, compare.RowState, compare.RowState, int]] = field(
        default_factory=list)
    bytes_exchanged: int = 0
    rounds: int = 0
    error: str | None = None
    changed: dict[str, list[Any]] = field(default_factory=dict)
    # Per node, the ids a repair left as they were because a conflict policy there keeps
    # them: dest_wins (a dead letter) and manual_review (system.hdb_conflicts).
    refused: dict[str, list[Any]] = field(default_factory=dict)
    conflicts: dict[str, list[Any]] = field(default_factory=dict)
    # Per node, the ids stamped beyond its clock-skew bound: held back, as replication
    # holds them, until the clocks agree.
    skewed: dict[str, list[Any]] = field(default_factory=dict)
    timings: list[Any] = field(default_factory=list)
    # A full copy between the two was under way and the tops differed: nothing was
    # compared (a half-copied table differs in every row not copied yet).
    busy: bool = False
    # The table's incarnation both sides held when compared: a repair writes only into
    # it (a drop and re-create since makes the comparison's rows another table's).
    incarnation: int | None = None
    # A repair (not a dry run) stored rows: the differences it changed are gone.
    repaired: bool = False
    # The peer decides a dry run of a repair (an earlier release would write it): then
    # its policies show in the dry run too.
    peer_plans: bool = False

    def remaining(self) -> int:
        """Differences still there once the comparison (and a repair) ended."""
        if not self.repaired:
            return len(self.differences)
        fixed = {encode_id(rid) for ids in self.changed.values() for rid in ids}
        return sum(1 for key, *_ in self.differences if key not in fixed)


def _chunks(rows: Sequence[tuple[bytes, list[Any]]], budget: int,
            ) -> list[list[tuple[bytes, list[Any]]]]:
    # At most REPAIR_CHUNK rows and about ``budget`` bytes of records per message.
    out: list[list[tuple[bytes, list[Any]]]] = []
    size = budget
    for row in rows:
        if size >= budget or len(out[-1]) >= REPAIR_CHUNK:
            out.append([])
            size = 0
        out[-1].append(row)
        size += compare.row_size(row[1])
    return out


class Verifier:
    """Runs verifications for one node and keeps each link's last result."""

    def __init__(self, rep: Replicator) -> None:
        self.rep = rep
        self.storage = rep.storage
        self._task: asyncio.Task[None] | None = None
        self.last_run: float | None = None
        # (peer, database, table) -> (in sync, differences) at its last comparison: a
        # link's result covers every table last compared, not only the last run's.
        self._tables: dict[tuple[str, str, str], tuple[bool, int]] = {}

    # -- planning ----------------------------------------------------------------------
    def plan(self, database: str | None = None, table: str | None = None,
             nodes: list[str] | None = None) -> list[Pair]:
        """Every (peer, database, table) this node replicates, narrowed by the filters.

        Raises:
            NotFoundError: the database or table does not exist here.
            BadRequestError: a node in ``nodes`` is not a peer of this node.
        """
        rep = self.rep
        if database is not None:
            db = self.storage.database(database)
            if table is not None and table not in db.tables:
                raise NotFoundError(f"Table '{database}.{table}' does not exist")
        elif table is not None:
            raise BadRequestError("'table' needs 'database'")
        if nodes is not None:
            unknown = [n for n in nodes if n not in rep.rows]
            if unknown:
                raise BadRequestError(f"'nodes': not peers of this node: {', '.join(unknown)}")
        out: list[Pair] = []
        for name, row in sorted(rep.rows.items()):
            if nodes is not None and name not in nodes or not row.get("url"):
                continue
            for db_name in sorted(rep.replicated_databases()):
                if db_name == SYSTEM or database is not None and db_name != database:
                    continue
                found = self.storage.databases.get(db_name)
                if found is None:
                    continue
                db = found
                receive = peers.subscribe_tables(row, db_name)
                send = peers.publish_tables(row, db_name)
                for table_name in sorted(db.tables):
                    if table is not None and table_name != table:
                        continue
                    pull = receive is not False and peers.table_allowed(db_name, table_name,
                                                                        receive)
                    push = send is not False and peers.table_allowed(db_name, table_name,
                                                                     send)
                    if pull or push:
                        direction = BOTH if pull and push else PULL if pull else PUSH
                        out.append(Pair(name, str(row["url"]), db_name, table_name,
                                        direction))
        return out

    # -- running -----------------------------------------------------------------------
    async def run(self, pairs: list[Pair], deep: bool = False, repair: bool = False,
                  dry_run: bool = False) -> list[Outcome]:
        """Compare (and optionally repair) every pair, a few at a time."""
        start_version = self.storage.hlc.now()
        if deep:
            for db_name, table_name in sorted({(p.database, p.table) for p in pairs}):
                await self.storage.write(compare.rebuild_job(self.storage, db_name,
                                                             table_name))
        gate = asyncio.Semaphore(4)

        async def one(pair: Pair) -> Outcome:
            async with gate:
                outcome = Outcome(pair)
                try:
                    await self._compare(outcome, start_version, deep, repair)
                    if repair and outcome.differences:
                        await self._repair(outcome, dry_run)
                except HarpsyncError as exc:
                    outcome.in_sync = False
                    outcome.error = exc.message
                return outcome

        outcomes = list(await asyncio.gather(*(one(p) for p in pairs)))
        self._record(outcomes)
        return outcomes

    async def _ask(self, outcome: Outcome, operation: str, **body: Any) -> dict[str, Any]:
        pair = outcome.pair
        if outcome.incarnation is not None:
            # Every request after verify_top names the incarnation it compares: a peer
            # that dropped and re-created the table since refuses instead of answering
            # with another table's rows.
            body.setdefault("incarnation", outcome.incarnation)
        request = {"type": "operation",
                   "body": {"operation": operation, "database": pair.database,
                            "table": pair.table, **body}}
        began = time.perf_counter()
        answer = await node_request(self.rep, pair.url, request, verify=True,
                                    present_cert=True, timeout=60, expect=pair.peer)
        if answer.get("error"):
            raise BadRequestError(f"{pair.peer} refused {operation}: {answer['error']}")
        result = answer.get("result")
        if not isinstance(result, dict):
            raise BadRequestError(f"{pair.peer} sent an unreadable {operation} answer")
        size = len(codec.pack(request)) + len(codec.pack(result))
        outcome.rounds += 1
        outcome.bytes_exchanged += size
        outcome.timings.append([operation, round((time.perf_counter() - began) * 1000, 1),
                                size])
        return result

    async def _compare(self, outcome: Outcome, start_version: int, deep: bool,
                       repair: bool) -> None:
        pair = outcome.pair
        db, table = self.storage.table(pair.database, pair.table)
        my_head = db.head_seq
        my_top = await asyncio.to_thread(compare.top_hash, db, table)
        peer_top = await self._ask(outcome, "verify_top", deep=deep)
        if peer_top.get("format", 1) != rowhash.FORMAT:
            # Another row-digest layout (a node of another release): every row would
            # differ, and a repair would rewrite rows that are equal.
            raise BadRequestError(f"{pair.peer} hashes rows in layout "
                                  f"{peer_top.get('format', 1)}, this node in "
                                  f"{rowhash.FORMAT}: upgrade both to compare them")
        if peer_top.get("incarnation") != table.version:
            raise BadRequestError(f"{pair.peer} holds another incarnation of "
                                  f"'{pair.database}.{pair.table}' (created at "
                                  f"{peer_top.get('incarnation')}, here {table.version})")
        outcome.incarnation = table.version
        outcome.peer_plans = bool(peer_top.get("dry_run"))
        if peer_top.get("top") == my_top:
            return  # equal tables cost one lookup on each side
        if peer_top.get("copying") or copying(self.rep.subscribers.get((pair.peer,
                                                                         pair.database))):
            # Descending would read and compare every row not copied yet, over and
            # over while the copy runs, and slow the copy down.
            outcome.busy = True
            raise BadRequestError(f"a full copy between this node and {pair.peer} is in "
                                  "progress: verify again once it ends")
        items = await asyncio.to_thread(compare.all_buckets, db, table)
        leaves = await self._differing_ranges(outcome, items)
        if not leaves:
            return
        mine_by_range = await asyncio.to_thread(compare.rows_in, db, table,
                                                [(lo, hi) for lo, hi in leaves])
        candidates: set[bytes] = set()
        answer: dict[str, Any] = {"by_key": True}
        if pair.direction != PUSH:
            answer = await self._ask(outcome, "verify_rows", ranges=leaves)
        if answer.get("by_key"):
            # The peer does not publish the table to this node, so it does not list its
            # keys: only this node's rows can differ the way it sends (rows only the
            # peer holds are no difference one way), and they are compared key by key.
            for mine in mine_by_range:
                candidates.update(mine)
        for mine, theirs in zip(mine_by_range, answer.get("rows") or [], strict=False):
            theirs_map = {bytes(k): bytes(v) for k, v in theirs}
            for key in mine.keys() | theirs_map.keys():
                if mine.get(key) != theirs_map.get(key):
                    candidates.add(key)
        if candidates:
            await self._confirm(outcome, sorted(candidates), int(peer_top.get("head", 0)),
                                my_head, start_version, repair)

    async def _differing_ranges(self, outcome: Outcome, items: list[rowhash.Bucket],
                                ) -> list[list[Any]]:
        starts = rowhash.group_starts(items)
        mine = rowhash.combine(items, starts)
        answer = await self._ask(outcome, "verify_ranges", starts=starts)
        theirs = answer.get("hashes") or []
        groups: list[tuple[bytes, bytes | None]] = []
        for i, start in enumerate(starts):
            if i >= len(theirs) or theirs[i] != mine[i]:
                groups.append((start, starts[i + 1] if i + 1 < len(starts) else None))
        if not groups:
            return []
        # The peer's hashes over this node's buckets of each range (it never lists its
        # own bucket starts, which are keys of its rows).
        subs_of = [sorted({lo} | {s for s, _ in items if s >= lo and (hi is None or s < hi)})
                   for lo, hi in groups]
        answer = await self._ask(outcome, "verify_buckets", ranges=[list(g) for g in groups],
                                 subs=subs_of)
        leaves: list[list[Any]] = []
        if "hashes" in answer:
            for (lo, hi), subs, theirs_hashes in zip(groups, subs_of, answer["hashes"],
                                                     strict=False):
                my_items = [(s, h) for s, h in items if s >= lo and (hi is None or s < hi)]
                a = rowhash.combine(my_items, subs)
                for j, sub in enumerate(subs):
                    if j >= len(theirs_hashes) or bytes(theirs_hashes[j]) != a[j]:
                        leaves.append([sub, subs[j + 1] if j + 1 < len(subs) else hi])
            return leaves
        peer_lists = answer.get("buckets") or []  # a peer of an earlier release
        for (lo, hi), peer_items in zip(groups, peer_lists, strict=False):
            their_items = [(bytes(s), bytes(h)) for s, h in peer_items]
            my_items = [(s, h) for s, h in items if s >= lo and (hi is None or s < hi)]
            subs = sorted({lo} | {s for s, _ in my_items} | {s for s, _ in their_items})
            a = rowhash.combine(my_items, subs)
            b = rowhash.combine(their_items, subs)
            for j, sub in enumerate(subs):
                if a[j] != b[j]:
                    leaves.append([sub, subs[j + 1] if j + 1 < len(subs) else hi])
        return leaves

    async def _confirm(self, outcome: Outcome, keys: list[bytes], peer_head: int,
                       my_head: int, start_version: int, repair: bool) -> None:
        """Read the candidates again on both sides at a common point; keep real ones."""
        pair = outcome.pair
        db, table = self._same_table(outcome)
        deadline = time.monotonic() + SETTLE_SECONDS
        # Origins this node takes only some tables from: their rows of other tables,
        # held by this peer, are not this node's to have (nor to fetch by a repair).
        limits = self.rep.origin_tables(pair.peer, pair.database)
        while True:
            sub = self.rep.subscribers.get((pair.peer, pair.database))
            here_caught = pair.direction == PUSH or applied_seq(sub) >= peer_head
            theirs: list[compare.RowState] = []
            peer_applied = 0
            while len(theirs) < len(keys):
                # The peer answers with at most a frame's worth of records: ask on
                # from the first key it left out.
                answer = await self._ask(outcome, "verify_keys",
                                         keys=keys[len(theirs):len(theirs) + KEY_CHUNK],
                                         records=repair)
                rows = answer.get("rows") or []
                if not rows:
                    raise BadRequestError(f"{pair.peer} answered verify_keys without rows")
                theirs.extend(rows)
                peer_applied = int(answer.get("applied", 0))
            db, table = self._same_table(outcome)
            mine = await asyncio.to_thread(compare.read_rows, db, table, keys, repair)
            self._same_table(outcome)  # the rows read were of the compared incarnation
            there_caught = pair.direction == PULL or peer_applied >= my_head
            found = []
            for key, m, t in zip(keys, mine, theirs, strict=False):
                if not compare.differs(m, t):
                    continue
                newest = max(m[1] if m else 0, t[1] if t else 0)
                if newest > start_version:
                    continue  # written after the verify began: replication's job
                side = compare.winner(m, t)
                if pair.direction == PULL and side > 0 or pair.direction == PUSH and side < 0:
                    continue  # one-way: the receiver must hold at least the sender's rows
                if side < 0 and t and t[2] in limits and pair.table not in limits[t[2]]:
                    continue  # a row of an origin this node does not take this table from
                found.append((key, m, t, side))
            keys = [k for k, _m, _t, _s in found]
            if not found or here_caught and there_caught or time.monotonic() > deadline:
                outcome.differences = found
                outcome.in_sync = not found
                return
            await asyncio.sleep(0.1)

    def _same_table(self, outcome: Outcome) -> tuple[Any, Any]:
        """The pair's table here, if still the incarnation the verify compares.

        Raises:
            BadRequestError: it was dropped, or dropped and re-created, since.
        """
        pair = outcome.pair
        with missing_is_bad_request():
            db, table = self.storage.table(pair.database, pair.table)
        if table.version != outcome.incarnation:
            raise BadRequestError(f"table '{pair.database}.{pair.table}' was re-created "
                                  "during the verify: verify again")
        return db, table

    async def _repair(self, outcome: Outcome, dry_run: bool) -> None:
        """Bring each differing key to its winner on the side that lacks it."""
        pair = outcome.pair
        incarnation = outcome.incarnation
        if incarnation is None:
            return  # nothing was compared
        # A live row comes with its record only from a peer that publishes the table to
        # this node: without one there is nothing to store.
        here = [(k, t) for k, _m, t, side in outcome.differences
                if side < 0 and t and (t[3] or isinstance(t[4], dict))]
        there = [(k, m) for k, m, _t, side in outcome.differences if side > 0 and m]
        mine: dict[str, list[Any]] = {}
        theirs: dict[str, list[Any]] = {"changed": [decode_id(k) for k, _ in there]}
        if here:
            # This node's conflict policies hold as for the same rows replicated in (a
            # dry run decides the same, writing nothing).
            review = self.rep.review(pair.peer, pair.database)
            # A job per chunk: each logs at most one frame's worth of rows per origin (one
            # entry for all could be too large to send on, or for this node's own rows
            # to log at all).
            for chunk in _chunks([(k, list(row)) for k, row in here], answer_budget()):
                done = await self.storage.write(compare.repair_job(
                    self.storage, pair.database, pair.table, incarnation, chunk, review,
                    dry_run))
                for name in compare.REPAIR_LISTS:
                    mine.setdefault(name, []).extend(done.get(name) or [])
            self.rep.note_review(pair.peer, pair.database, review)
        if there and (not dry_run or outcome.peer_plans):
            theirs = {}
            for chunk in _chunks(there, answer_budget()):
                answer = await self._ask(outcome, "verify_repair", incarnation=incarnation,
                                         rows=[[k, row] for k, row in chunk],
                                         dry_run=dry_run)
                for name in compare.REPAIR_LISTS:
                    theirs.setdefault(name, []).extend(answer.get(name) or [])
        outcome.repaired = not dry_run
        for name in compare.REPAIR_LISTS:
            getattr(outcome, name).update({self.rep.node_name: mine.get(name) or [],
                                           pair.peer: theirs.get(name) or []})

    # -- results -----------------------------------------------------------------------
    def _record(self, outcomes: list[Outcome]) -> None:
        """Keep each link's last result (``cluster_status``) and export the metrics."""
        now = time.time()
        self.last_run = now
        links: set[tuple[str, str]] = set()
        for o in outcomes:
            if o.busy:
                continue  # not compared: the link keeps its last result
            p = o.pair
            left = o.remaining()
            self._tables[(p.peer, p.database, p.table)] = (o.error is None and not left, left)
            links.add((p.peer, p.database))
            self.rep.metrics.set_divergent(p.peer, p.database, p.table, left)
        for peer, database in links:
            db = self.storage.databases.get(database)
            tables = db.tables if db is not None else {}
            results = [r for (pp, dd, t), r in list(self._tables.items())
                       if pp == peer and dd == database and t in tables]
            self.rep.verified[(peer, database)] = {
                "at": now, "in_sync": all(ok for ok, _ in results),
                "differences": sum(n for _, n in results)}
        self.rep.metrics.last_verification.set(now)

    # -- background --------------------------------------------------------------------
    def start(self, interval_s: float) -> None:
        """Verify every replicated table every ``interval_s`` seconds (0: never)."""
        if interval_s > 0:
            self._task = asyncio.create_task(self._loop(interval_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.run(self.plan())
            except HarpsyncError as exc:
                log.warning("background verification failed: %s", exc.message)
            except Exception:
                log.exception("background verification failed")

    def after_copy(self, peer: str, database: str) -> None:
        """A full copy from ``peer`` ended: verify what it copied (once the peer's own
        copy from this node, if one runs, has ended too)."""
        async def check() -> None:
            deadline = time.monotonic() + AFTER_COPY_WAIT
            try:
                while True:
                    outcomes = await self.run(self.plan(database=database, nodes=[peer]))
                    if not any(o.busy for o in outcomes) or time.monotonic() > deadline:
                        return
                    await asyncio.sleep(1.0)
            except HarpsyncError as exc:
                if peer not in self.rep.rows or database not in self.storage.databases:
                    # The peer was removed, or the database dropped, since the copy
                    # ended: nothing is left to verify, and nothing failed.
                    log.debug("no verification after the copy from %s: %s", peer,
                              exc.message)
                    return
                log.warning("verification after the copy from %s failed: %s", peer,
                            exc.message)

        self.rep.spawn(check())


__all__ = ["Outcome", "Pair", "Verifier", "peer_handlers"]
