"""Relays and per-peer table subscriptions: a relay that does not carry every table a
node takes from the origin must not raise that node's floor for the origin past
writes it did not carry."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.lifecycle_util import db_socket
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, by_id, has_table, join


def _direct(b: Any, a: Any) -> bool:
    """Whether ``b`` streams ``data`` from ``a`` over its direct link."""
    sock = db_socket(b.call("cluster_status"), a.name, "data")
    return bool(sock and sock["connected"] and sock.get("state") == "streaming")


def _cut(b: Any, a: Any, to_a: TcpProxy) -> None:
    """Wait for ``b``'s direct link from ``a`` (through ``to_a``), then cut it."""
    wait_for(lambda: _direct(b, a), timeout=30, message="b streaming from a")
    to_a.cut()
    wait_for(lambda: not _direct(b, a), timeout=20, message="b's direct link from a down")


T1_ONLY = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]


@contextlib.contextmanager
def _relay_mesh(node_factory: Any, c_from_a: list[dict[str, Any]] | None = None,
                b_from_c: list[dict[str, Any]] | None = None,
                ) -> Iterator[tuple[Any, Any, Any, TcpProxy]]:
    """Nodes a, b, c; a holds t1 and t2; c and b join a (b through a proxy it can cut,
    ``to_a``), and b joins c. ``c_from_a``, ``b_from_c``: those joins' subscriptions."""
    a, b, c = (node_factory(name) for name in ("node-a", "node-b", "node-c"))
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(c, a, **({"subscriptions": c_from_a} if c_from_a else {}))
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        join(b, c, **({"subscriptions": b_from_c} if b_from_c else {}))
        yield a, b, c, to_a
    finally:
        to_a.close()


@pytest.mark.timeout(180)
def test_a_narrower_relay_loses_nothing_of_the_tables_it_does_not_carry(node_factory):
    with _relay_mesh(node_factory, b_from_c=T1_ONLY) as (a, b, c, to_a):
        for node in (b, c):
            wait_for(lambda n=node: has_table(n, "t1") and has_table(n, "t2"), timeout=20,
                     message=f"tables on {node.name}")

        _cut(b, a, to_a)
        a.call("insert", table="t2", records=[{"id": 1, "v": "only direct"}])
        a.call("insert", table="t1", records=[{"id": 1, "v": "relayed"}])
        wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=30,
                 message="the t1 row relayed by c")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="b streaming from a again")
        a.call("insert", table="t1", records=[{"id": 2}])
        wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="a's next row")
        assert by_id(b, "t2", 1) is not None, "the t2 row written while relayed was lost"


@pytest.mark.timeout(180)
def test_a_relay_that_holds_only_some_tables_of_the_origin_does_not_relay_it(node_factory):
    """c takes only t1 from a; b takes everything from both. While b's direct link from
    a is down, c must not relay a's t1 write: b's floor for a would pass a's t2 write,
    which c never had, and the direct link would skip it when it came back."""
    with _relay_mesh(node_factory, c_from_a=T1_ONLY) as (a, b, c, to_a):
        wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
                 message="tables on b")

        _cut(b, a, to_a)
        a.call("insert", table="t2", records=[{"id": 1, "v": "c never has it"}])
        a.call("insert", table="t1", records=[{"id": 1, "v": "c has it"}])
        wait_for(lambda: by_id(c, "t1", 1) is not None, timeout=20, message="t1 on c")

        def relayed_through_c() -> bool:
            # b made c the relay for a, and c's stream to b has gone past a's t1 write.
            relays = b.node.cluster.relays.assignments.get("data", {})
            head = c.node.storage.databases["data"].head_seq
            return bool(relays.get(a.name) == c.name
                        and c.node.storage.databases["data"].sent_to.get(b.name, 0) >= head)

        wait_for(relayed_through_c, timeout=30, message="c relaying a to b")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="b streaming from a again")
        wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20, message="t1 on b")
        wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=20,
                 message="the t2 row written while the direct link was down")


