"""Replicated state stays right through subscription changes, removals, gossip under
explicit subscriptions, configure_cluster failures and network heals (issue 7)."""

from __future__ import annotations

import select
import socket
import threading
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.lifecycle_util import CREDS, db_socket, free_port, peer_names, post_with
from tests.repl_util import (
    all_records,
    by_id,
    connection,
    has_table,
    hdb_nodes,
    insert_batches,
    join,
    linked,
    stays,
    wait_linked,
)


def _sub(table: str, database: str = "data") -> dict[str, Any]:
    return {"database": database, "table": table, "subscribe": True, "publish": True}


class Writer:
    """Inserts into one table of a node from a thread as fast as it can, until stopped."""

    def __init__(self, node: Any, table: str, start: int) -> None:
        self.node, self.table, self.next_id = node, table, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                ids = range(self.next_id, self.next_id + 5)
                res = post_with(client, self.node, "insert", table=self.table,
                                records=[{"id": i, "v": "busy"} for i in ids])
                if res.status_code == 200:
                    self.next_id += 5


def _ids(node: Any, table: str) -> set[int]:
    return {r["id"] for r in all_records(node, table, attributes=["id"])}


# -- item 6: cursors are not written back by an in-flight apply --------------------------


@pytest.mark.timeout(240)
def test_widening_under_concurrent_writes_brings_each_tables_history(node_factory):
    """Each table added by set_node_replication while another table streams busily
    arrives with its whole history (the forgotten cursor is not written back)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    widened = ["w1", "w2", "w3", "w4"]
    for table in ["busy", *widened]:
        a.call("create_table", table=table, primary_key="id")
    for table in widened:
        insert_batches(a, table, 0, 300)
    join(b, a, subscriptions=[_sub("busy")])
    wait_linked([(b, a), (a, b)], ("system", "data"))
    with Writer(a, "busy", 0):
        wait_for(lambda: len(_ids(b, "busy")) > 20, timeout=20, message="busy streaming")
        for table in widened:
            b.call("set_node_replication", hostname=a.name, subscriptions=[_sub(table)])
            wait_for(lambda t=table: _ids(b, t) == set(range(300)), timeout=30,
                     message=f"{table}'s history on B after widening")
    wait_for(lambda: _ids(b, "busy") == _ids(a, "busy"), timeout=30,
             message="busy converged")


@pytest.mark.timeout(240)
def test_remove_under_concurrent_writes_forgets_the_cursor(node_factory):
    """A node removed (by its peer) while it applies a busy stream keeps no cursor for
    that peer, so a re-add starts with a full copy."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="busy", primary_key="id")
    join(a, b)
    wait_linked([(b, a)], ("system", "data"))
    cursors = b.node.storage.databases["data"]
    with Writer(a, "busy", 0):
        for _ in range(6):
            wait_for(lambda: _ids(b, "busy"), timeout=20, message="B applying A's stream")
            wait_for(lambda: cursors.cursor(a.name), timeout=20, message="B has a cursor")
            # A tells B first; B forgets A while its link from A is still streaming.
            a.call("remove_node", hostname=b.name)
            stays(lambda: cursors.cursor(a.name) == {}, duration=0.5, interval=0.01)
            join(a, b)
            wait_linked([(b, a)], ("system", "data"))
    wait_for(lambda: _ids(b, "busy") == _ids(a, "busy"), timeout=30,
             message="busy converged after re-adds")


# -- item 9: origins assigned after the hello are announced during a copy ----------------


@pytest.mark.timeout(300)
def test_copy_announces_origins_assigned_after_the_hello(node_factory):
    """Rows another node's copy brought into the publisher while a copy to B is running
    (their origin id is newer than B's hello) reach B with the copy."""
    # Slow pings: a loaded machine must not drop B's link (a new hello would hide it).
    env = {"REPLICATION_PINGINTERVAL": "5000"}
    a, b, c = (node_factory(f"node-{n}", env=env) for n in "abc")
    a.call("create_table", table="t", primary_key="id")
    join(a, c)
    wait_for(lambda: has_table(c, "t"), timeout=20, message="t on C")
    a.call("remove_node", hostname=c.name)
    wait_for(lambda: a.name not in peer_names(c), timeout=10, message="C forgot A")
    # A's copy of C's rows (their origin is new on A) goes into no log of A.
    c_ids = set(range(10**6, 10**6 + 100))
    c.call("insert", table="t", records=[{"id": i, "v": "from-c"} for i in sorted(c_ids)])
    # Big rows: the publisher can run only a few thousand rows ahead of B's applying.
    insert_batches(a, "t", 0, 20000, batch=500, pad="x" * 2000)
    # B (explicit subscriptions: no data from C through gossip) copies t from A ...
    join(b, a, subscriptions=[_sub("t")])
    wait_for(lambda: (db_socket(b.call("cluster_status"), a.name, "data") or {}).get("copy"),
             timeout=30, interval=0.005, message="B's copy from A under way")
    # ... while A pairs with C again and copies C's rows in (keys after A's); A sends
    # nothing to C, so B's copy is the only one A serves.
    join(a, c, subscriptions=[{"database": "data", "table": "t", "subscribe": True,
                               "publish": False}])
    wait_for(lambda: c_ids <= _ids(a, "t"), timeout=60, message="C's rows on A")
    wait_for(lambda: c_ids <= _ids(b, "t"), timeout=60, message="C's rows on B")
    assert len(_ids(b, "t")) == 20100


# -- item 10: gossip never widens explicit subscriptions ---------------------------------


