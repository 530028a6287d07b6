"""Tombstones and subscription changes: a delete made while a peer did not take the
table still reaches it once it takes the table again, after retention."""

from __future__ import annotations

import calendar
import shutil
import time
from typing import Any

import pytest

from harpsync.replication import maintenance
from tests.helpers import wait_for
from tests.lifecycle_util import log_head, log_pruned_through
from tests.repl_util import by_id, join, stays, wait_linked

SHORT_RETENTION = {"LOGGING_AUDITRETENTION": "1s", "REPLICATION_RETENTIONINTERVAL": "200ms"}


def _tombstones(node: Any, table: str) -> int:
    db = node.node.storage.databases["data"]
    with db.env.begin() as txn:
        return int(txn.stat(db.tables[table].tomb_dbi)["entries"])


def _subs(*tables: str) -> list[dict[str, Any]]:
    return [{"database": "data", "table": t, "subscribe": True, "publish": True}
            for t in tables]


@pytest.mark.timeout(90)
def test_a_delete_made_while_a_peer_took_no_rows_of_the_table_reaches_it_after_widening(
        node_factory, monkeypatch):
    """node-b stops taking t2 from node-a; node-a deletes a t2 row and retention runs;
    node-b takes t2 again: the row is gone on node-b too. Before, node-b's narrowed link
    acknowledged past the delete, node-a pruned its tombstone, and node-b's re-copy of
    t2 (rows only node-a still holds) left node-b's copy of the row in place for good."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t2", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: b.count("t2") == 2, timeout=15, message="t2 rows on node-b")

    b.call("set_node_replication", hostname=a.name, subscriptions=_subs("t1"))
    a.call("delete", table="t2", ids=[2])
    assert _tombstones(a, "t2") == 1
    # A t1 delete after it: once its tombstone is pruned, node-b acknowledged past both
    # deletes and retention swept the tombstones with that acknowledgement.
    a.call("insert", table="t1", records=[{"id": 1}])
    a.call("delete", table="t1", ids=[1])
    a.call("insert", table="t1", records=[{"id": 9}])
    wait_for(lambda: _tombstones(a, "t1") == 0, timeout=20,
             message="node-a's t1 tombstone pruned")
    assert _tombstones(a, "t2") == 1, "node-a pruned a tombstone node-b never received"

    b.call("set_node_replication", hostname=a.name, subscriptions=_subs("t1", "t2"))
    a.call("insert", table="t2", records=[{"id": 3}])
    wait_for(lambda: by_id(b, "t2", 3) is not None, timeout=15, message="t2 flowing again")
    assert by_id(a, "t2", 2) is None
    assert by_id(b, "t2", 2) is None, "the delete made while node-b did not take t2 was lost"


@pytest.mark.timeout(90)
def test_a_delete_made_while_a_peer_did_not_replicate_reaches_it_once_it_does_again(
        node_factory, monkeypatch):
    """node-b is set not to replicate with node-a; node-a deletes a row and retention
    runs; node-b replicates again: the row stays deleted on both nodes."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t2", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: b.count("t2") == 2, timeout=15, message="t2 rows on node-b")

    b.call("set_node_replication", hostname=a.name, replicates=False)
    a.call("delete", table="t2", ids=[2])
    head = log_head(a)
    # The round that prunes the delete's entry by age sweeps tombstones that old too.
    wait_for(lambda: log_pruned_through(a) >= head, timeout=20,
             message="node-a's log pruned past the delete")
    assert _tombstones(a, "t2") == 1, "node-a pruned a tombstone node-b never received"

    b.call("set_node_replication", hostname=a.name, replicates=True)
    a.call("insert", table="t2", records=[{"id": 3}])
    wait_for(lambda: by_id(b, "t2", 3) is not None, timeout=15, message="t2 flowing again")
    wait_for(lambda: by_id(a, "t2", 1) is not None and by_id(b, "t2", 1) is not None,
             timeout=5, message="row 1 on both")
    assert by_id(a, "t2", 2) is None, "the deleted row came back on node-a"
    assert by_id(b, "t2", 2) is None, "the delete made while node-b did not replicate was lost"


