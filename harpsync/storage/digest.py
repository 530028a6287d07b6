"""Per-table hashes of the stored rows by key range, maintained with every write.

The rows of a table (live records and tombstones together, in primary-key order) are cut
into *buckets* at content-defined boundaries: a key is a boundary when the low
``LEAF_BITS`` bits of its CRC-32 are zero, so about one key in 32 starts a bucket and
two nodes holding the same keys cut them at the same places. A bucket runs from its
boundary key to the next one; the *head* bucket holds the keys before the first
boundary. Each bucket's hash is the XOR of its rows' digests.

The table's DBI ``h:<table>`` holds ``B`` + boundary key -> bucket hash (``B`` alone is
the head), and ``M`` once the hashes cover every stored row. Everything is keyed in
primary-key order, so a write touches the bucket page next to the rows it writes.

A row digest is blake2b-128 over the primary key, the version, the origin *name*
(origin ids are local to each node), the deleted flag and the record's msgpack bytes:
two nodes holding the same row compute the same digest.

Costs per write: one or two digests and one bucket read-modify-write, in the write's
own transaction. A new key that is a boundary splits its bucket (hashing the rows after
it up to the next boundary, about 64, none for keys appended at the end); a removed
boundary key (a pruned tombstone) merges its bucket into the previous one.

``HARPSYNC_DIGEST=off`` (read at import) turns maintenance off, only to measure its
cost (``bench/verify.py``); tables written that way are rebuilt when next opened with
it on.
"""

from __future__ import annotations

import heapq
import os
import struct
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

LEAF_BITS = 5
GROUP_BITS = 12
DIGEST_SIZE = 16
ZERO = bytes(DIGEST_SIZE)
BUCKET = b"B"
MARK = b"M"
ENABLED = os.environ.get("HARPSYNC_DIGEST", "on").lower() not in ("off", "0", "false")

_LEAF_MASK = (1 << LEAF_BITS) - 1
_GROUP_MASK = (1 << GROUP_BITS) - 1
_FLAG = (b"\0", b"\1")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass
class TableDigest:
    """A table's hash DBI and the origin-name map of its database."""

    dbi: Any
    origin_names: Mapping[int, str]
    # The bucket the last write landed in, valid only inside that write transaction:
    # (weak reference to the transaction, bucket key, next bucket key or None, hash).
    # Consecutive keys share a bucket, so most writes skip the bucket lookup.
    cache: list[Any] | None = None


def is_boundary(key: bytes) -> bool:
    """Whether ``key`` starts a bucket (the same answer on every node)."""
    return zlib.crc32(key) & _LEAF_MASK == 0


def is_group_boundary(key: bytes) -> bool:
    """Whether ``key`` starts a group of buckets (about one boundary in 128)."""
    return zlib.crc32(key) & _GROUP_MASK == 0


def _uint(raw: bytes, pos: int) -> tuple[int, int]:
    # A non-negative msgpack integer at ``pos``: (value, position after it).
    tag = raw[pos]
    if tag < 0x80:
        return tag, pos + 1
    if tag == 0xCF:
        return _U64.unpack_from(raw, pos + 1)[0], pos + 9
    if tag == 0xCE:
        return _U32.unpack_from(raw, pos + 1)[0], pos + 5
    if tag == 0xCD:
        return _U16.unpack_from(raw, pos + 1)[0], pos + 3
    if tag == 0xCC:
        return raw[pos + 1], pos + 2
    raise ValueError(f"stored row does not start with a version and origin (0x{tag:02x})")


def row_digest(key: bytes, raw: bytes, deleted: bool, origin_names: Mapping[int, str]) -> bytes:
    """The digest of a stored ``[version, origin, record]``; equal on every node that
    holds the same row."""
    if raw[1] == 0xCF and raw[10] < 0x80:  # the usual head: a uint64 version, origin < 128
        return blake2b(b"".join((len(key).to_bytes(2, "big"), key, _FLAG[deleted], raw[2:10],
                                 origin_names.get(raw[10], "").encode(), b"\0", raw[11:])),
                       digest_size=DIGEST_SIZE).digest()
    number, pos = _uint(raw, 1)
    origin, pos = _uint(raw, pos)
    return blake2b(b"".join((len(key).to_bytes(2, "big"), key, _FLAG[deleted],
                             _U64.pack(number), origin_names.get(origin, "").encode(), b"\0",
                             raw[pos:])), digest_size=DIGEST_SIZE).digest()


