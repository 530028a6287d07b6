"""Adversarial relay scenarios with real nodes: a peer that takes some tables of one
database from an origin must get, through a relay, exactly those (once each), and
nothing of the origin's other tables or databases."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.relay_util import T1_ONLY, b_behind_a_proxy, direct, relay_of
from tests.repl_util import by_id, has_table, join, stays


def _received(node: Any, database: str) -> int:
    return sum(int(s.get("txns_received", 0))
               for c in node.call("cluster_status")["connections"]
               for s in c["database_sockets"] if s["database"] == database)


def _quiet(node: Any, database: str = "data") -> int:
    def caught_up() -> bool:
        socks = [s for c in node.call("cluster_status")["connections"]
                 for s in c["database_sockets"] if s["database"] == database]
        return bool(socks) and all(s["connected"] and s["state"] == "streaming"
                                   and s["lag_txns"] == 0 for s in socks)

    wait_for(caught_up, timeout=30, message=f"{node.name}'s {database} links to catch up")
    return _received(node, database)


def _none_of_a(b: Any) -> bool:
    """b holds no row of a's t2 (data) nor of a's d2.t."""
    return (all(by_id(b, "t2", i) is None for i in range(5))
            and all(by_id(b, "t", i, database="d2") is None for i in range(5)))


@pytest.mark.timeout(240)
def test_a_relay_carries_only_the_tables_and_databases_the_receiver_takes(node_factory):
    """b takes only data.t1 from a (no d2), everything from c, which takes everything
    from a. Before and while b's direct link from a is cut, and after the heal, b gets
    a's t1 writes, each counted once, and never a row of a's t2 nor of a's d2 (by c's
    copies or by its relayed stream)."""
    with b_behind_a_proxy(node_factory) as (a, b, c, to_a):
        a.call("create_database", database="d2")
        a.call("create_table", database="d2", table="t", primary_key="id")
        b.call("set_node_replication", hostname=a.name, subscriptions=T1_ONLY)
        a.call("insert", table="t1", records=[{"id": 0}])
        a.call("insert", table="t2", records=[{"id": 0}])
        a.call("insert", database="d2", table="t", records=[{"id": 0}])
        wait_for(lambda: by_id(c, "t", 0, database="d2") is not None
                 and by_id(c, "t2", 0) is not None, timeout=20, message="a's rows on c")
        join(b, c)
        wait_for(lambda: has_table(b, "t", database="d2"), timeout=20, message="d2 on b")
        wait_for(lambda: by_id(b, "t1", 0) is not None, timeout=20, message="t1 on b")
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a")
        before = _quiet(b)
        before_d2 = _quiet(b, "d2")
        assert _none_of_a(b), "b holds rows of a it does not take"

        to_a.cut()
        wait_for(lambda: not direct(b, a.name), timeout=20, message="b's direct link down")
        wait_for(lambda: relay_of(b, a.name) == c.name, timeout=20, message="c relaying a")
        for i in range(1, 4):
            a.call("insert", table="t1", records=[{"id": i}])
            a.call("insert", table="t2", records=[{"id": i}])
            a.call("insert", database="d2", table="t", records=[{"id": i}])
        wait_for(lambda: all(by_id(b, "t1", i) is not None for i in range(1, 4)),
                 timeout=30, message="a's t1 rows relayed by c")
        wait_for(lambda: by_id(c, "t", 3, database="d2") is not None, timeout=20,
                 message="a's d2 rows on c")
        stays(lambda: _none_of_a(b), duration=1.5)

        to_a.heal()
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a again")
        a.call("insert", table="t1", records=[{"id": 4}])
        a.call("insert", table="t2", records=[{"id": 4}])
        wait_for(lambda: by_id(b, "t1", 4) is not None, timeout=20, message="after heal")
        got = _quiet(b) - before
        assert got == 4, f"b received {got} of a's 4 t1 transactions"
        assert _quiet(b, "d2") == before_d2, "b counted d2 transactions it does not take"
        stays(lambda: _none_of_a(b), duration=1.0)


def _partial_then_full_relay(a: Any, b: Any, c: Any, d: Any) -> None:
    """With d down, c relays a to b, carrying only t1: a writes t2 then t1, and c
    relays the t1 write. Once d is back (and c down), d, which carries all of a,
    relays a: a's t2 write must reach b through it."""
    d.stop()
    wait_for(lambda: relay_of(b, a.name) == c.name, timeout=30, message="c relaying a to b")
    a.call("insert", table="t1", records=[{"id": 0}])
    wait_for(lambda: by_id(b, "t1", 0) is not None, timeout=20, message="a's t1 on b")
    a.call("insert", table="t2", records=[{"id": 1, "v": "c does not carry it to b"}])
    a.call("insert", table="t1", records=[{"id": 1, "v": "c carries it"}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20, message="relayed by c")
    d.restart()
    wait_for(lambda: direct(b, d.name), timeout=30, message="b streaming from d again")
    c.stop()
    wait_for(lambda: relay_of(b, a.name) == d.name, timeout=30, message="d relaying a to b")
    a.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="relayed by d")
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=20,
             message="a's t2 row written while c relayed a")


def _b_selective_with_c(node_factory: Any) -> tuple[Any, Any, Any, Any]:
    """a joined to c and d; b takes only t1 from c and everything from d."""
    a, b, c, d = (node_factory(f"node-{x}") for x in "abcd")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(c, a)
    join(d, a)
    join(b, c, subscriptions=T1_ONLY)
    join(b, d)
    wait_for(lambda: has_table(b, "t2"), timeout=20, message="t2 on b")
    return a, b, c, d


