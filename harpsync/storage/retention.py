"""Pruning of the transaction log and of tombstones.

Log entries may go once every known peer has acknowledged past them, or once
``logging.auditRetention`` has expired. Tombstones go only when every peer has
acknowledged past them: a peer that was offline past retention is repaired by a full
copy, and the tombstones it receives make sure deletes from the gap still win.
Every prune records ``pruned_through`` so publishers detect a cursor left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harpsync import codec
from harpsync.storage import digest, horizon
from harpsync.storage.database import PRUNED_KEY, PRUNED_MAX_PREFIX, Database
from harpsync.storage.keys import seq_key, seq_of
from harpsync.storage.writer import WriteContext

MAX_PRUNE = 50_000  # entries per job, so one prune never holds the writer for long
# A removed node's tombstone is what stops gossip from adding it back: keep it.
KEEP_TOMBSTONES = {("system", "hdb_nodes")}


def _hold_tail(ctx: WriteContext, db: Database) -> None:
    """This job rewrites or removes log entries: the database's in-memory log tail is
    not read from until the job committed or failed."""
    db.hold_log_tail()
    ctx.after_commit.append(db.release_log_tail)
    ctx.on_undo(db.release_log_tail)


def _mark_pruned(ctx: WriteContext, db: Database, seq: int) -> None:
    txn = ctx.txn(db)
    raw = txn.get(PRUNED_KEY, db=db.meta_dbi)
    current = int(codec.unpack(raw)) if raw else 0
    if seq > current:
        txn.put(PRUNED_KEY, codec.pack(seq), db=db.meta_dbi)


class _RemovedVersions:
    """The newest version per origin among removed log entries, saved with the prune:
    a subscriber whose per-origin floors are at or above them lost nothing it needs."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.newest: dict[int, int] = {}

    def note(self, raw: bytes | memoryview) -> None:
        origin, version = codec.unpack(raw)[:2]
        if version > self.newest.get(origin, 0):
            self.newest[origin] = version

    def save(self, ctx: WriteContext) -> None:
        txn = ctx.txn(self.db)
        for origin, version in self.newest.items():
            name = self.db.origin_names.get(origin)
            if name is None:
                continue
            key = PRUNED_MAX_PREFIX + name.encode()
            raw = txn.get(key, db=self.db.meta_dbi)
            if raw is None or int(codec.unpack(raw)) < version:
                txn.put(key, codec.pack(version), db=self.db.meta_dbi)


def seq_for_time(db: Database, cutoff_version: int) -> int:
    """The highest log sequence whose version is older than ``cutoff_version``."""
    found = 0
    with db.reading() as txn:
        cur = txn.cursor(db=db.txns_dbi)
        for key, value in cur:
            if codec.unpack(value)[1] >= cutoff_version:
                break
            found = seq_of(key)
    return found


def _oldest_in(txn: Any, db: Database, seq: int) -> tuple[int | None, int]:
    """The oldest version written by a log entry after ``seq`` (None: no entry), its
    own or a relayed copy row's (``op[5]``, older than its entry's), and the last
    sequence read."""
    oldest: int | None = None
    last = seq
    cur = txn.cursor(db=db.txns_dbi)
    if not cur.set_range(seq_key(seq + 1)):
        return None, last
    for key, value in cur:
        last = seq_of(key)
        version, ops = codec.unpack(value)[1::2]
        low = min([version] + [op[5] for op in ops if isinstance(op, list) and len(op) > 5
                               and isinstance(op[5], int)])
        if oldest is None or low < oldest:
            oldest = low
    return oldest, last


def oldest_version_after(db: Database, seq: int) -> tuple[int | None, int]:
    """``(oldest version written after seq or None, last sequence read)``, read outside
    the writer: the part of the log no peer acknowledged may be long (a peer away)."""
    with db.reading() as txn:
        return _oldest_in(txn, db, seq)


