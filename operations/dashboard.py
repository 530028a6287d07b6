"""``cluster_overview``: the whole mesh as one JSON picture, the dashboard's data.

The node asked gathers its own picture (links with their state, lag, latency and
counters; record counts per table) and asks every node it knows for theirs over the
replication port (``/.node``, authenticated by the node certificate), in parallel and
with a short timeout. A node that does not answer is listed as unreachable with the
reason. Answers are shared for a moment, so several open dashboards cost one round.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import HarpsyncError
from harpsync.replication.membership import node_request
from harpsync.replication.status import cluster_status
from harpsync.storage.store import SYSTEM
from operations.schema_ops import visible

PEER_OPERATION = "cluster_overview_collect"
# Operations of other issues the dashboard lights up when this node has them.
OPTIONAL_OPERATIONS = ("list_dead_letters", "list_conflicts", "verify_cluster",
                       "repair_cluster")
# A lag this old while streaming means the link is working through a backlog.
CATCHING_UP_MS = 1000.0
# Pictures younger than this are shared between callers.
SHARE_SECONDS = 0.5
DEFAULT_TIMEOUT_MS = 1500.0

LINK_STATES = ("streaming", "copying", "catching_up", "paused", "resync_required",
               "clock_skew", "down")


def link_status(socket: dict[str, Any]) -> str:
    """One of ``LINK_STATES`` for a ``cluster_status`` database socket."""
    state = socket.get("state")
    if state in ("paused", "resync_required", "clock_skew"):
        return str(state)
    if not socket.get("connected"):
        return "down"
    if state == "copying":
        return "copying"
    if socket.get("lag_txns") and float(socket.get("lag_ms") or 0) >= CATCHING_UP_MS:
        return "catching_up"
    return "streaming"


def local_picture(rep: Any) -> dict[str, Any]:
    """This node's links (one per peer and database) and record counts."""
    status = cluster_status(rep)
    links = []
    for conn in status["connections"]:
        for socket in conn["database_sockets"]:
            links.append({**socket, "peer": conn["name"], "status": link_status(socket)})
    tables: dict[str, dict[str, int]] = {}
    for name, db in sorted(rep.storage.databases.items()):
        if name == SYSTEM:
            continue
        counts: dict[str, int] = {}
        for table_name, table in sorted(dict(db.tables).items()):
            try:
                counts[table_name] = db.table_size(table)[0]
            except HarpsyncError:  # dropped while we looked
                continue
        tables[name] = counts
    return {"name": rep.node_name, "url": rep.url, "reachable": True, "error": None,
            "time": rep.storage.hlc.wall_now_ms(), "links": links, "tables": tables}


async def _ask(rep: Any, name: str, timeout_ms: float) -> dict[str, Any]:
    row = rep.rows.get(name) or {}
    started = time.perf_counter()
    body = {"type": "operation", "body": {"operation": PEER_OPERATION}}
    try:
        if not row.get("url"):
            raise HarpsyncError("no URL known for this node")
        answer = await node_request(rep, row["url"], body, verify=True, present_cert=True,
                                    timeout=timeout_ms / 1000, expect=name)
        picture = answer.get("result")
        if not isinstance(picture, dict) or picture.get("name") != name:
            raise HarpsyncError(answer.get("error") or "the node sent no picture")
    except HarpsyncError as exc:
        return {"name": name, "url": row.get("url"), "reachable": False,
                "error": exc.message, "links": [], "tables": {}}
    except (TimeoutError, OSError) as exc:
        return {"name": name, "url": row.get("url"), "reachable": False,
                "error": str(exc) or type(exc).__name__, "links": [], "tables": {}}
    picture["response_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return picture


async def gather(rep: Any, timeout_ms: float) -> list[dict[str, Any]]:
    """Every known node's picture, this node's first."""
    me = local_picture(rep)
    me["response_ms"] = 0
    names = sorted(n for n in rep.rows if n != rep.node_name)
    others = await asyncio.gather(*(_ask(rep, n, timeout_ms) for n in names))
    nodes = [me, *others]
    known = {n["name"] for n in nodes}
    # Peers that some node links to but this one does not know of.
    for node in list(nodes):
        for link in node.get("links", []):
            if link["peer"] not in known:
                known.add(link["peer"])
                nodes.append({"name": link["peer"], "url": None, "reachable": False,
                              "error": f"not known to {rep.node_name}", "links": [],
                              "tables": {}})
    return nodes


# One gather in flight (or just finished) per node, shared by concurrent callers.
_SHARED: weakref.WeakKeyDictionary[Any, tuple[float, float, asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary())


async def shared_gather(rep: Any, timeout_ms: float) -> list[dict[str, Any]]:
    now = time.monotonic()
    entry = _SHARED.get(rep)
    if entry is not None and entry[1] == timeout_ms and (
            not entry[2].done() or now - entry[0] < SHARE_SECONDS):
        return list(await asyncio.shield(entry[2]))
    future = asyncio.ensure_future(gather(rep, timeout_ms))
    _SHARED[rep] = (now, timeout_ms, future)
    return list(await asyncio.shield(future))


def _filtered(node: dict[str, Any], user: Any) -> dict[str, Any]:
    """A copy of ``node`` showing only the tables ``user`` may see, and only the links of
    ``system`` and of databases its role names (their names are not for everyone)."""
    if user.super_user:
        return node
    tables = {db: {t: c for t, c in counts.items() if visible(user, db, t)}
              for db, counts in node.get("tables", {}).items()}
    links = [link for link in node.get("links", [])
             if link.get("database") == SYSTEM or link.get("database") in user.permission]
    return {**node, "tables": {db: c for db, c in tables.items() if c}, "links": links}


async def cluster_overview(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    rep = ctx.services.cluster
    timeout_ms = float(body.get("timeout", DEFAULT_TIMEOUT_MS))
    if body.get("peers", True):
        nodes = await shared_gather(rep, timeout_ms)
    else:
        nodes = [{**local_picture(rep), "response_ms": 0}]
    registered = ctx.services.dispatcher.operations
    return {
        "node_name": rep.node_name,
        "generated_at": rep.storage.hlc.wall_now_ms(),
        "user": {"username": ctx.user.username, "super_user": ctx.user.super_user},
        "operations": [name for name in OPTIONAL_OPERATIONS if name in registered],
        "link_states": list(LINK_STATES),
        "nodes": [_filtered(node, ctx.user) for node in nodes],
    }


def register_peer_handlers(rep: Any) -> None:
    """Let peers ask this node for its picture over the replication port."""

    async def collect(_peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return local_picture(rep)

    rep.operation_handlers[PEER_OPERATION] = collect


OPERATIONS = [
    Operation("cluster_overview", cluster_overview, access="any"),
]
