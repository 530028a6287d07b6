"""One LMDB environment per database: table DBIs, the transaction log and metadata."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from harpsync import codec
from harpsync.durable import sync_directory
from harpsync.errors import StorageError
from harpsync.storage import digest
from harpsync.storage.errors import NoSuchDatabaseError, TooManyTablesError
from harpsync.storage.hlc import COUNTER_BITS, HLC
from harpsync.storage.keys import seq_key, seq_of
from harpsync.storage.mapped import MAPS_LOCK
from harpsync.storage.repeats import Repeats

TXNS_DBI = b"__txns__"
META_DBI = b"__meta__"
TABLE_PREFIX = b"table:"
ORIGIN_PREFIX = b"origin:"
CURSOR_PREFIX = b"cursor:"
PRUNED_KEY = b"pruned_through"
DROPPED_PREFIX = b"dropped:"
# Per origin name: the highest version received from that origin (by any path), and the
# highest version of that origin's entries that pruning or purge_stream removed.
HW_PREFIX = b"hw:"
PRUNED_MAX_PREFIX = b"pruned_max:"
# Per table: ``[incarnation, version]``, the newest tombstone retention swept (horizon.py).
SWEPT_PREFIX = b"swept:"
# A cap on them: this node's rows above it may be lost (its log was restored).
RESTORED_KEY = b"restored_below"
# The version from which rows of this node's name are this environment's own: set when
# it first holds the name (a new environment, a wiped node, a new name). Older rows of
# the name were written by an earlier node of that name, which this one never held.
OWN_SINCE_KEY = b"own_since"
# In the ``system`` database: the newest drop version of another database.
DROPPED_DB_PREFIX = b"dropped_db:"
# In a database's own ``__meta__``: the version of the create that made it.
CREATED_KEY = b"created"
LOCAL_ORIGIN = 0
# The newest committed log entries a database keeps in memory while it has commit
# listeners (publishers), so a publisher woken by a commit reads them without an LMDB
# transaction (each read transaction of an environment with 4096 DBIs allocates and
# zeroes about 200 KiB). At least this many are kept (up to twice as many between
# trims), in at most ``TAIL_BYTES``. See ``Database.remember_log``.
TAIL_ENTRIES = 128
TAIL_BYTES = 1 << 20
TIME_ATTRIBUTES = ("__createdtime__", "__updatedtime__")
# Named sub-databases per environment: ``__txns__`` and ``__meta__``, then three per
# table (rows, tombstones, hashes). LMDB cannot close one while the environment is open,
# so a dropped table's three keep their slots until the node restarts.
MAX_DBS = 4096
# The largest transaction-log entry a local write may make: a peer receives an entry
# in one replication frame (``replication/transport.MAX_FRAME`` is sized from this).
MAX_LOG_ENTRY = 192 * 1024 * 1024
MAX_TABLES = (MAX_DBS - 2) // 3


def attribute_marks_of(definition: Any) -> dict[str, list[Any]]:
    """The well-formed ``attribute_marks`` of a table definition (stored or a peer's)."""
    raw = definition.get("attribute_marks") if isinstance(definition, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {str(k): [int(v[0]), bool(v[1])] for k, v in raw.items()
            if isinstance(v, list | tuple) and len(v) == 2 and isinstance(v[0], int)
            and not isinstance(v[0], bool) and isinstance(v[1], bool)}


class CommittedSchema(NamedTuple):
    """What ``Database.committed_schema`` read: tables by name, their drop markers,
    and the database's creation version (0: not committed yet, or from before it)."""

    tables: dict[str, dict[str, Any]]
    dropped: dict[str, int]
    created: int


@dataclass
class Table:
    """A table's definition plus its open DBI handles."""

    name: str
    primary_key: str
    dbi: Any
    tomb_dbi: Any
    attributes: list[str] = field(default_factory=list)
    version: int = 0
    # The maintained row hashes (storage/digest.py); None only while a table is built.
    digest: Any = None
    # Per attribute an operator created or dropped: ``[version, present]`` of the
    # newest such change (``schema.set_attribute``), so that attribute changes converge.
    attribute_marks: dict[str, list[Any]] = field(default_factory=dict)
    # ``known_names``' cache: the ``attributes`` list it was built from, and the set.
    _known: tuple[list[str], frozenset[str]] | None = field(default=None, repr=False,
                                                            compare=False)

    def known_names(self) -> frozenset[str]:
        """Every field name a record may carry without being new to the definition:
        the attributes, the primary key, the time attributes. Cached until
        ``attributes`` is replaced (it is never changed in place)."""
        cached = self._known
        if cached is None or cached[0] is not self.attributes:
            names = frozenset(self.attributes).union((self.primary_key, *TIME_ATTRIBUTES))
            cached = self._known = (self.attributes, names)
        return cached[1]

    def definition(self) -> dict[str, Any]:
        """The plain dict stored in ``__meta__`` and sent to peers in ``hello``."""
        out = {
            "name": self.name,
            "primary_key": self.primary_key,
            "attributes": list(self.attributes),
            "version": self.version,
        }
        if self.attribute_marks:
            out["attribute_marks"] = {k: list(v) for k, v in self.attribute_marks.items()}
        return out


class Database:
    """A database: its LMDB environment, tables, log position and origin-id map.

    The catalog (``tables``, ``origin_ids``) is mutated only by the writer thread; other
    threads read it. ``next_seq`` is owned by the writer thread as well.
    """

    def __init__(self, name: str, path: Path, map_size: int, local_name: str) -> None:
        self.name = name
        self.path = path
        fresh = not path.exists()
        # Private whatever the umask: the files hold password hashes and node rows.
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        try:
            self.env = lmdb.Environment(
                str(path), map_size=map_size, max_dbs=MAX_DBS, max_readers=512,
                subdir=True, sync=True, metasync=True, readahead=False, mode=0o600,
                # Reuse one reset read transaction: with 4096 DBIs a fresh one costs a
                # zeroed allocation of ~200 KB (about 2 µs, a tenth of a search_by_id).
                max_spare_txns=1,
            )
        except lmdb.Error as exc:  # e.g. a storage.mapSize larger than the address space
            raise StorageError(f"cannot open database '{name}' in {path} with "
                               f"storage.mapSize {map_size}: {exc}") from None
        for name in ("data.mdb", "lock.mdb"):
            if (path / name).exists():
                os.chmod(path / name, 0o600)
        if fresh:
            # LMDB syncs its data file, not the names: without this a power loss could
            # take away the files of a database whose create was acknowledged.
            sync_directory(path)
            sync_directory(path.parent)
        self.txns_dbi = self.env.open_db(TXNS_DBI)
        self.meta_dbi = self.env.open_db(META_DBI)
        self.tables: dict[str, Table] = {}
        self.origin_ids: dict[str, int] = {}
        self.origin_names: dict[int, str] = {}
        self.origin_high = 0
        self.origin_hw: dict[str, int] = {}
        # Per origin, versions applied without raising its floor (repeats.py).
        self.repeats = Repeats()
        self.next_seq = 1
        self.commit_listeners: list[Callable[[int], None]] = []
        # Set once the database was dropped: readers waiting on commits must give up.
        self.dropped = False
        self._lock = threading.Lock()
        # Table DBI handles by name, kept across drops so a re-create needs no new open.
        self.handles: dict[str, tuple[Any, Any]] = {}
        self.digest_dbis: dict[str, Any] = {}
        self.closed = False
        # The log tail (see ``read_log``): consecutive committed entries, replaced as a
        # whole (never changed in place), with the pruned-through sequence they were
        # read under (None: unknown, read the log). ``_tail_held`` counts jobs that
        # rewrite or prune the log and are not committed yet.
        self._tail: list[tuple[int, bytes]] = []
        self._tail_size = 0
        self._tail_pruned: int | None = None
        self._tail_gen = 0
        self._tail_held = 0
        self._load(local_name)
        self.created = self._read_created()

    # -- loading ---------------------------------------------------------------------
    def _load(self, local_name: str) -> None:
        definitions = [value for _, value in self.iter_meta(TABLE_PREFIX)]
        self.origin_hw = {name.decode(): int(v) for name, v in self.iter_meta(HW_PREFIX)}
        for name, oid in self.iter_meta(ORIGIN_PREFIX):
            self.origin_ids[name.decode()] = oid
            self.origin_names[oid] = name.decode()
        for definition in definitions:
            self._open_table(definition)
        # The local node is always origin 0 in this database.
        stale = self.origin_names.get(LOCAL_ORIGIN)
        if stale != local_name:
            if stale is not None:
                self.origin_ids.pop(stale, None)
            self.origin_ids[local_name] = LOCAL_ORIGIN
            self.origin_names[LOCAL_ORIGIN] = local_name
            since = HLC().wall_now_ms() << COUNTER_BITS  # no row of this name held yet
            with self.env.begin(write=True) as txn:
                txn.put(ORIGIN_PREFIX + local_name.encode(), codec.pack(LOCAL_ORIGIN),
                        db=self.meta_dbi)
                txn.put(OWN_SINCE_KEY, codec.pack(since), db=self.meta_dbi)
        for table in self.tables.values():
            self._ensure_digest(table)
        # Sequences continue after the highest ever assigned, also when retention pruned
        # the whole log: a peer's cursor ("after pruned_through") must see new entries.
        self.next_seq = self.head_seq + 1
        # The head as this process found it: a subscriber's cursor past it must have
        # come from entries this process sent (see replication/DESIGN.md, "Restored
        # logs").
        self.opened_head = self.next_seq - 1
        # Per peer: the highest sequence a message this process sent it let its cursor
        # reach (kept by publishers; it lives and dies with this incarnation).
        self.sent_to: dict[str, int] = {}

    def _read_created(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(CREATED_KEY, db=self.meta_dbi)
        return int(codec.unpack(raw)) if raw else 0

    def _open_table(self, definition: dict[str, Any]) -> Table:
        name = definition["name"]
        dbi, tomb_dbi = self.open_table_handles(name)
        table = Table(
            name=name,
            primary_key=definition["primary_key"],
            dbi=dbi,
            tomb_dbi=tomb_dbi,
            attributes=list(definition.get("attributes", [])),
            version=definition.get("version", 0),
            attribute_marks=attribute_marks_of(definition),
        )
        table.digest = self.table_digest(name)
        self.tables[name] = table
        return table

    def table_marker(self, txn: lmdb.Transaction, name: str) -> int:
        """The newest drop version recorded for table ``name`` (0 if never dropped)."""
        raw = txn.get(DROPPED_PREFIX + name.encode(), db=self.meta_dbi)
        return int(codec.unpack(raw)) if raw else 0

    def save_definition(self, txn: lmdb.Transaction, table: Table) -> None:
        """Store ``table``'s definition in ``__meta__`` (within a writer job's txn)."""
        txn.put(TABLE_PREFIX + table.name.encode(), codec.pack(table.definition()),
                db=self.meta_dbi)

    def table_digest(self, name: str) -> digest.TableDigest:
        """The hash DBI of table ``name`` (opened with its handles)."""
        return digest.TableDigest(self.digest_dbis[name], self.origin_names)

    def _ensure_digest(self, table: Table) -> None:
        # Tables from before hash maintenance (or written with it off) are hashed once.
        if not digest.ENABLED:
            return
        with self.env.begin(write=True) as txn:
            if not digest.is_built(txn, table):
                digest.rebuild(txn, table)

    def open_table_handles(self, name: str) -> tuple[Any, Any]:
        """Create (or reopen) a table's DBIs. Writer thread only, outside a write txn."""
        handles = self.handles.get(name)
        if handles is None:
            if len(self.handles) >= MAX_TABLES:  # checked first: nothing half opened
                raise TooManyTablesError(self.name, MAX_TABLES)
            handles = self.handles[name] = (self.env.open_db(b"t:" + name.encode()),
                                            self.env.open_db(b"x:" + name.encode()))
            self.digest_dbis[name] = self.env.open_db(b"h:" + name.encode())
        return handles

    # -- reads -------------------------------------------------------------------------
    @property
    def head_seq(self) -> int:
        """The newest committed log sequence, also when pruning emptied the log."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.txns_dbi)
            last = seq_of(cur.key()) if cur.last() else 0
            raw = txn.get(PRUNED_KEY, db=self.meta_dbi)
        return max(last, int(codec.unpack(raw)) if raw else 0)

    def pruned_through(self) -> int:
        """The highest log sequence removed by retention or ``purge_stream`` (0 if none)."""
        with self.env.begin() as txn:
            raw = txn.get(PRUNED_KEY, db=self.meta_dbi)
        return int(codec.unpack(raw)) if raw else 0

    def pruned_max(self) -> dict[str, int]:
        """Per origin name, the newest version of its entries removed from this log."""
        return {name.decode(): int(v) for name, v in self.iter_meta(PRUNED_MAX_PREFIX)}

    def read_log(self, after_seq: int, limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        """``pruned_through`` and up to ``limit`` entries after ``after_seq``, read in one
        transaction, so a prune between the two reads cannot skip entries unnoticed.

        Returns:
            ``(pruned_through, [(seq, stored value bytes), ...])``.
        """
        tail, pruned_known = self._tail, self._tail_pruned
        if tail and pruned_known is not None and pruned_known <= after_seq \
                and not self._tail_held:
            start = after_seq + 1 - tail[0][0]
            if start >= 0:
                return pruned_known, tail[start:start + limit]
        gen = self._tail_gen
        out: list[tuple[int, bytes]] = []
        with self.env.begin() as txn:
            raw = txn.get(PRUNED_KEY, db=self.meta_dbi)
            pruned = int(codec.unpack(raw)) if raw else 0
            cur = txn.cursor(db=self.txns_dbi)
            if cur.set_range(seq_key(after_seq + 1)):
                for key, value in cur:
                    out.append((seq_of(key), value))
                    if len(out) >= limit:
                        break
        if gen == self._tail_gen and not self._tail_held:
            # No prune began or committed during the read: its pruned-through holds.
            self._tail_pruned = pruned
        return pruned, out

    # -- the in-memory log tail --------------------------------------------------------
    def remember_log(self, entries: list[tuple[int, bytes]]) -> None:
        """Keep entries a commit just appended to the log (called by the writer right
        after the commit, before the commit listeners).

        The tail stays consecutive: entries that do not follow it start a new one.
        Nothing is kept while no listener reads the log, or while a job that rewrites
        or prunes it is in flight (``hold_log_tail``).
        """
        if self._tail_held or not self.commit_listeners:
            if self._tail:
                self._tail, self._tail_size = [], 0
            return
        if not entries:
            return  # the log did not change
        # A commit's own entries may skip a sequence (a failed write's entries taken back
        # from ``system``'s log, ``Writer._compensate``): only the run after the last
        # gap is kept, as readers index the tail by sequence.
        gap = next((index for index in range(len(entries) - 1, 0, -1)
                    if entries[index - 1][0] + 1 != entries[index][0]), 0)
        if gap:
            entries = entries[gap:]
            self._tail, self._tail_size = [], 0
        tail = self._tail
        size = sum(len(value) for _, value in entries)
        if tail and tail[-1][0] + 1 == entries[0][0]:
            # In place: a reader on another thread indexes from ``tail[0]``, which an
            # append does not move; trimming the front makes a new list (below).
            tail.extend(entries)
            size += self._tail_size
        else:
            tail = self._tail = list(entries)
        self._tail_size = size
        if len(tail) <= 2 * TAIL_ENTRIES and size <= TAIL_BYTES:
            return
        drop = max(0, len(tail) - TAIL_ENTRIES)
        size -= sum(len(value) for _, value in tail[:drop])
        while size > TAIL_BYTES and drop < len(tail):
            size -= len(tail[drop][1])
            drop += 1
        self._tail, self._tail_size = tail[drop:], size

    def origins_after(self, after_seq: int) -> set[int] | None:
        """The origin ids of the committed entries after ``after_seq`` when the in-memory
        tail holds all of them (read from each entry's head), else None (unknown).

        Called by commit listeners in the thread that committed, right after
        ``remember_log``: a publisher skips waking up for entries it would filter out.
        """
        tail = self._tail
        if not tail or self._tail_held or tail[0][0] > after_seq + 1:
            return None
        start = after_seq + 1 - tail[0][0]
        return {codec.entry_head(raw)[0] for _, raw in tail[start:]}

    def hold_log_tail(self) -> None:
        """A job that rewrites or prunes log entries began: read them from LMDB until
        :meth:`release_log_tail` (after its commit, or its failure)."""
        self._tail_held += 1
        self.forget_log_tail()

    def release_log_tail(self) -> None:
        self._tail_held = max(0, self._tail_held - 1)
        self.forget_log_tail()

    def forget_log_tail(self) -> None:
        """Drop the in-memory tail: reads go to LMDB until commits refill it."""
        self._tail, self._tail_size = [], 0
        self._tail_pruned = None
        self._tail_gen += 1

    def log_after(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` committed log entries with sequence greater than ``after_seq``.

        Returns:
            ``(seq, stored value bytes)`` pairs in sequence order.
        """
        out: list[tuple[int, bytes]] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.txns_dbi)
            if not cur.set_range(seq_key(after_seq + 1)):
                return out
            for key, value in cur:
                out.append((seq_of(key), value))
                if len(out) >= limit:
                    break
        return out

    def iter_rows(self, table: Table, after_key: bytes | None, limit: int,
                  tombs: bool = False) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` raw ``(key, stored)`` rows (or tombstones) after ``after_key``.

        A scan reads a chunk at a time: a drop of the database between two chunks (or
        during one) is a ``NoSuchDatabaseError``."""
        try:
            return self._iter_rows(table, after_key, limit, tombs)
        except lmdb.Error as exc:
            raise self.gone(exc) from None

    def _iter_rows(self, table: Table, after_key: bytes | None, limit: int,
                   tombs: bool) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=table.tomb_dbi if tombs else table.dbi)
            found = cur.set_range(after_key) if after_key else cur.first()
            if found and after_key and cur.key() == after_key:
                found = cur.next()
            while found:
                out.append((cur.key(), cur.value()))
                if len(out) >= limit:
                    break
                found = cur.next()
        return out

    def cursor(self, peer: str) -> dict[str, Any]:
        """The replication cursor committed for ``peer`` (empty if none)."""
        with self.env.begin() as txn:
            raw = txn.get(CURSOR_PREFIX + peer.encode(), db=self.meta_dbi)
        return codec.unpack(raw) if raw else {}

    def iter_meta(self, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
        with self.env.begin() as txn:
            yield from self._meta_in(txn, prefix)

    def _meta_in(self, txn: lmdb.Transaction, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
        cur = txn.cursor(db=self.meta_dbi)
        if cur.set_range(prefix):
            for raw_key, value in cur:
                key = bytes(raw_key)  # bytes already (no buffers): no copy
                if not key.startswith(prefix):
                    break
                yield key[len(prefix):], codec.unpack(value)

    def swept_horizons(self) -> dict[str, list[int]]:
        """Per table, ``[incarnation, version]`` of the newest tombstone swept from its
        current incarnation (``horizon.py``), and ``own_since`` if known (rows of this
        node's name below it are not judged): told to a peer taking a full copy."""
        out: dict[str, list[int]] = {}
        with self.reading() as txn:
            swept = list(self._meta_in(txn, SWEPT_PREFIX))
            raw = txn.get(RESTORED_KEY, db=self.meta_dbi)
            since_raw = txn.get(OWN_SINCE_KEY, db=self.meta_dbi)
        cap = int(codec.unpack(raw)) if raw else None
        since = int(codec.unpack(since_raw)) if since_raw else 0
        for name, value in swept:
            table = self.tables.get(name.decode())
            if table is not None and value[0] == table.version:
                version = int(value[1]) if cap is None else min(cap, int(value[1]))
                if version > since:  # with the version its own rows start from
                    out[table.name] = [int(value[0]), version, *([since] if since else [])]
        return out

    def committed_hw(self, origins: Iterable[str]) -> dict[str, int | None]:
        """Per origin, the newest version received from it by any path, as committed
        (None: nothing yet)."""
        with self.reading() as txn:
            raw = {name: txn.get(HW_PREFIX + name.encode(), db=self.meta_dbi)
                   for name in origins}
        return {name: int(codec.unpack(v)) if v else None for name, v in raw.items()}

    def committed_schema(self) -> CommittedSchema:
        """Table definitions, drop markers and creation version as last committed,
        from one snapshot.

        What peers are told (hellos) comes from here, never from ``tables``: a writer
        job changes that as it runs, so mid-job it may hold a re-created table whose
        drop is not committed yet, and a peer told of the one without the other would
        merge the new incarnation into its old one as a concurrent create.
        """
        with self.reading() as txn:
            definitions = {k.decode(): v for k, v in self._meta_in(txn, TABLE_PREFIX)}
            markers = {k.decode(): int(v) for k, v in self._meta_in(txn, DROPPED_PREFIX)}
            raw = txn.get(CREATED_KEY, db=self.meta_dbi)
        return CommittedSchema(definitions, markers, int(codec.unpack(raw)) if raw else 0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose failure, when ``drop_database`` closed the
        environment under it, is a ``NoSuchDatabaseError`` (for reads off the hot path:
        the log, verification)."""
        try:
            with self.env.begin() as txn:
                yield txn
        except lmdb.Error as exc:
            raise self.gone(exc) from None

    def gone(self, exc: Exception) -> Exception:
        """What to raise for ``exc``, an error of a read: a read racing drop_database
        finds the environment closed, and that is a 404; anything else stays."""
        if self.closed:
            return NoSuchDatabaseError(self.name)
        return exc

    def sizes(self) -> dict[str, int]:
        """Byte sizes for ``describe_table``: whole env and audit log."""
        try:
            return self._sizes()
        except lmdb.Error as exc:
            raise self.gone(exc) from None

    def _sizes(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        with self.env.begin() as txn:
            audit = txn.stat(self.txns_dbi)
        page = stat["psize"]
        audit_pages = audit["branch_pages"] + audit["leaf_pages"] + audit["overflow_pages"]
        return {"db_size": (info["last_pgno"] + 1) * page, "db_audit_size": audit_pages * page}

    def table_size(self, table: Table) -> tuple[int, int]:
        """``(record_count, table_size in bytes)`` for a table."""
        try:
            with self.env.begin() as txn:
                st = txn.stat(table.dbi)
        except lmdb.Error as exc:
            raise self.gone(exc) from None
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return st["entries"], pages * st["psize"]

    def tombstone_count(self, table: Table) -> int:
        """How many tombstones (deleted keys kept for replication) ``table`` holds."""
        try:
            with self.env.begin() as txn:
                return int(txn.stat(table.tomb_dbi)["entries"])
        except lmdb.Error as exc:
            raise self.gone(exc) from None

    # -- notifications -----------------------------------------------------------------
    def notify_commit(self) -> None:
        """Tell every listener (publishers) that new entries were committed."""
        head = self.next_seq - 1
        for listener in list(self.commit_listeners):
            listener(head)

    @property
    def data_file(self) -> str:
        return str(self.path / "data.mdb")

    def close(self) -> None:
        self.closed = True
        with MAPS_LOCK:  # not while a trim advises the ranges it read (see below)
            self.env.close()

    def destroy(self) -> None:
        """Close the environment and delete its files; wake every commit listener so
        readers of this database see ``dropped`` and stop."""
        self.dropped = True
        self.closed = True
        self.notify_commit()
        with MAPS_LOCK:
            self.env.close()
        shutil.rmtree(self.path, ignore_errors=True)

