"""Two-node replication of every write kind, of schema, and of add_node's options."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.repl_util import (
    BASIC,
    CREDS,
    all_records,
    by_id,
    hdb_nodes,
    join,
    stored_rows,
    wait_linked,
)


def _strip_sizes(value: Any) -> Any:
    """describe_all without the byte sizes, which differ between nodes."""
    if isinstance(value, dict):
        return {k: _strip_sizes(v) for k, v in value.items()
                if k not in ("db_size", "table_size", "db_audit_size")}
    if isinstance(value, list):
        return [_strip_sizes(v) for v in value]
    return value


def _write_kinds(src: Any, dst: Any, table: str) -> None:
    """Insert, update (partial), upsert and delete on ``src``; each shows up on ``dst``."""
    src.call("insert", table=table, records=[{"id": 1, "name": "one", "age": 1},
                                             {"id": 2, "name": "two", "age": 2},
                                             {"id": 3, "name": "three", "age": 3}])
    wait_for(lambda: by_id(dst, table, 3) == by_id(src, table, 3) is not None, timeout=15,
             message=f"insert on {src.name} to reach {dst.name}")

    src.call("update", table=table, records=[{"id": 1, "age": 10}])
    wait_for(lambda: (by_id(dst, table, 1) or {}).get("age") == 10, timeout=15,
             message="update to replicate")
    merged = by_id(dst, table, 1)
    assert merged is not None and merged["name"] == "one", merged  # partial merge kept name
    assert merged == by_id(src, table, 1)

    src.call("upsert", table=table, records=[{"id": 2, "name": "deux"}, {"id": 4, "name": "4"}])
    wait_for(lambda: by_id(dst, table, 4) is not None
             and (by_id(dst, table, 2) or {}).get("name") == "deux", timeout=15,
             message="upsert to replicate")
    assert by_id(dst, table, 2) == by_id(src, table, 2)

    src.call("delete", table=table, ids=[3])
    wait_for(lambda: by_id(dst, table, 3) is None, timeout=15, message="delete to replicate")
    wait_for(lambda: all_records(dst, table) == all_records(src, table), timeout=15,
             message="tables equal")


def test_every_write_kind_replicates_both_ways(node_factory):
    """Insert, partial update, upsert and delete replicate A->B and B->A."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    res = join(a, b)
    assert res == {"message": f"Successfully added '{b.repl_url}' to cluster"}
    wait_for(lambda: b.post({"operation": "describe_table", "table": "dog"}).status_code == 200,
             timeout=15, message="table to reach B")
    wait_linked([(a, b), (b, a)], ("system", "data"))
    _write_kinds(a, b, "dog")
    b.call("create_table", table="cat", primary_key="id")
    wait_for(lambda: a.post({"operation": "describe_table", "table": "cat"}).status_code == 200,
             timeout=15, message="table created on B to reach A")
    _write_kinds(b, a, "cat")


def test_new_databases_and_tables_replicate_both_ways(node_factory):
    """create_database + create_table on either node appear on the other; describe_all equal."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(a, b), (b, a)])
    a.call("create_database", database="dev")
    a.call("create_table", database="dev", table="dog", primary_key="id")
    b.call("create_database", database="prod")
    b.call("create_table", database="prod", table="cat", primary_key="cid")

    def has(node: Any, db: str, table: str) -> bool:
        return node.post({"operation": "describe_table", "database": db,
                          "table": table}).status_code == 200

    wait_for(lambda: has(b, "dev", "dog") and has(a, "prod", "cat"), timeout=15,
             message="new databases and tables on both nodes")
    a.call("insert", database="dev", table="dog", records=[{"id": 1, "x": 1}])
    b.call("insert", database="prod", table="cat", records=[{"cid": 7, "y": 2}])
    wait_for(lambda: b.count("dog", "dev") == 1 and a.count("cat", "prod") == 1, timeout=15,
             message="records in new tables to replicate")
    wait_for(lambda: _strip_sizes(a.call("describe_all"))
             == _strip_sizes(b.call("describe_all")), timeout=15,
             message="describe_all equal on both nodes")
    described = _strip_sizes(a.call("describe_all"))
    assert described["dev"]["dog"]["hash_attribute"] == "id"
    assert described["prod"]["cat"]["hash_attribute"] == "cid"


def test_add_node_header_authorization_not_retained(node_factory):
    """A Basic header string authorizes add_node, and credentials are not stored by default."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    res = a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
                 authorization=BASIC)
    assert res == {"message": f"Successfully added '{b.repl_url}' to cluster"}
    a.call("create_table", table="dog", primary_key="id")
    a.call("insert", table="dog", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "dog", 1) is not None, timeout=15, message="record on B")
    rows = hdb_nodes(a)
    assert b.name in {r["name"] for r in rows}
    assert all("authorization" not in r for r in rows), rows
    assert "test-password" not in str(rows)
    for node in (a, b):
        node.stop()
        for row in stored_rows(node.root, "system", "hdb_nodes"):
            assert "authorization" not in row, row
            assert "test-password" not in str(row)


def test_add_node_retain_authorization_stores_nothing(node_factory):
    """retain_authorization: true is accepted, but the peer's password is not kept (a
    pinned peer re-joins with its certificate; issue 8): not read back, not stored."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b, retain_authorization=True)
    shown = {r["name"]: r for r in hdb_nodes(a)}
    assert b.name in shown and "authorization" not in shown[b.name]  # never read back
    a.stop()
    stored = {r["name"]: r for r in stored_rows(a.root, "system", "hdb_nodes")}
    assert stored[b.name].get("authorization") is None, stored[b.name]


@pytest.mark.parametrize("auth", [CREDS, BASIC], ids=["object", "header"])
def test_add_node_message_uses_url(node_factory, auth):
    """The add_node answer is exactly Harper's success message naming the URL."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    res = a.post({"operation": "add_node", "hostname": b.name, "url": b.repl_url,
                  "verify_tls": False, "authorization": auth})
    assert res.status_code == 200, res.text
    assert res.json() == {"message": f"Successfully added '{b.repl_url}' to cluster"}
