"""What a verify reads from one table, and the jobs that rebuild and repair it.

The reads run in short read transactions (any thread); the jobs run in the writer
thread like every other write. See ``DESIGN.md`` (hash layout, tie rule).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from harpsync import codec
from harpsync.errors import BadRequestError
from harpsync.storage import digest, digest_reads, horizon, rowhash
from harpsync.storage.conflicts import APPLY, REFUSE, SKIP, Review, decide
from harpsync.storage.database import LOCAL_ORIGIN, Database, Table
from harpsync.storage.keys import decode_id
from harpsync.storage.records import put_record, put_tombstone
from harpsync.storage.schema import local_origin
from harpsync.storage.store import Storage
from harpsync.storage.writer import WriteContext
from harpsync.storage.writes import note_attributes

Range = tuple[bytes, bytes | None]
# What a repair answers per node: the ids it changed, those a policy kept, and those
# stamped beyond the clock-skew bound (held back, as replication holds them).
REPAIR_LISTS = ("changed", "refused", "conflicts", "skewed")
# What one side holds under a key: None (absent) or
# [digest, version, origin name, deleted, record or None].
RowState = list[Any] | None


def _check(table: Table) -> None:
    if not digest.ENABLED or table.digest is None:
        raise BadRequestError("table hashes are not maintained on this node "
                              "(HARPSYNC_DIGEST=off)")


def all_buckets(db: Database, table: Table) -> list[rowhash.Bucket]:
    """Every bucket of the table, in key order (the head first)."""
    _check(table)
    with db.reading() as txn:
        return digest_reads.buckets(txn, table)


def top_hash(db: Database, table: Table) -> bytes:
    """The table's top hash (the XOR of every bucket), read in one lookup."""
    _check(table)
    with db.reading() as txn:
        return digest_reads.stored_top(txn, table)


def range_hashes(db: Database, table: Table, starts: Sequence[bytes]) -> list[bytes]:
    """The table's hash per range ``[starts[i], starts[i+1])`` (``starts[0]`` is b"")."""
    return rowhash.combine(all_buckets(db, table), list(starts))


def buckets_in(db: Database, table: Table, ranges: Sequence[Range]) -> list[list[rowhash.Bucket]]:
    """The buckets starting in each range."""
    _check(table)
    with db.reading() as txn:
        return [digest_reads.buckets(txn, table, lo, hi) for lo, hi in ranges]


# Row digests are compared by their first bytes only: a candidate found this way is read
# again in full (``read_rows``), and a row that differs hides behind a shorter prefix
# with probability 2**-64.
ROW_PREFIX = 8


def rows_in(db: Database, table: Table, ranges: Sequence[Range]) -> list[dict[bytes, bytes]]:
    """``key -> row digest prefix`` of the stored rows in each range."""
    _check(table)
    with db.reading() as txn:
        return [{k: d[:ROW_PREFIX] for k, d in digest_reads.row_digests(txn, table, lo, hi).items()}
                for lo, hi in ranges]


def _rows_of(txn: Any, dbi: Any, lo: bytes, hi: bytes | None, deleted: bool,
             ) -> Iterator[tuple[bytes, bytes, bool]]:
    cur = txn.cursor(db=dbi)
    found = cur.set_range(lo) if lo else cur.first()
    while found:
        key = bytes(cur.key())
        if hi is not None and key >= hi:
            return
        yield key, bytes(cur.value()), deleted
        found = cur.next()


