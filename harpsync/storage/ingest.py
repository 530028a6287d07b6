"""Applying what peers send: log entries and full-copy rows, by last writer wins.

Applying is idempotent and order-independent: a write lands only if its
``(version, origin name)`` beats what is stored, and an entry none of whose operations
landed is not logged again, so a transaction that arrives twice is counted once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harpsync import codec
from harpsync.storage.database import CURSOR_PREFIX, HW_PREFIX, ORIGIN_PREFIX, Database
from harpsync.storage.hlc import ClockSkewError
from harpsync.storage.keys import encode_id
from harpsync.storage.records import get_stored, incoming_wins, put_record, put_tombstone
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import WriteContext
from harpsync.storage.writes import note_attributes

log = logging.getLogger(__name__)


class UnknownTableError(ValueError):
    """A peer sent rows of a table this node has not learned yet.

    The whole batch (and its cursor) is rolled back; the link reconnects, and the new
    hello creates the table before the same entries are applied again.
    """


@dataclass
class ApplyStats:
    """What one apply job did, for ``cluster_status`` counters."""

    entries: int = 0
    applied: int = 0
    ops_applied: int = 0
    last_version: int = 0
    skewed: int = 0
    # Set when an entry was held back for clock skew: the cursor committed with the job.
    skew_error: ClockSkewError | None = None
    cursor_seq: int | None = None
    created_tables: list[str] = field(default_factory=list)


def local_origin(ctx: WriteContext, db: Database, name: str) -> int:
    """The local origin id for node ``name`` in ``db``, assigning one if new."""
    oid = db.origin_ids.get(name)
    if oid is not None:
        return oid
    # Never reuse an id, even one whose job rolled back: a publisher may have
    # announced it to a peer already.
    oid = max(max(db.origin_names, default=0), db.origin_high) + 1
    db.origin_high = oid
    db.origin_ids[name] = oid
    db.origin_names[oid] = name

    def undo() -> None:
        db.origin_ids.pop(name, None)
        db.origin_names.pop(oid, None)

    ctx.on_undo(undo)
    ctx.txn(db).put(ORIGIN_PREFIX + name.encode(), codec.pack(oid), db=db.meta_dbi)
    return oid


def write_cursor(ctx: WriteContext, db: Database, peer: str, cursor: dict[str, Any]) -> None:
    """Commit the replication cursor for ``peer`` in the same transaction as the data."""
    ctx.txn(db).put(CURSOR_PREFIX + peer.encode(), codec.pack(cursor), db=db.meta_dbi)


def note_origin_versions(ctx: WriteContext, db: Database, seen: Mapping[str, int]) -> None:
    """Raise each origin's high-water version (received by any path) with the job.

    A link asks each origin for versions above its high-water mark only, so a
    transaction that arrived through a relay is not sent again by its origin.
    """
    for name, version in seen.items():
        old = db.origin_hw.get(name, 0)
        if version <= old:
            continue
        db.origin_hw[name] = version
        ctx.on_undo(lambda n=name, o=old: db.origin_hw.__setitem__(n, o))
        ctx.txn(db).put(HW_PREFIX + name.encode(), codec.pack(version), db=db.meta_dbi)


def forget_cursor(ctx: WriteContext, db: Database, peer: str) -> None:
    """Delete the replication cursor for ``peer`` (it was removed from the cluster)."""
    ctx.txn(db).delete(CURSOR_PREFIX + peer.encode(), db=db.meta_dbi)


def _apply_op(storage: Storage, ctx: WriteContext, db: Database, op: list[Any], version: int,
              origin_name: str, origin_id: int, stats: ApplyStats) -> bool:
    table_name, kind, rid, value = op
    if kind == "create_table":
        if table_name in db.tables:
            return False
        handles = storage.pending_handles.pop((db.name, table_name), None)
        if handles is None:
            return False
        fn, _ = storage._create_table_job(db.name, table_name, value["primary_key"],
                                          list(value.get("attributes", [])), log_it=False,
                                          version=version, exists_ok=True, handles=handles)
        fn(ctx)
        stats.created_tables.append(table_name)
        return True
    if kind == "drop_table":
        table = db.tables.get(table_name)
        if table is None or table.version > version:
            return False
        storage.drop_table_in(ctx, db, table_name, version, origin_id, log_it=False)
        return True
    if kind in ("create_database", "drop_database"):
        return _apply_database_op(storage, ctx, kind, rid, version, origin_id)
    table = db.tables.get(table_name)
    if table is None:
        if db.was_dropped(ctx.txn(db), table_name):
            return False  # a write racing a drop: the table is gone everywhere
        raise UnknownTableError(f"table '{db.name}.{table_name}' is not known here yet")
    txn = ctx.txn(db)
    key = encode_id(rid)
    if not incoming_wins(db, get_stored(txn, table, key), version, origin_name):
        return False
    if kind == "delete" or value is None:
        put_tombstone(txn, table, key, version, origin_id)
    else:
        put_record(txn, table, key, version, origin_id, value)
        note_attributes(ctx, db, table, [value])
    return True


def _apply_database_op(storage: Storage, ctx: WriteContext, kind: str, name: str,
                       version: int, origin_id: int) -> bool:
    if kind == "create_database":
        if name in storage.databases:
            return False
        pending = storage.pending_envs.pop(name, None)
        if pending is None:
            return False
        storage._register_database(ctx, pending)
        return True
    if name not in storage.databases or name == SYSTEM:
        return False
    storage.drop_database_in(ctx, name, version, origin_id, log_it=False)
    return True


def prepare_entries(storage: Storage, db_name: str,
                    decoded: Sequence[tuple[int, str, int, Any, list[list[Any]]]]) -> None:
    """Open DBIs and environments that the entries will create (outside any txn)."""
    db = storage.databases.get(db_name)
    if db is None:
        return
    for _seq, _origin, _version, _user, ops in decoded:
        for table_name, kind, rid, _value in ops:
            if kind == "create_table":  # also when it exists: a drop may precede it
                storage.pending_handles[(db_name, table_name)] = db.open_table_handles(table_name)
            elif kind == "create_database" and rid not in storage.databases:
                if rid not in storage.pending_envs:
                    storage.pending_envs[rid] = storage._open_env(rid)


def decode_entries(entries: Sequence[tuple[int, bytes]], origins: Mapping[int, str],
                   local_name: str) -> list[tuple[int, str, int, Any, list[list[Any]]]]:
    """Decode ``(seq, stored bytes)`` into ``(seq, origin name, version, user, ops)``."""
    out = []
    for seq, raw in entries:
        origin, version, user, ops = codec.unpack(raw)
        name = origins.get(origin)
        if name is None:
            raise ValueError(f"log entry {seq} names unknown origin id {origin}")
        if name == local_name:
            continue
        out.append((seq, name, version, user, ops))
    return out


def apply_entries_job(storage: Storage, db_name: str, peer: str,
                      entries: Sequence[tuple[int, bytes]], origins: Mapping[int, str],
                      cursor: dict[str, Any], max_skew_ms: int, local_name: str,
                      floor: int = 0,
                      ) -> tuple[Callable[[WriteContext], ApplyStats], Callable[[], None]]:
    """A writer job applying a peer's log entries and committing ``cursor`` with them.

    Decoding happens in the writer thread (in ``prepare``), off the event loop.
    Entries older than ``floor`` (a ``start_time`` version) are skipped.
    """
    decoded: list[tuple[int, str, int, Any, list[list[Any]]]] = []

    def prepare() -> None:
        decoded.extend(e for e in decode_entries(entries, origins, local_name)
                       if e[2] >= floor)
        prepare_entries(storage, db_name, decoded)

    def job(ctx: WriteContext) -> ApplyStats:
        stats = ApplyStats()
        db = storage.databases.get(db_name)
        if db is None:
            return stats
        committed = cursor
        seen: dict[str, int] = {}
        for seq, origin_name, version, user, ops in decoded:
            try:
                storage.hlc.check(version)
            except ClockSkewError as exc:
                # Held back, not applied: the cursor stops just before this entry, so
                # the link asks for it again once the clocks agree.
                stats.skewed += 1
                stats.skew_error = exc
                committed = {**cursor, "seq": seq - 1}
                stats.cursor_seq = seq - 1
                break
            stats.entries += 1
            seen[origin_name] = max(seen.get(origin_name, 0), version)
            storage.hlc.observe(version)
            origin_id = local_origin(ctx, db, origin_name)
            applied = [op for op in ops
                       if _apply_op(storage, ctx, db, op, version, origin_name, origin_id, stats)]
            stats.last_version = version
            if applied:
                stats.applied += 1
                stats.ops_applied += len(applied)
                target = db
                if applied[0][1] in ("create_database", "drop_database"):
                    target = storage.databases[SYSTEM]
                storage.append_log(ctx, target, applied, version, origin_id, user)
        note_origin_versions(ctx, db, seen)
        write_cursor(ctx, db, peer, committed)
        return stats

    return job, prepare


def apply_rows_job(storage: Storage, db_name: str, peer: str, table_name: str,
                   rows: Sequence[tuple[bytes, bytes]], origins: Mapping[int, str],
                   cursor: dict[str, Any], floor: int = 0) -> Callable[[WriteContext], int]:
    """A writer job merging full-copy rows (live records and tombstones) by LWW.

    It never deletes a row that exists only on the receiver: only a tombstone with a
    newer version can remove a record.
    """

    def job(ctx: WriteContext) -> int:
        db = storage.databases.get(db_name)
        if db is None:
            return 0
        if table_name not in db.tables:
            raise UnknownTableError(f"table '{db_name}.{table_name}' is not known here yet")
        table = db.tables[table_name]
        txn = ctx.txn(db)
        applied = 0
        for key, raw in rows:
            version, origin, record = codec.unpack(raw)
            origin_name = origins.get(origin)
            if origin_name is None or version < floor:
                continue
            storage.hlc.check(version)  # a skewed row fails the chunk; the copy resumes
            if not incoming_wins(db, get_stored(txn, table, key), version, origin_name):
                continue
            storage.hlc.observe(version)
            oid = local_origin(ctx, db, origin_name)
            if record is None:
                put_tombstone(txn, table, key, version, oid)
            else:
                put_record(txn, table, key, version, oid, record)
                note_attributes(ctx, db, table, [record])
            applied += 1
        write_cursor(ctx, db, peer, cursor)
        return applied

    return job
