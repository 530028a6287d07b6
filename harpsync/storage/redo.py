"""Rows of local system tables written with a database's data, crash-consistent.

A replication job that dead-letters a change, or records a conflict, writes a row of
``system`` (``hdb_dead_letters``, ``hdb_conflicts``) and the data database (the
change, the link's cursor) in one job; a reprocess or a resolve deletes the row and
writes the data. The two are separate LMDB environments, so they commit one after the
other, and a crash in between used to lose the row (the cursor had moved past the
change) or keep one for a change that never committed.

So the data side carries a redo of the system side: the group writes the system ops of
its jobs into the data database's ``__meta__`` (``system_redo`` -> ``[generation,
ops]``), raises ``redo:<database>`` in ``system``'s ``__meta__`` to that generation,
commits every data environment first and ``system`` last. A crash in between leaves a
redo newer than its mark, and ``replay`` (at start) applies it. The ops are idempotent
(a put of the row as it was, with its version; a delete by id), and a redo no newer than
its mark is done and never applied again (a later delete of the same row stays). A
group whose ``system`` commit failed (not a crash) leaves its redo pending: the next
group that writes one for that database keeps its ops in front of its own.

The other way round, a database whose commit fails (a full disk) while ``system``'s
would succeed: the system ops of the jobs that wrote it are taken back before
``system`` commits (``compensate``), so a reprocess or a resolve that did not land keeps
its row.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lmdb

from harpsync import codec
from harpsync.storage import digest
from harpsync.storage.database import LOCAL_ORIGIN, Database
from harpsync.storage.keys import encode_id
from harpsync.storage.records import put_record, remove_record

SLOT_KEY = b"system_redo"
MARK_PREFIX = b"redo:"

# An op: ["put", table, id, version, row] or ["delete", table, id].
Op = list[Any]


def _mark(system_txn: lmdb.Transaction, system: Database, name: str) -> int:
    raw = system_txn.get(MARK_PREFIX + name.encode(), db=system.meta_dbi)
    return int(codec.unpack(raw)) if raw else 0


def stage(system_txn: lmdb.Transaction, system: Database, db_txn: lmdb.Transaction,
          db: Database, ops: list[Op]) -> None:
    """Write ``ops`` (system ops of jobs that wrote ``db``) as ``db``'s redo, and mark
    it done in ``system``: the two commit in their own environments."""
    mark = _mark(system_txn, system, db.name)
    raw = db_txn.get(SLOT_KEY, db=db.meta_dbi)
    generation, pending = (codec.unpack(raw) if raw else (0, []))
    kept = list(pending) if generation > mark else []  # a system commit that failed
    generation = max(generation, mark) + 1
    db_txn.put(SLOT_KEY, codec.pack([generation, kept + ops]), db=db.meta_dbi)
    system_txn.put(MARK_PREFIX + db.name.encode(), codec.pack(generation),
                   db=system.meta_dbi)


def pending(system: Database, databases: Iterable[Database]) -> list[tuple[Database, int,
                                                                           list[Op]]]:
    """Redos committed in a database whose ``system`` side never committed."""
    out = []
    with system.env.begin() as system_txn:
        for db in databases:
            if db is system:
                continue
            with db.env.begin() as txn:
                raw = txn.get(SLOT_KEY, db=db.meta_dbi)
            if raw:
                generation, ops = codec.unpack(raw)
                if generation > _mark(system_txn, system, db.name):
                    out.append((db, int(generation), list(ops)))
    return out


def apply(system_txn: lmdb.Transaction, system: Database, db: Database, generation: int,
          ops: list[Op]) -> int:
    """Apply a pending redo to ``system`` (in the caller's transaction) and mark it done;
    returns the ops applied."""
    for op in ops:
        table = system.tables.get(str(op[1]))
        if table is None:
            continue
        key = encode_id(op[2])
        if op[0] == "put":
            put_record(system_txn, table, key, int(op[3]), LOCAL_ORIGIN, op[4])
        else:
            remove_record(system_txn, table, key)
    system_txn.put(MARK_PREFIX + db.name.encode(), codec.pack(generation), db=system.meta_dbi)
    return len(ops)


def compensate(system_txn: lmdb.Transaction, system: Database, ops: list[Op]) -> None:
    """Put back, in ``system_txn``, the committed state of every row ``ops`` touched:
    their jobs' data did not commit, so their system side must not either."""
    keys = dict.fromkeys((str(op[1]), encode_id(op[2])) for op in ops)
    child = system.env.begin(write=True, parent=system_txn)
    try:
        with system.env.begin() as committed:  # as the last group left it
            for name, key in keys:
                table = system.tables.get(name)
                if table is None:
                    continue
                raw = committed.get(key, db=table.dbi)
                if raw is None:
                    remove_record(child, table, key)
                else:
                    version, origin, record = codec.unpack(raw)
                    put_record(child, table, key, version, origin, record)
        digest.flush(child)
    except BaseException:
        digest.discard(child)
        child.abort()
        raise
    child.commit()


def restore_meta(system_txn: lmdb.Transaction, system: Database, keys: list[bytes]) -> None:
    """Put back, in ``system_txn``, the committed value of each ``__meta__`` key in
    ``keys`` (a failed write's cursor and floors: its entries are asked for again)."""
    if not keys:
        return
    with system.env.begin() as committed:
        for key in dict.fromkeys(keys):
            raw = committed.get(key, db=system.meta_dbi)
            if raw is None:
                system_txn.delete(key, db=system.meta_dbi)
            else:
                system_txn.put(key, raw, db=system.meta_dbi)


def logged_row_ops(logged: list[tuple[Database, int, bytes]], system: Database) -> list[Op]:
    """The rows of ``system``'s tables named by the log entries in ``logged`` (a job's:
    a peer's ``hdb_role`` or ``hdb_user`` change applied by the system link), as ops
    whose rows ``compensate`` puts back: taking back only a failed job's entries left
    its rows committed here and never relayed (``Writer._compensate``)."""
    out: list[Op] = []
    for db, _seq, value in logged:
        if db is system:
            for op in codec.unpack(value)[3]:
                if isinstance(op, list) and len(op) > 2 and isinstance(op[0], str) \
                        and op[1] in ("insert", "update", "upsert", "delete"):
                    out.append(["put", op[0], op[2]])
    return out
