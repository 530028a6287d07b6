"""Smoke test for the node fixture."""

from __future__ import annotations


def test_insert_then_read(node):
    """A record inserted through the API can be read back by id."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("insert", table="dog", records=[{"id": 1, "name": "a"}])
    assert node.call("search_by_id", table="dog", ids=[1])[0]["name"] == "a"


def test_process_node_restart(node_factory):
    """A subprocess node keeps its data and ports across SIGKILL and restart."""
    n = node_factory("p", process=True)
    n.call("create_table", table="dog", primary_key="id")
    n.call("insert", table="dog", records=[{"id": 1}])
    n.kill()
    n.start()
    assert n.count("dog") == 1