def rows_in_bounded(db: Database, table: Table, ranges: Sequence[Range], budget: int,
                    ) -> tuple[list[list[tuple[bytes, bytes]]], tuple[int, bytes] | None]:
    """``(key, row digest prefix)`` of the stored rows in each range, in key order,
    until about ``budget`` bytes of keys and digests (at least one row).

    Returns:
        The rows per range (a list for each range up to where it stopped), and where
        it stopped: ``(range index, first key left out)``, or None when complete.
    """
    _check(table)
    names = table.digest.origin_names if table.digest is not None else {}
    out: list[list[tuple[bytes, bytes]]] = []
    size = 0
    last: list[Any] = [b"", None]
    with db.reading() as txn:
        for i, (lo, hi) in enumerate(ranges):
            rows: list[tuple[bytes, bytes]] = []
            out.append(rows)
            # Live rows and tombstones merged in key order (a key is one or the other),
            # so the asker can go on from the first key left out.
            for key, raw, deleted in heapq.merge(
                    _rows_of(txn, table.dbi, lo, hi, False),
                    _rows_of(txn, table.tomb_dbi, lo, hi, True)):
                if size >= budget:
                    return out, (i, key)
                rows.append((key, rowhash.row_digest(key, raw, deleted, names,
                                                     last)[:ROW_PREFIX]))
                size += len(key) + ROW_PREFIX + 8
    return out, None


def read_rows(db: Database, table: Table, keys: Sequence[bytes],
              with_records: bool, budget: int | None = None) -> list[RowState]:
    """What is stored under each key, with origin names (comparable across nodes).

    ``budget``: with records, stop after the rows whose records reach this many bytes
    (at least one row): the answer must fit in one frame; the caller asks again for
    the keys after them.
    """
    _check(table)
    out: list[RowState] = []
    size = 0
    with db.reading() as txn:
        for key in keys:
            if budget is not None and out and size >= budget:
                break
            found = digest_reads.stored_row(txn, table, key, codec.unpack)
            if found is None:
                out.append(None)
                continue
            row_digest, (version, origin, record) = found
            if with_records and budget is not None and record is not None:
                size += len(codec.pack(record))
            out.append([row_digest, version, db.origin_names.get(origin, ""),
                        record is None, record if with_records else None])
    return out


def row_size(row: RowState) -> int:
    """About how many bytes a row takes in a message."""
    return 64 if row is None or row[4] is None else 64 + len(codec.pack(row[4]))


def differs(mine: RowState, theirs: RowState) -> bool:
    """Whether two sides disagree: a tombstone and nothing at all agree (both say the
    row does not exist; retention prunes tombstones on each node at its own time)."""
    if mine is None or theirs is None:
        present = mine if mine is not None else theirs
        return present is not None and not present[3]
    return bool(mine[0] != theirs[0])


def winner(mine: RowState, theirs: RowState) -> int:
    """Which side's row wins: 1 for ``mine``, -1 for ``theirs`` (never 0 for rows that
    differ). Last writer wins on ``(version, origin name)``; a row beats nothing; equal
    version and origin (only damage makes those differ) go to the greater digest, a
    rule every node applies the same way."""
    if theirs is None:
        return 1
    if mine is None:
        return -1
    a = (mine[1], mine[2], mine[0])
    b = (theirs[1], theirs[2], theirs[0])
    return 1 if a > b else -1


def rebuild_job(storage: Storage, db_name: str, table_name: str,
                ) -> Callable[[WriteContext], int]:
    """A job recomputing the table's hashes from its stored rows (``deep``)."""

    def job(ctx: WriteContext) -> int:
        db, table = storage.table(db_name, table_name)
        _check(table)
        return digest.rebuild(ctx.txn(db), table)

    return job


