"""The versioned drop rule: schema changes that arrive from peers.

Every table and database has an *incarnation* (the version of the create that made it)
and every name a durable *drop marker* (the newest drop version seen, never lowered).
An incarnation is dead once a marker covers it (``incarnation <= marker``):

- a create at ``c`` lands only if ``c > marker`` and the name does not exist; two creates
  with no drop between them (made on two nodes before they met) are the same table, so
  the one that exists stays and rows merge by last-writer-wins;
- a drop at ``d`` raises the marker and removes the local incarnation if it is older;
- a data op carries the incarnation it was written to; one whose incarnation is covered
  by the marker is a stale write to a dropped table and is discarded.

A peer's log delivers a drop before any later create of the same name, and hellos carry
the peer's markers, so a node learns of a drop before it could confuse incarnations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from harpsync import codec
from harpsync.storage.database import (
    ORIGIN_PREFIX,
    Database,
    attribute_marks_of,
)
from harpsync.storage.store import NAME_RE, SYSTEM, Storage
from harpsync.storage.writer import WriteContext
from harpsync.storage.writes import newest_with

log = logging.getLogger(__name__)

DATABASES_KEY = "__databases__"
DROPPED_KEY = "__dropped__"
CREATED_KEY = "__created__"
# Keys of a schema hello that are not table names; create_table refuses them as names.
RESERVED_KEYS = frozenset({DATABASES_KEY, DROPPED_KEY, CREATED_KEY})


class DroppedIncarnationError(ValueError):
    """A peer serves an incarnation of a database that was dropped here.

    Nothing from it may land in this node's (newer) database of that name; the link
    retries with backoff until the peer has applied the drop itself.
    """


class UnknownTableError(ValueError):
    """A peer sent rows of a table this node has not learned yet.

    The whole batch (and its cursor) is rolled back; the link reconnects, and the new
    hello creates the table before the same entries are applied again.
    """


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


# -- tables ------------------------------------------------------------------------------
def apply_create_table(storage: Storage, ctx: WriteContext, db: Database, name: str,
                       definition: Any, version: int, origin_id: int, log_it: bool) -> bool:
    """A peer's create of ``name`` at ``version``; True if it created the table.

    Raises:
        UnknownTableError: the table's DBIs were not opened before the job (retry).
    """
    if not isinstance(definition, dict) or not NAME_RE.match(name) or db.name == SYSTEM:
        return False
    after_drop = definition.get("after_drop")
    if isinstance(after_drop, int) and not isinstance(after_drop, bool) \
            and 0 < after_drop < version:
        # The creator had seen this drop: apply it first (it kills older incarnations).
        apply_drop_table(storage, ctx, db, name, after_drop, origin_id, log_it=False)
    if version <= db.table_marker(ctx.txn(db), name):
        return False
    if name in db.tables:
        # A concurrent create (no drop between): the same table. Its definition
        # converges on every node: attributes are united, the newer version names it.
        _merge_definition(ctx, db, db.tables[name], definition, version)
        return False
    if name not in db.handles:
        raise UnknownTableError(f"table '{db.name}.{name}' is not ready here yet")
    storage.create_table_in(ctx, db, name, definition, version, origin_id, log_it)
    return True


def _merge_definition(ctx: WriteContext, db: Database, table: Any, definition: dict[str, Any],
                      version: int) -> None:
    # Two creates may also name different primary keys: the newer create's (on a tie,
    # the greater name) becomes the key on every node, and the other stays an
    # attribute. Rows keep their keys and bytes, so the nodes still hold the same rows.
    pk = definition.get("primary_key")
    adopt = (isinstance(pk, str) and bool(pk) and pk != table.primary_key
             and (version, pk) > (table.version, table.primary_key))
    old_pk = table.primary_key
    new_pk = pk if adopt else old_pk
    attributes = [a for a in definition.get("attributes", []) if isinstance(a, str)]
    if adopt:
        attributes.append(old_pk)
    # Attributes an operator created or dropped: per attribute the newer change wins.
    marks = dict(table.attribute_marks)
    for name, mark in attribute_marks_of(definition).items():
        if name not in marks or mark[0] > marks[name][0]:
            if not mark[1] and name in table.attributes:
                # A drop loses to a record stored here that holds the attribute and was
                # written after it (as ``set_attribute`` decides for a logged drop).
                newer = newest_with(ctx.txn(db), table, name)
                if newer > mark[0]:
                    mark = [newer, True]
            marks[name] = mark
    attributes += [a for a, (_, present) in marks.items() if present]
    dropped = {a for a, (_, present) in marks.items() if not present}
    added = [a for a in dict.fromkeys(attributes)
             if a not in table.attributes and a != new_pk and a not in dropped]
    kept = [a for a in table.attributes if a != new_pk and a not in dropped]
    if not added and not adopt and version <= table.version \
            and len(kept) == len(table.attributes) and marks == table.attribute_marks:
        return
    old_attributes, old_version = list(table.attributes), table.version
    old_marks = table.attribute_marks
    table.attributes = kept + added
    table.attribute_marks = marks
    table.version = max(old_version, version)
    table.primary_key = new_pk
    if adopt:
        log.warning("table %s.%s was also created on another node with primary key '%s': "
                    "its newer create makes that the key here too (it was '%s')",
                    db.name, table.name, new_pk, old_pk)

    def undo() -> None:
        table.attributes, table.version, table.primary_key = (old_attributes, old_version,
                                                              old_pk)
        table.attribute_marks = old_marks

    ctx.on_undo(undo)
    db.save_definition(ctx.txn(db), table)


def apply_drop_table(storage: Storage, ctx: WriteContext, db: Database, name: str,
                     version: int, origin_id: int, log_it: bool) -> bool:
    """A peer's drop of ``name`` at ``version``; True if it changed anything here."""
    if db.name == SYSTEM:
        return False
    table = db.tables.get(name)
    if table is not None and table.version < version:
        storage.drop_table_in(ctx, db, name, version, origin_id, log_it)
        return True
    raised = storage.raise_table_marker(ctx, db, name, version)
    if raised and log_it:
        storage.append_log(ctx, db, [[name, "drop_table", None, None]], version, origin_id)
    return raised


