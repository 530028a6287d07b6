"""The storage root: the catalog of databases, schema changes and the writer thread."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harpsync import codec
from harpsync.errors import BadRequestError, HarpsyncError, NotFoundError
from harpsync.storage.database import (
    DROPPED_PREFIX,
    LOCAL_ORIGIN,
    TABLE_PREFIX,
    Database,
    Table,
    release_mapped_pages,
)
from harpsync.storage.hlc import HLC
from harpsync.storage.keys import seq_key
from harpsync.storage.writer import WriteContext, Writer

log = logging.getLogger(__name__)

SYSTEM = "system"
SYSTEM_TABLES = {"hdb_user": "username", "hdb_role": "id", "hdb_nodes": "name"}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def _missing(status: int, message: str) -> HarpsyncError:
    return NotFoundError(message) if status == 404 else BadRequestError(message)


class Storage:
    """All databases of one node under ``<root>/database/<name>/``."""

    def __init__(self, root: Path, node_name: str, map_size: int = 1 << 36) -> None:
        self.root = root
        self.node_name = node_name
        self.map_size = map_size
        self.hlc = HLC()
        self.databases: dict[str, Database] = {}
        self.writer = Writer()
        # DBIs and environments opened by a job's prepare step, used by its body.
        self.pending_handles: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.pending_envs: dict[str, Database] = {}
        # Called (in the writer thread, after commit) with (event, database name).
        self.database_listeners: list[Callable[[str, str], None]] = []

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Open every database on disk, create ``system`` if needed, start the writer."""
        base = self.root / "database"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        os.chmod(base, 0o700)
        for path in sorted(base.iterdir()):
            if path.is_dir() and NAME_RE.match(path.name):
                self.databases[path.name] = self._open_env(path.name)
        if SYSTEM not in self.databases:
            self.databases[SYSTEM] = self._open_env(SYSTEM)
        for db in self.databases.values():
            self._observe_log_versions(db)
        self.writer.start()
        system = self.databases[SYSTEM]
        for name, pk in SYSTEM_TABLES.items():
            if name not in system.tables:
                self.writer.run_sync(*self._create_table_job(SYSTEM, name, pk, [], log_it=False))

    def close(self) -> None:
        self.writer.stop()
        for db in self.databases.values():
            db.close()

    def _open_env(self, name: str) -> Database:
        return Database(name, self.root / "database" / name, self.map_size, self.node_name)

    def _observe_log_versions(self, db: Database) -> None:
        # Keep versions monotonic across restarts even if the wall clock stepped back.
        entries = db.log_after(max(0, db.next_seq - 2), 1)
        for _, raw in entries:
            self.hlc.observe(codec.unpack(raw)[1])

    def trim_memory(self) -> int:
        """Unmap LMDB pages this process touched (they stay in the page cache)."""
        return release_mapped_pages({db.data_file for db in list(self.databases.values())})

    # -- lookups -----------------------------------------------------------------------
    def database(self, name: str, status: int = 404) -> Database:
        db = self.databases.get(name)
        if db is None:
            raise _missing(status, f"database '{name}' does not exist")
        return db

    def table(self, db_name: str, table_name: str, status: int = 404) -> tuple[Database, Table]:
        db = self.database(db_name, status)
        table = db.tables.get(table_name)
        if table is None:
            raise _missing(status, f"Table '{db_name}.{table_name}' does not exist")
        return db, table

    async def write(self, fn: Callable[[WriteContext], Any],
                    prepare: Callable[[], None] | None = None) -> Any:
        """Run ``fn`` in the writer thread; return once its transaction is durable."""
        return await self.writer.submit(fn, prepare)

    # -- log -----------------------------------------------------------------------------
    def append_log(self, ctx: WriteContext, db: Database, ops: list[list[Any]], version: int,
                   origin: int = LOCAL_ORIGIN, user: str | None = None) -> int:
        """Append one transaction-log entry ``[origin, version, user, ops]``.

        Returns:
            The local commit sequence assigned to the entry.
        """
        seq = db.next_seq
        db.next_seq += 1
        ctx.txn(db).put(seq_key(seq), codec.pack([origin, version, user, ops]),
                        db=db.txns_dbi, append=True)
        return seq

    # -- schema jobs -------------------------------------------------------------------
    def _register_database(self, ctx: WriteContext, db: Database) -> None:
        self.databases[db.name] = db
        ctx.on_undo(lambda: self.databases.pop(db.name, None))
        ctx.after_commit.append(lambda: self._emit("created", db.name))

    def _emit(self, event: str, name: str) -> None:
        for listener in list(self.database_listeners):
            listener(event, name)

    def _database_job(self, name: str, version: int | None, log_it: bool,
                      exists_ok: bool) -> tuple[Callable[[WriteContext], Any], Callable[[], None]]:
        box: dict[str, Database] = {}

        def prepare() -> None:
            if name not in self.databases:
                box["db"] = self._open_env(name)

        def fn(ctx: WriteContext) -> str:
            if name in self.databases:
                if exists_ok:
                    return "exists"
                raise BadRequestError(f"database '{name}' already exists")
            self._register_database(ctx, box["db"])
            if log_it:
                system = self.databases[SYSTEM]
                self.append_log(ctx, system, [[None, "create_database", name, None]],
                                version or self.hlc.now())
            return "created"

        return fn, prepare

    async def create_database(self, name: str) -> None:
        fn, prepare = self._database_job(name, None, True, False)
        await self.write(fn, prepare)

    def _create_table_job(self, db_name: str, name: str, primary_key: str,
                          attributes: list[str], log_it: bool = True, version: int | None = None,
                          origin: int = LOCAL_ORIGIN, exists_ok: bool = False,
                          handles: tuple[Any, Any] | None = None,
                          ) -> tuple[Callable[[WriteContext], Any], Callable[[], None]]:
        box: dict[str, Any] = {} if handles is None else {"handles": handles}

        def prepare() -> None:
            db = self.databases.get(db_name)
            if db is None:
                db = box["new_db"] = self._open_env(db_name)
            if name not in db.tables and "handles" not in box:
                box["handles"] = db.open_table_handles(name)

        def fn(ctx: WriteContext) -> str:
            if "new_db" in box:
                if db_name in self.databases:
                    raise BadRequestError(f"database '{db_name}' changed concurrently; retry")
                self._register_database(ctx, box["new_db"])
                if log_it:
                    self.append_log(ctx, self.databases[SYSTEM],
                                    [[None, "create_database", db_name, None]], self.hlc.now())
            db = self.databases[db_name]
            if name in db.tables:
                if exists_ok:
                    return "exists"
                raise BadRequestError(f"Table '{name}' already exists in '{db_name}'")
            if "handles" not in box:
                raise BadRequestError(f"Table '{name}' changed concurrently; retry")
            v = version or self.hlc.now()
            table = Table(name, primary_key, *box["handles"], attributes=list(attributes),
                          version=v)
            db.tables[name] = table
            ctx.on_undo(lambda: db.tables.pop(name, None))
            ctx.txn(db).put(TABLE_PREFIX + name.encode(), codec.pack(table.definition()),
                            db=db.meta_dbi)
            ctx.txn(db).delete(DROPPED_PREFIX + name.encode(), db=db.meta_dbi)
            if log_it:
                self.append_log(ctx, db, [[name, "create_table", None, table.definition()]],
                                v, origin)
            return "created"

        return fn, prepare

    async def ensure_tables(self, db_name: str, definitions: dict[str, Any]) -> None:
        """Create missing tables from a peer's definitions (not logged: peers learn
        tables from their own hello exchange)."""
        db = self.databases.get(db_name)
        if db is None:
            return
        for name, definition in definitions.items():
            if name in db.tables or not NAME_RE.match(name) or not isinstance(definition, dict):
                continue
            fn, prepare = self._create_table_job(
                db_name, name, str(definition.get("primary_key", "id")),
                list(definition.get("attributes", [])), log_it=False,
                version=int(definition.get("version", 0)) or None, exists_ok=True)
            await self.write(fn, prepare)

    async def ensure_databases(self, names: list[str]) -> None:
        """Create missing databases a peer reported (not logged)."""
        for name in names:
            if name not in self.databases and NAME_RE.match(name):
                fn, prepare = self._database_job(name, None, False, True)
                await self.write(fn, prepare)

    async def create_table(self, db_name: str, name: str, primary_key: str,
                           attributes: list[str] | None = None) -> None:
        fn, prepare = self._create_table_job(db_name, name, primary_key, attributes or [])
        await self.write(fn, prepare)

    def drop_table_in(self, ctx: WriteContext, db: Database, name: str, version: int,
                      origin: int, log_it: bool) -> None:
        """Empty and forget a table inside a job (the named DBIs stay, empty, for reuse)."""
        table = db.tables.pop(name)
        ctx.on_undo(lambda: db.tables.__setitem__(name, table))
        txn = ctx.txn(db)
        txn.drop(table.dbi, delete=False)
        txn.drop(table.tomb_dbi, delete=False)
        txn.delete(TABLE_PREFIX + name.encode(), db=db.meta_dbi)
        txn.put(DROPPED_PREFIX + name.encode(), codec.pack(version), db=db.meta_dbi)
        if log_it:
            self.append_log(ctx, db, [[name, "drop_table", None, None]], version, origin)

    async def drop_table(self, db_name: str, name: str) -> None:
        def fn(ctx: WriteContext) -> None:
            db, _ = self.table(db_name, name)
            self.drop_table_in(ctx, db, name, self.hlc.now(), LOCAL_ORIGIN, True)

        await self.write(fn)

    def drop_database_in(self, ctx: WriteContext, name: str, version: int, origin: int,
                         log_it: bool) -> None:
        """Forget a database inside a job; its files are deleted after the commit."""
        if name == SYSTEM:
            raise BadRequestError("the 'system' database cannot be dropped")
        db = self.databases.pop(name)
        ctx.on_undo(lambda: self.databases.__setitem__(name, db))
        if log_it:
            self.append_log(ctx, self.databases[SYSTEM],
                            [[None, "drop_database", name, None]], version, origin)

        def destroy() -> None:
            self._emit("dropped", name)
            db.destroy()

        ctx.after_commit.append(destroy)

    async def drop_database(self, name: str) -> None:
        def fn(ctx: WriteContext) -> None:
            self.database(name)
            self.drop_database_in(ctx, name, self.hlc.now(), LOCAL_ORIGIN, True)

        await self.write(fn)

    async def set_attributes(self, db_name: str, table_name: str, add: list[str],
                             remove: list[str]) -> None:
        """Add or remove attribute names in a table definition (``create_attribute``)."""
        def fn(ctx: WriteContext) -> None:
            db, table = self.table(db_name, table_name)
            for attr in add:
                if attr in table.attributes or attr == table.primary_key:
                    raise BadRequestError(f"attribute '{attr}' already exists in "
                                          f"{db_name}.{table_name}")
            for attr in remove:
                if attr not in table.attributes:
                    raise NotFoundError(f"attribute '{attr}' does not exist")
            old = list(table.attributes)
            table.attributes = [a for a in old if a not in remove] + list(add)
            ctx.on_undo(lambda: setattr(table, "attributes", old))
            ctx.txn(db).put(TABLE_PREFIX + table_name.encode(), codec.pack(table.definition()),
                            db=db.meta_dbi)

        await self.write(fn)
