"""Cluster lifecycle operations (DESIGN §6): configure_cluster, routes, cluster_network
and purge_stream."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.helpers import wait_for
from tests.lifecycle_util import CREDS, StatusWatcher, db_socket, free_port, peer_names
from tests.repl_util import (
    all_records,
    by_id,
    hdb_nodes,
    insert_batches,
    join,
    table_hash,
    wait_linked,
)


def _entry(node: Any) -> dict[str, Any]:
    return {"hostname": node.name, "url": node.repl_url, "verify_tls": False,
            "authorization": CREDS}


def _outcome_for(connections: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [c for c in connections if name in json.dumps(c)]
    assert found, f"no outcome names {name}: {connections}"
    return found[0]


# -- configure_cluster ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_configure_cluster_replaces_nodes_and_reports_each_connection(cluster):
    """configure_cluster rejects invalid lists unchanged, really removes unlisted nodes,
    and reports each connection's outcome with an error status when one fails."""
    a, b, c = cluster(3)
    assert peer_names(a) == {"node-b", "node-c"}

    # Invalid entries: 400, and nothing changes.
    res = a.post({"operation": "configure_cluster", "connections": [_entry(b),
                                                                    {"verify_tls": False}]})
    assert res.status_code == 400, res.text
    assert "hostname" in res.json()["error"] or "url" in res.json()["error"]
    bad_sub = {**_entry(b), "subscriptions": [{"subscribe": True, "publish": True}]}
    res = a.post({"operation": "configure_cluster", "connections": [bad_sub]})
    assert res.status_code == 400, res.text
    assert "table" in res.json()["error"]
    res = a.post({"operation": "configure_cluster", "connections": "node-b"})
    assert res.status_code == 400, res.text
    assert peer_names(a) == {"node-b", "node-c"}
    assert {"node-b", "node-c"} <= {r["name"] for r in hdb_nodes(a)}

    # A list with only B: C is removed from A (and A from C); B stays.
    res = a.call("configure_cluster", connections=[_entry(b)])
    assert res["message"] == "Cluster successfully configured."
    assert isinstance(res.get("connections"), list)
    assert "error" not in _outcome_for(res["connections"], "node-b")
    wait_for(lambda: peer_names(a) == {"node-b"}, timeout=15, message="A linked to B only")
    assert "node-c" not in {r["name"] for r in hdb_nodes(a)}
    wait_for(lambda: "node-a" not in peer_names(c), timeout=15, message="C forgot A")
    assert "node-a" in peer_names(b)
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=15, message="A->B still replicates")

    # One unreachable connection: an error status, and every connection's outcome.
    ghost = {"hostname": "ghost-node", "url": f"wss://127.0.0.1:{free_port()}",
             "verify_tls": False, "authorization": CREDS}
    res = a.post({"operation": "configure_cluster", "connections": [_entry(b), ghost]})
    assert 400 <= res.status_code < 500, res.text
    body = res.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("connections"), list), body
    assert "error" in _outcome_for(body["connections"], "ghost-node")
    assert "error" not in _outcome_for(body["connections"], "node-b")
    assert "ghost-node" not in peer_names(a)
    assert "ghost-node" not in {r["name"] for r in hdb_nodes(a)}

    # Legacy entries (node_name, subscriptions with schema) pass validation; this one
    # cannot be reached, and the error names it.
    legacy = {"node_name": "legacy-node",
              "subscriptions": [{"schema": "data", "table": "t", "subscribe": True,
                                 "publish": True}]}
    res = a.post({"operation": "configure_cluster", "connections": [_entry(b), legacy]})
    assert 400 <= res.status_code < 500, res.text
    body = res.json()
    assert isinstance(body.get("connections"), list), body  # not a schema rejection
    assert "error" in _outcome_for(body["connections"], "legacy-node")
    assert "legacy-node" in json.dumps(body)
    assert "node-b" in peer_names(a)


