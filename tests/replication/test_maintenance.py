"""harpsync/replication/maintenance.py: retention from plain values and a real LMDB log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harpsync.replication.maintenance import ack_floor, limited_tables, prune_database
from harpsync.storage import writes
from harpsync.storage.store import Storage

DATA_ONLY_PUBLISH = [{"database": "data", "table": "t", "publish": True, "subscribe": True}]


def test_ack_floor_is_the_slowest_receiving_peer():
    """The floor is the lowest acknowledgement among peers that receive the database,
    0 for one that never acknowledged."""
    rows = {"b": {"name": "b"}, "c": {"name": "c"}, "d": {"name": "d"}}
    assert ack_floor({("b", "data"): 9, ("c", "data"): 4, ("d", "data"): 7}, rows,
                     "data") == 4
    assert ack_floor({("b", "data"): 9}, rows, "data") == 0


def test_ack_floor_ignores_peers_that_do_not_receive_it():
    """A peer this node sends nothing of the database to does not hold pruning back;
    with no receiving peer there is no floor."""
    rows = {"b": {"name": "b", "subscriptions": [
        {"database": "other", "table": "t", "publish": True}]}}
    assert ack_floor({}, rows, "data") is None
    assert ack_floor({}, {}, "data") is None
    assert ack_floor({("b", "other"): 3}, rows, "other") == 3


def test_limited_tables_names_what_explicitly_limited_peers_take():
    """A peer sent some tables of a database names them; one an operator set to take
    none of it names none; a full peer, and a node learned by gossip, limit nothing."""
    rows = {"b": {"name": "b", "subscriptions": DATA_ONLY_PUBLISH},
            "c": {"name": "c", "replicates": False},
            "d": {"name": "d"},
            "e": {"name": "e", "learned": True, "replicates": False, "subscriptions": []}}
    assert sorted(limited_tables(rows, "data")) == [[], ["t"]]
    assert limited_tables({"d": {"name": "d"}}, "data") == []


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = Storage(tmp_path / "db", "node-a", 1 << 26)
    store.open()
    yield store
    store.close()


async def _writes(storage: Storage, count: int) -> None:
    await storage.create_table("data", "t", "id")
    for i in range(count):
        await storage.write(writes.write_records(storage, "data", "t", [{"id": i}],
                                                 "upsert", None))


async def test_prune_keeps_entries_younger_than_retention(storage):
    """Nothing is pruned while every entry is younger than the retention."""
    await _writes(storage, 3)
    db = storage.databases["data"]
    result = await prune_database(storage, db, retention_ms=60_000, acked=None)
    assert result["entries"] == 0 and db.pruned_through() == 0


async def test_prune_removes_entries_older_than_retention(storage):
    """Entries older than the retention go, whatever peers acknowledged."""
    await _writes(storage, 3)
    db = storage.databases["data"]
    head = db.head_seq
    later = storage.hlc.wall_now_ms() + 120_000
    result = await prune_database(storage, db, retention_ms=60_000, acked=0, now_ms=later)
    assert result["entries"] == head and db.pruned_through() == head


async def test_tombstone_of_an_unacknowledged_entry_stays(storage):
    """A delete that reached this node late (another origin's, with a version older than
    the entry every peer acknowledged) is logged after that entry: its tombstone stays
    until the peers acknowledge it, or a peer copied after the prune keeps the row."""
    from harpsync import codec
    from harpsync.replication.linkstore import StorageLinkStore

    await _writes(storage, 1)  # id 0
    db = storage.databases["data"]
    table = db.tables["t"]
    delete_version = storage.hlc.now()  # node-c deletes id 0 now...
    await storage.write(writes.write_records(storage, "data", "t", [{"id": 1}], "upsert",
                                             None))
    acked = db.head_seq  # ...every peer acknowledged this later local write...
    entry = codec.pack([0, delete_version, None, [["t", "delete", 0, None, table.version]]])
    await StorageLinkStore(storage).apply_entries(  # ...and the delete arrives after it
        "data", "node-c", [(1, entry)], {0: "node-c"}, {"seq": 1}, 60_000, "node-a", 0,
        None)
    assert db.tombstone_count(table) == 1
    later = storage.hlc.wall_now_ms() + 120_000
    await prune_database(storage, db, retention_ms=60_000, acked=acked, now_ms=later)
    assert db.tombstone_count(table) == 1


def test_a_subscribe_from_an_older_cursor_lowers_the_peers_acknowledgement(node_factory):
    """The acknowledgement retention trusts is where the peer durably is: a peer that
    comes back from an older cursor (restored from a backup) or asks for a full copy
    holds nothing past that, whatever its previous session acknowledged, so the
    tombstones it lacks must not be pruned on the strength of that old ack."""
    rep = node_factory("node-a").node.cluster
    rep.note_ack("node-b", "data", 9)
    rep.note_position("node-b", "data", 3)  # a subscribe after 3
    assert rep.acks[("node-b", "data")] == 3
    rep.note_ack("node-b", "data", 9)
    rep.note_position("node-b", "data", 0, reset=True)  # a subscribe asking for a copy
    assert rep.acks[("node-b", "data")] == 0
    rep.note_ack("node-b", "data", 12)  # the new session's acks count again
    assert rep.acks[("node-b", "data")] == 12


def test_a_subscribe_from_an_older_cursor_lowers_the_position_barriers_trust(node_factory):
    """``wait_for_replication`` answers from ``positions``: a peer restored from a backup
    (a subscribe from an older cursor) or starting a copy holds nothing past that, so a
    barrier on a version it lost must wait again instead of answering at once."""
    rep = node_factory("node-a").node.cluster
    rep.note_ack("node-b", "data", 9)
    assert rep.positions[("node-b", "data")] == 9
    rep.note_position("node-b", "data", 3)  # a subscribe after 3
    assert rep.positions[("node-b", "data")] == 3
    rep.note_ack("node-b", "data", 9)
    rep.note_position("node-b", "data", 0, reset=True)  # a subscribe asking for a copy
    assert rep.positions[("node-b", "data")] == 0
    rep.note_ack("node-b", "data", 12)
    assert rep.positions[("node-b", "data")] == 12


async def test_pruning_a_database_dropped_meanwhile_prunes_nothing_and_does_not_fail(storage):
    """The retention loop lists the databases, then prunes each: one dropped in between
    (a peer's drop through the system link) prunes nothing and raises nothing. Before,
    reading its closed environment raised ``lmdb.Error`` and the loop logged "pruning
    dbx failed" with a traceback (lifecycle seed 641 with --lifecycle-rounds=3)."""
    await _writes(storage, 3)
    db = storage.databases["data"]
    await storage.drop_database("data")
    later = storage.hlc.wall_now_ms() + 120_000
    result = await prune_database(storage, db, retention_ms=60_000, acked=0, now_ms=later)
    assert result["entries"] == 0 and result["tombstones"] == 0
