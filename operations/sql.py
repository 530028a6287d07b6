"""The ``sql`` operation: SELECT, INSERT, UPDATE and DELETE on one table.

Reads use the primary key when the WHERE clause names the ids (``pk = v``, ``pk IN
(...)``), and a streaming scan otherwise. Writes go through the same writer-thread jobs
as ``insert``, ``update`` and ``delete``, so they are logged and replicate. UPDATE and
DELETE re-check each record inside the write job, so a record changed since the scan
is judged by what it holds when it is written. Such a statement is written in chunks,
each its own transaction, so an UPDATE's new values are checked storable during the scan:
a value that cannot be stored is a 400 before any chunk is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from harpsync import codec
from harpsync.auth import require_table
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, missing_is_bad_request
from harpsync.sql import parser
from harpsync.sql.expr import Expr, column_names
from harpsync.sql.plan import Delete, Insert, Select, Update, key_lookup, matches, run_select
from harpsync.storage import reads, writes
from harpsync.storage.database import Database, Table
from harpsync.storage.keys import encode_id
from harpsync.storage.records import get_live
from harpsync.storage.writer import WriteContext
from harpsync.validation import check_attribute_names
from operations.data import OFFLOAD_ROWS, check_writable, known_attributes, public_records

# Records an UPDATE or DELETE changes per write job: bounded transactions, and the writer
# is never held for long by one statement.
WRITE_CHUNK = 1000
_PERMISSION = {Select: "read", Insert: "insert", Update: "update", Delete: "delete"}


async def sql(ctx: OpContext, body: dict[str, Any]) -> Any:
    text = body["sql"]
    statement = parser.parse(text)
    target = statement.table
    require_table(ctx.user, target.database, target.table, [_PERMISSION[type(statement)]])
    if isinstance(statement, Select):
        return await _select(ctx, statement)
    check_writable(target.database)
    with missing_is_bad_request():  # as for insert/update/delete: a missing table is 400
        _, table = ctx.services.storage.table(target.database, target.table)
        if _reads_values(statement, table.primary_key):
            require_table(ctx.user, target.database, target.table, ["read"])
        if isinstance(statement, Insert):
            return await _insert(ctx, statement)
        if isinstance(statement, Update):
            return await _update(ctx, statement)
        return await _delete(ctx, statement)


def _lookup(where: Expr | None, table: Table) -> list[Any] | None:
    """The primary keys ``where`` names, each once (``1`` and ``1.0`` are one key), or
    None when the table must be scanned."""
    ids = key_lookup(where, table.primary_key)
    if ids is None:
        return None
    seen: set[bytes] = set()
    out = []
    for rid in ids:
        try:
            key = encode_id(rid)
        except BadRequestError:  # no record can have it
            continue
        if key not in seen:
            seen.add(key)
            out.append(rid)
    return out


def _reads_values(statement: Insert | Update | Delete, primary_key: str) -> bool:
    """Whether a write reads attribute values: a WHERE or SET expression naming a column
    other than the primary key. Its answer (which ids matched, or a 400 for a value out of
    range) tells what the records hold, so it needs ``read`` as well: a role that may only
    update or delete learns no more than ``update`` and ``delete`` by id would tell it."""
    if isinstance(statement, Insert):
        return False
    names = column_names(statement.where)
    if isinstance(statement, Update):
        for _, expr in statement.assignments:
            names |= column_names(expr)
    return bool(names - {primary_key})


async def _offload(db: Database, table: Table, scanning: bool, fn: Any) -> Any:
    if scanning and db.table_size(table)[0] > OFFLOAD_ROWS:
        return await asyncio.to_thread(fn)
    return fn()


async def _select(ctx: OpContext, plan: Select) -> list[dict[str, Any]]:
    db_name, table_name = plan.table.database, plan.table.table
    db, table = ctx.services.storage.table(db_name, table_name)
    ids = _lookup(plan.where, table)

    def run() -> list[dict[str, Any]]:
        found = reads.get_by_ids(db, table, ids) if ids is not None else reads.scan(db, table)
        return run_select(plan, public_records(found, db_name, table_name),
                          known_attributes(db_name, table))

    return list(await _offload(db, table, ids is None, run))


async def _insert(ctx: OpContext, plan: Insert) -> dict[str, Any]:
    storage = ctx.services.storage
    check_attribute_names(plan.columns, "SQL INSERT")
    records = [dict(zip(plan.columns, row, strict=True)) for row in plan.rows]
    job = writes.write_records(storage, plan.table.database, plan.table.table, records,
                               "insert", ctx.user.username)
    return dict(await storage.write(job))


async def _matching_ids(ctx: OpContext, db_name: str, table_name: str,
                        where: Expr | None,
                        check: Callable[[dict[str, Any]], None] | None = None) -> list[Any]:
    """The ids of the records ``where`` matches now (by key when it names them);
    ``check`` is called with each, to refuse the statement before anything is written."""
    db, table = ctx.services.storage.table(db_name, table_name)
    pk = table.primary_key
    ids = _lookup(where, table)

    def run() -> list[Any]:
        found = reads.get_by_ids(db, table, ids) if ids is not None else reads.scan(db, table)
        out = []
        for record in found:
            if matches(where, record):
                if check is not None:
                    check(record)
                out.append(record[pk])
        return out

    return list(await _offload(db, table, ids is None, run))


def _live_matches(ctx: WriteContext, storage: Any, db_name: str, table_name: str,
                  ids: list[Any], where: Expr | None) -> list[tuple[Any, dict[str, Any]]]:
    """Inside a write job: the records of ``ids`` that exist and still match."""
    db, table = storage.table(db_name, table_name)
    txn = ctx.txn(db)
    out = []
    for rid in ids:
        live = get_live(txn, table, encode_id(rid))
        if live is not None and live[2] is not None and matches(where, live[2]):
            out.append((rid, live[2]))
    return out


async def _update(ctx: OpContext, plan: Update) -> dict[str, Any]:
    storage = ctx.services.storage
    db_name, table_name = plan.table.database, plan.table.table
    _, table = storage.table(db_name, table_name)
    pk = table.primary_key
    if any(name == pk for name, _ in plan.assignments):
        raise BadRequestError(f"SQL: UPDATE cannot change the primary key '{pk}'")
    check_attribute_names([name for name, _ in plan.assignments], "SQL UPDATE")
    user = ctx.user.username
    updated: list[Any] = []

    def storable(record: dict[str, Any]) -> None:
        # Each chunk commits on its own: a value that cannot be stored must be found
        # before the first one, or the statement would be answered 400 half-applied.
        change = {name: expr.eval(record) for name, expr in plan.assignments}
        try:
            codec.pack(change)
        except (OverflowError, ValueError) as exc:
            raise BadRequestError(f"SQL: UPDATE of record {str(record[pk])[:60]!r} sets a "
                                  f"value that cannot be stored: {exc}") from None

    ids = await _matching_ids(ctx, db_name, table_name, plan.where, storable)
    for start in range(0, len(ids), WRITE_CHUNK):
        chunk = ids[start:start + WRITE_CHUNK]

        def job(wctx: WriteContext, chunk: list[Any] = chunk) -> dict[str, Any]:
            records = []
            for rid, record in _live_matches(wctx, storage, db_name, table_name, chunk,
                                             plan.where):
                change = {name: expr.eval(record) for name, expr in plan.assignments}
                change[pk] = rid
                records.append(change)
            return writes.write_records(storage, db_name, table_name, records, "update",
                                        user)(wctx)

        result = await storage.write(job)
        updated.extend(result["update_hashes"])
    return {"message": f"updated {len(updated)} of {len(updated)} records",
            "update_hashes": updated, "skipped_hashes": []}


async def _delete(ctx: OpContext, plan: Delete) -> dict[str, Any]:
    storage = ctx.services.storage
    db_name, table_name = plan.table.database, plan.table.table
    user = ctx.user.username
    deleted: list[Any] = []
    ids = await _matching_ids(ctx, db_name, table_name, plan.where)
    for start in range(0, len(ids), WRITE_CHUNK):
        chunk = ids[start:start + WRITE_CHUNK]

        def job(wctx: WriteContext, chunk: list[Any] = chunk) -> dict[str, Any]:
            live = [rid for rid, _ in _live_matches(wctx, storage, db_name, table_name,
                                                     chunk, plan.where)]
            return writes.delete_records(storage, db_name, table_name, live, user)(wctx)

        result = await storage.write(job)
        deleted.extend(result["deleted_hashes"])
    noun = "record" if len(deleted) == 1 else "records"
    return {"message": f"{len(deleted)} of {len(deleted)} {noun} successfully deleted",
            "deleted_hashes": deleted, "skipped_hashes": []}


OPERATIONS = [
    # Which table permission applies depends on the statement: checked in the handler.
    Operation("sql", sql, "any"),
]