@pytest.mark.timeout(180)
def test_a_relay_never_carries_a_table_the_origin_does_not_publish_to_the_receiver(
        node_factory):
    """a publishes t2 to b, but not t1. While b's direct link from a is down, c relays
    a's writes to b: only those of t2, as a's link would. Before, c relayed every table
    b took from c, so b read a's t1 rows, which a never let it have."""
    with _relay_mesh(node_factory) as (a, b, c, to_a):
        a.call("set_node_replication", hostname=b.name, subscriptions=[
            {"database": "data", "table": "t1", "subscribe": True, "publish": False},
            {"database": "data", "table": "t2", "subscribe": True, "publish": True}])
        wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
                 message="tables on b")
        a.call("insert", table="t2", records=[{"id": 0}])
        wait_for(lambda: by_id(b, "t2", 0) is not None, timeout=20, message="t2 flowing")

        _cut(b, a, to_a)
        a.call("insert", table="t1", records=[{"id": 1, "v": "not for b"}])
        a.call("insert", table="t2", records=[{"id": 1, "v": "for b"}])
        wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=30,
                 message="the t2 row relayed by c")
        assert by_id(c, "t1", 1) is not None
        assert by_id(b, "t1", 1) is None, "c relayed a t1 row a does not publish to b"


@pytest.mark.timeout(180)
def test_a_copy_from_another_peer_leaves_out_what_the_origin_does_not_publish(node_factory):
    """b takes only t2 from a. b's first copy from c carries c's rows of every table,
    and a's rows of t2 only: c holds a's t1 rows, but b does not take those from a."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(c, a)
    a.call("insert", table="t1", records=[{"id": 1, "v": "a's, not for b"}])
    a.call("insert", table="t2", records=[{"id": 1, "v": "a's, for b"}])
    wait_for(lambda: by_id(c, "t1", 1) is not None and by_id(c, "t2", 1) is not None,
             timeout=20, message="a's rows on c")
    c.call("insert", table="t1", records=[{"id": 2, "v": "c's"}])
    join(b, a, subscriptions=[
        {"database": "data", "table": "t1", "subscribe": False, "publish": True},
        {"database": "data", "table": "t2", "subscribe": True, "publish": True}])
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=20, message="t2 from a")
    join(b, c)
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="c's t1 row on b")
    assert by_id(b, "t1", 1) is None, "c handed over a t1 row of a that b does not take"
    # Verifying against c counts a's t1 row as expected, not as a difference, and a
    # repair does not fetch it either.
    wait_for(lambda: _direct(b, c) and _direct(c, b), timeout=20,
             message="b and c done copying from each other")
    checked = {c["node"]: c for c in b.call("verify_cluster", database="data",
                                            table="t1")["checked"]}
    assert checked[c.name]["in_sync"] is True, json.dumps(checked[c.name], default=str)
    b.call("repair_cluster", database="data", table="t1")
    assert by_id(b, "t1", 1) is None, "a repair fetched a t1 row of a that b does not take"
    # Nor does c's repair push it: c does not know b's limits, b refuses such rows.
    c.call("repair_cluster", database="data", table="t1")
    assert by_id(b, "t1", 1) is None, "c's repair pushed a t1 row of a that b does not take"


@pytest.mark.timeout(180)
def test_a_running_relay_takes_up_new_limits_at_once(node_factory):
    """c is already relaying a to b when a stops publishing t1 to b: c's link to b
    subscribes again with the new limit, rather than keeping the old one until it
    happens to reconnect."""
    with _relay_mesh(node_factory) as (a, b, c, to_a):
        wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
                 message="tables on b")
        _cut(b, a, to_a)
        a.call("insert", table="t1", records=[{"id": 1, "v": "relayed while allowed"}])
        wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=30,
                 message="c relaying a's t1 to b")
        # a tells b over its own link to b (a dials b directly): b now takes only t2.
        a.call("set_node_replication", hostname=b.name, subscriptions=[
            {"database": "data", "table": "t1", "subscribe": True, "publish": False},
            {"database": "data", "table": "t2", "subscribe": True, "publish": True}])
        a.call("insert", table="t1", records=[{"id": 2, "v": "not for b any more"}])
        a.call("insert", table="t2", records=[{"id": 2, "v": "for b"}])
        wait_for(lambda: by_id(b, "t2", 2) is not None, timeout=30,
                 message="a's t2 row relayed by c")
        assert by_id(c, "t1", 2) is not None
        assert by_id(b, "t1", 2) is None, "c relayed a t1 row under the old limits"


@pytest.mark.timeout(180)
def test_a_relay_that_narrows_what_it_takes_from_the_origin_while_relaying(node_factory):
    """c relays a to b (b's direct link from a is down) when c's operator narrows c's
    own subscription from a to t1. c then holds a's t1 writes only: b must not let them
    raise its floor for a past a's t2 write, or the direct link, once back, skips it.
    Before, b's link from c kept what c's hello had said (c takes all of a)."""
    from tests.repl_util import connection

    with _relay_mesh(node_factory) as (a, b, c, to_a):
        wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
                 message="tables on b")
        _cut(b, a, to_a)
        a.call("insert", table="t1", records=[{"id": 1}])
        wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=30,
                 message="c relaying a's t1 to b")
        c.call("set_node_replication", hostname=a.name, subscriptions=T1_ONLY)
        assert (connection(a, c.name) or {}).get("subscriptions") is not None
        wait_for(lambda: _direct(c, a), timeout=30, message="c streaming from a again")
        a.call("insert", table="t2", records=[{"id": 2, "v": "c does not take it"}])
        a.call("insert", table="t1", records=[{"id": 3, "v": "c relays it"}])
        wait_for(lambda: by_id(b, "t1", 3) is not None, timeout=30,
                 message="a's t1 row relayed by c")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="b streaming from a again")
        a.call("insert", table="t1", records=[{"id": 4}])
        wait_for(lambda: by_id(b, "t1", 4) is not None, timeout=20, message="a's next row")
        assert by_id(b, "t2", 2) is not None, "the t2 row written while relayed was lost"


@pytest.mark.timeout(180)
def test_a_peer_set_not_to_replicate_is_not_relayed_either(cluster):
    """b sets a to ``replicates: false``: a's writes reach c but not b, neither directly
    nor relayed by c (as with subscriptions that take nothing from a)."""
    from tests.repl_util import stays

    a, b, c = cluster(3)
    a.call("create_table", table="t1", primary_key="id")
    for node in (b, c):
        wait_for(lambda n=node: has_table(n, "t1"), timeout=20, message="t1 everywhere")
    b.call("set_node_replication", hostname=a.name, replicates=False)
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(c, "t1", 1) is not None, timeout=20, message="a's row on c")
    stays(lambda: by_id(b, "t1", 1) is None, duration=2.0)


@pytest.mark.timeout(180)
def test_a_relay_that_publishes_less_than_its_peer_takes_raises_no_floor(node_factory):
    """node-c is selective (it takes t1 from node-d only one way), so it learned node-b
    by gossip as a peer it publishes nothing to, while node-b learned node-c from
    node-a as a peer it takes everything from. With node-b's direct link from node-a
    down, node-c relays node-a to node-b: only node-a's table creates pass its filter.
    They must not raise node-b's floor for node-a past node-a's row node-c withheld.
    Before, node-c's hello said it takes all of node-a, the create raised the floor,
    and node-b's direct link, once back, skipped the row for good."""
    from tests.repl_util import connection

    a, b, c, d = (node_factory(f"node-{x}") for x in "abcd")
    a.call("create_table", table="t1", primary_key="id")
    join(c, d, subscriptions=[{"database": "data", "table": "t1", "subscribe": True,
                               "publish": False}])  # node-c is selective
    join(a, c)
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: connection(b, c.name) is not None
                 and connection(c, b.name) is not None, timeout=20,
                 message="node-b and node-c to learn each other")
        assert connection(b, c.name)["subscriptions"] is None
        assert connection(c, b.name)["replicates"] is False
        wait_for(lambda: has_table(b, "t1") and has_table(c, "t1"), timeout=20,
                 message="t1 on node-b and node-c")
        links = b.node.cluster.subscribers
        wait_for(lambda: (c.name, "data") in links and links[(c.name, "data")].streaming,
                 timeout=20, message="node-b streaming data from node-c")
        _cut(b, a, to_a)
        wait_for(lambda: b.node.cluster.relays.assignments.get("data", {}).get(a.name)
                 == c.name, timeout=20, message="node-c relaying node-a to node-b")
        a.call("insert", table="t1", records=[{"id": 1, "v": "node-c withholds it"}])
        a.call("create_table", table="t9", primary_key="id")
        wait_for(lambda: has_table(b, "t9"), timeout=20, message="the create relayed")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="node-b streaming from node-a")
        a.call("insert", table="t1", records=[{"id": 2}])
        wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="node-a's next row")
        assert by_id(b, "t1", 1) is not None, "the row written while relayed was lost"
    finally:
        to_a.close()


