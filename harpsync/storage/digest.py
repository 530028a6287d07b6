"""Per-table hashes of the stored rows by key range, maintained with every write.

The rows of a table (live records and tombstones together, in primary-key order) are cut
into *buckets* at content-defined boundaries: a key is a boundary when the low
``LEAF_BITS`` bits of its CRC-32 are zero, so about one key in 32 starts a bucket and
two nodes holding the same keys cut them at the same places. A bucket runs from its
boundary key to the next one; the *head* bucket holds the keys before the first
boundary. Each bucket's hash is the XOR of its rows' digests.

The table's DBI ``h:<table>`` holds ``B`` + boundary key -> bucket hash (``B`` alone is
the head), and under ``M`` the row-digest layout (``FORMAT``) once the hashes cover
every stored row. Everything is keyed in primary-key order, so a write touches the
bucket page next to the rows it writes.

A row digest (``rowhash.row_digest``) is XXH3-64 of the record's msgpack bytes and the
key, seeded with a hash of the version, the origin *name* (origin ids are local to each
node) and the deleted flag: two nodes holding the same row compute the same digest.

Costs per write. New keys written in ascending order with no stored key between them
(a batch of ids, a full-copy chunk) form a *run*: remembered, then hashed together when
the run ends, in C-level loops (``_settle_run``: one hash call per row, the boundaries
found in one bytes object, each bucket XORed by ``reduce``), with one bucket lookup and
at most one scan per run. Other writes are hashed one by one, XORed into the current bucket's
accumulator (a lookup only when the key leaves the previous write's bucket). The changes
of a transaction are written by ``flush(txn)`` before it commits, one read-modify-write
per touched bucket; the writer flushes every job's transaction (``discard`` when it
aborts), and any other writer of rows must call ``flush`` itself. A new key that is a
boundary splits its bucket (hashing the stored rows after it up to the next boundary,
about 32, none for keys appended at the end); a removed boundary key (a pruned
tombstone) merges its bucket into the previous one, after writing what is pending.

``HARPSYNC_DIGEST=off`` (read at import) turns maintenance off, only to measure its
cost (``bench/digest.py``, ``bench/verify.py``); tables written that way are rebuilt
when next opened with it on.
"""

from __future__ import annotations

import heapq
import operator
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import reduce
from itertools import pairwise, repeat
from typing import Any

from harpsync.storage.rowhash import (
    DIGEST_SIZE,
    FORMAT,
    LEAF_MASK,
    XXH_INT,
    ZERO,
    is_boundary,
    row_digest,
    row_digest_int,
    row_seed,
    xor,
)

BUCKET = b"B"
MARK = b"M"
TOP = b"T"
_FORMAT_MARK = str(FORMAT).encode()
# A CRC-32's low byte -> 0 where it makes its key a boundary, else 1.
_STARTS = bytes(int(bool(low & LEAF_MASK)) for low in range(256))
ENABLED = os.environ.get("HARPSYNC_DIGEST", "on").lower() not in ("off", "0", "false")


