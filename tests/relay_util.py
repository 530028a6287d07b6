"""Helpers of the real-node relay tests (test_one_copy, test_relay_counts,
test_copy_floors): rounds of single-record writes, convergence, and which path a
node's ``data`` link from an origin takes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tests.helpers import wait_for
from tests.lifecycle_util import db_socket
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, join

# A subscription to table t1 of ``data`` only.
T1_ONLY = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]


def write_round(nodes: list[Any], first_id: int, k: int) -> int:
    """``k`` single-record transactions on every node; returns the next free id."""
    rid = first_id
    for node in nodes:
        for _ in range(k):
            node.call("insert", table="t", records=[{"id": rid, "on": node.name}])
            rid += 1
    return rid


def converged(nodes: list[Any], total: int) -> None:
    for node in nodes:
        wait_for(lambda n=node: n.count("t") == total, timeout=30,
                 message=f"{node.name} to hold all {total} records")


def direct(node: Any, peer: str) -> bool:
    """Whether ``node`` streams ``data`` from ``peer`` over its direct link."""
    sock = db_socket(node.call("cluster_status"), peer, "data")
    return bool(sock and sock["connected"] and sock.get("state") == "streaming")


def relay_of(node: Any, origin: str) -> str | None:
    """The peer ``node`` takes ``origin``'s ``data`` writes from as its relay."""
    return node.node.cluster.relays.assignments.get("data", {}).get(origin)


@contextlib.contextmanager
def b_behind_a_proxy(node_factory: Any) -> Iterator[tuple[Any, Any, Any, TcpProxy]]:
    """Nodes a, b and c: a with tables t1 and t2, c joined to a, and b added to a
    through a proxy the test can cut (b's pairing with c is the test's own)."""
    a, b, c = (node_factory(f"node-{x}") for x in "abc")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(c, a)
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        yield a, b, c, to_a
    finally:
        to_a.close()