def stale_op(ctx: WriteContext, db: Database, table_name: str,
             incarnation: int | None) -> bool:
    """Whether a data op for a table is a late write to a dropped incarnation.

    Raises:
        UnknownTableError: the table is missing and not dropped (its create is on the
            way), or the op's incarnation is newer than the live table: a re-create
            after a drop not seen here yet, or a concurrent create not merged here yet.
            Either way the sender's next hello carries it (with its drop markers), so
            the op waits for that rather than landing in an incarnation that a late
            drop would empty.
    """
    table = db.tables.get(table_name)
    if table is None:
        marker = db.table_marker(ctx.txn(db), table_name)
        if marker and (incarnation is None or incarnation <= marker):
            return True
        raise UnknownTableError(f"table '{db.name}.{table_name}' is not known here yet")
    # System tables are made by each node on its own (never created, dropped or merged
    # through replication), so their incarnations differ from node to node.
    if incarnation is not None and incarnation > table.version and db.name != SYSTEM:
        raise UnknownTableError(f"the incarnation of table '{db.name}.{table_name}' created "
                                f"at {incarnation} is not known here yet")
    # The live table is newer than every marker, so only an older incarnation can be dead.
    return (incarnation is not None and incarnation < table.version
            and incarnation <= db.table_marker(ctx.txn(db), table_name))


# -- databases ---------------------------------------------------------------------------
def _replicated(storage: Storage, name: str) -> bool:
    return name != SYSTEM and bool(NAME_RE.match(name)) and storage.replicates(name)


