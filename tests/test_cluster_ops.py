"""Cluster operations: cluster_status's shape and liveness, and add_node's errors."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.helpers import harper_error, wait_for
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, PASSWORD, by_id, connection, hdb_nodes, join, wait_linked

TOP_KEYS = {"type", "connections", "node_name", "url", "is_enabled"}
CONNECTION_KEYS = {"name", "url", "replicates", "subscriptions", "shard", "database_sockets"}
SOCKET_KEYS = {
    "database", "connected", "latency", "thread_id", "threadId", "nodes",
    "lastCommitConfirmed", "lastReceivedRemoteTime", "lastReceivedLocalTime",
    "lastReceivedVersion", "backPressurePercent", "state", "lag_ms", "lag_txns",
    "received_seq", "committed_seq", "acked_seq", "bytes_received", "txns_received",
    "last_error",
}
# Harper omits these until the socket has seen traffic (see the recorded transcripts).
TRAFFIC_KEYS = {"lastCommitConfirmed", "lastReceivedRemoteTime", "lastReceivedLocalTime"}
FORBIDDEN = ("This operation is not authorized due to role restrictions and/or invalid "
             "database items")


def _sockets(node: Any, peer: str) -> list[dict[str, Any]]:
    conn = connection(node, peer)
    assert conn is not None, f"{node.name} has no connection named {peer}"
    return conn["database_sockets"]


# -- cluster_status ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cluster_status_shape_and_liveness(node_factory):
    """cluster_status has Harper's and harpsync's fields and tracks a peer going away and back."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="dog", records=[{"id": 1}])
    b.call("insert", table="dog", records=[{"id": 2}])
    wait_for(lambda: a.count("dog") == 2 and b.count("dog") == 2, timeout=15,
             message="records both ways")

    status = a.call("cluster_status")
    assert TOP_KEYS <= set(status), set(status)
    assert status["type"] == "cluster-status"
    assert status["node_name"] == "node-a"
    assert status["url"] == a.repl_url
    assert status["is_enabled"] is True
    (conn,) = status["connections"]
    assert CONNECTION_KEYS <= set(conn), set(conn)
    assert conn["name"] == "node-b" and conn["url"] == b.repl_url
    assert conn["replicates"] is True and conn["subscriptions"] is None
    assert {s["database"] for s in conn["database_sockets"]} >= {"system", "data"}
    for sock in conn["database_sockets"]:
        assert SOCKET_KEYS - TRAFFIC_KEYS <= set(sock), SOCKET_KEYS - set(sock)
        assert sock["connected"] is True
        assert sock["nodes"] == ["node-b"]
        assert sock["thread_id"] == sock["threadId"]
        assert sock["state"] in ("connecting", "copying", "streaming", "paused",
                                 "resync_required", "error")
        assert isinstance(sock["lag_txns"], int) and sock["lag_txns"] >= 0
        assert sock["lag_ms"] >= 0
        assert 0 <= sock["backPressurePercent"] <= 100
    data_sock = next(s for s in conn["database_sockets"] if s["database"] == "data")
    assert SOCKET_KEYS <= set(data_sock), SOCKET_KEYS - set(data_sock)
    assert data_sock["state"] == "streaming"
    assert data_sock["txns_received"] >= 1 and data_sock["bytes_received"] > 0
    assert data_sock["received_seq"] > 0
    assert data_sock["committed_seq"] <= data_sock["received_seq"], data_sock
    assert PASSWORD not in str(status)

    b.stop()
    wait_for(lambda: all(not s["connected"] for s in _sockets(a, "node-b")), timeout=2,
             interval=0.05, message="A's sockets to B to report connected:false")
    status = a.call("cluster_status")
    assert [c["name"] for c in status["connections"]] == ["node-b"]
    for sock in status["connections"][0]["database_sockets"]:
        assert sock["nodes"] == ["node-b"]
        assert sock["state"] != "streaming"

    b.start()
    wait_for(lambda: all(s["connected"] for s in _sockets(a, "node-b")), timeout=15,
             message="A's sockets to B connected again")
    assert {s["database"] for s in _sockets(a, "node-b")} >= {"system", "data"}
    a.call("insert", table="dog", records=[{"id": 3}])
    wait_for(lambda: b.count("dog") == 3, timeout=15, message="flowing after restart")


