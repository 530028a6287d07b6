"""The storage root: the catalog of databases, schema changes and the writer thread."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harpsync import codec
from harpsync.durable import sync_directory
from harpsync.errors import BadRequestError, PayloadTooLargeError, StorageError
from harpsync.storage import digest, logscan, redo
from harpsync.storage.database import (
    CREATED_KEY,
    DROPPED_DB_PREFIX,
    DROPPED_PREFIX,
    LOCAL_ORIGIN,
    MAX_LOG_ENTRY,
    TABLE_PREFIX,
    Database,
    Table,
    attribute_marks_of,
)
from harpsync.storage.errors import NoSuchDatabaseError, NoSuchTableError
from harpsync.storage.hlc import HLC, wall_ms_of
from harpsync.storage.keys import seq_key
from harpsync.storage.mapped import release_mapped_pages
from harpsync.storage.writer import WriteContext, Writer

log = logging.getLogger(__name__)

SYSTEM = "system"
SYSTEM_TABLES = {"hdb_user": "username", "hdb_role": "id", "hdb_nodes": "name",
                 "hdb_conflicts": "id", "hdb_dead_letters": "id"}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class Storage:
    """All databases of one node under ``<root>/database/<name>/``."""

    def __init__(self, root: Path, node_name: str, map_size: int = 1 << 36,
                 max_log_entry: int = MAX_LOG_ENTRY) -> None:
        """``max_log_entry``: the largest log entry a local write may make (the frame
        size peers take bounds it; a test may set it lower)."""
        self.root = root
        self.node_name = node_name
        self.map_size = map_size
        self.max_log_entry = max_log_entry
        self.hlc = HLC()
        self.databases: dict[str, Database] = {}
        self.writer = Writer()
        # DBIs and environments opened by a job's prepare step, used by its body.
        self.pending_handles: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.pending_envs: dict[str, Database] = {}
        # Called (in the writer thread, after commit) with (event, database name).
        self.database_listeners: list[Callable[[str, str], None]] = []
        # Whether a database replicates (``replication.databases``); a database that
        # does not is never created, dropped or filled because of a peer.
        self.replicates: Callable[[str], bool] = lambda _name: True
        # Told, in the awaiting task, the newest version each write job logged (the
        # HTTP layer answers it as ``X-Harpsync-Version``).
        self.on_write_version: Callable[[int], None] | None = None
        self.trims = 0  # times the mapped pages were released (trim_memory)

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Open every database on disk, create ``system`` if needed, start the writer."""
        base = self.root / "database"
        fresh = not base.exists()
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fresh:
            sync_directory(self.root)  # the databases' own directories sync below
        os.chmod(self.root, 0o700)
        os.chmod(base, 0o700)
        self.databases[SYSTEM] = self._open_env(SYSTEM)
        markers = self.database_markers()
        for path in sorted(base.iterdir()):
            if path.name == SYSTEM or not path.is_dir() or not NAME_RE.match(path.name):
                continue
            db = self._open_env(path.name)
            marker = markers.get(path.name)
            if marker is not None and marker >= db.created:
                # The drop committed but its directory outlived it (a crash): finish it.
                log.info("removing dropped database '%s'", path.name)
                db.destroy()
                continue
            if not db.created and not db.tables and db.next_seq == 1:
                # Every create commits its version here; an environment without one
                # was opened for a create that never committed (a crash between its
                # prepare and commit). Kept, it would read as a database that exists
                # here only: never replicated, and create_database refused.
                log.info("removing database '%s' whose create never committed", path.name)
                db.destroy()
                continue
            self.databases[path.name] = db
        for db in self.databases.values():
            self._observe_log_versions(db)
        system = self.databases[SYSTEM]
        self.writer.system = system
        self.writer.start()
        for name, pk in SYSTEM_TABLES.items():
            if name not in system.tables:
                self.writer.run_sync(*self._create_table_job(SYSTEM, name, pk, [], log_it=False))
        self._replay_redo(system)

    def _replay_redo(self, system: Database) -> None:
        """Apply the system rows a crash kept from committing with their data (``redo``)."""
        todo = redo.pending(system, list(self.databases.values()))
        if not todo:
            return

        def job(ctx: WriteContext) -> int:
            txn = ctx.txn(system)
            return sum(redo.apply(txn, system, db, generation, ops)
                       for db, generation, ops in todo)

        applied = self.writer.run_sync(job)
        log.warning("applied %d system-table change(s) that a crash kept from committing "
                    "with their data (%s)", applied, ", ".join(db.name for db, _, _ in todo))

    def close(self) -> None:
        """Stop the writer once its jobs are done, then close every environment."""
        self.writer.stop()
        for db in self.databases.values():
            db.close()

    def _open_env(self, name: str) -> Database:
        return Database(name, self.root / "database" / name, self.map_size, self.node_name)

    def pending_env(self, name: str) -> Database:
        """The environment a create of database ``name`` will register (writer thread,
        outside a transaction). Every job of a group that may create ``name`` shares it,
        so one path is never opened twice."""
        db = self.pending_envs.get(name)
        if db is None:
            db = self.pending_envs[name] = self._open_env(name)
        return db

    def discard_pending(self, names: list[str]) -> None:
        """After a group: delete environments opened for creates that did not happen."""
        for name in names:
            if name in self.databases:
                continue
            db = self.pending_envs.pop(name, None)
            if db is not None:
                db.destroy()

    def database_markers(self) -> dict[str, int]:
        """Drop markers of databases (``dropped_db:<name>`` in ``system``)."""
        return {k.decode(): int(v)
                for k, v in self.databases[SYSTEM].iter_meta(DROPPED_DB_PREFIX)}

    def database_marker(self, ctx: WriteContext, name: str) -> int:
        system = self.databases[SYSTEM]
        raw = ctx.txn(system).get(DROPPED_DB_PREFIX + name.encode(), db=system.meta_dbi)
        return int(codec.unpack(raw)) if raw else 0

    def raise_database_marker(self, ctx: WriteContext, name: str, version: int) -> bool:
        """Record that database ``name`` is dropped up to ``version``; markers only rise."""
        if version <= self.database_marker(ctx, name):
            return False
        system = self.databases[SYSTEM]
        ctx.txn(system).put(DROPPED_DB_PREFIX + name.encode(), codec.pack(version),
                            db=system.meta_dbi)
        return True

    def raise_table_marker(self, ctx: WriteContext, db: Database, name: str,
                           version: int) -> bool:
        """Record that table ``name`` is dropped up to ``version``; markers only rise."""
        txn = ctx.txn(db)
        if version <= db.table_marker(txn, name):
            return False
        txn.put(DROPPED_PREFIX + name.encode(), codec.pack(version), db=db.meta_dbi)
        return True

    def _observe_log_versions(self, db: Database) -> None:
        # Keep versions monotonic across restarts even if the wall clock stepped back.
        entries = db.log_after(max(0, db.next_seq - 2), 1)
        for _, raw in entries:
            self.hlc.observe(codec.unpack(raw)[1])
        # This node's own versions keep rising whatever the clock did, past the skew
        # bound too: a peer takes an origin's log to be in version order and skips what
        # is at or below the newest version it holds from it (its floor), so a write
        # stamped below an earlier one of this node would never reach it.
        own = max(logscan.newest_local_version(db), db.pruned_max().get(self.node_name, 0))
        behind_ms = wall_ms_of(own) - self.hlc.wall_now_ms()
        if behind_ms > self.hlc.max_skew_ms:
            log.warning("the clock is %.0f s behind versions this node issued before "
                        "(database %s): its writes carry versions past the clock until it "
                        "catches up, and peers may hold them back as clock skew",
                        behind_ms / 1000, db.name)
        self.hlc.advance_past(own)

    def trim_memory(self) -> int:
        """Unmap LMDB pages this process touched (they stay in the page cache)."""
        self.trims += 1
        return release_mapped_pages({db.data_file for db in list(self.databases.values())})

    def data_sizes(self) -> dict[Database, int]:
        """The size of each open database's data file (what trims are paced by)."""
        sizes: dict[Database, int] = {}
        for db in list(self.databases.values()):
            with contextlib.suppress(OSError):  # a database being dropped
                sizes[db] = os.stat(db.data_file).st_size
        return sizes

    # -- lookups -----------------------------------------------------------------------
    def database(self, name: str) -> Database:
        """The open database ``name``.

        Raises:
            NoSuchDatabaseError: there is none.
        """
        db = self.databases.get(name)
        if db is None:
            raise NoSuchDatabaseError(name)
        return db

    def table(self, db_name: str, table_name: str) -> tuple[Database, Table]:
        """The table ``db_name.table_name`` and its database.

        Raises:
            NoSuchDatabaseError, NoSuchTableError: either does not exist.
        """
        db = self.database(db_name)
        table = db.tables.get(table_name)
        if table is None:
            raise NoSuchTableError(db_name, table_name)
        return db, table

    async def write(self, fn: Callable[[WriteContext], Any],
                    prepare: Callable[[], None] | None = None, small: bool = False) -> Any:
        """Run ``fn`` in the writer thread; return once its transaction is durable.

        ``small``: ``fn`` is quick (a few records), so it may run on the event loop
        (see ``Writer.submit``).
        """
        listener = self.on_write_version
        if listener is None:
            return await self.writer.submit(fn, prepare, small)
        logged = [0]

        def run(ctx: WriteContext) -> Any:
            result = fn(ctx)
            logged[0] = ctx.version
            return result

        result = await self.writer.submit(run, prepare, small)
        if logged[0]:
            listener(logged[0])
        return result

    # -- log -----------------------------------------------------------------------------
    def append_log(self, ctx: WriteContext, db: Database, ops: list[list[Any]], version: int,
                   origin: int = LOCAL_ORIGIN, user: str | None = None,
                   packed: bytes | None = None) -> int:
        """Append one transaction-log entry ``[origin, version, user, ops]``.

        ``packed``: that entry already encoded (a peer's entry applied whole, with this
        node's origin id put in), so it is not packed again.

        Returns:
            The local commit sequence assigned to the entry.
        """
        seq = db.next_seq
        db.next_seq += 1
        if version > ctx.version:
            ctx.version = version
        # A job that fails after this gives its sequence back: no gap, no phantom lag.
        ctx.on_undo(lambda: setattr(db, "next_seq", min(db.next_seq, seq)))
        value = packed if packed is not None else codec.pack([origin, version, user, ops])
        if len(value) > self.max_log_entry and origin == LOCAL_ORIGIN:
            raise PayloadTooLargeError(
                f"this write would log {len(value) / 2**20:.0f} MiB in one transaction; at "
                f"most {self.max_log_entry // 2**20} MiB replicate to peers: write fewer or "
                "smaller records per request")
        if not ctx.txn(db).put(seq_key(seq), value, db=db.txns_dbi, append=True):
            # LMDB refuses an append under a key not past the last one without raising:
            # the entry would be lost silently, and the write never replicated.
            raise StorageError(f"the transaction log of database '{db.name}' already "
                               f"holds sequence {seq}; the write was not made")
        ctx.logged.append((db, seq, value))
        return seq

    # -- schema jobs -------------------------------------------------------------------
    def create_database_in(self, ctx: WriteContext, name: str, version: int, origin: int,
                           log_it: bool) -> Database:
        """Register the pending environment of ``name`` as database incarnation ``version``."""
        db = self.pending_envs.pop(name)
        self.databases[name] = db
        old_created = db.created

        def undo() -> None:
            self.databases.pop(name, None)
            db.created = old_created
            self.pending_envs.setdefault(name, db)

        ctx.on_undo(undo)
        db.created = version
        ctx.txn(db).put(CREATED_KEY, codec.pack(version), db=db.meta_dbi)
        self.hlc.observe(version)
        if log_it:
            # As for tables: the drop this create follows travels with it, so a peer that
            # gets the create (from its origin) before the drop (from another origin)
            # applies the drop first instead of taking the create for a concurrent one.
            after_drop = self.database_marker(ctx, name)
            self.append_log(ctx, self.databases[SYSTEM],
                            [[None, "create_database", name,
                              {"after_drop": after_drop} if after_drop else None]],
                            version, origin)
        ctx.after_commit.append(lambda: self._emit("created", name))
        return db

    def _emit(self, event: str, name: str) -> None:
        for listener in list(self.database_listeners):
            listener(event, name)

    def _new_database(self, ctx: WriteContext, name: str) -> Database:
        """A local create of ``name``: a version newer than any drop of it."""
        if name not in self.pending_envs:
            raise BadRequestError(f"database '{name}' changed concurrently; retry")
        # ``now_after``, not the clock: with the clock set back across a restart (past
        # the skew bound) the version must still beat the drop, or peers ignore it.
        version = self.hlc.now_after(self.database_marker(ctx, name))
        return self.create_database_in(ctx, name, version, LOCAL_ORIGIN, True)

    async def create_database(self, name: str) -> None:
        def prepare() -> None:
            if name not in self.databases:
                self.pending_env(name)

        def fn(ctx: WriteContext) -> None:
            if name in self.databases:
                raise BadRequestError(f"database '{name}' already exists")
            self._new_database(ctx, name)

        await self.write(fn, prepare)

    def create_table_in(self, ctx: WriteContext, db: Database, name: str,
                        definition: dict[str, Any], version: int, origin: int,
                        log_it: bool) -> Table:
        """Add table incarnation ``version`` to the catalog (its handles must be open)."""
        table = Table(name, str(definition.get("primary_key", "id")), *db.handles[name],
                      attributes=list(definition.get("attributes", [])), version=version,
                      attribute_marks=attribute_marks_of(definition))
        table.digest = db.table_digest(name)
        digest.mark_built(ctx.txn(db), table)
        db.tables[name] = table
        ctx.on_undo(lambda: db.tables.pop(name, None))
        db.save_definition(ctx.txn(db), table)
        self.hlc.observe(version)
        if log_it:
            # The drop this create follows travels with it: with one copy per link a
            # peer may get this create (from its origin) before that drop (from
            # another origin), and must not mistake the create for a concurrent one.
            after_drop = db.table_marker(ctx.txn(db), name)
            self.append_log(ctx, db, [[name, "create_table", None,
                                       {**table.definition(), "after_drop": after_drop}]],
                            version, origin)
        return table

    def _create_table_job(self, db_name: str, name: str, primary_key: str,
                          attributes: list[str], log_it: bool = True,
                          ) -> tuple[Callable[[WriteContext], Any], Callable[[], None]]:
        def prepare() -> None:
            db = self.databases.get(db_name)
            if db is None:
                db = self.pending_env(db_name)
            db.open_table_handles(name)

        def fn(ctx: WriteContext) -> str:
            if db_name not in self.databases:
                self._new_database(ctx, db_name)
            db = self.databases[db_name]
            if name in db.tables:
                raise BadRequestError(f"Table '{name}' already exists in '{db_name}'")
            if name not in db.handles:
                raise BadRequestError(f"Table '{name}' changed concurrently; retry")
            # A new incarnation must be newer than every drop of the name, whatever the
            # clock says (it may have been set back across a restart).
            version = self.hlc.now_after(db.table_marker(ctx.txn(db), name))
            self.create_table_in(ctx, db, name, {"primary_key": primary_key,
                                                 "attributes": attributes},
                                 version, LOCAL_ORIGIN, log_it)
            return "created"

        return fn, prepare

    async def create_table(self, db_name: str, name: str, primary_key: str,
                           attributes: list[str] | None = None) -> None:
        fn, prepare = self._create_table_job(db_name, name, primary_key, attributes or [])
        await self.write(fn, prepare)

    def drop_table_in(self, ctx: WriteContext, db: Database, name: str, version: int,
                      origin: int, log_it: bool) -> None:
        """Empty and forget a table inside a job (the named DBIs stay, empty, for reuse).

        The drop marker rises to ``version`` (never down).
        """
        table = db.tables.pop(name)
        ctx.on_undo(lambda: db.tables.__setitem__(name, table))
        txn = ctx.txn(db)
        txn.drop(table.dbi, delete=False)
        txn.drop(table.tomb_dbi, delete=False)
        digest.clear(txn, table)
        txn.delete(TABLE_PREFIX + name.encode(), db=db.meta_dbi)
        self.raise_table_marker(ctx, db, name, version)
        if log_it:
            self.append_log(ctx, db, [[name, "drop_table", None, None]], version, origin)

    async def drop_table(self, db_name: str, name: str) -> None:
        def fn(ctx: WriteContext) -> None:
            db, table = self.table(db_name, name)
            # Newer than the incarnation it drops (a peer's create, stamped past a clock
            # set back across a restart): an older drop leaves it standing on peers.
            self.drop_table_in(ctx, db, name, self.hlc.now_after(table.version),
                               LOCAL_ORIGIN, True)

        await self.write(fn)

    def drop_database_in(self, ctx: WriteContext, name: str, version: int, origin: int,
                         log_it: bool) -> None:
        """Forget a database inside a job; its files are deleted after the commit.

        The drop marker (``version``) commits with the job, so a crash
        before the files go still leaves the database dropped (``open`` finishes it).
        """
        if name == SYSTEM:
            raise BadRequestError("the 'system' database cannot be dropped")
        db = self.databases.pop(name)
        ctx.on_undo(lambda: self.databases.__setitem__(name, db))
        self.raise_database_marker(ctx, name, version)
        if log_it:
            self.append_log(ctx, self.databases[SYSTEM],
                            [[None, "drop_database", name, None]], version, origin)

        def destroy() -> None:
            self._emit("dropped", name)
            db.destroy()

        ctx.after_commit.append(destroy)

    async def drop_database(self, name: str) -> None:
        def fn(ctx: WriteContext) -> None:
            db = self.database(name)
            # Newer than the incarnation it drops, as for a table.
            self.drop_database_in(ctx, name, self.hlc.now_after(db.created),
                                  LOCAL_ORIGIN, True)

        await self.write(fn)
