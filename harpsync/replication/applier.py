"""Applying what one link received: in order, each job committing the cursor with it.

The subscriber (``subscriber.py``) owns one :class:`Applier` per link and feeds its
queue from the session's events; the applier writes through the ``LinkStore`` seam and
tells its owner what happened through :class:`ApplyOwner` (acks, errors, the end of a
copy, clock skew). Batches queued together share one transaction; a change that cannot
be applied goes to the dead letters instead of stopping the link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from harpsync import codec
from harpsync.errors import HarpsyncError, StorageError
from harpsync.replication import copyfloors
from harpsync.replication.copysweep import CopySweeps, parse_horizons
from harpsync.replication.reconnect import describe_error
from harpsync.storage import deadletters, schema
from harpsync.storage.hlc import ClockSkewError
from harpsync.storage.writer import crash_point

if TYPE_CHECKING:
    from harpsync.replication.seams import ApplyHost, LinkStore

T = TypeVar("T")

QUEUE_LIMIT = 64
APPLY_GROUP = 16
# A busy stream (entries arrived while the last apply was committing, or it applied more
# than one) gathers entries for up to this long after the last commit began, so the peer
# makes a few synced commits a second instead of one per commit on the origin: on a
# shared disk each of its fsyncs costs the origin's writer as much as one of its own. A
# quiet link (one write at a time) commits each batch at once, so an isolated write is
# not delayed.
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
    if isinstance(exc, ClockSkewError | schema.DroppedIncarnationError | StorageError):
        return False  # a full database: retried until it has room
    return isinstance(exc, ValueError | HarpsyncError | OverflowError | TypeError | KeyError
                      | IndexError | AttributeError)


@dataclass
class Work:
    """One item of the apply queue."""

    kind: str  # "entries", "caught_up", "copy_begin", "rows", "schema", "copy_end"
    payload: Any
    origins: dict[int, str]


class WorkQueue(asyncio.Queue[Work]):
    """The apply queue, which the applier may look into without taking from it."""

    def pending(self) -> list[Work]:
        """The queued work, oldest first (a copy)."""
        return list(self._queue)  # type: ignore[attr-defined]  # asyncio.Queue's deque

    def peek(self) -> Work | None:
        """The oldest queued work, left in the queue (None when empty)."""
        return self._queue[0] if self._queue else None  # type: ignore[attr-defined]


class ApplyOwner(Protocol):
    """What the applier tells the link that owns it."""

    @property
    def copying(self) -> bool:
        """A full copy is under way (``caught_up`` must not move the cursor)."""
        ...

    def acknowledge(self, seq: int) -> None:
        """Everything through ``seq`` is durable: ack it to the publisher."""
        ...

    def report_error(self, message: str) -> None:
        """Show ``message`` as the link's last error (the link goes on)."""
        ...

    def copy_ended(self) -> None:
        """The full copy is applied; the link streams."""
        ...

    def clock_skewed(self) -> None:
        """Entries were held back for clock skew (the failure that follows ends the
        session)."""
        ...

    async def flush(self) -> None:
        """Send what the session queued (acks)."""
        ...


