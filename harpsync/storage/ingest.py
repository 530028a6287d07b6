"""Applying what peers send: log entries and full-copy rows, by last writer wins.

Applying is idempotent and order-independent: a write lands only if its
``(version, origin name)`` beats what is stored, and an entry none of whose operations
landed is not logged again, so a transaction that arrives twice is counted once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harpsync import codec
from harpsync.errors import BadRequestError
from harpsync.storage import horizon, schema
from harpsync.storage.database import CURSOR_PREFIX, HW_PREFIX, LOCAL_ORIGIN, Database, Table
from harpsync.storage.hlc import ClockSkewError
from harpsync.storage.keys import decode_id, encode_id
from harpsync.storage.logscan import carries_rows
from harpsync.storage.records import (
    absent,
    get_stored,
    incoming_wins,
    put_new_records,
    put_record,
    put_tombstone,
)
from harpsync.storage.schema import UnknownTableError, local_origin
from harpsync.storage.store import NAME_RE, SYSTEM, Storage
from harpsync.storage.writer import WriteContext
from harpsync.storage.writes import note_attributes, set_attribute

log = logging.getLogger(__name__)

__all__ = ["ApplyStats", "UnknownTableError", "apply_entries_job", "apply_op", "apply_rows_job",
           "apply_sweeps",
           "forget_cursor", "forget_floor", "local_origin", "raise_floors", "write_cursor"]


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
    dropped_databases: set[str] = field(default_factory=set)
    # Set when the job stopped before this entry (it re-creates a database dropped
    # earlier in the job): the caller applies the entries from here in a new job.
    resume_seq: int | None = None


# Ops that change schema, not rows. A node logs the schema it learns from a peer's
# hello as that peer's entries, with their original versions, also while it holds
# none of that peer's rows up to them (its data link paused, or set to take none): so
# a schema-only entry relayed by another peer raises no floor for its origin (see
# ``apply_entries_job``).
SCHEMA_OPS = frozenset({"create_table", "drop_table", "set_attribute",
                        "create_database", "drop_database"})


def write_cursor(ctx: WriteContext, db: Database, peer: str, cursor: dict[str, Any]) -> None:
    """Commit the replication cursor for ``peer`` in the same transaction as the data."""
    key = CURSOR_PREFIX + peer.encode()
    ctx.txn(db).put(key, codec.pack(cursor), db=db.meta_dbi)
    ctx.meta_written.append((db, key))


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
        ctx.on_undo(functools.partial(db.origin_hw.__setitem__, name, old))
        ctx.txn(db).put(HW_PREFIX + name.encode(), codec.pack(version), db=db.meta_dbi)
        ctx.meta_written.append((db, HW_PREFIX + name.encode()))


def raise_floors(ctx: WriteContext, db: Database, floors: Mapping[str, int]) -> None:
    """Raise origins' high-water versions to what a full copy carried of them (its
    publisher held every transaction of each up to that version; see
    ``replication/applier.py``), with the job that ends the copy, after its rows are
    committed. The versions kept as repeats at or below the new floors are forgotten:
    no path is asked for them again."""
    note_origin_versions(ctx, db, floors)
    db.repeats.prune(ctx, {name: db.origin_hw.get(name, 0) for name in floors})


def forget_floor(ctx: WriteContext, db: Database, origin: str) -> None:
    """Forget the high-water version held from ``origin`` (a new node under its name:
    its versions may start below the old one's, see ``Mesh._replace_row``)."""
    old = db.origin_hw.pop(origin, None)
    if old is not None:
        ctx.on_undo(functools.partial(db.origin_hw.__setitem__, origin, old))
    ctx.txn(db).delete(HW_PREFIX + origin.encode(), db=db.meta_dbi)


def forget_cursor(ctx: WriteContext, db: Database, peer: str) -> None:
    """Delete the replication cursor for ``peer`` (it was removed from the cluster)."""
    ctx.txn(db).delete(CURSOR_PREFIX + peer.encode(), db=db.meta_dbi)


def _apply_op(storage: Storage, ctx: WriteContext, db: Database, op: list[Any], version: int,
              origin_name: str, origin_id: int, stats: ApplyStats,
              review: Any = None) -> bool:
    table_name, kind, rid, value = op[:4]
    if len(op) > 5 and isinstance(op[5], int):
        version = op[5]  # a relayed copied row keeps its own version
    if kind == "create_table":
        created = schema.apply_create_table(storage, ctx, db, table_name, value, version,
                                            origin_id, log_it=False)
        if created:
            stats.created_tables.append(table_name)
        return created
    if kind == "drop_table":
        return schema.apply_drop_table(storage, ctx, db, table_name, version, origin_id,
                                       log_it=False)
    if kind == "set_attribute":
        if not isinstance(rid, str) or not isinstance(value, bool) \
                or schema.stale_op(ctx, db, table_name, op[4] if len(op) > 4 else None):
            return False
        return set_attribute(ctx, db, db.tables[table_name], rid, value, version)
    if kind == "create_database":
        return schema.apply_create_database(storage, ctx, rid, version, origin_id, False,
                                            schema.after_drop_of(value, version))
    if kind == "drop_database":
        existed = rid in storage.databases
        dropped = schema.apply_drop_database(storage, ctx, rid, version, origin_id, False)
        if existed and rid not in storage.databases:
            stats.dropped_databases.add(rid)
        return dropped
    if schema.stale_op(ctx, db, table_name, op[4] if len(op) > 4 else None):
        return False  # a late write to a dropped incarnation: the drop superseded it
    table = db.tables[table_name]
    txn = ctx.txn(db)
    key = encode_id(rid)
    stored = get_stored(txn, table, key)
    if review is not None:  # a conflict policy other than last-writer-wins (conflicts.py)
        if not review.admit(ctx, db, table, op, stored, version, origin_name):
            return False
    elif not incoming_wins(db, stored, version, origin_name):
        return False
    if kind == "delete" or value is None:
        put_tombstone(txn, table, key, version, origin_id)
    else:
        put_record(txn, table, key, version, origin_id, value)
        note_attributes(ctx, db, table, [value], version)
    return True


apply_op = _apply_op  # for reprocessing dead letters (deadletters.py)

_WRITE_KINDS = frozenset(("insert", "update", "upsert"))


def _apply_fresh(ctx: WriteContext, db: Database, ops: list[list[Any]], version: int,
                 origin_id: int) -> bool:
    """Apply an entry's ops together, as a local bulk insert is stored, if they all write
    records of one live incarnation of one table under ids that hold nothing here (the
    usual entry: a batch of new records). Returns False, having written nothing, when they
    do not; the caller then applies them one by one.

    Under last-writer-wins an op wins over an empty key, so every op lands: the rows are
    packed after one shared head and stored with one ``putmulti``, their hashes taken as
    one run, and their attributes noted once.
    """
    if len(ops) < 2:
        return False
    first = ops[0]
    table_name, incarnation = first[0], first[4] if len(first) > 4 else None
    for op in ops:
        # Rows relayed from a full copy (``op[5]``) keep each its own version, not the
        # entry's (their maximum): one by one.
        if type(op[1]) is not str or op[1] not in _WRITE_KINDS or op[0] != table_name \
                or len(op) != len(first) or len(op) > 5 or (len(op) > 4 and op[4] != incarnation) \
                or type(op[3]) is not dict:
            return False
    if not isinstance(table_name, str) or schema.stale_op(ctx, db, table_name, incarnation):
        return False
    table = db.tables[table_name]
    try:
        keys = [encode_id(op[2]) for op in ops]
    except (BadRequestError, ValueError):
        return False  # an id this node cannot key: each op fails or is skipped on its own
    txn = ctx.txn(db)
    if not absent(txn, table, keys):
        return False
    records = [op[3] for op in ops]
    packed = list(map(codec.pack, records))
    head = codec.pack([version, origin_id, None])[:-1]
    put_new_records(txn, table, keys, list(map(head.__add__, packed)), packed)
    note_attributes(ctx, db, table, records, version)
    return True


def _recreates_dropped(ops: list[list[Any]], stats: ApplyStats) -> bool:
    # The dropped environment's files go after the commit, at the path a re-create
    # would open: the re-create waits for a job of its own.
    return any(op[1] == "create_database" and op[2] in stats.dropped_databases for op in ops)


def drop_first(storage: Storage, ctx: WriteContext, ops: list[list[Any]], version: int,
                origin_id: int, stats: ApplyStats) -> bool:
    """Apply the drops that an entry's ``create_database`` ops say they follow, where
    they remove a database here; True if one did (the entry waits for a new job)."""
    dropped = False
    for op in ops:
        if op[1] != "create_database":
            continue
        after = schema.drops_before_create(storage, op[2], op[3], version)
        if after:
            schema.apply_drop_database(storage, ctx, op[2], after, origin_id, log_it=False)
            stats.dropped_databases.add(op[2])
            dropped = True
    return dropped


def prepare_entries(storage: Storage, db_name: str,
                    decoded: Sequence[tuple[int, str, int, Any, list[list[Any]]]]) -> list[str]:
    """Open DBIs and environments that the entries will create (outside any txn).

    Returns:
        The databases whose environment was opened for a create.
    """
    db = storage.databases.get(db_name)
    opened: list[str] = []
    if db is None:
        return opened
    for _seq, _origin, _version, _user, ops in decoded:
        for op in ops:
            table_name, kind, rid = op[0], op[1], op[2]
            if kind == "create_table" and isinstance(table_name, str):
                db.open_table_handles(table_name)
            elif (kind == "create_database" and isinstance(rid, str)
                  and rid not in storage.databases and NAME_RE.match(rid)
                  and storage.replicates(rid)):
                storage.pending_env(rid)
                opened.append(rid)
    return opened


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
                      floor: int = 0, review: Any = None,
                      held_floors: frozenset[str] = frozenset(),
                      ) -> tuple[Callable[[WriteContext], ApplyStats], Callable[[], None]]:
    """A writer job applying a peer's log entries and committing ``cursor`` with them.

    Decoding happens in the writer thread (in ``prepare``), off the event loop.
    Entries older than ``floor`` (a ``start_time`` version) are skipped. Entries of the
    origins in ``held_floors`` apply but leave those origins' high-water versions alone,
    as do relayed entries (of an origin other than ``peer``) that only change schema:
    the relay may have learned them from a hello without the origin's rows before them;
    and entries carrying rows of a copy or a repair (:func:`carries_rows`).
    Such entries come again by the path that raises the floor; kept in ``db.repeats``,
    they are not counted in ``ApplyStats.entries`` the second time (``repeats.py``).
    """
    decoded: list[tuple[int, str, int, Any, list[list[Any]]]] = []
    opened: list[str] = []
    raw_of = dict(entries)

    def prepare() -> None:
        decoded.extend(e for e in decode_entries(entries, origins, local_name)
                       if e[2] >= floor)
        opened.extend(prepare_entries(storage, db_name, decoded))

    def job(ctx: WriteContext) -> ApplyStats:
        stats = ApplyStats()
        db = storage.databases.get(db_name)
        if db is None:
            return stats
        if opened:
            ctx.after_commit.append(lambda: storage.discard_pending(opened))
        committed = cursor
        seen: dict[str, int] = {}
        fresh: dict[str, set[int]] = {}
        for seq, origin_name, version, user, ops in decoded:
            if stats.dropped_databases and _recreates_dropped(ops, stats):
                # Applied by the caller in a new job, once the old files are gone.
                stats.resume_seq = seq
                committed = {**cursor, "seq": seq - 1}
                break
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
            origin_id = local_origin(ctx, db, origin_name)
            if drop_first(storage, ctx, ops, version, origin_id, stats):
                # A create that follows a drop this node has not applied: the drop is
                # applied now, the entry again in a new job, once the old files are gone.
                stats.resume_seq = seq
                committed = {**cursor, "seq": seq - 1}
                break
            # Rows a copy or a repair landed (relayed): no transaction of the origin. It
            # is not counted, and the origin's own entry of that version (it stamps
            # the entry) counts when it comes.
            rows = carries_rows(version, ops)
            # Applied here before by a path that raised no floor: not counted again.
            repeat = not rows and (db.repeats.holds(origin_name, version)
                                   or version in fresh.get(origin_name, ()))
            if not repeat and not rows:
                stats.entries += 1
            if rows:
                pass  # raises no floor either
            elif origin_name not in held_floors and not (
                    origin_name != peer and all(op[1] in SCHEMA_OPS for op in ops)):
                seen[origin_name] = max(seen.get(origin_name, 0), version)
            elif not repeat and version > db.origin_hw.get(origin_name, 0):
                fresh.setdefault(origin_name, set()).add(version)  # comes again later
            storage.hlc.observe(version)
            if review is None and _apply_fresh(ctx, db, ops, version, origin_id):
                applied = ops
            else:
                applied = [op for op in ops
                           if _apply_op(storage, ctx, db, op, version, origin_name, origin_id,
                                        stats, review)]
            stats.last_version = version
            if applied:
                stats.applied += 1
                stats.ops_applied += len(applied)
                target = db
                packed = None
                if applied[0][1] in ("create_database", "drop_database"):
                    target = storage.databases[SYSTEM]
                elif len(applied) == len(ops):
                    # Logged as received, with this node's id for the origin: the ops
                    # are not packed again (about a tenth of a peer's apply work).
                    packed = codec.with_first_item(bytes(raw_of[seq]), origin_id)
                storage.append_log(ctx, target, applied, version, origin_id, user, packed)
        db.repeats.record(ctx, fresh)
        note_origin_versions(ctx, db, seen)
        db.repeats.prune(ctx, {name: db.origin_hw.get(name, 0) for name in seen})
        write_cursor(ctx, db, peer, committed)
        return stats

    return job, prepare


