"""One outbound replication socket: pulling one database from one peer.

A :class:`Subscriber` dials its peer, reconnects with backoff, says hello, subscribes
from its committed cursor (or asks for a full copy) and turns the session's events into
work for its :class:`~harpsync.replication.applier.Applier`, which applies each batch in
one writer transaction together with the cursor. The receive loop stops reading while
the apply queue is full, which pushes back on the publisher through TCP. Pause, resume
and rewind are the link's own methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from harpsync.errors import StorageError
from harpsync.replication import peers
from harpsync.replication.acks import AckPacer
from harpsync.replication.applier import Applier, Work
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
from harpsync.replication.transport import DIAL_ERRORS, Link, network_failure
from harpsync.storage.hlc import wall_ms_of
from harpsync.tasks import end_tasks

if TYPE_CHECKING:
    from harpsync.replication.seams import LinkStore, OriginPlanner, SubscriberHost

log = logging.getLogger(__name__)


class LinkState(enum.StrEnum):
    """What a link is doing, as ``cluster_status`` shows it (a ``str``: compares and
    serializes as its value)."""

    CONNECTING = "connecting"
    STREAMING = "streaming"
    COPYING = "copying"
    RESYNC_REQUIRED = "resync_required"
    CLOCK_SKEW = "clock_skew"
    PAUSED = "paused"


# Minutes of errors kept for ``errors_since`` (get_replication_status: the last hour).
ERROR_MINUTES = 61

# Failures after which a link retries with backoff (anything else is logged as a bug).
_RETRIED: tuple[type[BaseException], ...] = (*DIAL_ERRORS, ProtocolError, ValueError,
                                             RuntimeError)


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
        self.caught_up_seq = 0
        self._bytes_before = 0  # received by the sessions before the current one
        self.last_received_local: float | None = None
        self.last_commit_confirmed: float | None = None
        self.latency_ms: float | None = None
        # Errors per minute ``[minute, count]``, the last hour's: bounded however often
        # the link fails (1,000 timestamps capped an hour of 2 s retries at 1,000).
        self._error_minutes: deque[list[int]] = deque(maxlen=ERROR_MINUTES)
        self.paused = False
        self.retired = False
        # A session of this link ended other than by stop (pause, relay restart): the
        # next socket that opens is a reconnect (``harpsync_replication_reconnects``).
        self._dropped = False
        self._opened = False  # a socket of this link opened once
        self._task: asyncio.Task[None] | None = None
        self._session: SubscriberSession | None = None
        self.acks = AckPacer(lambda: (self._session, self.link), self._commit_confirmed)
        # What was applied and committed (the cursor, copy progress) lives there.
        self.applier = Applier(self, host, store, peer, database)
        # What is committed shows before the link connects (a paused link after a
        # restart showed 0 until resumed).
        if store.has_database(database):
            cursor = store.cursor(database, peer)
            self.applier.committed_seq = int(cursor.get("seq", 0))
            at = cursor.get("at")
            self.applier.checkpoint_at = float(at) if isinstance(at, int | float) else None

    def _commit_confirmed(self) -> None:
        self.last_commit_confirmed = time.time()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        # Timestamped, so a link that recovered shows when its last error was.
        self._last_error = value
        self.last_error_at = None
        if value is not None:
            self.last_error_at = now = time.time()
            minute = int(now // 60)
            if self._error_minutes and self._error_minutes[-1][0] == minute:
                self._error_minutes[-1][1] += 1
            else:
                self._error_minutes.append([minute, 1])

    def errors_since(self, since: float) -> int:
        """Errors from the minute of ``since`` on (kept for the last hour)."""
        first = int(since // 60)
        return sum(count for minute, count in self._error_minutes if minute >= first)

    def count_from(self, txns: int, size: int) -> None:
        """Start the counters where a retired link of this peer and database left them."""
        self.applier.txns_received += txns
        self._bytes_before += size

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
        self.acks.send_due_now()
        task = self._task
        if task is not None:
            await end_tasks([task])
        if self._task is task:  # not a task a resume started meanwhile
            self._task = None
        await self.settle()

    def hold(self) -> None:
        """Keep a new link paused (it was paused before a restart): it does not start."""
        self.paused, self.state = True, LinkState.PAUSED

    async def pause(self) -> None:
        """Stop receiving; the committed cursor is kept."""
        self.paused = True  # first: a relay hand-over restarts only unpaused links
        await self.stop()
        if self.paused:
            self.state = LinkState.PAUSED
        else:
            # Resumed while stopping (its start found the old task still ending): the
            # resume came last, so the link runs. Before, it stayed stopped and
            # unpaused, and a later resume did nothing.
            self.start()

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
            # The replay is kept in the cursor until the log is read to its end: a
            # restart before then goes on with it (in memory only, it was dropped).
            await self.store.write_cursor(self.database, self.peer,
                                          {"seq": seq, "replay": from_version})
            self.applier.replay_floor = from_version
            self.applier.replaying = True
        finally:
            self.paused, self.state = False, LinkState.CONNECTING
            self.start()

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.open and self.state != LinkState.CONNECTING

    def _tls_hint(self, error: str) -> str:
        """What the operator can do about a peer certificate this node refused."""
        if "has expired" in error:
            return (f"; {self.peer}'s certificate has expired: check the clocks of both "
                    f"nodes (a restart of {self.peer} re-issues its own certificate)")
        if "not yet valid" in error:
            return (f"; {self.peer}'s certificate is not valid yet: check the clocks of "
                    "both nodes")
        return f"; if the keys of {self.peer} were replaced, run add_node for it again"

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
                if self.last_error.startswith("TLS certificate verification failed"):
                    self.last_error += self._tls_hint(self.last_error)
                unreachable = self.link is None and isinstance(exc, DIAL_ERRORS)
                if self.state in (LinkState.STREAMING, LinkState.COPYING) \
                        and self.link is not None and network_failure(exc):
                    # A working link the network took down: one line. Failed redials
                    # and closes the peer sent (a refusal) stay DEBUG.
                    log.warning("link %s/%s dropped: %s", self.peer, self.database,
                                self.last_error)
                else:
                    log.debug("link %s/%s: %s", self.peer, self.database, self.last_error)
            except StorageError as exc:  # a full database: retried, logged once
                error = describe_error(exc)
                if error != self.last_error:
                    log.warning("link %s/%s: %s", self.peer, self.database, error)
                self.last_error = error
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
            self._dropped = True  # (not reached when stopped: that cancels this task)
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
        link = self.link
        for frame in self._session.data_to_send():
            if not link.send_now(frame):
                await link.send(frame)

    async def _connect_once(self) -> None:
        row = self.host.peer_row(self.peer)
        if row is None or not row.get("url"):
            raise RuntimeError(f"no URL known for node {self.peer}")
        if not self.store.has_database(self.database):
            raise RuntimeError(f"database {self.database} is gone")
        self.link = await self.host.dial_peer(self.peer, row["url"], "/" + self.database)
        self.host.peer_gate(self.peer).mark_up()
        self.host.note_dialed(self.peer, self.database,
                              reconnect=self._opened and self._dropped)
        self._opened, self._dropped = True, False
        # The server must be this peer (its pinned key), not any node whose CA we trust.
        refused = self.host.check_peer(self.peer, self.link)
        if refused is not None:
            raise RuntimeError(refused)
        # A job of the last session may still be committing: the cursor this session
        # subscribes from must include it, or its entries come again (and count twice).
        await self.applier.settle()
        self.applier.new_session()  # nothing from an earlier session survives
        self.acks.reset()
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
                 asyncio.create_task(self.applier.run())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await end_tasks(tasks)

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
        if "replay" in cursor and not self.applier.replaying:  # asked before a restart
            self.applier.replaying, self.applier.replay_floor = True, int(cursor["replay"])
        row = (self.host.peer_row(self.peer) or {})
        tables = peers.subscribe_tables(row, self.database)
        after = int(cursor.get("seq", 0))
        # One copy per link: this peer's own transactions, plus the origins it relays
        # for us, each above the newest version already held (from any path).
        await self.relays.release(self.peer, self.database)
        covered = self.relays.covered(self.peer, self.database)
        self.applier.covered = sorted(covered)
        if cursor and not copy and "origins" in cursor \
                and not covered <= set(cursor["origins"]):
            after = 0  # a newly relayed origin: read the log again, above its floor
        floors: dict[str, int | None] = (
            dict.fromkeys(covered) if self.applier.replaying
            else self.store.origin_floors(self.database, covered))
        self.applier.committed_seq = after
        # A ``caught_up`` of an earlier session says nothing of this stream: after a
        # replay it said the log was read through its head, and the lag showed 0 (the
        # stream ``running``) while the whole log was read again.
        self.caught_up_seq = after
        self.applier.copy_resume = resume or None
        # ``copied`` (rows copied before) and ``floors`` are for this side only.
        sent_resume = {k: v for k, v in resume.items() if k not in ("copied", "floors")} \
            if resume else None
        self._session.subscribe(after_seq=after, origins=floors,
                                tables=None if tables is None else list(tables or []),
                                copy=copy, copy_resume=sent_resume,
                                origin_tables=self.host.origin_tables(self.peer,
                                                                      self.database))
        self.state = LinkState.COPYING if copy else LinkState.STREAMING

    async def _handle(self, event: Any) -> None:
        assert self._session is not None  # events come from the session
        if isinstance(event, PeerHello):
            if event.node != self.peer:
                raise ProtocolError(f"peer says it is {event.node}, expected {self.peer}")
            self.applier.peer_tables = dict(event.tables)
            self.applier.relay_tables = dict(self._session.relay_tables)
            await self.store.learn_schema(self.database, event.tables, self.peer)
            await self._subscribe(copy=False)
        elif isinstance(event, EntriesReceived):
            self.last_received_local = time.time()
            await self.applier.queue.put(Work("entries", event.entries,
                                              dict(self._session.peer_origins)))
        elif isinstance(event, CaughtUp):
            self.caught_up_seq = event.seq
            await self.applier.queue.put(Work("caught_up", event.seq, {}))
        elif isinstance(event, CopyBegan):
            self.state = LinkState.COPYING
            await self.applier.queue_copy(event.snapshot_seq, event.total, event.horizons,
                                          event.floors)
            if event.schema is not None:  # learned in order: after what is queued
                await self.applier.queue.put(Work("schema", event.schema, {}))
        elif isinstance(event, CopyRows):
            await self.applier.queue.put(Work("rows", (event.table, event.rows),
                                              dict(self._session.peer_origins)))
        elif isinstance(event, CopyEnded):
            await self.applier.queue.put(Work("copy_end", event.snapshot_seq, {}))
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
            # The session queued an ``error`` frame naming what the peer got wrong: it
            # goes out before the link ends (if the socket still takes it).
            with contextlib.suppress(Exception):
                await self._flush()
            raise ProtocolError(str(event))

    # -- what the applier tells its owner (applier.ApplyOwner) --------------------------
    def acknowledge(self, seq: int) -> None:
        self.acks.ack(seq)

    @property
    def copying(self) -> bool:
        return self.state == LinkState.COPYING

    def report_error(self, message: str) -> None:
        self.last_error = message

    def copy_ended(self) -> None:
        self.state = LinkState.STREAMING

    def clock_skewed(self) -> None:
        self.state = LinkState.CLOCK_SKEW

    async def flush(self) -> None:
        await self._flush()

    @property
    def session(self) -> SubscriberSession | None:
        """The current session (for status: negotiated compression and its ratio)."""
        return self._session

    # -- what was applied (read from the applier) --------------------------------------
    @property
    def committed_seq(self) -> int:
        """The publisher sequence durably applied (the committed cursor's)."""
        return self.applier.committed_seq

    @property
    def checkpoint_at(self) -> float | None:
        """When the cursor last committed."""
        return self.applier.checkpoint_at

    @property
    def txns_received(self) -> int:
        return self.applier.txns_received

    @property
    def last_version(self) -> int:
        """The newest version applied from this link (0: none yet)."""
        return self.applier.last_version

    @property
    def copy_progress(self) -> dict[str, int] | None:
        """Records copied of the total while a full copy runs."""
        return self.applier.copy_progress

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
        await self.applier.settle()

    async def restart(self) -> None:
        """Reconnect (to subscribe again with new origins), unless paused.

        The link starts again also when the caller is cancelled while it stops: a
        direct link that comes back restarts its relay's link (``relays.release``) and
        may be stopped itself meanwhile. Before, the relay's link then stayed stopped,
        neither paused nor retired, ``connecting`` for good (lifecycle seed 775). A new
        session waits for the old one's writes before it subscribes (``settle``)."""
        try:
            await self.stop()
        finally:
            if not self.paused:
                self.start()  # a no-op once retired

    # -- status ------------------------------------------------------------------------
    def backlog(self) -> int:
        """Batches received and not applied yet (the apply queue holds QUEUE_LIMIT)."""
        return self.applier.queue.qsize()

    def lag_txns(self) -> int:
        applied = self.committed_seq
        if self.applier.queue.empty() and self.caught_up_seq >= self.received_seq:
            applied = max(applied, self.caught_up_seq)
        return max(0, self.head_seq - applied)

    @property
    def lag_unknown(self) -> bool:
        """Paused: nothing comes from the peer, whose log moves on unseen, so reports
        show the lag as null, not the last measured before the pause."""
        return self.paused or self.state == LinkState.PAUSED

    def lag_ms(self) -> float:
        """The age of the oldest entry received and not applied; with none here (the
        publisher's head is ahead of what arrived), the age of the last one applied.
        Before, it was always the latter: after an idle hour, a write made a moment
        ago read as an hour behind until it applied."""
        if self.lag_txns() == 0:
            return 0.0
        version = self.applier.oldest_pending_version() or self.last_version
        if not version:
            return 0.0
        return max(0.0, self.store.wall_now_ms() - wall_ms_of(version))