@pytest.mark.timeout(60)
def test_a_paused_link_shows_its_committed_position_after_a_restart(cluster):
    """After a restart, a link that does not connect (here: paused) shows the position
    it committed before, not 0 (cluster_status's committed_seq and received_seq)."""
    a, b = cluster(2)
    a.call("create_table", table="dog", primary_key="id")
    wait_for(lambda: any(s["database"] == "data" and s["state"] == "streaming"
                         for s in _sockets(a, "node-b")), message="data streaming")
    b.call("insert", table="dog", records=[{"id": 1}])
    wait_for(lambda: a.count("dog") == 1, message="the record on a")
    a.call("pause_replication", hostname="node-b", database="data")
    (before,) = [s for s in _sockets(a, "node-b") if s["database"] == "data"]
    assert before["committed_seq"] > 0
    (stream,) = a.call("get_replication_status", node="node-b", database="data")["streams"]
    checkpoint = stream["last_checkpoint"]
    assert checkpoint["time"] is not None
    a.restart()
    (after,) = [s for s in _sockets(a, "node-b") if s["database"] == "data"]
    assert after["state"] == "paused"
    assert (after["committed_seq"], after["received_seq"]) == (
        before["committed_seq"], before["committed_seq"])
    # ...and when it committed (the time is kept with the cursor).
    (stream,) = a.call("get_replication_status", node="node-b", database="data")["streams"]
    after_restart = stream["last_checkpoint"]
    assert after_restart["sequence"] == checkpoint["sequence"]
    # (stored as the cursor was built, a moment before the commit this run noted)
    assert after_restart["time"] is not None and after_restart["time"] <= checkpoint["time"]


@pytest.mark.timeout(60)
def test_acked_seq_is_not_reset_by_a_peer_reconnecting(cluster):
    """The peer's subscribe after a reconnect says how far it applied this node's log:
    ``acked_seq`` keeps showing it (it showed 0 until the peer's next ack)."""
    a, b = cluster(2)
    a.call("create_table", table="dog", primary_key="id")
    a.call("insert", table="dog", records=[{"id": 1}])
    wait_for(lambda: b.count("dog") == 1, message="the record on b")
    acked = wait_for(lambda: next(s["acked_seq"] for s in _sockets(a, "node-b")
                                  if s["database"] == "data"), message="b's ack")
    b.restart()
    wait_for(lambda: all(s["state"] == "streaming" for s in _sockets(b, "node-a")),
             message="b subscribed again")
    wait_for(lambda: next(s["acked_seq"] for s in _sockets(a, "node-b")
                          if s["database"] == "data") == acked, timeout=3,
             message=f"acked_seq {acked} shown again")


# -- add_node errors -----------------------------------------------------------------------


def _closed_port_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"wss://127.0.0.1:{port}"


def test_add_node_unreachable_url(node):
    """add_node to a closed port answers 4xx naming the URL and 'connection refused'."""
    url = _closed_port_url()
    before = hdb_nodes(node)
    res = node.post({"operation": "add_node", "hostname": "ghost", "url": url,
                     "verify_tls": False, "authorization": CREDS})
    assert 400 <= res.status_code < 500, res.text
    error = res.json()["error"]
    assert url in error and "connection refused" in error.lower(), error
    assert PASSWORD not in res.text
    assert hdb_nodes(node) == before
    assert node.call("cluster_status")["connections"] == []


def test_add_node_to_a_url_that_cannot_be_a_node_says_why(node):
    """A port out of range is a validation error naming the URL; the operations API's
    own port (plain HTTP) is named as the likely mistake."""
    before = hdb_nodes(node)
    bad = "wss://127.0.0.1:99999"
    res = node.post({"operation": "add_node", "hostname": "ghost", "url": bad,
                     "verify_tls": False, "authorization": CREDS})
    assert res.status_code == 400 and res.json()["code"] == "VALIDATION_ERROR", res.text
    assert bad in res.json()["error"] and "port" in res.json()["error"].lower(), res.text
    http = f"wss://127.0.0.1:{node.ops_port}"
    res = node.post({"operation": "add_node", "hostname": "ghost", "url": http,
                     "verify_tls": False, "authorization": CREDS})
    assert res.status_code == 400, res.text
    assert "operations API port rather than the replication port" in res.json()["error"]
    assert hdb_nodes(node) == before


def test_add_node_over_a_slow_path_waits_for_the_answer(node_factory):
    """A node request (add_node's probe and join here) waits for its answer up to its
    own timeout: its socket sends no keepalive pings, on either side. Before, with the
    tests' 200 ms pings (a 400 ms ping timeout), answers coming 500 ms late failed
    add_node with 'keepalive ping timeout' although the peer answered (lifecycle seed
    700 with 3 rounds, under CPU load: node-c answered node-b's join late, and the
    heal's add_node failed)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    to_a = TcpProxy(a.repl_port)  # node-b reaches node-a only through it
    try:
        to_a.reply_delay = 0.5  # all node-a sends arrives half a second late
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        to_a.reply_delay = 0.0  # (links ping as before: they reconnect once it is fast)
        wait_linked([(a, b), (b, a)])
        a.call("create_table", table="t", primary_key="id")
        a.call("insert", table="t", records=[{"id": 1}])
        wait_for(lambda: by_id(b, "t", 1) is not None, timeout=15, message="the row on b")
    finally:
        to_a.close()


def test_add_node_bad_credentials(node_factory):
    """add_node with a wrong password answers 4xx naming the peer and the auth failure."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    before_a, before_b = hdb_nodes(a), hdb_nodes(b)
    for auth in ({"username": "admin", "password": "not-the-password"},
                 {"username": "nobody", "password": PASSWORD}):
        res = a.post({"operation": "add_node", "hostname": b.name, "url": b.repl_url,
                      "verify_tls": False, "authorization": auth})
        assert 400 <= res.status_code < 500, res.text
        error = res.json()["error"]
        assert b.repl_url in error, error
        assert "authoriz" in error.lower() or "credential" in error.lower(), error
        assert auth["password"] not in res.text
    assert hdb_nodes(a) == before_a
    assert hdb_nodes(b) == before_b
    assert a.call("cluster_status")["connections"] == []
    assert b.call("cluster_status")["connections"] == []


