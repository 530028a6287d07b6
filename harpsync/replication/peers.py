"""Rows of ``hdb_nodes`` and what they mean for replication (pure functions).

A row describes this node's relationship with one peer: where it is (``url``), whom to
trust (``ca``, ``revoked_certificates``) and which tables flow in each direction
(``subscriptions``; none means everything replicates both ways).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from harpsync.storage.hlc import ms_to_version
from harpsync.storage.store import SYSTEM

# Keys of a row that describe the peer itself and may be learned from other nodes
# (``pin``: the SHA-256 of the peer's key, which the introducer verified).
IDENTITY_KEYS = ("name", "url", "ca", "pin", "shard")
#: Which tables of a database a link carries: None = every table, a list = those
#: tables, False = none (no link for that database).
TableFilter = list[str] | None | Literal[False]
# The system database always replicates (users, roles), except the node table itself,
# which every node keeps from its own point of view.
LOCAL_ONLY_TABLES = {(SYSTEM, "hdb_nodes"), (SYSTEM, "hdb_conflicts"),
                     (SYSTEM, "hdb_dead_letters")}


def normalize_subscriptions(subs: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Fill ``database`` (default ``data``) and keep only the documented keys."""
    if subs is None:
        return None
    out = []
    for sub in subs:
        entry = {"database": sub.get("database", "data"), "table": sub["table"],
                 "subscribe": bool(sub.get("subscribe")), "publish": bool(sub.get("publish"))}
        if sub.get("conflict") is not None:
            entry["conflict"] = sub["conflict"]  # this node's policy for the peer's changes
        out.append(entry)
    return out


