"""storage/horizon.py: what a node keeps of the deletes whose tombstones it swept, and
the copy rules that follow from it (real LMDB)."""

from __future__ import annotations

from typing import Any

from harpsync import codec
from harpsync.storage import horizon, retention, writes
from harpsync.storage.database import LOCAL_ORIGIN
from harpsync.storage.ingest import apply_rows_job, apply_sweeps
from harpsync.storage.keys import encode_id
from harpsync.storage.records import get_stored
from harpsync.storage.store import Storage
from harpsync.storage.writer import WriteContext


async def _sweep_all(storage: Storage) -> dict[str, int]:
    """Prune the whole log and every tombstone (as retention does once they are old)."""
    db = storage.databases["data"]
    result: dict[str, int] = await storage.write(retention.prune_log_job(
        db, db.head_seq, storage.hlc.now()))
    return result


def _horizon(storage: Storage, table: str = "t") -> int:
    db = storage.databases["data"]
    with db.env.begin() as txn:
        return horizon.horizon(txn, db, db.tables[table])


def _stored(storage: Storage, rid: Any, table: str = "t") -> Any:
    db = storage.databases["data"]
    with db.env.begin() as txn:
        return get_stored(txn, db.tables[table], encode_id(rid))


def _deleted_again(storage: Storage, written: int, ids: list[int], head: int) -> None:
    """``ids`` (this node's rows of ``written``) hold a tombstone one tick after it, and
    one new entry of this node's, stamped now, logs their deletes with those versions."""
    db = storage.databases["data"]
    for rid in ids:
        assert _stored(storage, rid) == (written + 1, LOCAL_ORIGIN, None), rid
    entries = [codec.unpack(raw) for _, raw in db.log_after(head, 10)]
    mine = [e for e in entries if e[0] == LOCAL_ORIGIN and e[3][0][1] == "delete"]
    assert len(mine) == 1 and mine[0][1] > written + 1
    assert sorted(op[2] for op in mine[0][3]) == ids
    assert {(op[1], op[5]) for op in mine[0][3]} == {("delete", written + 1)}


async def _deleted_and_swept(storage: Storage) -> tuple[int, int]:
    """Rows 1-3 written here; 2 deleted and its tombstone swept. Returns the version of
    the rows and of the delete."""
    await storage.create_table("data", "t", "id")
    await storage.write(writes.write_records(storage, "data", "t",
                                             [{"id": i} for i in (1, 2, 3)], "insert", None))
    written = _stored(storage, 2)[0]
    await storage.write(writes.delete_records(storage, "data", "t", [2], None))
    deleted = _stored(storage, 2)[0]
    assert (await _sweep_all(storage))["tombstones"] == 1
    return written, deleted


async def test_a_sweep_keeps_the_newest_swept_version_of_the_incarnation(storage):
    _, deleted = await _deleted_and_swept(storage)
    assert _stored(storage, 2) is None
    assert _horizon(storage) == deleted
    await storage.drop_table("data", "t")
    await storage.create_table("data", "t", "id")
    assert _horizon(storage) == 0, "a horizon of the dropped incarnation applied"
    assert storage.databases["data"].swept_horizons() == {}


