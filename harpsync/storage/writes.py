"""Local data writes (insert, update, upsert, delete) as writer-thread jobs.

Each job is one transaction: all of its records or none, and one log entry.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from harpsync import codec
from harpsync.errors import BadRequestError
from harpsync.storage.database import LOCAL_ORIGIN, Database, Table
from harpsync.storage.errors import NoSuchAttributeError
from harpsync.storage.hlc import version_to_ms
from harpsync.storage.keys import encode_id
from harpsync.storage.records import (
    get_live,
    get_stored,
    put_new_records,
    put_record,
    put_tombstone,
)
from harpsync.storage.store import Storage
from harpsync.storage.writer import WriteContext

Job = Callable[[WriteContext], dict[str, Any]]


def note_attributes(ctx: WriteContext, db: Database, table: Table,
                    records: list[dict[str, Any]], versions: int | Sequence[int]) -> None:
    """Record attribute names seen for the first time in the table definition.

    ``versions``: the version each record was written at (one for all of them). An
    attribute an operator dropped comes back only with a record written after the
    drop; a record from before it (arriving late, or in a copy) leaves it dropped.
    """
    known = table.known_names()
    for record in records:  # the common case: nothing new (a C loop per record)
        if not known.issuperset(record):
            break
    else:
        return
    new: dict[str, int] = {}  # attribute -> the newest version of a record with it
    for i, record in enumerate(records):
        for attr in record:
            if attr not in known:
                version = versions if isinstance(versions, int) else versions[i]
                if new.get(attr, -1) < version:
                    new[attr] = version
    if not new:
        return
    marks = table.attribute_marks
    added = [a for a, v in new.items() if a not in marks or v > marks[a][0]]
    if not added:
        return
    back = {a: [new[a], True] for a in added if a in marks}  # as if created then
    _replace_attributes(ctx, db, table, table.attributes + added,
                        {**marks, **back} if back else marks)


def set_attribute(ctx: WriteContext, db: Database, table: Table, name: str, present: bool,
                  version: int) -> bool:
    """Create (``present``) or drop attribute ``name`` as of ``version``, unless a newer
    change of it is known here; True if anything changed.

    Per attribute the newest change wins (``Table.attribute_marks``), on every node and
    in any order, so ``create_attribute`` and ``drop_attribute`` converge: a drop no
    longer comes back with a peer's next hello.
    """
    mark = table.attribute_marks.get(name)
    if name == table.primary_key or (mark is not None and mark[0] >= version):
        return False
    if not present and name in table.attributes:
        # A record stored here with the attribute, written after the drop, brought it
        # back on every node that had the drop first (``note_attributes``): it stays
        # here too, marked present at that record's version.
        newer = newest_with(ctx.txn(db), table, name)
        if newer > version:
            present, version = True, newer
    old = table.attributes
    attributes = (old + [name] if name not in old else old) if present \
        else [a for a in old if a != name]
    _replace_attributes(ctx, db, table, attributes,
                        {**table.attribute_marks, name: [version, present]})
    return True


def newest_with(txn: Any, table: Table, name: str) -> int:
    """The newest version of a live record of ``table`` that holds attribute ``name``
    (0: none). Reads the whole table: only attribute drops ask."""
    needle = codec.pack(name)
    newest = 0
    for raw in txn.cursor(db=table.dbi).iternext(keys=False, values=True):
        if needle in raw:  # the name's bytes, a key or a value: decode to tell
            version, _origin, record = codec.unpack(raw)
            if version > newest and isinstance(record, dict) and name in record:
                newest = version
    return newest


def _replace_attributes(ctx: WriteContext, db: Database, table: Table, attributes: list[str],
                        marks: dict[str, list[Any]]) -> None:
    """Give the table new attribute and mark objects (never changed in place: see
    ``Table.known_names``), undone with the job, and store its definition."""
    old, old_marks = table.attributes, table.attribute_marks
    table.attributes, table.attribute_marks = attributes, marks

    def undo() -> None:
        table.attributes, table.attribute_marks = old, old_marks

    ctx.on_undo(undo)
    db.save_definition(ctx.txn(db), table)


def attribute_job(storage: Storage, db_name: str, table_name: str, name: str,
                  present: bool) -> Callable[[WriteContext], None]:
    """``create_attribute`` (``present``) or ``drop_attribute``: changed here and logged
    (``set_attribute`` op), so peers make the same change."""

    def job(ctx: WriteContext) -> None:
        db, table = storage.table(db_name, table_name)
        exists = name in table.attributes or name == table.primary_key
        if present and exists:
            raise BadRequestError(f"attribute '{name}' already exists in "
                                  f"{db_name}.{table_name}")
        if not present and name not in table.attributes:
            raise NoSuchAttributeError(name)
        newest = table.attribute_marks.get(name, [0])[0]
        if not present:  # newer than every record holding it, or peers keep it
            newest = max(newest, newest_with(ctx.txn(db), table, name))
        version = storage.hlc.now_after(newest)
        set_attribute(ctx, db, table, name, present, version)
        storage.append_log(ctx, db, [[table_name, "set_attribute", name, present,
                                      table.version]], version, LOCAL_ORIGIN)

    return job


def write_records(storage: Storage, db_name: str, table_name: str, records: list[Any],
                  mode: str, user: str | None, at_version: int | None = None,
                  incarnation: int | None = None) -> Job:
    """A job that inserts, updates or upserts ``records``.

    ``insert`` skips ids that exist, ``update`` skips ids that do not, and ``upsert``
    merges into what exists. Records without a primary key get a UUID on insert/upsert.
    ``at_version``: write at this version instead of the clock's (a node's first-start
    rows, which any deliberate write must beat); the timestamps stay the wall clock's.
    ``incarnation``: write only into this incarnation of the table (a load that began
    before a drop and re-create must not go on into the new table).
    """

    def job(ctx: WriteContext) -> dict[str, Any]:
        db, table = storage.table(db_name, table_name)
        if incarnation is not None and table.version != incarnation:
            raise BadRequestError(f"table '{db_name}.{table_name}' was dropped and created "
                                  "again since the write began")
        txn = ctx.txn(db)
        pk = table.primary_key
        written: list[Any] = []
        skipped: list[Any] = []
        ops: list[list[Any]] = []
        stored_records: list[dict[str, Any]] = []
        prepared = []
        newest = 0
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise BadRequestError(f"'records[{index}]' must be an object")
            rid = record.get(pk)
            if rid is None:
                if mode == "update":
                    raise BadRequestError(f"'records[{index}]' is missing primary key '{pk}'")
                rid = str(uuid.uuid4())
            key = encode_id(rid)
            stored = get_stored(txn, table, key)
            if stored is not None:
                newest = max(newest, stored[0])
            live = stored if stored is not None and stored[2] is not None else None
            prepared.append((index, record, rid, key, live, stored is None))
        # A local write must beat what it overwrites under last-writer-wins, even a
        # version from a peer whose clock runs ahead of ours.
        if at_version is None:
            version = storage.hlc.now_after(newest)
            now_ms = version_to_ms(version)
        else:
            version, now_ms = at_version, float(storage.hlc.wall_now_ms())
        this_job: dict[bytes, dict[str, Any]] = {}
        op_index: dict[bytes, int] = {}
        # (records index, key, value, nothing stored under the key before this job)
        puts: list[tuple[int, bytes, dict[str, Any], bool]] = []
        for index, record, rid, key, existing, fresh in prepared:
            if key in this_job:  # the same id twice in one request
                existing = (version, LOCAL_ORIGIN, this_job[key])
            if existing is not None and mode == "insert":
                skipped.append(rid)
                continue
            if existing is None and mode == "update":
                skipped.append(rid)
                continue
            if existing is not None:
                old = existing[2] or {}
                new = {**old, **record}
                new["__createdtime__"] = old.get("__createdtime__", now_ms)
            else:
                new = dict(record)
                new["__createdtime__"] = now_ms
            new[pk] = rid
            new["__updatedtime__"] = now_ms
            puts.append((index, key, new, fresh and key not in this_job))
            written.append(rid)
            # Attributes are learned from the record as stored and logged, as peers
            # learn them from the op: an update of a record that still holds a dropped
            # attribute brings it back here too, not only on the peers.
            stored_records.append(new)
            # The incarnation lets a peer tell a late write to a dropped table.
            op = [table_name, mode, rid, new, table.version]
            if key in this_job:
                # The same id twice: log its final value once. A peer applies ops of one
                # version only once per key (equal versions do not win), so it would
                # keep the first value while this node keeps the last.
                ops[op_index[key]] = op
            else:
                op_index[key] = len(ops)
                ops.append(op)
            this_job[key] = new
        _store(txn, table, version, puts)
        if ops:
            note_attributes(ctx, db, table, stored_records, version)
            storage.append_log(ctx, db, ops, version, LOCAL_ORIGIN, user)
        total = len(records)
        if mode == "insert":
            return {"message": f"inserted {len(written)} of {total} records",
                    "inserted_hashes": written, "skipped_hashes": skipped}
        if mode == "update":
            return {"message": f"updated {len(written)} of {total} records",
                    "update_hashes": written, "skipped_hashes": skipped}
        return {"message": f"upserted {len(written)} of {total} records",
                "upserted_hashes": written}

    return job


def _store(txn: Any, table: Table, version: int,
           puts: list[tuple[int, bytes, dict[str, Any], bool]]) -> None:
    # Store a job's values in order; when every key is new (the usual bulk insert),
    # packed first and stored together.
    bulk = bool(puts) and all(fresh for _, _, _, fresh in puts)
    # A stored row is msgpack [version, origin, record]: in bulk, each record is packed
    # alone after one shared head (the same bytes), and the table hashes take the
    # records' bytes as they are.
    packed: list[bytes] = []
    for index, key, new, _ in puts:
        try:
            if bulk:
                packed.append(codec.pack(new))
            else:
                put_record(txn, table, key, version, LOCAL_ORIGIN, new)
        except (OverflowError, ValueError) as exc:
            # msgpack holds integers of at most 64 bits and bounded nesting.
            raise BadRequestError(f"'records[{index}]' holds a value that cannot be "
                                  f"stored: {exc}") from None
    if bulk:
        head = codec.pack([version, LOCAL_ORIGIN, None])[:-1]
        put_new_records(txn, table, [key for _, key, _, _ in puts],
                        list(map(head.__add__, packed)), packed)


def delete_records(storage: Storage, db_name: str, table_name: str, ids: list[Any],
                   user: str | None) -> Job:
    """A job that deletes ``ids``, leaving tombstones; missing ids are skipped."""

    def job(ctx: WriteContext) -> dict[str, Any]:
        db, table = storage.table(db_name, table_name)
        txn = ctx.txn(db)
        live: list[tuple[Any, bytes | None]] = []
        newest = 0
        for rid in ids:
            key = encode_id(rid)
            existing = get_live(txn, table, key)
            if existing is not None:
                newest = max(newest, existing[0])  # the delete must win over it
            live.append((rid, key if existing is not None else None))
        version = storage.hlc.now_after(newest)
        deleted: list[Any] = []
        skipped: list[Any] = []
        ops: list[list[Any]] = []
        done: set[bytes] = set()
        for rid, live_key in live:
            if live_key is None or live_key in done:
                skipped.append(rid)
                continue
            done.add(live_key)
            put_tombstone(txn, table, live_key, version, LOCAL_ORIGIN)
            deleted.append(rid)
            ops.append([table_name, "delete", rid, None, table.version])
        if ops:
            storage.append_log(ctx, db, ops, version, LOCAL_ORIGIN, user)
        noun = "record" if len(ids) == 1 else "records"
        return {"message": f"{len(deleted)} of {len(ids)} {noun} successfully deleted",
                "deleted_hashes": deleted, "skipped_hashes": skipped}

    return job