def test_add_node_refuses_a_peer_with_this_nodes_name(node_factory):
    """Two nodes given the same replication.hostname (two containers with one host
    name): the join is refused with a 400 that says each node needs its own name."""
    a = node_factory("node-a")
    twin = node_factory("node-b", env={"REPLICATION_HOSTNAME": "node-a"})
    before_a, before_twin = hdb_nodes(a), hdb_nodes(twin)
    res = a.post({"operation": "add_node", "hostname": "twin", "url": twin.repl_url,
                  "verify_tls": False, "authorization": CREDS})
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert "named 'node-a'" in error and "replication.hostname" in error, error
    assert a.call("cluster_status")["connections"] == []
    assert (hdb_nodes(a), hdb_nodes(twin)) == (before_a, before_twin)


def test_add_node_requires_hostname_or_url(node):
    """add_node without hostname and url is 400 "'hostname' or 'url' is required"."""
    before = hdb_nodes(node)
    res = node.post({"operation": "add_node", "verify_tls": False, "authorization": CREDS})
    assert res.status_code == 400
    assert harper_error(res.json()) == {"error": "'hostname' or 'url' is required"}
    assert hdb_nodes(node) == before


@pytest.mark.parametrize("operation,camel", [("add_node", "addNode"),
                                             ("cluster_status", "clusterStatus")])
def test_cluster_operations_need_super_user(node, operation, camel):
    """A non-super_user gets Harper's 403 body for cluster operations."""
    node.call("add_role", role="reader", permission={"super_user": False,
                                                     "data": {"tables": {}}})
    node.call("add_user", username="bob", password="bobpw", role="reader", active=True)
    body: dict[str, Any] = {"operation": operation}
    if operation == "add_node":
        body.update(hostname="x", url="wss://127.0.0.1:1", verify_tls=False)
    res = node.post(body, auth=("bob", "bobpw"))
    assert res.status_code == 403, res.text
    assert harper_error(res.json()) == {"error": FORBIDDEN,
                          "unauthorized_access": [
                              f"Operation '{camel}' is restricted to 'super_user' roles"],
                          "invalid_schema_items": []}
    assert "bobpw" not in res.text


def test_a_renamed_node_drops_its_old_row_and_its_peers_say_how_to_follow(node_factory):
    """B restarts with another replication.hostname: it forgets the row of its old name
    (it dialed itself under it), A's link names the fix, and remove_node plus add_node
    on A bring the pair back."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(a, b), (b, a)])
    b.stop()
    b.extra_env["REPLICATION_HOSTNAME"] = "node-b2"
    b.start()
    assert {r["name"] for r in hdb_nodes(b)} == {"node-a", "node-b2"}

    def told() -> bool:
        conn = connection(a, "node-b")
        return conn is not None and any(
            "remove_node node-b and add_node it by its new name" in (s.get("last_error") or "")
            for s in conn["database_sockets"])

    wait_for(told, timeout=20, message="A's link to the old name naming the fix")
    a.call("remove_node", hostname="node-b")
    a.call("add_node", hostname="node-b2", url=b.repl_url, verify_tls=False,
           authorization=CREDS)
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=20, message="A's row on B")
    assert connection(b, "node-b") is None


@pytest.mark.timeout(120)
def test_update_node_with_a_new_url_moves_the_peer(node_factory):
    """update_node naming a known peer with a new url (its address changed) joins it
    there and records that url; the old address is gone."""
    from tests.proxy_util import TcpProxy

    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    old = TcpProxy(b.repl_port)
    try:
        a.call("add_node", hostname=b.name, url=old.url, verify_tls=False,
               authorization=CREDS)
        wait_linked([(a, b)], ("system", "data"))
    finally:
        old.close()
    a.call("update_node", hostname=b.name, url=b.repl_url, authorization=CREDS)
    assert (connection(a, b.name) or {}).get("url") == b.repl_url
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=15, message="a to b")
    b.call("insert", table="t1", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t1", 2) is not None, timeout=15, message="b to a, new url")


@pytest.mark.timeout(120)
def test_update_node_with_the_url_of_another_node_changes_nothing(node_factory):
    """update_node for node-b naming node-c's url is refused with a 400, and neither
    node-a's row for node-b nor node-c learns anything of it."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    join(a, b)
    body = a.call("update_node", expect=400, hostname=b.name, url=c.repl_url,
                  verify_tls=False, authorization=CREDS)
    assert "node-c" in harper_error(body)["error"], body
    assert (connection(a, b.name) or {}).get("url") == b.repl_url
    assert connection(c, a.name) is None
