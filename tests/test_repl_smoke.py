"""Two-node replication smoke test."""

from __future__ import annotations

from tests.helpers import wait_for


def test_two_nodes_replicate(node_factory):
    """A write on A appears on B after one add_node call, and B's writes reach A."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    a.call("insert", table="dog", records=[{"id": 1, "name": "x"}])
    res = a.call("add_node", hostname="node-b", url=b.repl_url, verify_tls=False,
                 authorization={"username": "admin", "password": "test-password"})
    assert res["message"].startswith("Successfully added")
    wait_for(lambda: b.post({"operation": "search_by_id", "table": "dog", "ids": [1]}).json()
             == [a.call("search_by_id", table="dog", ids=[1])[0]], timeout=15)
    b.call("insert", table="dog", records=[{"id": 2, "name": "y"}])
    wait_for(lambda: a.count("dog") == 2, timeout=15)
    status = a.call("cluster_status")
    print(status)