@dataclass(slots=True)
class TableDigest:
    """A table's hash DBI, the origin-name map of its database, and the bucket changes
    of the write transaction in progress (written by ``flush`` before it commits)."""

    dbi: Any
    origin_names: Mapping[int, str]
    # The transaction the changes below belong to; None: nothing pending.
    txn: Any = None
    # Bucket DBI key -> XOR of the row digests added to and removed from it.
    pending: dict[bytes, int] = field(default_factory=dict)
    # The bucket the last write landed in (its DBI key, its keys ``[lo, hi)``, hi None:
    # to the end) and the XOR of the digests written to it since (not in ``pending``).
    # Consecutive keys share a bucket, so most writes skip the lookup. ``hi == lo``:
    # no current bucket.
    bucket: bytes = BUCKET
    lo: bytes = b""
    hi: bytes | None = b""
    acc: int = 0
    # The XOR of the bucket values written directly (new buckets) since the last flush,
    # for the stored top hash.
    top_delta: int = 0
    # Per deleted flag: a stored row's first 11 bytes (array tag, uint64 version, origin
    # id) -> the row digest's seed (see ``rowhash.row_digest``).
    states: tuple[dict[bytes, int], ...] = field(default_factory=lambda: ({}, {}))
    cursor: Any = None
    # A *run*: keys and stored rows of new live records written in increasing key order
    # with no other stored key between them (a batch of increasing ids, a full-copy
    # chunk), hashed and cut into buckets together by ``_settle_run``. The current
    # bucket is the one holding its first key. ``gap_hi``: the first stored key after
    # the run (None: none), known once the run has two keys.
    run_keys: list[bytes] = field(default_factory=list)
    run_raws: list[bytes] = field(default_factory=list)
    # The run's record bytes (each raw less its head), when every row of the run shares
    # one head (one version and origin): given by ``add_run``, dropped when the run grows.
    run_records: list[bytes] | None = None
    gap_hi: bytes | None = None
    table: Any = None
    # The write being made while the run settles: stored, not hashed yet; its old row
    # (None: a new key) is what the buckets hold for it.
    writing: bytes | None = None
    # Keys stored by ``add_scattered`` whose rows it has not hashed yet.
    unhashed: set[bytes] | None = None
    writing_old: bytes | None = None
    writing_old_deleted: bool = False


# Tables with pending bucket changes, by the id of their transaction.
_dirty: dict[int, list[TableDigest]] = {}


def _seed_of(d: TableDigest, raw: bytes, deleted: bool) -> int:
    # The digest seed of a stored row with the usual head, kept per transaction.
    states = d.states[deleted]
    head = raw[:11]
    seed = states.get(head)
    if seed is None:
        if len(states) > 64:  # rows of many versions (a copy): keep it small
            states.clear()
        seed = states[head] = row_seed(raw[2:10], d.origin_names.get(raw[10], ""), deleted)
    return seed


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


