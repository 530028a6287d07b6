"""Lifecycle (issue 7, items 1, 8 and 9): restarts after the whole log was pruned, the
clock-skew rule, and reads of the log that a concurrent prune cannot split."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import pytest

from tests.helpers import ADMIN, wait_for
from tests.lifecycle_util import db_socket, log_head, log_pruned_through
from tests.repl_util import by_id, join, wait_linked

SHORT_RETENTION = {"LOGGING_AUDITRETENTION": "1s", "REPLICATION_RETENTIONINTERVAL": "200ms"}
HOUR_MS = 3_600_000


def _socket(node: Any, peer: str, database: str = "data") -> dict[str, Any] | None:
    return db_socket(node.call("cluster_status"), peer, database)


@pytest.mark.timeout(120)
def test_restart_after_the_whole_log_was_pruned_keeps_replicating(node_factory):
    """A node idle past retention (its whole log pruned) restarts; its new writes, and
    new users in ``system``, still reach the peer that read everything before."""
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": i} for i in range(1, 21)])
    wait_for(lambda: b.count("t") == 20, timeout=20, message="20 records on B")
    for database in ("data", "system"):
        head = log_head(a, database)
        wait_for(lambda d=database, h=head: log_pruned_through(a, d) >= h, timeout=30,
                 message=f"A's whole {database} log pruned")
    before = log_head(a)
    a.restart()
    assert log_head(a) == before  # the head survives the restart
    a.call("insert", table="t", records=[{"id": 100, "v": "after restart"}])
    a.call("add_user", role="super_user", username="late", password="pw-late", active=True)
    wait_for(lambda: by_id(b, "t", 100) is not None, timeout=20,
             message="a write made after the restart to reach B")
    wait_for(lambda: any(u["username"] == "late" for u in b.call("list_users")),
             timeout=20, message="a user added after the restart to reach B")


@pytest.mark.timeout(120)
def test_versions_beyond_the_skew_bound_are_held_back_not_applied(node_factory):
    """A peer whose clock is an hour ahead: its write is held back with a clock_skew
    error and this node's clock does not jump; once the bound allows it, it applies."""
    a = node_factory("node-a", env={"HARPSYNC_CLOCK_OFFSET_MS": str(HOUR_MS)})
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: b.post({"operation": "describe_table", "database": "data",
                             "table": "t"}).status_code == 200, timeout=20,
             message="table t on B")
    a.call("insert", table="t", records=[{"id": 1, "v": "from the future"}])

    def skew_reported() -> bool:
        sock = _socket(b, "node-a")
        return bool(sock and "clock skew" in str(sock.get("last_error")))

    wait_for(skew_reported, timeout=20, message="B to report clock skew on its link from A")
    assert by_id(b, "t", 1) is None
    b.call("insert", table="t", records=[{"id": 2}])
    written = by_id(b, "t", 2)
    assert written is not None
    assert written["__updatedtime__"] < time.time() * 1000 + HOUR_MS / 2, \
        "B's clock jumped to A's future"
    metrics = b.client.get(b.url.rstrip("/") + "/metrics", auth=ADMIN).text
    assert "clock_skew" in metrics

    b.stop()
    b.extra_env["REPLICATION_MAXCLOCKSKEW"] = str(2 * HOUR_MS)
    b.start()
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=20,
             message="the held-back write to apply once the bound allows it")


def test_read_log_never_splits_across_a_prune(tmp_path):
    """``read_log`` returns ``pruned_through`` and entries of one snapshot: while a
    prune runs, entries never start past ``pruned_through + 1`` from a cursor before it."""
    from harpsync.storage import retention, writes
    from harpsync.storage.store import Storage

    storage = Storage(tmp_path, "node-a", map_size=1 << 28)
    storage.open()
    try:
        storage.writer.run_sync(*storage._create_table_job("system", "t", "id", []))
        for start in range(0, 2000, 50):
            storage.writer.run_sync(writes.write_records(
                storage, "system", "t", [{"id": i} for i in range(start, start + 50)],
                "insert", None))
        db = storage.databases["system"]
        head = db.head_seq
        stop = threading.Event()
        bad: list[tuple[int, int]] = []

        def reader() -> None:
            while not stop.is_set():
                pruned, entries = db.read_log(0, 5)
                if entries and entries[0][0] != pruned + 1:
                    bad.append((pruned, entries[0][0]))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for through in range(1, head + 1):
                storage.writer.run_sync(retention.prune_log_job(db, through, None))
        finally:
            stop.set()
            thread.join()
        assert not bad, f"entries began past pruned_through + 1: {bad[:3]}"
    finally:
        storage.close()


