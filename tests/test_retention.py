"""Retention (DESIGN §4): a peer away longer than the log is kept goes to
``resync_required``, is repaired by a full copy, and deletes from the gap still win."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.lifecycle_util import StatusWatcher, db_socket, log_head, log_pruned_through
from tests.repl_util import by_id, insert_batches, join, stays, table_hash, wait_linked

SHORT_RETENTION = {"LOGGING_AUDITRETENTION": "1s", "REPLICATION_RETENTIONINTERVAL": "200ms"}


def _link_state(node: Any, peer: str, database: str = "data") -> str | None:
    sock = db_socket(node.call("cluster_status"), peer, database)
    return None if sock is None else sock.get("state")


def _gap_past_retention(node_factory: Any) -> tuple[Any, Any]:
    """A and B hold ids 1..100; B stops; A deletes 5, updates 6, inserts 101, and its log
    is pruned past those writes. Returns (a, b) with B still stopped."""
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    insert_batches(a, "t", 1, 100, batch=100)
    wait_for(lambda: b.count("t") == 100, timeout=20, message="records 1..100 on B")

    b.stop()
    a.call("delete", table="t", ids=[5])
    a.call("update", table="t", records=[{"id": 6, "v": "changed"}])
    a.call("insert", table="t", records=[{"id": 101, "v": "r101"}])
    gap_head = log_head(a)
    wait_for(lambda: log_pruned_through(a) >= gap_head, timeout=30, interval=0.05,
             message="A's log pruned past the writes made while B was down")
    return a, b


def _assert_resynced(watch: StatusWatcher, b: Any) -> None:
    # The link's last error stays "resync required: ..." until another: the watcher may
    # not have polled B in the moment a small copy took.
    last = (db_socket(b.call("cluster_status"), "node-a", "data") or {}).get("last_error")
    resynced = watch.seen & {"resync_required", "copying"} or any(
        "resync" in e for e in watch.errors) or "resync" in str(last)
    assert resynced, (f"B was never resynced: states {watch.states}, errors {watch.errors}, "
                      f"last error {last!r}")


@pytest.mark.timeout(120)
def test_resync_after_retention_keeps_gap_delete(node_factory):
    """A peer stopped past retention is resynced by a full copy; a delete made during
    the gap stays deleted on both nodes, and the gap's update and insert arrive."""
    a, b = _gap_past_retention(node_factory)
    with StatusWatcher(b, "node-a", "data") as watch:
        b.start()
        wait_for(lambda: by_id(b, "t", 101) is not None, timeout=30,
                 message="the gap's insert to reach B")
        wait_for(lambda: _link_state(b, "node-a") == "streaming", timeout=30,
                 message="B's link from A to stream again")
    _assert_resynced(watch, b)

    a.call("insert", table="t", records=[{"id": 500, "v": "marker"}])
    wait_for(lambda: by_id(b, "t", 500) is not None, timeout=20, message="marker on B")
    wait_for(lambda: _link_state(b, "node-a") == "streaming", timeout=30,
             message="B's link from A streaming after the marker")
    stays(lambda: by_id(b, "t", 5) is None and by_id(a, "t", 5) is None, duration=1.0)
    assert by_id(b, "t", 6)["v"] == "changed"
    assert by_id(b, "t", 101)["v"] == "r101"
    wait_for(lambda: a.count("t") == b.count("t") == 101, timeout=20,
             message="equal counts (100 - 1 + 1 + marker)")
    assert table_hash(a, "t") == table_hash(b, "t")


@pytest.mark.timeout(120)
def test_resync_settles_when_publisher_log_fully_pruned(node_factory):
    """After a resync copy from a peer whose whole log was pruned, the link streams
    and stays streaming instead of copying again and again."""
    a, b = _gap_past_retention(node_factory)
    with StatusWatcher(b, "node-a", "data") as watch:
        b.start()
        wait_for(lambda: by_id(b, "t", 101) is not None and by_id(b, "t", 5) is None,
                 timeout=30, message="B repaired from A")
        wait_for(lambda: _link_state(b, "node-a") == "streaming", timeout=30,
                 message="B's link from A to stream again")
        stays(lambda: _link_state(b, "node-a") == "streaming", duration=1.0)
    _assert_resynced(watch, b)
    assert watch.states.count("copying") <= 1, f"B kept re-copying: states {watch.states}"
