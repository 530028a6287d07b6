"""The single writer thread: group commit of many requests into one LMDB transaction.

py-lmdb ties a write transaction to its OS thread, and one fsync costs about 1 ms, so
every write goes through this thread. It drains everything queued, runs each job in a
nested child transaction (one bad job aborts alone; a group's only job writes to the
group's transactions directly), commits each touched environment once, and only then
resolves the jobs' futures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import lmdb

from harpsync.errors import ServiceUnavailableError, StorageError
from harpsync.storage import digest, redo
from harpsync.storage.database import Database
from harpsync.storage.keys import seq_key

log = logging.getLogger(__name__)

MAX_GROUP = 2000
# A small write is committed on the event loop itself once this many groups in a row
# held one job each (one client writing, one request at a time), if the writer thread
# is idle: see ``Writer.submit``.
INLINE_AFTER = 4


class WriteContext:
    """What a job sees: one child transaction per database it touches, or, for the only
    job of its group (``direct``), the group's transactions themselves: a child costs a
    begin that zeroes a few hundred KB (LMDB sizes it by ``max_dbs``), and a failure
    then aborts the group's transactions, which hold nothing else."""

    def __init__(self, parents: dict[Database, lmdb.Transaction], direct: bool = False,
                 ) -> None:
        self._parents = parents
        self._direct = direct
        self._children: dict[Database, lmdb.Transaction] = {}
        self._undo: list[Callable[[], object]] = []
        self.after_commit: list[Callable[[], None]] = []
        # Log entries this job appended, ``(database, seq, value)``, for the databases'
        # in-memory log tails once the group commits (``Database.remember_log``).
        self.logged: list[tuple[Database, int, bytes]] = []
        # The newest version this job appended to a transaction log (0: none).
        self.version = 0
        # The database whose transaction the job asked for last: the one a storage
        # failure (a full map) is reported against.
        self.last_db: Database | None = None
        # Ops this job made on local system tables (``redo``): replayed if a crash comes
        # between the commit of a database it wrote and that of ``system``.
        self.system_ops: list[list[Any]] = []
        # ``__meta__`` keys the job wrote that a failed write takes back with its rows
        # (a link's cursor and floors, ``Writer._compensate``).
        self.meta_written: list[tuple[Database, bytes]] = []

    def txn(self, db: Database) -> lmdb.Transaction:
        """The job's write transaction for ``db`` (a child of the group's transaction)."""
        self.last_db = db
        child = self._children.get(db)
        if child is None:
            parent = self._parents.get(db)
            if parent is None:
                parent = db.env.begin(write=True)
                self._parents[db] = parent
            child = parent if self._direct else db.env.begin(write=True, parent=parent)
            self._children[db] = child
        return child

    def on_undo(self, fn: Callable[[], object]) -> None:
        """Register a catalog rollback to run if this job fails."""
        self._undo.append(fn)

    def rollback_catalog(self) -> None:
        """Undo this job's in-memory catalog changes (its transaction never landed)."""
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()

    def _finish(self, ok: bool) -> None:
        if ok:
            try:
                for child in self._children.values():
                    digest.flush(child)  # the table hashes' pending bucket changes
            except Exception:
                self._finish(ok=False)
                raise
        for db, child in self._children.items():
            if not ok:
                digest.discard(child)
                child.abort()
                if self._direct:  # the group's own transaction: nothing to commit
                    self._parents.pop(db, None)
            elif not self._direct:
                child.commit()
        if not ok:
            for fn in reversed(self._undo):
                fn()

    @property
    def databases(self) -> list[Database]:
        return list(self._children)


class _Job:
    __slots__ = ("fn", "prepare", "future", "loop", "small", "result", "error", "dbs", "ctx")

    def __init__(self, fn: Callable[[WriteContext], Any],
                 prepare: Callable[[], None] | None,
                 future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop,
                 small: bool = False) -> None:
        self.fn = fn
        self.prepare = prepare
        self.future = future
        self.loop = loop
        self.small = small
        self.result: Any = None
        self.error: BaseException | None = None
        self.dbs: list[Database] = []
        self.ctx: WriteContext | None = None

    def data_dbs(self, system: Database | None) -> list[Database]:
        """The databases the job wrote, ``system`` only if it wrote nothing else: the
        side whose commit decides whether the job happened (``redo``)."""
        return [db for db in self.dbs if db is not system] or self.dbs


