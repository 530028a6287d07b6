"""Dead letters: replicated changes this node could not apply, kept to reprocess.

A change lands here when it cannot be applied (a table still unknown after retries, a
value that cannot be stored) or when a ``dest_wins`` policy refused it. The link's
cursor moves past it in the same transaction, so one bad change never wedges a link.
A row keeps the transaction itself (origin, version, user, ops), so reprocessing
applies it exactly as the link would have, under the policies in force then.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from harpsync import codec
from harpsync.storage import ingest, schema
from harpsync.storage.conflicts import (
    CONFLICTS,
    Review,
    entry_id,
    iso_ms,
    system_delete,
    system_put,
)
from harpsync.storage.database import Database
from harpsync.storage.keys import decode_id
from harpsync.storage.reads import scan
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import WriteContext

DEAD_LETTERS = "hdb_dead_letters"


class RefusedAgainError(ValueError):
    """A reprocessed change was refused by its policy again."""


class DroppedSinceError(ValueError):
    """Every op of a reprocessed change writes to a table dropped after it."""


# Ops that change schema rather than rows of one table incarnation.
_SCHEMA_KINDS = frozenset(("create_table", "drop_table", "create_database", "drop_database"))


def _dropped_since(ctx: WriteContext, db: Database, ops: list[Any]) -> list[str]:
    """The tables ``ops`` write to, when every op is a data op on a table incarnation
    dropped after it (the link skips such ops: the drop superseded them); else []."""
    data = [op for op in ops if isinstance(op, list) and len(op) >= 3
            and op[1] not in _SCHEMA_KINDS]
    if not data or len(data) != len(ops):
        return []
    for op in data:
        if not schema.stale_op(ctx, db, op[0], op[4] if len(op) > 4 else None):
            return []
    return sorted({f"{db.name}.{op[0]}" for op in data})


def dead_letter(peer: str, database: str, origin: str | None, version: int, user: Any,
                ops: list[list[Any]], error: str, failed: list[Any] | None = None,
                ) -> dict[str, Any]:
    """A dead-letter row for a transaction (or one op of it: ``ops`` has one op).

    ``failed`` is the op that could not be applied (its table and id are shown).
    """
    first = failed if failed is not None else (ops[0] if ops else [None, None, None])
    now = time.time() * 1000
    # Every op's table, kind and id: one origin can log several entries of one version
    # (a copy relayed in chunks, rows of one bulk insert), each its own dead letter.
    return {"id": entry_id(database, origin, version, len(ops),
                           *(op[:3] if isinstance(op, list) else op for op in ops)),
            "peer": peer, "database": database, "table": first[0], "record_id": first[2],
            "error": error[:500], "time": iso_ms(now), "timestamp": int(now),
            "node": origin, "version": version, "user": user, "ops": ops}


def refuser(storage: Storage, peer: str,
            ) -> Callable[[WriteContext, Database, list[Any], int, str, str], None]:
    """The ``Review.refuse`` hook: a refused op becomes a dead letter of its own."""

    def refuse(ctx: WriteContext, db: Database, op: list[Any], version: int, origin: str,
               error: str) -> None:
        system_put(ctx, storage, DEAD_LETTERS,
                   dead_letter(peer, db.name, origin, version, None, [list(op)], error, op))

    return refuse


def record_job(storage: Storage, db_name: str, peer: str, rows: Sequence[dict[str, Any]],
               cursor: dict[str, Any]) -> Callable[[WriteContext], int]:
    """A job storing dead letters and moving ``peer``'s cursor past them, together."""

    def job(ctx: WriteContext) -> int:
        for row in rows:
            system_put(ctx, storage, DEAD_LETTERS, row)
        db = storage.databases.get(db_name)
        if db is not None:
            ingest.write_cursor(ctx, db, peer, cursor)
        return len(rows)

    return job


def entry_letters(peer: str, database: str, entries: Sequence[tuple[int, bytes]],
                  origins: Mapping[int, str], error: str) -> list[dict[str, Any]]:
    """Dead letters for undecodable or unappliable log entries (one per entry)."""
    rows = []
    for seq, raw in entries:
        name: str | None
        try:
            origin, version, user, ops = codec.unpack(raw)
            name = origins.get(origin)  # None: cannot be reprocessed (origin unknown)
        except Exception:
            name, version, user, ops = None, 0, None, []
        rows.append({**dead_letter(peer, database, name, int(version), user, list(ops), error),
                     "seq": seq})
    return rows


def row_letters(peer: str, database: str, table: str, rows: Sequence[tuple[bytes, bytes]],
                origins: Mapping[int, str], incarnation: int | None,
                error: str) -> list[dict[str, Any]]:
    """Dead letters for full-copy rows that could not be applied (one per row)."""
    out = []
    for key, raw in rows:
        version, origin, record = codec.unpack(raw)
        op = [table, "delete" if record is None else "upsert", decode_id(key), record,
              incarnation, version]
        out.append(dead_letter(peer, database, origins.get(origin, peer), version, None,
                               [op], error))
    return out


# What a reprocess job answers when it applied only the drop that a create_database of
# the dead letter follows: run it again, as a new job (the old files go after the commit).
AGAIN = -1


