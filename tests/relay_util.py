"""Helpers of the real-node relay tests (test_one_copy, test_relay_counts,
test_copy_floors): rounds of single-record writes, convergence, and which path a
node's ``data`` link from an origin takes."""

from __future__ import annotations

from typing import Any

from tests.helpers import wait_for
from tests.lifecycle_util import db_socket


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
