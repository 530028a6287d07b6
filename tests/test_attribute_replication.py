"""create_attribute and drop_attribute replicate, and a drop stays dropped.

Before, both changed only the node they ran on. Peers learned a created attribute at
their next reconnect (hellos unite attributes), and a dropped one came back from the
first peer hello that still had it. Now each is a logged ``set_attribute`` op, and per
attribute the newest change wins everywhere (``Table.attribute_marks``).
"""

from __future__ import annotations

from typing import Any

from harpsync.storage import writes
from harpsync.storage.ingest import apply_rows_job
from harpsync.storage.store import Storage
from tests.helpers import wait_for
from tests.repl_util import by_id, has_table, join, stays, wait_linked


def _attributes(node: Any, table: str = "t") -> set[str]:
    described = node.call("describe_table", table=table)
    return {a["attribute"] for a in described["attributes"]}


def test_attribute_changes_replicate_and_a_drop_survives_reconnects(node_factory):
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: has_table(b, "t"), timeout=15, message="t on node-b")

    a.call("create_attribute", table="t", attribute="color")
    wait_for(lambda: "color" in _attributes(b), timeout=15, message="color on node-b")
    a.call("insert", table="t", records=[{"id": 1, "size": 3}])
    wait_for(lambda: "size" in _attributes(b), timeout=15, message="size on node-b")

    b.call("drop_attribute", table="t", attribute="size")
    b.call("drop_attribute", table="t", attribute="color")
    wait_for(lambda: not {"size", "color"} & _attributes(a), timeout=15,
             message="the drops on node-a")
    # New sessions: each node's hello describes the table to the other.
    a.restart()
    wait_linked([(a, b), (b, a)], ("system", "data"))
    stays(lambda: not {"size", "color"} & (_attributes(a) | _attributes(b)), duration=1.5)

    # A record written after the drop brings the attribute back, on both nodes.
    b.call("insert", table="t", records=[{"id": 2, "size": 4}])
    wait_for(lambda: "size" in _attributes(a) and "size" in _attributes(b), timeout=15,
             message="size back after a newer record")
    a.call("create_attribute", table="t", attribute="color")
    wait_for(lambda: "color" in _attributes(b), timeout=15, message="color created again")
    assert by_id(a, "t", 2) is not None
    assert _attributes(a) == _attributes(b)