def _copy_fresh(storage: Storage, ctx: WriteContext, db: Database, table: Table,
                decoded: list[tuple[bytes, int, int, Any]], origins: Mapping[int, str],
                floor: int, swept: int) -> list[tuple[bytes, int, int, Any]] | None:
    """Store a copy chunk's rows together when all are live records of known origins at
    or above ``floor``, under keys that hold nothing here (a new node's copy): each wins
    under last-writer-wins, so they go to ``put_new_records`` as a bulk insert does.
    Returns the rows as landed ``(key, version, local origin id, record)``, or None,
    having stored nothing, when the chunk must go row by row (also when a row of this
    node's own may be one it deleted: older than its tombstone horizon ``swept``).
    """
    if len(decoded) < 2:
        return None
    own = db.origin_names[LOCAL_ORIGIN]
    for _key, version, origin, record in decoded:
        if record is None or version < floor or origin not in origins \
                or (version < swept and origins[origin] == own):
            return None
    keys = [row[0] for row in decoded]
    txn = ctx.txn(db)
    if not absent(txn, table, keys):
        return None
    for row in decoded:
        storage.hlc.check(row[1])  # a skewed row fails the chunk; the copy resumes
    local: dict[int, int] = {}
    landed = []
    for key, version, origin, record in decoded:
        oid = local.get(origin)
        if oid is None:
            oid = local[origin] = local_origin(ctx, db, origins[origin])
        landed.append((key, version, oid, record))
    storage.hlc.observe(max(row[1] for row in decoded))
    put_new_records(txn, table, keys, [codec.pack([version, oid, record])
                                       for _key, version, oid, record in landed])
    return landed


