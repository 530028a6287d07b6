"""Serving one inbound replication socket: this node's log for one database.

The publisher reads its log after the requested sequence, keeps entries whose origin
and tables pass the subscription, and waits on a commit notification at the end of the
log (it never polls). Sending awaits the socket's drain, so a slow peer slows the
stream instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from harpsync import codec
from harpsync.replication import peers
from harpsync.replication.copysend import note_sent, send_copy
from harpsync.replication.messages import ProtocolError
from harpsync.replication.protocol import (
    AckReceived,
    OperationRequested,
    PeerFailed,
    PeerHello,
    ProtocolFailed,
    PublisherSession,
    PublisherState,
    SubscribeRequested,
)
from harpsync.replication.seams import LogSource, PublisherHost
from harpsync.replication.steps import (
    CAUGHT_UP_INTERVAL,
    CaughtUp,
    Copy,
    LogRead,
    Reported,
    Resync,
    Stream,
    first_step,
    next_step,
    sendable,
)
from harpsync.replication.transport import Link, LinkClosed
from harpsync.tasks import end_tasks

log = logging.getLogger(__name__)

TABLE_SCHEMA_OPS = frozenset({"create_table", "drop_table", "set_attribute"})

READ_BATCH = 1000
# A commit within this long of the link's last batch waits for the rest of the interval
# and goes out with the commits that follow it, in one frame; the first commit after a
# quiet spell goes at once. Each frame cost the peer about 0.15 ms of CPU (its wake-up,
# decryption, decoding and apply job) besides its entries' own, and the origin one read,
# encryption and send: with a lone client writing, a frame per commit made the peer's
# frames most of its work. Replication latency of writes in a steady stream grows by
# at most this much; that of a write after a quiet spell not at all. (1.5 ms: an
# insert on one node polled until a read on its peer sees it takes about 2 ms, and such a
# loop must not wait.)
SEND_LINGER = 0.0015


class Publisher:
    """One inbound socket: a peer pulling ``database`` from this node."""

    def __init__(self, host: PublisherHost, link: Link, peer: str, database: str,
                 source: LogSource | None) -> None:
        """``source`` is ``database``'s log (None: no such database here)."""
        self.host = host
        self.link = link
        self.peer = peer
        self.database = database
        self.source = source
        self.session = PublisherSession(host.node_name)
        self._wakeup = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self.sending_since: float | None = None
        self.last_ack_time: float | None = None
        self._notified_head = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # The pending wake-up for the next ``caught_up`` report, and the report time
        # (``Reported.at``) it was set for.
        self._report_timer: asyncio.TimerHandle | None = None
        self._report_at = -1.0
        # The origins the peer's current subscription asks for (None: all; empty: it
        # has not subscribed yet).
        self.origins: Mapping[str, int | None] | None = {}
        self._subscribed = False
        # Reads of the log while streaming (a commit, a report timer or a full batch
        # woke the pump): what a commit costs this link, counted for tests.
        self.log_reads = 0
        # Set while the pump waits at the end of the log for a commit with a report
        # timer pending: a commit then sends its entries from the commit callback
        # (``_send_committed``) after ``_parked_pos``, without waking the pump. The
        # stream's subscription, its table filter and the origins count it announced.
        self._parked = False
        self._parked_pos = 0
        self._parked_sub: SubscribeRequested | None = None
        self._parked_tables: list[str] | None = None
        self._parked_origins = 0
        # A commit callback is scheduled from the writer thread and has not run yet.
        self._commit_pending = False
        # Frames the commit callback could not write at once: the next flush sends them
        # before anything else.
        self._backlog: list[bytes] = []
        # When the last batch went out (monotonic), and the timer that sends the commits
        # held back since (``SEND_LINGER``).
        self._sent_at = -1.0
        self._linger: asyncio.TimerHandle | None = None

    def may_relay(self, origin: str) -> bool:
        """Whether this socket carries ``origin``'s writes to its peer, or may: once its
        hello is answered and until it subscribes, the peer may ask for any origin, with
        what that answer said this node takes of each (``relay_tables``). Before, such
        a socket was taken as relaying nothing, and ``Replicator.drop_relaying`` left it
        open when those changed: it then relayed with the old ``relay_tables``."""
        if self.session.state is PublisherState.AWAIT_HELLO:
            return False  # its answer will tell what this node takes now
        if not self._subscribed:
            return True
        return self.origins is None or origin in self.origins

    def relayed_origins(self) -> list[str]:
        """The origins other than this node the peer's subscription asks for: it takes
        them from this node as its relay."""
        if not self._subscribed or self.origins is None:
            return []
        return [o for o in self.origins if o != self.host.node_name]

    @property
    def sent_seq(self) -> int:
        """The newest log sequence sent to the peer (read from the session)."""
        return self.session.last_entry_seq

    @property
    def acked_seq(self) -> int:
        """The newest log sequence the peer acknowledged (read from the session)."""
        return self.session.acked_seq

    async def flush(self) -> None:
        link = self.link
        frames = self.session.data_to_send()
        if self._backlog:
            frames, self._backlog = self._backlog + frames, []
        for frame in frames:
            if not link.send_now(frame):
                await link.send(frame)

    def notify(self, head: int) -> None:
        """Commit listener; called by the thread that committed: the writer thread, or
        the event loop when a lone small write committed there.

        A commit that appended nothing to the log (a cursor, a status row) wakes nobody,
        nor does one while a wake-up is still pending, nor one in the writer thread that
        logged only the peer's own writes while a ``caught_up`` report is due (its timer
        wakes the pump): each wake-up is a cross-thread call and a log read on the event
        loop. (On the loop the commit callback itself is as cheap as that check.)
        """
        db = self.source
        if head <= self._notified_head and not (db is not None and db.dropped):
            return
        before, self._notified_head = self._notified_head, head
        if self._wakeup.is_set():
            return  # the pump has not run since the last wake-up; it reads past ``head``
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            # A group committed on the event loop itself (a lone small write): no
            # cross-thread call, whose wake-up of the loop costs two system calls. At
            # once, so the entry goes out before the writer's response (deferring it
            # behind the response cost 0.2 ms of replication latency, p50, and gained
            # no rate in A/B rounds).
            self._committed()
            return
        if self._linger is not None:
            # Held (``SEND_LINGER``): the timer reads the log after it clears this, so
            # it reads this commit's entries (logged before the listeners are told).
            return
        if self._report_timer is not None and db is not None and not db.dropped \
                and self._peers_own(db, before):
            # Only the peer's own writes, which it applied and this node logged for
            # relaying: the filter drops them all, and the pending ``caught_up`` report
            # (its timer wakes the pump) moves the peer's cursor past them. Waking now
            # cost this node a cross-thread call and a log read per write it applied.
            return
        if not self._commit_pending:
            self._commit_pending = True
            self._loop.call_soon_threadsafe(self._committed)

    def _committed(self) -> None:
        """On the event loop, after a commit: send its entries at once if the pump is
        parked, else wake the pump."""
        self._commit_pending = False  # (before the read: a later commit schedules anew)
        if self._parked and not self._wakeup.is_set():
            if self._linger is not None:
                return  # held back: the timer sends it with the commits before it
            hold = self._sent_at + SEND_LINGER - time.monotonic()
            if hold > 0 and self._loop is not None:
                self._linger = self._loop.call_later(hold, self._linger_due)
                return
            try:
                if self._send_committed():
                    return
            except Exception:  # the pump reads again and reports what failed
                log.debug("sending from the commit callback failed", exc_info=True)
        self._wakeup.set()

    def _linger_due(self) -> None:
        self._linger = None
        self._committed()

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _send_committed(self) -> bool:
        """Read the log after the parked position and send what passes the filter, as
        the pump would, without a task switch and a step through its loop (per commit
        of a lone client, most of what the publisher spent besides the socket write).
        Returns False for anything but the plain case: having sent nothing for pruned
        entries, a full batch, new origins to announce or a dropped database; for a
        socket that did not take a frame at once, with the frames left for the pump's
        next flush to send first. The pump does the rest."""
        db, sub, link = self.source, self._parked_sub, self.link
        if db is None or sub is None or db.dropped \
                or len(db.origin_names) != self._parked_origins:
            return False
        pos = self._parked_pos
        pruned, entries = db.read_log(pos, READ_BATCH)
        self.log_reads += 1
        if pruned > pos or len(entries) >= READ_BATCH:
            return False
        if not entries:
            return True
        kept = self._filter(db, entries, sub.origins, self._parked_tables, sub.origin_tables)
        if kept:
            self._note_sent(db, kept[-1][0])
            self._sent_at = time.monotonic()
            self.session.send_entries(db.next_seq - 1, kept, db.origin_names)
            frames = self.session.data_to_send()
            for i, frame in enumerate(frames):
                if not link.send_now(frame):
                    self._backlog = frames[i:]  # the pump's flush sends them, first
                    self._parked_pos = entries[-1][0]
                    return False
        self._parked_pos = entries[-1][0]
        return True

    def _peers_own(self, db: LogSource, after: int) -> bool:
        """Whether every entry committed after ``after`` is known (the log's in-memory
        tail) to be the peer's own."""
        if after < 0:
            return False
        origins = db.origins_after(after)
        if not origins:
            return False
        names = db.origin_names
        return all(names.get(origin) == self.peer for origin in origins)

    async def run(self) -> None:
        db = self.source
        if db is None:
            await self.link.close(1008, f"database '{self.database}' does not exist")
            return
        if not self.host.replicates_database(self.database):
            await self.link.close(1008, f"database '{self.database}' does not replicate here")
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        db.commit_listeners.append(self.notify)
        try:
            await self._serve(db)
        except ProtocolError as exc:
            log.info("link from %s/%s failed: %s", self.peer, self.database, exc)
            with contextlib.suppress(Exception):
                await self.link.close(1002, "protocol error")
        except (LinkClosed, ConnectionError):
            pass
        finally:
            self._parked = False
            with contextlib.suppress(ValueError):
                db.commit_listeners.remove(self.notify)
            if self._pump is not None:
                await end_tasks([self._pump])

    async def _serve(self, db: LogSource) -> None:
        while True:
            self.session.receive(await self.link.recv())
            events = self.session.events_received()
            if any(isinstance(event, SubscribeRequested) for event in events):
                # The session takes the new subscription now, while an earlier event's
                # handling may still await: no commit callback sends for the old stream.
                self._parked = False
            for event in events:
                await self._handle(db, event)
            await self.flush()

    async def _handle(self, db: LogSource, event: Any) -> None:
        if isinstance(event, PeerHello):
            if event.node != self.peer or event.database != self.database:
                self.session.reject("identity", "hello does not match the certificate")
                return
            self.session.accept(self.database, self.host.table_definitions(db),
                                dict(db.origin_names), compression=self.host.compression,
                                relay_tables=self._relay_tables(db))
        elif isinstance(event, SubscribeRequested):
            self.origins, self._subscribed = event.origins, True
            if db.dropped:
                pass  # a position in a dropped log says nothing of the new one's
            elif event.copy or event.after_seq < db.next_seq:  # (past our head: reset log)
                self.host.note_position(self.peer, self.database, event.after_seq, event.copy)
            # No commit callback sends for the old stream while it ends.
            self._parked = False
            if self._pump is not None:
                await end_tasks([self._pump])
            self._pump = asyncio.create_task(self._stream(db, event))
        elif isinstance(event, AckReceived):
            self.last_ack_time = time.time()
            if not db.dropped:  # (an ack in flight as the database was dropped)
                self.host.note_ack(self.peer, self.database, self.acked_seq)
        elif isinstance(event, OperationRequested):
            result, error = await self.host.peer_operation(self.peer, event.body)
            self.session.respond_operation(event.id, result, error)
        elif isinstance(event, ProtocolFailed | PeerFailed):
            # The session queued an ``error`` frame naming what the peer got wrong: it
            # goes out before the link ends (if the socket still takes it).
            with contextlib.suppress(Exception):
                await self.flush()
            raise ProtocolError(str(event))

    def _relay_tables(self, db: LogSource) -> dict[str, list[str]]:
        """Per origin this node can relay only some tables of to the peer: those tables
        (the tables it takes from the origin, and of those the ones it publishes to the
        peer). A peer that takes more from that origin directly must not let what this
        node relays of it raise its floor (``Replicator.narrow_origins``).

        The publish side counts too: the peer's row for this node may say it takes
        everything where this node's row for it publishes less (a row learned by
        gossip). Before, such a relay passed on only an origin's table creates, and
        they raised the peer's floor past the origin's rows it withheld: the direct
        link, once back, skipped those for good."""
        own = self.host.peer_row(self.peer)
        publish = peers.publish_tables(own, self.database) if own is not None else False
        out: dict[str, list[str]] = {}
        for name in set(db.origin_names.values()):
            if name in (self.peer, self.host.node_name):
                continue
            row = self.host.peer_row(name)
            tables = peers.subscribe_tables(row, self.database) if row is not None else None
            carried = tables if isinstance(tables, list) else None
            if tables is False and row is not None and not row.get("learned"):
                # An operator's row that takes nothing of that origin: nothing of it
                # arrives here by any path (``peers.origin_tables``) but the schema
                # learned from its hellos, which must not raise the peer's floor
                # either. (A learned row takes it through relays: all of it.)
                carried = []
            if publish is False:
                carried = []
            elif publish is not None:
                carried = list(publish) if carried is None \
                    else [t for t in carried if t in publish]
            if carried is not None:
                out[name] = carried
        return out

    # -- streaming ---------------------------------------------------------------------
    def _allowed_tables(self, requested: list[str] | None) -> peers.TableFilter:
        row = self.host.peer_row(self.peer)
        if row is None:
            # Removed since it connected (its sockets close after the removal's other
            # steps): no row publishes nothing, where an empty one would publish all.
            return False
        mine = peers.publish_tables(row, self.database)
        if mine is False:
            return False
        if requested is None:
            return mine
        if mine is None:
            return list(requested)
        return [t for t in requested if t in mine]

    def _filter(self, db: LogSource, entries: list[tuple[int, bytes]],
                origins: dict[str, Any] | None, tables: list[str] | None,
                limits: Mapping[str, list[str]] | None = None,
                ) -> list[tuple[int, int, bytes]]:
        """The entries to send: not the peer's own, of the origins it asked for above
        their floors, with only the ops of tables it takes (``limits``: per origin,
        the only tables of that origin's writes it may be handed)."""
        out: list[tuple[int, int, bytes]] = []
        names = db.origin_names
        system = self.database == "system"
        head = codec.entry_head
        for seq, raw in entries:
            # Only the head: entries are skipped mostly by origin (a copy relayed here
            # holds hundreds of rows, all from the peer it came from).
            origin, version = head(raw)
            name = names.get(origin)
            if name is None or name == self.peer:
                continue
            if origins is not None:
                if name not in origins:
                    continue
                floor = origins[name]
                if floor is not None and version <= floor:
                    continue
            limit = limits.get(name) if limits else None
            if tables is None and not system and limit is None:
                out.append((seq, origin, raw))
                continue
            user, ops = codec.unpack(raw)[2:]
            # Table creates and drops pass the table filter: schema is not data, and a
            # peer that learned a table from a hello must learn its drop too, now rather
            # than at its next reconnect.
            kept = [op for op in ops
                    if (op[1] in TABLE_SCHEMA_OPS and not system
                        or (peers.table_allowed(self.database, op[0], tables)
                            and (limit is None or op[0] in limit)))
                    and (not system or op[1] not in ("create_database", "drop_database")
                         or self.host.replicates_database(op[2]))]
            if len(kept) == len(ops):
                out.append((seq, origin, raw))
            elif kept:
                out.append((seq, origin, codec.pack([origin, version, user, kept])))
        return out

    async def _stream(self, db: LogSource, sub: SubscribeRequested) -> None:
        try:
            await self._stream_inner(db, sub)
        except (LinkClosed, ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # report, then drop the link so the peer retries
            log.exception("publisher to %s/%s failed", self.peer, self.database)
            with contextlib.suppress(Exception):
                self.session.send_error("publisher_error", str(exc)[:200])
                await self.flush()
                await self.link.close(1011, "publisher error")
        finally:
            self._cancel_report_timer()
            self._cancel_linger()

    async def _stream_inner(self, db: LogSource, sub: SubscribeRequested) -> None:
        allowed = self._allowed_tables(sub.tables)
        tables = [] if allowed is False else allowed
        known_through = max(db.opened_head, db.sent_to.get(self.peer, 0))
        first = first_step(sub.after_seq, sub.copy, db.head_seq, known_through)
        if isinstance(first, Resync):
            if not db.dropped:  # restored: its own rows may be gone with no delete
                self.host.note_log_replaced(self.database)
            await self._resync(first)
            return
        pos = await send_copy(self, db, sub, tables, known_through) if isinstance(first, Copy) \
            else first.after_seq
        reported = Reported()
        known_origins = 0
        while True:
            self._wakeup.clear()
            if self._backlog:  # what a commit callback could not write at once
                await self.flush()
            if len(db.origin_names) != known_origins:
                # Every origin this log may hold, even those this link filters out: the
                # subscriber learns of nodes it has no link to and asks a relay for them.
                known_origins = len(db.origin_names)
                self.session.announce_origins(dict(db.origin_names))
                await self.flush()
            if db.dropped:
                await self.link.close(1001, f"database '{self.database}' was dropped")
                return
            pruned, entries = db.read_log(pos, READ_BATCH)
            self.log_reads += 1
            pruned_max = db.pruned_max() if pruned > pos else None
            if entries and sendable(pos, pruned, sub.origins, pruned_max):
                kept = self._filter(db, entries, sub.origins, tables, sub.origin_tables)
                if kept:
                    self.sending_since = self.sending_since or time.time()
                    self._note_sent(db, kept[-1][0])
                    self._sent_at = time.monotonic()
                    self.session.send_entries(db.next_seq - 1, kept, db.origin_names)
                    await self.flush()
            read = LogRead(pruned, entries[-1][0] if entries else None,
                           full=len(entries) >= READ_BATCH, woken=self._wakeup.is_set())
            step = next_step(pos, read, reported, time.monotonic(), origins=sub.origins,
                             pruned_max=pruned_max,
                             interval=CAUGHT_UP_INTERVAL)
            if isinstance(step, Resync):
                await self._resync(step)
                return
            if isinstance(step, Stream):
                pos = step.after_seq
                continue
            # The log is read to its end.
            pos = pos if read.last_seq is None else read.last_seq
            self.sending_since = None
            if isinstance(step, CaughtUp):
                self._note_sent(db, step.seq)
                self.session.send_caught_up(step.seq)
                await self.flush()
                reported = Reported(step.seq, time.monotonic())
                await self._wakeup.wait()
            elif step.timeout is None:
                await self._wakeup.wait()
            else:
                # A timer rather than ``wait_for``, which (Python 3.11) wraps the wait in
                # a task of its own: a commit's wake-up then reached this loop two
                # event-loop iterations later, behind whatever else was ready. A timer
                # that fires only makes the loop read the log once more. The report is
                # due at one time until the next goes out, so one timer serves every
                # wait until then, not one per commit.
                if self._report_timer is None or self._report_at != reported.at:
                    self._cancel_report_timer()
                    self._report_at = reported.at
                    self._report_timer = asyncio.get_running_loop().call_later(
                        step.timeout, self._report_due)
                # Parked: commits until the report send from their callback.
                self._parked, self._parked_pos, self._parked_sub = True, pos, sub
                self._parked_tables, self._parked_origins = tables, known_origins
                try:
                    await self._wakeup.wait()
                finally:
                    self._parked = False
                    pos = self._parked_pos

    def _note_sent(self, db: LogSource, seq: int) -> None:
        note_sent(db, self.peer, seq)

    def _report_due(self) -> None:
        self._report_timer = None
        self._wakeup.set()

    def _cancel_report_timer(self) -> None:
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None

    async def _resync(self, step: Resync) -> None:
        self.session.send_resync_required(step.oldest_seq, step.reason)
        await self.flush()
