"""What an apply job follows, from the peers' rows: conflict policies and held floors.

The replicator answers the ``ApplyPolicy`` seam with these, over its ``hdb_nodes``
rows; they read nothing else, so they are tested with plain rows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from harpsync.replication import peers
from harpsync.storage.conflicts import LWW, PolicyLookup
from harpsync.storage.store import SYSTEM


def policy_lookup(rows: dict[str, dict[str, Any]], database: str,
                  default: str) -> PolicyLookup | None:
    """``(origin, table) -> policy`` for changes to ``database``; None while every
    policy is last-writer-wins (the apply path then skips the review). ``default`` is
    ``replication.conflict``."""
    if database == SYSTEM:
        return None  # users, roles and schema always converge (and hold secrets)
    if default == LWW and not any(
            row.get("conflict") not in (None, LWW)
            or any(s.get("conflict") not in (None, LWW)
                   for s in row.get("subscriptions") or [])
            for row in list(rows.values())):
        return None
    return lambda origin, table: peers.conflict_policy(rows.get(origin), database, table,
                                                       default)


def narrow_origins(rows: dict[str, dict[str, Any]], peer: str, database: str,
                   relay_tables: Mapping[str, list[str]] | None = None,
                   origins: Collection[str] = ()) -> frozenset[str]:
    """Origins other than ``peer`` with a direct link here whose tables the link
    from ``peer`` (a relay for them) may not all carry: this node's subscription
    from ``peer`` does not cover its subscription from the origin, or ``peer``
    itself takes only some of the origin's tables (``relay_tables``, from its
    hello). Their entries applied from ``peer`` raise no floor, so the direct link,
    when it is back, still sends what the relay left out (found by a relay that
    carried a t1 write while a t2 write was made: the direct link then skipped the
    t2 write for good).

    An origin with no data link here (known only by gossip, or by no row at all:
    removed, or named only in ``origins``, the names the link's entries or copy
    use) has relays as its only path, and they bring of it what this node takes
    from them: a relay carrying less than that holds its floor too, or another relay
    taking over later would skip what the first one left out."""
    mine = peers.subscribe_tables(rows.get(peer) or {}, database)
    relay_tables = relay_tables or {}
    if mine is None and not relay_tables:
        return frozenset()
    held = set()
    named = {name: rows.get(name) for name in origins if name not in rows}
    for origin, row in [*rows.items(), *named.items()]:
        if origin == peer:
            continue
        theirs = peers.subscribe_tables(row, database) if row is not None else False
        if theirs is False:
            if row is not None and not row.get("learned"):
                continue  # an operator's row that takes nothing of it: no path brings it
            # Relays are its only path (``peers.origin_tables`` does not limit it).
            theirs = _relayed_tables(rows, origin, database)
            if theirs is False:
                continue
        carried = relay_tables.get(origin)
        if (mine is not None and (mine is False or theirs is None
                                  or not set(theirs) <= set(mine))) \
                or (carried is not None and (theirs is None
                                             or not set(theirs) <= set(carried))):
            held.add(origin)
    return frozenset(held)


def _relayed_tables(rows: dict[str, dict[str, Any]], origin: str,
                    database: str) -> peers.TableFilter:
    """The tables of ``database`` this node takes of ``origin`` by relays: what it takes
    from its other peers, together (None: every table, False: none)."""
    tables: set[str] = set()
    for name, row in list(rows.items()):
        if name == origin:
            continue
        theirs = peers.subscribe_tables(row, database)
        if theirs is None:
            return None
        if theirs is not False:
            tables.update(theirs)
    return sorted(tables) if tables else False
