"""Record-level reads and writes inside LMDB transactions, and the last-writer-wins rule.

A stored record is msgpack ``[version, origin, record]``; a tombstone lives in the
table's tombstone DBI as ``[version, origin, None]``.
"""

from __future__ import annotations

from typing import Any

import lmdb

from harpsync import codec
from harpsync.storage import digest
from harpsync.storage.database import Database, Table

Stored = tuple[int, int, dict[str, Any] | None]


def get_stored(txn: lmdb.Transaction, table: Table, key: bytes) -> Stored | None:
    """The live record, or else the tombstone, stored under ``key``."""
    raw = txn.get(key, db=table.dbi)
    if raw is None:
        raw = txn.get(key, db=table.tomb_dbi)
        if raw is None:
            return None
    version, origin, record = codec.unpack(raw)
    return version, origin, record


def get_live(txn: lmdb.Transaction, table: Table, key: bytes) -> Stored | None:
    """The live record under ``key``, ignoring tombstones."""
    raw = txn.get(key, db=table.dbi)
    if raw is None:
        return None
    version, origin, record = codec.unpack(raw)
    return version, origin, record


def put_record(txn: lmdb.Transaction, table: Table, key: bytes, version: int, origin: int,
               record: dict[str, Any]) -> None:
    """Store a live record and clear any tombstone for its key."""
    raw = codec.pack([version, origin, record])
    old = txn.replace(key, raw, db=table.dbi)
    tomb = txn.pop(key, db=table.tomb_dbi)
    if old is None and tomb is None:
        digest.on_insert(txn, table, key, raw)
    else:
        digest.on_write(txn, table, key, raw, False, old if old is not None else tomb,  # type: ignore[arg-type]
                        old is None)


def absent(txn: lmdb.Transaction, table: Table, keys: list[bytes]) -> bool:
    """Whether ``keys`` are distinct and nothing (no row, no tombstone) is stored under
    any of them. Keys in ascending order cost one range probe per DBI."""
    if len(set(keys)) != len(keys):
        return False
    if keys == sorted(keys):
        for dbi in (table.dbi, table.tomb_dbi):
            cur = txn.cursor(db=dbi)
            if cur.set_range(keys[0]) and bytes(cur.key()) <= keys[-1]:
                return False
        return True
    get = txn.get
    return not any(get(key, db=table.dbi) is not None or get(key, db=table.tomb_dbi)
                   is not None for key in keys)


def remove_record(txn: lmdb.Transaction, table: Table, key: bytes) -> bool:
    """Delete a live record outright, leaving no tombstone (local-only tables, never
    logged); True if there was one."""
    old = txn.pop(key, db=table.dbi)
    if old is None:
        return False
    digest.on_remove(txn, table, key, bytes(old), False)
    return True


def put_new_records(txn: lmdb.Transaction, table: Table, keys: list[bytes],
                    raws: list[bytes], records: list[bytes] | None = None) -> None:
    """Store packed live records (``[version, origin, record]``) under distinct keys
    that hold nothing yet, neither a record nor a tombstone (the caller read them in
    ``txn``). ``records``: each row's record bytes, when the rows share one version and
    origin (each raw is that head followed by its record)."""
    if digest.add_run(txn, table, keys, raws, records):
        txn.cursor(db=table.dbi).putmulti(list(zip(keys, raws, strict=True)))
        return
    # Not one run (ids out of order, or stored ids between them): in key order, then
    # hashed together.
    txn.cursor(db=table.dbi).putmulti(sorted(zip(keys, raws, strict=True)))
    digest.add_scattered(txn, table, keys, raws, records)


def put_tombstone(txn: lmdb.Transaction, table: Table, key: bytes, version: int,
                  origin: int) -> None:
    """Delete a live record and leave a tombstone carrying the delete's version."""
    old = txn.pop(key, db=table.dbi)
    raw = codec.pack([version, origin, None])
    tomb = txn.replace(key, raw, db=table.tomb_dbi)
    digest.on_write(txn, table, key, raw, True, old if old is not None else tomb,  # type: ignore[arg-type]
                    old is None)


def wins(version: int, origin_name: str, old_version: int, old_origin_name: str) -> bool:
    """Last writer wins: the higher ``(version, origin node name)`` is kept.

    The node name is the tie-break because numeric origin ids are local to each node.
    Equal pairs do not win, which makes applying the same write twice a no-op.
    """
    return (version, origin_name) > (old_version, old_origin_name)


def incoming_wins(db: Database, stored: Stored | None, version: int, origin_name: str) -> bool:
    """Whether a remote write should replace what is stored."""
    if stored is None:
        return True
    old_name = db.origin_names.get(stored[1], "")
    return wins(version, origin_name, stored[0], old_name)
