"""Restarting a link (subscriber.py) whatever happens to the caller of the restart."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from .fakes import PEER, WAIT, until
from .links import WriterLikeStore, accept, running, send_entries

pytestmark = pytest.mark.timeout(30)


async def test_a_restart_whose_caller_is_cancelled_still_starts_the_link():
    """A direct link that comes back restarts its relay's link (``relays.release``); if
    that direct link is itself stopped meanwhile, its restart of the relay's link is
    cancelled while the link stops (here: while it waits for an apply job). The link
    starts again all the same. Before, it stayed stopped, neither paused nor retired,
    and showed ``connecting`` for good (lifecycle seed 775: node-a's link from node-c
    for ``dbx`` had no task left)."""
    store = WriterLikeStore()
    async with running({"seq": 5, "origins": [PEER]}, store) as linked:
        sub = linked.sub
        try:
            peer, _ = await accept(linked)
            await send_entries(peer, [6, 7])
            await asyncio.wait_for(store.applying.wait(), WAIT)  # a job in the writer
            restart = asyncio.create_task(sub.restart())
            await until(lambda: sub.link is None, message="the link's task to end")
            restart.cancel()  # while stop() waits for the job
            with contextlib.suppress(asyncio.CancelledError):
                await restart
            store.release.set()
            await accept(linked)  # dialed again
            assert store.applied == [6, 7]
        finally:
            store.release.set()  # before the link retires: it waits for the job
