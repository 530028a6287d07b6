"""Widening a subscription brings the newly subscribed table's history, not only new writes."""

from __future__ import annotations

from tests.helpers import wait_for
from tests.repl_util import by_id, join


def test_widened_subscription_copies_existing_rows(node_factory):
    """Rows written to a table before it was subscribed arrive once set_node_replication adds it."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    a.call("insert", table="t2", records=[{"id": 1, "v": "before"}])
    join(b, a, subscriptions=[{"database": "data", "table": "t1",
                               "subscribe": True, "publish": True}])
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=15, message="t1 flowing")
    assert by_id(b, "t2", 1) is None  # not subscribed yet

    b.call("set_node_replication", hostname=a.name,
           subscriptions=[{"database": "data", "table": "t2",
                           "subscribe": True, "publish": True}])
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=15,
             message="t2's earlier row to arrive after widening")
    a.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=15, message="t1 still flowing")


def test_resume_clears_pause_of_a_link_a_narrowing_removed(node_factory):
    """resume_replication for a peer also ends the pause of a database whose link a
    subscription change had removed, so widening again starts that link streaming
    (lifecycle seeds 29 and 4 with 3 rounds: it came back held, paused for good)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a)
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=15, message="t1 flowing")

    b.call("pause_replication", hostname=a.name)  # data and system
    b.call("set_node_replication", hostname=a.name,
           subscriptions=[{"database": "data", "table": "t1",
                           "subscribe": False, "publish": False}])  # no data link now
    b.call("resume_replication", hostname=a.name)
    b.call("set_node_replication", hostname=a.name, replicates=True)
    a.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=15,
             message="the data link to stream again after widening")
