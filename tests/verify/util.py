"""Helpers shared by the verify_cluster and repair_cluster tests."""

from __future__ import annotations

import asyncio
from typing import Any

from harpsync.storage.keys import encode_id
from tests.helpers import wait_for


def _linked(node: Any, peer: str) -> bool:
    for conn in node.call("cluster_status")["connections"]:
        if conn["name"] == peer:
            return bool(conn["database_sockets"]) and all(
                s["connected"] for s in conn["database_sockets"])
    return False


def _socket(node: Any, peer: str, database: str) -> dict[str, Any]:
    for conn in node.call("cluster_status")["connections"]:
        if conn["name"] == peer:
            for sock in conn["database_sockets"]:
                if sock["database"] == database:
                    return dict(sock)
    return {}


def rows(node: Any, table: str) -> list[dict[str, Any]]:
    found = node.call("search_by_value", database="data", table=table,
                      attribute="id", value="*", get_attributes=["*"])
    return sorted(found, key=lambda r: str(r["id"]))


def same_rows(a: Any, b: Any, table: str) -> bool:
    return rows(a, table) == rows(b, table)


def verify(node: Any, table: str, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = node.call("verify_cluster", database="data", table=table, **extra)
    return result


def setup_table(a: Any, b: Any, table: str, count: int) -> None:
    a.call("create_table", database="data", table=table, primary_key="id")
    wait_for(lambda: table in b.call("describe_database", database="data"), timeout=15,
             message=f"{table} on {b.name}")
    for i in range(0, count, 500):
        a.call("insert", database="data", table=table,
               records=[{"id": n, "v": f"value-{n}"} for n in range(i, min(count, i + 500))])
    wait_for(lambda: b.count(table) == count, timeout=20, message=f"{table} replicated")


def _unlogged_row(node: Any, table: str, *ids: int, origin: str | None = None,
                  **record: Any) -> None:
    """Store rows on ``node`` through the writer (its hashes kept) but without a log
    entry: differences replication never repairs. ``origin``: the node they claim to
    come from (this one if None)."""
    from harpsync.storage.records import put_record

    storage = node.node.storage

    def job(ctx: Any) -> None:
        db, t = storage.table("data", table)
        oid = 0 if origin is None else db.origin_ids[origin]
        for rid in ids:
            put_record(ctx.txn(db), t, encode_id(rid), storage.hlc.now(), oid,
                       {"id": rid, **record})

    asyncio.run_coroutine_threadsafe(storage.write(job), node.loop).result(10)
