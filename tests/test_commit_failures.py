"""A write whose data environment fails to commit leaves nothing of it in ``system``.

A group commits every data environment first and ``system`` last (``redo``). The commit
of one environment is made to fail as a full disk fails it (``HARPSYNC_FAIL_COMMIT``,
``writer.fault_point``): LMDB's own failures (a full map, a full disk) cannot be aimed
at one environment of several, and ``system`` is the one they hit first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harpsync import codec
from harpsync.errors import StorageError
from harpsync.storage import ingest, reads
from harpsync.storage.database import Database
from harpsync.storage.store import SYSTEM, Storage


def _system_log(storage: Storage) -> list[list[Any]]:
    """The ops of every entry in ``system``'s transaction log, as committed."""
    return [ops for _seq, raw in storage.databases[SYSTEM].log_after(0, 1000)
            for ops in [codec.unpack(raw)[3]]]


def _creates(storage: Storage, name: str) -> list[list[Any]]:
    return [op for ops in _system_log(storage) for op in ops
            if op[1] == "create_database" and op[2] == name]


async def test_a_create_database_whose_commit_fails_logs_no_create(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """A create_database whose new environment fails to commit answers a 507 and leaves
    no ``create_database`` entry in ``system``'s log: before, ``system`` committed the
    entry alone, and peers created a database this node never had."""
    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "dx")
    with pytest.raises(StorageError, match="database 'dx'"):
        await storage.create_database("dx")
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert "dx" not in storage.databases
    assert _creates(storage, "dx") == []
    await storage.create_database("dx")  # a retry logs its one create
    assert len(_creates(storage, "dx")) == 1
    await storage.create_table("dy", "t", "id")  # the log goes on after the gap
    assert len(_creates(storage, "dy")) == 1


async def test_a_peer_s_create_database_whose_commit_fails_leaves_the_cursor_before_it(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """A peer's create_database applied by the system link, whose new environment fails
    to commit, moves neither the link's cursor nor the peer's floor, and logs nothing:
    the link asks for the entry again. Before, ``system`` committed all three, so the
    create was skipped here and relayed on as if applied."""
    system: Database = storage.databases[SYSTEM]
    before = (system.cursor("node-b"), system.committed_hw(["node-b"]), _system_log(storage))
    version = storage.hlc.now()
    entry = (5, codec.pack([0, version, "admin", [[None, "create_database", "dx", None]]]))
    job, prepare = ingest.apply_entries_job(storage, SYSTEM, "node-b", [entry],
                                            {0: "node-b"}, {"seq": 5}, 60_000, "node-a")
    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "dx")
    with pytest.raises(StorageError):
        await storage.write(job, prepare)
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert "dx" not in storage.databases
    assert (system.cursor("node-b"), system.committed_hw(["node-b"]),
            _system_log(storage)) == before
    job, prepare = ingest.apply_entries_job(storage, SYSTEM, "node-b", [entry],
                                            {0: "node-b"}, {"seq": 5}, 60_000, "node-a")
    await storage.write(job, prepare)  # the retry creates it
    assert storage.databases["dx"].created == version
    assert system.cursor("node-b") == {"seq": 5}
    assert len(_creates(storage, "dx")) == 1


async def test_a_failed_create_grouped_with_a_create_that_commits_takes_back_only_its_own(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """Two creates committed in one group, one of whose environments fails: only the
    failed one's entry leaves ``system``'s log; the other's stays and the log goes on."""
    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "dx")
    outcome = await asyncio.gather(storage.create_database("dx"),
                                   storage.create_database("dy"), return_exceptions=True)
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert [type(result).__name__ for result in outcome] == ["StorageError", "NoneType"]
    assert (_creates(storage, "dx"), len(_creates(storage, "dy"))) == ([], 1)
    await storage.create_database("dz")
    assert [op[2] for ops in _system_log(storage) for op in ops] == ["dy", "dz"]


async def test_the_log_tail_reads_every_entry_after_a_taken_back_one(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """Entries that commit after one taken back from ``system``'s log (a gap in its
    sequence) are read from the in-memory log tail a publisher reads: before, the tail
    was indexed as if consecutive, and a reader past the gap skipped the next entry."""
    system: Database = storage.databases[SYSTEM]
    system.commit_listeners.append(lambda _head: None)  # as a publisher: the tail is kept
    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "dx")
    outcome = await asyncio.gather(storage.create_database("da"),
                                   storage.create_database("dx"),
                                   storage.create_database("dy"), return_exceptions=True)
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert [type(result).__name__ for result in outcome] == ["NoneType", "StorageError",
                                                             "NoneType"]
    await storage.create_database("dz")
    stored = system.log_after(0, 1000)
    for index, (seq, _raw) in enumerate(stored):
        _pruned, read = system.read_log(seq, 1000)
        assert read == stored[index + 1:], f"after {seq}"


async def test_a_peer_s_batch_whose_create_fails_in_a_group_that_commits_leaves_nothing(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """A system link's batch (a role, then a create_database whose environment fails to
    commit), grouped with a create that commits: the batch leaves neither its role row,
    nor its cursor, nor its floor, so the link asks for both entries again. Before, its
    entries left ``system``'s log but its role row committed, and its cursor and floor
    moved past it: the row was here, never relayed to this node's other peers."""
    system: Database = storage.databases[SYSTEM]
    role = {"id": "r1", "role": "r1", "permission": {"super_user": True}}
    entries = [(5, codec.pack([0, storage.hlc.now(), "admin",
                               [["hdb_role", "upsert", "r1", role]]])),
               (6, codec.pack([0, storage.hlc.now(), "admin",
                               [[None, "create_database", "dx", None]]]))]
    before = (system.cursor("node-b"), system.committed_hw(["node-b"]))

    def batch() -> Any:
        return ingest.apply_entries_job(storage, SYSTEM, "node-b", entries, {0: "node-b"},
                                        {"seq": 6}, 60_000, "node-a")

    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "dx")
    outcome = await asyncio.gather(storage.write(*batch()), storage.create_database("dy"),
                                   return_exceptions=True)
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert [type(result).__name__ for result in outcome] == ["StorageError", "NoneType"]
    db, table = storage.table(SYSTEM, "hdb_role")
    assert reads.get_by_ids(db, table, ["r1"]) == []
    assert (system.cursor("node-b"), system.committed_hw(["node-b"])) == before
    assert [op[2] for ops in _system_log(storage) for op in ops] == ["dy"]
    await storage.write(*batch())  # the link's next try applies and logs both
    assert reads.get_by_ids(db, table, ["r1"]) == [role]
    assert [op[2] for ops in _system_log(storage) for op in ops] == ["dy", "r1", "dx"]
    assert system.cursor("node-b") == {"seq": 6}
