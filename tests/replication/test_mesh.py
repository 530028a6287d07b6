"""harpsync/replication/mesh.py: membership over a fake link runtime (its MeshHost seam).

Storage and keys are real (LMDB and certificates in a temporary directory); only the
link runtime is a fake that records what membership asked of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync.errors import BadRequestError
from harpsync.replication.mesh import Mesh
from harpsync.security import NodeKeys
from harpsync.storage.store import Storage


class FakeHost:
    """A MeshHost that records reconciles, stopped links and closed sockets."""

    def __init__(self, keys: NodeKeys) -> None:
        self.keys = keys
        self.url = "wss://node-a:9933"
        self.ping_interval = 5.0
        self.reconcile_lock = asyncio.Lock()
        self.reconciled: list[str | None] = []
        self.stopped: list[str] = []
        self.dropped: list[tuple[str, str]] = []
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.mesh: Mesh | None = None

    def check_peer(self, name: str, link: Any) -> str | None:
        assert self.mesh is not None
        return self.mesh.check_peer(name, link)

    async def reconcile(self, restart_peer: str | None = None) -> None:
        assert not self.reconcile_lock.locked(), "reconcile takes the lock itself"
        self.reconciled.append(restart_peer)

    async def stop_links(self, name: str) -> None:
        assert self.reconcile_lock.locked(), "links stop with the reconcile lock held"
        self.stopped.append(name)

    async def drop_inbound(self, name: str, reason: str) -> None:
        self.dropped.append((name, reason))

    async def drop_relaying(self, origin: str, reason: str) -> None:
        self.dropped.append((f"relaying {origin}", reason))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.spawned.append(coro)
        coro.close()  # gossip to peers: not sent in these tests


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = Storage(tmp_path / "db", "node-a", 1 << 26)
    store.open()
    yield store
    store.close()


@pytest.fixture(scope="module")
def peer_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeKeys]:
    root = tmp_path_factory.mktemp("keys")
    return {name: NodeKeys.load_or_create(root / name, name, [name])
            for name in ("node-a", "node-b", "node-c")}


@pytest.fixture
async def mesh(storage: Storage, peer_keys: dict[str, NodeKeys],
               tmp_path: Path) -> tuple[Mesh, FakeHost]:
    keys = NodeKeys.load_or_create(tmp_path / "own-keys", "node-a", ["node-a"])
    host = FakeHost(keys)
    mesh = host.mesh = Mesh(host, storage, keys, None, "node-a")
    mesh.load_rows()
    await mesh.save_own_row()
    return mesh, host


def gossip(keys: NodeKeys, **extra: Any) -> dict[str, Any]:
    """The identity a peer would gossip for the node of ``keys``."""
    return {"name": extra.pop("name"), "url": extra.pop("url"),
            "ca": keys.ca_pem.decode(), "pin": keys.pin, **extra}


async def test_learned_node_replicates_fully(mesh, peer_keys):
    """A node heard of by gossip, on a node with no explicit subscriptions, gets a
    learned row that replicates everything, and the links are reconciled once."""
    m, host = mesh
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")])
    row = m.rows["node-c"]
    assert row["learned"] is True and row["replicates"] is True
    assert row["subscriptions"] is None and row["pin"] == peer_keys["node-c"].pin
    assert host.reconciled == [None]


async def test_selective_node_learns_system_only(mesh, peer_keys):
    """When an operator gave this node explicit subscriptions, gossip adds only a
    system link (replicates false, no subscriptions): it never widens them."""
    m, _ = mesh
    await m.save_row({"name": "node-b", "url": "wss://b:1", "learned": False,
                      "subscriptions": [{"database": "data", "table": "t",
                                         "subscribe": True, "publish": False}]})
    assert m.is_selective()
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")])
    row = m.rows["node-c"]
    assert row["replicates"] is False and row["subscriptions"] == []


async def test_flagged_node_learns_system_only(mesh, peer_keys):
    """A gossiped node flagged selective gets a system-only row on any node."""
    m, _ = mesh
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1",
                                selective=True)])
    assert m.rows["node-c"]["replicates"] is False


async def test_gossip_never_changes_an_existing_row(mesh, peer_keys):
    """Gossip about a node this node knows leaves its row as it is."""
    m, host = mesh
    await m.save_row({"name": "node-b", "url": "wss://b:1", "learned": False})
    await m.learn_nodes([gossip(peer_keys["node-b"], name="node-b", url="wss://elsewhere:2")])
    assert m.rows["node-b"]["url"] == "wss://b:1"
    assert host.reconciled == []  # nothing changed, nothing to reconcile


async def test_forget_node_stops_links_then_reconciles(mesh, peer_keys):
    """Removing a node stops its links under the reconcile lock, deletes its row,
    reconciles and closes its inbound sockets; its key is barred."""
    m, host = mesh
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")],
                        reconcile=False)
    await m.forget_node("node-c", notify=False)
    assert "node-c" not in m.rows
    assert host.stopped == ["node-c"]
    assert host.reconciled == [None]
    assert host.dropped == [("node-c", "node removed")]
    assert peer_keys["node-c"].pin in m.keys.barred_pins()


async def test_gossip_never_readds_a_removed_node(mesh, peer_keys):
    """A removed node leaves a tombstone: gossip naming it again is ignored, even from
    an older peer that sends no pin (so the barred key cannot catch it)."""
    m, _ = mesh
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")])
    await m.forget_node("node-c", notify=False)
    unpinned = gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")
    del unpinned["pin"]
    await m.learn_nodes([unpinned])
    assert "node-c" not in m.rows


async def test_gossip_ignores_a_removed_key_under_another_name(mesh, peer_keys):
    """A removed node's key, introduced again under a new name, is not learned."""
    m, _ = mesh
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-c", url="wss://c:1")])
    await m.forget_node("node-c", notify=False)
    await m.learn_nodes([gossip(peer_keys["node-c"], name="node-z", url="wss://z:1")])
    assert "node-z" not in m.rows