def test_a_failed_job_leaves_no_gap_in_the_log(tmp_path):
    """A job that appended a log entry and then failed gives its sequence back."""
    from harpsync.storage.store import Storage

    storage = Storage(tmp_path, "node-a", map_size=1 << 28)
    storage.open()
    try:
        db = storage.databases["system"]
        before = db.next_seq

        def failing(ctx: Any) -> None:
            storage.append_log(ctx, db, [["hdb_role", "upsert", "x", {"id": "x"}]], 1)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            storage.writer.run_sync(failing)
        assert db.next_seq == before
        seq = storage.writer.run_sync(
            lambda ctx: storage.append_log(ctx, db, [["hdb_role", "upsert", "y", None]], 2))
        assert seq == before
    finally:
        storage.close()


@pytest.mark.timeout(60)
def test_publisher_of_a_dropped_database_closes_its_socket(node_factory):
    """A database dropped on the publisher ends the peer's stream of it (the peer, whose
    system link is paused, does not know of the drop) instead of leaving it silent."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_database", database="x")
    a.call("create_table", database="x", table="t", primary_key="id")
    join(a, b)
    wait_linked([(b, a)], ("system", "x"))
    b.call("pause_replication", hostname="node-a", database="system")
    a.call("drop_database", database="x")

    def stream_ended() -> bool:
        sock = _socket(b, "node-a", "x")
        return sock is not None and not sock["connected"] and bool(sock.get("last_error"))

    wait_for(stream_ended, timeout=20, message="B's stream of the dropped database to end")
    sock = _socket(b, "node-a", "x")
    assert sock is not None
    assert "x" in str(sock["last_error"])


@pytest.mark.timeout(180)
def test_a_node_restored_from_a_backup_reaches_its_peers_again(node_factory, tmp_path):
    """A is restored from a backup older than what B applied, then written to past B's
    cursor before B reconnects. B must copy again (its cursor names entries of the old
    history), not skip A's new entries; verify then shows what A lost, and repair
    brings it back from B."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))

    def insert(lo: int, hi: int) -> None:
        for i in range(lo, hi):  # one transaction each: the log grows by one per row
            a.call("insert", table="t", records=[{"id": i}])

    insert(0, 20)
    wait_for(lambda: b.count("t") == 20, timeout=20, message="B holding the first rows")
    a.stop()
    shutil.copytree(a.root, tmp_path / "backup")
    a.start()
    insert(20, 40)  # lost by the restore below; B holds them
    wait_for(lambda: b.count("t") == 40, timeout=20, message="B holding the rows A loses")
    b.call("pause_replication", hostname=a.name, database="data")
    a.stop()
    shutil.rmtree(a.root)
    shutil.copytree(tmp_path / "backup", a.root)
    a.start()
    insert(100, 130)  # A's log passes B's cursor again, with other entries
    b.call("resume_replication", hostname=a.name, database="data")
    wait_for(lambda: all(by_id(b, "t", i) is not None for i in range(100, 130)),
             timeout=60, message="every row A wrote after the restore on B")

    checked = a.call("verify_cluster", database="data", table="t")
    assert checked["in_sync"] is False
    assert {k["id"] for c in checked["checked"] for k in c["keys"]} == set(range(20, 40))
    a.call("repair_cluster", database="data", table="t")
    wait_for(lambda: a.count("t") == b.count("t") == 70, timeout=30,
             message="A holding its lost rows again")


def test_writes_after_a_restart_with_the_clock_set_back_reach_the_peer(node_factory):
    """A restarts with its clock 5 minutes behind the versions it issued before (beyond
    the skew bound): its new writes must still rank after its old ones, or B, which
    holds the old ones, filters the new ones out as already held."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": i} for i in range(5)])
    wait_for(lambda: b.count("t") == 5, timeout=20, message="B holding the first rows")
    a.stop()
    a.extra_env["HARPSYNC_CLOCK_OFFSET_MS"] = "-300000"
    a.start()
    a.call("insert", table="t", records=[{"id": 5}])
    a.call("update", table="t", records=[{"id": 0, "late": True}])
    wait_for(lambda: by_id(b, "t", 5) is not None, timeout=20, message="the new row on B")
    wait_for(lambda: (by_id(b, "t", 0) or {}).get("late") is True, timeout=20,
             message="the update on B")
    assert "s behind versions this node issued before" in a.log_path.read_text()
