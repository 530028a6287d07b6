"""A verify between two nodes while a full copy between them has yet to start."""

from __future__ import annotations

import threading
from typing import Any

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, connection


def _linked(node: Any, peer: str) -> bool:
    conn = connection(node, peer)
    return conn is not None and bool(conn["database_sockets"]) and all(
        s["connected"] for s in conn["database_sockets"])


def _socket(node: Any, peer: str, database: str) -> dict[str, Any]:
    conn = connection(node, peer) or {"database_sockets": []}
    return next((dict(s) for s in conn["database_sockets"] if s["database"] == database), {})


class HoldingProxy(TcpProxy):
    """A TcpProxy whose connections opened while ``holding`` is set get nothing back
    from the target until :meth:`release` (a link dialled then cannot connect); those
    opened before flow on."""

    def __init__(self, target_port: int) -> None:
        self.holding = threading.Event()
        self.released = threading.Event()
        super().__init__(target_port)

    def release(self) -> None:
        self.released.set()

    def _pump(self, src: Any, dst: Any, reply: bool) -> None:
        if reply and self.holding.is_set():  # a connection accepted during the hold
            self.released.wait()
        super()._pump(src, dst, reply)


def test_a_verify_before_the_peers_first_copy_waits_for_it(node_factory: Any) -> None:
    """A new database's first copies run both ways, and one can end before the other
    has begun. A verify in between answers that a copy is to come, and the
    verification after node-a's copy waits for node-b's, then shows both in sync.

    Before, node-b reported no copy until its link connected: node-a's verification
    compared a table node-b had not copied yet, recorded every row as a difference and
    ended (or, the table not there yet, failed), so node-a showed the link out of sync
    until the next background verify: the race tests/test_probes.py's copy test
    loses when node-d's link is slow to start. node-b's link to node-a is held here,
    so its copy starts only after node-a's ended."""
    env = {"REPLICATION_VERIFYINTERVAL": "0"}  # no background verify to hide it
    a = node_factory("node-a", env=env)
    b = node_factory("node-b", env=env)
    to_a = HoldingProxy(a.repl_port)  # node-b reaches node-a only through it
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: _linked(a, b.name) and _linked(b, a.name), timeout=20,
                 message="both nodes linked")
        to_a.holding.set()  # node-b's link for a new database cannot connect
        a.call("create_table", database="late", table="t", primary_key="id")
        a.call("insert", database="late", table="t",
               records=[{"id": n, "v": f"value-{n}"} for n in range(300)])
        # node-b learns the database through its system link (opened before the hold;
        # the table comes with the copy), and node-a's own copy from node-b (dialled
        # directly) ends at once.
        wait_for(lambda: _socket(b, a.name, "late").get("state") == "connecting"
                 and _socket(a, b.name, "late").get("state") == "streaming",
                 timeout=20, message="node-a's copy done, node-b's link held")
        result = a.call("verify_cluster", database="late", nodes=[b.name])
        entry = result["checked"][0]
        assert result["in_sync"] is False and entry["differences"] == 0, result
        assert "full copy" in entry["error"] and "yet to start" in entry["error"], result
        to_a.release()

        def in_sync(node: Any, peer: str) -> bool:
            return bool((_socket(node, peer, "late").get("verified") or {}).get("in_sync"))

        wait_for(lambda: in_sync(b, a.name) and in_sync(a, b.name), timeout=30,
                 message="both sides verified in sync after node-b's copy")
        assert b.count("t", "late") == 300
    finally:
        to_a.release()
        to_a.close()