def _delete_while_removed(node_factory: Any, update_on_b: bool = False,
                          restart_a: bool = False) -> tuple[Any, Any]:
    """node-a and node-b hold rows 1 and 2 (node-a's); node-a removes node-b, deletes
    row 2 (node-b may update it afterwards) and prunes its log and the tombstone."""
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: b.count("t") == 2, timeout=15, message="rows on node-b")
    a.call("remove_node", hostname=b.name)
    a.call("delete", table="t", ids=[2])
    if update_on_b:  # after the delete: node-b's write is the newest
        b.call("update", table="t", records=[{"id": 2, "by": "node-b"}])
    head = log_head(a)
    wait_for(lambda: log_pruned_through(a) >= head and _tombstones(a, "t") == 0, timeout=20,
             message="node-a's log and tombstone pruned")
    if restart_a:  # what node-a knows of the swept delete must survive a restart
        a.restart()
    join(b, a)
    a.call("insert", table="t", records=[{"id": 3}])
    wait_for(lambda: by_id(b, "t", 3) is not None, timeout=15, message="flowing again")
    wait_for(lambda: by_id(a, "t", 1) is not None, timeout=5, message="row 1 on node-a")
    return a, b


@pytest.mark.timeout(90)
def test_a_delete_made_while_a_peer_was_removed_survives_its_re_add(node_factory, monkeypatch):
    """node-b is removed; node-a deletes a row, retention prunes the tombstone; node-b is
    added again: the row stays deleted on both. Before, it came back on node-a from
    node-b's copy (own-origin rows node-a no longer holds were taken as new), and node-b
    kept it (a copy never deleted a row only the receiver holds)."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a, b = _delete_while_removed(node_factory)
    assert by_id(a, "t", 2) is None, "the deleted row came back on node-a"
    assert by_id(b, "t", 2) is None, "node-b kept the row node-a deleted"
    stays(lambda: by_id(a, "t", 2) is None and by_id(b, "t", 2) is None, duration=1.0)


@pytest.mark.timeout(120)
def test_a_swept_delete_survives_a_restart_before_the_re_add(node_factory, monkeypatch):
    """As above, with node-a restarted between the prune and the re-add: the horizon
    it keeps of the swept tombstones is stored, not only in memory."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a, b = _delete_while_removed(node_factory, restart_a=True)
    assert by_id(a, "t", 2) is None, "the deleted row came back on node-a"
    assert by_id(b, "t", 2) is None, "node-b kept the row node-a deleted"


@pytest.mark.timeout(90)
def test_a_write_the_removed_peer_made_after_the_delete_wins(node_factory, monkeypatch):
    """node-b updates the row after node-a deleted it (while removed): its newer write
    wins on both nodes, as last-writer-wins says; only rows node-a wrote are judged by
    its horizon. (A guard for the fix: it passed before it too.)"""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a, b = _delete_while_removed(node_factory, update_on_b=True)
    wait_for(lambda: (by_id(a, "t", 2) or {}).get("by") == "node-b", timeout=10,
             message="node-b's update on node-a")
    assert (by_id(b, "t", 2) or {}).get("by") == "node-b"


