"""``wait_for_replication``: a barrier until peers have applied a version of this node.

Every successful write answers with the version it committed (``X-Harpsync-Version``).
This node knows how far each peer has durably applied its log: a peer's subscribe
starts from its committed cursor and every ack after an apply moves it on
(``Replicator.positions``). This node's own entries are in version order in its log,
so a peer has applied every local write up to version V once its position reaches the
newest local entry at or below V.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, ForbiddenError, ReplicationTimeoutError
from harpsync.replication import peers
from harpsync.storage.logscan import local_seq_through, local_version_at

DEFAULT_TIMEOUT_MS = 5000


def parse_version(value: Any) -> int:
    """A version as JSON integer or digit string (JavaScript loses integers > 2**53)."""
    if isinstance(value, bool):
        raise BadRequestError("'version' must be an integer or a string of digits")
    if isinstance(value, str):
        # isascii(): str.isdigit() also holds for "²", which int() refuses
        if not (value.isascii() and value.isdigit()):
            raise BadRequestError("'version' must be an integer or a string of digits")
        if len(value) > 20:  # (int() of a huge string is slow) past 2^64-1 anyway
            raise BadRequestError("'version' must be an integer from 0 to 2^64-1")
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise BadRequestError("'version' must be an integer from 0 to 2^64-1")
    return value


def subscribers_of(rep: Any, database: str) -> list[str]:
    """Peers this node sends ``database`` to (its rows say it publishes to them)."""
    return sorted(name for name, row in list(rep.rows.items())
                  if peers.publish_tables(row, database) is not False)


def _targets(rep: Any, database: str, named: list[str] | None) -> list[str]:
    receiving = subscribers_of(rep, database)
    if named is None:
        return receiving
    for name in named:
        if name not in rep.rows:
            raise BadRequestError(f"node '{name}' is not a peer of this node")
        if name not in receiving:
            raise BadRequestError(f"node '{name}' does not receive database '{database}' "
                                  "from this node")
    return sorted(set(named))


async def wait_for_replication(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    services = ctx.services
    rep = services.cluster
    storage = services.storage
    version = parse_version(body["version"])
    database = str(body.get("database", "data"))
    user = ctx.user
    if not user.super_user and not isinstance(user.permission.get(database), dict):
        # A role waits only on databases it has permissions in (its own writes).
        raise ForbiddenError([f"Operation 'waitForReplication' on database '{database}' "
                              "needs a role with permissions on that database"])
    db = storage.database(database)
    if version > storage.hlc.last:
        raise BadRequestError(f"version {version} is newer than any version this node "
                              "has committed or received")
    targets = _targets(rep, database, body.get("nodes"))
    timeout = int(body.get("timeout", DEFAULT_TIMEOUT_MS)) / 1000.0
    needed = await asyncio.to_thread(local_seq_through, db, version)

    def pending() -> list[str]:
        return [p for p in targets if rep.positions.get((p, database), 0) < needed]

    changed = asyncio.Event()
    rep.position_listeners.append(changed.set)
    deadline = time.monotonic() + timeout
    try:
        while pending():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                break
    finally:
        rep.position_listeners.remove(changed.set)
    late = pending()
    report = {}
    for name in targets:
        position = rep.positions.get((name, database), 0)
        report[name] = {
            "applied": name not in late,
            "applied_version": await asyncio.to_thread(local_version_at, db, position),
            "connected": bool(rep.publishers.get((name, database))),
        }
    if late:
        raise ReplicationTimeoutError(
            f"version {version} of database '{database}' was not applied by "
            f"{', '.join(late)} within {int(timeout * 1000)} ms",
            version=version, database=database, nodes=report)
    return {"message": f"version {version} of database '{database}' is applied on "
                       f"{len(targets)} node(s)",
            "version": version, "database": database, "nodes": report}


OPERATIONS = [Operation("wait_for_replication", wait_for_replication, "any")]
