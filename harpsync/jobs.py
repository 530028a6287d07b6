"""Background jobs (CSV loads): start, progress, result, and what a restart leaves.

A job answers its request at once and runs as an asyncio task. Its record (Harper's
``hdb_job`` fields plus ``progress``, ``result`` and ``error``) is kept current in memory
and saved to the :class:`JobStore` when it starts and when it ends (flushed to disk),
and at each progress report (written, not flushed: it survives the process dying, and
costs the event loop no fsync), so a job the process died under tells how far it got.
A job the node stopped under, cleanly or by a crash, reads as ``ERROR`` with a "failed
(interrupted)" message, never as in progress.

Finished records are kept ``KEEP_FOR_MS`` (30 days) and at most about ``KEEP_JOBS``
(10,000) of them, the oldest going first: pruned at start, then after a job ends once
an hour, or as soon as the store holds a tenth more than ``KEEP_JOBS`` (so a busy node
does not scan the store after every job). A job in progress is never pruned.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harpsync.errors import HarpsyncError
from harpsync.storage.jobs import COMPLETE, ERROR, IN_PROGRESS, JobStore
from harpsync.tasks import end_tasks

log = logging.getLogger(__name__)

KEEP_FOR_MS = 30 * 86_400_000.0
KEEP_JOBS = 10_000
PRUNE_EVERY = 3600.0  # seconds
USER_SINCE = "user_since"  # kept in the record, never shown
INTERRUPTED = "failed (interrupted): the node stopped before the job finished"


def now_ms() -> float:
    return time.time() * 1000.0


def iso(ms: float | None) -> str | None:
    """Milliseconds since the epoch as Harper's ``..._converted`` text."""
    if ms is None:
        return None
    stamp = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class RunningJob:
    """What a job's work sees: its record and a way to report progress."""

    def __init__(self, record: dict[str, Any], store: JobStore) -> None:
        self.record = record
        self._store = store

    @property
    def id(self) -> str:
        return str(self.record["id"])

    def progress(self, done: int, total: int | None = None) -> None:
        """Records done so far (and the total once known); saved, not flushed."""
        progress = self.record["progress"]
        progress["records"] = done
        if total is not None:
            progress["total"] = total
        self.record["__updatedtime__"] = now_ms()
        self.save(durable=False)

    def save(self, durable: bool = True) -> None:
        self._store.put(self.record, durable)


Work = Callable[[RunningJob], Awaitable[dict[str, Any]]]


class JobManager:
    """Starts jobs, answers ``get_job`` and ``search_jobs_by_start_date``."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.running: dict[str, RunningJob] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._pruned = time.monotonic()

    @classmethod
    def open(cls, path: Path) -> JobManager:
        """Open the store; jobs left in progress by the last run become failed, and
        finished ones past retention go."""
        store, aside = JobStore.open_or_reset(path)
        if aside is not None:
            log.error("the job store %s could not be read; it was moved to %s and a new "
                      "one started (past jobs are no longer listed)", path, aside)
        left = store.interrupt_unfinished(INTERRUPTED, now_ms())
        if left:
            log.warning("%d job(s) were interrupted by the last stop: %s", len(left),
                        ", ".join(left))
        manager = cls(store)
        manager.prune()
        return manager

    def prune(self) -> int:
        """Drop finished records past ``KEEP_FOR_MS`` or beyond the newest ``KEEP_JOBS``."""
        self._pruned = time.monotonic()
        removed = self.store.prune(now_ms() - KEEP_FOR_MS, KEEP_JOBS)
        if removed:
            log.info("pruned %d finished job record(s)", removed)
        return removed

    def _prune_due(self) -> bool:
        return (time.monotonic() - self._pruned >= PRUNE_EVERY
                or self.store.count() > KEEP_JOBS + max(1, KEEP_JOBS // 10))

    def start(self, kind: str, user: str, details: dict[str, Any], work: Work,
              user_since: int = 0) -> str:
        """Record a new job, start ``work`` in the background, return the job id.

        ``user_since`` tells that user from a later one of the same name (``get``)."""
        stamp = now_ms()
        record: dict[str, Any] = {
            "id": str(uuid.uuid4()), "user": user, "type": kind, "status": IN_PROGRESS,
            "job_body": None, "message": None, "created_datetime": stamp,
            "start_datetime": stamp, "end_datetime": None, "__createdtime__": stamp,
            "__updatedtime__": stamp, "progress": {"records": 0, "total": None},
            "result": None, "error": None, **details, USER_SINCE: user_since,
        }
        job = RunningJob(record, self.store)
        job.save()
        self.running[job.id] = job
        self.tasks[job.id] = asyncio.create_task(self._run(job, work), name=f"job-{job.id}")
        return job.id

    async def _run(self, job: RunningJob, work: Work) -> None:
        record = job.record
        try:
            result = await work(job)
        except asyncio.CancelledError:
            self._finish(job, ERROR, INTERRUPTED, error=INTERRUPTED)
            raise
        except HarpsyncError as exc:
            self._finish(job, ERROR, exc.message, error=exc.message)
        except Exception as exc:  # the job fails; the node and other jobs go on
            log.exception("job %s failed", job.id)
            message = f"{type(exc).__name__}: {exc}"
            self._finish(job, ERROR, message, error=message)
        else:
            record["result"] = result
            self._finish(job, COMPLETE, str(result.get("message", "")))
        finally:
            self.running.pop(job.id, None)
            self.tasks.pop(job.id, None)

    def _finish(self, job: RunningJob, status: str, message: str,
                error: str | None = None) -> None:
        stamp = now_ms()
        job.record.update(status=status, message=message, error=error, end_datetime=stamp,
                          __updatedtime__=stamp)
        try:
            job.save()
        except Exception:  # the store is closed under a stopping node; restart marks it
            log.warning("could not save the end of job %s", job.id)
            return
        try:
            if self._prune_due():
                self.prune()
        except Exception:  # retention is housekeeping: the job's end is saved
            log.exception("could not prune the job records")

    @staticmethod
    def view(record: dict[str, Any]) -> dict[str, Any]:
        """A record as Harper shows it, with the ``..._converted`` times."""
        shown = {k: v for k, v in record.items() if k != USER_SINCE}
        return {**shown, "start_datetime_converted": iso(record.get("start_datetime")),
                "end_datetime_converted": iso(record.get("end_datetime"))}

    def get(self, job_id: str, owner: tuple[str, int] | None = None,
            ) -> dict[str, Any] | None:
        """The job as shown, or None; with ``owner`` (user name, the user row's creation
        time), None unless that user started it: a name dropped and given to someone
        else since is another user."""
        running = self.running.get(job_id)
        record = dict(running.record) if running else self.store.get(job_id)
        if record is None:
            return None
        if owner is not None and (record.get("user") != owner[0]
                                  or record.get(USER_SINCE, owner[1]) != owner[1]):
            return None
        return self.view(record)

    def search(self, start_ms: float, end_ms: float) -> list[dict[str, Any]]:
        """Jobs that started within ``[start_ms, end_ms]``, oldest first."""
        records = {r["id"]: r for r in self.store.all()}
        for job_id, job in list(self.running.items()):
            records[job_id] = dict(job.record)
        found = [r for r in records.values()
                 if start_ms <= float(r.get("start_datetime") or 0) <= end_ms]
        found.sort(key=lambda r: float(r.get("start_datetime") or 0))
        return [self.view(r) for r in found]

    async def stop(self) -> None:
        """Cancel running jobs (each is saved as interrupted), then close the store."""
        tasks = list(self.tasks.values())
        await end_tasks(tasks)
        self.store.close()
