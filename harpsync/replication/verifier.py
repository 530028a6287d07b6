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
4. ``verify_rows``: ``key -> row digest`` of the rows in the buckets that differ, a
   budget of rows per answer (the peer says where it stopped). A peer lists its keys
   only of a table it publishes to this node; otherwise (this node only sends the
   table) this node's own keys there are the candidates.
5. ``verify_keys``: the candidate keys are read again on both sides (digests and
   versions, no records), once each side has applied the other's log up to the head it
   had when the verify began (or a deadline passed), so writes still in flight are not
   reported; keys written after the verify began are left to replication. A repair
   then reads the records a bounded chunk at a time.

A verify of a whole database also asks each peer which tables it shares with this node
(``verify_tables``) and reports those missing here. A peer found unreachable is not
dialled again for the run's other tables.

So identical tables cost one small round, and k differences cost about k buckets.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from harpsync import codec
from harpsync.errors import (
    BadRequestError,
    HarpsyncError,
    NotFoundError,
    PeerError,
    missing_is_bad_request,
)
from harpsync.replication import peers, verify_tables
from harpsync.replication.membership import node_request
from harpsync.replication.verify_peer import (
    answer_budget,
    applied_seq,
    copying,
    peer_handlers,
)
from harpsync.replication.verify_rows import (
    BOTH,
    PULL,
    PUSH,
    Outcome,
    Pair,
    candidate_keys,
    real_differences,
    unchanged,
    unreachable,
    wire_bytes,
)
from harpsync.storage import compare, rowhash
from harpsync.storage.keys import decode_id
from harpsync.storage.store import SYSTEM

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

log = logging.getLogger(__name__)

