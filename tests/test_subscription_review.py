"""Adversarial scenarios of table-level subscriptions with real nodes: widening,
narrowing and re-widening under deletes, a table dropped and re-created while a peer
takes only that table, and publish/subscribe flags flipped."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.repl_util import all_records, by_id, has_table, join, stays


def _sub(table: str, subscribe: bool = True, publish: bool = True) -> dict[str, Any]:
    return {"database": "data", "table": table, "subscribe": subscribe, "publish": publish}


def _rows(node: Any, table: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("__")}
            for r in all_records(node, table)]


@pytest.mark.timeout(180)
def test_widen_narrow_and_widen_again_brings_every_row_and_delete(node_factory):
    """b takes t1 only from a. Widened to t2, b gets all of t2 as a holds it (rows
    written, updated and deleted before). Narrowed from t1, b stops getting t1 and t2
    keeps flowing. Widened to t1 again, b's t1 equals a's: the rows a deleted and
    updated while b did not take t1 too."""
    a, b = node_factory("node-a"), node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a, subscriptions=[_sub("t1")])
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
             message="tables on b")
    a.call("insert", table="t1", records=[{"id": i, "v": "first"} for i in range(10)])
    a.call("insert", table="t2", records=[{"id": i, "v": "first"} for i in range(20)])
    a.call("delete", table="t2", ids=[0, 1])
    a.call("update", table="t2", records=[{"id": 2, "v": "updated"}])
    wait_for(lambda: len(_rows(b, "t1")) == 10, timeout=20, message="t1 on b")
    assert _rows(b, "t2") == []

    b.call("set_node_replication", hostname=a.name, subscriptions=[_sub("t2")])
    wait_for(lambda: _rows(b, "t2") == _rows(a, "t2"), timeout=30,
             message="t2 on b as a holds it")

    b.call("set_node_replication", hostname=a.name,
           subscriptions=[_sub("t1", subscribe=False)])
    a.call("insert", table="t1", records=[{"id": 100, "v": "not for b"}])
    a.call("insert", table="t2", records=[{"id": 100, "v": "for b"}])
    wait_for(lambda: by_id(b, "t2", 100) is not None, timeout=20, message="t2 still flowing")
    stays(lambda: by_id(b, "t1", 100) is None, duration=1.0)

    a.call("delete", table="t1", ids=[0, 1, 2])
    a.call("update", table="t1", records=[{"id": 3, "v": "updated while narrowed"}])
    b.call("set_node_replication", hostname=a.name, subscriptions=[_sub("t1")])
    wait_for(lambda: _rows(b, "t1") == _rows(a, "t1"), timeout=30,
             message="t1 on b as a holds it, deletes included")
    assert _rows(b, "t2") == _rows(a, "t2")


@pytest.mark.timeout(180)
def test_a_table_dropped_and_re_created_reaches_a_peer_that_takes_only_it(node_factory):
    """b takes only t1 from a. a drops t1 and creates it again with other rows: b ends
    with the new table's rows only, and rows written after flow."""
    a, b = node_factory("node-a"), node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a, subscriptions=[_sub("t1")])
    a.call("insert", table="t1", records=[{"id": i, "v": "old"} for i in range(5)])
    wait_for(lambda: len(_rows(b, "t1")) == 5, timeout=20, message="old t1 on b")

    a.call("drop_table", table="t1")
    a.call("create_table", table="t1", primary_key="id")
    a.call("insert", table="t1", records=[{"id": 10, "v": "new"}])
    wait_for(lambda: _rows(b, "t1") == [{"id": 10, "v": "new"}], timeout=30,
             message="only the new t1's rows on b")
    a.call("insert", table="t1", records=[{"id": 11, "v": "new"}])
    wait_for(lambda: by_id(b, "t1", 11) is not None, timeout=20, message="new writes")
    assert _rows(b, "t1") == _rows(a, "t1")