def after_drop_of(value: Any, version: int) -> int:
    """The drop a create op at ``version`` says its creator had seen (0: none)."""
    after = value.get("after_drop") if isinstance(value, Mapping) else None
    if isinstance(after, int) and not isinstance(after, bool) and 0 < after < version:
        return after
    return 0


def drops_before_create(storage: Storage, name: Any, value: Any, version: int) -> int:
    """The drop to apply in a job of its own before a ``create_database`` op (0: none).

    Nonzero when the creator had seen a drop that covers this node's incarnation of
    ``name``: that incarnation goes first, and since its files are deleted only after
    the commit, the create must wait for the next job.
    """
    if not isinstance(name, str) or not _replicated(storage, name):
        return 0
    after = after_drop_of(value, version)
    db = storage.databases.get(name)
    return after if db is not None and db.created < after else 0


def apply_create_database(storage: Storage, ctx: WriteContext, name: str, version: int,
                          origin_id: int, log_it: bool, after_drop: int = 0) -> bool:
    """A peer's create of database ``name`` at ``version``; True if it created it.

    ``after_drop`` is the drop marker the creator had (the op's ``after_drop``): it is
    applied first, so a node that gets this create before that drop does not take it
    for a concurrent create and then lose it to the drop.

    Raises:
        UnknownTableError: its environment was not opened before the job (retry).
    """
    if not _replicated(storage, name):
        return False
    if 0 < after_drop < version:
        apply_drop_database(storage, ctx, name, after_drop, origin_id, log_it=False)
    if name in storage.databases:
        return False
    if version <= storage.database_marker(ctx, name):
        return False
    if name not in storage.pending_envs:
        raise UnknownTableError(f"database '{name}' is not ready here yet")
    storage.create_database_in(ctx, name, version, origin_id, log_it)
    return True


def apply_drop_database(storage: Storage, ctx: WriteContext, name: str, version: int,
                        origin_id: int, log_it: bool) -> bool:
    """A peer's drop of database ``name`` at ``version``; True if it changed anything."""
    if not _replicated(storage, name):
        return False
    db = storage.databases.get(name)
    if db is not None and db.created < version:
        storage.drop_database_in(ctx, name, version, origin_id, log_it)
        return True
    raised = storage.raise_database_marker(ctx, name, version)
    if raised and log_it:
        storage.append_log(ctx, storage.databases[SYSTEM],
                           [[None, "drop_database", name, None]], version, origin_id)
    return raised


# -- hellos ------------------------------------------------------------------------------
def describe_schema(storage: Storage, db: Database,
                    allowed: Callable[[str], bool]) -> dict[str, Any]:
    """What a hello says about ``db``: table definitions (by name) and drop markers.

    For ``system`` it also lists every replicated database with its creation version,
    tables and table markers, and the database drop markers.
    """
    # Committed state only (``Database.committed_schema``): a hello naming a re-created
    # table without the drop before it would make a peer merge the two incarnations.
    committed = db.committed_schema()
    defs: dict[str, Any] = {name: d for name, d in committed.tables.items() if allowed(name)}
    if db.name != SYSTEM:
        defs[DROPPED_KEY] = {k: v for k, v in committed.dropped.items() if allowed(k)}
        defs[CREATED_KEY] = committed.created
        return defs
    databases: dict[str, Any] = {}
    for name, other in sorted(storage.databases.items()):
        if name == SYSTEM or not storage.replicates(name):
            continue
        try:
            listed = other.committed_schema()
        except Exception:  # dropped while we read it
            continue
        databases[name] = {"created": listed.created, "tables": listed.tables,
                           "dropped": listed.dropped}
    # Read after the databases: a database re-created after a drop was committed after
    # that drop's marker, so the markers read now cover every incarnation listed above.
    dropped = {k: v for k, v in storage.database_markers().items() if storage.replicates(k)}
    defs[DATABASES_KEY] = {"names": sorted(databases), "databases": databases,
                           "dropped": dropped}
    return defs


def _versions(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): int(v) for k, v in raw.items()
            if isinstance(v, int) and not isinstance(v, bool) and NAME_RE.match(str(k))}