def rows_between(txn: Any, table: Any, lo: bytes, hi: bytes | None,
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


def _accounted(txn: Any, table: Any, d: TableDigest, lo: bytes, hi: bytes | None,
               skip: bytes | None) -> int:
    # The XOR of the digests the buckets hold for the stored rows in ``[lo, hi)``: the
    # row ``skip`` and a write not yet hashed (``d.writing``: its old row, if any,
    # stands for it) are left out.
    total = 0
    names = d.origin_names
    last: list[Any] = [b"", None]
    unhashed = d.unhashed
    for row_key, raw, deleted in rows_between(txn, table, lo, hi):
        if row_key == skip or (unhashed is not None and row_key in unhashed):
            continue
        if row_key == d.writing:
            if d.writing_old is None:
                continue
            raw, deleted = d.writing_old, d.writing_old_deleted
        total ^= row_digest_int(row_key, raw, deleted, names, last)
    return total


def _split(txn: Any, table: Any, d: TableDigest, key: bytes) -> None:
    # ``key`` is a new boundary: the stored rows after it, up to the next boundary,
    # leave the bucket before it for the bucket it starts (``key`` itself is added by
    # the caller). Pending changes stay with the buckets they were made in: a pending
    # row after ``key`` is among the moved rows, so XOR moves it whole.
    d.pending[d.bucket] = d.pending.get(d.bucket, 0) ^ d.acc
    cur = d.cursor
    owner = _bucket_of(cur, key)
    nxt = cur.next() and cur.key().startswith(BUCKET)
    hi = bytes(cur.key()[1:]) if nxt else None
    moved = _accounted(txn, table, d, key, hi, key)
    value = moved.to_bytes(DIGEST_SIZE, "big")
    if moved:
        txn.put(owner, xor(txn.get(owner, db=d.dbi), value), db=d.dbi)
    d.bucket = BUCKET + key
    txn.put(d.bucket, value, db=d.dbi)
    d.lo, d.hi, d.acc = key, hi, 0


def _start(txn: Any, table: Any, d: TableDigest) -> None:
    # Collect changes for ``txn`` (those left from a transaction that ended without
    # ``flush`` or ``discard`` belonged to an aborted one).
    d.txn, d.table, d.pending, d.states, d.run_keys, d.run_raws = (txn, table, {}, ({}, {}),
                                                                   [], [])
    d.run_records = None
    d.bucket, d.lo, d.hi, d.acc, d.top_delta = BUCKET, b"", b"", 0, 0
    d.cursor = txn.cursor(db=d.dbi)
    _dirty.setdefault(id(txn), []).append(d)


def on_write(txn: Any, table: Any, key: bytes, raw: bytes, deleted: bool,
             old_raw: bytes | None, old_deleted: bool) -> None:
    """``raw`` was stored under ``key``, replacing ``old_raw`` (None: a new key).

    The bucket changes wait in ``table.digest`` until ``flush(txn)``, which must run
    before ``txn`` commits (the writer does it for every job).
    """
    d = table.digest
    if d is None or not ENABLED:
        return
    if d.txn is not txn:
        _start(txn, table, d)
    run_keys = d.run_keys
    if old_raw is None and not deleted:
        if run_keys and key > run_keys[-1] and (
                (d.gap_hi is None or key < d.gap_hi) if len(run_keys) > 1
                else _opens_run(txn, table, d, key)):
            run_keys.append(key)
            d.run_raws.append(raw)
            d.run_records = None
            return
        if run_keys:
            _settle_before(txn, d, key, None, False)
        if key < d.lo or (d.hi is not None and key >= d.hi):
            _move_to(d, key)
        run_keys = d.run_keys
        run_keys.append(key)
        d.run_raws.append(raw)
        return
    if run_keys:  # the layout below must hold the run's buckets
        _settle_before(txn, d, key, old_raw, old_deleted)
    _write_row(txn, table, d, key, raw, deleted, old_raw, old_deleted)


def on_insert(txn: Any, table: Any, key: bytes, raw: bytes) -> None:
    """``on_write`` for a live row stored under a new key (the common case, kept short:
    a key that extends the current run is only remembered)."""
    d = table.digest
    if d is not None and d.txn is txn:
        run_keys = d.run_keys
        if len(run_keys) > 1 and key > run_keys[-1] and (d.gap_hi is None or key < d.gap_hi):
            run_keys.append(key)
            d.run_raws.append(raw)
            d.run_records = None
            return
    on_write(txn, table, key, raw, False, None, False)


def add_run(txn: Any, table: Any, keys: list[bytes], raws: list[bytes],
            records: list[bytes] | None = None) -> bool:
    """Take live rows about to be stored under distinct new keys (nothing stored under
    any, no row and no tombstone) as one run, if the keys ascend with no stored key
    between them; they are hashed at the next settle, after the caller has stored them.
    ``records``: the rows' record bytes, when every raw is one head (one version and
    origin) followed by its record. The lists become the run's (the caller must not
    change them).

    Returns:
        True: store them, nothing more; False: they do not form a run: store them, then
        hand them to ``add_scattered``.
    """
    d = table.digest
    if d is None or not ENABLED:
        return True
    if d.txn is not txn:
        _start(txn, table, d)
    if d.run_keys:
        _settle_run(txn, d)  # these rows are not stored yet: the settle cannot see them
    if len(keys) < 2 or keys != sorted(keys):
        return False
    gap_hi: bytes | None = None
    for dbi in (table.dbi, table.tomb_dbi):
        cur = txn.cursor(db=dbi)
        if cur.set_range(keys[0]):
            after = cur.key()
            if after <= keys[-1]:
                return False
            if gap_hi is None or after < gap_hi:
                gap_hi = bytes(after)
    if keys[0] < d.lo or (d.hi is not None and keys[0] >= d.hi):
        _move_to(d, keys[0])
    d.run_keys, d.run_raws, d.gap_hi, d.run_records = keys, raws, gap_hi, records
    return True


def add_scattered(txn: Any, table: Any, keys: list[bytes], raws: list[bytes],
                  records: list[bytes] | None = None) -> None:
    """Hash live rows just stored under distinct new keys that ``add_run`` refused as a
    run (random ids, or stored keys between them): the digests in one C-level map, then
    the rows in key order, so rows sharing a bucket share its lookup. A boundary among
    them splits its bucket; the batch's rows after it are not hashed yet, so the split
    leaves them out (``TableDigest.unhashed``)."""
    d = table.digest
    if d is None or not ENABLED or not keys:
        return
    if d.txn is not txn:
        _start(txn, table, d)
    digests = _live_digests(d, keys, raws, records)
    d.unhashed = set(keys)
    try:
        for key, value in sorted(zip(keys, digests, strict=True)):
            if zlib.crc32(key) & LEAF_MASK == 0:
                _split(txn, table, d, key)
                d.acc = value
            elif key < d.lo or (d.hi is not None and key >= d.hi):
                _move_to(d, key)
                d.acc = value
            else:
                d.acc ^= value
    finally:
        d.unhashed = None


def _write_row(txn: Any, table: Any, d: TableDigest, key: bytes, raw: bytes,
               deleted: bool, old_raw: bytes | None, old_deleted: bool) -> None:
    # One write, on its own: its digest (and the old one's) into its bucket's
    # accumulator; a new boundary key splits its bucket.
    # row_digest, inlined for the usual head: a uint64 version, an origin < 128.
    if raw[1] == 0xCF and raw[10] < 0x80:
        delta = XXH_INT(raw[11:] + key, _seed_of(d, raw, deleted))
    else:
        delta = row_digest_int(key, raw, deleted, d.origin_names)
    if old_raw is not None:  # rows written together share their seed: cached
        if old_raw[1] == 0xCF and old_raw[10] < 0x80:
            delta ^= XXH_INT(old_raw[11:] + key, _seed_of(d, old_raw, old_deleted))
        else:
            delta ^= row_digest_int(key, old_raw, old_deleted, d.origin_names)
    elif zlib.crc32(key) & LEAF_MASK == 0:
        _split(txn, table, d, key)
        d.acc = delta
        return
    if key < d.lo or (d.hi is not None and key >= d.hi):
        _move_to(d, key)
        d.acc = delta
    else:
        d.acc ^= delta


def _settle_before(txn: Any, d: TableDigest, key: bytes, old_raw: bytes | None,
                   old_deleted: bool) -> None:
    # Settle the run before the write of ``key`` (already stored, not yet hashed).
    d.writing, d.writing_old, d.writing_old_deleted = key, old_raw, old_deleted
    try:
        _settle_run(txn, d)
    finally:
        d.writing, d.writing_old = None, None


def _opens_run(txn: Any, table: Any, d: TableDigest, key: bytes) -> bool:
    # Whether ``key`` (new, just stored, above the run's only key and in its bucket)
    # extends the run: no other stored key lies between them. Sets ``gap_hi``.
    if d.hi is not None and key >= d.hi:
        return False
    first = d.run_keys[0]
    gap_hi: bytes | None = None
    for dbi in (table.dbi, table.tomb_dbi):
        cur = txn.cursor(db=dbi)
        found = cur.set_range(first)
        if found and cur.key() == first:
            found = cur.next()
        if found and cur.key() == key:
            found = cur.next()
        if found:
            after = cur.key()
            if after < key:
                return False
            if gap_hi is None or after < gap_hi:
                gap_hi = bytes(after)
    d.gap_hi = gap_hi
    return True


def _move_to(d: TableDigest, key: bytes) -> None:
    # Make the bucket holding ``key`` the current one (its accumulator empty).
    pending = d.pending
    pending[d.bucket] = pending.get(d.bucket, 0) ^ d.acc
    cur = d.cursor
    bucket = d.bucket = _bucket_of(cur, key)
    d.lo = bucket[1:]
    d.hi = bytes(cur.key()[1:]) if cur.next() and cur.key().startswith(BUCKET) else None
    d.acc = 0


def _settle_run(txn: Any, d: TableDigest) -> None:
    # Hash the run's rows together. Those before the first boundary among them join the
    # current bucket (the one holding the run); each boundary starts a new bucket that
    # holds the run's rows up to the next one, written here whole (no read). The last
    # new bucket also takes the stored rows after the run up to the next stored
    # boundary (``[gap_hi, hi)``), which leave the current bucket: XOR moves them whole.
    keys, raws, records = d.run_keys, d.run_raws, d.run_records
    d.run_keys, d.run_raws, d.run_records = [], [], None
    if len(keys) == 1:
        _write_row(txn, d.table, d, keys[0], raws[0], False, None, False)
        return
    # XOR of the rows before the first boundary, then of each bucket a boundary starts:
    # the boundaries are found in C (the zero bytes of the keys' masked CRCs), and each
    # segment's digests are XORed by ``reduce``, so no Python code runs per row.
    digests = _live_digests(d, keys, raws, records)
    # Each key's CRC-32 as 4 little-endian bytes; every fourth byte is a low byte, and
    # the table turns a boundary's into 0 (``rowhash.is_boundary``; LEAF_BITS <= 8).
    masked = struct.pack(f"<{len(keys)}I", *map(zlib.crc32, keys))[::4].translate(_STARTS)
    at = masked.find(0)
    if at < 0:
        d.acc ^= reduce(operator.xor, digests, 0)
        return
    starts: list[int] = []
    while at >= 0:
        starts.append(at)
        at = masked.find(0, at + 1)
    edges = [0, *starts, len(keys)]
    values = [reduce(operator.xor, digests[lo:hi], 0)
              for lo, hi in pairwise(edges)]
    moved = 0 if d.gap_hi is None else _accounted(txn, d.table, d, d.gap_hi, d.hi, None)
    d.acc ^= values[0] ^ moved
    d.pending[d.bucket] = d.pending.get(d.bucket, 0) ^ d.acc
    values[-1] ^= moved
    for start, value in zip(starts, values[1:], strict=True):
        d.top_delta ^= value
        txn.put(BUCKET + keys[start], value.to_bytes(DIGEST_SIZE, "big"), db=d.dbi)
    d.lo = keys[starts[-1]]
    d.bucket, d.acc = BUCKET + d.lo, 0


def _live_digests(d: TableDigest, keys: list[bytes], raws: list[bytes],
                  records: list[bytes] | None) -> list[int]:
    # row_digest of live rows as integers, inlined for the usual head (a uint64 version,
    # an origin below 128). A local write's rows share their version and origin, so
    # their seed: the rest runs in C, one hash call per row.
    first = raws[0]
    if first[1] == 0xCF and first[10] < 0x80:
        seed = _seed_of(d, first, False)
        if records is not None:  # one head, already cut off
            return list(map(XXH_INT, map(operator.add, records, keys), repeat(seed)))
        tails = map(operator.itemgetter(slice(11, None)), raws)
        head = first[:11]
        if all(map(bytes.startswith, raws, repeat(head, len(raws)))):
            return list(map(XXH_INT, map(operator.add, tails, keys), repeat(seed)))
        if all(raw[1] == 0xCF and raw[10] < 0x80 for raw in raws):
            # Rows of many versions (a full-copy chunk): a seed per version and origin.
            seeds = [_seed_of(d, raw, False) for raw in raws]
            return list(map(XXH_INT, map(operator.add, tails, keys), seeds))
    return [row_digest_int(key, raw, False, d.origin_names) for key, raw in zip(keys, raws,
                                                                               strict=True)]


def _settle(txn: Any, d: TableDigest) -> None:
    # Write ``d``'s pending changes if they belong to ``txn``; then nothing is pending.
    if d.txn is not txn:
        return
    if d.run_keys:
        _settle_run(txn, d)
    pending = d.pending
    pending[d.bucket] = pending.get(d.bucket, 0) ^ d.acc
    total = d.top_delta
    _forget(d)
    for bk, delta in pending.items():
        if delta:
            total ^= delta
            old = txn.get(bk, db=d.dbi)
            value = (int.from_bytes(old, "big") if old else 0) ^ delta
            txn.put(bk, value.to_bytes(DIGEST_SIZE, "big"), db=d.dbi)
    if total:
        txn.put(TOP, xor(txn.get(TOP, db=d.dbi), total.to_bytes(DIGEST_SIZE, "big")),
                db=d.dbi)


def _forget(d: TableDigest) -> None:
    # Nothing pending (written, or the hashes are being rebuilt or cleared).
    d.txn, d.table, d.pending, d.states, d.cursor = None, None, {}, ({}, {}), None
    d.run_keys, d.run_raws, d.run_records = [], [], None
    d.bucket, d.lo, d.hi, d.acc, d.top_delta = BUCKET, b"", b"", 0, 0


def flush(txn: Any) -> None:
    """Write the bucket changes collected for ``txn``; call before it commits."""
    for d in _dirty.pop(id(txn), ()):
        _settle(txn, d)


def discard(txn: Any) -> None:
    """Forget the bucket changes collected for ``txn`` (it is aborted)."""
    for d in _dirty.pop(id(txn), ()):
        if d.txn is txn:
            _forget(d)


def on_remove(txn: Any, table: Any, key: bytes, old_raw: bytes, old_deleted: bool) -> None:
    """Nothing is stored under ``key`` any more (a pruned tombstone)."""
    d = table.digest
    if d is None or not ENABLED:
        return
    _settle(txn, d)
    cur = txn.cursor(db=d.dbi)
    bk = _bucket_of(cur, key)
    gone = row_digest(key, old_raw, old_deleted, d.origin_names)
    value = xor(cur.value(), gone)
    if bk == BUCKET + key:  # the bucket's first key went: merge it into the one before
        txn.delete(bk, db=d.dbi)
        prev = _bucket_of(cur, key)
        value = xor(cur.value(), value)
        bk = prev
    txn.put(bk, value, db=d.dbi)
    txn.put(TOP, xor(txn.get(TOP, db=d.dbi), gone), db=d.dbi)


def clear(txn: Any, table: Any) -> None:
    """The table was emptied (dropped): forget every hash."""
    if table.digest is not None:
        _forget(table.digest)
        txn.drop(table.digest.dbi, delete=False)


def mark_built(txn: Any, table: Any) -> None:
    """Start the hashes of a new, empty table."""
    if table.digest is not None and ENABLED:
        _forget(table.digest)
        txn.put(BUCKET, ZERO, db=table.digest.dbi)
        txn.put(TOP, ZERO, db=table.digest.dbi)
        txn.put(MARK, _FORMAT_MARK, db=table.digest.dbi)


def is_built(txn: Any, table: Any) -> bool:
    return (table.digest is not None
            and txn.get(MARK, db=table.digest.dbi) == _FORMAT_MARK)


def rebuild(txn: Any, table: Any) -> int:
    """Recompute every hash of ``table`` from its stored rows and tombstones.

    Returns:
        The number of rows hashed.
    """
    d = table.digest
    if d is None:
        return 0
    _forget(d)  # the rows already hold this transaction's writes
    txn.drop(d.dbi, delete=False)
    names = d.origin_names
    streams = [_rows_of(txn, dbi, deleted)
               for dbi, deleted in ((table.dbi, False), (table.tomb_dbi, True))]
    buckets: dict[bytes, int] = {BUCKET: 0}
    last: list[Any] = [b"", None]
    current = BUCKET
    count = 0
    for key, raw, deleted in heapq.merge(*streams):
        if is_boundary(key):
            current = BUCKET + key
            buckets[current] = 0
        buckets[current] ^= row_digest_int(key, raw, deleted, names, last)
        count += 1
    cur = txn.cursor(db=d.dbi)
    cur.putmulti([(k, v.to_bytes(DIGEST_SIZE, "big")) for k, v in buckets.items()])
    total = 0
    for v in buckets.values():
        total ^= v
    txn.put(TOP, total.to_bytes(DIGEST_SIZE, "big"), db=d.dbi)
    txn.put(MARK, _FORMAT_MARK, db=d.dbi)
    return count


def _rows_of(txn: Any, dbi: Any, deleted: bool) -> Iterator[tuple[bytes, bytes, bool]]:
    for key, raw in txn.cursor(db=dbi):
        yield key, raw, deleted


def settle_pending(txn: Any, table: Any) -> None:
    """Write ``table``'s pending bucket changes if ``txn`` is the writer's transaction
    that made them (a job reading its own buckets); otherwise nothing."""
    _settle(txn, table.digest)