@pytest.mark.timeout(120)
def test_deletes_across_copy_chunks_and_tables_survive_a_re_add(node_factory, monkeypatch):
    """The deleted rows sit at the edges of the copy's chunks (500 rows each), in a
    table left with no rows and in one left with none deleted: each stays deleted on
    both nodes, and every other row stays on both."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    for table in ("emptied", "t", "untouched"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="emptied", records=[{"id": i} for i in range(1, 4)])
    a.call("insert", table="t", records=[{"id": i} for i in range(1, 1201)])
    a.call("insert", table="untouched", records=[{"id": i} for i in range(1, 4)])
    wait_for(lambda: b.count("t") == 1200 and b.count("untouched") == 3
             and b.count("emptied") == 3, timeout=20, message="rows on node-b")
    a.call("remove_node", hostname=b.name)
    gone = [1, 2, 500, 501, 502, 1000, 1001, 1199, 1200]
    a.call("delete", table="t", ids=gone)
    a.call("delete", table="emptied", ids=[1, 2, 3])
    head = log_head(a)
    wait_for(lambda: log_pruned_through(a) >= head and _tombstones(a, "t") == 0
             and _tombstones(a, "emptied") == 0, timeout=20, message="node-a pruned")
    join(b, a)
    a.call("insert", table="t", records=[{"id": 5000}])
    wait_for(lambda: by_id(b, "t", 5000) is not None, timeout=20, message="flowing again")
    for node in (a, b):
        wait_for(lambda n=node: n.count("t") == 1192, timeout=10,
                 message=f"{node.name} holds the 1,192 rows not deleted")
        assert not [i for i in gone if by_id(node, "t", i) is not None], node.name
        assert node.count("emptied") == 0, node.name
        assert node.count("untouched") == 3, node.name


@pytest.mark.timeout(120)
def test_a_swept_delete_reaches_a_node_that_hears_the_origin_through_the_re_added_peer(
        node_factory, monkeypatch):
    """node-c takes node-a's rows only through node-b (it subscribes to node-b alone, so
    node-a is a gossip-learned node it takes no data from). node-a removes node-b,
    deletes a row and sweeps its tombstone; node-b is added again: the delete node-b
    learns from node-a's copy relays to node-c as well."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    c = node_factory("node-c", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    join(c, b, subscriptions=_subs("t"))
    wait_linked([(c, b), (b, c)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: c.count("t") == 2, timeout=20, message="rows on node-c through node-b")
    a.call("remove_node", hostname=b.name)
    a.call("delete", table="t", ids=[2])
    head = log_head(a)
    wait_for(lambda: log_pruned_through(a) >= head and _tombstones(a, "t") == 0, timeout=20,
             message="node-a's log and tombstone pruned")
    assert by_id(c, "t", 2) is not None  # node-c had no way to hear of the delete
    join(b, a)
    a.call("insert", table="t", records=[{"id": 3}])
    wait_for(lambda: by_id(c, "t", 3) is not None, timeout=20, message="flowing to node-c")
    for node in (a, b, c):
        wait_for(lambda n=node: by_id(n, "t", 2) is None, timeout=10,
                 message=f"row 2 deleted on {node.name}")
        assert by_id(node, "t", 1) is not None, node.name


@pytest.mark.timeout(150)
def test_a_deleted_row_a_third_node_took_back_from_the_re_added_peer_is_deleted_again(
        node_factory, monkeypatch):
    """node-a, node-b, node-c in a full mesh; node-b is removed on node-a and node-c.
    node-a deletes a row; both sweep its tombstone. node-c adds node-b back first and
    takes the row back from its copy (node-c cannot tell it from a row it never had);
    then node-a adds node-b back, refuses the row in node-b's copy and deletes it again,
    so node-c (which hears node-a directly, not through node-b) loses it too."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a, b, c = (node_factory(f"node-{n}", env=SHORT_RETENTION) for n in "abc")
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    join(c, a)
    wait_linked([(x, y) for x in (a, b, c) for y in (a, b, c) if x is not y],
                ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: b.count("t") == 2 and c.count("t") == 2, timeout=20,
             message="rows on node-b and node-c")
    a.call("remove_node", hostname=b.name)
    c.call("remove_node", hostname=b.name)
    a.call("delete", table="t", ids=[2])
    wait_for(lambda: by_id(c, "t", 2) is None, timeout=15, message="the delete on node-c")
    # Later writes each acknowledges: the tombstones are swept with those acknowledgements.
    a.call("insert", table="t", records=[{"id": 5}])
    c.call("insert", table="t", records=[{"id": 6}])
    head = log_head(a)
    wait_for(lambda: log_pruned_through(a) >= head and _tombstones(a, "t") == 0
             and _tombstones(c, "t") == 0, timeout=30,
             message="node-a's log pruned, both tombstones swept")
    assert by_id(b, "t", 2) is not None
    join(b, c)
    c.call("insert", table="t", records=[{"id": 4}])
    wait_for(lambda: by_id(b, "t", 4) is not None, timeout=20, message="node-b and node-c")
    join(b, a)
    a.call("insert", table="t", records=[{"id": 3}])
    wait_for(lambda: by_id(b, "t", 3) is not None, timeout=20, message="node-a and node-b")
    for node in (a, b, c):
        wait_for(lambda n=node: by_id(n, "t", 2) is None, timeout=15,
                 message=f"row 2 deleted on {node.name}")
        wait_for(lambda n=node: n.count("t") == 5, timeout=15,
                 message=f"rows 1, 3, 4, 5 and 6 on {node.name}")


@pytest.mark.timeout(150)
def test_rows_a_restore_lost_are_repaired_not_taken_as_deleted(node_factory, monkeypatch,
                                                               tmp_path):
    """node-a is restored from a backup older than two of its rows (node-b holds them),
    then sweeps the tombstone of a delete made after the restore: its horizon passes the
    lost rows, but they were never deleted. repair_cluster brings them back, as before
    the horizon. Without the cap node-b's resync sets on node-a's horizon, the repair
    refused them and deleted them on node-b too."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=15, message="row 1 on node-b")
    a.stop()
    shutil.copytree(a.root, tmp_path / "backup")
    a.start()
    a.call("insert", table="t", records=[{"id": 20}, {"id": 21}])  # lost by the restore
    wait_for(lambda: b.count("t") == 3, timeout=15, message="the rows node-a loses on node-b")
    b.call("pause_replication", hostname=a.name, database="data")
    a.stop()
    shutil.rmtree(a.root)
    shutil.copytree(tmp_path / "backup", a.root)
    a.start()
    b.call("resume_replication", hostname=a.name, database="data")
    a.call("insert", table="t", records=[{"id": 30}])
    a.call("delete", table="t", ids=[30])
    a.call("insert", table="t", records=[{"id": 31}])
    wait_for(lambda: by_id(b, "t", 31) is not None, timeout=20, message="row 31 on node-b")
    wait_for(lambda: _tombstones(a, "t") == 0, timeout=20,
             message="node-a's tombstone of row 30 swept")
    assert by_id(a, "t", 20) is None and by_id(b, "t", 20) is not None
    a.call("repair_cluster", database="data", table="t")
    wait_for(lambda: a.count("t") == b.count("t") == 4, timeout=20,
             message="rows 1, 20, 21 and 31 on both nodes")


@pytest.mark.timeout(120)
def test_rows_of_a_wiped_node_s_old_self_are_not_taken_as_deleted_by_its_new_self(
        node_factory, monkeypatch):
    """node-b wrote rows 1 and 2, was removed, wiped, and added again with a start_time
    (its copy skips them: node-a alone holds them). The new node-b then sweeps a
    tombstone newer than them: it never held them, so it never deleted them, and
    repair_cluster on it must not delete them on node-a. Before, the horizon took every
    row of its name it did not hold as deleted: the repair refused them and deleted
    them on node-a too."""
    monkeypatch.setattr(maintenance, "TOMBSTONE_EVERY", 0.0)
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.call("insert", table="t", records=[{"id": 1}, {"id": 2}])
    wait_for(lambda: a.count("t") == 2, timeout=15, message="node-b's rows on node-a")
    a.call("remove_node", hostname=b.name)
    b.stop()
    shutil.rmtree(b.root)
    b.start()
    start = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 1))
    wait_for(lambda: time.time() > calendar.timegm(time.strptime(
        start, "%Y-%m-%dT%H:%M:%S.000Z")), timeout=5, message="past the start_time")
    join(b, a, start_time=start)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.call("insert", table="t", records=[{"id": 10}])
    wait_for(lambda: by_id(a, "t", 10) is not None, timeout=15, message="row 10 on node-a")
    assert by_id(b, "t", 1) is None, "the start_time should have kept row 1 off node-b"
    b.call("delete", table="t", ids=[10])
    b.call("insert", table="t", records=[{"id": 11}])
    wait_for(lambda: by_id(a, "t", 11) is not None, timeout=15, message="row 11 on node-a")
    wait_for(lambda: _tombstones(b, "t") == 0, timeout=20,
             message="node-b's tombstone of row 10 swept")
    b.call("repair_cluster", database="data", table="t")
    a.call("insert", table="t", records=[{"id": 12}])
    wait_for(lambda: by_id(b, "t", 12) is not None, timeout=15, message="row 12 on node-b")
    wait_for(lambda: by_id(a, "t", 11) is not None, timeout=5, message="row 11 on node-a")
    stays(lambda: by_id(a, "t", 1) is not None and by_id(a, "t", 2) is not None,
          duration=1.0)
