"""Cluster operations (super_user only): peering, subscriptions and status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, PeerError
from harpsync.passwords import parse_authorization
from harpsync.replication import peers
from harpsync.replication.routes import default_url
from harpsync.replication.status import cluster_status as build_status
from harpsync.storage.hlc import ms_to_version


def parse_credentials(body: dict[str, Any]) -> tuple[str, str] | None:
    try:
        return parse_authorization(body.get("authorization"))
    except ValueError as exc:
        raise BadRequestError(f"'authorization' is invalid: {exc}") from None


def _row_settings(body: dict[str, Any], subs: list[dict[str, Any]] | None,
                  replicates: bool = True) -> dict[str, Any]:
    """The row fields ``body`` sets; ``replicates`` is the flag kept when ``body``
    names neither subscriptions nor ``replicates`` (an update keeps the row's)."""
    row: dict[str, Any] = {
        "replicates": body.get("replicates", replicates) if subs is None else True,
        "subscriptions": subs,
    }
    for key in ("shard", "start_time", "revoked_certificates", "conflict"):
        if key in body:
            row[key] = body[key]
    # ``retain_authorization`` is accepted for compatibility but nothing is kept: a
    # pinned node re-joins with its certificate, so a peer's password has no use here.
    return row


async def _add(ctx: OpContext, body: dict[str, Any]) -> tuple[str, str]:
    rep = ctx.services.cluster
    hostname = body.get("hostname")
    url = body.get("url") or default_url(str(hostname))
    subs = peers.normalize_subscriptions(body.get("subscriptions"))
    creds = parse_credentials(body)
    settings = _row_settings(body, subs)
    known = rep.rows.get(str(hostname)) if hostname else None
    # A known node added again: what this node now sends it that it did not, the peer
    # copies again (see Mesh.sends_more).
    sends_more = rep.sends_more(str(hostname), {**known, **settings}) if known else []
    answer = await rep.join(url, creds, bool(body.get("verify_tls", True)), subs,
                            {**body, "replicates": settings["replicates"],
                             "sends_more": sends_more})
    name = await rep.adopt(answer, url, settings)
    return name, url


async def add_node(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    name, url = await _add(ctx, body)
    return {"message": f"Successfully added '{body.get('url') or name}' to cluster"}


# What an update may carry that concerns this node alone (the peer is not told).
_LOCAL_ONLY = {"operation", "hostname", "revoked_certificates", "verify_tls",
               "retain_authorization"}


async def _update(ctx: OpContext, body: dict[str, Any], verb: str,
                  replace: bool = False) -> dict[str, Any]:
    """Change a known peer's settings (add it when unknown). ``replace``: the body's
    subscriptions (none: everything, unless ``replicates: false``) replace the row's,
    as for a node added anew; else they are merged into them by table."""
    rep = ctx.services.cluster
    name = body.get("hostname")
    row = rep.rows.get(name) if name else None
    if row is None and body.get("url"):
        row = next((r for r in rep.rows.values() if r.get("url") == body["url"]), None)
    if row is None:
        await _add(ctx, body)
        return {"message": f"Successfully added '{body.get('url') or name}' to cluster"}
    if "revoked_certificates" in body:
        # This node's own decision, applied first and whatever the peer says: it may
        # be down, or refused until the list is cleared.
        await rep.set_revoked(row["name"], body["revoked_certificates"])
        row = rep.rows[row["name"]]
        if set(body) <= _LOCAL_ONLY or (set(body) <= _LOCAL_ONLY | {"url"}
                                        and body["url"] == row.get("url")):
            return _updated(body, row, verb)
    new_subs = peers.normalize_subscriptions(body.get("subscriptions"))
    if replace:
        subs = new_subs
    elif "subscriptions" in body:
        subs = peers.merge_subscriptions(row.get("subscriptions"), new_subs)
    elif body.get("replicates") is True:
        subs = None
    else:
        subs = row.get("subscriptions")
    creds = parse_credentials(body)
    old = {k: v for k, v in row.items() if k != "authorization"}
    # A peer added with ``replicates: false`` stays so when an update changes something
    # else (its shard, policy, revocations): before, it started replicating fully.
    new = {**old, **_row_settings(body, subs, True if replace
                                  else bool(row.get("replicates", True))),
           "learned": False}
    # What this node now sends the peer that it did not: the peer copies it again even
    # where its own row said it took it (a row learned by gossip may say more).
    sends_more = rep.sends_more(row["name"], new)
    # In use here before the peer hears of it: the peer re-copies at once, and that copy
    # must already see what this node now publishes (see Mesh.stage_settings).
    # Only what decides what flows (certificate revocations etc. apply once saved: the
    # peer must still be recognised while it is told).
    rep.stage_settings({**old, "replicates": new["replicates"],
                                 "subscriptions": new["subscriptions"]})
    try:
        # The peer's row takes shard and start_time from the join: send the kept ones,
        # or an update naming neither cleared them there (and the peer's next re-copy
        # took this node's rows from before the start_time).
        # ``sends_more``: the peer copies those databases again even if it saved these
        # settings already (a first attempt killed this node before it saved).
        extra = {**body, "shard": new.get("shard"), "start_time": new.get("start_time"),
                 "replicates": new["replicates"], "sends_more": sends_more}
        # A url in the body is where the peer is now (its address changed): join it
        # there and record it. Before, the join went to the old address (and failed, or
        # reported success for a url it never used).
        # Without credentials the node there must show the pinned key; with them, it
        # is asked its name first, so another node there is not joined at all.
        url = str(body.get("url") or row["url"])
        verify = True if creds is None else bool(body.get("verify_tls", True))
        found = row["name"]
        if creds is not None and url != row["url"]:
            found = await rep.probe(url, creds, verify)
        answer = None
        if found == row["name"]:
            answer = await rep.join(url, creds, verify, subs, extra,
                                    expect=None if creds is not None else row["name"])
            found = str(answer.get("node"))
        if answer is None or found != row["name"]:
            raise BadRequestError(f"the node at '{url}' is {found!r}, not {row['name']!r}")
        await rep.adopt(answer, url, new)
    except BaseException:
        rep.unstage_settings(row["name"])  # nothing half-applied (a no-op once saved)
        raise
    return _updated(body, row, verb)


def _updated(body: dict[str, Any], row: dict[str, Any], verb: str) -> dict[str, Any]:
    shown = body.get("url") or row["name"]
    if verb == "added":
        return {"message": f"Successfully added '{shown}' to cluster"}
    return {"message": f"Successfully updated '{shown}'"}


async def update_node(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return await _update(ctx, body, "updated")


async def set_node_replication(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return await _update(ctx, body, "added")


async def replace_node(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    """A connection of ``configure_cluster``: the peer's settings become the listed
    ones, whatever its row held (its subscriptions are replaced, not merged: a table
    the list no longer names stops replicating)."""
    return await _update(ctx, body, "added", replace=True)


async def remove_node(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    name = body["hostname"]
    await ctx.services.cluster.forget_node(name, notify=True)
    return {"message": f"Successfully removed '{name}' from cluster"}


async def cluster_status(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return build_status(ctx.services.cluster)


async def pause_replication(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    dbs = await ctx.services.cluster.pause(body["hostname"], body.get("database"))
    return {"message": f"Replication from '{body['hostname']}' paused", "databases": dbs}


async def resume_replication(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    dbs = await ctx.services.cluster.resume(body["hostname"], body.get("database"))
    return {"message": f"Replication from '{body['hostname']}' resumed", "databases": dbs}


async def replay_replication(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    from_version = None
    # ``from`` (a wall-clock time: ISO 8601 or ms since 1970) or ``from_time`` (its older
    # name, the same values).
    start = body.get("from", body.get("from_time"))
    field = "from" if "from" in body else "from_time"
    if isinstance(start, int) and not isinstance(start, bool):
        if start > 253402300799999:  # after the year 9999
            raise BadRequestError(f"'{field}' is too far in the future")
        from_version = ms_to_version(start)
    elif start is not None:
        try:
            when = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)  # a time without a zone is UTC
            from_version = ms_to_version(when.timestamp() * 1000)
            if from_version < 0:
                raise ValueError("before 1970")
        except (ValueError, OverflowError, OSError):
            raise BadRequestError(f"'{field}' must be an ISO 8601 time "
                                  "(e.g. 2026-11-30T01:00:00Z) after 1970, or milliseconds "
                                  "since 1970") from None
    dbs = await ctx.services.cluster.replay(body["hostname"], body.get("database"),
                                            body.get("from_seq"), from_version)
    return {"message": f"Replaying replication from '{body['hostname']}'", "databases": dbs}


OPERATIONS = [
    Operation("pause_replication", pause_replication),
    Operation("resume_replication", resume_replication),
    Operation("replay_replication", replay_replication),
    Operation("add_node", add_node),
    Operation("update_node", update_node),
    Operation("set_node_replication", set_node_replication),
    Operation("remove_node", remove_node),
    Operation("cluster_status", cluster_status),
]

__all__ = ["OPERATIONS", "PeerError"]
