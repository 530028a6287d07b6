"""The relay planner, driven in memory with fake links (the glue behind its seam)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from harpsync.replication.relays import RELAY_AFTER, RelayPlanner


@dataclass
class FakeLink:
    peer: str
    database: str
    reachable: bool = True
    streaming: bool = True
    paused: bool = False
    restarts: int = 0
    origins: list[str] = field(default_factory=list)

    def origin_names(self) -> Iterable[str]:
        return self.origins

    async def restart(self) -> None:
        self.restarts += 1

    async def settle(self) -> None:
        pass


async def test_a_peer_removed_and_added_again_gets_the_full_grace_before_a_relay() -> None:
    """A link down when its peer was removed leaves no "down since" behind: the peer
    added again (its new link still connecting) is not relayed at once."""
    links: dict[tuple[str, str], FakeLink] = {
        ("node-b", "data"): FakeLink("node-b", "data", reachable=False, streaming=False),
        ("node-c", "data"): FakeLink("node-c", "data"),
    }
    known = ["node-b", "node-c"]
    planner = RelayPlanner("node-a", lambda: links, lambda: ["data"], lambda _db: known)
    await planner.plan(now=0.0)
    assert planner.assignments["data"] == {}  # down, but not for long enough yet
    removed = links.pop(("node-b", "data"))
    known.remove("node-b")  # it never wrote here: no longer an origin once removed
    await planner.plan(now=10.0)
    links[("node-b", "data")] = removed  # added again, connecting
    known.append("node-b")
    await planner.plan(now=10.0 + RELAY_AFTER / 2)
    assert planner.assignments["data"] == {}
    await planner.plan(now=10.0 + RELAY_AFTER * 2)  # still down after the grace: relayed
    assert planner.assignments["data"] == {"node-b": "node-c"}


def _cut_from_a() -> dict[tuple[str, str], FakeLink]:
    """node-x's links: the one from node-a down, those from node-b and node-c up."""
    return {("node-a", "data"): FakeLink("node-a", "data", reachable=False, streaming=False),
            ("node-b", "data"): FakeLink("node-b", "data"),
            ("node-c", "data"): FakeLink("node-c", "data")}


async def test_a_peer_taking_the_origin_from_this_node_is_not_its_relay() -> None:
    """node-b takes node-a's writes from this node (it relays them to node-b): node-b
    has none of its own to relay back, so node-c relays node-a here, and node-b's link
    restarts before node-c's, to stop carrying node-a first."""
    links = _cut_from_a()
    asking: set[tuple[str, str]] = set()
    order: list[str] = []
    for link in links.values():
        async def restart(link: FakeLink = link) -> None:
            order.append(link.peer)
        link.restart = restart  # type: ignore[method-assign]
    planner = RelayPlanner("node-x", lambda: links, lambda: ["data"],
                           lambda _db: ["node-a", "node-b", "node-c"], lambda _db: asking)
    await planner.plan(now=0.0)
    await planner.plan(now=RELAY_AFTER * 2)
    assert planner.assignments["data"] == {"node-a": "node-b"}  # the first by name
    asking.add(("node-b", "node-a"))
    order.clear()
    await planner.plan(now=RELAY_AFTER * 3)
    assert planner.assignments["data"] == {"node-a": "node-c"}
    assert order == ["node-b", "node-c"]
    order.clear()
    await planner.plan(now=RELAY_AFTER * 4)  # node-b stops asking: node-c stays
    asking.clear()
    await planner.plan(now=RELAY_AFTER * 5)
    assert planner.assignments["data"] == {"node-a": "node-c"} and order == []


async def test_when_every_peer_takes_the_origin_from_this_node_the_relay_stays() -> None:
    """No peer has anything of node-a's to relay: the relay chosen stays, rather than
    the links restarting at every pass."""
    links = _cut_from_a()
    planner = RelayPlanner("node-x", lambda: links, lambda: ["data"],
                           lambda _db: ["node-a", "node-b", "node-c"],
                           lambda _db: {("node-b", "node-a"), ("node-c", "node-a")})
    await planner.plan(now=0.0)
    await planner.plan(now=RELAY_AFTER * 2)
    assert planner.assignments["data"] == {"node-a": "node-b"}
    restarts = {peer: link.restarts for (peer, _), link in links.items()}
    for tick in range(3, 6):
        await planner.plan(now=RELAY_AFTER * tick)
    assert planner.assignments["data"] == {"node-a": "node-b"}
    assert {peer: link.restarts for (peer, _), link in links.items()} == restarts


async def test_a_relay_that_carries_all_of_the_origin_is_preferred() -> None:
    """node-b carries only some of what this node takes of node-a, node-c all of it:
    node-c relays node-a, also when node-b was chosen while node-c was down, and it
    stays so when node-b comes back into its stream (no flapping)."""
    links = _cut_from_a()
    links[("node-c", "data")].streaming = False
    planner = RelayPlanner("node-x", lambda: links, lambda: ["data"],
                           lambda _db: ["node-a", "node-b", "node-c"],
                           carries_all=lambda peer, _origin, _db: peer != "node-b")
    await planner.plan(now=0.0)
    await planner.plan(now=RELAY_AFTER * 2)
    assert planner.assignments["data"] == {"node-a": "node-b"}  # the only one streaming
    links[("node-c", "data")].streaming = True
    await planner.plan(now=RELAY_AFTER * 3)
    assert planner.assignments["data"] == {"node-a": "node-c"}
    restarts = {peer: link.restarts for (peer, _), link in links.items()}
    for tick in range(4, 7):
        await planner.plan(now=RELAY_AFTER * tick)
    assert planner.assignments["data"] == {"node-a": "node-c"}
    assert {peer: link.restarts for (peer, _), link in links.items()} == restarts