def prune_log_job(db: Database, through_seq: int, tombstones_before: int | None,
                  unacked_after: int | None = None,
                  keep_tables: frozenset[str] = frozenset(),
                  ) -> Callable[[WriteContext], dict[str, int]]:
    """Delete log entries up to ``through_seq``; tombstones with older versions too.

    With ``unacked_after``, tombstones at least as new as any version the entries after
    it wrote stay. The caller lowered ``tombstones_before`` by the entries no peer
    acknowledged, read up to ``unacked_after`` (:func:`oldest_version_after`); the job
    adds those appended since. The log is not in version order (another origin's
    delete can arrive late, stamped before entries peers acknowledged), and a peer that
    has not received such a delete needs its tombstone, from the log or from a full
    copy after this prune. The tombstones of ``keep_tables`` stay whatever their age
    (a peer that does not take such a table acknowledged past its deletes unseen).
    """

    def job(ctx: WriteContext) -> dict[str, int]:
        if db.closed:  # dropped after this job was queued
            return {"entries": 0, "tombstones": 0, "through": 0}
        _hold_tail(ctx, db)
        txn = ctx.txn(db)
        floor = tombstones_before
        if floor and unacked_after is not None:
            oldest = _oldest_in(txn, db, unacked_after)[0]
            if oldest is not None:
                floor = min(floor, oldest)
        removed = 0
        last = 0
        versions = _RemovedVersions(db)
        cur = txn.cursor(db=db.txns_dbi)
        if cur.first():
            while removed < MAX_PRUNE:
                seq = seq_of(cur.key())
                if seq > through_seq:
                    break
                last = seq
                removed += 1
                versions.note(cur.value())
                if not cur.delete() or not cur.key():
                    break
        if last:
            _mark_pruned(ctx, db, last)
            versions.save(ctx)
        tombs = 0
        if floor:
            for table in list(db.tables.values()):
                if (db.name, table.name) in KEEP_TOMBSTONES or table.name in keep_tables:
                    continue
                tcur = txn.cursor(db=table.tomb_dbi)
                ok = tcur.first()
                swept = 0
                while ok:
                    version = codec.unpack(tcur.value())[0]
                    if version < floor:
                        tombs += 1
                        swept = max(swept, version)
                        digest.on_remove(txn, table, bytes(tcur.key()), bytes(tcur.value()),
                                         True)
                        ok = tcur.delete() and bool(tcur.key())
                    else:
                        ok = tcur.next()
                if swept:  # what the swept deletes still tell peers (horizon.py)
                    horizon.note_swept(txn, db, table, swept)
        return {"entries": removed, "tombstones": tombs, "through": last}

    return job


def version_at(db: Database, seq: int) -> int | None:
    """The version of the log entry at ``seq``, or of the last one before it."""
    with db.env.begin() as txn:
        cur = txn.cursor(db=db.txns_dbi)
        if cur.set_range(seq_key(seq + 1)):
            if cur.prev():
                return int(codec.unpack(cur.value())[1])
            return None
        if cur.last():
            return int(codec.unpack(cur.value())[1])
    return None


def purge_table_job(db: Database, table: str, keep: int | None, upto_seq: int | None,
                    before_version: int | None = None,
                    ) -> Callable[[WriteContext], dict[str, Any]]:
    """``purge_stream``: remove a table's operations from the log.

    With ``keep`` the newest ``keep`` entries touching the table stay; with ``upto_seq``
    everything before that sequence goes; with ``before_version`` only entries older
    than it go (``delete_transaction_logs_before``), wherever they are in the log: it
    is not in version order (a peer's write can arrive after newer local ones). Entries
    that also touch other tables are rewritten without this table's operations.
    """

    def job(ctx: WriteContext) -> dict[str, Any]:
        _hold_tail(ctx, db)
        txn = ctx.txn(db)
        touching: list[int] = []
        cur = txn.cursor(db=db.txns_dbi)
        for key, value in cur:
            seq = seq_of(key)
            if upto_seq is not None and seq >= upto_seq:
                break
            entry = codec.unpack(value)
            if before_version is not None and entry[1] >= before_version:
                continue
            if any(op[0] == table for op in entry[3]):
                touching.append(seq)
        if keep is not None:
            touching = touching[:max(0, len(touching) - keep)]
        removed = 0
        versions = _RemovedVersions(db)
        for seq in touching:
            raw = txn.get(seq_key(seq), db=db.txns_dbi)
            if raw is None:
                continue
            versions.note(raw)
            origin, version, user, ops = codec.unpack(raw)
            rest = [op for op in ops if op[0] != table]
            if rest:
                txn.put(seq_key(seq), codec.pack([origin, version, user, rest]), db=db.txns_dbi)
            else:
                txn.delete(seq_key(seq), db=db.txns_dbi)
            removed += 1
        if touching:
            _mark_pruned(ctx, db, touching[-1])
            versions.save(ctx)
        return {"removed": removed, "through": touching[-1] if touching else 0}

    return job