# -- routes ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_routes_set_get_delete_and_persist(node_factory):
    """cluster_set_routes, cluster_get_routes and cluster_delete_routes agree, and the
    routes persist to config.yaml and across a restart."""
    a = node_factory("node-a")
    url_route = f"wss://127.0.0.1:{free_port()}"
    obj_route = {"hostname": "127.0.0.1", "port": free_port()}
    routes = [url_route, obj_route]

    res = a.call("cluster_set_routes", server="hub", routes=routes)
    assert res == {"message": "cluster routes successfully set", "set": routes, "skipped": []}
    res = a.call("cluster_set_routes", server="hub", routes=routes)
    assert res == {"message": "cluster routes successfully set", "set": [], "skipped": routes}
    assert a.call("cluster_get_routes") == routes

    config_file = a.root / "config.yaml"
    assert config_file.exists(), "routes were not persisted to <root>/config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    assert saved["replication"]["routes"] == routes

    a.restart()
    assert a.call("cluster_get_routes") == routes

    res = a.call("cluster_delete_routes", routes=[obj_route])
    assert res == {"message": "cluster routes successfully deleted", "deleted": [obj_route],
                   "skipped": []}
    assert a.call("cluster_get_routes") == [url_route]
    missing = {"hostname": "127.0.0.1", "port": free_port()}
    res = a.call("cluster_delete_routes", routes=[missing])
    assert res == {"message": "cluster routes successfully deleted", "deleted": [],
                   "skipped": [missing]}
    assert yaml.safe_load(config_file.read_text())["replication"]["routes"] == [url_route]
    a.restart()
    assert a.call("cluster_get_routes") == [url_route]


@pytest.mark.timeout(120)
def test_route_to_joined_peer_keeps_replication(node_factory):
    """Setting a route to a peer that is already joined changes nothing about the link."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    res = a.call("cluster_set_routes", routes=[b.repl_url])
    assert res == {"message": "cluster routes successfully set", "set": [b.repl_url],
                   "skipped": []}
    assert a.call("cluster_get_routes") == [b.repl_url]
    a.call("insert", table="t", records=[{"id": 1}])
    b.call("insert", table="t", records=[{"id": 2}])
    wait_for(lambda: a.count("t") == 2 and b.count("t") == 2, timeout=15,
             message="both directions still replicate")
    assert peer_names(a) == {"node-b"}
    assert peer_names(b) == {"node-a"}
    # Deleting that route takes back only what it did (nothing): the peer add_node made
    # stays, on both sides. Before, it was removed from the cluster and its key barred.
    a.call("cluster_delete_routes", routes=[b.repl_url])
    assert a.call("cluster_get_routes") == []
    assert peer_names(a) == {"node-b"}
    assert peer_names(b) == {"node-a"}
    a.call("insert", table="t", records=[{"id": 3}])
    wait_for(lambda: b.count("t") == 3, timeout=15, message="still replicating")


@pytest.mark.parametrize("bad", [[], ["ftp://x:1"], [{"hostname": "h"}], [{"port": 1}], "x"])
def test_routes_validation(node, bad):
    """Malformed route lists are rejected with a 400 naming the field."""
    for op in ("cluster_set_routes", "cluster_delete_routes"):
        res = node.post({"operation": op, "routes": bad})
        assert res.status_code == 400, (op, res.text)
        assert "routes" in res.json()["error"]
    assert node.call("cluster_get_routes") == []


@pytest.mark.parametrize("bad", ["ws://[::1", "wss://127.0.0.1:x", {"host": "[::1", "port": 1}])
def test_set_routes_refuses_a_url_no_node_could_have(node, bad):
    """A route whose URL urllib cannot parse (add_node refuses the same URL) is a 400
    naming it, and no route of the request is saved, not even the valid ones; it was
    stored and retried forever."""
    res = node.post({"operation": "cluster_set_routes", "routes": ["wss://127.0.0.1:1", bad]})
    assert res.status_code == 400, res.text
    assert "'routes[1]'" in res.json()["error"] and "not a valid node URL" in res.json()["error"]
    assert node.call("cluster_get_routes") == []


# -- cluster_network ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_cluster_network_reaches_nodes_through_peers(node_factory):
    """cluster_network on A reports C, which A reaches only through B, with the
    documented fields, and omits connected_nodes/routes when asked to."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    join(a, b)
    join(b, c)
    wait_for(lambda: peer_names(a) == {"node-b", "node-c"}, timeout=20,
             message="mesh gossip linking A and C")
    a.call("remove_node", hostname="node-c")
    wait_for(lambda: peer_names(a) == {"node-b"} and peer_names(c) == {"node-b"}, timeout=20,
             message="A and C linked only to B")
    wait_linked([(a, b), (b, a), (b, c), (c, b)])

    # The answer reflects the links of the moment: A's link from B restarts once more
    # when the relay planner adds C's origin to it (C is no longer a direct peer), so
    # poll until that has settled. A generous budget: on a loaded machine a nested TLS
    # round trip can take seconds.
    links = {"node-a": ["node-b"], "node-b": ["node-a", "node-c"], "node-c": ["node-b"]}

    def network(**options: Any) -> dict[str, Any]:
        answer: dict[str, Any] = {}

        def complete() -> bool:
            answer.update(a.call("cluster_network", timeout=10000, **options))
            seen = {n["name"]: sorted(n.get("connected_nodes", [])) for n in answer["nodes"]}
            if "connected_nodes" in options:
                return set(seen) == set(links)
            return seen == links

        wait_for(complete, timeout=30, message=f"cluster_network {options} reaching C")
        return answer

    res = network()
    assert set(res) == {"nodes"}
    nodes = {n["name"]: n for n in res["nodes"]}
    for entry in nodes.values():
        assert {"name", "response_time", "connected_nodes", "routes"} <= set(entry), entry
        assert isinstance(entry["response_time"], int | float)
        assert not isinstance(entry["response_time"], bool)
        assert isinstance(entry["routes"], list)
    assert set(nodes) == set(links)

    res = network(connected_nodes=True)
    assert all("connected_nodes" not in n and "routes" in n for n in res["nodes"]), res
    res = a.call("cluster_network", routes=True)
    assert all("routes" not in n and "connected_nodes" in n for n in res["nodes"]), res
    res = a.call("cluster_network", connected_nodes=True, routes=True, timeout=3000)
    assert all(set(n) >= {"name", "response_time"} and "routes" not in n
               and "connected_nodes" not in n for n in res["nodes"]), res
    res = a.post({"operation": "cluster_network", "timeout": "soon"})
    assert res.status_code == 400 and "timeout" in res.json()["error"]


