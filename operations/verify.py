"""``verify_cluster`` and ``repair_cluster``: do the replicas hold the same rows?"""

from __future__ import annotations

from typing import Any

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import missing_is_bad_request
from harpsync.replication.verifier import MAX_KEYS, Outcome
from harpsync.storage import compare
from harpsync.storage.keys import decode_id


def _side(state: compare.RowState) -> dict[str, Any]:
    if state is None:
        return {"absent": True}
    return {"version": state[1], "origin": state[2], "deleted": bool(state[3])}


def _entry(node: str, outcome: Outcome) -> dict[str, Any]:
    pair = outcome.pair
    out: dict[str, Any] = {
        "node": pair.peer, "database": pair.database, "table": pair.table,
        "direction": pair.direction, "in_sync": outcome.in_sync,
        "differences": len(outcome.differences),
        "keys": [{"id": decode_id(key), "this": _side(mine), "peer": _side(theirs),
                  "winner": node if side > 0 else pair.peer}
                 for key, mine, theirs, side in outcome.differences[:MAX_KEYS]],
        "rounds": outcome.rounds, "bytes": outcome.bytes_exchanged,
        "timings": outcome.timings,
    }
    if outcome.error is not None:
        out["error"] = outcome.error
    if outcome.missing_here:
        out["missing_on"] = node
    return out


async def _run(ctx: OpContext, body: dict[str, Any], repair: bool) -> dict[str, Any]:
    verifier = ctx.services.verifier
    dry_run = bool(body.get("dry_run"))
    verifier.plan(body.get("database"), body.get("table"), body.get("nodes"))  # 404 first
    with missing_is_bad_request():  # a table dropped before its deep rebuild
        outcomes = await verifier.check(body.get("database"), body.get("table"),
                                        body.get("nodes"), deep=bool(body.get("deep")),
                                        repair=repair, dry_run=dry_run)
    node = ctx.services.node_name
    checked = [_entry(node, o) for o in outcomes]
    result: dict[str, Any] = {"in_sync": all(o.in_sync for o in outcomes),
                              "checked": checked}
    if repair:
        result["dry_run"] = dry_run
        for entry, outcome in zip(checked, outcomes, strict=True):
            for name in compare.REPAIR_LISTS:
                entry[name] = getattr(outcome, name) or {node: [], outcome.pair.peer: []}
    return result


async def verify_cluster(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    """Compare this node's tables with every peer it replicates them with."""
    return await _run(ctx, body, repair=False)


async def repair_cluster(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    """Verify, then write each differing key's winner where it is missing."""
    return await _run(ctx, body, repair=True)


OPERATIONS = [
    Operation("verify_cluster", verify_cluster),
    Operation("repair_cluster", repair_cluster),
]
