"""Routes: peers listed in ``replication.routes``, paired with at start and when set.

A route carries no credentials, so pairing works once the peer knows this node (its
certificate): after an earlier ``add_node``, or when routes are set on both sides of an
existing pair. Pairing is a join proven by this node's certificate, then an adopt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any
from urllib.parse import urlparse

from harpsync.replication.mesh import Mesh
from harpsync.replication.reconnect import backoff_delay

log = logging.getLogger(__name__)

DEFAULT_PORT = 9933


def route_url(route: Any) -> str | None:
    """``wss://host:port`` for a route string or ``{hostname|host, port}`` object."""
    if isinstance(route, str):
        return route.rstrip("/")
    if isinstance(route, dict):
        host = route.get("hostname") or route.get("host")
        port = route.get("port", DEFAULT_PORT)
        if host:
            return f"wss://{host}:{port}"
    return None


async def connect_route(mesh: Mesh, config: Any, own_url: str, route: Any) -> None:
    """Pair with a configured route, retrying with backoff until it answers, until it
    is paired (a row has its URL) or the route is deleted."""
    url = route_url(route)
    if not url or url == own_url:
        return
    failures = 0
    while True:
        configured = {route_url(r) for r in config.get("replication.routes") or []}
        if url not in configured:
            return  # the route was deleted meanwhile
        if any(r.get("url") == url for r in list(mesh.rows.values())):
            return
        try:
            # A node known here under another URL (the route spells its address
            # otherwise) is paired already: joining it again replaced its row's
            # subscriptions with full replication, on both sides. Nor is this node
            # its own peer.
            name = await mesh.probe(url, None, True)
            if name in mesh.rows or name == mesh.node_name:
                return
            answer = await mesh.join(url, None, True, None, {})
            # Marked: deleting the route forgets this peer (and only a peer it paired).
            await mesh.adopt(answer, url, {"replicates": True, "subscriptions": None,
                                           "route": True})
            return
        except Exception as exc:
            log.info("route %s not connected yet: %s", url, exc)
        failures += 1
        await asyncio.sleep(max(0.5, backoff_delay(failures)))


async def drop_route(mesh: Mesh, route: Any) -> None:
    """Forget the peers a deleted route paired with, at its URL (both sides).

    A peer joined otherwise (``add_node``, ``configure_cluster``: a route to a known node
    pairs nothing) stays: before, deleting a route set by mistake to an existing peer
    removed that peer from the cluster on both sides and barred its key.
    """
    url = route_url(route)
    for name, row in list(mesh.rows.items()):
        if row.get("url") == url and row.get("route"):
            await mesh.forget_node(name, notify=True)


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (localhost or a loopback address)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_url(hostname: str) -> str:
    """The replication URL of a peer named only by its host (the default port)."""
    return f"wss://{hostname}:{DEFAULT_PORT}"
