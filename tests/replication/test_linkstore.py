"""StorageLinkStore (the subscriber's view of storage) over a real Storage."""

from __future__ import annotations

import asyncio

from harpsync import codec
from harpsync.replication.linkstore import StorageLinkStore, held_floors
from harpsync.storage.keys import encode_id
from harpsync.storage.store import Storage
from harpsync.storage.writes import write_records


def test_a_cursor_for_a_dropped_database_is_not_written_and_does_not_fail(
        storage: Storage) -> None:
    """A link still running when its database was dropped (a peer's drop arriving
    through the system link, before the reconcile retires the link) writes no cursor
    and does not fail: before, the lookup raised KeyError and the link logged a
    traceback (lifecycle seed 623 with --lifecycle-rounds=3)."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("dbx", "t", "id")
        await storage.drop_database("dbx")
        assert await store.write_cursor("dbx", "node-b", {"seq": 5}) is None

    asyncio.run(run())
    assert "dbx" not in storage.databases


def test_a_cursor_queued_before_a_drop_stays_out_of_the_recreated_database(
        storage: Storage) -> None:
    """A cursor write of the old incarnation that reaches the writer after the drop and
    a re-create of the database is not written into the new incarnation (its links
    start from an empty cursor: a full copy); before, the job wrote into the dropped
    environment (an LMDB error, in some runs)."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("dbx", "t", "id")
        drop = asyncio.ensure_future(storage.drop_database("dbx"))
        await asyncio.sleep(0)  # the drop's job is queued first
        cursor = asyncio.ensure_future(store.write_cursor("dbx", "node-b", {"seq": 5}))
        await asyncio.sleep(0)
        await drop
        await storage.create_table("dbx", "t", "id")
        await cursor
        assert storage.databases["dbx"].cursor("node-b").get("seq") in (None, 0)

    asyncio.run(run())


def _newest(storage: Storage, database: str = "data") -> tuple[int, int]:
    """``(seq, version)`` of the newest entry of ``database``'s log."""
    db = storage.databases[database]
    seq, raw = db.read_log(db.head_seq - 1, 1)[1][0]
    return seq, int(codec.unpack(raw)[1])


def test_held_floors_are_the_own_entries_through_the_snapshot_and_committed_floors(
        storage: Storage) -> None:
    """What a copy carries of each origin: of this node, its newest entry at or before
    the snapshot (not one written after); of a peer, its committed floor."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        await storage.write(write_records(storage, "data", "dog", [{"id": 1}], "insert", "t"))
        snapshot, own = _newest(storage)
        await storage.write(write_records(storage, "data", "dog", [{"id": 2}], "insert", "t"))
        _, newest_own = _newest(storage)
        peer_version = storage.hlc.now()
        raw = codec.pack([7, peer_version, None, [["dog", "upsert", 3, {"id": 3}]]])
        await store.apply_entries("data", "node-b", [(1, raw)], {7: "node-b"}, {"seq": 1},
                                  60_000, storage.node_name, 0, None)
        db = storage.databases["data"]
        assert await held_floors(db, snapshot) == {"node-a": own, "node-b": peer_version}
        assert (await held_floors(db, 0)).get("node-a") is None
        # A row of this node's name that a copy brought back (an earlier node of the
        # name wrote it, its clock ahead) is logged under its name: not its own write.
        row = (encode_id(7), codec.pack([storage.hlc.now(), 9, {"id": 7}]))
        await store.apply_rows("data", "node-b", "dog", [row], {9: "node-a"}, {"seq": 2}, 0,
                               db.tables["dog"].version, None)
        assert _newest(storage)[1] > newest_own
        assert (await held_floors(db, db.head_seq))["node-a"] == newest_own

    asyncio.run(run())


def test_a_copy_end_raises_floors_and_forgets_the_repeats_below_them(
        storage: Storage) -> None:
    """The floors a copy carried rise with its end (never fall), and versions applied
    without raising a floor (kept as repeats) at or below them are forgotten."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        db = storage.databases["data"]
        relayed = storage.hlc.now()
        raw = codec.pack([7, relayed, None, [["dog", "upsert", 3, {"id": 3}]]])
        # node-c's write relayed by node-b on a link whose floors it holds: a repeat.
        await store.apply_entries("data", "node-b", [(1, raw)], {7: "node-c"}, {"seq": 1},
                                  60_000, storage.node_name, 0, None, frozenset({"node-c"}))
        assert db.repeats.count("node-c") == 1
        assert db.committed_hw(["node-c"]) == {"node-c": None}
        await store.write_cursor("data", "node-b", {"seq": 9}, (),
                                 {"node-c": relayed, "node-d": 40})
        assert db.committed_hw(["node-c", "node-d"]) == {"node-c": relayed, "node-d": 40}
        assert db.repeats.count("node-c") == 0
        await store.write_cursor("data", "node-b", {"seq": 10}, (), {"node-d": 30})
        assert db.committed_hw(["node-d"]) == {"node-d": 40}
        assert db.cursor("node-b")["seq"] == 10

    asyncio.run(run())


def test_rows_relayed_from_a_copy_raise_no_floor(storage: Storage) -> None:
    """A peer logs the rows its full copy landed one entry per chunk and origin,
    stamped with the newest row's version: chunks come in key order, not version order,
    so such an entry is no proof that the origin's older transactions arrived. Before,
    the first chunk raised the floor past the rows of the next, and a link subscribing
    again with that floor (a reconnect between the two) never received them."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        db = storage.databases["data"]
        incarnation = db.tables["dog"].version
        v1, v2, v3, v4 = (storage.hlc.now() for _ in range(4))

        def chunk(rows: list[tuple[int, int]]) -> bytes:
            ops = [["dog", "upsert", rid, {"id": rid}, incarnation, version]
                   for rid, version in rows]
            return codec.pack([5, max(v for _, v in rows), None, ops])

        first, second = chunk([(1, v4), (2, v1)]), chunk([(3, v2), (4, v3)])
        await store.apply_entries("data", "node-b", [(1, first)], {5: "node-c"}, {"seq": 1},
                                  60_000, storage.node_name, 0, None)
        assert store.origin_floors("data", ["node-c"]) == {"node-c": None}
        stats = await store.apply_entries("data", "node-b", [(1, first), (2, second)],
                                          {5: "node-c"}, {"seq": 2}, 60_000,
                                          storage.node_name, 0, None)
        assert stats.entries == 0, "a chunk of copied rows counted as a transaction"
        assert store.origin_floors("data", ["node-c"]) == {"node-c": None}
        # node-c's own transaction of the version the first chunk was stamped with
        # arrives: it counts once. Before, that chunk counted as node-c's transaction,
        # and this one was taken for a repeat of it.
        own = codec.pack([5, v4, None, [["dog", "upsert", 1, {"id": 1}, incarnation]]])
        stats = await store.apply_entries("data", "node-c", [(1, own)], {5: "node-c"},
                                          {"seq": 1}, 60_000, storage.node_name, 0, None)
        assert stats.entries == 1
        assert store.origin_floors("data", ["node-c"]) == {"node-c": v4}

    asyncio.run(run())