async def test_a_copy_does_not_bring_back_a_row_deleted_here(storage):
    """Row 2, this node's, comes back in a peer's copy: refused, and deleted again (the
    peer holds it still). A row of the peer's own and one of this node's written after
    the horizon land."""
    written, _ = await _deleted_and_swept(storage)
    later = storage.hlc.now()
    head = storage.databases["data"].head_seq
    own = {1: "node-a", 2: "node-b"}
    rows = [(encode_id(2), codec.pack([written, 1, {"id": 2}])),
            (encode_id(7), codec.pack([written, 2, {"id": 7}])),
            (encode_id(8), codec.pack([later, 1, {"id": 8}]))]
    landed = await storage.write(apply_rows_job(storage, "data", "node-b", "t", rows, own,
                                                {"seq": 0}))
    assert landed == 2
    _deleted_again(storage, written, [2], head)
    assert _stored(storage, 7) is not None and _stored(storage, 8) is not None
    # Sent again: the tombstone wins, nothing more is logged.
    head = storage.databases["data"].head_seq
    await storage.write(apply_rows_job(storage, "data", "node-b", "t", rows[:1], own,
                                       {"seq": 0}))
    assert storage.databases["data"].head_seq == head
    # All new to this node (its bulk path) and the deleted ones among them: refused.
    await storage.write(writes.delete_records(storage, "data", "t", [1, 3], None))
    await _sweep_all(storage)
    head = storage.databases["data"].head_seq
    rows = [(encode_id(i), codec.pack([written, 1, {"id": i}])) for i in (1, 3)]
    assert await storage.write(apply_rows_job(storage, "data", "node-b", "t", rows, own,
                                              {"seq": 0})) == 0
    _deleted_again(storage, written, [1, 3], head)


async def test_a_sweep_deletes_only_the_publishers_old_rows_missing_from_its_copy(storage):
    """Rows of node-b's origin held here, in a copied range, not sent, older than its
    horizon: deleted with a tombstone of this node's one tick after them, logged in a
    new entry of this node's. node-b's rows that were sent, newer than the horizon,
    outside the range, and rows of other origins stay."""
    await storage.create_table("data", "t", "id")
    db = storage.databases["data"]
    table = db.tables["t"]
    old = storage.hlc.now()
    origins = {1: "node-b", 2: "node-c"}
    rows = [(encode_id(i), codec.pack([old, 1, {"id": i}])) for i in (1, 2, 3, 4, 9)]
    rows.insert(2, (encode_id(5), codec.pack([old, 2, {"id": 5}])))
    rows.sort()
    await storage.write(apply_rows_job(storage, "data", "node-c", "t", rows, origins,
                                       {"seq": 0}))
    newer = storage.hlc.now()
    await storage.write(apply_rows_job(storage, "data", "node-c", "t",
                                       [(encode_id(6), codec.pack([newer + 5, 1, {"id": 6}]))],
                                       origins, {"seq": 0}))
    head = db.head_seq
    sweep = horizon.Sweep("t", table.version, newer, None, encode_id(8),
                          frozenset({encode_id(1)}))

    def job(ctx: WriteContext) -> int:
        return apply_sweeps(storage, ctx, db, "node-b", [sweep])

    assert await storage.write(job) == 3
    _deleted_again(storage, old, [2, 3, 4], head)
    for rid in (1, 5, 6, 9):
        assert (_stored(storage, rid) or [0, 0, None])[2] is not None, rid
    # Another incarnation's sweep, or one of this node's own origin, deletes nothing.
    stale = horizon.Sweep("t", table.version + 1, newer, None, None)

    def other(ctx: WriteContext) -> int:
        return (apply_sweeps(storage, ctx, db, "node-b", [stale])
                + apply_sweeps(storage, ctx, db, db.origin_names[LOCAL_ORIGIN], [sweep]))

    assert await storage.write(other) == 0


async def test_a_repair_does_not_bring_back_a_row_deleted_here(storage):
    """A peer's verify_repair pushes row 2, this node's, deleted here and swept: it is
    refused; a row of the peer's own is stored."""
    from harpsync.storage import compare

    written, _ = await _deleted_and_swept(storage)
    incarnation = storage.databases["data"].tables["t"].version
    rows = [(encode_id(2), [b"\x00" * 8, written, "node-a", False, {"id": 2}]),
            (encode_id(7), [b"\x00" * 8, written, "node-b", False, {"id": 7}])]
    dry = await storage.write(compare.repair_job(storage, "data", "t", incarnation, rows,
                                                 dry_run=True))
    assert dry["refused"] == [2] and _stored(storage, 2) is None
    head = storage.databases["data"].head_seq
    out = await storage.write(compare.repair_job(storage, "data", "t", incarnation, rows))
    assert out["refused"] == [2] and out["changed"] == [7]
    _deleted_again(storage, written, [2], head)
    assert _stored(storage, 7) is not None
