"""Relays of a partial copy and ``txns_received``: what a relay carried without raising
the receiver's floor (it carries fewer tables than the receiver takes from the origin)
comes again from the origin once the direct link is back; it applies as a no-op and is
not counted a second time. Nothing is lost either."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.relay_util import T1_ONLY, b_behind_a_proxy, direct, relay_of
from tests.repl_util import CREDS, by_id, has_table, join


def _received(node: Any) -> int:
    """``node``'s ``txns_received`` for ``data``, over all its links."""
    return sum(int(s.get("txns_received", 0))
               for c in node.call("cluster_status")["connections"]
               for s in c["database_sockets"] if s["database"] == "data")


def _per_link(node: Any) -> dict[str, int]:
    """``node``'s ``txns_received`` for ``data`` per peer."""
    return {c["name"]: int(s.get("txns_received", 0))
            for c in node.call("cluster_status")["connections"]
            for s in c["database_sockets"] if s["database"] == "data"}


def _quiet(node: Any) -> int:
    """``_received`` once every data link of ``node`` has read its publisher's log."""
    def caught_up() -> bool:
        socks = [s for c in node.call("cluster_status")["connections"]
                 for s in c["database_sockets"] if s["database"] == "data"]
        return bool(socks) and all(s["connected"] and s["state"] == "streaming"
                                   and s["lag_txns"] == 0 for s in socks)

    wait_for(caught_up, timeout=30, message=f"{node.name}'s data links to catch up")
    return _received(node)


@pytest.mark.timeout(180)
def test_what_a_partial_relay_carried_is_not_counted_again_after_the_heal(node_factory):
    """b takes t1 only from c, everything from a. With b's direct link from a cut, c
    relays a's t1 writes (raising no floor: c does not carry t2); after the heal, a
    sends them again with its t2 writes. b's ``txns_received`` grows by the number of
    a's transactions, each once. Before, the relayed ones counted twice."""
    with b_behind_a_proxy(node_factory) as (a, b, c, to_a):
        join(b, c, subscriptions=T1_ONLY)
        wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=20,
                 message="tables on b")
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a")
        # a's t1 rows flow to b (b's floor for a comes from a's copy already).
        a.call("insert", table="t1", records=[{"id": 0}])
        wait_for(lambda: by_id(b, "t1", 0) is not None, timeout=20, message="t1 flowing")
        before = _quiet(b)

        to_a.cut()
        wait_for(lambda: not direct(b, a.name), timeout=20, message="b's direct link down")
        wait_for(lambda: relay_of(b, a.name) == c.name, timeout=20, message="c relaying a to b")
        for i in range(1, 4):
            a.call("insert", table="t1", records=[{"id": i, "v": "relayed"}])
        a.call("insert", table="t2", records=[{"id": 1, "v": "direct only"}])
        wait_for(lambda: all(by_id(b, "t1", i) is not None for i in range(1, 4)),
                 timeout=30, message="a's t1 rows relayed by c")
        assert by_id(b, "t2", 1) is None, "c relayed a table b does not take from it"

        to_a.heal()
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a again")
        a.call("insert", table="t1", records=[{"id": 4}])
        wait_for(lambda: by_id(b, "t1", 4) is not None and by_id(b, "t2", 1) is not None,
                 timeout=30, message="a's rows after the heal")
        got = _quiet(b) - before
        assert got == 5, f"b received {got} transactions of a's 5"


@pytest.mark.timeout(240)
def test_second_hand_relays_of_a_partial_copy_deliver_and_count_once(node_factory):
    """Four nodes; b and c reach a only through proxies, and c reaches d only through
    one: all three are cut. b must not take a from c (c takes a from b: a loop), so d
    relays a to b, and b relays a to c, second hand and partial (c takes only t1 from
    b). a's t1 writes reach b and c while cut, its t2 write reaches c after the heal,
    and each node has counted each of a's transactions once. Before, b and c chose
    each other (the first by name), and a's writes reached neither until the heal."""
    a, b, c, d = (node_factory(f"node-{x}") for x in "abcd")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(d, a)
    proxies = [TcpProxy(a.repl_port), TcpProxy(a.repl_port), TcpProxy(d.repl_port)]
    try:
        for node, target, proxy in ((b, a, proxies[0]), (c, a, proxies[1]),
                                    (c, d, proxies[2])):
            node.call("add_node", hostname=target.name, url=proxy.url, verify_tls=False,
                      authorization=CREDS)
        join(b, d)
        join(b, c, subscriptions=T1_ONLY)
        for node in (b, c, d):
            wait_for(lambda n=node: has_table(n, "t1") and has_table(n, "t2"), timeout=20,
                     message=f"tables on {node.name}")
        for node, peer in ((b, a), (c, a), (c, d)):
            wait_for(lambda n=node, p=peer: direct(n, p.name), timeout=30,
                     message=f"{node.name} streaming from {peer.name}")
        # A write of each node streamed to the others sets their floors for it. The
        # copies set floors too, but only by entries an origin logged: d wrote none (it
        # logged a's tables, learned from a's hello, as a's), while b logged them as
        # d's when it learned them from d's hello; without a floor for d, b relaying
        # d to c would send those creates again, and c count them
        # (harpsync/replication/copyfloors.py).
        for rid, node in enumerate((a, b, c, d)):
            node.call("insert", table="t1", records=[{"id": 100 + rid}])
        for node in (a, b, c, d):
            wait_for(lambda n=node: all(by_id(n, "t1", 100 + i) is not None
                                        for i in range(4)), timeout=20,
                     message=f"t1 flowing to {node.name}")
        before = {n.name: _quiet(n) for n in (b, c, d)}
        links_before = {n.name: _per_link(n) for n in (b, c, d)}

        for proxy in proxies:
            proxy.cut()
        wait_for(lambda: relay_of(b, a.name) == d.name and relay_of(c, a.name) == b.name,
                 timeout=30, message="d relaying a to b, and b to c")
        for i in range(1, 4):
            a.call("insert", table="t1", records=[{"id": i}])
        a.call("insert", table="t2", records=[{"id": 1}])
        for node in (b, c, d):
            wait_for(lambda n=node: all(by_id(n, "t1", i) is not None for i in range(1, 4)),
                     timeout=30, message=f"a's t1 rows on {node.name}")
        wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=30,
                 message="a's t2 row relayed to b by d")
        assert by_id(c, "t2", 1) is None, "b relayed a table c does not take from it"

        for proxy in proxies:
            proxy.heal()
        for node, peer in ((b, a), (c, a), (c, d)):
            wait_for(lambda n=node, p=peer: direct(n, p.name), timeout=30,
                     message=f"{node.name} streaming from {peer.name} again")
        a.call("insert", table="t1", records=[{"id": 4}])
        for node in (b, c, d):
            wait_for(lambda n=node: by_id(n, "t1", 4) is not None
                     and by_id(n, "t2", 1) is not None, timeout=30,
                     message=f"a's rows on {node.name} after the heal")
        got = {n.name: _quiet(n) - before[n.name] for n in (b, c, d)}
        assert got == {b.name: 5, c.name: 5, d.name: 5}, \
            (got, links_before, {n.name: _per_link(n) for n in (b, c, d)})
    finally:
        for proxy in proxies:
            proxy.close()
