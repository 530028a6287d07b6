"""``GET /ready`` and ``GET /health/{component}``: what a load balancer or an operator
probes, built from the node's own health report.

Ready means this node can answer reads with the data it is meant to hold: storage is
open, its listeners accept, and no database is still receiving its first full copy
(a *startup copy*: a copy running or interrupted into a database for which no link
has ever finished a copy or streamed).

The probes need no login (load balancers send none), so without a super user's login
they answer only what a probe needs: the status (and HTTP code), the node's name and
uptime. The details (the data directory, ports, peers, databases, why the node is not
ready) are for a request with a super user's Basic credentials: anonymously they told
anyone who could reach port 9925 the cluster's topology and file layout.
"""

from __future__ import annotations

from typing import Any

COMPONENTS = ("storage", "operations_api", "replication")


def _storage_open(services: Any) -> bool:
    storage = services.storage
    return bool(storage.databases) and storage.writer._thread.is_alive()


def startup_copies(services: Any) -> list[str]:
    """A reason per database still in its startup copy (see the module docstring)."""
    rep = services.cluster
    if rep is None:
        return []
    by_database: dict[str, list[Any]] = {}
    for (_peer, database), sub in list(rep.subscribers.items()):
        by_database.setdefault(database, []).append(sub)
    reasons = []
    for database, subs in sorted(by_database.items()):
        db = services.storage.databases.get(database)
        if db is None:
            continue
        cursors = {sub.peer: db.cursor(sub.peer) for sub in subs}
        if any(c and "copy" not in c for c in cursors.values()):
            continue  # some link finished a copy or streams: the data is here
        for sub in subs:
            progress = sub.copy_progress
            if sub.state == "copying" or "copy" in cursors[sub.peer]:
                detail = ""
                if progress is not None:
                    detail = (f" ({progress.get('records_copied', 0)} of "
                              f"{progress.get('records_total', 0)} records)")
                running = "receiving" if sub.state == "copying" else "interrupted in"
                reasons.append(f"database '{database}' is {running} its first full copy "
                               f"from {sub.peer}{detail}")
    return reasons


def readiness(services: Any) -> tuple[int, dict[str, Any]]:
    """``GET /ready``: 200 ``{"ready": true}``, or 503 with every reason it is not."""
    reasons = []
    if not _storage_open(services):
        reasons.append("storage is not open")
    for name, up in services.listeners_up().items():
        if not up:
            reasons.append(f"the {name} listener is not accepting connections")
    reasons.extend(startup_copies(services))
    if reasons:
        return 503, {"ready": False, "reasons": reasons}
    return 200, {"ready": True}


def health_component(services: Any, name: str) -> tuple[int, dict[str, Any]] | None:
    """One component of ``GET /health`` (``None``: no such component)."""
    report = services.health()
    if name == "storage":
        part = dict(report["storage"])
        ok = part.get("state") == "ok"
    elif name == "operations_api":
        listeners = report["listeners"]
        part = {"port": listeners.get("operations_api"),
                "tls_port": listeners.get("operations_api_tls")}
        ok = services.listeners_up().get("operations API", True)
        part["state"] = "ok" if ok else "down"
    elif name == "replication":
        links = report.get("peers", [])
        ok = services.listeners_up().get("replication", True)
        part = {"port": report["listeners"].get("replication"), "links": links,
                "connected": sum(1 for link in links if link["connected"]),
                "state": "ok" if ok else "down"}
    else:
        links = [link for link in report.get("peers", []) if link["node"] == name]
        rep = services.cluster
        if not links and (rep is None or name not in rep.rows):
            return None
        ok = all(link["connected"] for link in links)
        part = {"node": name, "links": links, "state": "ok" if ok else "degraded"}
    return (200 if ok else 503), {"component": name, "status": "ok" if ok else "degraded",
                                  **part}


def public_health(report: dict[str, Any]) -> dict[str, Any]:
    """``GET /health`` as answered without a super user's login."""
    return {"status": report["status"], "node_name": report["node_name"],
            "uptime_seconds": report["uptime_seconds"],
            "storage": {"state": report["storage"]["state"]}}


def public_readiness(report: dict[str, Any]) -> dict[str, Any]:
    """``GET /ready`` as answered without a super user's login (no reasons: they name
    databases and peers)."""
    return {"ready": report["ready"]}


def public_component(report: dict[str, Any]) -> dict[str, Any]:
    """One of ``COMPONENTS`` as answered without a super user's login."""
    return {"component": report["component"], "status": report["status"]}
