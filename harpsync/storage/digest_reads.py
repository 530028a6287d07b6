"""Reading the maintained table hashes (any thread, read transactions): buckets by
range, the stored top hash, row digests of a range and one stored row, for
``compare.py``. Keeping them is ``digest.py``'s job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harpsync.storage import digest
from harpsync.storage.rowhash import Bucket, row_digest, top


def buckets(txn: Any, table: Any, lo: bytes = b"", hi: bytes | None = None) -> list[Bucket]:
    """The buckets starting in ``[lo, hi)`` (the head bucket counts as starting at b"")."""
    out: list[Bucket] = []
    digest.settle_pending(txn, table)  # the writer reading its own changes
    cur = txn.cursor(db=table.digest.dbi)
    if not cur.set_range(digest.BUCKET + lo):
        return out
    for key, value in cur:
        if not key.startswith(digest.BUCKET):
            break
        start = bytes(key[1:])
        if hi is not None and start >= hi:
            break
        out.append((start, bytes(value)))
    return out


def stored_top(txn: Any, table: Any) -> bytes:
    """The XOR of every bucket, as kept with them (one read): equal on two nodes that
    hold the same rows."""
    digest.settle_pending(txn, table)  # the writer reading its own changes
    value = txn.get(digest.TOP, db=table.digest.dbi)
    return bytes(value) if value is not None else top(buckets(txn, table))


def row_digests(txn: Any, table: Any, lo: bytes, hi: bytes | None,
                ) -> dict[bytes, bytes]:
    """``key -> row digest`` of every stored row in ``[lo, hi)``."""
    names = table.digest.origin_names
    last: list[Any] = [b"", None]
    return {key: row_digest(key, raw, deleted, names, last)
            for key, raw, deleted in digest.rows_between(txn, table, lo, hi)}


def stored_row(txn: Any, table: Any, key: bytes,
               unpack: Callable[[bytes], Any]) -> tuple[bytes, list[Any]] | None:
    """``(digest, [version, origin, record])`` stored under ``key``, or None."""
    for dbi, deleted in ((table.dbi, False), (table.tomb_dbi, True)):
        raw = txn.get(key, db=dbi)
        if raw is not None:
            raw = bytes(raw)
            return row_digest(key, raw, deleted, table.digest.origin_names), unpack(raw)
    return None
