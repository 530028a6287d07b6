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