# -- purge_stream ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_purge_stream_sends_lagging_peer_to_resync(node_factory):
    """Purging a table's log while a peer is down makes that peer resync by a full copy
    and end with every record."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    insert_batches(a, "t", 1, 200, batch=50)
    wait_for(lambda: b.count("t") == 200, timeout=20, message="200 records on B")

    b.stop()
    insert_batches(a, "t", 201, 50, batch=10)
    res = a.call("purge_stream", database="data", table="t")
    assert isinstance(res["message"], str) and res["message"]
    assert isinstance(res["removed"], int) and res["removed"] >= 5 + 4

    with StatusWatcher(b, "node-a", "data") as watch:
        b.start()
        wait_for(lambda: b.count("t") == 250, timeout=30, message="B repaired to 250 records")
    # The link's last error stays "resync required: ..." until another: the watcher may
    # not have polled B in the moment the copy of 250 rows took.
    last = (db_socket(b.call("cluster_status"), "node-a", "data") or {}).get("last_error")
    resynced = watch.seen & {"resync_required", "copying"} or any(
        "resync" in e for e in watch.errors) or "resync" in str(last)
    assert resynced, (f"B never resynced: states {watch.states}, errors {watch.errors}, "
                      f"last error {last!r}")
    wait_for(lambda: table_hash(a, "t") == table_hash(b, "t"), timeout=20,
             message="identical contents")
    assert [r["id"] for r in all_records(b, "t", attributes=["id"])] == list(range(1, 251))
    a.call("insert", table="t", records=[{"id": 251}])
    wait_for(lambda: by_id(b, "t", 251) is not None, timeout=20,
             message="streaming continues after the repair")


def test_purge_stream_keep_and_missing_table(node):
    """options.keep keeps the newest N entries touching the table; other tables' entries
    stay; a missing table is a 404."""
    node.call("create_table", table="k", primary_key="id")
    node.call("create_table", table="other", primary_key="id")
    node.call("insert", table="other", records=[{"id": 1}])
    node.call("purge_stream", table="k")  # start from an empty log for this table
    for i in range(20):
        node.call("insert", table="k", records=[{"id": i}])
    res = node.call("purge_stream", database="data", table="k", options={"keep": 10})
    assert res["removed"] == 10
    res = node.call("purge_stream", database="data", table="k", options={"keep": 10})
    assert res["removed"] == 0
    res = node.call("purge_stream", table="k", options={"keep": 3})
    assert res["removed"] == 7
    res = node.call("purge_stream", table="other", options={"keep": 0})
    assert res["removed"] >= 1  # its insert was not touched by purging 'k'
    assert node.count("k") == 20  # purging the log never deletes records

    res = node.post({"operation": "purge_stream", "database": "data", "table": "nope"})
    assert res.status_code == 404, res.text
    assert "nope" in res.json()["error"]
    res = node.post({"operation": "purge_stream", "database": "nodb", "table": "k"})
    assert res.status_code == 404, res.text
    res = node.post({"operation": "purge_stream", "table": "k", "options": {"keep": -1}})
    assert res.status_code == 400, res.text


@pytest.mark.timeout(120)
def test_configure_cluster_listing_this_node_skips_it(node_factory):
    """A configure_cluster whose connections include this node itself (one list pushed
    to every node) skips that entry, under its name or another spelling of its URL,
    and configures the others. Before, this node answered its own probe, the other
    nodes were removed, and the join of itself failed (400 after the changes)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    join(a, b)
    wait_linked([(a, b)])
    other_spelling = {"url": a.repl_url.replace("127.0.0.1", "localhost"),
                      "authorization": {"username": "admin", "password": "test-password"},
                      "verify_tls": False}
    res = a.post({"operation": "configure_cluster",
                  "connections": [_entry(a), other_spelling, _entry(c)]})
    assert res.status_code == 200, res.text
    skipped = [r for r in res.json()["connections"] if "itself; skipped" in
               r.get("response", "")]
    assert len(skipped) == 2, res.text
    assert peer_names(a) == {"node-c"}


