"""When a link's applier commits at once and when it gathers (``applier.BUSY_GATHER``),
over a socket pair with the test as the publishing peer."""

from __future__ import annotations

import pytest

from harpsync.replication import applier

from .fakes import until
from .links import accept, acked, running, send_entries

pytestmark = pytest.mark.timeout(30)


async def test_one_entry_at_a_time_is_applied_at_once(monkeypatch):
    """A quiet link (a writer waiting for each write to arrive here) never waits for
    the gather: with a gather longer than the test's timeout, each entry still
    commits and is acked on its own."""
    monkeypatch.setattr(applier, "BUSY_GATHER", 60.0)
    async with running({"seq": 5, "origins": ["node-b"]}) as linked:
        peer, _ = await accept(linked)
        for seq in (6, 7, 8):
            await send_entries(peer, [seq])
            await acked(peer, seq)
        assert linked.store.jobs == [[6], [7], [8]]


async def test_after_an_apply_of_several_entries_the_next_ones_are_gathered(monkeypatch):
    """A batch of several entries (a publisher sends commits that come within
    ``SEND_LINGER`` of each other together) marks a stream: the batches that follow
    within the gather share one commit, although none arrived during a commit. Before,
    each went alone, and a peer faster than the origin's lingered batches made a synced
    commit per batch."""
    monkeypatch.setattr(applier, "BUSY_GATHER", 5.0)
    async with running({"seq": 5, "origins": ["node-b"]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7])
        await acked(peer, 7)
        await send_entries(peer, [8])
        await until(lambda: linked.sub.received_seq >= 8, message="8 received")
        await send_entries(peer, [9])
        await acked(peer, 9)
        assert linked.store.jobs == [[6, 7], [8, 9]]
