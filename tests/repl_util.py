"""Helpers shared by the replication tests (joining, status polling, table snapshots)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from tests.helpers import wait_for

CREDS = {"username": "admin", "password": "test-password"}
BASIC = "Basic " + base64.b64encode(b"admin:test-password").decode()
PASSWORD = "test-password"


def join(a: Any, b: Any, expect: int | None = 200, **extra: Any) -> Any:
    """``add_node`` on ``a`` for ``b`` (admin credentials, verify_tls off)."""
    body: dict[str, Any] = {"hostname": b.name, "url": b.repl_url, "verify_tls": False,
                            "authorization": CREDS}
    body.update(extra)
    return a.call("add_node", expect=expect, **body)


def connection(node: Any, peer: str) -> dict[str, Any] | None:
    """The ``cluster_status`` connection of ``node`` named ``peer`` (or None)."""
    for conn in node.call("cluster_status")["connections"]:
        if conn["name"] == peer:
            return conn
    return None


def linked(node: Any, peer: str, databases: tuple[str, ...] = ("system",)) -> bool:
    """Whether ``node`` has connected sockets to ``peer`` for each of ``databases``."""
    conn = connection(node, peer)
    if conn is None:
        return False
    socks = {s["database"]: s for s in conn["database_sockets"]}
    return all(db in socks and socks[db]["connected"] for db in databases)


def fully_linked(node: Any, peer: str) -> bool:
    """Whether every socket ``node`` has to ``peer`` is connected (and there is one)."""
    conn = connection(node, peer)
    return bool(conn and conn["database_sockets"]
                and all(s["connected"] for s in conn["database_sockets"]))


def wait_linked(pairs: list[tuple[Any, Any]], databases: tuple[str, ...] = ("system",),
                timeout: float = 20) -> None:
    """Wait until each ``(node, peer)`` pair shows connected sockets for ``databases``."""
    for node, peer in pairs:
        wait_for(lambda n=node, p=peer: linked(n, p.name, databases), timeout=timeout,
                 message=f"{node.name} connected to {peer.name} for {databases}")


def has_table(node: Any, table: str, database: str = "data") -> bool:
    return node.post({"operation": "describe_table", "database": database,
                      "table": table}).status_code == 200


def by_id(node: Any, table: str, rid: Any, database: str = "data") -> dict[str, Any] | None:
    """One record (all attributes) or None."""
    res = node.post({"operation": "search_by_id", "database": database, "table": table,
                     "ids": [rid], "get_attributes": ["*"]})
    if res.status_code != 200:
        return None
    rows = res.json()
    return rows[0] if rows else None


def all_records(node: Any, table: str, database: str = "data",
                attributes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a table with a numeric ``id`` >= 0, sorted by id."""
    res = node.post({"operation": "search_by_conditions", "database": database,
                     "table": table, "get_attributes": attributes or ["*"],
                     "conditions": [{"attribute": "id", "comparator": "greater_than_equal",
                                     "value": 0}]})
    assert res.status_code == 200, res.text
    return sorted(res.json(), key=lambda r: r["id"])


def table_hash(node: Any, table: str, database: str = "data") -> str:
    """A hash of the sorted JSON of a table's full contents."""
    rows = all_records(node, table, database)
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def hdb_nodes(node: Any) -> list[dict[str, Any]]:
    """All rows of ``system.hdb_nodes`` on ``node``."""
    return node.call("search_by_value", database="system", table="hdb_nodes",
                     attribute="name", value="*", get_attributes=["*"])


def stays(predicate: Callable[[], Any], duration: float = 1.0, interval: float = 0.05) -> None:
    """Negative check: ``predicate`` stays truthy for a bounded window (polled)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), "condition stopped holding"
        time.sleep(interval)


def insert_batches(node: Any, table: str, start: int, count: int, batch: int = 500,
                   database: str = "data", **extra: Any) -> None:
    """Insert ``count`` records with ids ``start..start+count-1`` in batches."""
    for lo in range(start, start + count, batch):
        hi = min(lo + batch, start + count)
        node.call("insert", database=database, table=table,
                  records=[{"id": i, "v": f"r{i}", **extra} for i in range(lo, hi)])


def stored_rows(root: Any, database: str, table: str) -> list[dict[str, Any]]:
    """Live records of a table read straight from a STOPPED node's LMDB environment."""
    import lmdb

    from harpsync import codec

    env = lmdb.open(str(root / "database" / database), readonly=True, lock=False,
                    max_dbs=4096)
    try:
        dbi = env.open_db(b"t:" + table.encode(), create=False)
        with env.begin() as txn:
            rows = [codec.unpack(value) for _key, value in txn.cursor(db=dbi)]
    finally:
        env.close()
    return [record for _version, _origin, record in rows if record is not None]