@pytest.mark.timeout(180)
def test_a_relay_set_not_to_replicate_with_the_origin_raises_no_floor(node_factory):
    """node-c is set not to replicate with node-a; node-b takes everything from both.
    With node-b's direct link from node-a down, node-c (the relay) holds none of
    node-a's rows, only the tables it learns from node-a's hellos, logged as node-a's.
    Relayed, such a create must not raise node-b's floor for node-a past node-a's row.
    Before, node-c's hello did not name node-a in relay_tables (as if it took all of
    it), and node-b's direct link, once back, skipped the row for good."""
    a, b, c = (node_factory(f"node-{x}") for x in "abc")
    a.call("create_table", table="t1", primary_key="id")
    join(c, a, replicates=False)
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        join(b, c)
        wait_for(lambda: has_table(b, "t1") and has_table(c, "t1"), timeout=20,
                 message="t1 on node-b and node-c")
        a.call("insert", table="t1", records=[{"id": 0}])
        wait_for(lambda: by_id(b, "t1", 0) is not None, timeout=20, message="t1 flowing")
        _cut(b, a, to_a)
        wait_for(lambda: b.node.cluster.relays.assignments.get("data", {}).get(a.name)
                 == c.name, timeout=20, message="node-c relaying node-a to node-b")
        a.call("insert", table="t1", records=[{"id": 1, "v": "node-c never has it"}])
        a.call("create_table", table="t9", primary_key="id")
        # node-c's system link says hello again: it learns t9 (as node-a's) from it.
        c.call("pause_replication", hostname=a.name, database="system")
        c.call("resume_replication", hostname=a.name, database="system")
        wait_for(lambda: has_table(b, "t9"), timeout=20, message="t9 relayed to node-b")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="node-b streaming from node-a")
        a.call("insert", table="t1", records=[{"id": 2}])
        wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="node-a's next row")
        assert by_id(b, "t1", 1) is not None, "the row written while relayed was lost"
    finally:
        to_a.close()


