"""Data operations: writes through the writer thread, reads from read transactions."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Any

from harpsync import query
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, missing_is_bad_request
from harpsync.storage import reads, writes
from harpsync.storage.database import TIME_ATTRIBUTES, Table
from harpsync.storage.store import SYSTEM
from harpsync.validation import check_attribute_names, record_attributes

# Scans of tables larger than this run in a worker thread, off the event loop.
OFFLOAD_ROWS = 5000
# Writes of at most this many records are quick enough to commit on the event loop
# when one client writes alone (``Writer.submit``).
SMALL_WRITE = 16


def _target(body: dict[str, Any]) -> tuple[str, str]:
    return str(body.get("database", "data")), str(body["table"])


# Secrets that system tables hold and reads never return: password hashes, and peer
# credentials kept with ``retain_authorization``.
_SECRET_FIELDS = {"hdb_user": "password", "hdb_nodes": "authorization"}


def _public(records: Iterable[dict[str, Any]], body: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Drop secret fields; applied before any predicate, so none can probe them."""
    if body.get("database") != SYSTEM or body.get("table") not in _SECRET_FIELDS:
        return records
    secret = _SECRET_FIELDS[body["table"]]
    return ({k: v for k, v in r.items() if k != secret} for r in records)


def public_records(records: Iterable[dict[str, Any]], database: str,
                   table: str) -> Iterable[dict[str, Any]]:
    """``records`` of ``database.table`` without the secret fields system tables hold."""
    return _public(records, {"database": database, "table": table})


# known_attributes of each table, kept until the table's attribute list changes (every
# schema change assigns a new list): search_by_id asks on every request.
_KNOWN: dict[int, tuple[weakref.ref[Table], str, list[str], int, list[str]]] = {}


def known_attributes(database: str, table: Table) -> list[str]:
    """Every attribute ``table`` knows (secrets left out), as ``get_attributes: ["*"]``
    returns them: a record without one shows it as null, as Harper does.

    The list is shared between calls: callers must not change it.
    """
    attributes = table.attributes
    cached = _KNOWN.get(id(table))
    if (cached is not None and cached[0]() is table and cached[1] == database
            and cached[2] is attributes and cached[3] == len(attributes)):
        return cached[4]
    secret = _SECRET_FIELDS.get(table.name) if database == SYSTEM else None
    names = dict.fromkeys([table.primary_key, *TIME_ATTRIBUTES, *attributes])
    known = [name for name in names if name != secret]
    if len(_KNOWN) > 10_000:  # dropped tables leave dead entries behind
        _KNOWN.clear()
    _KNOWN[id(table)] = (weakref.ref(table), database, attributes, len(attributes), known)
    return known


def check_writable(database: str) -> None:
    """Refuse direct writes to the ``system`` database (400)."""
    _writable({"database": database, "table": ""})


def _writable(body: dict[str, Any]) -> tuple[str, str]:
    db, table = _target(body)
    if db == SYSTEM:
        # Users, roles and nodes have their own operations, which hash passwords and
        # keep the replication state in step with the rows.
        raise BadRequestError("the 'system' database is changed only through its own "
                              "operations (add_user, add_role, add_node, ...)")
    return db, table


async def _write(ctx: OpContext, body: dict[str, Any], mode: str) -> dict[str, Any]:
    storage = ctx.services.storage
    db, table = _writable(body)
    with missing_is_bad_request():  # Harper answers a write to a missing table with 400
        storage.table(db, table)  # fail fast, before queueing
        records = body["records"]
        check_attribute_names(record_attributes(records), "'records'")
        job = writes.write_records(storage, db, table, records, mode, ctx.user.username)
        result: dict[str, Any] = await storage.write(job, small=len(records) <= SMALL_WRITE)
    return result


async def insert(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return await _write(ctx, body, "insert")


async def update(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return await _write(ctx, body, "update")


async def upsert(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return await _write(ctx, body, "upsert")


async def delete(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    storage = ctx.services.storage
    db, table = _writable(body)
    with missing_is_bad_request():
        storage.table(db, table)
        ids = body["ids"]
        result: dict[str, Any] = await storage.write(
            writes.delete_records(storage, db, table, ids, ctx.user.username),
            small=len(ids) <= SMALL_WRITE)
    return result


async def search_by_id(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    db, table = ctx.services.storage.table(*_target(body))
    attrs = body.get("get_attributes")
    found = _public(reads.get_by_ids(db, table, body["ids"]), body)
    known = known_attributes(db.name, table)
    return [query.project(r, attrs, known) for r in found]


async def _scan(ctx: OpContext, body: dict[str, Any], predicate: query.Predicate,
                sort: dict[str, Any] | None) -> list[dict[str, Any]]:
    db, table = ctx.services.storage.table(*_target(body))

    def run() -> list[dict[str, Any]]:
        return query.select(_public(reads.scan(db, table), body), predicate,
                            body.get("get_attributes"), sort, body.get("offset", 0),
                            body.get("limit"), known_attributes(db.name, table))

    if db.table_size(table)[0] > OFFLOAD_ROWS:
        return await asyncio.to_thread(run)
    return run()


async def search_by_value(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    predicate = query.value_predicate(body["attribute"], body["value"])
    return await _scan(ctx, body, predicate, None)


async def search_by_conditions(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    predicate = query.conditions_predicate(body.get("operator", "and"), body["conditions"])
    sort = body.get("sort")
    if sort is not None:
        query.sort_levels(sort)  # a bad level is a 400 before the scan
    return await _scan(ctx, body, predicate, sort)


OPERATIONS = [
    Operation("insert", insert, ["insert"]),
    Operation("update", update, ["update"]),
    Operation("upsert", upsert, ["insert", "update"]),
    Operation("delete", delete, ["delete"]),
    Operation("search_by_id", search_by_id, ["read"]),
    Operation("search_by_value", search_by_value, ["read"]),
    Operation("search_by_conditions", search_by_conditions, ["read"]),
]
