"""The sockets peers open to this node: one ``Publisher`` each, or a ``/.node`` request.

The listener (``transport.listen``) hands every socket that passed TLS here. A socket
for a database must show a node certificate that passes ``check_peer``; its publisher
is kept by (peer, database) while it runs, so membership changes can close the sockets
of one peer (``drop_inbound``) or of the peers this node relays an origin to
(``drop_relaying``), and the relay planner and status can see who subscribes to what.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from harpsync.replication.membership import NODE_PATH, serve_node_request
from harpsync.replication.publisher import Publisher
from harpsync.replication.seams import LogSource, NodeServer, PublisherHost
from harpsync.replication.transport import Link
from harpsync.storage.store import SYSTEM


class InboundHost(PublisherHost, NodeServer, Protocol):
    """What serving accepted sockets needs: a publisher's host, and a ``/.node``
    request's."""


class Inbound:
    """The publishers of the sockets peers opened to this node, by (peer, database)."""

    def __init__(self, host: InboundHost, source: Callable[[str], LogSource | None]) -> None:
        """``source``: a database's log by name (None: no such database here)."""
        self.host = host
        self.source = source
        self.publishers: dict[tuple[str, str], set[Publisher]] = {}

    async def accept(self, link: Link) -> None:
        """Serve one accepted socket until it ends."""
        if link.path == NODE_PATH:
            await serve_node_request(self.host, link)
            return
        database = link.path.strip("/")
        peer = link.peer
        if peer is None:
            await link.close(1008, "a verified node certificate is required")
            return
        refused = self.host.check_peer(peer.common_name, link)
        if refused is not None:
            await link.close(1008, refused)
            return
        link.authenticated()
        publisher = Publisher(self.host, link, peer.common_name, database,
                              self.source(database))
        key = (peer.common_name, database)
        self.publishers.setdefault(key, set()).add(publisher)
        try:
            await publisher.run()
        finally:
            publishers = self.publishers.get(key)
            if publishers is not None:
                publishers.discard(publisher)
                if not publishers:
                    del self.publishers[key]

    async def drop_inbound(self, name: str, reason: str) -> None:
        """Close the sockets ``name`` opened to this node; it reconnects if still allowed."""
        links = [pub.link for key, pubs in list(self.publishers.items()) if key[0] == name
                 for pub in list(pubs)]
        await close_links(links, reason)

    async def drop_relaying(self, origin: str, reason: str) -> None:
        """Close the sockets of the peers this node relays ``origin``'s writes to: their
        sessions know from this node's hello which of ``origin``'s tables it takes
        (``relay_tables``), and that just changed."""
        links = [pub.link for (peer, database), pubs in list(self.publishers.items())
                 if peer != origin and database != SYSTEM for pub in list(pubs)
                 if pub.may_relay(origin)]
        await close_links(links, reason)


async def close_links(links: list[Link], reason: str) -> None:
    """Close ``links`` (1000, ``reason``) together, ignoring failures."""
    async def close(link: Link) -> None:
        with contextlib.suppress(Exception):
            await link.close(1000, reason)

    # Together: each close may wait for the peer's close frame (close_timeout), and
    # an operation such as set_node_replication waits for all of them.
    await asyncio.gather(*(close(link) for link in links))