class Applier:
    """The apply side of one (peer, database) link.

    Attributes:
        committed_seq: the publisher sequence durably applied (the cursor's).
        checkpoint_at: when the cursor last committed.
        txns_received, last_version: transactions applied, and the newest version.
        copy_progress: records copied of the total while a copy runs (None otherwise).
        replay_floor, replaying: set by a replay (versions at or below the floor are
            skipped, and floors are not sent) until the log is read to its end.
        covered: the origins the link's cursor covers.
        peer_tables: the peer's schema, from its hello.
    """

    def __init__(self, owner: ApplyOwner, host: ApplyHost, store: LinkStore, peer: str,
                 database: str) -> None:
        self.owner = owner
        self.host = host
        self.store = store
        self.peer = peer
        self.database = database
        self.queue = WorkQueue(QUEUE_LIMIT)
        self.committed_seq = 0
        self.checkpoint_at: float | None = None
        self.txns_received = 0
        self.last_version = 0
        self.copy_progress: dict[str, int] | None = None
        # The copy state of the cursor a copy was asked to resume from (None: none).
        self.copy_resume: dict[str, Any] | None = None
        # The ranges of the copy that may show rows deleted on the peer (copysweep.py).
        self.copy_sweeps = CopySweeps({})
        self.copy_snapshot = 0
        # Per origin, the floor the copy under way raises at its end (copyfloors.py).
        self.copy_floors: dict[str, int] = {}
        self.replay_floor = 0
        # Set by replay_replication: send everything again, whatever this node holds.
        self.replaying = False
        self.covered: list[str] = [peer]
        self.peer_tables: dict[str, Any] = {}
        # Per origin the peer takes only some tables from (its hello): what it relays.
        self.relay_tables: dict[str, list[str]] = {}
        # Failed attempts at one change (publisher sequence, or copy chunk): count, first.
        self._attempts: dict[Any, tuple[int, float]] = {}
        # Writer jobs submitted and not yet finished: cancelling the task that awaits
        # one does not stop it in the writer thread, so ``settle`` waits for them.
        self._inflight: set[asyncio.Future[Any]] = set()
        self._applying: list[tuple[int, bytes]] = []  # the entries being applied now

    def new_session(self) -> None:
        """Nothing queued in an earlier session survives into a new one, nor a copy it
        was running: a new session copies only if its peer begins a copy again."""
        self.queue = WorkQueue(QUEUE_LIMIT)
        # The end of a copy can commit its cursor in a writer job that finishes after
        # this task was cancelled (the link dropped): its bookkeeping never ran, and the
        # copy would show as in progress, and verify refuse, for good.
        self.copy_progress = None

    async def queue_copy(self, snapshot_seq: int, total: int, horizons: Any = None,
                         floors: Any = None) -> None:
        """A ``copy_begin`` arrived: it begins in queue order (:meth:`begin_copy`), after
        what is queued (after a resync, the copy before may have chunks and its end
        still queued). Shown in progress at once (status, verify's refusal)."""
        if self.copy_progress is None:
            self.copy_progress = {"records_copied": _copied_before(self.copy_resume,
                                                                   snapshot_seq),
                                  "records_total": total}
        await self.queue.put(Work("copy_begin", (snapshot_seq, total, horizons,
                                                 self.copy_resume, floors), {}))

    def begin_copy(self, snapshot_seq: int, total: int, horizons: Any = None,
                   resume: dict[str, Any] | None = None, floors: Any = None) -> None:
        """A copy begins: ``total`` counts the whole snapshot, so a copy that resumes
        ``resume`` (the same snapshot) counts the rows copied before it too.
        ``horizons``: the publisher's tombstone horizons (``copysweep.py``); ``floors``
        what it carries of each origin (``copyfloors.py``).
        Run in queue order (a ``copy_begin`` work): a copy that a resync ends may still
        have chunks queued, and they and its end keep its snapshot and sweep ranges."""
        self.copy_snapshot = snapshot_seq
        self.copy_floors = copyfloors.begun(floors, snapshot_seq, resume)
        resumed = resume if resume is not None and resume.get("snapshot") == snapshot_seq \
            else None
        self.copy_progress = {"records_copied": _copied_before(resumed, snapshot_seq),
                              "records_total": total}
        self.copy_sweeps = CopySweeps(parse_horizons(horizons), resumed)

    async def settle(self) -> None:
        """Wait until no write of this link is left in the writer."""
        while self._inflight:
            # ``wait``, not ``gather``: a waiter that is cancelled (the link stopped while
            # its next session waits here) must not cancel the jobs, nor their counting.
            await asyncio.wait(list(self._inflight))

    async def _write(self, job: Awaitable[T],
                     committed: Callable[[], None] | None = None) -> T:
        """Run one writer job of the store so that ``stop`` can wait for it, even if
        this task is cancelled (``committed`` runs once the job succeeded, then too)."""
        future = asyncio.ensure_future(job)
        self._inflight.add(future)
        started = time.perf_counter()

        def done(_f: asyncio.Future[T]) -> None:
            self._inflight.discard(future)
            self.host.note_apply_seconds(self.peer, self.database,
                                         time.perf_counter() - started)
            if committed is not None and not _f.cancelled() and _f.exception() is None:
                committed()

        future.add_done_callback(done)
        return await asyncio.shield(future)

    def cursor(self, seq: int) -> dict[str, Any]:
        """The cursor to commit: the publisher sequence and the origins it covers (and,
        while a replay runs, its floor: a restart goes on with the replay), with the time
        it commits (``last_checkpoint.time`` after a restart)."""
        if self.replaying:
            return {"seq": seq, "origins": list(self.covered), "replay": self.replay_floor,
                    "at": time.time()}
        return {"seq": seq, "origins": list(self.covered), "at": time.time()}

    async def run(self) -> None:
        """Apply queued work in order until cancelled (the link's session ends)."""
        busy = False
        last_commit = 0.0
        while True:
            work = [await self.queue.get()]
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
                following = self.queue.peek()
                if following is None or following.kind not in ("entries", "caught_up"):
                    break
                item = self.queue.get_nowait()
                work.append(item)
                if item.kind == "entries":
                    batches += 1
                    size += len(item.payload)
            first = work[0]
            if first.kind == "entries":
                last_commit = time.monotonic()
                entries = [w for w in work if w.kind == "entries"]
                caught = [int(w.payload) for w in work if w.kind == "caught_up"]
                await self.apply_entries(entries)
                if caught:
                    await self._advance(max(caught))
                # Entries that arrived during the commit, or more than one entry in
                # this apply: the stream is busy. (A publisher sends commits that come
                # within ``SEND_LINGER`` of its last batch together: one entry at a time
                # is a quiet link, or a writer waiting for each write to arrive here.
                # Without the second test, a peer that applied each lingered batch
                # before the next came committed each at once: 0.11 to 0.17 synced
                # commits per record on a shared disk with one client writing, against
                # 0.04 before the linger, each costing the origin's own commits.)
                busy = size > 1 or any(w.kind == "entries" for w in self.queue.pending())
            elif first.kind == "rows":
                await self.apply_rows(first)
            elif first.kind == "caught_up":
                await self._advance(int(first.payload))
            elif first.kind == "copy_begin":
                self.begin_copy(*first.payload)
            elif first.kind == "schema":
                # A copy's schema (its drops, then its tables) before its rows, whose
                # incarnations it names.
                self.peer_tables = dict(first.payload)
                await self._write(self.store.learn_schema(self.database, first.payload,
                                                          self.peer))
            else:
                # One shielded unit, as an apply is: a copy whose end commits as the link
                # drops has ended (its verification runs), and the next session waits.
                await self._write(self._end_copy(int(first.payload)))
                self.owner.copy_ended()
            await self.owner.flush()

    async def _end_copy(self, snapshot: int) -> None:
        # Every chunk committed before this job: the floors rise with the copy's end.
        held = self.host.narrow_origins(self.peer, self.database, self.relay_tables,
                                        self.copy_floors.keys())
        floors = copyfloors.to_raise(self.copy_floors, held, self.host.node_name)
        await self.store.write_cursor(self.database, self.peer, self.cursor(snapshot),
                                      self.copy_sweeps.at_end(), floors)
        self.copy_sweeps = CopySweeps({})
        self.copy_floors = {}
        self.committed_seq = snapshot
        self.checkpoint_at = time.time()
        self.copy_progress = None
        self.owner.acknowledge(snapshot)
        self.host.copy_finished(self.peer, self.database)

    async def _advance(self, seq: int) -> None:
        """The publisher's log is read through ``seq`` and everything before it was
        applied; entries filtered out on its side need no apply, so the cursor moves
        past them (durably, before the ack that lets the publisher prune them)."""
        replayed = self.replaying
        self.replay_floor = 0  # a replay ends once it has read the whole log
        self.replaying = False
        if self.owner.copying:
            return
        if seq <= self.committed_seq:
            if replayed:  # the committed cursor still says a replay runs
                await self._write(self.store.write_cursor(
                    self.database, self.peer, self.cursor(self.committed_seq)))
            return
        await self._write(self.store.write_cursor(self.database, self.peer,
                                                  self.cursor(seq)))
        self.committed_seq = seq
        self.checkpoint_at = time.time()
        self.owner.acknowledge(seq)

    async def apply_entries(self, work: list[Work]) -> None:
        entries = [e for w in work for e in w.payload]
        origins: dict[int, str] = {}
        for w in work:
            origins.update(w.origins)
        self._applying = entries
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
        finally:
            self._applying = []

    def oldest_pending_version(self) -> int | None:
        """The version of the oldest entry received and not yet committed (being
        applied, or queued), or None when there is none here (read for status only:
        it decodes the head of one entry)."""
        first = next((e for e in self._applying if e[0] > self.committed_seq), None)
        if first is None:
            queued = next((w for w in self.queue.pending()
                           if w.kind == "entries" and w.payload), None)
            first = queued.payload[0] if queued is not None else None
        if first is None:
            return None
        try:
            version = codec.unpack_head(first[1], 2)[1]
        except Exception:  # not an entry this node can read: its apply will say so
            return None
        return version if isinstance(version, int) else None

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
                                                 self.cursor(seq)))
        self._attempts.pop(seq, None)
        self.committed_seq = max(self.committed_seq, seq)
        self.checkpoint_at = time.time()
        self.owner.report_error(f"dead letter: {error}")
        self.host.note_dead_letters(self.peer, self.database, len(letters))
        self.owner.acknowledge(seq)

    async def _apply_batch(self, entries: list[tuple[int, bytes]],
                           origins: dict[int, str]) -> None:
        # One shielded unit: when the link drops during the commit, the commit still
        # lands, and so must what it counts (a new session subscribes after it).
        await self._write(self._apply_and_count(entries, origins))

    async def _apply_and_count(self, entries: list[tuple[int, bytes]],
                               origins: dict[int, str]) -> None:
        last_seq = entries[-1][0]
        host = self.host
        floor = max(host.start_floor(self.peer), self.replay_floor)
        review = host.review(self.peer, self.database)
        held = host.narrow_origins(self.peer, self.database, self.relay_tables,
                                   set(origins.values()))
        stats = await self.store.apply_entries(
            self.database, self.peer, entries, origins, self.cursor(last_seq),
            host.max_skew_ms, host.node_name, floor, review, held)
        while stats.resume_seq is not None:  # a database re-created after its drop
            rest = [e for e in entries if e[0] >= stats.resume_seq]
            more = await self.store.apply_entries(
                self.database, self.peer, rest, origins, self.cursor(last_seq),
                host.max_skew_ms, host.node_name, floor, review, held)
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
        host.note_received(self.peer, self.database, stats.entries, self.last_version)
        self.owner.acknowledge(committed)
        if stats.skew_error is not None:
            host.note_skew(self.peer, stats.skewed)
            self.owner.clock_skewed()
            raise stats.skew_error

    async def apply_rows(self, work: Work) -> None:
        table, rows = work.payload
        tombs = table.endswith("\x00")
        table = table.rstrip("\x00")
        old = self.store.cursor(self.database, self.peer)
        copied = (self.copy_progress or {}).get("records_copied", 0) + len(rows)
        copy_state = {"table": table, "key": rows[-1][0], "tombs": tombs,
                      "snapshot": self.copy_snapshot, "copied": copied,
                      # A resumed copy raises no more than this (copyfloors.begun).
                      **({"floors": self.copy_floors} if self.copy_floors else {})}
        cursor = {**self.cursor(int(old.get("seq", 0))), "copy": copy_state}
        definition = self.peer_tables.get(table)
        incarnation = definition.get("version") if isinstance(definition, dict) else None
        incarnation = incarnation if isinstance(incarnation, int) else None
        review = self.host.review(self.peer, self.database)
        keys = [key for key, _ in rows]
        sweeps = self.copy_sweeps.for_chunk(table, tombs, keys)
        job = self.store.apply_rows(self.database, self.peer, table, rows, work.origins, cursor,
                                    self.host.start_floor(self.peer), incarnation, review,
                                    sweeps)
        progress = self.copy_progress
        copy_sweeps = self.copy_sweeps

        def count() -> None:
            # Counted as the chunk commits, also when this task was cancelled meanwhile
            # (a pause): the progress shown until the next session began lagged a chunk
            # behind the rows (and the cursor) committed.
            if progress is not None:
                progress["records_copied"] += len(rows)
            copy_sweeps.advance(table, tombs, keys)

        try:
            await self._write(job, count)
            self._attempts.pop((table, rows[0][0]), None)
            crash_point("copy_chunk")  # a chunk landed, the copy is not done (tests)
        except ClockSkewError:
            self.host.note_skew(self.peer, 1)
            self.owner.clock_skewed()
            raise
        except Exception as exc:
            if not unappliable(exc) or not self._give_up((table, rows[0][0]), exc):
                raise
            # The chunk cannot be applied: its rows go to the dead letters, the copy
            # goes on after them, and raises no floor (those rows are not held here).
            self.copy_floors = {}
            copy_state.pop("floors", None)
            cursor = {**cursor, "copy": copy_state}
            error = describe_error(exc)
            letters = deadletters.row_letters(self.peer, self.database, table, rows,
                                              work.origins, incarnation, error)
            await self._write(self.store.dead_letter(self.database, self.peer, letters,
                                                     cursor))
            self._attempts.pop((table, rows[0][0]), None)
            count()
            self.owner.report_error(f"dead letter: {error}")
            self.host.note_dead_letters(self.peer, self.database, len(letters))
        self.host.note_review(self.peer, self.database, review)
        if self.database == "system":  # users or roles may have changed: tell the login cache
            self.host.logins_changed()


def _copied_before(resume: dict[str, Any] | None, snapshot_seq: int) -> int:
    """The rows copied before a pause, when the copy beginning resumes that copy (the
    same snapshot); else 0."""
    if resume is None or resume.get("snapshot") != snapshot_seq:
        return 0
    return int(resume.get("copied", 0))