async def ensure_tables(storage: Storage, db_name: str, tables: Mapping[str, Any],
                        dropped: Mapping[str, int], peer: str) -> None:
    """Apply a peer's table definitions and drop markers for ``db_name``.

    Tables created or dropped here are logged (origin ``peer``, original versions), so
    nodes that reach this one only through it learn them too.
    """
    defs = {k: v for k, v in tables.items()
            if isinstance(v, dict) and NAME_RE.match(k) and k not in RESERVED_KEYS}
    if db_name == SYSTEM or (not defs and not dropped):
        return

    def prepare() -> None:
        db = storage.databases.get(db_name)
        if db is not None:
            for name in defs:
                db.open_table_handles(name)

    def fn(ctx: WriteContext) -> None:
        db = storage.databases.get(db_name)
        if db is None:
            return
        oid = local_origin(ctx, db, peer)
        for name, version in dropped.items():
            apply_drop_table(storage, ctx, db, name, version, oid, log_it=True)
        for name, definition in defs.items():
            created = definition.get("version")
            if isinstance(created, int) and not isinstance(created, bool):
                apply_create_table(storage, ctx, db, name, definition, created, oid, True)

    await storage.write(fn, prepare)


async def ensure_databases(storage: Storage, info: Any, peer: str) -> None:
    """Apply the ``__databases__`` part of a peer's ``system`` hello."""
    if not isinstance(info, Mapping):
        return
    dropped = {k: v for k, v in _versions(info.get("dropped")).items() if _replicated(storage, k)}
    listed = info.get("databases")
    databases = {str(k): v for k, v in listed.items() if isinstance(v, Mapping)
                 and _replicated(storage, str(k))} if isinstance(listed, Mapping) else {}
    if dropped:
        def drop(ctx: WriteContext) -> None:
            oid = local_origin(ctx, storage.databases[SYSTEM], peer)
            for name, version in dropped.items():
                apply_drop_database(storage, ctx, name, version, oid, log_it=True)

        await storage.write(drop)
    markers = storage.database_markers()
    for name, entry in databases.items():
        created = entry.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            continue
        db = storage.databases.get(name)
        if created <= markers.get(name, -1) and (db is None or db.created != created):
            continue  # the peer's incarnation was dropped here: nothing of it applies
        if db is None and created > 0:
            await _ensure_database(storage, name, created, peer)
        tables = entry.get("tables")
        await ensure_tables(storage, name, tables if isinstance(tables, Mapping) else {},
                            _versions(entry.get("dropped")), peer)


async def _ensure_database(storage: Storage, name: str, created: int, peer: str) -> None:
    def prepare() -> None:
        if name not in storage.databases:
            storage.pending_env(name)

    def fn(ctx: WriteContext) -> None:
        ctx.after_commit.append(lambda: storage.discard_pending([name]))
        if name in storage.databases or name not in storage.pending_envs:
            return
        oid = local_origin(ctx, storage.databases[SYSTEM], peer)
        apply_create_database(storage, ctx, name, created, oid, log_it=True)

    await storage.write(fn, prepare)


async def apply_hello(storage: Storage, db_name: str, tables: Mapping[str, Any],
                      peer: str) -> None:
    """Learn the schema a peer's hello for ``db_name`` describes."""
    if db_name == SYSTEM:
        await ensure_databases(storage, tables.get(DATABASES_KEY), peer)
        return
    if not storage.replicates(db_name):
        return
    created = tables.get(CREATED_KEY)
    db = storage.databases.get(db_name)
    if isinstance(created, int) and db is not None and created != db.created \
            and created <= storage.database_markers().get(db_name, -1):
        raise DroppedIncarnationError(
            f"{peer} still has database '{db_name}' created at {created}, which was "
            "dropped here; waiting for it to apply the drop")
    await ensure_tables(storage, db_name, tables, _versions(tables.get(DROPPED_KEY)), peer)