MAX_KEYS = 100
SETTLE_SECONDS = 5.0
# How long the verification after a full copy waits for a copy the other way to end.
AFTER_COPY_WAIT = 3600.0
KEY_CHUNK = 2000
# Seconds a verify request may take, dial included.
REQUEST_TIMEOUT = 60.0
REPAIR_CHUNK = 500
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
        # (peer, database, table) of tables the peer holds and this node lacks, as its
        # last listing said: they count in the link's result.
        self._peer_only: set[tuple[str, str, str]] = set()

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

    async def check(self, database: str | None = None, table: str | None = None,
                    nodes: list[str] | None = None, deep: bool = False,
                    repair: bool = False, dry_run: bool = False) -> list[Outcome]:
        """Plan, then compare (and optionally repair) every pair; with no ``table``,
        also report each table a peer holds (and replicates with this node) that this
        node lacks.

        Raises:
            NotFoundError, BadRequestError: as ``plan``.
        """
        pairs = self.plan(database, table, nodes)
        down: dict[str, str] = {}
        extra = [] if table is not None else await self.peer_only(database, nodes, down)
        return await self.run(pairs, deep, repair, dry_run, extra, down)

    async def peer_only(self, database: str | None = None, nodes: list[str] | None = None,
                        down: dict[str, str] | None = None) -> list[Outcome]:
        """The tables each peer (of ``nodes``) holds, of each replicated database (or
        ``database``), that this node lacks (``verify_tables.missing_here``); ``down``:
        peers found unreachable (filled in)."""
        found, listed = await verify_tables.missing_here(
            self.rep, database, nodes, {} if down is None else down, REQUEST_TIMEOUT)
        for link in listed:
            self._peer_only = {k for k in self._peer_only if (k[0], k[1]) != link}
        self._peer_only |= {(o.pair.peer, o.pair.database, o.pair.table) for o in found}
        return found

    # -- running -----------------------------------------------------------------------
    async def run(self, pairs: list[Pair], deep: bool = False, repair: bool = False,
                  dry_run: bool = False, extra: Sequence[Outcome] = (),
                  down: dict[str, str] | None = None) -> list[Outcome]:
        """Compare (and optionally repair) every pair, a few at a time; ``extra``:
        outcomes found otherwise (``peer_only``), recorded with them; ``down``: peers
        already found unreachable in this run (their pairs are not tried)."""
        down = {} if down is None else down
        start_version = self.storage.hlc.now()
        if deep:
            for db_name, table_name in sorted({(p.database, p.table) for p in pairs}):
                await self.storage.write(compare.rebuild_job(self.storage, db_name,
                                                             table_name))
        gate = asyncio.Semaphore(4)

        async def one(pair: Pair) -> Outcome:
            async with gate:
                outcome = Outcome(pair, down=down)
                if pair.peer in down:
                    outcome.in_sync = False
                    outcome.error = f"not compared: {down[pair.peer]}"
                    outcome.unreached = True  # as the pair that found it down
                    return outcome
                try:
                    await self._compare(outcome, start_version, deep, repair)
                    if repair and outcome.differences:
                        await self._repair(outcome, dry_run)
                except HarpsyncError as exc:
                    outcome.in_sync = False
                    outcome.error = exc.message
                    outcome.unreached = isinstance(exc, PeerError) and outcome.rounds == 0
                return outcome

        outcomes = list(await asyncio.gather(*(one(p) for p in pairs))) + list(extra)
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
        try:
            answer = await node_request(self.rep, pair.url, request, verify=True,
                                        present_cert=True, timeout=REQUEST_TIMEOUT,
                                        expect=pair.peer)
        except PeerError as exc:
            if unreachable(exc):
                outcome.down.setdefault(pair.peer, exc.message)
            raise
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
        copy_running = bool(peer_top.get("copying")) or copying(
            self.rep.subscribers.get((pair.peer, pair.database)), db)
        if peer_top.get("incarnation") != table.version and not copy_running:
            raise BadRequestError(f"{pair.peer} holds another incarnation of "
                                  f"'{pair.database}.{pair.table}' (created at "
                                  f"{peer_top.get('incarnation')}, here {table.version})")
        outcome.incarnation = table.version
        outcome.peer_plans = bool(peer_top.get("dry_run"))
        if peer_top.get("incarnation") == table.version and peer_top.get("top") == my_top:
            return  # equal tables cost one lookup on each side
        if copy_running:
            # Descending would read and compare every row not copied yet, over and
            # over while the copy runs, and slow the copy down; a copy still to come
            # (the link not connected yet) brings the table, or its other incarnation.
            outcome.busy = True
            raise BadRequestError(f"a full copy between this node and {pair.peer} is in "
                                  "progress (or has yet to start): verify again once it "
                                  "ends")
        items = await asyncio.to_thread(compare.all_buckets, db, table)
        leaves = await self._differing_ranges(outcome, items)
        if not leaves:
            return
        mine_by_range = await asyncio.to_thread(compare.rows_in, db, table,
                                                [(lo, hi) for lo, hi in leaves])
        by_key, theirs_by_range = (True, []) if pair.direction == PUSH else \
            await self._peer_rows(outcome, leaves)
        # Off the event loop: every row of a large table can be in the differing
        # buckets (about 1 s per million rows here, as long again in _confirm).
        candidates = await asyncio.to_thread(candidate_keys, mine_by_range, theirs_by_range,
                                             by_key)
        keys = sorted(candidates)
        # Only the candidate keys go on: both sides' rows per bucket could be millions.
        del items, mine_by_range, theirs_by_range, candidates
        if keys:
            await self._confirm(outcome, keys, int(peer_top.get("head", 0)), my_head,
                                start_version)

    async def _peer_rows(self, outcome: Outcome, leaves: list[list[Any]],
                         ) -> tuple[bool, list[list[Any]]]:
        """The peer's ``[key, digest]`` rows per leaf, asked for until complete (a peer
        answers a budget of rows at a time, and says where it stopped). Returns
        ``(by_key, rows)``: ``by_key`` when the peer lists no keys of the table."""
        out: list[list[Any]] = [[] for _ in leaves]
        pending, offset = [list(leaf) for leaf in leaves], 0
        while pending:
            answer = await self._ask(outcome, "verify_rows", ranges=pending, paged=True)
            if answer.get("by_key"):
                return True, []
            got = answer.get("rows") or []
            for j, rows in enumerate(got[:len(pending)]):
                out[offset + j].extend(rows)
            stop = answer.get("next")
            if not stop:
                return False, out
            i, key = int(stop[0]), wire_bytes(stop[1])
            if not (0 <= i < len(pending)) or i == 0 and key <= pending[0][0] \
                    and not (got and got[0]):
                raise BadRequestError(f"{outcome.pair.peer} answered verify_rows "
                                      "without going on")
            offset += i
            pending = [[key, pending[i][1]], *pending[i + 1:]]
        return False, out

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
        # This node's buckets of each range, found by bisection: scanning every bucket
        # per differing range cost O(ranges x buckets) on the event loop (a 3M-row
        # table differing in every range held the loop 6.6 s; 10M rows over a minute).
        bucket_starts = [s for s, _ in items]

        def items_in(lo: bytes, hi: bytes | None) -> list[rowhash.Bucket]:
            end = len(items) if hi is None else bisect.bisect_left(bucket_starts, hi)
            return items[bisect.bisect_left(bucket_starts, lo):end]

        in_group = [items_in(lo, hi) for lo, hi in groups]
        # The peer's hashes over this node's buckets of each range (it never lists its
        # own bucket starts, which are keys of its rows).
        subs_of = [sorted({lo} | {s for s, _ in mine_in}) for (lo, _hi), mine_in
                   in zip(groups, in_group, strict=True)]
        answer = await self._ask(outcome, "verify_buckets", ranges=[list(g) for g in groups],
                                 subs=subs_of)
        leaves: list[list[Any]] = []
        if "hashes" in answer:
            for (_lo, hi), my_items, subs, theirs_hashes in zip(
                    groups, in_group, subs_of, answer["hashes"], strict=False):
                a = rowhash.combine(my_items, subs)
                for j, sub in enumerate(subs):
                    if j >= len(theirs_hashes) or wire_bytes(theirs_hashes[j]) != a[j]:
                        leaves.append([sub, subs[j + 1] if j + 1 < len(subs) else hi])
            return leaves
        peer_lists = answer.get("buckets") or []  # a peer of an earlier release
        for (lo, hi), my_items, peer_items in zip(groups, in_group, peer_lists, strict=False):
            their_items = [(wire_bytes(s), wire_bytes(h)) for s, h in peer_items]
            subs = sorted({lo} | {s for s, _ in my_items} | {s for s, _ in their_items})
            a = rowhash.combine(my_items, subs)
            b = rowhash.combine(their_items, subs)
            for j, sub in enumerate(subs):
                if a[j] != b[j]:
                    leaves.append([sub, subs[j + 1] if j + 1 < len(subs) else hi])
        return leaves

    async def _confirm(self, outcome: Outcome, keys: list[bytes], peer_head: int,
                       my_head: int, start_version: int) -> None:
        """Read the candidates again on both sides at a common point; keep real ones.

        Only digests and versions are read (no records, even for a repair): millions
        of differences must not hold their records in memory; ``_repair`` fetches
        them a bounded chunk at a time.
        """
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
            their_limits: dict[str, Any] = {}
            while len(theirs) < len(keys):
                answer = await self._ask(outcome, "verify_keys",
                                         keys=keys[len(theirs):len(theirs) + KEY_CHUNK],
                                         records=False)
                rows = answer.get("rows") or []
                if not rows:
                    raise BadRequestError(f"{pair.peer} answered verify_keys without rows")
                theirs.extend(rows)
                peer_applied = int(answer.get("applied", 0))
                if isinstance(answer.get("limits"), dict):  # older peers send none
                    their_limits = answer["limits"]
            db, table = self._same_table(outcome)
            mine = await asyncio.to_thread(compare.read_rows, db, table, keys, False)
            self._same_table(outcome)  # the rows read were of the compared incarnation
            there_caught = pair.direction == PULL or peer_applied >= my_head
            found = await asyncio.to_thread(real_differences, pair, keys, mine, theirs,
                                            start_version, limits, their_limits)
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
        """Bring each differing key to its winner on the side that lacks it.

        The comparison kept only digests and versions: the records are read a chunk
        at a time (at most ``REPAIR_CHUNK`` rows and about ``answer_budget`` bytes,
        from the peer by ``verify_keys``, here from this node's store), and each
        chunk is stored (one job here, one ``verify_repair`` there) before the next
        is read, so a repair of millions of rows holds one chunk of records at once.
        A row that changed since it was compared is left (replication, or the next
        verify, takes it): its new version was not checked against the direction
        and origin limits the comparison applied.
        """
        pair = outcome.pair
        incarnation = outcome.incarnation
        if incarnation is None:
            return  # nothing was compared
        self._same_table(outcome)  # not re-created here since: fetch nothing for it
        here = [(k, t) for k, _m, t, side in outcome.differences if side < 0 and t]
        there = [(k, m) for k, m, _t, side in outcome.differences if side > 0 and m]
        mine: dict[str, list[Any]] = {}
        theirs: dict[str, list[Any]] = {"changed": [decode_id(k) for k, _ in there]}
        if here:
            # This node's conflict policies hold as for the same rows replicated in (a
            # dry run decides the same, writing nothing).
            review = self.rep.review(pair.peer, pair.database)
            try:
                async for chunk in self._peer_records(outcome, here):
                    # A job per chunk: each logs at most one chunk of rows per origin
                    # (one entry for all could be too large to send on, or for this
                    # node's own rows to log at all).
                    done = await self.storage.write(compare.repair_job(
                        self.storage, pair.database, pair.table, incarnation, chunk,
                        review, dry_run))
                    for name in compare.REPAIR_LISTS:
                        mine.setdefault(name, []).extend(done.get(name) or [])
            finally:
                self.rep.note_review(pair.peer, pair.database, review)
        if there and (not dry_run or outcome.peer_plans):
            theirs = {}
            async for chunk in self._own_records(outcome, there):
                answer = await self._ask(outcome, "verify_repair", incarnation=incarnation,
                                         rows=[[k, row] for k, row in chunk],
                                         dry_run=dry_run)
                for name in compare.REPAIR_LISTS:
                    theirs.setdefault(name, []).extend(answer.get(name) or [])
        outcome.repaired = not dry_run
        for name in compare.REPAIR_LISTS:
            getattr(outcome, name).update({self.rep.node_name: mine.get(name) or [],
                                           pair.peer: theirs.get(name) or []})

    async def _peer_records(self, outcome: Outcome,
                            wanted: list[tuple[bytes, list[Any]]],
                            ) -> AsyncIterator[list[tuple[bytes, list[Any]]]]:
        """The peer's rows of ``wanted`` with their records, a chunk at a time (as
        compared; a live row comes with its record only from a peer that publishes
        the table to this node: without one there is nothing to store)."""
        pos = 0
        while pos < len(wanted):
            part = wanted[pos:pos + REPAIR_CHUNK]
            # The peer answers with at most answer_budget bytes of records: the rest
            # are asked for next time round.
            answer = await self._ask(outcome, "verify_keys", keys=[k for k, _ in part],
                                     records=True)
            rows = answer.get("rows") or []
            if not rows:
                raise BadRequestError(f"{outcome.pair.peer} answered verify_keys without "
                                      "rows")
            pos += min(len(rows), len(part))
            chunk = [(k, list(row)) for (k, was), row in zip(part, rows, strict=False)
                     if unchanged(was, row) and (row[3] or isinstance(row[4], dict))]
            if chunk:
                yield chunk

    async def _own_records(self, outcome: Outcome,
                           wanted: list[tuple[bytes, list[Any]]],
                           ) -> AsyncIterator[list[tuple[bytes, list[Any]]]]:
        """This node's rows of ``wanted`` with their records, a chunk at a time."""
        pos = 0
        while pos < len(wanted):
            part = wanted[pos:pos + REPAIR_CHUNK]
            db, table = self._same_table(outcome)
            rows = await asyncio.to_thread(compare.read_rows, db, table,
                                           [k for k, _ in part], True, answer_budget())
            self._same_table(outcome)  # the rows read were of the compared incarnation
            pos += len(rows)
            chunk = [(k, row) for (k, was), row in zip(part, rows, strict=False)
                     if row is not None and unchanged(was, row)]
            if chunk:
                yield chunk

    # -- results -----------------------------------------------------------------------
    def _record(self, outcomes: list[Outcome]) -> None:
        """Keep each link's last result (``cluster_status``) and export the metrics."""
        now = time.time()
        self.last_run = now
        links: set[tuple[str, str]] = set()
        for o in outcomes:
            if o.busy or o.unreached:
                # Not compared (a copy under way; the peer not reached): the link keeps
                # its last result. Before, an unreachable peer's link read in_sync:
                # false with 0 differences until the next background verify.
                continue
            p = o.pair
            key = (p.peer, p.database, p.table)
            links.add((p.peer, p.database))
            if o.error is not None and not o.differences:
                # Nothing was compared (the peer unreachable, a refusal): out of sync,
                # and the differences last counted stand (0 would say they are gone).
                self._tables[key] = (False, self._tables.get(key, (False, 0))[1])
                continue
            left = o.remaining()
            self._tables[key] = (o.error is None and not left, left)
            if not o.missing_here:
                self.rep.metrics.set_divergent(p.peer, p.database, p.table, left)
        for peer, database in links:
            db = self.storage.databases.get(database)
            tables = db.tables if db is not None else {}
            results = [r for (pp, dd, t), r in list(self._tables.items())
                       if pp == peer and dd == database
                       and (t in tables or (pp, dd, t) in self._peer_only)]
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
                await self.check()
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
                    outcomes = await self.check(database=database, nodes=[peer])
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


__all__ = ["BOTH", "PULL", "PUSH", "Outcome", "Pair", "Verifier", "peer_handlers"]
