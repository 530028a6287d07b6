"""One copy per link (issue 9): in a healthy mesh each node receives each transaction
once, from its origin; while a direct link is cut a relay carries it; after the heal the
direct path resumes and the counts are exact again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.relay_util import converged, direct, write_round
from tests.repl_util import CREDS, has_table

K = 5  # transactions written on each node per round


def _received(node: Any, database: str = "data") -> int:
    status = node.call("cluster_status")
    return sum(int(s.get("txns_received", 0)) for c in status["connections"]
               for s in c["database_sockets"] if s["database"] == database)


def _quiet(nodes: list[Any]) -> list[int]:
    """Counters once every data link has read its publisher's whole log."""
    def caught_up(node: Any) -> bool:
        socks = [s for c in node.call("cluster_status")["connections"]
                 for s in c["database_sockets"] if s["database"] == "data"]
        return all(s["connected"] and s["lag_txns"] == 0 for s in socks)

    for node in nodes:
        wait_for(lambda n=node: caught_up(n), timeout=30,
                 message=f"{node.name}'s links to catch up")
    return [_received(n) for n in nodes]


@pytest.mark.timeout(180)
def test_each_transaction_crosses_each_link_once(cluster):
    """In a 4-node mesh, each node's txns_received for a database equals the number of
    transactions written on the other nodes, exactly."""
    nodes = cluster(4)
    nodes[0].call("create_table", table="t", primary_key="id")
    for node in nodes:
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="table t everywhere")
    before = _quiet(nodes)
    write_round(nodes, 1, K)
    converged(nodes, 4 * K)
    after = _quiet(nodes)
    got = [a - b for a, b in zip(after, before, strict=True)]
    assert got == [3 * K] * 4, f"transactions received per node: {got}"


@pytest.mark.timeout(240)
def test_a_cut_link_is_relayed_then_the_direct_path_resumes(cluster):
    """With b's direct link from a cut, a's writes still reach b through a relay; after
    the heal the direct link streams again and each new transaction is received exactly
    once per node."""
    nodes = cluster(4)
    a, b = nodes[0], nodes[1]
    a.call("create_table", table="t", primary_key="id")
    for node in nodes:
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="table t everywhere")
    to_a = TcpProxy(a.repl_port)
    try:
        # b (and only b) reaches a through the proxy.
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: direct(b, a.name), timeout=30, message="b linked to a via the proxy")
        to_a.cut()
        wait_for(lambda: not direct(b, a.name), timeout=20,
                 message="b's direct link from a to go down")
        next_id = write_round([a, b], 1, K)
        converged(nodes, 2 * K)
        assert not direct(b, a.name), "the cut link came back while cut"

        to_a.heal()
        wait_for(lambda: direct(b, a.name), timeout=30,
                 message="b's direct link from a to stream again")
        before = _quiet(nodes)
        write_round(nodes, next_id, K)
        converged(nodes, 2 * K + 4 * K)
        after = _quiet(nodes)
        got = [x - y for x, y in zip(after, before, strict=True)]
        assert got == [3 * K] * 4, f"transactions received per node after the heal: {got}"
    finally:
        to_a.close()


@pytest.mark.timeout(120)
def test_replay_sends_the_log_again_despite_the_floors(node_factory):
    """replay_replication streams the peer's log again from the given sequence, even
    though this node already holds every version in it (one-copy floors do not apply)."""
    from tests.repl_util import join, wait_linked

    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(b, a)], ("system", "data"))
    wait_for(lambda: has_table(b, "t"), timeout=20, message="table t on B")
    for i in range(K):
        a.call("insert", table="t", records=[{"id": i}])
    wait_for(lambda: b.count("t") == K, timeout=20, message="K records on B")
    before = _quiet([b])[0]
    b.call("replay_replication", hostname=a.name, database="data", from_seq=0)
    wait_for(lambda: _received(b) >= before + K, timeout=20,
             message="the replayed transactions to arrive again")


@pytest.mark.timeout(180)
def test_pausing_a_relayed_origin_stops_its_relay_too(cluster):
    """b's direct link from a is cut and c relays a's writes; pausing replication from
    a then stops a's writes reaching b through c as well (a paused origin is not
    relayed), and resuming brings them."""
    from tests.repl_util import by_id, stays

    nodes = cluster(3)
    a, b, c = nodes
    a.call("create_table", table="t", primary_key="id")
    for node in nodes:
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="table t everywhere")
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: direct(b, a.name), timeout=30, message="b linked to a via the proxy")
        to_a.cut()
        a.call("insert", table="t", records=[{"id": 1}])
        wait_for(lambda: by_id(b, "t", 1) is not None, timeout=20, message="relayed by c")

        b.call("pause_replication", hostname=a.name)
        a.call("insert", table="t", records=[{"id": 2}])
        wait_for(lambda: by_id(c, "t", 2) is not None, timeout=20, message="c holds it")
        stays(lambda: by_id(b, "t", 2) is None, duration=1.5)

        b.call("resume_replication", hostname=a.name)
        wait_for(lambda: by_id(b, "t", 2) is not None, timeout=20, message="after resume")
    finally:
        to_a.close()
