"""Meshes, per-table subscriptions and convergence under concurrent conflicting writes."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.repl_util import (
    all_records,
    by_id,
    connection,
    fully_linked,
    has_table,
    hdb_nodes,
    join,
    table_hash,
    wait_linked,
)

# -- mesh ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_three_node_mesh_from_two_add_node_calls(node_factory):
    """A add_node B and B add_node C form a full mesh in which every node's writes reach all."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    join(b, c)
    nodes = [a, b, c]
    for node in nodes:
        for peer in nodes:
            if peer is not node:
                wait_for(lambda n=node, p=peer: fully_linked(n, p.name), timeout=20,
                         message=f"{node.name} connected to {peer.name}")
    for node in nodes:
        assert len(node.call("cluster_status")["connections"]) == 2
    for i, node in enumerate(nodes):
        node.call("insert", table="t", records=[{"id": i, "from": node.name}])
    for node in nodes:
        wait_for(lambda n=node: [r["id"] for r in all_records(n, "t")] == [0, 1, 2],
                 timeout=15, message=f"all three writes on {node.name}")
    assert all_records(a, "t") == all_records(b, "t") == all_records(c, "t")


# -- per-table subscriptions -------------------------------------------------------------


def _pair_with_subs(node_factory, subs: list[dict[str, Any]]) -> tuple[Any, Any]:
    a = node_factory("node-a")
    b = node_factory("node-b")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    join(a, b, subscriptions=subs)
    wait_for(lambda: has_table(b, "t1") and has_table(b, "t2"), timeout=15,
             message="tables on B")
    wait_linked([(a, b), (b, a)], ("system", "data"))
    return a, b


MARKER = {"table": "t2", "subscribe": True, "publish": True}


def test_subscribe_only_table(node_factory):
    """subscribe:true publish:false on A: B's t1 writes reach A, A's t1 writes never reach B."""
    a, b = _pair_with_subs(node_factory, [
        {"database": "data", "table": "t1", "subscribe": True, "publish": False}, MARKER])
    b.call("insert", table="t1", records=[{"id": 1, "from": "b"}])
    wait_for(lambda: by_id(a, "t1", 1) is not None, timeout=15, message="B's t1 write on A")

    a.call("insert", table="t1", records=[{"id": 2, "from": "a"}])
    a.call("insert", table="t2", records=[{"id": 100, "marker": True}])
    wait_for(lambda: by_id(b, "t2", 100) is not None, timeout=15,
             message="marker written on A after the t1 write to reach B")
    assert by_id(b, "t1", 2) is None  # the earlier t1 write was filtered, not delayed

    b.call("insert", table="t2", records=[{"id": 200}])
    wait_for(lambda: by_id(a, "t2", 200) is not None, timeout=15, message="t2 B->A")