@pytest.mark.timeout(120)
def test_configure_cluster_with_a_known_name_at_another_nodes_url_changes_nothing(
        node_factory):
    """A connection naming known node-b with node-c's url fails the probe phase:
    nothing is removed or added (node-b's update would refuse the url anyway)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    d = node_factory("node-d")
    join(a, b)
    join(a, d)
    wait_linked([(a, b), (a, d)])
    wrong = {**_entry(b), "url": c.repl_url}
    res = a.post({"operation": "configure_cluster", "connections": [wrong]})
    assert 400 <= res.status_code < 500, res.text
    assert "no connection was added or removed" in res.text, res.text
    assert peer_names(a) == {"node-b", "node-d"}


@pytest.mark.timeout(120)
def test_a_route_to_a_known_node_under_another_url_keeps_its_subscriptions(node_factory):
    """A route naming a peer that node-a already has, by another spelling of its
    address, pairs nothing: the peer's explicit subscriptions stay. Before, the route
    joined it again and replaced them with full replication (on both sides)."""
    from tests.repl_util import connection, stays

    a = node_factory("node-a")
    b = node_factory("node-b")
    subs = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]
    join(a, b, subscriptions=subs)
    wait_linked([(a, b)])
    a.call("cluster_set_routes", routes=[f"wss://localhost:{b.repl_port}"])
    stays(lambda: (connection(a, b.name) or {}).get("subscriptions") is not None
          and (connection(b, a.name) or {}).get("subscriptions") is not None, duration=2)


@pytest.mark.timeout(60)
def test_configure_cluster_with_an_unreachable_peer_is_a_peer_error(node_factory):
    """A configure_cluster refused because a listed peer cannot be reached answers
    ``code: "PEER_ERROR"`` as add_node does (README's table of codes), not
    VALIDATION_ERROR, and reports this node's own entry as skipped."""
    a = node_factory("node-a")
    res = a.post({"operation": "configure_cluster", "connections": [
        _entry(a), {"url": f"wss://127.0.0.1:{free_port()}", "authorization": CREDS}]})
    assert res.status_code == 400, res.text
    body = res.json()
    assert body["code"] == "PEER_ERROR", body
    assert "itself; skipped" in _outcome_for(body["connections"], a.name)["response"]
