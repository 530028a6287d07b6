"""The subscriber's side of a socket pair, for tests of ``subscriber.py``: a started
link (``running``), the test as its publishing peer (``accept``, ``send_entries``,
``acked``), and link stores whose apply jobs wait to be released."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from harpsync.replication.protocol import (
    AckReceived,
    PeerHello,
    PublisherSession,
    SubscribeRequested,
)
from harpsync.replication.subscriber import Subscriber

from .fakes import PEER, WAIT, FakeLinkStore, FakeRelays, FakeSubscriberHost, Wire, entry

PEER_IDS = {1: PEER, 3: "node-c"}  # the publisher's origin ids


@dataclass
class Linked:
    sub: Subscriber
    host: FakeSubscriberHost
    store: FakeLinkStore


@contextlib.asynccontextmanager
async def running(cursor: dict[str, Any] | None = None,
                  store: FakeLinkStore | None = None) -> AsyncIterator[Linked]:
    """A started subscriber for ``data`` from the peer (with ``cursor`` committed), over
    ``store`` (a plain ``FakeLinkStore`` by default)."""
    host, store = FakeSubscriberHost(), store or FakeLinkStore()
    if cursor is not None:
        store.cursors[("data", PEER)] = cursor
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    try:
        yield Linked(sub, host, store)
    finally:
        await sub.retire()


async def accept(linked: Linked) -> tuple[Wire, SubscribeRequested]:
    """Take the subscriber's next dial as its peer: answer its hello, return its
    subscribe."""
    link = await next_accepted(linked.host)
    peer = Wire(link, PublisherSession(PEER))
    hello = await peer.expect(PeerHello)
    assert (hello.node, hello.database) == ("node-a", "data")
    session = peer.session
    assert isinstance(session, PublisherSession)
    session.accept("data", {"dog": {"version": 1}}, dict(PEER_IDS))
    await peer.flush()
    return peer, await peer.expect(SubscribeRequested)


async def next_accepted(host: FakeSubscriberHost) -> Any:
    return await asyncio.wait_for(host.accepted.get(), WAIT)


def publisher(peer: Wire) -> PublisherSession:
    assert isinstance(peer.session, PublisherSession)
    return peer.session


async def send_entries(peer: Wire, seqs: list[int], origin_id: int = 1) -> None:
    publisher(peer).send_entries(max(seqs), [(s, origin_id, entry(origin_id, 100 + s, key=s))
                                             for s in seqs], PEER_IDS)
    await peer.flush()


async def acked(peer: Wire, seq: int) -> None:
    """Wait for the subscriber's ack of ``seq`` (acks only move forward)."""
    while (await peer.expect(AckReceived)).seq < seq:
        pass


class HeldApplyStore(FakeLinkStore):
    """Apply jobs wait for ``release``: a commit that outlives its session."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.applying = asyncio.Event()

    async def apply_entries(self, *args: Any, **kwargs: Any) -> Any:
        self.applying.set()
        await self.release.wait()
        return await super().apply_entries(*args, **kwargs)


class WriterLikeStore(FakeLinkStore):
    """Apply jobs run as the writer thread runs them: once submitted, a job commits when
    ``release`` is set, whether or not its caller still waits (cancelling the caller
    cancels only the future it awaits, as with ``Writer.submit``)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.applying = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()

    async def apply_entries(self, *args: Any, **kwargs: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def writer() -> None:
            await self.release.wait()
            stats = await FakeLinkStore.apply_entries(self, *args, **kwargs)
            if not future.done():
                future.set_result(stats)

        task = asyncio.ensure_future(writer())
        self.running.add(task)
        self.applying.set()
        return await future
