"""Widening a subscription brings the newly subscribed table's history, not only new writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, by_id, connection, has_table, join


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


def test_widened_publish_side_sends_rows_written_while_narrowed(node_factory):
    """When node-b stops publishing a table to node-a and later publishes it again, the
    rows node-b wrote meanwhile reach node-a (lifecycle seeds 77 and 88).

    node-a forgets its cursor and re-copies from node-b as soon as it hears of the
    change. node-b used to save its widened row only after node-a's answer, so that
    copy was filtered by the old row, node-a's cursor passed the rows written
    meanwhile, and they never arrived. The answer travels back through a slow proxy
    here, so the copy always wins that race on the old code.

    Pings every 2 s (not the tests' 200 ms), so the injected 500 ms leaves the sockets
    through the proxy up: with 200 ms pings (a 400 ms ping timeout) it timed them out,
    and, before node requests stopped pinging, set_node_replication's request too
    (it failed with 'keepalive ping timeout' now and then under CPU load)."""
    pings = {"REPLICATION_PINGINTERVAL": "2000"}
    a = node_factory("node-a", env=pings)
    b = node_factory("node-b", env=pings)
    a.call("create_table", table="t2", primary_key="id")
    to_a = TcpProxy(a.repl_port)  # node-b reaches node-a only through it
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: has_table(b, "t2"), timeout=15, message="t2 on node-b")
        b.call("set_node_replication", hostname=a.name,
               subscriptions=[{"database": "data", "table": "t2",
                               "subscribe": True, "publish": False}])
        # The change reaches node-a (mirrored: it no longer subscribes to t2 from node-b).
        wait_for(lambda: (connection(a, b.name) or {}).get("subscriptions")
                 == [{"database": "data", "table": "t2", "subscribe": False,
                      "publish": True}], timeout=15, message="node-a to mirror the narrowing")
        b.call("insert", table="t2", records=[{"id": 5, "v": "while narrowed"}])
        to_a.reply_delay = 0.5
        b.call("set_node_replication", hostname=a.name, replicates=True)
        to_a.reply_delay = 0.0
        b.call("insert", table="t2", records=[{"id": 7, "v": "after"}])
        wait_for(lambda: by_id(a, "t2", 7) is not None, timeout=15, message="t2 flowing again")
        assert by_id(a, "t2", 5) is not None
    finally:
        to_a.close()


def test_a_drop_reaches_a_peer_that_does_not_take_the_table(node_factory):
    """Schema is not data: a node learns the tables of a database it links for, also
    those it takes no rows of (from hellos). Their drops and re-creates now reach it
    in the stream too, not only at the next reconnect's hello: before, node-b kept a
    table node-a had dropped for as long as the link stayed up."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a, subscriptions=[{"database": "data", "table": "t2",
                               "subscribe": True, "publish": True}])
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=15,
             message="both tables on node-b")
    a.call("insert", table="t2", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=15, message="t2 flowing")

    a.call("drop_table", table="t1")
    wait_for(lambda: not has_table(b, "t1"), timeout=15, message="the drop on node-b")
    a.call("create_table", table="t1", primary_key="id", attributes=[{"name": "again"}])
    wait_for(lambda: has_table(b, "t1") and {"attribute": "again"} in
             b.call("describe_table", table="t1")["attributes"], timeout=15,
             message="the re-create on node-b")
    a.call("insert", table="t1", records=[{"id": 7}])
    a.call("insert", table="t2", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t2", 2) is not None, timeout=15, message="t2 still flowing")
    assert by_id(b, "t1", 7) is None  # rows of t1 still do not flow


def test_update_node_keeps_a_peer_that_does_not_replicate_so(node_factory):
    """update_node of a peer added with ``replicates: false`` that changes only another
    setting (here its conflict policy) leaves it not replicating: no data link forms."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a, replicates=False)
    wait_for(lambda: has_table(b, "t1"), timeout=15, message="schema through system")
    b.call("update_node", hostname=a.name, conflict="source_wins")
    conn = connection(b, a.name)
    assert conn is not None and conn["replicates"] is False, conn
    assert {s["database"] for s in conn["database_sockets"]} == {"system"}, conn


def test_an_update_keeps_the_start_time_on_the_peer(node_factory):
    """node-b added node-a with a start_time; a later set_node_replication on node-b
    that names no start_time leaves the peer's start_time as it was, so node-a's
    re-copy after the widening still skips node-b's rows from before it."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        b.call("create_table", table=table, primary_key="id")
    b.call("insert", table="t1", records=[{"id": 1, "v": "before start_time"}])
    start = datetime.now(UTC) + timedelta(milliseconds=50)
    wait_for(lambda: datetime.now(UTC) > start + timedelta(milliseconds=20))
    join(b, a, start_time=start.isoformat().replace("+00:00", "Z"),
         subscriptions=[{"database": "data", "table": "t1", "subscribe": True,
                         "publish": True}])
    b.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t1", 2) is not None, timeout=15, message="t1 flowing")
    assert by_id(a, "t1", 1) is None  # before the start_time

    b.call("set_node_replication", hostname=a.name,
           subscriptions=[{"database": "data", "table": "t2", "subscribe": True,
                           "publish": True}])
    assert (connection(a, b.name) or {}).get("subscriptions") is not None
    b.call("insert", table="t1", records=[{"id": 3}])
    wait_for(lambda: by_id(a, "t1", 3) is not None, timeout=15, message="t1 after widening")
    assert by_id(a, "t1", 1) is None, "node-a's re-copy ignored the start_time"


def test_rows_written_while_a_peer_did_not_replicate_arrive_once_it_does_again(node_factory):
    """node-b stops replicating with node-a (``replicates: false``), writes a row, and
    replicates again: the row reaches node-a. Before, node-a's link kept running while
    node-b published nothing to it, its cursor moved past the row, and turning
    replication back on resumed after it."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a)
    wait_for(lambda: has_table(b, "t1"), timeout=15, message="t1 on node-b")
    b.call("insert", table="t1", records=[{"id": 0}])
    wait_for(lambda: by_id(a, "t1", 0) is not None, timeout=15, message="flowing")

    b.call("set_node_replication", hostname=a.name, replicates=False)
    b.call("insert", table="t1", records=[{"id": 1, "v": "while not replicating"}])
    head = b.node.storage.databases["data"].head_seq

    def a_read_past_it() -> bool:
        sock = next((s for s in (connection(a, b.name) or {}).get("database_sockets", [])
                     if s["database"] == "data"), None)
        return sock is None or sock["committed_seq"] >= head

    wait_for(a_read_past_it, timeout=15, message="node-a's link to read node-b's log")
    b.call("set_node_replication", hostname=a.name, replicates=True)
    b.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t1", 2) is not None, timeout=15, message="flowing again")
    assert by_id(a, "t1", 1) is not None, "the row written while not replicating was lost"


def test_both_sides_of_a_subscribed_pair_show_replicates_true(node_factory):
    """A peer added with subscriptions reads ``replicates: true`` in cluster_status on
    both nodes, as in Harper's hdb_nodes rows (the joined node showed ``false`` while
    the subscribed tables flowed both ways)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    subs = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]
    join(b, a, subscriptions=subs)
    for node, peer in ((b, a), (a, b)):
        conn = connection(node, peer.name)
        assert conn is not None and conn["replicates"] is True, (node.name, conn)
        assert [s["table"] for s in conn["subscriptions"]] == ["t1"], (node.name, conn)
    b.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t1", 1) is not None, timeout=15, message="t1 flowing")


