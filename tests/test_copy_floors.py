"""A full copy sets the receiver's per-origin floors (issue 9: each transaction once).

A node that received the mesh's history only by full copies then streams; when one of
its direct links is cut, the relay that takes that origin over (and reads its own log
again from the start, with the floors) sends nothing of the copied history again, and
after the heal the counts are exact again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.relay_util import T1_ONLY, b_behind_a_proxy, converged, direct, relay_of, write_round
from tests.repl_util import CREDS, by_id, has_table, join

K = 5  # transactions written on each node per round


def _received(node: Any) -> int:
    """``node``'s ``txns_received`` for ``data``, over all its links."""
    return sum(int(s.get("txns_received", 0))
               for c in node.call("cluster_status")["connections"]
               for s in c["database_sockets"] if s["database"] == "data")


def _quiet(nodes: list[Any]) -> list[int]:
    """The counters once every connected data link has read its publisher's whole log
    (a cut link is not connected: its origin comes through a relay)."""
    def caught_up(node: Any) -> bool:
        socks = [s for c in node.call("cluster_status")["connections"]
                 for s in c["database_sockets"] if s["database"] == "data"]
        live = [s for s in socks if s["connected"]]
        return bool(live) and all(s["state"] == "streaming" and s["lag_txns"] == 0
                                  for s in live)

    for node in nodes:
        wait_for(lambda n=node: caught_up(n), timeout=30,
                 message=f"{node.name}'s data links to catch up")
    return [_received(n) for n in nodes]


@pytest.mark.timeout(240)
def test_a_node_joined_by_copy_receives_each_transaction_once(cluster, node_factory):
    """d joins a 3-node mesh holding writes of each node, and receives them all by full
    copies (its direct link from a through a proxy). Its floors for a, b and c are then
    those the copies carried. With that link cut, b or c relays a's new writes (reading
    its own log again from the start, above d's floors); after the heal the direct link
    streams again. In each round every node's ``txns_received`` grows by exactly the
    transactions written elsewhere. Before, a copy set no floor: the relay sent d its
    own and a's whole history again, applied as no-ops and counted."""
    a, b, c = cluster(3)
    a.call("create_table", table="t", primary_key="id")
    for node in (a, b, c):
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="table t everywhere")
    next_id = write_round([a, b, c], 1, K)  # the history d receives only by copy
    converged([a, b, c], 3 * K)
    d = node_factory("node-d")
    nodes = [a, b, c, d]
    to_a = TcpProxy(a.repl_port)
    try:
        d.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        for peer in (a, b, c):
            wait_for(lambda p=peer: direct(d, p.name), timeout=30,
                     message=f"d streaming from {peer.name}")
        converged(nodes, 3 * K)
        before = _quiet(nodes)
        floors = d.node.storage.databases["data"].committed_hw([a.name, b.name, c.name])
        assert all(floors.values()), f"d's floors after its copies: {floors}"

        to_a.cut()
        wait_for(lambda: not direct(d, a.name), timeout=20, message="d's direct link from a down")
        wait_for(lambda: relay_of(d, a.name) in (b.name, c.name), timeout=20,
                 message="a relayed to d")
        next_id = write_round(nodes, next_id, K)
        converged(nodes, 7 * K)
        assert not direct(d, a.name), "the cut link came back while cut"
        during = _quiet(nodes)
        got = [x - y for x, y in zip(during, before, strict=True)]
        assert got == [3 * K] * 4, f"transactions received per node while cut: {got}"

        to_a.heal()
        wait_for(lambda: direct(d, a.name), timeout=30, message="d streaming from a again")
        write_round(nodes, next_id, K)
        converged(nodes, 11 * K)
        after = _quiet(nodes)
        got = [x - y for x, y in zip(after, during, strict=True)]
        assert got == [3 * K] * 4, f"transactions received per node after the heal: {got}"
    finally:
        to_a.close()




@pytest.mark.timeout(180)
def test_a_copy_of_some_tables_raises_no_floor_of_an_origin_it_does_not_carry_all_of(
        node_factory):
    """b takes everything from a, and t1 only from c. With b's direct link from a cut,
    a writes to t1 and t2; then b starts taking t1 from c, whose copy (t1 only) carries
    a's t1 row. Floors are per database, not per table: raising b's floor for a to c's
    would have b's direct link, once back, skip a's t2 row for good. The copy raises
    no floor of a (``narrow_origins``), and the row arrives."""
    with b_behind_a_proxy(node_factory) as (a, b, c, to_a):
        join(b, c, replicates=False)
        wait_for(lambda: direct(b, a.name) and has_table(b, "t2"), timeout=30,
                 message="b streaming from a")
        to_a.cut()
        wait_for(lambda: not direct(b, a.name), timeout=20, message="b's direct link down")
        a.call("insert", table="t1", records=[{"id": 1}])
        a.call("insert", table="t2", records=[{"id": 1, "v": "only from a"}])
        wait_for(lambda: by_id(c, "t2", 1) is not None, timeout=20, message="c holds both")
        b.call("set_node_replication", hostname=c.name, subscriptions=T1_ONLY)
        wait_for(lambda: by_id(b, "t1", 1) is not None and direct(b, c.name), timeout=30,
                 message="a's t1 row copied to b by c")
        floor = b.node.storage.databases["data"].committed_hw([a.name])[a.name]
        assert by_id(b, "t2", 1) is None, "c sent b a table b does not take from it"
        to_a.heal()
        wait_for(lambda: direct(b, a.name), timeout=30, message="b streaming from a again")
        wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=30,
                 message=f"a's t2 row on b (b's floor for a was {floor})")