def _resolve(job: _Job) -> None:
    if job.future.done():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.result)


class Writer:
    """Owns the writer thread. ``submit`` is called from the event loop."""

    def __init__(self, on_commit: Callable[[Database], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Jobs submitted during one event-loop iteration go to the thread together: one
        # wake-up (and one GIL hand-over) per iteration instead of one per request.
        self._pending: list[_Job] = []
        self._thread = threading.Thread(target=self._run, name="harpsync-writer", daemon=True)
        self._on_commit = on_commit
        self.commits = 0
        self.jobs = 0
        # Held while a group runs (in the thread, or inline on the event loop).
        self._group_lock = threading.Lock()
        # Jobs handed to the thread and not finished yet (guarded by ``_count_lock``).
        self._count_lock = threading.Lock()
        self._outstanding = 0
        # How many groups in a row held a single job (a heuristic: unguarded).
        self._singles = 0
        self.inline_groups = 0
        # Requests begun so far (set by the node): a small write runs on the loop only
        # if its own request is the one begun since the last group ended, so readers
        # served while a lone writer waits are never held up by a commit.
        self.activity: Callable[[], int] | None = None
        self._activity_mark = 0
        # Told (jobs in the group, seconds its commits took) after every group commit.
        self.on_group: Callable[[int, float], None] | None = None
        # The ``system`` database: committed after every other of a group (``redo``).
        self.system: Database | None = None
        # Set by ``stop`` (guarded by ``_count_lock``): no job is queued after it.
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the jobs handed over so far and end the thread; returns whether it
        ended (within ``timeout``, default: however long they take, so no job is cut off
        and no environment is closed under one).

        A job submitted afterwards, or still waiting to be handed over, fails at once
        with a ``ServiceUnavailableError`` instead of waiting forever.
        """
        with self._count_lock:
            self._stopped = True
        if not self._thread.is_alive():
            self._fail_queued()
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the writer thread is still running a job after %s s", timeout)
            return False
        with self._group_lock:  # a group running inline on the event loop ends first
            self._fail_queued()
        return True

    def _fail_queued(self) -> None:
        """Fail every job the stopped thread will never run."""
        while True:
            try:
                jobs = self._queue.get_nowait()
            except queue.Empty:
                return
            if jobs:
                for job in jobs:
                    job.error = _stopped_error()
                self._deliver(jobs)

    def submit(self, fn: Callable[[WriteContext], Any],
               prepare: Callable[[], None] | None = None,
               small: bool = False) -> asyncio.Future[Any]:
        """Queue ``fn`` to run in the writer thread; the future resolves once durable.

        A ``small`` job (the caller vouches that it is quick: a few records) may instead
        run and commit on the event loop, when it is the only job of its loop iteration,
        the thread is idle, the last ``INLINE_AFTER`` groups held one job each, and no
        other request began since the last group ended (``activity``). One
        client writing one record at a time then costs no hand-over to the thread and
        back (two cross-thread wake-ups, about a tenth of such a request); the loop
        waits for the commit, as the one client does anyway. Concurrent writers make
        groups of several jobs, which keeps them in the thread (group commit).

        Args:
            fn: runs inside the group transaction with a ``WriteContext``.
            prepare: runs first in the writer thread outside any transaction (for
                opening new DBIs or environments).
            small: ``fn`` is quick enough to run on the event loop.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._stopped:
            fut.set_exception(_stopped_error())
            return fut
        if not self._pending:
            loop.call_soon(self._hand_over)
        self._pending.append(_Job(fn, prepare, fut, loop, small and prepare is None))
        return fut

    def _hand_over(self) -> None:
        jobs, self._pending = self._pending, []
        if not jobs:
            return
        if len(jobs) == 1 and jobs[0].small and self._singles >= INLINE_AFTER \
                and self._quiet() and self._run_inline(jobs):
            return
        with self._count_lock:
            if self._stopped:
                for job in jobs:
                    job.error = _stopped_error()
                _resolve_all(jobs)
                return
            self._outstanding += len(jobs)
            self._queue.put(jobs)

    def _quiet(self) -> bool:
        activity = self.activity
        return activity is None or activity() - self._activity_mark <= 1

    def _run_inline(self, jobs: list[_Job]) -> bool:
        """Run ``jobs`` as a group on the calling (event-loop) thread if the writer
        thread has nothing queued or running; returns whether it did."""
        with self._count_lock:
            if self._outstanding or self._stopped:
                return False  # earlier jobs are queued: they commit first, in order
        if not self._group_lock.acquire(blocking=False):
            return False
        try:
            if self._stopped:  # ``stop`` came in between: it may close the environments
                return False
            self._run_group_safely(jobs)
        finally:
            self._group_lock.release()
        self.inline_groups += 1
        _resolve_all(jobs)
        return True

    def run_sync(self, fn: Callable[[WriteContext], Any],
                 prepare: Callable[[], None] | None = None) -> Any:
        """Run a job from a non-async context (start-up); blocks until durable."""
        done = threading.Event()
        box: dict[str, Any] = {}

        class _SyncFuture:
            def done(self) -> bool:
                return False

            def set_result(self, value: Any) -> None:
                box["result"] = value
                done.set()

            def set_exception(self, exc: BaseException) -> None:
                box["error"] = exc
                done.set()

        job = _Job(fn, prepare, _SyncFuture(), None)  # type: ignore[arg-type]
        with self._count_lock:
            if self._stopped:
                raise _stopped_error()
            self._outstanding += 1
            self._queue.put([job])
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = list(first)
            stop = False
            while len(jobs) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.extend(nxt)
            with self._group_lock:
                self._run_group_safely(jobs)
                with self._count_lock:
                    self._outstanding -= len(jobs)
            # Only now: the next write of a lone client must find the thread idle.
            self._deliver(jobs)
            if stop:
                return

    def _run_group_safely(self, jobs: list[_Job]) -> None:
        try:
            self._run_group(jobs)
        except BaseException as exc:  # never let the writer thread die silently
            log.exception("writer group failed")
            for job in jobs:
                if job.error is None:
                    job.error = exc
        self._singles = self._singles + 1 if len(jobs) == 1 else 0
        activity = self.activity
        if activity is not None:
            self._activity_mark = activity()

    def _run_group(self, jobs: list[_Job]) -> None:
        parents: dict[Database, lmdb.Transaction] = {}
        # Prepares open DBIs and environments with their own write transactions, so
        # they all run before the group opens any transaction of its own.
        for job in jobs:
            if job.prepare is not None:
                try:
                    job.prepare()
                except Exception as exc:
                    job.error = storage_failure(exc, None)
        direct = len(jobs) == 1
        for job in jobs:
            if job.error is not None:
                continue
            ctx = WriteContext(parents, direct)
            job.ctx = ctx
            try:
                job.result = job.fn(ctx)
            except Exception as exc:
                job.error = storage_failure(exc, ctx.last_db)
                ctx._finish(ok=False)
                continue
            try:
                ctx._finish(ok=True)
            except Exception as exc:
                job.error = storage_failure(exc, ctx.last_db)
            job.dbs = ctx.databases
        failed: dict[Database, Exception] = {}
        self._stage_redo(jobs, parents, failed)
        commit_started = time.perf_counter()
        # ``system`` last: a crash between leaves the data side's redo of it (``redo``).
        order = sorted(parents.items(), key=lambda item: item[0] is self.system)
        for index, (db, txn) in enumerate(order):
            if index:
                crash_point("between_commits")
            if db in failed:
                txn.abort()
                continue
            if db is self.system and failed:
                self._compensate(jobs, failed, txn)
                if db in failed:
                    txn.abort()
                    continue
            try:
                fault_point(db.name, txn)
                txn.commit()
            except Exception as exc:
                log.error("commit of database %s failed: %s", db.name, exc)
                failed[db] = exc
        commit_seconds = time.perf_counter() - commit_started
        self.commits += 1
        self.jobs += len(jobs)
        # What committed: every entry a job that ran logged in a database whose commit
        # succeeded (a job that failed only elsewhere included: its entries are here).
        logged: dict[Database, list[tuple[int, bytes]]] = {}
        for job in jobs:
            if job.error is None and job.ctx is not None:
                for db, seq, value in job.ctx.logged:
                    if db not in failed:
                        logged.setdefault(db, []).append((seq, value))
        done = [job for job in jobs if job.error is None]
        if failed:
            self._commit_failed(jobs, failed, parents)
        # The group is durable now: nothing below may turn a job into a failure.
        for db in parents:
            if db in failed:
                continue
            try:
                db.remember_log(logged.get(db, []))
            except Exception:
                log.exception("log tail of %s failed", db.name)
                db.forget_log_tail()  # readers go to LMDB
            try:
                db.notify_commit()
                if self._on_commit is not None:
                    self._on_commit(db)
            except Exception:
                log.exception("commit listener of %s failed", db.name)
        # The metrics after the listeners: a publisher sends the new entries first
        # (replication latency).
        if self.on_group is not None:
            try:
                self.on_group(len(jobs), commit_seconds)
            except Exception:
                log.exception("group commit observer failed")
        for job in done:
            if job.ctx is not None and not any(db in failed for db in job.data_dbs(self.system)):
                for fn in job.ctx.after_commit:
                    try:
                        fn()
                    except Exception:
                        log.exception("after-commit hook failed")

    def _commit_failed(self, jobs: list[_Job], failed: dict[Database, Exception],
                       parents: dict[Database, lmdb.Transaction]) -> None:
        """Fail the jobs that wrote a database whose commit failed, and undo the catalog
        changes of those whose data side did not commit.

        A job whose data committed and only ``system`` failed is not undone: its data
        and catalog stand (its system rows are redone, ``redo``); it is still reported,
        as not all of it is written. Undone last job first: a later job's change was
        made over an earlier one's (a drop then a re-create of one table). Log
        sequences come from what is stored: an undo lowered ``next_seq`` below an entry
        that committed, and the next entry went under a taken key (``append_log``).
        """
        for job in reversed(jobs):
            # The database the job wrote that failed first of all (``system`` only when
            # it wrote nothing else that failed: its data's failure is the cause).
            lost = next((db for db in job.data_dbs(self.system) if db in failed),
                        next((db for db in job.dbs if db in failed), None))
            if job.error is not None or lost is None:
                continue
            job.error = storage_failure(failed[lost], lost, StorageError(
                f"the write to database '{lost.name}' could not be committed to storage"))
            if job.ctx is not None and all(db in failed for db in job.data_dbs(self.system)):
                job.ctx.rollback_catalog()
        for db in parents:
            try:
                db.next_seq = db.head_seq + 1
            except Exception:
                log.exception("log head of %s could not be read", db.name)

    def _compensate(self, jobs: list[_Job], failed: dict[Database, Exception],
                    system_txn: lmdb.Transaction) -> None:
        """Take back the ``system`` side of jobs whose data did not commit (``redo``):
        such a job did not happen, so neither its system rows nor its entries in
        ``system``'s log (a database's create) may commit.

        When no other job of the group wrote ``system``, nothing of it commits (its
        cursor and floors too: a peer's create is then asked for again). Otherwise
        the jobs' system rows (their local ones, and the rows of system tables their
        log entries name) and the ``__meta__`` keys they noted (a link's cursor and
        floors, ``meta_written``) are put back as last committed, and their log
        entries removed: a peer's batch is then asked for again whole.
        """
        system = self.system
        assert system is not None
        undone = [job for job in jobs if self._wrote_system(job)
                  and all(db in failed for db in job.data_dbs(system))]
        if not undone:
            return
        if all(job in undone for job in jobs if self._wrote_system(job)):
            lost = next(db for db in undone[0].data_dbs(system) if db in failed)
            failed[system] = failed[lost]
            return
        ops = [op for job in undone if job.ctx is not None
               for op in [*job.ctx.system_ops, *redo.logged_row_ops(job.ctx.logged, system)]]
        meta = [key for job in undone if job.ctx is not None
                for db, key in job.ctx.meta_written if db is system]
        try:
            if ops:
                redo.compensate(system_txn, system, ops)
            redo.restore_meta(system_txn, system, meta)
            for job in undone:
                assert job.ctx is not None
                for db, seq, _value in job.ctx.logged:
                    if db is system:
                        system_txn.delete(seq_key(seq), db=system.txns_dbi)
                job.ctx.logged = [item for item in job.ctx.logged if item[0] is not system]
        except Exception as exc:  # then nothing of system commits
            log.error("taking back system rows of failed writes failed: %s", exc)
            failed[system] = exc

    def _wrote_system(self, job: _Job) -> bool:
        return job.error is None and job.ctx is not None and self.system in job.dbs

    def _stage_redo(self, jobs: list[_Job], parents: dict[Database, lmdb.Transaction],
                    failed: dict[Database, Exception]) -> None:
        """Write, into each database that jobs wrote with ``system``, the redo of their
        system ops (``redo.stage``); a database whose redo cannot be written does not
        commit."""
        system = self.system
        if system is None or system not in parents or len(parents) < 2:
            return
        by_db: dict[Database, list[list[Any]]] = {}
        for job in jobs:
            if job.error is None and job.ctx is not None and job.ctx.system_ops:
                for db in job.dbs:
                    if db is not system:
                        by_db.setdefault(db, []).extend(job.ctx.system_ops)
        for db, ops in by_db.items():
            try:
                redo.stage(parents[system], system, parents[db], db, ops)
            except Exception as exc:
                log.error("redo of database %s's system rows failed: %s", db.name, exc)
                failed[db] = exc  # told as ``storage_failure`` (a full map is named)

    def _deliver(self, jobs: list[_Job]) -> None:
        by_loop: dict[Any, list[_Job]] = {}
        for job in jobs:
            if job.loop is None:
                _resolve(job)
            else:
                by_loop.setdefault(job.loop, []).append(job)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, batch)
            except RuntimeError:
                pass  # the loop is closed; nobody waits


def _stopped_error() -> ServiceUnavailableError:
    return ServiceUnavailableError("the node is shutting down: the write was not made")


def crash_point(name: str) -> None:
    """Die at once, as SIGKILL would, if ``HARPSYNC_CRASH_AT`` names this point (tests of
    crash consistency only: it is read at each point, so a test can arm it late).
    Points: ``between_commits`` (here), ``adopt`` and ``forget_node``
    (``replication/mesh.py``: a join answered but not saved here; a removed peer's
    cursors forgotten but its row not yet deleted), ``copy_chunk``
    (``replication/applier.py``: a full copy's chunk committed, the copy not done)."""
    if os.environ.get("HARPSYNC_CRASH_AT") == name:
        os._exit(137)


def fault_point(database: str, txn: lmdb.Transaction) -> None:
    """Fail the commit of ``txn`` in ``database`` as a full disk does (aborted, with
    ``DiskError``) if ``HARPSYNC_FAIL_COMMIT`` names the database: tests of commit
    failures only (LMDB fails a commit on a full disk or map, which a test cannot aim
    at one environment of several); read at each commit."""
    if os.environ.get("HARPSYNC_FAIL_COMMIT") == database:
        txn.abort()
        raise lmdb.DiskError("mdb_txn_commit", 28)


def storage_failure(exc: Exception, db: Database | None,
                    otherwise: Exception | None = None) -> Exception:
    """What a client is told of ``exc``, raised while writing to ``db``: a database that
    reached ``storage.mapSize``, or a full disk, is a ``StorageError`` (507) that names
    it and says what to do; anything else stays ``exc`` (or becomes ``otherwise``).
    Replication retries a ``StorageError`` instead of dead-lettering the change."""
    where = f"database '{db.name}'" if db is not None else "a database"
    if isinstance(exc, lmdb.MapFullError):
        size = f" ({_mib(db.env.info()['map_size'])})" if db is not None else ""
        return StorageError(f"{where} is full: it reached storage.mapSize{size}; raise "
                            "storage.mapSize and restart the node, or delete data")
    if isinstance(exc, lmdb.DiskError):
        return StorageError(f"no space is left on the disk that holds {where}")
    return exc if otherwise is None else otherwise


def _mib(size: int) -> str:
    return f"{size / 1024**3:g} GiB" if size >= 1024**3 else f"{size / 1024**2:g} MiB"


def _resolve_all(jobs: list[_Job]) -> None:
    for job in jobs:
        _resolve(job)
