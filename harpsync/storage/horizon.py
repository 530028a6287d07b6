"""The tombstone horizon: what a node still knows of the deletes whose tombstones it swept.

Retention sweeps a tombstone once every peer acknowledged past it. A peer that was not
counted then (one removed and added again, say) may still hold the row it deleted, and
a full copy between them would bring it back: a copy never deletes, and a row that
holds nothing here wins. Per table and incarnation, a node keeps the newest version of
a tombstone it swept (``swept:<table>`` in ``__meta__`` = ``[incarnation, version]``,
written in the sweep's transaction). A node holds every row it wrote until a newer write
or a delete replaces it; so a row whose origin is this node, of which it holds nothing
(no row, no tombstone), with a version below its horizon, was deleted here (its delete
was newer than the row and at most the horizon):

* arriving here (a copy, a repair), it is refused (:func:`deleted_here`), and deleted
  again (:func:`reissue`): the peer that sent it, and any node it reached from there,
  still holds it, and the delete's own entry is gone from the log;
* held by a peer that copies this node's rows, and absent from that copy, it is
  deleted there (:func:`sweep`).

Either node deletes it with a tombstone of its own one tick after the row's version: it
beats that row and nothing written after the real delete. It is logged in a new entry
of the node's own, with a new version (each op keeps its own in ``op[5]``, as copied
rows do), so it reaches every peer of that node past their floors: a third node may
hold the row too (it took it from the re-added peer, say).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from harpsync import codec
from harpsync.storage.database import (
    LOCAL_ORIGIN,
    OWN_SINCE_KEY,
    RESTORED_KEY,
    SWEPT_PREFIX,
    Database,
    Table,
)
from harpsync.storage.keys import decode_id
from harpsync.storage.logscan import local_version_at
from harpsync.storage.records import Stored, put_tombstone
from harpsync.storage.writer import WriteContext


def note_swept(txn: Any, db: Database, table: Table, version: int) -> None:
    """Raise ``table``'s horizon to ``version`` (a tombstone swept at that version)."""
    key = SWEPT_PREFIX + table.name.encode()
    raw = txn.get(key, db=db.meta_dbi)
    old = codec.unpack(raw) if raw else None
    if old is None or old[0] != table.version or old[1] < version:
        txn.put(key, codec.pack([table.version, version]), db=db.meta_dbi)


def horizon(txn: Any, db: Database, table: Table) -> int:
    """The newest version of a tombstone of this incarnation of ``table`` that was swept
    (0: none; a horizon of an earlier incarnation does not count)."""
    raw = txn.get(SWEPT_PREFIX + table.name.encode(), db=db.meta_dbi)
    if raw is None:
        return 0
    incarnation, version = codec.unpack(raw)
    if incarnation != table.version:
        return 0
    cap = txn.get(RESTORED_KEY, db=db.meta_dbi)
    return int(version) if cap is None else min(int(version), int(codec.unpack(cap)))


def own_since(txn: Any, db: Database) -> int:
    """The version from which rows of this node's name are its own (0: unknown, an
    environment from before it was kept). An older row of the name was written by an
    earlier node of that name (this one wiped, say), which this one may never have held:
    its absence here says nothing of a delete."""
    raw = txn.get(OWN_SINCE_KEY, db=db.meta_dbi)
    return int(codec.unpack(raw)) if raw else 0


def opened_own_version(db: Database) -> int:
    """The newest version this node wrote into ``db`` before this process opened it (its
    log, or what pruning removed of it); 0 when not found (the log scan is bounded)."""
    pruned = db.pruned_max().get(db.origin_names[LOCAL_ORIGIN], 0)
    return max(local_version_at(db, db.opened_head), int(pruned))


def restored_job(db: Database, version: int) -> Callable[[WriteContext], None]:
    """A peer's cursor named entries this log never held: the database was restored
    from a backup (or its log replaced), and this node's rows written after the backup
    (newer than ``version``, its newest when this process opened it) may be gone with
    no delete. The horizons stop below them, for good: such a row coming back is taken,
    and a peer's copy of it kept."""

    def job(ctx: WriteContext) -> None:
        if db.closed:
            return
        txn = ctx.txn(db)
        raw = txn.get(RESTORED_KEY, db=db.meta_dbi)
        if raw is None or int(codec.unpack(raw)) > version:
            txn.put(RESTORED_KEY, codec.pack(version), db=db.meta_dbi)

    return job


def deleted_here(stored: Stored | None, version: int, origin_id: int, swept: int,
                 since: int = 0) -> bool:
    """Whether an incoming row of this node's own (``origin_id`` local), with nothing
    stored under its key, is one this node deleted and swept the tombstone of (written
    by this node: at or after ``since``, :func:`own_since`)."""
    return stored is None and origin_id == LOCAL_ORIGIN and since <= version < swept


def reissue(txn: Any, table: Table, key: bytes, version: int) -> list[Any]:
    """Delete a row (of ``version``) known to be deleted on its origin: a tombstone of
    this node's one tick after it, and the op to log. The caller logs the ops in an
    entry with a new version of this node's (its peers' floors for this node are past
    the row's), each op keeping its own (``op[5]``), as copied rows do."""
    put_tombstone(txn, table, key, version + 1, LOCAL_ORIGIN)
    return [table.name, "delete", decode_id(key), None, table.version, version + 1]


@dataclass(frozen=True)
class Sweep:
    """A key range of a table that a peer's full copy went through: the peer's rows
    there are ``present``; rows of the peer's origin stored here outside them and older
    than its horizon were deleted on the peer. ``after`` is exclusive (None: from the
    first key), ``through`` inclusive (None: to the last)."""

    table: str
    incarnation: int
    horizon: int
    after: bytes | None
    through: bytes | None
    present: frozenset[bytes] = frozenset()
    since: int = 0  # the peer's own rows start there (older ones: another node's)


def sweep(txn: Any, db: Database, peer: str, ranges: Iterable[Sweep]) -> list[list[Any]]:
    """Delete the rows the ``ranges`` of ``peer``'s copy show it deleted, with
    tombstones of this node's (as :func:`reissue`); returns the ops to log."""
    oid = db.origin_ids.get(peer)
    if oid is None or oid == LOCAL_ORIGIN:
        return []
    out: list[list[Any]] = []
    for part in ranges:
        table = db.tables.get(part.table)
        if table is None or table.version != part.incarnation or not part.horizon:
            continue
        if part.after is not None and part.through is not None and part.through <= part.after:
            continue
        cur = txn.cursor(db=table.dbi)
        found = cur.first() if part.after is None else cur.set_range(part.after)
        if found and part.after is not None and bytes(cur.key()) == part.after:
            found = cur.next()
        gone: list[tuple[bytes, int]] = []
        while found:
            key = bytes(cur.key())
            if part.through is not None and key > part.through:
                break
            if key not in part.present:
                version, origin = codec.unpack_head(cur.value(), 2)
                if origin == oid and part.since <= version < part.horizon:
                    gone.append((key, version))
            found = cur.next()
        out.extend(reissue(txn, table, key, version) for key, version in gone)
    return out