@pytest.mark.timeout(240)
def test_a_partial_relay_of_an_origin_known_only_by_gossip_raises_no_floor(node_factory):
    """a is known to b only by gossip (b is selective, so no data link): its writes
    reach b by a relay only. c's relayed t1 write must not raise b's floor for a past
    the t2 write c never carried, or d, relaying a later, skips it for good."""
    a, b, c, d = _b_selective_with_c(node_factory)
    _partial_then_full_relay(a, b, c, d)


@pytest.mark.timeout(240)
def test_a_table_dropped_and_re_created_while_relayed_to_a_peer_taking_only_it(
        node_factory):
    """b takes only t1 from a, everything from c; b's direct link from a is cut, so c
    relays a. a drops t1 and creates it again with a new row: b ends with only the new
    table's rows, through c and after the heal, and a's t2 rows never reach it."""
    with b_behind_a_proxy(node_factory) as (a, b, c, to_a):
        b.call("set_node_replication", hostname=a.name, subscriptions=T1_ONLY)
        join(b, c)
        a.call("insert", table="t1", records=[{"id": i, "v": "old"} for i in range(3)])
        wait_for(lambda: all(by_id(b, "t1", i) for i in range(3)), timeout=20,
                 message="old t1 on b")
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a")
        to_a.cut()
        wait_for(lambda: relay_of(b, a.name) == c.name, timeout=30, message="c relaying a")
        a.call("drop_table", table="t1")
        a.call("create_table", table="t1", primary_key="id")
        a.call("insert", table="t1", records=[{"id": 10, "v": "new"}])
        a.call("insert", table="t2", records=[{"id": 10}])
        wait_for(lambda: by_id(b, "t1", 10) is not None, timeout=30,
                 message="the new t1's row through c")
        assert all(by_id(b, "t1", i) is None for i in range(3)), "old t1 rows on b"
        to_a.heal()
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a again")
        a.call("insert", table="t1", records=[{"id": 11, "v": "new"}])
        wait_for(lambda: by_id(b, "t1", 11) is not None, timeout=20, message="after heal")
        assert all(by_id(b, "t1", i) is None for i in range(3)), "old t1 rows on b"
        stays(lambda: by_id(b, "t2", 10) is None, duration=1.0)


@pytest.mark.timeout(240)
def test_a_partial_relay_of_a_removed_origin_raises_no_floor(node_factory):
    """As above, with a known to b by no row at all: b removed it, and a's writes still
    reach b by relays."""
    a, b, c, d = _b_selective_with_c(node_factory)
    b.call("remove_node", hostname=a.name)
    wait_for(lambda: relay_of(b, a.name) is not None, timeout=30, message="a relayed to b")
    _partial_then_full_relay(a, b, c, d)


@pytest.mark.timeout(240)
def test_an_origin_known_only_by_gossip_is_relayed_by_a_peer_that_carries_all_of_it(
        node_factory):
    """b takes only t1 from c and everything from d; a, joined to c and d, reaches b by
    relays only. c comes first by name but carries only t1: a's t2 writes must still
    reach b (through d) while c stays up."""
    a, b, c, d = _b_selective_with_c(node_factory)
    wait_for(lambda: relay_of(b, a.name) is not None, timeout=30, message="a relayed to b")
    a.call("insert", table="t2", records=[{"id": 1}])
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20, message="a's t1 on b")
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=20, message="a's t2 on b")


@pytest.mark.timeout(180)
def test_what_a_node_does_not_publish_to_a_peer_never_reaches_it_through_a_third(
        node_factory):
    """b publishes nothing of data to a (a takes nothing from b: the join's
    subscriptions say subscribe only); c replicates fully with both. b's rows reach c
    but never a, neither by c's copy to a nor by c's stream, while a's reach b."""
    a, b, c = (node_factory(f"node-{x}") for x in "abc")
    a.call("create_table", table="t1", primary_key="id")
    join(b, a, subscriptions=[{"database": "data", "table": "t1", "subscribe": True,
                               "publish": False}])
    join(c, b)
    b.call("insert", table="t1", records=[{"id": 1, "v": "b's, before c joins a"}])
    wait_for(lambda: by_id(c, "t1", 1) is not None, timeout=20, message="b's row on c")
    join(c, a)
    a.call("insert", table="t1", records=[{"id": 2, "v": "a's"}])
    b.call("insert", table="t1", records=[{"id": 3, "v": "b's, after"}])
    wait_for(lambda: by_id(c, "t1", 2) is not None and by_id(c, "t1", 3) is not None,
             timeout=20, message="rows on c")
    wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="a's row on b")
    stays(lambda: by_id(a, "t1", 1) is None and by_id(a, "t1", 3) is None, duration=2.0)


@pytest.mark.timeout(240)
def test_a_switch_from_a_partial_to_a_full_relay_counts_each_transaction_once(
        node_factory):
    """The relay switch above (c, partial, then d, full, for an origin b hears only by
    relays): b's ``txns_received`` grows by a's transactions, each once."""
    a, b, c, d = _b_selective_with_c(node_factory)

    def quiet(skip: str) -> int:
        def caught_up() -> bool:
            socks = [s for conn in b.call("cluster_status")["connections"]
                     if conn["name"] != skip for s in conn["database_sockets"]
                     if s["database"] == "data"]
            return bool(socks) and all(s["connected"] and s["state"] == "streaming"
                                       and s["lag_txns"] == 0 for s in socks)

        wait_for(caught_up, timeout=30, message="b's data links to catch up")
        return _received(b, "data")

    a.call("insert", table="t1", records=[{"id": 100}])
    wait_for(lambda: by_id(b, "t1", 100) is not None, timeout=20, message="a's row on b")
    before = quiet(skip=a.name)
    _partial_then_full_relay(a, b, c, d)
    got = quiet(skip=c.name) - before
    assert got == 4, f"b counted {got} of a's 4 transactions"
