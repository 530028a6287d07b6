"""One outbound replication socket: pulling one database from one peer.

Batches are applied in one writer transaction together with the cursor for this peer
and database, so a crash can neither lose nor double-apply a batch. Several queued
batches share one transaction. The receive loop stops reading while the apply queue is
full, which pushes back on the publisher through TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harpsync.replication import peers
from harpsync.replication.messages import ProtocolError
from harpsync.replication.protocol import (
    CaughtUp,
    CopyBegan,
    CopyEnded,
    CopyRows,
    EntriesReceived,
    OperationCompleted,
    OperationRequested,
    PeerFailed,
    PeerHello,
    ProtocolFailed,
    ResyncRequired,
    SubscriberSession,
)
from harpsync.replication.transport import DIAL_ERRORS, Link, dial
from harpsync.security import describe_tls_error
from harpsync.storage import ingest
from harpsync.storage.hlc import wall_ms_of

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

log = logging.getLogger(__name__)

QUEUE_LIMIT = 64
APPLY_GROUP = 16
MAX_BACKOFF = 30.0


@dataclass
class _Work:
    kind: str  # "entries", "rows", "copy_end"
    payload: Any
    origins: dict[int, str]


def describe_error(exc: BaseException) -> str:
    """A short, secret-free cause for ``last_error`` and ``add_node`` errors."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    tls = describe_tls_error(exc)
    if tls is not None:
        return tls
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:200]


