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

* arriving here (a copy, a repair), it is refused (:func:`deleted_here`);
* held by a peer that copies this node's rows, and absent from that copy, it is
  deleted there (:func:`sweep`), with a tombstone one tick after the row's version
  under this node's origin: it beats that row and nothing written after the real delete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harpsync import codec
from harpsync.storage.database import LOCAL_ORIGIN, SWEPT_PREFIX, Database, Table
from harpsync.storage.records import Stored, put_tombstone


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
    return int(version) if incarnation == table.version else 0


def deleted_here(stored: Stored | None, version: int, origin_id: int, swept: int) -> bool:
    """Whether an incoming row of this node's own (``origin_id`` local), with nothing
    stored under its key, is one this node deleted and swept the tombstone of."""
    return stored is None and origin_id == LOCAL_ORIGIN and version < swept


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


def sweep(txn: Any, db: Database, peer: str, ranges: Iterable[Sweep],
          ) -> list[tuple[Table, bytes, int, int]]:
    """Delete the rows the ``ranges`` of ``peer``'s copy show it deleted; returns them as
    ``(table, key, tombstone version, origin id)`` for the caller to log (they relay)."""
    oid = db.origin_ids.get(peer)
    if oid is None or oid == LOCAL_ORIGIN:
        return []
    out: list[tuple[Table, bytes, int, int]] = []
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
                if origin == oid and version < part.horizon:
                    gone.append((key, version))
            found = cur.next()
        for key, version in gone:
            put_tombstone(txn, table, key, version + 1, oid)
            out.append((table, key, version + 1, oid))
    return out