def xor(a: bytes | None, b: bytes) -> bytes:
    if not a:
        return b
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(DIGEST_SIZE, "big")


def _bucket_of(cur: Any, key: bytes) -> bytes:
    """Position ``cur`` (on the hash DBI) on the bucket holding ``key``; its DBI key."""
    bk = BUCKET + key
    if cur.set_range(bk) and cur.key() == bk:
        return bk
    if cur.prev() and cur.key().startswith(BUCKET):
        return bytes(cur.key())
    # No head bucket: the hashes were cleared under a live table (never by this code).
    cur.put(BUCKET, ZERO)
    return BUCKET


def _rows_between(txn: Any, table: Any, lo: bytes, hi: bytes | None,
                  ) -> Iterator[tuple[bytes, bytes, bool]]:
    """Raw ``(key, stored, deleted)`` of live rows, then tombstones, in ``[lo, hi)``."""
    for dbi, deleted in ((table.dbi, False), (table.tomb_dbi, True)):
        cur = txn.cursor(db=dbi)
        found = cur.set_range(lo) if lo else cur.first()
        while found:
            key = cur.key()
            if hi is not None and key >= hi:
                break
            yield bytes(key), bytes(cur.value()), deleted
            found = cur.next()


def _split(txn: Any, table: Any, d: TableDigest, cur: Any, key: bytes) -> None:
    # ``key`` is a new boundary: the rows after it, up to the next boundary, leave the
    # bucket before it for the bucket it starts (``key`` itself is added by the caller).
    owner = _bucket_of(cur, key)
    nxt = cur.next() and cur.key().startswith(BUCKET)
    hi = bytes(cur.key()[1:]) if nxt else None
    moved = 0
    for row_key, raw, deleted in _rows_between(txn, table, key, hi):
        if row_key != key:
            moved ^= int.from_bytes(row_digest(row_key, raw, deleted, d.origin_names), "big")
    value = moved.to_bytes(DIGEST_SIZE, "big")
    if moved:
        txn.put(owner, xor(txn.get(owner, db=d.dbi), value), db=d.dbi)
    txn.put(BUCKET + key, value, db=d.dbi)


def on_write(txn: Any, table: Any, key: bytes, raw: bytes, deleted: bool,
             old_raw: bytes | None, old_deleted: bool) -> None:
    """``raw`` was stored under ``key``, replacing ``old_raw`` (None: a new key)."""
    d = table.digest
    if d is None or not ENABLED:
        return
    delta = int.from_bytes(row_digest(key, raw, deleted, d.origin_names), "big")
    if old_raw is not None:
        delta ^= int.from_bytes(row_digest(key, old_raw, old_deleted, d.origin_names), "big")
        if not delta:
            return
    elif is_boundary(key):
        d.cache = None
        _split(txn, table, d, txn.cursor(db=d.dbi), key)
    bkey = BUCKET + key
    cache = d.cache
    if cache is not None and cache[0]() is txn and cache[1] <= bkey \
            and (cache[2] is None or bkey < cache[2]):
        value = cache[3] ^ delta
        cache[3] = value
        txn.put(cache[1], value.to_bytes(DIGEST_SIZE, "big"), db=d.dbi)
        return
    cur = txn.cursor(db=d.dbi)
    bk = _bucket_of(cur, key)
    old = cur.value()
    value = (int.from_bytes(old, "big") if old else 0) ^ delta
    hi = bytes(cur.key()) if cur.next() and cur.key().startswith(BUCKET) else None
    txn.put(bk, value.to_bytes(DIGEST_SIZE, "big"), db=d.dbi)
    d.cache = [weakref.ref(txn), bk, hi, value]


def on_remove(txn: Any, table: Any, key: bytes, old_raw: bytes, old_deleted: bool) -> None:
    """Nothing is stored under ``key`` any more (a pruned tombstone)."""
    d = table.digest
    if d is None or not ENABLED:
        return
    d.cache = None
    cur = txn.cursor(db=d.dbi)
    bk = _bucket_of(cur, key)
    value = xor(cur.value(), row_digest(key, old_raw, old_deleted, d.origin_names))
    if bk == BUCKET + key:  # the bucket's first key went: merge it into the one before
        txn.delete(bk, db=d.dbi)
        prev = _bucket_of(cur, key)
        value = xor(cur.value(), value)
        bk = prev
    txn.put(bk, value, db=d.dbi)