def reprocess_job(storage: Storage, row: dict[str, Any], review: Review | None,
                  ) -> tuple[Callable[[WriteContext], int], Callable[[], None]]:
    """A job applying one dead letter again, and its ``prepare`` (opening what its
    creates need); the job deletes the row when it applied, and answers ``AGAIN``
    when it applied only the drop its ``create_database`` follows.

    Raises:
        RefusedAgainError: the policy refused it again (the row stays).
        DroppedSinceError: its table was dropped after it (the row stays).
        UnknownTableError, ValueError, ...: it still cannot be applied.
    """
    opened: list[str] = []
    if review is not None:
        review.skip_seen = False  # received before, by definition: decided anew

    def prepare() -> None:
        ops = row.get("ops")
        if isinstance(ops, list) and all(isinstance(op, list) and len(op) >= 3 for op in ops):
            opened.extend(ingest.prepare_entries(storage, str(row["database"]), [
                (0, str(row.get("node")), 0, None, ops)]))

    def job(ctx: WriteContext) -> int:
        if opened:
            ctx.after_commit.append(lambda: storage.discard_pending(opened))
        db = storage.databases.get(str(row["database"]))
        if db is None:
            raise ingest.UnknownTableError(f"database '{row['database']}' does not exist")
        if not row.get("node") or not row.get("ops"):
            raise ValueError("the change's origin or operations could not be read")
        origin, version = str(row["node"]), int(row["version"])
        dropped = _dropped_since(ctx, db, row["ops"])
        if dropped:  # nothing can apply it, ever: say so and keep the row for the operator
            raise DroppedSinceError(
                f"table{'s' if len(dropped) > 1 else ''} "
                f"{', '.join(repr(t) for t in dropped)} was dropped after this "
                "change: nothing applied (the dead letter is kept; delete_dead_letters "
                "removes it)")
        stats = ingest.ApplyStats()
        origin_id = ingest.local_origin(ctx, db, origin)
        if ingest.drop_first(storage, ctx, row["ops"], version, origin_id, stats):
            return AGAIN
        applied = [op for op in row["ops"] if ingest.apply_op(
            storage, ctx, db, op, version, origin, origin_id, stats, review)]
        if review is not None and review.refused:
            raise RefusedAgainError(f"refused again: {row['error']}")
        if applied:
            storage.append_log(ctx, db, applied, version, origin_id, row.get("user"))
        system_delete(ctx, storage, DEAD_LETTERS, [str(row["id"])])
        return len(applied)

    return job, prepare


async def reprocess(storage: Storage, row: dict[str, Any], review: Review | None) -> int:
    """Apply one dead letter again (``reprocess_job``, twice when a create_database
    first drops the incarnation its creator had seen dropped); the ops applied."""
    for _ in range(3):
        job, prepare = reprocess_job(storage, row, review)
        applied = int(await storage.write(job, prepare))
        if applied != AGAIN:
            return applied
    raise ValueError("the change kept asking for a drop first")


def delete_job(storage: Storage, table: str, ids: list[str]) -> Callable[[WriteContext], int]:
    return lambda ctx: system_delete(ctx, storage, table, ids)


def rows_of(storage: Storage, table: str) -> list[dict[str, Any]]:
    system = storage.databases[SYSTEM]
    return list(scan(system, system.tables[table]))


def count(storage: Storage, table: str) -> int:
    """Rows in a local system table (LMDB's entry count, no scan)."""
    system = storage.databases.get(SYSTEM)
    if system is None or table not in system.tables:
        return 0
    with system.env.begin() as txn:
        return int(txn.stat(system.tables[table].dbi)["entries"])


def select(rows: Iterable[dict[str, Any]], filters: Mapping[str, Any],
           limit: int | None) -> list[dict[str, Any]]:
    """Rows matching every given filter (``node`` matches the peer or the origin),
    oldest first, at most ``limit``."""
    out = []
    for row in rows:
        if any(v is not None and k not in ("node", "error") and row.get(k) != v
               for k, v in filters.items()):
            continue
        node = filters.get("node")
        if node is not None and node not in (row.get("peer"), row.get("node")):
            continue
        if filters.get("error") is not None and filters["error"] not in str(row.get("error")):
            continue
        out.append(row)
    out.sort(key=lambda r: (str(r.get("time")), str(r.get("id"))))
    return out if limit is None else out[:limit]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals by peer, by table and by error, and the oldest and newest entry."""
    ordered = sorted(rows, key=lambda r: (str(r.get("time")), str(r.get("id"))))
    return {
        "total": len(rows),
        "by_peer": dict(Counter(str(r.get("peer")) for r in rows)),
        "by_table": dict(Counter(f"{r.get('database')}.{r.get('table')}" for r in rows)),
        "by_error": dict(Counter(str(r.get("error")) for r in rows)),
        "oldest": ordered[0] if ordered else None,
        "newest": ordered[-1] if ordered else None,
    }


__all__ = ["AGAIN", "CONFLICTS", "DEAD_LETTERS", "DroppedSinceError", "RefusedAgainError",
           "count", "dead_letter", "delete_job", "entry_letters", "record_job", "refuser",
           "reprocess", "reprocess_job", "row_letters", "rows_of", "select", "summary"]