def repair_job(storage: Storage, db_name: str, table_name: str, incarnation: int,
               rows: Sequence[tuple[bytes, list[Any]]], review: Review | None = None,
               dry_run: bool = False) -> Callable[[WriteContext], dict[str, list[Any]]]:
    """A job storing each winning row ``(key, [digest, version, origin, deleted, record])``
    where something older is stored (a row the stored one beats, written after the
    verify compared, stays), logged under the row's origin and version so the
    repair replicates like a copied row.

    ``review``: this node's conflict policies for the rows' origins, applied as to a
    replicated change of the same row: ``dest_wins`` keeps a row last written here (the
    refused row becomes a dead letter) and ``manual_review`` leaves it for an operator
    (both versions go to ``system.hdb_conflicts``) instead of overwriting it.

    ``dry_run``: decide the same, write nothing.

    A row of this node's own that it holds nothing of, older than its tombstone
    horizon, was deleted here (``horizon.py``): it is refused, not brought back, and
    deleted again (logged) so the peer learns the delete.

    Returns:
        ``changed``: the ids changed here; ``refused`` and ``conflicts``: the ids a
        policy kept as they are (``refused`` also the rows deleted here);
        ``skewed``: those stamped beyond the clock-skew bound.
    """

    def job(ctx: WriteContext) -> dict[str, list[Any]]:
        db, table = storage.table(db_name, table_name)
        _check(table)
        if table.version != incarnation:
            raise BadRequestError(f"table '{db_name}.{table_name}' was re-created; "
                                  "verify again")
        txn = ctx.txn(db)
        out: dict[str, list[Any]] = {name: [] for name in REPAIR_LISTS}
        relay: dict[int, list[list[Any]]] = {}
        limit = storage.hlc.limit()
        swept = horizon.horizon(txn, db, table)
        since = horizon.own_since(txn, db)
        reissued: list[list[Any]] = []
        for key, (row_digest, version, origin_name, deleted, record) in rows:
            if not deleted and not isinstance(record, dict):
                continue  # a live row without its record (not published here): unknown
            rid = decode_id(key)
            found = digest_reads.stored_row(txn, table, key, codec.unpack)
            if found is None and not deleted and horizon.deleted_here(
                    None, version, db.origin_ids.get(origin_name, -1), swept, since):
                # Deleted here (its tombstone was swept): deleted again, so the peer
                # that still holds it learns the delete by replication.
                out["refused"].append(rid)
                if not dry_run:
                    reissued.append(horizon.reissue(txn, table, key, version))
                continue
            op = [table_name, "delete" if deleted else "upsert", rid,
                  None if deleted else record, table.version]
            if found is not None:
                if found[0] == row_digest:
                    continue
                stored_version, stored_origin, stored_record = found[1]
                stored_name = db.origin_names.get(stored_origin, "")
                stored: RowState = [found[0], stored_version, stored_name,
                                    stored_record is None, None]
                incoming: RowState = [row_digest, version, origin_name, deleted, None]
                if winner(stored, incoming) > 0:
                    # Written here since the verify compared: newer, it stays (last
                    # writer wins; replication brings it to the peer).
                    continue
                if review is not None and stored_name != origin_name:
                    held = (stored_version, stored_origin, stored_record)
                    verdict = decide(review.policy_for(origin_name, table_name), held,
                                     stored_name, version, origin_name, deleted)
                    if verdict != APPLY:
                        if not dry_run:  # a dead letter, or both versions to review
                            review.admit(ctx, db, table, op, held, version, origin_name)
                        if verdict != SKIP:
                            out["refused" if verdict == REFUSE else "conflicts"].append(rid)
                        continue
            if version > limit:
                # Stamped further ahead of this node's clock than replication accepts:
                # held back until the clocks agree, as the link holds it (stored now,
                # it would win here early, and stall the links that relay it on).
                out["skewed"].append(rid)
                continue
            if dry_run:
                out["changed"].append(rid)
                continue
            oid = local_origin(ctx, db, origin_name)
            storage.hlc.observe(version)  # as for a replicated row
            if deleted:
                put_tombstone(txn, table, key, version, oid)
            else:
                put_record(txn, table, key, version, oid, record)
                note_attributes(ctx, db, table, [record], version)
            out["changed"].append(rid)
            relay.setdefault(oid, []).append([*op, version])
        for oid, ops in relay.items():
            storage.append_log(ctx, db, ops, max(op[5] for op in ops), oid)
        if reissued:
            storage.append_log(ctx, db, reissued, storage.hlc.now(), LOCAL_ORIGIN)
        return out

    return job
