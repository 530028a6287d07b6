"""Reading the transaction log backwards: which sequence holds this node's version V.

``wait_for_replication`` knows a peer's position in this node's log (its acknowledged
sequence) and asks about a version. This node's own entries (origin 0) are appended
in version order, so "every local write up to version V is applied" is "the peer's
position reaches the last local entry whose version is at most V".
"""

from __future__ import annotations

from typing import Any

from harpsync import codec
from harpsync.storage.database import LOCAL_ORIGIN, Database
from harpsync.storage.keys import seq_key, seq_of

# A backward scan gives up after this many entries of other origins (a node relaying a
# busy peer); the answer is then the conservative one.
SCAN_LIMIT = 200_000


def carries_rows(version: int, ops: list[list[Any]]) -> bool:
    """Whether an entry ``[origin, version, user, ops]`` carries rows a full copy or a
    repair landed (each op keeps its row's own version in ``op[5]``, and the entry is
    stamped with the newest of them): not one transaction of its origin in that
    origin's version order (chunks go in key order), so it raises no floor where it is
    applied, nor counts as this node's own newest write. A horizon's re-issued deletes
    keep ``op[5]`` too, but under a new version: a transaction of the node issuing them.
    Such entries hold only such ops, so an entry whose first op has no ``op[5]`` is
    answered by one look (the apply path asks for every entry)."""
    if not ops or len(ops[0]) <= 5:
        return False
    return any(len(op) > 5 and op[5] == version for op in ops)


def own_version_through(db: Database, seq: int) -> int:
    """The version of the newest entry at or before ``seq`` that this node wrote itself
    (0 if none is left in the log, or the scan gave up): not one logging rows of its
    name that a copy or a repair brought back (:func:`carries_rows`), whose versions
    may be an earlier node's of that name, ahead of this one's."""
    return _newest_local_through(db, seq, own_only=True)


def local_seq_through(db: Database, version: int) -> int:
    """The sequence of the newest local log entry with a version at most ``version``.

    Returns 0 when there is none in the log (nothing local at or below ``version``, or
    it was pruned, in which case every peer position past the pruned part covers it).
    """
    with db.reading() as txn:
        cur = txn.cursor(db=db.txns_dbi)
        if not cur.last():
            return 0
        for scanned, (key, value) in enumerate(cur.iterprev()):
            if scanned > SCAN_LIMIT:
                return seq_of(key)
            origin, entry_version = codec.unpack_head(value, 2)
            if origin == LOCAL_ORIGIN and entry_version <= version:
                return seq_of(key)
    return 0


def local_version_at(db: Database, seq: int) -> int:
    """The version of the newest local log entry at or before ``seq`` (0 if none is
    left in the log): what a peer that applied through ``seq`` holds of this node."""
    return _newest_local_through(db, seq, own_only=False)


def _newest_local_through(db: Database, seq: int, own_only: bool) -> int:
    # The backward scan of both above; ``own_only`` skips entries of copied rows.
    with db.reading() as txn:
        cur = txn.cursor(db=db.txns_dbi)
        if not cur.set_range(seq_key(seq + 1)):
            if not cur.last():
                return 0
        elif not cur.prev():
            return 0
        for scanned, (_key, value) in enumerate(cur.iterprev()):
            if scanned > SCAN_LIMIT:
                return 0
            origin, entry_version = codec.unpack_head(value, 2)
            if origin == LOCAL_ORIGIN and not (
                    own_only and carries_rows(entry_version, codec.unpack(value)[3])):
                return int(entry_version)
    return 0


def held_floors(db: Database, through_seq: int) -> dict[str, int]:
    """Per origin, a version through which ``db`` holds every transaction of that
    origin, as committed (origins with none left out): what a full copy taken at log
    sequence ``through_seq`` and read after this call carries.

    For this node, the newest entry it wrote itself through ``through_seq`` (its own
    writes are logged in version order; none when they were all pruned: the newest
    pruned version of its name may be rows a copy brought back); for another origin,
    its committed high-water version (``hw:<origin>``: raised only with the
    transactions up to it, see ``Database.committed_hw``). Never more than is held: a
    copy that claimed more would raise its receiver's floor past transactions it never
    carried.
    """
    own_name = db.origin_names[LOCAL_ORIGIN]
    others = sorted({name for name in db.origin_names.values() if name != own_name})
    out = {name: version for name, version in db.committed_hw(others).items() if version}
    own = own_version_through(db, through_seq)
    if own:
        out[own_name] = own
    return out


def newest_local_version(db: Database) -> int:
    """The version of this node's newest entry in the log (0 if none)."""
    return local_version_at(db, db.next_seq)


def entry_seq_of_version(db: Database, version: int) -> int | None:
    """The sequence of the log entry holding a change of ``version`` (``None`` if none
    is left).

    An entry is stamped with its version, or, for rows landed by a full copy or a
    repair (each keeping its own version in ``op[5]``), with the newest of them: an
    entry stamped above ``version`` holds it if one of its ops carries it. Two origins
    can stamp the same version (their clocks met in one millisecond); the earliest such
    entry near the end of the log is returned, so a feed resuming from it repeats
    rather than skips.
    """
    found: int | None = None
    # msgpack writes an integer one way only: just the entries that contain these
    # bytes are unpacked to look at their ops.
    packed = codec.pack(version)
    with db.reading() as txn:
        cur = txn.cursor(db=db.txns_dbi)
        if not cur.last():
            return None
        # No ``SCAN_LIMIT``: without the entry, the feed replays the whole log by version
        # and skips late entries stamped at or below ``version``; this scan costs at
        # most about what that replay would.
        for key, value in cur.iterprev():
            entry_version = codec.unpack_head(value, 2)[1]
            if entry_version == version or (entry_version > version
                                            and _has_op_version(bytes(value), packed, version)):
                found = seq_of(key)
            elif found is not None and entry_version < version:
                break  # past the entries stamped at or after it
    return found


def _has_op_version(raw: bytes, packed: bytes, version: int) -> bool:
    if packed not in raw:
        return False
    ops = codec.unpack(raw)[3]
    return any(len(op) > 5 and op[5] == version for op in ops)