@pytest.mark.timeout(240)
def test_gossip_keeps_a_publish_only_node_publish_only(node_factory):
    """A node added with publish-only subscriptions receives no data over the links
    gossip forms; its published table still flows; learned rows are system-only."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    b.call("create_database", database="dev")
    b.call("create_table", database="dev", table="dog", primary_key="id")
    a.call("create_table", table="other", primary_key="id")
    join(a, c)
    wait_for(lambda: has_table(c, "other"), timeout=20, message="other on C")
    # B publishes dev.dog to A and receives nothing.
    join(b, a, subscriptions=[{"database": "dev", "table": "dog", "subscribe": False,
                               "publish": True}])
    wait_linked([(b, c), (c, b)], ("system",))
    for node, peer in ((b, c), (c, b)):
        row = next(r for r in hdb_nodes(node) if r["name"] == peer.name)
        assert row.get("learned") is True, row
        assert row.get("subscriptions") == [] and row.get("replicates") is False, row
        conn = connection(node, peer.name)
        assert conn is not None and conn["replicates"] is False
        assert {s["database"] for s in conn["database_sockets"]} == {"system"}, conn
    row_a = next(r for r in hdb_nodes(c) if r["name"] == a.name)
    assert row_a.get("subscriptions") is None  # the explicit A-C pairing is untouched

    b.call("insert", database="dev", table="dog", records=[{"id": 1, "name": "rex"}])
    for node in (a, c):
        wait_for(lambda n=node: by_id(n, "dog", 1, "dev") is not None, timeout=20,
                 message=f"B's dog on {node.name}")
    a.call("insert", table="other", records=[{"id": 1}])
    c.call("insert", table="other", records=[{"id": 2}])
    for node in (a, c):
        wait_for(lambda n=node: _ids(n, "other") == {1, 2}, timeout=20,
                 message=f"A and C still replicate fully ({node.name})")
    stays(lambda: not has_table(b, "other") or not _ids(b, "other"), duration=2.0)


# -- item 11: configure_cluster is all or nothing ----------------------------------------


def _entry(node: Any, **extra: Any) -> dict[str, Any]:
    return {"hostname": node.name, "url": node.repl_url, "verify_tls": False,
            "authorization": CREDS, **extra}


@pytest.mark.timeout(240)
def test_configure_cluster_changes_nothing_when_a_connection_fails(cluster, node_factory):
    """A configure_cluster whose only connection is unreachable (or whose credentials
    are wrong) removes no node, adds none, and reports each connection."""
    a, b, c = cluster(3)
    rows_before = sorted(r["name"] for r in hdb_nodes(a))
    ghost = {"hostname": "ghost-node", "url": f"wss://127.0.0.1:{free_port()}",
             "verify_tls": False, "authorization": CREDS}
    res = a.post({"operation": "configure_cluster", "connections": [ghost]})
    assert 400 <= res.status_code < 500, res.text
    body = res.json()
    assert body["connections"][0]["node_name"] == "ghost-node"
    assert "Could not reach" in body["connections"][0]["error"]
    assert "no connection was added or removed" in body["error"]

    d = node_factory("node-d")
    bad = _entry(d, authorization={"username": "admin", "password": "wrong"})
    res = a.post({"operation": "configure_cluster", "connections": [_entry(b), bad]})
    assert 400 <= res.status_code < 500, res.text
    outcomes = {o["node_name"]: o for o in res.json()["connections"]}
    assert "authorization failed" in outcomes["node-d"]["error"]
    assert "error" not in outcomes["node-b"]
    assert "wrong" not in res.text  # the password is never echoed

    assert peer_names(a) == {"node-b", "node-c"}
    assert sorted(r["name"] for r in hdb_nodes(a)) == rows_before
    assert "node-a" in peer_names(c) and "node-d" not in peer_names(a)
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(c, "t", 1) is not None, timeout=20, message="A->C still flows")

    # A known node without credentials is probed with this node's certificate.
    res = a.call("configure_cluster", connections=[
        {"hostname": b.name, "url": b.repl_url}, {"hostname": c.name, "url": c.repl_url}])
    assert all("error" not in o for o in res["connections"]), res


# -- item 12: links come back quickly after a heal ---------------------------------------


class Refuser:
    """While a node is down, accept and drop every connection on its replication port
    (a peer that answers nothing), counting the dial attempts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Refuser:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    continue
                conn.close()
                self.accepted += 1


def _all_back(node: Any, peer: str) -> bool:
    conn = connection(node, peer)
    return bool(conn and conn["database_sockets"]
                and all(s["connected"] for s in conn["database_sockets"]))


@pytest.mark.timeout(240)
def test_links_return_within_seconds_after_a_long_outage(cluster):
    """After a peer has been unreachable long enough for backoff to grow, every link to
    it is back within 5 s of it answering again, and the old error is timestamped."""
    a, b, c = cluster(3)
    a.call("create_table", table="t", primary_key="id")
    for node in (a, b, c):
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="t everywhere")
    wait_linked([(a, c), (b, c)], ("system", "data"))
    c.stop()
    with Refuser(c.repl_sock) as refuser:
        # Enough failed dials for a 30 s backoff ceiling to be reached several times.
        wait_for(lambda: refuser.accepted >= 32, timeout=90, interval=0.2,
                 message="peers dialing the dead node")
    c.start()
    for node in (a, b):
        wait_for(lambda n=node: _all_back(n, c.name), timeout=5, interval=0.05,
                 message=f"{node.name}'s links to C back")
    for node in (a, b):  # the error from the outage stays, with its time
        sock = db_socket(node.call("cluster_status"), c.name, "system")
        assert sock is not None and sock["connected"], sock
        assert sock["last_error"] and sock.get("last_error_at"), sock
    a.call("insert", table="t", records=[{"id": 7}])
    wait_for(lambda: by_id(c, "t", 7) is not None, timeout=10, message="A->C flows")
    assert linked(b, c.name, ("system", "data"))