def _sub(table: str, subscribe: bool = True, publish: bool = True) -> dict[str, Any]:
    return {"database": "data", "table": table, "subscribe": subscribe, "publish": publish}


def test_configure_cluster_replaces_the_subscriptions_of_a_known_node(node_factory):
    """configure_cluster replaces this node's connections with the listed ones: a known
    node listed with t1 only stops replicating t2, both ways. Before, its subscriptions
    were merged into the row's (as set_node_replication does), so t2, no longer listed,
    went on flowing, and the same list gave a known node other subscriptions than a new
    one."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    entry = {"hostname": b.name, "url": b.repl_url, "verify_tls": False,
             "authorization": CREDS}
    a.call("configure_cluster", connections=[{**entry, "subscriptions": [_sub("t1"),
                                                                         _sub("t2")]}])
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=15,
             message="tables on node-b")
    b.call("insert", table="t2", records=[{"id": 0}])
    wait_for(lambda: by_id(a, "t2", 0) is not None, timeout=15, message="t2 flowing")

    a.call("configure_cluster", connections=[{**entry, "subscriptions": [_sub("t1")]}])
    assert (connection(a, b.name) or {}).get("subscriptions") == [_sub("t1")]
    assert (connection(b, a.name) or {}).get("subscriptions") == [_sub("t1")]
    b.call("insert", table="t2", records=[{"id": 1, "v": "not listed any more"}])
    a.call("insert", table="t2", records=[{"id": 2, "v": "not listed any more"}])
    b.call("insert", table="t1", records=[{"id": 1}])
    a.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t1", 1) is not None and by_id(b, "t1", 2) is not None,
             timeout=15, message="t1 flowing both ways")
    assert by_id(a, "t2", 1) is None, "t2 still flowed from node-b after configure_cluster"
    assert by_id(b, "t2", 2) is None, "t2 still flowed to node-b after configure_cluster"


def test_narrowing_and_publish_flag_changes_catch_up_without_a_full_copy(node_factory):
    """A change that adds nothing to what a side receives (node-b stops publishing t1 to
    node-a; node-b's subscriptions name both tables, node-a's now only t2) keeps the
    cursors: both links subscribe again with the new tables and catch up from where
    they were. Before, any change of the subscriptions forgot the cursors of every
    database on both sides, and each side copied the whole database again."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a)
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=15,
             message="tables on node-b")
    a.call("insert", table="t1", records=[{"id": i} for i in range(50)])
    b.call("insert", table="t2", records=[{"id": i} for i in range(50)])
    wait_for(lambda: by_id(b, "t1", 49) is not None and by_id(a, "t2", 49) is not None,
             timeout=15, message="both ways flowing")
    copies: list[tuple[str, str, str]] = []
    for node in (a, b):
        node.node.cluster.copy_listeners.append(
            lambda peer, db, n=node.name: copies.append((n, peer, db)))

    b.call("set_node_replication", hostname=a.name,
           subscriptions=[_sub("t1", publish=False), _sub("t2")])
    assert (connection(a, b.name) or {}).get("subscriptions") == [
        _sub("t1", subscribe=False), _sub("t2")]
    b.call("insert", table="t1", records=[{"id": 100, "v": "not published to node-a"}])
    a.call("insert", table="t1", records=[{"id": 101}])
    b.call("insert", table="t2", records=[{"id": 102}])
    a.call("insert", table="t2", records=[{"id": 103}])
    wait_for(lambda: by_id(b, "t1", 101) is not None and by_id(a, "t2", 102) is not None
             and by_id(b, "t2", 103) is not None, timeout=15,
             message="the tables still flowing after the change")
    assert by_id(a, "t1", 100) is None, "node-b published t1 to node-a after the change"
    assert copies == [], f"needless full copies: {copies}"


