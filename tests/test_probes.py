"""``GET /ready`` (storage open, listeners up, no startup copy) and ``GET
/health/{component}``, on real nodes.

The startup copy is held in place by a proxy that lets each connection carry at most
1 MB from the source and then stalls it until the test releases it, so the copy is
observed half done without any timing assumption.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import ADMIN, InProcessNode, harper_error, wait_for
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS

# Long keepalives: a stalled direction must not look like a dead link during the test.
SLOW_PINGS = {"REPLICATION_PINGINTERVAL": "5000"}
RECORDS = 4000


class BudgetProxy(TcpProxy):
    """A TcpProxy whose connections carry at most ``budget`` bytes from the target, then
    wait until :meth:`release`."""

    def __init__(self, target_port: int, budget: int) -> None:
        self.budget = budget
        self.released = threading.Event()
        super().__init__(target_port)

    def release(self) -> None:
        self.released.set()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        from_target = reply
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_target and sent + len(data) > self.budget:
                    self.released.wait()
                sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """node-a holding dev.dog with 4000 records of about 600 bytes."""
    a = InProcessNode("node-a", tmp_path_factory.mktemp("probes") / "node-a",
                      SLOW_PINGS).start()
    a.call("create_table", database="dev", table="dog", primary_key="id")
    for start in range(0, RECORDS, 500):
        a.call("insert", database="dev", table="dog",
               records=[{"id": i, "pad": "x" * 600} for i in range(start, start + 500)])
    yield a
    a.close()


def ready(node: Any) -> tuple[int, dict[str, Any]]:
    response = node.client.get(node.url + "ready", auth=ADMIN)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def joiner(source: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """node-c (not joined yet) and the proxy it will reach node-a through."""
    c = InProcessNode("node-c", tmp_path_factory.mktemp("probes-c") / "node-c",
                      SLOW_PINGS).start()
    proxy = BudgetProxy(source.repl_port, budget=1_000_000)
    yield {"node": c, "proxy": proxy}
    proxy.release()
    c.close()
    proxy.close()


def test_ready_is_503_during_a_startup_copy(source, joiner):
    """A new node is not ready while its first copy of dev runs (503 naming the database
    and the peer), and is ready once the copy completes."""
    c, proxy = joiner["node"], joiner["proxy"]
    assert ready(c) == (200, {"ready": True})
    c.call("add_node", hostname="node-a", url=proxy.url, verify_tls=False,
           authorization=CREDS)

    def copying_dev() -> dict[str, Any] | None:
        status, body = ready(c)
        reasons = body.get("reasons", [])
        return body if status == 503 and any("'dev'" in r for r in reasons) else None

    body = wait_for(copying_dev, timeout=30, message="node-c not ready during its copy")
    assert body["ready"] is False
    assert any("database 'dev' is receiving its first full copy from node-a" in r
               for r in body["reasons"]), body
    assert c.count("dog", "dev") < RECORDS  # it really is half way
    proxy.release()
    wait_for(lambda: ready(c)[0] == 200, timeout=30, message="node-c ready after the copy")
    assert c.count("dog", "dev") == RECORDS
    assert ready(c) == (200, {"ready": True})


def test_health_components(source):
    """/health/storage, operations_api, replication and a peer name each serve their part
    of /health; an unknown component is a 404 in the error shape."""
    for name in ("storage", "operations_api", "replication"):
        response = source.client.get(source.url + f"health/{name}", auth=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["component"] == name and body["status"] == "ok"
    health = source.client.get(source.url + "health", auth=ADMIN).json()
    storage = source.client.get(source.url + "health/storage", auth=ADMIN).json()
    assert storage["databases"] == health["storage"]["databases"]
    api = source.client.get(source.url + "health/operations_api", auth=ADMIN).json()
    assert api["port"] == source.ops_port
    repl = source.client.get(source.url + "health/replication", auth=ADMIN).json()
    assert repl["port"] == source.repl_port
    unknown = source.client.get(source.url + "health/nothing-here", auth=ADMIN)
    assert unknown.status_code == 404
    assert "unknown health component 'nothing-here'" in harper_error(unknown.json())["error"]


def test_health_of_a_peer(source, joiner):
    """/health/<peer> lists that peer's links: 200 while connected, 503 once it stops."""
    c = joiner["node"]

    def peer() -> tuple[int, dict[str, Any]]:
        response = source.client.get(source.url + "health/node-c", auth=ADMIN)
        return response.status_code, response.json()

    status, body = wait_for(lambda: peer()[0] == 200 and peer(), timeout=30,
                            message="node-c links up")
    assert body["node"] == "node-c" and body["links"]
    assert all(link["node"] == "node-c" for link in body["links"])
    c.stop()
    status, body = wait_for(lambda: peer()[0] == 503 and peer(), timeout=30,
                            message="node-c shown down")
    assert body["status"] == "degraded"


@pytest.mark.timeout(120)
def test_verify_during_a_full_copy_waits_for_it(source, tmp_path_factory):
    """While a new node's first copy is held half done, a verify between the two answers
    at once that a copy is in progress (instead of reading every row not copied yet);
    once the copy ends, the verification after it shows both sides in sync."""
    d = InProcessNode("node-d", tmp_path_factory.mktemp("probes-d") / "node-d",
                      SLOW_PINGS).start()
    proxy = BudgetProxy(source.repl_port, budget=1_000_000)
    try:
        d.call("add_node", hostname="node-a", url=proxy.url, verify_tls=False,
               authorization=CREDS)
        # The first 503 is for the system database's copy (dev's has not begun):
        # wait for dev's.
        wait_for(lambda: any("'dev'" in r for r in ready(d)[1].get("reasons", [])),
                 timeout=30, message="node-d copying dev")
        assert d.count("dog", "dev") < RECORDS
        for node in (source, d):
            result = node.call("verify_cluster", database="dev", nodes=[
                "node-d" if node is source else "node-a"])
            entry = result["checked"][0]
            assert result["in_sync"] is False and entry["differences"] == 0, result
            assert "full copy" in entry["error"] and "in progress" in entry["error"], result
        proxy.release()

        def verified(node: Any, peer: str) -> bool:
            links = [s for c in node.call("cluster_status")["connections"]
                     if c["name"] == peer for s in c["database_sockets"]
                     if s["database"] == "dev"]
            return bool(links) and all((s.get("verified") or {}).get("in_sync")
                                       for s in links)

        wait_for(lambda: verified(d, "node-a") and verified(source, "node-d"), timeout=60,
                 message="both sides verified after the copy")
        assert d.count("dog", "dev") == RECORDS
        assert source.call("verify_cluster", database="dev", nodes=["node-d"])["in_sync"]
    finally:
        proxy.release()
        d.close()
        proxy.close()
