"""What an apply job follows, from the peers' rows: conflict policies and held floors.

The replicator answers the ``ApplyPolicy`` seam with these, over its ``hdb_nodes``
rows; they read nothing else, so they are tested with plain rows.
"""

from __future__ import annotations

from collections.abc import Mapping
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
                   relay_tables: Mapping[str, list[str]] | None = None) -> frozenset[str]:
    """Origins other than ``peer`` with a direct link here whose tables the link
    from ``peer`` (a relay for them) may not all carry: this node's subscription
    from ``peer`` does not cover its subscription from the origin, or ``peer``
    itself takes only some of the origin's tables (``relay_tables``, from its
    hello). Their entries applied from ``peer`` raise no floor, so the direct link,
    when it is back, still sends what the relay left out (found by a relay that
    carried a t1 write while a t2 write was made: the direct link then skipped the
    t2 write for good)."""
    mine = peers.subscribe_tables(rows.get(peer) or {}, database)
    relay_tables = relay_tables or {}
    if mine is None and not relay_tables:
        return frozenset()
    held = set()
    for origin, row in list(rows.items()):
        if origin == peer:
            continue
        theirs = peers.subscribe_tables(row, database)
        if theirs is False:
            if not row.get("learned"):
                continue  # an operator's row that takes nothing of it: no path brings it
            # Known only by gossip, with no data link: relays are its only path, and
            # they bring what this node takes from them (``peers.origin_tables`` does
            # not limit such an origin). A relay carrying less than that (another
            # relay later carries the rest) must not raise its floor.
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
