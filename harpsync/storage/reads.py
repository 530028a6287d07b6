"""Reads: lookups by id and streaming scans, using read transactions only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from harpsync import codec
from harpsync.storage.database import Database, Table
from harpsync.storage.keys import encode_id

SCAN_CHUNK = 1000


def get_by_ids(db: Database, table: Table, ids: list[Any]) -> list[dict[str, Any]]:
    """The live records for ``ids``, in request order; missing ids are left out."""
    out: list[dict[str, Any]] = []
    try:
        with db.env.begin() as txn:
            for rid in ids:
                try:
                    key = encode_id(rid)
                except Exception:
                    continue
                raw = txn.get(key, db=table.dbi)
                if raw is not None:
                    out.append(codec.unpack(raw)[2])
    except Exception as exc:
        if db.closed:  # dropped under the read: a 404
            raise db.gone(exc) from None
        raise
    return out


def scan(db: Database, table: Table) -> Iterator[dict[str, Any]]:
    """Every live record in primary-key order, read in chunks of short transactions.

    A scan never holds the whole table in memory, and never pins one read
    transaction for the length of a huge table.
    """
    last: bytes | None = None
    while True:
        rows = db.iter_rows(table, last, SCAN_CHUNK)
        for _, raw in rows:
            yield codec.unpack(raw)[2]
        if len(rows) < SCAN_CHUNK:
            return
        last = rows[-1][0]