class Subscriber:
    """The receiving side of one (peer, database) link, reconnecting with backoff."""

    def __init__(self, rep: Replicator, peer: str, database: str) -> None:
        self.rep = rep
        self.peer = peer
        self.database = database
        self.state = "connecting"
        self.link: Link | None = None
        self.last_error: str | None = None
        self.received_seq = 0
        self.committed_seq = 0
        self.acked_seq = 0
        self.head_seq = 0
        self.caught_up_seq = 0
        self.bytes_received = 0
        self.txns_received = 0
        self.last_version = 0
        self.last_received_local: float | None = None
        self.last_commit_confirmed: float | None = None
        self.latency_ms: float | None = None
        self.copy_progress: dict[str, int] | None = None
        self.paused = False
        self.replay_floor = 0
        self.copy_snapshot = 0
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(QUEUE_LIMIT)
        self._session: SubscriberSession | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sub-{self.peer}-{self.database}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._task = None

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.open and self.state != "connecting"

    async def _run(self) -> None:
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except (*DIAL_ERRORS, ProtocolError, ValueError, RuntimeError) as exc:
                self.last_error = describe_error(exc)
                log.debug("link %s/%s: %s", self.peer, self.database, self.last_error)
            except Exception as exc:
                self.last_error = describe_error(exc)
                log.exception("link %s/%s failed", self.peer, self.database)
            finally:
                link, self.link = self.link, None
                if link is not None:
                    link.abort()
                if self.state not in ("resync_required", "paused"):
                    self.state = "connecting"
            if time.monotonic() - started > 10:
                delay = 0.1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, MAX_BACKOFF)

    async def _flush(self) -> None:
        assert self._session is not None and self.link is not None
        for frame in self._session.data_to_send():
            await self.link.send(frame)

    async def _connect_once(self) -> None:
        row = self.rep.rows.get(self.peer)
        if row is None or not row.get("url"):
            raise RuntimeError(f"no URL known for node {self.peer}")
        db = self.rep.storage.databases.get(self.database)
        if db is None:
            raise RuntimeError(f"database {self.database} is gone")
        self.link = await dial(row["url"], "/" + self.database,
                               self.rep.keys.client_context(verify=True, peer_name=self.peer),
                               self.rep.ping_interval)
        # The server must be this peer (its pinned key), not any node whose CA we trust.
        refused = self.rep.check_peer(self.peer, self.link)
        if refused is not None:
            raise RuntimeError(refused)
        self._queue = asyncio.Queue(QUEUE_LIMIT)  # nothing from an earlier session survives
        session = self._session = SubscriberSession(
            self.rep.node_name, self.database, self.rep.table_definitions(db),
            dict(db.origin_names))
        session.start()
        await self._flush()
        # Receiving and applying run side by side; whichever fails first ends the
        # session (the receiver may be blocked on a full queue when the applier dies).
        tasks = [asyncio.create_task(self._receive_loop(session)),
                 asyncio.create_task(self._apply_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _receive_loop(self, session: SubscriberSession) -> None:
        assert self.link is not None
        while True:
            data = await self.link.recv()
            self.bytes_received += len(data)
            session.receive(data)
            for event in session.events_received():
                await self._handle(event)
            await self._flush()

    async def _subscribe(self, copy: bool, resync: bool = False) -> None:
        assert self._session is not None
        db = self.rep.storage.databases[self.database]
        cursor = db.cursor(self.peer)
        # After resync_required an interrupted copy's resume point is stale too.
        resume = None if resync else cursor.get("copy")
        if resume:
            copy = True
        elif not cursor:
            copy = True  # a new pairing starts with a full copy, then streams
        row = self.rep.rows.get(self.peer, {})
        tables = peers.subscribe_tables(row, self.database)
        after = int(cursor.get("seq", 0))
        self.received_seq = self.committed_seq = self.acked_seq = after
        self._session.subscribe(after_seq=after, origins=None,
                                tables=None if tables is None else list(tables or []),
                                copy=copy, copy_resume=resume or None)
        self.state = "copying" if copy else "streaming"

    async def _handle(self, event: Any) -> None:
        if isinstance(event, PeerHello):
            if event.node != self.peer:
                raise ProtocolError(f"peer says it is {event.node}, expected {self.peer}")
            names = event.tables.get("__databases__", {}).get("names", []) \
                if self.database == "system" else []
            if names:
                await self.rep.storage.ensure_databases(list(names))
            await self.rep.storage.ensure_tables(
                self.database, {k: v for k, v in event.tables.items() if k != "__databases__"})
            await self._subscribe(copy=False)
        elif isinstance(event, EntriesReceived):
            self.head_seq = max(self.head_seq, event.head_seq)
            self.received_seq = event.entries[-1][0] if event.entries else self.received_seq
            self.last_received_local = time.time()
            await self._queue.put(_Work("entries", event.entries, dict(self._session.peer_origins)))
        elif isinstance(event, CaughtUp):
            self.caught_up_seq = event.seq
            self.head_seq = max(self.head_seq, event.seq)
            await self._queue.put(_Work("caught_up", event.seq, {}))
        elif isinstance(event, CopyBegan):
            self.state = "copying"
            self.copy_snapshot = event.snapshot_seq
            self.copy_progress = {"records_copied": 0, "records_total": event.total}
            self.head_seq = max(self.head_seq, event.snapshot_seq)
        elif isinstance(event, CopyRows):
            await self._queue.put(_Work("rows", (event.table, event.rows),
                                        dict(self._session.peer_origins)))
        elif isinstance(event, CopyEnded):
            await self._queue.put(_Work("copy_end", event.snapshot_seq, {}))
        elif isinstance(event, ResyncRequired):
            self.state = "resync_required"
            self.last_error = f"resync required: {event.reason}"
            await self._subscribe(copy=True, resync=True)
        elif isinstance(event, OperationRequested):
            assert self._session is not None
            result, error = await self.rep.peer_operation(self.peer, event.body)
            self._session.respond_operation(event.id, result, error)
        elif isinstance(event, OperationCompleted):
            self.rep.operation_completed(event)
        elif isinstance(event, ProtocolFailed | PeerFailed):
            raise ProtocolError(str(event))

    # -- applying ----------------------------------------------------------------------
    async def _apply_loop(self) -> None:
        storage = self.rep.storage
        while True:
            work = [await self._queue.get()]
            # Several queued batches share one transaction, but not too many: a long
            # apply keeps the receiver from reading (and from answering pings).
            while len(work) < APPLY_GROUP and not self._queue.empty() \
                    and work[-1].kind == "entries" \
                    and self._queue._queue[0].kind == "entries":  # type: ignore[attr-defined]
                work.append(self._queue.get_nowait())
            first = work[0]
            if first.kind == "entries":
                await self._apply_entries(work)
            elif first.kind == "rows":
                await self._apply_rows(first)
            elif first.kind == "caught_up":
                await self._advance(int(first.payload))
            else:
                snapshot = int(first.payload)
                db = storage.databases[self.database]
                await storage.write(lambda ctx, s=snapshot, d=db: ingest.write_cursor(
                    ctx, d, self.peer, {"seq": s}))
                self.committed_seq = snapshot
                self.received_seq = max(self.received_seq, snapshot)
                self.copy_progress = None
                self.state = "streaming"
                self._ack(snapshot)
            await self._flush()

    async def _advance(self, seq: int) -> None:
        """The publisher's log is read through ``seq`` and everything before it was
        applied; entries filtered out on its side need no apply, so the cursor moves
        past them (durably, before the ack that lets the publisher prune them)."""
        self.replay_floor = 0  # a replay ends once it has read the whole log
        if seq <= self.committed_seq or self.state == "copying":
            return
        db = self.rep.storage.databases[self.database]
        await self.rep.storage.write(lambda ctx: ingest.write_cursor(
            ctx, db, self.peer, {"seq": seq}))
        self.committed_seq = seq
        self.received_seq = max(self.received_seq, seq)
        self._ack(seq)

    def _ack(self, seq: int) -> None:
        if self._session is not None and self._session.ack(seq):
            self.acked_seq = seq
            self.last_commit_confirmed = time.time()

    async def _apply_entries(self, work: list[_Work]) -> None:
        entries = [e for w in work for e in w.payload]
        origins: dict[int, str] = {}
        for w in work:
            origins.update(w.origins)
        last_seq = entries[-1][0]
        floor = max(self.rep.start_floor(self.peer), self.replay_floor)
        job, prepare = ingest.apply_entries_job(
            self.rep.storage, self.database, self.peer, entries, origins, {"seq": last_seq},
            self.rep.max_skew_ms, self.rep.node_name, floor)
        stats = await self.rep.storage.write(job, prepare)
        self.committed_seq = last_seq
        self.txns_received += stats.entries
        if stats.last_version:
            self.last_version = stats.last_version
        if stats.skewed:
            self.rep.note_skew(self.peer, stats.skewed)
        self.rep.note_received(self.peer, self.database, stats.entries,
                               sum(len(e[1]) for e in entries))
        self._ack(last_seq)

    async def _apply_rows(self, work: _Work) -> None:
        table, rows = work.payload
        tombs = table.endswith("\x00")
        table = table.rstrip("\x00")
        db = self.rep.storage.databases[self.database]
        old = db.cursor(self.peer)
        copy_state = {"table": table, "key": rows[-1][0], "tombs": tombs,
                      "snapshot": self.copy_snapshot}
        cursor = {"seq": int(old.get("seq", 0)), "copy": copy_state}
        job = ingest.apply_rows_job(self.rep.storage, self.database, self.peer, table, rows,
                                    work.origins, cursor, self.rep.start_floor(self.peer))
        await self.rep.storage.write(job)
        if self.database == "system":  # copied rows add no log entry: tell the login cache
            self.rep.auth.forget_logins()
        if self.copy_progress is not None:
            self.copy_progress["records_copied"] += len(rows)

    # -- status ------------------------------------------------------------------------
    def lag_txns(self) -> int:
        applied = self.committed_seq
        if self._queue.empty() and self.caught_up_seq >= self.received_seq:
            applied = max(applied, self.caught_up_seq)
        return max(0, self.head_seq - applied)

    def lag_ms(self) -> float:
        if self.lag_txns() == 0 or not self.last_version:
            return 0.0
        return max(0.0, time.time() * 1000 - wall_ms_of(self.last_version))
