"""One outbound replication socket: pulling one database from one peer.

Batches are applied in one writer transaction together with the cursor for this peer
and database, so a crash can neither lose nor double-apply a batch. Several queued
batches share one transaction. The receive loop stops reading while the apply queue is
full, which pushes back on the publisher through TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

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
    GATED_RETRY,
    backoff_delay,
    describe_error,
)
from harpsync.replication.transport import DIAL_ERRORS, Link
from harpsync.storage import deadletters, schema
from harpsync.storage.hlc import ClockSkewError, wall_ms_of

if TYPE_CHECKING:
    from harpsync.replication.seams import LinkStore, OriginPlanner, SubscriberHost

log = logging.getLogger(__name__)
T = TypeVar("T")

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

    def __init__(self, host: SubscriberHost, store: LinkStore, relays: OriginPlanner,
                 peer: str, database: str) -> None:
        self.host = host
        self.store = store
        self.relays = relays
        self.peer = peer
        self.database = database
        self.state = LinkState.CONNECTING
        self.link: Link | None = None
        self._last_error: str | None = None
        self.last_error_at: float | None = None
        self.failures = 0
        # Sequence and byte counters of the wire live in the session (see the
        # properties below); the link keeps what it applied and committed.
        self.committed_seq = 0
        self.caught_up_seq = 0
        self._bytes_before = 0  # received by the sessions before the current one
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
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
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
            await self.store.write_cursor(self.database, self.peer, {"seq": seq})
            self.replay_floor = from_version
            self.replaying = True
        finally:
            self.paused, self.state = False, LinkState.CONNECTING
            self.start()

    async def _write(self, job: Awaitable[T]) -> T:
        """Run one writer job of the store so that ``stop`` can wait for it, even if
        this task is cancelled."""
        future = asyncio.ensure_future(job)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        started = time.perf_counter()
        future.add_done_callback(lambda _f: self.host.note_apply_seconds(
            self.peer, self.database, time.perf_counter() - started))
        return await asyncio.shield(future)

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.open and self.state != LinkState.CONNECTING

    async def _run(self) -> None:
        gate = self.host.peer_gate(self.peer)
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
        row = self.host.peer_row(self.peer)
        if row is None or not row.get("url"):
            raise RuntimeError(f"no URL known for node {self.peer}")
        if not self.store.has_database(self.database):
            raise RuntimeError(f"database {self.database} is gone")
        self.link = await self.host.dial_peer(self.peer, row["url"], "/" + self.database)
        self.host.peer_gate(self.peer).mark_up()
        self.host.note_dialed(self.peer, self.database)
        # The server must be this peer (its pinned key), not any node whose CA we trust.
        refused = self.host.check_peer(self.peer, self.link)
        if refused is not None:
            raise RuntimeError(refused)
        self._queue = _WorkQueue(QUEUE_LIMIT)  # nothing from an earlier session survives
        tables, origins = self.store.hello_schema(self.database)
        previous = self._session
        if previous is not None:
            self._bytes_before += previous.bytes_received
        session = self._session = SubscriberSession(
            self.host.node_name, self.database, tables, origins,
            compression=self.host.offers_compression(row["url"]), previous=previous)
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
            session.receive(await self.link.recv())
            for event in session.events_received():
                await self._handle(event)
            await self._flush()

    async def _subscribe(self, copy: bool, resync: bool = False) -> None:
        assert self._session is not None
        cursor = self.store.cursor(self.database, self.peer)
        # After resync_required an interrupted copy's resume point is stale too.
        resume = None if resync else cursor.get("copy")
        if resume:
            copy = True
        elif not cursor:
            copy = True  # a new pairing starts with a full copy, then streams
        row = (self.host.peer_row(self.peer) or {})
        tables = peers.subscribe_tables(row, self.database)
        after = int(cursor.get("seq", 0))
        # One copy per link: this peer's own transactions, plus the origins it relays
        # for us, each above the newest version already held (from any path).
        await self.relays.release(self.peer, self.database)
        covered = self.relays.covered(self.peer, self.database)
        self._covered = sorted(covered)
        if cursor and not copy and "origins" in cursor \
                and not covered <= set(cursor["origins"]):
            after = 0  # a newly relayed origin: read the log again, above its floor
        floors: dict[str, int | None] = (
            dict.fromkeys(covered) if self.replaying
            else self.store.origin_floors(self.database, covered))
        self.committed_seq = after
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
            await self.store.learn_schema(self.database, event.tables, self.peer)
            await self._subscribe(copy=False)
        elif isinstance(event, EntriesReceived):
            self.last_received_local = time.time()
            await self._queue.put(_Work("entries", event.entries, dict(self._session.peer_origins)))
        elif isinstance(event, CaughtUp):
            self.caught_up_seq = event.seq
            await self._queue.put(_Work("caught_up", event.seq, {}))
        elif isinstance(event, CopyBegan):
            self.state = LinkState.COPYING
            self.copy_snapshot = event.snapshot_seq
            self.copy_progress = {"records_copied": 0, "records_total": event.total}
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
            result, error = await self.host.peer_operation(self.peer, event.body)
            self._session.respond_operation(event.id, result, error)
        elif isinstance(event, OperationCompleted):
            self.host.operation_completed(event)
        elif isinstance(event, ProtocolFailed | PeerFailed):
            raise ProtocolError(str(event))

    # -- applying ----------------------------------------------------------------------
    async def _apply_loop(self) -> None:
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
                await self._write(self.store.write_cursor(self.database, self.peer,
                                                          self._cursor(snapshot)))
                self.committed_seq = snapshot
                self.checkpoint_at = time.time()
                self.copy_progress = None
                self.state = LinkState.STREAMING
                self._ack(snapshot)
                self.host.copy_finished(self.peer, self.database)
            await self._flush()

    async def _advance(self, seq: int) -> None:
        """The publisher's log is read through ``seq`` and everything before it was
        applied; entries filtered out on its side need no apply, so the cursor moves
        past them (durably, before the ack that lets the publisher prune them)."""
        self.replay_floor = 0  # a replay ends once it has read the whole log
        self.replaying = False
        if seq <= self.committed_seq or self.state == LinkState.COPYING:
            return
        await self._write(self.store.write_cursor(self.database, self.peer,
                                                  self._cursor(seq)))
        self.committed_seq = seq
        self.checkpoint_at = time.time()
        self._ack(seq)

    def _ack(self, seq: int) -> None:
        if self._session is not None and self._session.ack(seq):
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
        await self._write(self.store.dead_letter(self.database, self.peer, letters,
                                                 self._cursor(seq)))
        self._attempts.pop(seq, None)
        self.committed_seq = max(self.committed_seq, seq)
        self.checkpoint_at = time.time()
        self.last_error = f"dead letter: {error}"
        self.host.note_dead_letters(self.peer, self.database, len(letters))
        self._ack(seq)

    async def _apply_batch(self, entries: list[tuple[int, bytes]],
                           origins: dict[int, str]) -> None:
        last_seq = entries[-1][0]
        host = self.host
        floor = max(host.start_floor(self.peer), self.replay_floor)
        review = host.review(self.peer, self.database)
        stats = await self._write(self.store.apply_entries(
            self.database, self.peer, entries, origins, self._cursor(last_seq),
            host.max_skew_ms, host.node_name, floor, review))
        while stats.resume_seq is not None:  # a database re-created after its drop
            rest = [e for e in entries if e[0] >= stats.resume_seq]
            more = await self._write(self.store.apply_entries(
                self.database, self.peer, rest, origins, self._cursor(last_seq),
                host.max_skew_ms, host.node_name, floor, review))
            more.entries += stats.entries
            more.skewed += stats.skewed
            stats = more
        committed = last_seq if stats.cursor_seq is None else stats.cursor_seq
        self.committed_seq = max(self.committed_seq, committed)
        self.checkpoint_at = time.time()
        host.note_review(self.peer, self.database, review)
        self.txns_received += stats.entries
        if stats.last_version:
            self.last_version = stats.last_version
        host.note_received(self.peer, self.database, stats.entries,
                           sum(len(e[1]) for e in entries), self.last_version)
        self._ack(committed)
        if stats.skew_error is not None:
            host.note_skew(self.peer, stats.skewed)
            self.state = LinkState.CLOCK_SKEW
            raise stats.skew_error

    async def _apply_rows(self, work: _Work) -> None:
        table, rows = work.payload
        tombs = table.endswith("\x00")
        table = table.rstrip("\x00")
        old = self.store.cursor(self.database, self.peer)
        copy_state = {"table": table, "key": rows[-1][0], "tombs": tombs,
                      "snapshot": self.copy_snapshot}
        cursor = {**self._cursor(int(old.get("seq", 0))), "copy": copy_state}
        definition = self.peer_tables.get(table)
        incarnation = definition.get("version") if isinstance(definition, dict) else None
        incarnation = incarnation if isinstance(incarnation, int) else None
        review = self.host.review(self.peer, self.database)
        job = self.store.apply_rows(self.database, self.peer, table, rows, work.origins, cursor,
                                    self.host.start_floor(self.peer), incarnation, review)
        try:
            await self._write(job)
            self._attempts.pop((table, rows[0][0]), None)
        except ClockSkewError:
            self.host.note_skew(self.peer, 1)
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
            await self._write(self.store.dead_letter(self.database, self.peer, letters,
                                                     cursor))
            self._attempts.pop((table, rows[0][0]), None)
            self.last_error = f"dead letter: {error}"
            self.host.note_dead_letters(self.peer, self.database, len(letters))
        self.host.note_review(self.peer, self.database, review)
        if self.database == "system":  # users or roles may have changed: tell the login cache
            self.host.logins_changed()
        if self.copy_progress is not None:
            self.copy_progress["records_copied"] += len(rows)

    @property
    def session(self) -> SubscriberSession | None:
        """The current session (for status: negotiated compression and its ratio)."""
        return self._session

    # -- counters, read from the session ----------------------------------------------
    @property
    def received_seq(self) -> int:
        """The newest publisher sequence received, or committed past (``caught_up``)."""
        session = self._session
        return max(session.received_seq if session is not None else 0, self.committed_seq)

    @property
    def head_seq(self) -> int:
        """The publisher's newest sequence as last reported."""
        return self._session.head_seq if self._session is not None else 0

    @property
    def acked_seq(self) -> int:
        """The newest sequence acknowledged to the publisher on this session."""
        return self._session.acked_seq if self._session is not None else 0

    @property
    def bytes_received(self) -> int:
        """Bytes received on this link, over all its sessions."""
        session = self._session
        return self._bytes_before + (session.bytes_received if session is not None else 0)

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
        return max(0.0, self.store.wall_now_ms() - wall_ms_of(self.last_version))