def test_publish_only_table(node_factory):
    """subscribe:false publish:true on A: A's t1 writes reach B, B's t1 writes never reach A."""
    a, b = _pair_with_subs(node_factory, [
        {"database": "data", "table": "t1", "subscribe": False, "publish": True}, MARKER])
    a.call("insert", table="t1", records=[{"id": 1, "from": "a"}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=15, message="A's t1 write on B")

    b.call("insert", table="t1", records=[{"id": 2, "from": "b"}])
    b.call("insert", table="t2", records=[{"id": 100, "marker": True}])
    wait_for(lambda: by_id(a, "t2", 100) is not None, timeout=15,
             message="marker written on B after the t1 write to reach A")
    assert by_id(a, "t1", 2) is None


def _subs_by_table(node: Any, peer: str) -> dict[str, dict[str, Any]]:
    row = {r["name"]: r for r in hdb_nodes(node)}[peer]
    return {s["table"]: s for s in row["subscriptions"] or []}


@pytest.mark.parametrize("operation", ["set_node_replication", "update_node"])
def test_subscription_change_is_live_and_per_table(node_factory, operation):
    """Changing one table's subscription takes effect live and leaves other tables alone."""
    a, b = _pair_with_subs(node_factory, [
        {"database": "data", "table": "t1", "subscribe": True, "publish": False}, MARKER])
    res = a.call(operation, hostname=b.name, subscriptions=[
        {"table": "t1", "subscribe": True, "publish": True}])
    assert "message" in res
    subs = _subs_by_table(a, b.name)
    assert subs["t1"] == {"database": "data", "table": "t1", "subscribe": True,
                          "publish": True}
    assert subs["t2"] == {"database": "data", **MARKER}
    # the peer stores the mirror
    mirror = _subs_by_table(b, a.name)
    assert mirror["t1"]["subscribe"] is True and mirror["t1"]["publish"] is True
    assert mirror["t2"]["subscribe"] is True and mirror["t2"]["publish"] is True
    shown = {s["table"]: s for s in connection(a, b.name)["subscriptions"]}
    assert set(shown) == {"t1", "t2"}

    a.call("insert", table="t1", records=[{"id": 5, "from": "a"}])
    wait_for(lambda: by_id(b, "t1", 5) is not None, timeout=15,
             message="A's t1 write to reach B after publish was enabled")
    b.call("insert", table="t1", records=[{"id": 6, "from": "b"}])
    wait_for(lambda: by_id(a, "t1", 6) is not None, timeout=15, message="B->A t1 still flows")
    a.call("insert", table="t2", records=[{"id": 7}])
    wait_for(lambda: by_id(b, "t2", 7) is not None, timeout=15, message="t2 untouched")

    # and back: stop publishing t1 from A; t2 still flows
    a.call(operation, hostname=b.name, subscriptions=[
        {"table": "t1", "subscribe": True, "publish": False}])
    wait_linked([(b, a)], ("system", "data"))
    a.call("insert", table="t1", records=[{"id": 8}])
    a.call("insert", table="t2", records=[{"id": 9}])
    wait_for(lambda: by_id(b, "t2", 9) is not None, timeout=15, message="t2 marker")
    assert by_id(b, "t1", 8) is None


def test_subscription_without_table_is_rejected(node_factory):
    """A subscriptions entry without ``table`` is a 400 and nothing is stored."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    res = a.post({"operation": "add_node", "hostname": b.name, "url": b.repl_url,
                  "verify_tls": False,
                  "authorization": {"username": "admin", "password": "test-password"},
                  "subscriptions": [{"database": "data", "subscribe": True, "publish": True}]})
    assert res.status_code == 400, res.text
    assert "table" in res.json()["error"]
    assert b.name not in {r["name"] for r in hdb_nodes(a)}


def test_subscription_database_defaults_to_data_and_shard_is_shown(node_factory):
    """A subscription without database means ``data``; ``shard`` is stored and shown."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(a, b, shard=3, subscriptions=[{"table": "t1", "subscribe": True, "publish": True}])
    row = {r["name"]: r for r in hdb_nodes(a)}[b.name]
    assert row["subscriptions"] == [{"database": "data", "table": "t1", "subscribe": True,
                                     "publish": True}]
    assert row["shard"] == 3
    conn = connection(a, b.name)
    assert conn["shard"] == 3
    assert conn["subscriptions"][0]["database"] == "data"
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=15, message="t1 flows A->B")


# -- convergence -------------------------------------------------------------------------


def _hashes(nodes: list[Any], table: str) -> set[str]:
    return {table_hash(n, table) for n in nodes}


@pytest.mark.timeout(180)
def test_concurrent_conflicting_writes_converge(cluster):
    """Three nodes upserting the same ids concurrently end with identical tables."""
    _converge(cluster(3))


def _converge(nodes: list[Any]) -> None:
    nodes[0].call("create_table", table="c", primary_key="id")
    wait_for(lambda: all(has_table(n, "c") for n in nodes), timeout=15,
             message="table on all nodes")
    for node in nodes:
        for peer in nodes:
            if peer is not node:
                wait_for(lambda n=node, p=peer: fully_linked(n, p.name), timeout=20,
                         message=f"{node.name} -> {peer.name}")
    errors: list[BaseException] = []

    def writer(node: Any, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for rnd in range(5):
                ids = rng.sample(range(200), 120)
                for lo in range(0, len(ids), 40):
                    node.call("upsert", table="c", records=[
                        {"id": i, "by": node.name, "round": rnd, "val": rng.random()}
                        for i in ids[lo:lo + 40]])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n, i)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    wait_for(lambda: len(_hashes(nodes, "c")) == 1, timeout=30, interval=0.2,
             message="identical tables on all three nodes")
    rows = all_records(nodes[0], "c")
    assert len(rows) == 200

    # a concurrent delete and update of the same id converge too
    for rid in range(20):
        nodes[0].call("upsert", table="c", records=[{"id": 1000 + rid, "v": 0}])
    wait_for(lambda: all(by_id(n, "c", 1019) for n in nodes), timeout=15,
             message="seed rows everywhere")
    barrier = threading.Barrier(2)

    def deleter() -> None:
        barrier.wait()
        for rid in range(20):
            nodes[1].call("delete", table="c", ids=[1000 + rid])

    def updater() -> None:
        barrier.wait()
        for rid in range(20):
            nodes[2].post({"operation": "update", "table": "c",
                           "records": [{"id": 1000 + rid, "v": 1}]})

    threads = [threading.Thread(target=deleter), threading.Thread(target=updater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_for(lambda: len(_hashes(nodes, "c")) == 1, timeout=30, interval=0.2,
             message="delete vs update converged")