def test_an_update_after_a_drop_leaves_both_nodes_with_the_same_attributes(node_factory):
    """A record keeps its values when an attribute is dropped. An update of it later
    logs the whole record, old attribute included, and the peer learned attributes from
    that while the writing node learned them only from the request: the peer had the
    attribute back and the writer did not (then hellos spread it back). Both now learn
    from the record as written."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1, "size": 3}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=15, message="the row on node-b")
    a.call("drop_attribute", table="t", attribute="size")
    wait_for(lambda: "size" not in _attributes(b), timeout=15, message="the drop on node-b")
    a.call("update", table="t", records=[{"id": 1, "colour": "red"}])
    wait_for(lambda: (by_id(b, "t", 1) or {}).get("colour") == "red", timeout=15,
             message="the update on node-b")
    assert _attributes(a) == _attributes(b)




async def test_a_record_older_than_a_drop_does_not_bring_the_attribute_back(
        storage: Storage) -> None:
    """A peer's record written before the drop (arriving late, or in a copy) leaves the
    attribute dropped; one written after it brings it back."""
    from harpsync import codec
    from harpsync.storage.keys import encode_id

    await storage.create_table("data", "t", "id", ["size"])
    before = storage.hlc.now()
    await storage.write(writes.attribute_job(storage, "data", "t", "size", present=False))
    after = storage.hlc.now()
    rows = [(encode_id(1), codec.pack([before, 1, {"id": 1, "size": 3}])),
            (encode_id(2), codec.pack([before, 1, {"id": 2, "shape": "round"}]))]
    await storage.write(apply_rows_job(storage, "data", "node-b", "t", rows,
                                       {1: "node-b"}, {"seq": 0}))
    table = storage.databases["data"].tables["t"]
    assert "size" not in table.attributes and "shape" in table.attributes
    rows = [(encode_id(3), codec.pack([after, 1, {"id": 3, "size": 4}]))]
    await storage.write(apply_rows_job(storage, "data", "node-b", "t", rows,
                                       {1: "node-b"}, {"seq": 0}))
    assert "size" in table.attributes
    assert table.attribute_marks["size"] == [after, True]


async def _ship_log(src: Storage, dst: Storage, database: str, after: int) -> int:
    """Apply ``src``'s log entries of ``database`` after ``after`` on ``dst`` (as its
    subscriber would); the last sequence shipped."""
    from harpsync.replication.linkstore import StorageLinkStore

    db = src.databases[database]
    _, entries = db.read_log(after, 100_000)
    if entries:
        await StorageLinkStore(dst).apply_entries(
            database, src.node_name, entries, dict(db.origin_names), {"seq": entries[-1][0]},
            60_000, dst.node_name, 0, None)
    return entries[-1][0] if entries else after


async def test_a_drop_reaching_a_node_after_a_newer_record_leaves_the_attribute(
        tmp_path: Any) -> None:
    """node-a drops ``size``; node-b, not knowing it yet, writes a record with ``size``
    after the drop. Each node then receives the other's change: node-a learns ``size``
    back from the newer record, and node-b must not drop it either (before, it did:
    it had no mark for ``size``, so the older drop won there and the nodes disagreed
    until a reconnect's hello)."""
    a = Storage(tmp_path / "a", "node-a", 1 << 27)
    b = Storage(tmp_path / "b", "node-b", 1 << 27)
    a.open()
    b.open()
    try:
        await a.create_table("data", "t", "id")
        await a.write(writes.write_records(a, "data", "t", [{"id": 1, "size": 1}], "insert",
                                           None))
        await _ship_log(a, b, "system", 0)
        a_seq = await _ship_log(a, b, "data", 0)
        b_seq = b.databases["data"].head_seq
        await a.write(writes.attribute_job(a, "data", "t", "size", present=False))
        b.hlc.observe(a.hlc.now())  # b's next write is newer than the drop
        await b.write(writes.write_records(b, "data", "t", [{"id": 2, "size": 2}], "insert",
                                           None))
        await _ship_log(b, a, "data", b_seq)
        await _ship_log(a, b, "data", a_seq)
        ta, tb = a.databases["data"].tables["t"], b.databases["data"].tables["t"]
        assert "size" in ta.attributes
        assert "size" in tb.attributes
    finally:
        a.close()
        b.close()


async def test_a_hello_with_an_older_drop_leaves_the_attribute(tmp_path: Any) -> None:
    """The same through a hello: node-a's definition says ``size`` was dropped, node-b
    holds a record with ``size`` written after that drop; node-b keeps the attribute
    (marked present at the record's version), as node-a will once the record reaches
    it."""
    from harpsync.storage import schema

    a = Storage(tmp_path / "a", "node-a", 1 << 27)
    b = Storage(tmp_path / "b", "node-b", 1 << 27)
    a.open()
    b.open()
    try:
        await a.create_table("data", "t", "id", ["size"])
        await _ship_log(a, b, "system", 0)
        await _ship_log(a, b, "data", 0)
        await a.write(writes.attribute_job(a, "data", "t", "size", present=False))
        b.hlc.observe(a.hlc.now())
        await b.write(writes.write_records(b, "data", "t", [{"id": 2, "size": 2}], "insert",
                                           None))
        definition = a.databases["data"].tables["t"].definition()
        await schema.ensure_tables(b, "data", {"t": definition}, {}, "node-a")
        tb = b.databases["data"].tables["t"]
        assert "size" in tb.attributes and tb.attribute_marks["size"][1] is True
    finally:
        a.close()
        b.close()


async def test_a_resolved_conflict_teaches_its_attributes_here_as_on_peers(
        storage: Storage) -> None:
    """resolve_conflict writes the chosen record as a local upsert; peers learn its
    attributes from the logged op, so the resolving node must learn them too."""
    from harpsync.storage.conflicts import CONFLICTS, resolve_job, system_put

    await storage.create_table("data", "t", "id")
    await storage.write(writes.write_records(storage, "data", "t", [{"id": 1, "a": 1}],
                                             "insert", None))
    version = storage.hlc.now()
    conflict = {"id": "c1", "database": "data", "table": "t", "record_id": 1,
                "local": {"version": version, "record": {"id": 1, "a": 1}},
                "remote": {"version": version, "record": {"id": 1, "shade": "dark"}}}
    for rid in ("c1", "c2"):  # resolving checks that the conflict is still pending
        await storage.write(lambda ctx, rid=rid: system_put(ctx, storage, CONFLICTS,
                                                            {**conflict, "id": rid}))
    await storage.write(resolve_job(storage, conflict, "remote", None, "admin"))
    assert "shade" in storage.databases["data"].tables["t"].attributes
    await storage.write(resolve_job(storage, {**conflict, "id": "c2"}, None,
                                    {"id": 1, "tint": "blue"}, "admin"))
    assert "tint" in storage.databases["data"].tables["t"].attributes