@pytest.mark.timeout(180)
def test_rows_not_published_to_a_peer_learned_by_gossip_arrive_once_they_are(node_factory):
    """node-a is selective (it takes t1 from node-d only one way), so it learns node-b by
    gossip as a peer it sends nothing; node-b learns node-a from node-c, whose row for
    node-a is full, as a peer it takes everything from. node-b's link from node-a then
    streams nothing and its cursor passes node-a's writes. When node-a's operator lets
    node-b replicate, node-b must copy from node-a again although its own row said all
    along that it takes everything. Before, its row did not change, it kept the cursor,
    and the rows node-a wrote meanwhile never reached it."""
    a, b, c, d = (node_factory(f"node-{x}") for x in "abcd")
    a.call("create_table", table="t1", primary_key="id")
    join(a, d, subscriptions=[_sub("t1", publish=False)])  # node-a is selective
    join(c, a)
    join(b, c)
    wait_for(lambda: connection(a, b.name) is not None and connection(b, a.name) is not None,
             timeout=20, message="node-a and node-b to learn each other")
    assert connection(a, b.name)["replicates"] is False  # gossip: nothing to node-b
    assert connection(b, a.name)["subscriptions"] is None  # ... which takes all of node-a
    wait_for(lambda: has_table(b, "t1"), timeout=20, message="t1 on node-b")
    link = b.node.cluster.subscribers
    wait_for(lambda: (a.name, "data") in link and link[(a.name, "data")].streaming,
             timeout=20, message="node-b streaming data from node-a")
    a.call("insert", table="t1", records=[{"id": 1, "v": "not published to node-b yet"}])
    head = a.node.storage.databases["data"].head_seq
    wait_for(lambda: link[(a.name, "data")].committed_seq >= head, timeout=20,
             message="node-b's cursor past node-a's write")
    assert by_id(b, "t1", 1) is None

    a.call("set_node_replication", hostname=b.name, replicates=True)
    a.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="node-a's next row")
    assert by_id(b, "t1", 1) is not None, "the row written while not published was lost"