def apply_sweeps(storage: Storage, ctx: WriteContext, db: Database, peer: str,
                 sweeps: Sequence[horizon.Sweep]) -> int:
    """Delete what ``sweeps`` of ``peer``'s copy show it deleted (``horizon.sweep``),
    and log the deletes in a new entry of this node's, so its peers learn them."""
    if not sweeps:
        return 0
    gone = horizon.sweep(ctx.txn(db), db, peer, sweeps)
    if gone:
        log.info("%s's copy of %s: %d rows of its own it deleted meanwhile (tombstones "
                 "swept there) deleted here", peer, db.name, len(gone))
        storage.append_log(ctx, db, gone, storage.hlc.now(), LOCAL_ORIGIN)
    return len(gone)


def apply_rows_job(storage: Storage, db_name: str, peer: str, table_name: str,
                   rows: Sequence[tuple[bytes, bytes]], origins: Mapping[int, str],
                   cursor: dict[str, Any], floor: int = 0, incarnation: int | None = None,
                   review: Any = None, sweeps: Sequence[horizon.Sweep] = (),
                   ) -> Callable[[WriteContext], int]:
    """A writer job merging full-copy rows (live records and tombstones) by LWW.

    It never deletes a row that exists only on the receiver: only a tombstone with a
    newer version can remove a record, or ``sweeps``, the ranges of the copy that show
    rows of the peer's origin as deleted on the peer (``horizon.py``). A row of this
    node's own that it deleted (older than its horizon, nothing stored) is refused.
    Rows that land are logged, one entry per origin with each row's own version, so
    nodes behind this one receive them too.
    ``incarnation`` is the peer's incarnation of the table (from its hello).

    Raises:
        DroppedIncarnationError: that incarnation was dropped here; nothing lands.
        UnknownTableError: the table, or the peer's incarnation of it, is not known here
            yet (the link reconnects for a fresh hello).
    """

    def job(ctx: WriteContext) -> int:
        db = storage.databases.get(db_name)
        if db is None:
            return 0
        if incarnation is None and table_name in db.tables \
                and db.table_marker(ctx.txn(db), table_name):
            # The name was dropped here once: copy only rows whose incarnation is known.
            raise UnknownTableError(f"{peer}'s incarnation of '{db_name}.{table_name}' is "
                                    "not known here yet")
        if schema.stale_op(ctx, db, table_name, incarnation):
            # Its hello may be older than its table: retry with a fresh one, and wait
            # while the peer still serves the incarnation dropped here.
            raise schema.DroppedIncarnationError(
                f"{peer} serves table '{db_name}.{table_name}' created at {incarnation}, "
                "which was dropped here; waiting for it to apply the drop")
        table = db.tables[table_name]
        txn = ctx.txn(db)
        apply_sweeps(storage, ctx, db, peer, sweeps)
        swept = horizon.horizon(txn, db, table)
        since = horizon.own_since(txn, db)
        decoded = [(key, *codec.unpack(raw)) for key, raw in rows]
        landed = None if review is not None else _copy_fresh(storage, ctx, db, table, decoded,
                                                              origins, floor, swept)
        reissued: list[list[Any]] = []
        if landed is None:
            landed = []
            for key, version, origin, record in decoded:
                origin_name = origins.get(origin)
                if origin_name is None or version < floor:
                    continue
                storage.hlc.check(version)  # a skewed row fails the chunk; the copy resumes
                stored = get_stored(txn, table, key)
                if swept and record is not None and horizon.deleted_here(
                        stored, version, db.origin_ids.get(origin_name, -1), swept, since):
                    # Deleted here (its tombstone was swept, not its delete): the peer
                    # still has it, and maybe others through it.
                    reissued.append(horizon.reissue(txn, table, key, version))
                    continue
                if review is not None:
                    op = [table_name, "delete" if record is None else "upsert",
                          decode_id(key), record, incarnation, version]
                    if not review.admit(ctx, db, table, op, stored, version, origin_name):
                        continue
                elif not incoming_wins(db, stored, version, origin_name):
                    continue
                storage.hlc.observe(version)
                oid = local_origin(ctx, db, origin_name)
                if record is None:
                    put_tombstone(txn, table, key, version, oid)
                else:
                    put_record(txn, table, key, version, oid, record)
                landed.append((key, version, oid, record))
        if reissued:
            log.info("%s's copy of %s.%s: %d rows deleted here (tombstones swept) not "
                     "taken back but deleted again", peer, db_name, table_name,
                     len(reissued))
            storage.append_log(ctx, db, reissued, storage.hlc.now(), LOCAL_ORIGIN)
        relay: dict[int, list[list[Any]]] = {}
        stored_records: list[dict[str, Any]] = []
        stored_versions: list[int] = []
        for key, version, oid, record in landed:
            if record is not None:
                stored_records.append(record)
                stored_versions.append(version)
            relay.setdefault(oid, []).append(
                [table_name, "delete" if record is None else "upsert", decode_id(key), record,
                 table.version, version])
        note_attributes(ctx, db, table, stored_records, stored_versions)  # once per chunk
        for oid, ops in relay.items():
            storage.append_log(ctx, db, ops, max(op[5] for op in ops), oid)
        write_cursor(ctx, db, peer, cursor)
        return len(landed)

    return job