@pytest.mark.timeout(180)
def test_flipping_subscribe_and_publish_flags_loses_nothing_and_leaks_nothing(node_factory):
    """b's row for a: t1 publish-only, then subscribe too, then subscribe-only, then
    both again. Whatever a side does not take while a flag is off, it gets once the
    flag is back; while off, nothing of it arrives."""
    a, b = node_factory("node-a"), node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a, subscriptions=[_sub("t1", subscribe=False)])
    wait_for(lambda: has_table(b, "t1"), timeout=20, message="t1 on b")
    a.call("insert", table="t1", records=[{"id": 1, "v": "a while b does not take"}])
    b.call("insert", table="t1", records=[{"id": 2, "v": "b publishes"}])
    wait_for(lambda: by_id(a, "t1", 2) is not None, timeout=20, message="b's row on a")
    stays(lambda: by_id(b, "t1", 1) is None, duration=1.0)

    b.call("set_node_replication", hostname=a.name, subscriptions=[_sub("t1")])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20,
             message="a's row written while b did not subscribe")

    b.call("set_node_replication", hostname=a.name,
           subscriptions=[_sub("t1", publish=False)])
    b.call("insert", table="t1", records=[{"id": 3, "v": "b does not publish"}])
    a.call("insert", table="t1", records=[{"id": 4, "v": "a to b"}])
    wait_for(lambda: by_id(b, "t1", 4) is not None, timeout=20, message="a still to b")
    stays(lambda: by_id(a, "t1", 3) is None, duration=1.0)

    b.call("set_node_replication", hostname=a.name, subscriptions=[_sub("t1")])
    wait_for(lambda: by_id(a, "t1", 3) is not None, timeout=20,
             message="b's row written while it did not publish")
    wait_for(lambda: _rows(a, "t1") == _rows(b, "t1"), timeout=20, message="converged")


@pytest.mark.timeout(180)
def test_a_subscription_to_a_table_and_database_not_created_yet(node_factory):
    """b takes t3 of data and t of d3 from a before either exists: once a creates them,
    their rows reach b, and nothing of a's other tables does."""
    a, b = node_factory("node-a"), node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a, subscriptions=[_sub("t3"), {"database": "d3", "table": "t",
                                           "subscribe": True, "publish": True}])
    a.call("insert", table="t1", records=[{"id": 1}])
    a.call("create_table", table="t3", primary_key="id")
    a.call("insert", table="t3", records=[{"id": 1}])
    a.call("create_database", database="d3")
    a.call("create_table", database="d3", table="t", primary_key="id")
    a.call("create_table", database="d3", table="u", primary_key="id")
    a.call("insert", database="d3", table="t", records=[{"id": 1}])
    a.call("insert", database="d3", table="u", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t3", 1) is not None, timeout=30, message="t3's row on b")
    wait_for(lambda: by_id(b, "t", 1, database="d3") is not None, timeout=30,
             message="d3.t's row on b")
    a.call("insert", database="d3", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t", 2, database="d3") is not None, timeout=30,
             message="d3.t's next row on b")
    assert by_id(b, "t1", 1) is None
    assert by_id(b, "u", 1, database="d3") is None


@pytest.mark.timeout(180)
def test_a_table_re_created_while_cut_from_a_peer_taking_only_it(node_factory):
    """b takes only t1 from a, through a proxy. While cut, a drops t1, creates it again
    and writes to it: after the heal b holds the new table's rows only."""
    from tests.proxy_util import TcpProxy
    from tests.repl_util import CREDS

    a, b = node_factory("node-a"), node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS, subscriptions=[_sub("t1")])
        a.call("insert", table="t1", records=[{"id": i, "v": "old"} for i in range(5)])
        wait_for(lambda: len(_rows(b, "t1")) == 5, timeout=20, message="old t1 on b")
        to_a.cut()
        a.call("drop_table", table="t1")
        a.call("create_table", table="t1", primary_key="id")
        a.call("insert", table="t1", records=[{"id": 3, "v": "new"}, {"id": 9, "v": "new"}])
        to_a.heal()
        wait_for(lambda: _rows(b, "t1") == _rows(a, "t1"), timeout=40,
                 message="b's t1 as a's new one")
    finally:
        to_a.close()


@pytest.mark.timeout(180)
def test_a_table_re_created_while_a_peer_did_not_take_it_is_copied_fresh(node_factory):
    """b takes t1 from a, then narrows to t2 only; a drops t1, creates it again with
    other rows; b widens to t1 again: b's t1 is the new table, none of the old rows."""
    a, b = node_factory("node-a"), node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(b, a, subscriptions=[_sub("t1"), _sub("t2")])
    a.call("insert", table="t1", records=[{"id": i, "v": "old"} for i in range(5)])
    wait_for(lambda: len(_rows(b, "t1")) == 5, timeout=20, message="old t1 on b")
    b.call("set_node_replication", hostname=a.name,
           subscriptions=[_sub("t1", subscribe=False, publish=False)])
    a.call("drop_table", table="t1")
    a.call("create_table", table="t1", primary_key="id")
    a.call("insert", table="t1", records=[{"id": 3, "v": "new"}])
    a.call("insert", table="t2", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=20, message="t2 flowing")
    b.call("set_node_replication", hostname=a.name, subscriptions=[_sub("t1")])
    wait_for(lambda: _rows(b, "t1") == _rows(a, "t1"), timeout=40,
             message="b's t1 as a's new one")
