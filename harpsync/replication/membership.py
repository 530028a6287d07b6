"""Joining and leaving: one request/response exchange on the replication port.

A joining node knows only the peer's replication URL, so ``add_node`` dials
``/.node`` there. A connection without a verified certificate may only send a
``join`` carrying valid super_user credentials; the target signs the joiner's CSR,
records both nodes and returns its CA. Later requests (``update``, ``remove``,
``mesh``) are authenticated by the mutual-TLS certificate instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from harpsync import codec
from harpsync.errors import PeerError
from harpsync.replication import peers
from harpsync.replication.subscriber import describe_error
from harpsync.replication.transport import DIAL_ERRORS, Link, dial

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

log = logging.getLogger(__name__)

NODE_PATH = "/.node"


async def node_request(rep: Replicator, url: str, body: dict[str, Any], *, verify: bool,
                       present_cert: bool, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a peer's ``/.node`` endpoint and return its answer.

    Raises:
        PeerError: the peer is unreachable, refused TLS, or answered with an error; the
            message names the peer and the cause, never the credentials.
    """
    context = rep.keys.client_context(verify=verify, present_cert=present_cert)
    link: Link | None = None
    try:
        link = await dial(url, NODE_PATH, context, rep.ping_interval, timeout=timeout)
        await link.send(codec.pack(body))
        answer = codec.unpack(await asyncio.wait_for(link.recv(), timeout))
    except DIAL_ERRORS as exc:
        raise PeerError(f"Could not reach node at '{url}': {describe_error(exc)}") from None
    except (ValueError, TypeError) as exc:
        raise PeerError(f"Node at '{url}' sent an unreadable answer: {exc}") from None
    finally:
        if link is not None:
            link.abort()
    if not isinstance(answer, dict):
        raise PeerError(f"Node at '{url}' sent an unreadable answer")
    if answer.get("error"):
        raise PeerError(f"Node at '{url}' refused the request: {answer['error']}")
    return answer


async def serve_node_request(rep: Replicator, link: Link) -> None:
    """Answer one ``/.node`` request on an accepted socket."""
    try:
        body = codec.unpack(await asyncio.wait_for(link.recv(), 10))
        if not isinstance(body, dict):
            raise ValueError("request must be a map")
        answer = await _dispatch(rep, link, body)
    except PeerError as exc:
        answer = {"error": exc.message}
    except (ValueError, TypeError, KeyError) as exc:
        answer = {"error": f"bad request: {exc}"}
    except Exception:
        log.exception("node request failed")
        answer = {"error": "internal error"}
    try:
        await link.send(codec.pack(answer))
        await link.close()
    except DIAL_ERRORS:
        pass


def _authenticated_as(rep: Replicator, link: Link, body: dict[str, Any]) -> str | None:
    """The node name proven by the TLS certificate, if any and known."""
    if link.peer is None:
        return None
    row = rep.rows.get(link.peer.common_name)
    if row is None or peers.serial_revoked(link.peer.serial_hex,
                                           row.get("revoked_certificates")):
        return None
    if not link.issued_by([row.get("ca") or "", rep.keys.ca_pem]):
        return None
    return link.peer.common_name


async def _require_super_user(rep: Replicator, body: dict[str, Any]) -> None:
    user = body.get("authorization")
    if not (isinstance(user, list | tuple) and len(user) == 2
            and await rep.check_super_user(str(user[0]), str(user[1]))):
        raise PeerError("authorization failed: super_user credentials are required")


async def _dispatch(rep: Replicator, link: Link, body: dict[str, Any]) -> dict[str, Any]:
    kind = body.get("type")
    proven = _authenticated_as(rep, link, body)
    if kind == "join":
        name = str(body["node"])
        if proven != name:
            user = body.get("authorization")
            if not (isinstance(user, list | tuple) and len(user) == 2
                    and await rep.check_super_user(str(user[0]), str(user[1]))):
                raise PeerError("authorization failed: super_user credentials are required")
        return await rep.accept_join(body)
    if kind == "probe":
        # configure_cluster checks a connection (reachable, TLS, credentials) before it
        # changes anything; a probe joins nothing.
        if proven is None:
            await _require_super_user(rep, body)
        return {"ok": True, "node": rep.node_name}
    if proven is None:
        raise PeerError("this request needs a verified node certificate")
    if kind == "remove":
        await rep.forget_node(proven, notify=False)
        return {"ok": True}
    if kind == "mesh":
        await rep.learn_nodes(list(body.get("nodes", [])))
        return {"ok": True}
    if kind == "operation":
        result, error = await rep.peer_operation(proven, dict(body.get("body", {})))
        return {"result": result, "error": error}
    raise PeerError(f"unknown request type {kind!r}")
