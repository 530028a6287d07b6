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
