"""Cluster lifecycle operations: configure_cluster, routes, cluster_network, purge_stream."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, HarpsyncError
from harpsync.replication.membership import node_request
from harpsync.replication.routes import default_url, route_url
from harpsync.storage import retention
from operations.cluster import add_node, parse_credentials, replace_node


class ConfigureClusterError(HarpsyncError):
    """Some connections of ``configure_cluster`` failed; the body reports each one.
    Like ``PeerError`` (a peer could not be reached or refused): ``PEER_ERROR``."""

    status = 400
    code = "PEER_ERROR"


async def configure_cluster(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    """Replace this node's connections with the listed ones, all or nothing.

    Every listed connection is probed first (reachable, TLS, credentials); if any
    fails, nothing is added or removed and the answer reports each connection.
    """
    rep = ctx.services.cluster
    connections = body["connections"]
    wanted: list[tuple[dict[str, Any], str]] = []
    for index, conn in enumerate(connections):
        if not conn.get("hostname") and not conn.get("url"):
            raise BadRequestError(f"'connections[{index}]': 'hostname' or 'url' is required")
        wanted.append((conn, conn.get("url") or default_url(str(conn["hostname"]))))
    checked = await asyncio.gather(*(_probe(rep, conn, url) for conn, url in wanted))
    failures = [error for error, _itself in checked if error is not None]
    if failures:
        outcomes = []
        for (conn, url), (error, itself) in zip(wanted, checked, strict=True):
            name = conn.get("hostname") or url
            if error is not None:
                outcomes.append({"node_name": name, "error": error})
            elif itself:
                outcomes.append({"node_name": name, "response": f"This node "
                                 f"({rep.node_name}) itself; skipped"})
            else:
                outcomes.append({"node_name": name, "response": "Reachable; not "
                                 "configured because another connection failed"})
        raise ConfigureClusterError(
            f"Configure cluster failed for {len(failures)} connection(s); "
            "no connection was added or removed", connections=outcomes)
    results: list[dict[str, Any]] = []
    # This node itself, in one list pushed to every node: nothing to connect to.
    for (conn, url), (_error, itself) in zip(wanted, checked, strict=True):
        if itself:
            results.append({"node_name": conn.get("hostname") or url,
                            "response": f"This node ({rep.node_name}) itself; skipped"})
    wanted = [w for w, (_error, itself) in zip(wanted, checked, strict=True) if not itself]
    wanted_urls = {url for _, url in wanted}
    wanted_names = {str(c["hostname"]) for c, _ in wanted if c.get("hostname")}
    failed = 0
    for name, row in list(rep.rows.items()):
        if name not in wanted_names and row.get("url") not in wanted_urls:
            try:
                await rep.forget_node(name, notify=True)
                results.append({"node_name": name, "response": f"Successfully removed "
                                                              f"'{name}' from cluster"})
            except HarpsyncError as exc:
                failed += 1
                results.append({"node_name": name, "error": exc.message})
    for conn, url in wanted:
        entry = {"operation": "set_node_replication", **conn}
        if "url" not in entry:
            entry["url"] = url
        handler = replace_node if _known(rep, conn, url) else add_node
        try:
            answer = await handler(ctx, entry)
            results.append({"node_name": conn.get("hostname") or url,
                            "response": answer["message"]})
        except HarpsyncError as exc:
            failed += 1
            results.append({"node_name": conn.get("hostname") or url, "error": exc.message})
    if failed:
        raise ConfigureClusterError(f"Configure cluster failed for {failed} connection(s)",
                                    connections=results)
    return {"message": "Cluster successfully configured.", "connections": results}


async def _probe(rep: Any, conn: dict[str, Any], url: str) -> tuple[str | None, bool]:
    """``(why conn could not be configured now, or None when its node answers and
    accepts the credentials (or, for a known node, this node's certificate); whether
    it is this node itself)``."""
    row = rep.rows.get(conn.get("hostname")) if conn.get("hostname") else None
    if row is not None and not conn.get("url"):
        url = row.get("url") or url
    # This node itself (one list pushed to every node) is skipped: joined, it failed,
    # and only after the other nodes were removed.
    if conn.get("hostname") == rep.node_name or url == rep.url:
        return None, True
    try:
        creds = parse_credentials(conn)
        verify = True if creds is None and _known(rep, conn, url) \
            else bool(conn.get("verify_tls", True))
        # A known node probed with this node's certificate is checked by its pin, so
        # an address its certificate does not list still reaches it.
        known = row if row is not None else next(
            (r for r in rep.rows.values() if r.get("url") == url), None)
        expect = known["name"] if creds is None and known is not None else None
        found = await rep.probe(url, creds, verify, expect)
        if found == rep.node_name:
            return None, True  # this node under another spelling of its address
        if row is not None and found != row["name"]:
            # Its update would refuse it, after the other nodes were removed.
            return f"the node at '{url}' is {found!r}, not {row['name']!r}", False
    except HarpsyncError as exc:
        return exc.message, False
    return None, False


def _known(rep: Any, conn: dict[str, Any], url: str) -> bool:
    return conn.get("hostname") in rep.rows or any(r.get("url") == url
                                                    for r in rep.rows.values())


def _route_key(route: Any) -> Any:
    if isinstance(route, dict):
        host = route.get("hostname") or route.get("host")
        return ("obj", host, route.get("port"))
    return ("url", str(route).rstrip("/"))


def _check_route(index: int, route: Any) -> None:
    """A 400 for a route whose URL cannot be parsed (as add_node refuses such a URL):
    saved, it would be retried forever and never connect."""
    url = route_url(route) or ""
    try:
        parsed = urlsplit(url)
        _ = parsed.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise BadRequestError(f"'routes[{index}]' is not a valid node URL: {exc}") from None
    if not parsed.hostname:
        raise BadRequestError(f"'routes[{index}]' is not a valid node URL: it names no host")


async def cluster_set_routes(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    config, rep = ctx.services.config, ctx.services.cluster
    routes = list(config.get("replication.routes") or [])
    known = {_route_key(r) for r in routes}
    for index, route in enumerate(body["routes"]):
        _check_route(index, route)
    added, skipped = [], []
    for route in body["routes"]:
        if _route_key(route) in known:
            skipped.append(route)
            continue
        known.add(_route_key(route))
        routes.append(route)
        added.append(route)
    await asyncio.to_thread(config.save_routes, routes)
    for route in added:
        rep.spawn(rep.connect_route(route))
    return {"message": "cluster routes successfully set", "set": added, "skipped": skipped}


async def cluster_get_routes(ctx: OpContext, body: dict[str, Any]) -> list[Any]:
    return list(ctx.services.config.get("replication.routes") or [])


async def cluster_delete_routes(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    config, rep = ctx.services.config, ctx.services.cluster
    routes = list(config.get("replication.routes") or [])
    doomed = {_route_key(r) for r in body["routes"]}
    deleted = [r for r in routes if _route_key(r) in doomed]
    kept = [r for r in routes if _route_key(r) not in doomed]
    found = {_route_key(r) for r in deleted}
    skipped = [r for r in body["routes"] if _route_key(r) not in found]
    await asyncio.to_thread(config.save_routes, kept)
    for route in deleted:
        await rep.drop_route(route)
    return {"message": "cluster routes successfully deleted", "deleted": deleted,
            "skipped": skipped}


# -- cluster_network ------------------------------------------------------------------
NESTED_BUDGET = 0.6


def _local_entry(rep: Any) -> dict[str, Any]:
    connected = sorted({peer for (peer, _db), sub in rep.subscribers.items() if sub.connected})
    return {"name": rep.node_name, "response_time": 0, "connected_nodes": connected,
            "routes": list(rep.config.get("replication.routes") or [])}


async def collect_network(rep: Any, visited: set[str], timeout_ms: float) -> list[dict[str, Any]]:
    """This node's entry, then every node reachable through its links (not in visited)."""
    me = _local_entry(rep)
    ask = [n for n in me["connected_nodes"] if n not in visited and n in rep.rows]
    seen = visited | {rep.node_name} | set(ask)

    # A peer asks its own peers in turn: it gets a smaller budget than this node waits,
    # so that its answer (with whatever its peers sent in time) arrives before ours ends.
    nested_ms = timeout_ms * NESTED_BUDGET

    async def one(name: str) -> list[dict[str, Any]]:
        started = time.perf_counter()
        body = {"type": "operation", "body": {"operation": "cluster_network_collect",
                                              "visited": sorted(seen), "timeout": nested_ms}}
        try:
            answer = await node_request(rep, rep.rows[name]["url"], body, verify=True,
                                        present_cert=True, timeout=timeout_ms / 1000,
                                        expect=name)
        except HarpsyncError:
            return []
        entries = answer.get("result") or []
        if entries:
            entries[0]["response_time"] = round((time.perf_counter() - started) * 1000, 2)
        return entries

    results = await asyncio.gather(*(one(n) for n in ask))
    out = [me]
    names = {rep.node_name}
    for entries in results:
        for entry in entries:
            if isinstance(entry, dict) and entry.get("name") not in names:
                names.add(entry.get("name"))
                out.append(entry)
    return out


async def cluster_network(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    rep = ctx.services.cluster
    nodes = await collect_network(rep, set(), float(body.get("timeout", 2000)))
    for entry in nodes:
        if body.get("connected_nodes"):
            entry.pop("connected_nodes", None)
        if body.get("routes"):
            entry.pop("routes", None)
    return {"nodes": nodes}


# -- purge_stream ---------------------------------------------------------------------
async def purge_stream(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    storage = ctx.services.storage
    db_name, table = str(body.get("database", "data")), body["table"]
    db, _ = storage.table(db_name, table)
    options = body.get("options") or {}
    keep, upto = options.get("keep"), options.get("seq")
    result = await storage.write(retention.purge_table_job(db, table, keep, upto))
    return {"message": f"purged {result['removed']} log entries of '{db_name}.{table}'",
            "removed": result["removed"], "pruned_through": db.pruned_through()}


def register_peer_handlers(rep: Any) -> None:
    """Operations peers may run on this node over the replication port."""

    async def collect(_peer: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        visited = {str(v) for v in body.get("visited", [])}
        return await collect_network(rep, visited, float(body.get("timeout", 2000)))

    rep.operation_handlers["cluster_network_collect"] = collect


OPERATIONS = [
    Operation("configure_cluster", configure_cluster),
    Operation("cluster_set_routes", cluster_set_routes),
    Operation("cluster_get_routes", cluster_get_routes),
    Operation("cluster_delete_routes", cluster_delete_routes),
    Operation("cluster_network", cluster_network),
    Operation("purge_stream", purge_stream),
]