@pytest.mark.timeout(240)
def test_narrowing_and_widening_again_under_writes_loses_nothing(node_factory):
    """node-b narrows what it takes from node-a (table-level, then publish-only) and
    widens it again (database-level, then table-level) while both nodes keep writing:
    a narrowing keeps the cursor, so each widening must still bring the rows written
    while narrowed, and both nodes end with the same rows."""
    import threading

    import httpx

    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a)
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=15,
             message="tables on node-b")
    stop = threading.Event()
    written = {"n": 0}

    def write(node: Any, table: str, base: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            i = 0
            while not stop.is_set():
                res = client.post(node.url, auth=("admin", "test-password"), json={
                    "operation": "upsert", "database": "data", "table": table,
                    "records": [{"id": base + i}]})
                if res.status_code == 200:
                    i += 1
                    written["n"] += 1

    threads = [threading.Thread(target=write, args=args, daemon=True)
               for args in ((a, "t1", 0), (a, "t2", 0), (b, "t2", 100_000))]
    for thread in threads:
        thread.start()

    def after_more_writes(count: int = 30) -> None:
        target = written["n"] + count
        wait_for(lambda: written["n"] >= target, timeout=30, message="more writes")

    try:
        steps: list[dict[str, Any]] = [
            {"subscriptions": [_sub("t1")]},
            {"replicates": True},
            {"subscriptions": [_sub("t2", subscribe=False)]},
            {"subscriptions": [_sub("t2")]},
        ]
        for step in steps:
            after_more_writes()
            b.call("set_node_replication", hostname=a.name, **step)
        after_more_writes()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    b.call("set_node_replication", hostname=a.name, replicates=True)
    for table in ("t1", "t2"):
        wait_for(lambda t=table: _ids(a, t) == _ids(b, t), timeout=40,
                 message=f"{table} the same on both nodes")


def _ids(node: Any, table: str) -> set[int]:
    from tests.repl_util import all_records

    return {r["id"] for r in all_records(node, table, attributes=["id"])}


@pytest.mark.timeout(120)
def test_a_subscription_change_that_cannot_be_saved_restarts_the_links(
        node_factory, monkeypatch: pytest.MonkeyPatch):
    """set_node_replication on node-a whose save of the new row fails (node-a's system
    commit fails, ``HARPSYNC_FAIL_COMMIT``: node-a runs in this process, node-b does not)
    answers a 507 saying the settings were not saved, and node-a's links from node-b
    run again with the previous settings. Before, they stayed stopped until some later
    reconcile, and node-b's writes stopped arriving."""
    a = node_factory("node-a")
    b = node_factory("node-b", process=True)
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(a, b)
    wait_for(lambda: has_table(b, "t2"), timeout=20, message="node-b learning t2")
    monkeypatch.setenv("HARPSYNC_FAIL_COMMIT", "system")
    failed = a.call("set_node_replication", expect=507, hostname=b.name,
                    subscriptions=[{"database": "data", "table": "t1",
                                    "subscribe": True, "publish": True}])
    monkeypatch.delenv("HARPSYNC_FAIL_COMMIT")
    assert "could not be saved on this node" in failed["error"]
    # node-a's row for node-b is the saved one again (it took everything)
    assert [c["subscriptions"] for c in a.call("cluster_status")["connections"]] == [None]
    b.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t1", 1) is not None, timeout=30,
             message="node-b's row on node-a, its links running again")
