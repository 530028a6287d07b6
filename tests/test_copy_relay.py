"""Rows and tables that arrive by full copy or hello are relayed (issue 7 item 7)."""

from __future__ import annotations

from harpsync import codec
from tests.helpers import wait_for
from tests.repl_util import all_records, by_id, has_table, insert_batches, join, wait_linked


def test_copied_rows_are_relayed_along_a_line(node_factory):
    """In a line A–B–C (C never links A), rows and a table B received from A by full
    copy reach C, which was already streaming from B, and later writes follow."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    # A and C were paired once and removed: each keeps a tombstone, so the gossip of
    # the joins below never links them again and the mesh stays a line.
    join(c, a)
    wait_linked([(c, a)], ("system",))
    c.call("remove_node", hostname="node-a")
    wait_for(lambda: not any(x["name"] == "node-c" for x in
                             a.call("cluster_status")["connections"]),
             timeout=20, message="A to forget C")
    b.call("create_table", table="base", primary_key="id")
    join(b, c)
    wait_for(lambda: has_table(c, "base"), timeout=20, message="base on C")
    wait_linked([(b, c), (c, b)], ("system", "data"))
    a.call("create_table", table="t2", primary_key="id")
    insert_batches(a, "t2", 0, 1200, batch=400)
    a.call("delete", table="t2", ids=[7])
    join(b, a)
    wait_for(lambda: has_table(b, "t2") and b.count("t2") == 1199, timeout=30,
             message="B's copy of A's t2")
    wait_for(lambda: has_table(c, "t2") and c.count("t2") == 1199, timeout=30,
             message="A's copied rows relayed to C")
    assert "node-a" not in {x["name"] for x in c.call("cluster_status")["connections"]}
    assert "node-c" not in {x["name"] for x in a.call("cluster_status")["connections"]}
    assert all_records(c, "t2") == all_records(b, "t2")
    # B logged the table it learned from A's hello with A's version and origin A.
    b_data = b.node.storage.databases["data"]
    creates = [(b_data.origin_names[origin], version)
               for _seq, raw in b_data.log_after(0, 100_000)
               for origin, version, _user, ops in [codec.unpack(raw)]
               for op in ops if op[1] == "create_table" and op[0] == "t2"]
    assert creates == [("node-a", a.node.storage.databases["data"].tables["t2"].version)]
    a.call("insert", table="t2", records=[{"id": 5000, "v": "late"}])
    wait_for(lambda: by_id(c, "t2", 5000), timeout=20, message="A's later write on C")
