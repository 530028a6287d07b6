"""The transaction log of a table: ``read_transaction_log`` and
``delete_transaction_logs_before``, over harpsync's own replication log.

Every committed transaction of a database is one log entry ``[origin, version, user,
ops]``; a table's transactions are the entries with operations on it, whichever node
they came from. ``timestamp`` is the entry's version in milliseconds. Records are the
full records after the write (an update is logged merged), and a delete lists its ids
in ``hash_values``.

Pruning goes through the same job as ``purge_stream``: it records how far the log was
pruned, so a peer whose cursor was behind that point is sent to a full resync instead
of silently missing entries.
"""

from __future__ import annotations

import asyncio
from typing import Any

from harpsync import codec
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError
from harpsync.jobs import RunningJob
from harpsync.storage import retention
from harpsync.storage.database import Database
from harpsync.storage.hlc import COUNTER_BITS, first_version_at, version_to_ms
from operations.data import public_records

DATA_KINDS = ("insert", "update", "upsert", "delete")
CHUNK = 1000
# Every (64-bit) version reads as earlier than this many ms; a later timestamp means
# the same, and one near 1e308 would overflow the conversion to a version.
_AFTER_ALL_MS = float(1 << (64 - COUNTER_BITS))


def _timestamp(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequestError(f"'{key}' must be a timestamp in milliseconds since the epoch")
    return float(value)


def read_entries(db: Database, table: str, primary_key: str, start: float | None,
                 end: float | None, limit: int | None) -> list[dict[str, Any]]:
    """The table's transactions in log order, within ``[start, end]`` (ms), at most
    ``limit`` of them."""
    out: list[dict[str, Any]] = []
    after = 0
    # A table dropped and created again keeps its name, and the log keeps the old
    # incarnation's entries until pruned: they are another table's history (Harper drops
    # a table's log with it). An op names the incarnation it went to (``op[4]``); one
    # covered by the table's drop marker is dead.
    with db.reading() as txn:
        dropped = db.table_marker(txn, table)
    while limit is None or len(out) < limit:
        entries = db.log_after(after, CHUNK)
        for seq, raw in entries:
            after = seq
            _origin, version, user, ops = codec.unpack(raw)
            stamp = version_to_ms(version)
            if (start is not None and stamp < start) or (end is not None and stamp > end):
                continue
            mine = [op for op in ops if op[0] == table and op[1] in DATA_KINDS
                    and not (len(op) > 4 and isinstance(op[4], int) and op[4] <= dropped)]
            # One entry per run of deletes or of writes: a repair or a relayed copy logs
            # both in one transaction, and a delete must not read as an upsert.
            runs: list[list[list[Any]]] = []
            for op in mine:
                if runs and (runs[-1][0][1] == "delete") == (op[1] == "delete"):
                    runs[-1].append(op)
                else:
                    runs.append([op])
            for run in runs:
                kinds = {op[1] for op in run}
                kind = run[0][1] if len(kinds) == 1 else "upsert"
                entry: dict[str, Any] = {"operation": kind, "user": user, "timestamp": stamp}
                if kind == "delete":
                    entry["hash_values"] = [op[2] for op in run]
                    entry["records"] = [{primary_key: op[2]} for op in run]
                else:
                    # Without secret fields (password hashes), as every read of the table.
                    entry["records"] = list(public_records(
                        [op[3] if op[3] is not None else {primary_key: op[2]} for op in run],
                        db.name, table))
                out.append(entry)
                if limit is not None and len(out) >= limit:
                    break
            if limit is not None and len(out) >= limit:
                break
        if len(entries) < CHUNK:
            break
    return out


async def read_transaction_log(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    db_name, table_name = str(body.get("database", "data")), str(body["table"])
    db, table = ctx.services.storage.table(db_name, table_name)
    start, end = _timestamp(body, "from"), _timestamp(body, "to")
    if start is not None and end is not None and end < start:
        raise BadRequestError("'to' is before 'from'")
    limit = body.get("limit")
    return await asyncio.to_thread(read_entries, db, table_name, table.primary_key, start,
                                   end, limit)


async def delete_transaction_logs_before(ctx: OpContext, body: dict[str, Any],
                                         ) -> dict[str, Any]:
    storage = ctx.services.storage
    db_name, table_name = str(body.get("database", "data")), str(body["table"])
    db, _ = storage.table(db_name, table_name)
    stamp = _timestamp(body, "timestamp")
    assert stamp is not None  # the schema requires it

    async def work(job: RunningJob) -> dict[str, Any]:
        # Entries of this table older than the timestamp go (older as read_transaction_log
        # shows their timestamps, to the fraction of a millisecond), wherever they sit in
        # the log; the prune is recorded, so a peer still behind it resyncs.
        cutoff = first_version_at(min(stamp, _AFTER_ALL_MS))
        result = await storage.write(retention.purge_table_job(db, table_name, None, None,
                                                               before_version=cutoff))
        removed = int(result["removed"])
        job.progress(removed, removed)
        return {"message": f"deleted {removed} transaction log entries of "
                           f"'{db_name}.{table_name}' before {stamp:.0f}",
                "removed": removed, "pruned_through": db.pruned_through()}

    job_id = ctx.services.jobs.start("delete_transaction_logs_before", ctx.user.username,
                                     {"database": db_name, "table": table_name}, work,
                                     ctx.user.since)
    return {"message": f"Starting job with id {job_id}", "job_id": job_id}


OPERATIONS = [
    Operation("read_transaction_log", read_transaction_log),
    Operation("delete_transaction_logs_before", delete_transaction_logs_before),
]