def clear(txn: Any, table: Any) -> None:
    """The table was emptied (dropped): forget every hash."""
    if table.digest is not None:
        table.digest.cache = None
        txn.drop(table.digest.dbi, delete=False)


def mark_built(txn: Any, table: Any) -> None:
    """Start the hashes of a new, empty table."""
    if table.digest is not None and ENABLED:
        table.digest.cache = None
        txn.put(BUCKET, ZERO, db=table.digest.dbi)
        txn.put(MARK, b"1", db=table.digest.dbi)


def is_built(txn: Any, table: Any) -> bool:
    return table.digest is not None and txn.get(MARK, db=table.digest.dbi) is not None


def rebuild(txn: Any, table: Any) -> int:
    """Recompute every hash of ``table`` from its stored rows and tombstones.

    Returns:
        The number of rows hashed.
    """
    d = table.digest
    if d is None:
        return 0
    d.cache = None
    txn.drop(d.dbi, delete=False)
    names = d.origin_names
    streams = [_rows_of(txn, dbi, deleted)
               for dbi, deleted in ((table.dbi, False), (table.tomb_dbi, True))]
    buckets: dict[bytes, int] = {BUCKET: 0}
    current = BUCKET
    count = 0
    for key, raw, deleted in heapq.merge(*streams):
        if is_boundary(key):
            current = BUCKET + key
            buckets[current] = 0
        buckets[current] ^= int.from_bytes(row_digest(key, raw, deleted, names), "big")
        count += 1
    cur = txn.cursor(db=d.dbi)
    cur.putmulti([(k, v.to_bytes(DIGEST_SIZE, "big")) for k, v in buckets.items()])
    txn.put(MARK, b"1", db=d.dbi)
    return count


def _rows_of(txn: Any, dbi: Any, deleted: bool) -> Iterator[tuple[bytes, bytes, bool]]:
    for key, raw in txn.cursor(db=dbi):
        yield key, raw, deleted


# -- reads (any thread, read transactions) ---------------------------------------------
Bucket = tuple[bytes, bytes]  # (start key, b"" for the head; hash)


def buckets(txn: Any, table: Any, lo: bytes = b"", hi: bytes | None = None) -> list[Bucket]:
    """The buckets starting in ``[lo, hi)`` (the head bucket counts as starting at b"")."""
    out: list[Bucket] = []
    cur = txn.cursor(db=table.digest.dbi)
    if not cur.set_range(BUCKET + lo):
        return out
    for key, value in cur:
        if not key.startswith(BUCKET):
            break
        start = bytes(key[1:])
        if hi is not None and start >= hi:
            break
        out.append((start, bytes(value)))
    return out


def top(items: list[Bucket]) -> bytes:
    """The XOR of every bucket: equal on two nodes that hold the same rows."""
    value = 0
    for _, h in items:
        value ^= int.from_bytes(h, "big")
    return value.to_bytes(DIGEST_SIZE, "big")


def combine(items: list[Bucket], starts: list[bytes]) -> list[bytes]:
    """The XOR of ``items`` per range ``[starts[i], starts[i+1])``; ``starts[0]`` must
    be at or before every item (``items`` and ``starts`` sorted)."""
    out = [0] * len(starts)
    i = 0
    for start, h in items:
        while i + 1 < len(starts) and starts[i + 1] <= start:
            i += 1
        out[i] ^= int.from_bytes(h, "big")
    return [v.to_bytes(DIGEST_SIZE, "big") for v in out]


def group_starts(items: list[Bucket]) -> list[bytes]:
    """Start keys of the coarse ranges (head first) used for the first comparison."""
    return [b""] + [start for start, _ in items if start and is_group_boundary(start)]


def row_digests(txn: Any, table: Any, lo: bytes, hi: bytes | None,
                ) -> dict[bytes, bytes]:
    """``key -> row digest`` of every stored row in ``[lo, hi)``."""
    names = table.digest.origin_names
    return {key: row_digest(key, raw, deleted, names)
            for key, raw, deleted in _rows_between(txn, table, lo, hi)}


def stored_row(txn: Any, table: Any, key: bytes,
               unpack: Callable[[bytes], Any]) -> tuple[bytes, list[Any]] | None:
    """``(digest, [version, origin, record])`` stored under ``key``, or None."""
    for dbi, deleted in ((table.dbi, False), (table.tomb_dbi, True)):
        raw = txn.get(key, db=dbi)
        if raw is not None:
            raw = bytes(raw)
            return row_digest(key, raw, deleted, table.digest.origin_names), unpack(raw)
    return None