async def test_forget_unknown_node_is_a_bad_request(mesh):
    """Removing a node that is not known is a 400 naming it."""
    m, host = mesh
    with pytest.raises(BadRequestError, match="node-q does not exist"):
        await m.forget_node("node-q", notify=False)
    assert host.stopped == [] and host.reconciled == []


async def test_rows_survive_a_reload(mesh, storage):
    """Rows are kept in system.hdb_nodes: a new Mesh over the same storage reads them,
    without this node's own row."""
    m, host = mesh
    await m.save_row({"name": "node-b", "url": "wss://b:1", "learned": False})
    again = Mesh(host, storage, m.keys, None, "node-a")
    again.load_rows()
    assert set(again.rows) == {"node-b"}
    assert again.rows["node-b"]["url"] == "wss://b:1"


T1_TO_B = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]


async def test_a_join_that_changes_the_flows_closes_the_joiners_sockets(mesh, peer_keys):
    """A peer's join (proven by its certificate) that changes what flows with it closes
    the sockets it opened here: their publishers filter by the old row, and their
    hello told it the old ``relay_tables``. Before, they went on until the joiner
    restarted its links, and if its last step failed (the answer lost), for good. A
    join that changes nothing else (a start time) leaves them open."""
    m, host = mesh
    await m.save_row({"name": "node-b", "url": "wss://b:1", "learned": False,
                      "ca": peer_keys["node-b"].ca_pem.decode(),
                      "pin": peer_keys["node-b"].pin})
    await m.accept_join({"node": "node-b", "subscriptions": T1_TO_B})
    assert ("node-b", "node settings changed") in host.dropped
    host.dropped.clear()
    await m.accept_join({"node": "node-b", "subscriptions": T1_TO_B, "start_time": 5})
    assert host.dropped == []
