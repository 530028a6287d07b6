"""Bulk CSV loads as jobs, and the job operations.

``csv_data_load``, ``csv_file_load`` and ``csv_url_load`` answer at once with Harper's
``Starting job with id ...``; the job then reads the CSV as a stream, ``BATCH`` records
at a time (fewer when they are large: a batch's log entry must stay well within what a
peer takes in one frame, ``_batch_chars``), and writes each batch as one ordinary
``insert``/``update``/``upsert`` job of the writer thread (logged, so it replicates).
The next batch is parsed (in a worker thread) while the current one is written.

Reading a file on the node or fetching a URL from it is for super users only: table
permissions must not open the node's file system or its network to a role.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from harpsync import csvsource
from harpsync.auth import require_table
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, HarpsyncError, NotFoundError, missing_is_bad_request
from harpsync.jobs import RunningJob
from harpsync.storage import writes
from harpsync.tasks import settle
from operations.data import check_writable

BATCH = 2000
_ACTION_PERMISSIONS = {"insert": ["insert"], "update": ["update"],
                       "upsert": ["insert", "update"]}
_HASHES = {"insert": "inserted_hashes", "update": "update_hashes",
           "upsert": "upserted_hashes"}


def _target(ctx: OpContext, body: dict[str, Any]) -> tuple[str, str, str]:
    """Database, table and action of a load, checked before the job starts."""
    database = str(body.get("database", "data"))
    table = str(body["table"])
    action = str(body.get("action", "insert"))
    require_table(ctx.user, database, table, _ACTION_PERMISSIONS[action])
    check_writable(database)
    with missing_is_bad_request():
        ctx.services.storage.table(database, table)
    return database, table, action


async def _load(ctx: OpContext, job: RunningJob, database: str, table: str, action: str,
                open_batches: Callable[[csvsource.Abort], csvsource.CsvBatches],
                count: Callable[[csvsource.Abort], int] | None) -> dict[str, Any]:
    """Read batches and write them; the job's progress follows each committed batch.

    A file or text is read whole once first (``count``), checking every line, so a
    malformed one fails the job before anything is written. What fails later (a record
    the table refuses, a download cut short) leaves the batches already committed: the
    error says which records were written, and ``result`` holds the counts.
    """
    storage = ctx.services.storage
    user = ctx.user.username
    abort = csvsource.Abort()
    reading: asyncio.Future[Any] | None = None  # the worker thread's call under way
    batches: csvsource.CsvBatches | None = None
    done = written = 0

    def in_thread(call: Callable[[], Any]) -> asyncio.Future[Any]:
        nonlocal reading
        reading = asyncio.ensure_future(asyncio.to_thread(call))
        return reading

    async def result_of(future: asyncio.Future[Any]) -> Any:
        # Shielded: a cancel (the node stopping) must not leave the thread reading a
        # source that the finally clause then closes under it.
        nonlocal reading
        value = await asyncio.shield(future)
        reading = None
        return value

    with missing_is_bad_request():
        incarnation = storage.table(database, table)[1].version  # the table loaded into
    try:
        total = await result_of(in_thread(lambda: count(abort))) if count else None
        job.progress(0, total)
        batches = await result_of(in_thread(lambda: open_batches(abort)))
        pending = in_thread(batches.next_batch)
        while True:
            batch = await result_of(pending)
            if not batch:
                break
            pending = in_thread(batches.next_batch)  # parsed while this one is written
            write = asyncio.ensure_future(storage.write(
                writes.write_records(storage, database, table, batch, action, user,
                                     incarnation=incarnation)))
            try:
                with missing_is_bad_request():  # the table was dropped during the load
                    try:
                        result = await asyncio.shield(write)
                    except asyncio.CancelledError:
                        # The node is stopping: the batch handed to the writer commits
                        # (or fails) anyway; wait for it, so the counts say what landed.
                        await settle(write)
                        if not write.cancelled() and write.exception() is None:
                            done += len(batch)
                            written += len(write.result()[_HASHES[action]])
                            job.progress(done, total)
                        raise
            except HarpsyncError as exc:  # refused (400), too large (413), disk full...
                raise BadRequestError(f"records {done + 1}-{done + len(batch)}: "
                                      f"{exc.message}") from None
            done += len(batch)
            written += len(result[_HASHES[action]])
            job.progress(done, total)
    except BaseException as exc:
        job.record["result"] = _summary(f"loaded {written} of {done} records before the "
                                        f"failure", done, written, action, database, table)
        if isinstance(exc, HarpsyncError):  # a cancel (the node stopping) says so itself
            kept = (f"records 1-{done} were written before the failure and stay ({written} "
                    f"loaded, {done - written} skipped)" if done else "nothing was loaded")
            raise BadRequestError(f"{exc.message}; {kept}") from None
        raise
    finally:
        if reading is not None:  # a read under way: stop a stalled download, wait for it
            abort.fire()
            await settle(reading)
            if batches is None and not reading.cancelled() and reading.exception() is None \
                    and isinstance(reading.result(), csvsource.CsvBatches):
                batches = reading.result()  # opened as the job was stopped
        if batches is not None:
            await asyncio.to_thread(batches.close)
    job.progress(done, done)
    return _summary(f"successfully loaded {written} of {done} records", done, written,
                    action, database, table)


def _summary(message: str, done: int, written: int, action: str, database: str,
             table: str) -> dict[str, Any]:
    return {"message": message, "records": done, "loaded": written,
            "skipped": done - written, "action": action, "database": database,
            "table": table}


def _batch_chars(ctx: OpContext) -> int:
    """Characters of cells per batch: a quarter of the largest log entry a write may make
    leaves room for the records' keys and timestamps (and a character may take 4 bytes
    only in rare text), capped at ``csvsource.BATCH_CHARS`` to keep memory flat."""
    return max(1, min(csvsource.BATCH_CHARS, ctx.services.storage.max_log_entry // 4))


def _start(ctx: OpContext, kind: str, body: dict[str, Any], details: dict[str, Any],
           open_batches: Callable[[csvsource.Abort], csvsource.CsvBatches],
           count: Callable[[csvsource.Abort], int] | None) -> dict[str, Any]:
    database, table, action = _target(ctx, body)
    jobs = ctx.services.jobs

    async def work(job: RunningJob) -> dict[str, Any]:
        return await _load(ctx, job, database, table, action, open_batches, count)

    job_id = jobs.start(kind, ctx.user.username,
                        {"database": database, "table": table, "action": action, **details},
                        work, ctx.user.since)
    return {"message": f"Starting job with id {job_id}", "job_id": job_id}


async def csv_data_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    data = str(body["data"])
    return _start(ctx, "csv_data_load", body, {},
                  lambda _abort: csvsource.from_text(data, BATCH, _batch_chars(ctx)),
                  lambda abort: csvsource.count_rows(csvsource.from_text(data, 1), abort))


async def csv_file_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    path = csvsource.check_file(str(body["file_path"]))
    return _start(ctx, "csv_file_load", body, {"file_path": str(path)},
                  lambda _abort: csvsource.from_file(path, BATCH, _batch_chars(ctx)),
                  lambda abort: csvsource.count_rows(csvsource.from_file(path, 1), abort))


async def csv_url_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    url = csvsource.check_url(str(body["csv_url"]))
    return _start(ctx, "csv_url_load", body, {"csv_url": csvsource.shown_url(url)},
                  lambda abort: csvsource.from_url(url, BATCH, abort, _batch_chars(ctx)),
                  None)


async def get_job(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    job_id = str(body["id"])
    # Another user's job is as absent as a missing one: ids are not to be probed.
    owner = None if ctx.user.super_user else (ctx.user.username, ctx.user.since)
    record = ctx.services.jobs.get(job_id, owner)
    if record is None:
        raise NotFoundError(f"job '{job_id}' not found")
    return [record]


def _moment(body: dict[str, Any], key: str) -> float:
    """A date field as epoch milliseconds: ISO 8601 text, or a number of ms."""
    value = body[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        raise BadRequestError(f"'{key}' must be an ISO 8601 date-time such as "
                              f"2026-01-25T22:05:27.464+0000, got '{str(value)[:40]}'") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() * 1000.0


async def search_jobs_by_start_date(ctx: OpContext, body: dict[str, Any],
                                    ) -> list[dict[str, Any]]:
    start, end = _moment(body, "from_date"), _moment(body, "to_date")
    if end < start:
        raise BadRequestError("'to_date' is before 'from_date'")
    return list(ctx.services.jobs.search(start, end))


OPERATIONS = [
    # The table permission a data load needs depends on its action: checked in _target.
    Operation("csv_data_load", csv_data_load, "any"),
    Operation("csv_file_load", csv_file_load),
    Operation("csv_url_load", csv_url_load),
    Operation("get_job", get_job, "any"),
    Operation("search_jobs_by_start_date", search_jobs_by_start_date),
]
