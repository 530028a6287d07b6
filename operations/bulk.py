"""Bulk CSV loads as jobs, and the job operations.

``csv_data_load``, ``csv_file_load`` and ``csv_url_load`` answer at once with Harper's
``Starting job with id ...``; the job then reads the CSV as a stream, ``BATCH`` records
at a time, and writes each batch as one ordinary ``insert``/``update``/``upsert`` job of
the writer thread (logged, so it replicates). The next batch is parsed (in a worker
thread) while the current one is written.

Reading a file on the node or fetching a URL from it is for super users only: table
permissions must not open the node's file system or its network to a role.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from harpsync import csvsource
from harpsync.auth import require_table
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, NotFoundError, missing_is_bad_request
from harpsync.jobs import RunningJob
from harpsync.storage import writes
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
                open_batches: Callable[[], csvsource.CsvBatches],
                count: Callable[[], int] | None) -> dict[str, Any]:
    """Read batches and write them; the job's progress follows each committed batch."""
    storage = ctx.services.storage
    user = ctx.user.username
    total = await asyncio.to_thread(count) if count is not None else None
    job.progress(0, total)
    batches = await asyncio.to_thread(open_batches)
    done = written = 0
    pending: asyncio.Future[list[dict[str, Any]]] | None = None
    try:
        pending = asyncio.ensure_future(asyncio.to_thread(batches.next_batch))
        while True:
            batch = await pending
            pending = None
            if not batch:
                break
            pending = asyncio.ensure_future(asyncio.to_thread(batches.next_batch))
            try:
                with missing_is_bad_request():  # the table was dropped during the load
                    result = await storage.write(
                        writes.write_records(storage, database, table, batch, action, user))
            except BadRequestError as exc:
                raise BadRequestError(f"records {done + 1}-{done + len(batch)}: "
                                      f"{exc.message}") from None
            done += len(batch)
            written += len(result[_HASHES[action]])
            job.progress(done, total)
    finally:
        if pending is not None:  # let the reader thread finish before closing its source
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
        await asyncio.to_thread(batches.close)
    job.progress(done, done)
    return {"message": f"successfully loaded {written} of {done} records",
            "records": done, "loaded": written, "skipped": done - written,
            "action": action, "database": database, "table": table}


def _start(ctx: OpContext, kind: str, body: dict[str, Any], details: dict[str, Any],
           open_batches: Callable[[], csvsource.CsvBatches],
           count: Callable[[], int] | None) -> dict[str, Any]:
    database, table, action = _target(ctx, body)
    jobs = ctx.services.jobs

    async def work(job: RunningJob) -> dict[str, Any]:
        return await _load(ctx, job, database, table, action, open_batches, count)

    job_id = jobs.start(kind, ctx.user.username,
                        {"database": database, "table": table, "action": action, **details},
                        work)
    return {"message": f"Starting job with id {job_id}", "job_id": job_id}


async def csv_data_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    data = str(body["data"])
    return _start(ctx, "csv_data_load", body, {},
                  lambda: csvsource.from_text(data, BATCH),
                  lambda: csvsource.count_rows(csvsource.from_text(data, 1).text))


async def csv_file_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    path = csvsource.check_file(str(body["file_path"]))
    return _start(ctx, "csv_file_load", body, {"file_path": str(path)},
                  lambda: csvsource.from_file(path, BATCH),
                  lambda: csvsource.count_rows(csvsource.open_file(path)))


async def csv_url_load(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    url = csvsource.check_url(str(body["csv_url"]))
    return _start(ctx, "csv_url_load", body, {"csv_url": csvsource.shown_url(url)},
                  lambda: csvsource.from_url(url, BATCH), None)


async def get_job(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    job_id = str(body["id"])
    record = ctx.services.jobs.get(job_id)
    # Another user's job is as absent as a missing one: ids are not to be probed.
    if record is None or (not ctx.user.super_user and record.get("user") != ctx.user.username):
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
