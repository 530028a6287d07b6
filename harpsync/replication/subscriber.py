"""One outbound replication socket: pulling one database from one peer.

Batches are applied in one writer transaction together with the cursor for this peer
and database, so a crash can neither lose nor double-apply a batch. Several queued
batches share one transaction. The receive loop stops reading while the apply queue is
full, which pushes back on the publisher through TCP.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harpsync.errors import HarpsyncError
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
from harpsync.replication.reconnect import (
    DIAL_TIMEOUT,
    GATED_RETRY,
    backoff_delay,
    describe_error,
    end_tasks,
)
from harpsync.replication.transport import DIAL_ERRORS, Link, dial
from harpsync.storage import deadletters, ingest, schema
from harpsync.storage.hlc import ClockSkewError, wall_ms_of

if TYPE_CHECKING:
    from harpsync.replication.seams import SubscriberHost

log = logging.getLogger(__name__)

QUEUE_LIMIT = 64
APPLY_GROUP = 16
# A busy stream (entries arrived while the last apply was committing) gathers entries
# for up to this long after the last commit began, so the peer makes a few synced
# commits a second instead of one per commit on the origin: on a shared disk each of
# its fsyncs costs the origin's writer as much as one of its own. A quiet link (one
# write at a time) commits each batch at once, so an isolated write is not delayed.
BUSY_GATHER = 0.02
BUSY_GROUP = 48
# Whatever the mode, one apply transaction takes at most about this many entries (as
# many as APPLY_GROUP full batches), so a gathered group is never a longer apply.
APPLY_ENTRIES = 16_000
# A change for a table still unknown after this many attempts, the first this many
# seconds ago (each attempt reconnects for a fresh hello), becomes a dead letter.
UNKNOWN_ATTEMPTS = 4
UNKNOWN_SECONDS = 2.0


def unappliable(exc: BaseException) -> bool:
    """Whether applying a change failed because of the change itself (it goes to the
    dead letters) rather than the link or the node (the link retries). Held-back
    versions (clock skew) and a peer still serving a dropped incarnation wait."""
    if isinstance(exc, ClockSkewError | schema.DroppedIncarnationError):
        return False
    return isinstance(exc, ValueError | HarpsyncError | OverflowError | TypeError | KeyError
                      | IndexError | AttributeError)


class LinkState(enum.StrEnum):
    """What a link is doing, as ``cluster_status`` shows it (a ``str``: compares and
    serializes as its value)."""

    CONNECTING = "connecting"
    STREAMING = "streaming"
    COPYING = "copying"
    RESYNC_REQUIRED = "resync_required"
    CLOCK_SKEW = "clock_skew"
    PAUSED = "paused"


# Failures after which a link retries with backoff (anything else is logged as a bug).
_RETRIED: tuple[type[BaseException], ...] = (*DIAL_ERRORS, ProtocolError, ValueError,
                                             RuntimeError)


@dataclass
class _Work:
    kind: str  # "entries", "rows", "copy_end"
    payload: Any
    origins: dict[int, str]


class _WorkQueue(asyncio.Queue[_Work]):
    """The apply queue, which the applier may look into without taking from it."""

    def pending(self) -> list[_Work]:
        """The queued work, oldest first (a copy)."""
        return list(self._queue)  # type: ignore[attr-defined]  # asyncio.Queue's deque

    def peek(self) -> _Work | None:
        """The oldest queued work, left in the queue (None when empty)."""
        return self._queue[0] if self._queue else None  # type: ignore[attr-defined]


class Subscriber:
    """The receiving side of one (peer, database) link, reconnecting with backoff."""

    def __init__(self, rep: SubscriberHost, peer: str, database: str) -> None:
        self.rep = rep
        self.peer = peer
        self.database = database
        self.state = LinkState.CONNECTING
        self.link: Link | None = None
        self._last_error: str | None = None
        self.last_error_at: float | None = None
        self.failures = 0
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
        self.checkpoint_at: float | None = None  # when the cursor last committed
        self.error_times: deque[float] = deque(maxlen=1000)
        # Failed attempts at one change (publisher sequence, or copy chunk): count, first.
        self._attempts: dict[Any, tuple[int, float]] = {}
        self.paused = False
        self.retired = False
        self.replay_floor = 0
        # Set by replay_replication: send everything again, whatever this node holds.
        self.replaying = False
        self.copy_snapshot = 0
        self._task: asyncio.Task[None] | None = None
        self._queue = _WorkQueue(QUEUE_LIMIT)
        self._session: SubscriberSession | None = None
        self.peer_tables: dict[str, Any] = {}  # the peer's schema, from its hello
        # Writer jobs submitted and not yet finished: cancelling the task that awaits
        # one does not stop it in the writer thread, so ``stop`` waits for them.
        self._inflight: set[asyncio.Future[Any]] = set()
        self._covered: list[str] = [peer]

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        # Timestamped, so a link that recovered shows when its last error was.
        self._last_error = value
        self.last_error_at = time.time() if value is not None else None
        if value is not None:
            self.error_times.append(self.last_error_at)  # type: ignore[arg-type]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Run the link (once: a running or retired link is left as it is)."""
        if self.retired or (self._task is not None and not self._task.done()):
            return
        # A fresh context: a link outlives the request that started it, and its log
        # lines must not carry that request's id.
        self._task = asyncio.create_task(self._run(), name=f"sub-{self.peer}-{self.database}",
                                         context=contextvars.Context())

    async def retire(self) -> None:
        """Stop for good: the link was removed, and nothing (a relay hand-over, a
        restart) may start it again."""
        self.retired = True
        await self.stop()

    async def stop(self) -> None:
        """Stop the link and wait until no write of it is left in the writer: after
        this returns, nothing of this link (cursor included) will be written."""
        if self._task is not None:
            await end_tasks([self._task])
        self._task = None
        await self.settle()

    def hold(self) -> None:
        """Keep a new link paused (it was paused before a restart): it does not start."""
        self.paused, self.state = True, LinkState.PAUSED

    async def pause(self) -> None:
        """Stop receiving; the committed cursor is kept."""
        self.paused = True  # first: a relay hand-over restarts only unpaused links
        await self.stop()
        self.state = LinkState.PAUSED

    def resume(self) -> None:
        """Run again from the committed cursor (a link that is not paused runs on)."""
        if self.paused:
            self.paused, self.state = False, LinkState.CONNECTING
            self.start()

    async def rewind(self, seq: int, from_version: int) -> None:
        """Stream again from publisher sequence ``seq``, skipping versions at or below
        ``from_version`` (0: none) until the log is read to its end; applying twice is
        harmless. The link runs again afterwards, whatever happened."""
        self.paused = True  # held while the cursor is rewound (no restart meanwhile)
        await self.stop()
        try:
            db = self.rep.storage.databases[self.database]
            await self.rep.storage.write(functools.partial(
                ingest.write_cursor, db=db, peer=self.peer, cursor={"seq": seq}))
            self.replay_floor = from_version
            self.replaying = True
        finally:
            self.paused, self.state = False, LinkState.CONNECTING
            self.start()

    async def _write(self, job: Any, prepare: Any = None) -> Any:
        """``storage.write`` that ``stop`` can wait for, even if this task is cancelled."""
        future = asyncio.ensure_future(self.rep.storage.write(job, prepare))
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        started = time.perf_counter()
        future.add_done_callback(lambda _f: self.rep.metrics.apply_seconds.labels(
            self.peer, self.database).observe(time.perf_counter() - started))
        return await asyncio.shield(future)

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.open and self.state != LinkState.CONNECTING

    async def _run(self) -> None:
        gate = self.rep.peer_gate(self.peer)
        probe = self.database == "system"
        while True:
            started = time.monotonic()
            unreachable = False
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except _RETRIED as exc:
                self.last_error = describe_error(exc)
                unreachable = self.link is None and isinstance(exc, DIAL_ERRORS)
                log.debug("link %s/%s: %s", self.peer, self.database, self.last_error)
            except Exception as exc:
                self.last_error = describe_error(exc)
                log.exception("link %s/%s failed", self.peer, self.database)
            finally:
                link, self.link = self.link, None
                if link is not None:
                    link.abort()
                if self.state not in (LinkState.RESYNC_REQUIRED, LinkState.PAUSED,
                                      LinkState.CLOCK_SKEW):
                    self.state = LinkState.CONNECTING
            if time.monotonic() - started > 10:
                self.failures = 0  # the link worked for a while: retry promptly
            self.failures += 1
            if unreachable and probe:
                gate.mark_down()
            if unreachable and not probe and not gate.reachable.is_set() \
                    and await gate.wait_up(GATED_RETRY):
                self.failures = 1  # the probe got through: follow it promptly
            await asyncio.sleep(backoff_delay(self.failures))

    async def _flush(self) -> None:
        assert self._session is not None and self.link is not None
        for frame in self._session.data_to_send():
            await self.link.send(frame)

    async def _connect_once(self) -> None:
        row = self.rep.peer_row(self.peer)
        if row is None or not row.get("url"):
            raise RuntimeError(f"no URL known for node {self.peer}")
        db = self.rep.storage.databases.get(self.database)
        if db is None:
            raise RuntimeError(f"database {self.database} is gone")
        self.link = await dial(row["url"], "/" + self.database,
                               self.rep.keys.client_context(verify=True, peer_name=self.peer),
                               self.rep.ping_interval, timeout=DIAL_TIMEOUT)
        self.rep.peer_gate(self.peer).mark_up()
        self.rep.note_dialed(self.peer, self.database)
        # The server must be this peer (its pinned key), not any node whose CA we trust.
        refused = self.rep.check_peer(self.peer, self.link)
        if refused is not None:
            raise RuntimeError(refused)
        self._queue = _WorkQueue(QUEUE_LIMIT)  # nothing from an earlier session survives
        session = self._session = SubscriberSession(
            self.rep.node_name, self.database, self.rep.table_definitions(db),
            dict(db.origin_names), compression=self.rep.offers_compression(row["url"]))
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
            await end_tasks(tasks)

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
        row = (self.rep.peer_row(self.peer) or {})
        tables = peers.subscribe_tables(row, self.database)
        after = int(cursor.get("seq", 0))
        # One copy per link: this peer's own transactions, plus the origins it relays
        # for us, each above the newest version already held (from any path).
        await self.rep.relays.release(self.peer, self.database)
        covered = self.rep.relays.covered(self.peer, self.database)
        self._covered = sorted(covered)
        if cursor and not copy and "origins" in cursor \
                and not covered <= set(cursor["origins"]):
            after = 0  # a newly relayed origin: read the log again, above its floor
        floors = {name: None if self.replaying else db.origin_hw.get(name)
                  for name in covered}
        self.received_seq = self.committed_seq = self.acked_seq = after
        self._session.subscribe(after_seq=after, origins=floors,
                                tables=None if tables is None else list(tables or []),
                                copy=copy, copy_resume=resume or None)
        self.state = LinkState.COPYING if copy else LinkState.STREAMING

    async def _handle(self, event: Any) -> None:
        assert self._session is not None  # events come from the session
        if isinstance(event, PeerHello):
            if event.node != self.peer:
                raise ProtocolError(f"peer says it is {event.node}, expected {self.peer}")
            self.peer_tables = dict(event.tables)
            await schema.apply_hello(self.rep.storage, self.database, event.tables, self.peer)
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
            self.state = LinkState.COPYING
            self.copy_snapshot = event.snapshot_seq
            self.copy_progress = {"records_copied": 0, "records_total": event.total}
            self.head_seq = max(self.head_seq, event.snapshot_seq)
        elif isinstance(event, CopyRows):
            await self._queue.put(_Work("rows", (event.table, event.rows),
                                        dict(self._session.peer_origins)))
        elif isinstance(event, CopyEnded):
            await self._queue.put(_Work("copy_end", event.snapshot_seq, {}))
        elif isinstance(event, ResyncRequired):
            self.state = LinkState.RESYNC_REQUIRED
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
        busy = False
        last_commit = 0.0
        while True:
            work = [await self._queue.get()]
            if busy and work[0].kind == "entries":
                delay = last_commit + BUSY_GATHER - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            # Several queued batches share one transaction, but not too many: a long
            # apply keeps the receiver from reading (and from answering pings). The
            # caught_up reports between them are absorbed: they only move the cursor.
            limit = BUSY_GROUP if busy else APPLY_GROUP
            batches = 1
            size = len(work[0].payload) if work[0].kind == "entries" else 0
            while work[0].kind == "entries" and batches < limit and size < APPLY_ENTRIES:
                following = self._queue.peek()
                if following is None or following.kind not in ("entries", "caught_up"):
                    break
                item = self._queue.get_nowait()
                work.append(item)
                if item.kind == "entries":
                    batches += 1
                    size += len(item.payload)
            first = work[0]
            if first.kind == "entries":
                last_commit = time.monotonic()
                entries = [w for w in work if w.kind == "entries"]
                caught = [int(w.payload) for w in work if w.kind == "caught_up"]
                await self._apply_entries(entries)
                if caught:
                    await self._advance(max(caught))
                # Entries that arrived during the commit: the stream is busy.
                busy = any(w.kind == "entries" for w in self._queue.pending())
            elif first.kind == "rows":
                await self._apply_rows(first)
            elif first.kind == "caught_up":
                await self._advance(int(first.payload))
            else:
                snapshot = int(first.payload)
                db = storage.databases[self.database]
                await self._write(lambda ctx, s=snapshot, d=db: ingest.write_cursor(
                    ctx, d, self.peer, self._cursor(s)))
                self.committed_seq = snapshot
                self.checkpoint_at = time.time()
                self.received_seq = max(self.received_seq, snapshot)
                self.copy_progress = None
                self.state = LinkState.STREAMING
                self._ack(snapshot)
                for listener in list(self.rep.copy_listeners):
                    listener(self.peer, self.database)
            await self._flush()

    async def _advance(self, seq: int) -> None:
        """The publisher's log is read through ``seq`` and everything before it was
        applied; entries filtered out on its side need no apply, so the cursor moves
        past them (durably, before the ack that lets the publisher prune them)."""
        self.replay_floor = 0  # a replay ends once it has read the whole log
        self.replaying = False
        if seq <= self.committed_seq or self.state == LinkState.COPYING:
            return
        db = self.rep.storage.databases[self.database]
        await self._write(lambda ctx: ingest.write_cursor(ctx, db, self.peer,
                                                         self._cursor(seq)))
        self.committed_seq = seq
        self.checkpoint_at = time.time()
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
        try:
            await self._apply_batch(entries, origins)
        except Exception as exc:
            if not unappliable(exc):
                raise
            # One change of the batch cannot be applied: apply them one by one, and
            # move the bad one to the dead letters instead of failing forever.
            for entry in entries:
                if entry[0] > self.committed_seq:
                    await self._apply_or_dead_letter(entry, origins)

    def _give_up(self, key: Any, exc: BaseException) -> bool:
        """Whether a change that failed with ``exc`` goes to the dead letters now: at
        once when it cannot be applied as it is, after retries when its table is not
        known yet (a fresh hello may bring it)."""
        if not isinstance(exc, schema.UnknownTableError):
            return True
        count, first = self._attempts.get(key, (0, time.monotonic()))
        self._attempts[key] = (count + 1, first)
        return count + 1 >= UNKNOWN_ATTEMPTS and time.monotonic() - first >= UNKNOWN_SECONDS

    async def _apply_or_dead_letter(self, entry: tuple[int, bytes],
                                    origins: dict[int, str]) -> None:
        seq = entry[0]
        try:
            await self._apply_batch([entry], origins)
            self._attempts.pop(seq, None)
            return
        except Exception as exc:
            if not unappliable(exc) or not self._give_up(seq, exc):
                raise
            error = describe_error(exc)
        letters = deadletters.entry_letters(self.peer, self.database, [entry], origins, error)
        await self._write(deadletters.record_job(self.rep.storage, self.database, self.peer,
                                                 letters, self._cursor(seq)))
        self._attempts.pop(seq, None)
        self.committed_seq = max(self.committed_seq, seq)
        self.checkpoint_at = time.time()
        self.last_error = f"dead letter: {error}"
        self.rep.note_dead_letters(self.peer, self.database, len(letters))
        self._ack(seq)

    async def _apply_batch(self, entries: list[tuple[int, bytes]],
                           origins: dict[int, str]) -> None:
        last_seq = entries[-1][0]
        floor = max(self.rep.start_floor(self.peer), self.replay_floor)
        review = self.rep.review(self.peer, self.database)
        job, prepare = ingest.apply_entries_job(
            self.rep.storage, self.database, self.peer, entries, origins, self._cursor(last_seq),
            self.rep.max_skew_ms, self.rep.node_name, floor, review)
        stats = await self._write(job, prepare)
        while stats.resume_seq is not None:  # a database re-created after its drop
            rest = [e for e in entries if e[0] >= stats.resume_seq]
            job, prepare = ingest.apply_entries_job(
                self.rep.storage, self.database, self.peer, rest, origins,
                self._cursor(last_seq), self.rep.max_skew_ms, self.rep.node_name, floor,
                review)
            more = await self._write(job, prepare)
            more.entries += stats.entries
            more.skewed += stats.skewed
            stats = more
        committed = last_seq if stats.cursor_seq is None else stats.cursor_seq
        self.committed_seq = max(self.committed_seq, committed)
        self.checkpoint_at = time.time()
        self.rep.note_review(self.peer, self.database, review)
        self.txns_received += stats.entries
        if stats.last_version:
            self.last_version = stats.last_version
        self.rep.note_received(self.peer, self.database, stats.entries,
                               sum(len(e[1]) for e in entries))
        self._ack(committed)
        if stats.skew_error is not None:
            self.rep.note_skew(self.peer, stats.skewed)
            self.state = LinkState.CLOCK_SKEW
            raise stats.skew_error

    async def _apply_rows(self, work: _Work) -> None:
        table, rows = work.payload
        tombs = table.endswith("\x00")
        table = table.rstrip("\x00")
        db = self.rep.storage.databases[self.database]
        old = db.cursor(self.peer)
        copy_state = {"table": table, "key": rows[-1][0], "tombs": tombs,
                      "snapshot": self.copy_snapshot}
        cursor = {**self._cursor(int(old.get("seq", 0))), "copy": copy_state}
        definition = self.peer_tables.get(table)
        incarnation = definition.get("version") if isinstance(definition, dict) else None
        incarnation = incarnation if isinstance(incarnation, int) else None
        review = self.rep.review(self.peer, self.database)
        job = ingest.apply_rows_job(self.rep.storage, self.database, self.peer, table, rows,
                                    work.origins, cursor, self.rep.start_floor(self.peer),
                                    incarnation, review)
        try:
            await self._write(job)
            self._attempts.pop((table, rows[0][0]), None)
        except ClockSkewError:
            self.rep.note_skew(self.peer, 1)
            self.state = LinkState.CLOCK_SKEW
            raise
        except Exception as exc:
            if not unappliable(exc) or not self._give_up((table, rows[0][0]), exc):
                raise
            # The chunk cannot be applied: its rows go to the dead letters, the copy
            # goes on after them.
            error = describe_error(exc)
            letters = deadletters.row_letters(self.peer, self.database, table, rows,
                                              work.origins, incarnation, error)
            await self._write(deadletters.record_job(self.rep.storage, self.database,
                                                     self.peer, letters, cursor))
            self._attempts.pop((table, rows[0][0]), None)
            self.last_error = f"dead letter: {error}"
            self.rep.note_dead_letters(self.peer, self.database, len(letters))
        self.rep.note_review(self.peer, self.database, review)
        if self.database == "system":  # users or roles may have changed: tell the login cache
            self.rep.auth.forget_logins()
        if self.copy_progress is not None:
            self.copy_progress["records_copied"] += len(rows)

    @property
    def session(self) -> SubscriberSession | None:
        """The current session (for status: negotiated compression and its ratio)."""
        return self._session

    def _cursor(self, seq: int) -> dict[str, Any]:
        """The cursor to commit: the publisher sequence and the origins it covers."""
        return {"seq": seq, "origins": list(self._covered)}

    # -- relays (see relays.py) --------------------------------------------------------
    @property
    def reachable(self) -> bool:
        """The socket is open (it may still be saying hello)."""
        return self.link is not None and self.link.open

    @property
    def streaming(self) -> bool:
        return self.connected and self.state in (LinkState.STREAMING, LinkState.COPYING)

    def origin_names(self) -> list[str]:
        """Origin names the peer announced for this database."""
        session = self._session
        return list(session.peer_origins.values()) if session is not None else []

    async def settle(self) -> None:
        """Wait until no write of this link is left in the writer."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def restart(self) -> None:
        """Reconnect (to subscribe again with new origins), unless paused."""
        await self.stop()
        if not self.paused:
            self.start()  # a no-op once retired

    # -- status ------------------------------------------------------------------------
    def backlog(self) -> int:
        """Batches received and not applied yet (the apply queue holds QUEUE_LIMIT)."""
        return self._queue.qsize()

    def lag_txns(self) -> int:
        applied = self.committed_seq
        if self._queue.empty() and self.caught_up_seq >= self.received_seq:
            applied = max(applied, self.caught_up_seq)
        return max(0, self.head_seq - applied)

    def lag_ms(self) -> float:
        if self.lag_txns() == 0 or not self.last_version:
            return 0.0
        return max(0.0, self.rep.storage.hlc.wall_now_ms() - wall_ms_of(self.last_version))
