"""Tables a peer holds that this node lacks: a verify of a whole database asks each
peer for the names of its tables shared with this node (``verify_tables``, answered in
``verify_peer.py``) and reports those missing here.

Such a table is reported, not repaired: creating a table is schema replication's (the
link creates the peer's tables when it connects), and a table missing here may be a
drop made here that has not reached the peer yet, which creating it again would undo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harpsync.errors import HarpsyncError
from harpsync.replication import peers
from harpsync.replication.membership import node_request
from harpsync.replication.verify_rows import BOTH, PULL, PUSH, Outcome, Pair, unreachable
from harpsync.storage.store import SYSTEM

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator


async def missing_here(rep: Replicator, database: str | None, nodes: list[str] | None,
                       down: dict[str, str], timeout: float,
                       ) -> tuple[list[Outcome], list[tuple[str, str]]]:
    """The tables each peer (of ``nodes``) holds, of each replicated database (or
    ``database``), that this node lacks.

    A peer that cannot be asked (down, or of an earlier release without
    ``verify_tables``) is skipped: its pairs' own outcomes say why. ``down``: peers
    found unreachable in this run (not asked; filled in here).

    Returns:
        An outcome per missing table, and the (peer, database) links whose tables were
        listed (their earlier findings are replaced).
    """
    out: list[Outcome] = []
    listed: list[tuple[str, str]] = []
    links = [(name, str(row["url"]), db_name)
             for name, row in sorted(rep.rows.items())
             if row.get("url") and (nodes is None or name in nodes)
             for db_name in sorted(rep.replicated_databases())
             if db_name != SYSTEM and database in (None, db_name)]
    for peer, url, db_name in links:
        if peer in down:
            continue
        request = {"type": "operation",
                   "body": {"operation": "verify_tables", "database": db_name}}
        try:
            answer = await node_request(rep, url, request, verify=True, present_cert=True,
                                        timeout=timeout, expect=peer)
        except HarpsyncError as exc:
            if unreachable(exc):
                down.setdefault(peer, exc.message)
            continue
        result = answer.get("result")
        db = rep.storage.databases.get(db_name)
        row = rep.rows.get(peer)
        if answer.get("error") or not isinstance(result, dict) or db is None or row is None:
            continue
        listed.append((peer, db_name))
        receive = peers.subscribe_tables(row, db_name)
        send = peers.publish_tables(row, db_name)
        for name in result.get("tables") or []:
            if not isinstance(name, str) or name in db.tables:
                continue
            pull = receive is not False and peers.table_allowed(db_name, name, receive)
            push = send is not False and peers.table_allowed(db_name, name, send)
            if not (pull or push):
                continue  # the peer shares it with this node; this node does not
            direction = BOTH if pull and push else PULL if pull else PUSH
            out.append(Outcome(
                Pair(peer, url, db_name, name, direction), in_sync=False, missing_here=True,
                error=f"table '{db_name}.{name}' exists on {peer} but not on "
                      f"{rep.node_name}: a repair does not create it (the link creates a "
                      "peer's tables when it connects; drop it there if it was dropped "
                      "here)"))
    return out, listed
