"""Operator control of replication streams (super_user only): stream status, conflicts
under ``manual_review``, and dead letters."""

from __future__ import annotations

from typing import Any

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, HarpsyncError, NotFoundError
from harpsync.replication.streams import replication_status
from harpsync.storage import conflicts, deadletters
from harpsync.validation import check_attribute_names


async def get_replication_status(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    streams = replication_status(ctx.services.cluster, body.get("node"), body.get("database"))
    return {"streams": streams}


def _filters(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: body.get(k) for k in keys}


async def list_conflicts(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    rows = deadletters.rows_of(ctx.services.storage, deadletters.CONFLICTS)
    found = deadletters.select(rows, _filters(body, ("database", "table", "node")),
                               body.get("limit"))
    return {"conflicts": found, "total": len(rows)}


async def resolve_conflict(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    storage = ctx.services.storage
    found = [r for r in deadletters.rows_of(storage, deadletters.CONFLICTS)
             if r.get("id") == body["id"]]
    if not found:
        raise NotFoundError(f"conflict '{body['id']}' does not exist")
    conflict = found[0]
    record = body.get("record")
    if isinstance(record, dict):
        check_attribute_names(record, "'record'")
    db = storage.databases.get(conflict["database"])
    table = db.tables.get(conflict["table"]) if db is not None else None
    if record is not None and table is not None:
        pk = table.primary_key
        if pk in record and record[pk] != conflict["record_id"]:
            raise BadRequestError(f"'record.{pk}' must be the conflicting record's id "
                                  f"{conflict['record_id']!r}")
    # A conflict of a table dropped since is discarded by the job (nothing written).
    result = await storage.write(conflicts.resolve_job(
        storage, conflict, body.get("keep"), record, ctx.user.username))
    if result.get("discarded"):
        return {"message": f"conflict '{conflict['id']}' discarded: table "
                           f"'{conflict['database']}.{conflict['table']}' was dropped since "
                           "it was recorded; nothing was written",
                "database": conflict["database"], "table": conflict["table"],
                "record_id": conflict["record_id"], "record": None}
    kept = "the given record" if record is not None else f"the {body['keep']} version"
    return {"message": f"conflict '{conflict['id']}' resolved with {kept}",
            "database": conflict["database"], "table": conflict["table"],
            "record_id": conflict["record_id"], "record": result["record"]}


DEAD_LETTER_FILTERS = ("node", "database", "table", "error")


async def list_dead_letters(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    rows = deadletters.rows_of(ctx.services.storage, deadletters.DEAD_LETTERS)
    found = deadletters.select(rows, _filters(body, DEAD_LETTER_FILTERS), None)
    limit = body.get("limit")
    return {"dead_letters": found if limit is None else found[:limit],
            "summary": deadletters.summary(found)}


def _chosen(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    rows = deadletters.rows_of(ctx.services.storage, deadletters.DEAD_LETTERS)
    if body.get("ids") is not None:
        wanted = set(body["ids"])
        rows = [r for r in rows if r.get("id") in wanted]
    return deadletters.select(rows, _filters(body, DEAD_LETTER_FILTERS), body.get("limit"))


async def reprocess_dead_letters(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    """Apply the chosen dead letters again, each in its own transaction: those that
    apply (or lose to a newer version, as any replicated change may) are removed."""
    storage, rep = ctx.services.storage, ctx.services.cluster
    succeeded, failures = 0, []
    for row in _chosen(ctx, body):
        review = rep.review(str(row.get("peer")), str(row.get("database")))
        try:
            await deadletters.reprocess(storage, row, review)
            succeeded += 1
        except (ValueError, HarpsyncError, TypeError, KeyError, IndexError) as exc:
            failures.append({"id": row.get("id"), "error": str(exc)[:300]})
    total = succeeded + len(failures)
    return {"message": f"reprocessed {succeeded} of {total} dead letters",
            "succeeded": succeeded, "failed": len(failures), "failures": failures}


async def delete_dead_letters(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("ids") is None and not body.get("all") \
            and all(body.get(k) is None for k in DEAD_LETTER_FILTERS):
        raise BadRequestError("give 'ids', a filter (node, database, table, error) or "
                              "'all': true")
    ids = [str(r["id"]) for r in _chosen(ctx, body)]
    storage = ctx.services.storage
    deleted = await storage.write(deadletters.delete_job(storage, deadletters.DEAD_LETTERS,
                                                         ids))
    return {"message": f"deleted {deleted} dead letters", "deleted": deleted}


OPERATIONS = [
    Operation("get_replication_status", get_replication_status),
    Operation("list_conflicts", list_conflicts),
    Operation("resolve_conflict", resolve_conflict),
    Operation("list_dead_letters", list_dead_letters),
    Operation("reprocess_dead_letters", reprocess_dead_letters),
    Operation("delete_dead_letters", delete_dead_letters),
]