@pytest.mark.timeout(180)
def test_a_relay_paused_from_the_origin_raises_no_floor_with_a_table_create(node_factory):
    """node-c takes everything from node-a but has paused its data link from it; its
    system link says hello again and node-c learns node-a's new table t9 from it,
    logged as node-a's, without node-a's row written before it. Relayed to node-b
    (whose direct link from node-a is down), that create must not raise node-b's floor
    for node-a past the row. Before, node-b's direct link, once back, skipped the row
    for good."""
    a, b, c = (node_factory(f"node-{x}") for x in "abc")
    a.call("create_table", table="t1", primary_key="id")
    join(c, a)
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        join(b, c)
        wait_for(lambda: has_table(b, "t1") and has_table(c, "t1"), timeout=20,
                 message="t1 on node-b and node-c")
        a.call("insert", table="t1", records=[{"id": 0}])
        wait_for(lambda: by_id(b, "t1", 0) is not None and by_id(c, "t1", 0) is not None,
                 timeout=20, message="t1 flowing")
        c.call("pause_replication", hostname=a.name, database="data")
        _cut(b, a, to_a)
        wait_for(lambda: b.node.cluster.relays.assignments.get("data", {}).get(a.name)
                 == c.name, timeout=20, message="node-c relaying node-a to node-b")
        a.call("insert", table="t1", records=[{"id": 1, "v": "node-c does not have it"}])
        a.call("create_table", table="t9", primary_key="id")
        c.call("pause_replication", hostname=a.name, database="system")
        c.call("resume_replication", hostname=a.name, database="system")
        wait_for(lambda: has_table(b, "t9"), timeout=20, message="t9 relayed to node-b")
        to_a.heal()
        wait_for(lambda: _direct(b, a), timeout=30, message="node-b streaming from node-a")
        a.call("insert", table="t1", records=[{"id": 2}])
        wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="node-a's next row")
        assert by_id(b, "t1", 1) is not None, "the row written while relayed was lost"
    finally:
        to_a.close()