def without_policies(subs: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Subscriptions minus their ``conflict`` policies (which move no data)."""
    if subs is None:
        return None
    return [{k: v for k, v in s.items() if k != "conflict"} for s in subs]


def keep_policies(old: list[dict[str, Any]] | None,
                  new: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``new`` with the ``conflict`` policies of ``old`` for the same tables: a peer's
    join sends its mirror of the subscriptions, which never carries this node's
    policies."""
    if new is None or not old:
        return new
    policies = {(s.get("database"), s.get("table")): s["conflict"] for s in old
                if s.get("conflict") is not None}
    out = []
    for sub in new:
        policy = policies.get((sub.get("database"), sub.get("table")))
        out.append({**sub, "conflict": policy} if policy and "conflict" not in sub else sub)
    return out


def conflict_policy(row: dict[str, Any] | None, database: str, table: str,
                    default: str) -> str:
    """The policy for changes from the node of ``row`` to ``database.table``: its
    subscription's, else the row's own ``conflict``, else the node default."""
    if row is None:
        return default
    for sub in row.get("subscriptions") or []:
        if sub.get("database", "data") == database and sub.get("table") == table \
                and sub.get("conflict"):
            return str(sub["conflict"])
    return str(row.get("conflict") or default)


def merge_subscriptions(old: list[dict[str, Any]] | None,
                        new: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Upsert ``new`` into ``old`` by (database, table), leaving other tables alone."""
    if new is None:
        return old
    merged = {(s["database"], s["table"]): s for s in (old or [])}
    for sub in new:
        merged[(sub["database"], sub["table"])] = sub
    return list(merged.values())


def mirror(subs: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The peer's view of the same subscriptions: ``subscribe`` and ``publish`` swapped."""
    if subs is None:
        return None
    return [{**{k: v for k, v in s.items() if k != "conflict"},
             "subscribe": s["publish"], "publish": s["subscribe"]} for s in subs]


def _tables(row: Mapping[str, Any], database: str, direction: str) -> TableFilter:
    if database == SYSTEM:
        return None
    subs = row.get("subscriptions")
    if subs is None:
        return None if row.get("replicates", True) else False
    tables = [s["table"] for s in subs if s.get("database", "data") == database
              and s.get(direction)]
    return tables or False


def subscribe_tables(row: Mapping[str, Any], database: str) -> TableFilter:
    """Tables of ``database`` this node receives from the peer: None = all, False = none."""
    return _tables(row, database, "subscribe")


def publish_tables(row: Mapping[str, Any], database: str) -> TableFilter:
    """Tables of ``database`` this node sends to the peer: None = all, False = none."""
    return _tables(row, database, "publish")


def receives_more(old: Mapping[str, Any], new: Mapping[str, Any], database: str) -> bool:
    """Whether row ``new`` has this node receive from the peer a table of ``database``
    that row ``old`` did not: only then does the link need a full copy (the rows
    written meanwhile were filtered out of the stream its cursor passed). Less, or
    the same with other publish flags, needs none: the link subscribes again with the
    new tables and catches up from its cursor."""
    return _grows(subscribe_tables(old, database), subscribe_tables(new, database))


def sends_more(old: Mapping[str, Any], new: Mapping[str, Any], database: str) -> bool:
    """Whether row ``new`` has this node send the peer a table of ``database`` that row
    ``old`` did not: then the peer's link needs a full copy, whatever its own row
    says (the rows are not the same on both sides: a row learned by gossip)."""
    return _grows(publish_tables(old, database), publish_tables(new, database))


def _grows(before: TableFilter, after: TableFilter) -> bool:
    if after is False or before is None:
        return False
    if before is False or after is None:
        return True
    return not set(after) <= set(before)


def origin_tables(rows: Mapping[str, Mapping[str, Any]], peer: str,
                  database: str) -> dict[str, list[str]]:
    """Per origin other than ``peer``: the tables of ``database`` this node takes from
    it, where an operator limited them (an explicit row with subscriptions; a row
    learned by gossip limits nothing; one set to ``replicates: false`` gives nothing).
    A link from ``peer`` asks for no more of that
    origin's writes (relayed or copied): what the origin does not publish to this
    node, another peer must not hand over either."""
    out: dict[str, list[str]] = {}
    for name, row in rows.items():
        if name == peer or row.get("learned"):
            continue
        if row.get("subscriptions") is None:
            if row.get("replicates", True) is False and database != SYSTEM:
                out[name] = []  # an operator set it not to replicate: nothing of it
            continue
        tables = subscribe_tables(row, database)
        if tables is not None:
            out[name] = [] if tables is False else list(tables)
    return out


def table_allowed(database: str, table: str | None, allowed: list[str] | None) -> bool:
    """Whether an operation on ``table`` passes a table filter."""
    if table is None:
        return True
    if (database, table) in LOCAL_ONLY_TABLES:
        return False
    return allowed is None or table in allowed


def serial_revoked(serial_hex: str, revoked: list[Any] | None) -> bool:
    """Compare certificate serials ignoring case, colons and leading zeros."""
    def norm(value: Any) -> str:
        return str(value).replace(":", "").upper().lstrip("0")

    wanted = norm(serial_hex)
    return any(norm(item) == wanted for item in (revoked or []))


def identity(row: dict[str, Any]) -> dict[str, Any]:
    """The part of a row other nodes may learn (never credentials).

    ``selective`` tells them the peer was added with explicit subscriptions (or was
    learned with that flag), so gossip must not give it a full-replication link.
    """
    out = {k: row[k] for k in IDENTITY_KEYS if row.get(k) is not None}
    if row.get("learned"):
        selective = bool(row.get("selective"))
    else:
        selective = row.get("subscriptions") is not None
    if selective:
        out["selective"] = True
    return out


def start_floor(row: Mapping[str, Any] | None) -> int:
    """The version at or below which the peer's changes are skipped: its row's
    ``start_time`` (ISO 8601) as a version, 0 without one or when it does not parse."""
    start = (row or {}).get("start_time")
    if not start:
        return 0
    try:
        when = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
    except ValueError:
        return 0
    return ms_to_version(when.timestamp() * 1000)
