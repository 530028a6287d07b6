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
from urllib.parse import urlparse

from harpsync import codec
from harpsync.errors import BadRequestError, HarpsyncError, PeerError, TooManyRequestsError
from harpsync.replication.reconnect import describe_error
from harpsync.replication.transport import DIAL_ERRORS, Link, dial

if TYPE_CHECKING:
    from harpsync.replication.seams import NodeClient, NodeServer

log = logging.getLogger(__name__)

NODE_PATH = "/.node"


async def node_request(rep: NodeClient, url: str, body: dict[str, Any], *, verify: bool,
                       present_cert: bool, timeout: float = 10.0,
                       expect: str | None = None) -> dict[str, Any]:
    """Send one request to a peer's ``/.node`` endpoint and return its answer.

    With ``expect`` the server must pass ``check_peer`` (mesh.py) as that node
    (its pinned key) before anything is sent. The server's certificate is returned
    under ``__server_cert__`` so a join can pin it.

    Raises:
        PeerError: the peer is unreachable, refused TLS, or answered with an error; the
            message names the peer and the cause, never the credentials.
    """
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018  (raises for a port out of range)
    except ValueError as exc:
        raise BadRequestError(f"'{url}' is not a valid node URL: {exc}") from None
    if not parsed.hostname:
        raise BadRequestError(f"'{url}' is not a valid node URL: it names no host")
    # With ``expect`` the pin decides who answered (below); else the URL's host must be
    # in the server's certificate.
    context = rep.keys.client_context(verify=verify, present_cert=present_cert,
                                      check_hostname=expect is None)
    link: Link | None = None
    try:
        # No keepalive pings: the request's own timeouts bound it. With them, a peer
        # slow to answer a ping for twice the ping interval (a busy or starved
        # process, a slow path) failed the request ("keepalive ping timeout").
        link = await dial(url, NODE_PATH, context, None, timeout=timeout)
        if expect is not None:
            refused = rep.check_peer(expect, link)
            if refused is not None:
                raise PeerError(f"Node at '{url}' is not {expect}: {refused}")
        elif verify:
            refused = rep.check_vouched(link)
            if refused is not None:
                raise PeerError(f"Node at '{url}' is not verified: {refused} (verify_tls "
                                "false joins a node whose CA this node does not hold)")
        await link.send(codec.pack(body))
        answer = codec.unpack(await asyncio.wait_for(link.recv(), timeout))
    except DIAL_ERRORS as exc:
        cause = describe_error(exc)
        if cause.endswith("WRONG_VERSION_NUMBER"):  # plain HTTP where TLS was expected
            cause += (" (the port does not speak TLS: is it the operations API port "
                      "rather than the replication port?)")
        raise PeerError(f"Could not reach node at '{url}': {cause}") from None
    except (ValueError, TypeError) as exc:
        raise PeerError(f"Node at '{url}' sent an unreadable answer: {exc}") from None
    finally:
        if link is not None:
            link.abort()
    if not isinstance(answer, dict):
        raise PeerError(f"Node at '{url}' sent an unreadable answer")
    if answer.get("error"):
        message = f"Node at '{url}' refused the request: {str(answer['error'])[:300]}"
        if answer.get("status") == 429:
            raise TooManyRequestsError(message, _retry_after(answer.get("retry_after_seconds")))
        raise PeerError(message)
    answer["__server_cert__"] = link.cert if link is not None else None
    return answer


def _retry_after(value: Any) -> int:
    """A peer's ``retry_after_seconds`` as whole seconds within [1, 3600] (60 when it
    sent none or no number): it becomes our own Retry-After header."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 60
    return int(min(max(value, 1), 3600))


async def serve_node_request(rep: NodeServer, link: Link) -> None:
    """Answer one ``/.node`` request on an accepted socket (without keepalive pings:
    the request's timeouts bound it, as on the asking side)."""
    link.no_keepalive()
    try:
        if _authenticated_as(rep, link) is not None:
            link.authenticated()  # a proven node may send more than a join's small frame
        try:
            raw = await asyncio.wait_for(link.recv(), 10)
        except DIAL_ERRORS as exc:  # the caller went away (or never asked): no answer due
            log.debug("node request socket closed before its request: %s", exc)
            return
        body = codec.unpack(raw)
        if not isinstance(body, dict):
            raise ValueError("request must be a map")
        answer = await _dispatch(rep, link, body)
    except TooManyRequestsError as exc:
        answer = {"error": exc.message, "status": 429, "retry_after_seconds": exc.retry_after}
    except HarpsyncError as exc:
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


def _authenticated_as(rep: NodeServer, link: Link) -> str | None:
    """The node name proven by the TLS certificate (see ``Mesh.check_peer``)."""
    if link.peer is None:
        return None
    if rep.check_peer(link.peer.common_name, link) is not None:
        return None
    return link.peer.common_name


async def _dispatch(rep: NodeServer, link: Link, body: dict[str, Any]) -> dict[str, Any]:
    kind = body.get("type")
    proven = _authenticated_as(rep, link)
    if proven is not None:
        link.authenticated()
    # Credentials, on any request, are checked first and throttled per address (failed
    # ones count with failed HTTP logins), so no request type can be used to guess them.
    credentialed = False
    user = body.get("authorization")
    if user is not None:
        if not (isinstance(user, list | tuple) and len(user) == 2):
            raise PeerError("authorization must be [username, password]")
        await rep.check_join_credentials(link.remote_host, str(user[0]), str(user[1]))
        credentialed = True
    if kind == "join":
        name = str(body["node"])
        if credentialed:  # credentials win over a certificate: they may re-key the node
            return await rep.accept_join(body, credentialed=True)
        if proven != name:
            raise PeerError("authorization failed: super_user credentials are required")
        return await rep.accept_join(body, credentialed=False)
    if kind == "probe":
        # configure_cluster checks a connection (reachable, TLS, credentials) before it
        # changes anything; a probe joins nothing. Credentials were checked (and
        # throttled) above.
        if proven is None and not credentialed:
            raise PeerError("authorization failed: super_user credentials are required")
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
