"""Drops and re-creates made while a peer was down longer than the log is kept."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.lifecycle_util import log_head, log_pruned_through
from tests.repl_util import by_id, join, stays, wait_linked

SHORT_RETENTION = {"LOGGING_AUDITRETENTION": "1s", "REPLICATION_RETENTIONINTERVAL": "200ms"}


def _ids(node: Any, table: str, database: str = "data") -> set[int]:
    rows = node.call("sql", sql=f"SELECT id FROM {database}.{table}")
    return {int(r["id"]) for r in rows}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["table", "database"])
def test_a_drop_and_re_create_made_while_a_peer_was_down_past_retention(node_factory, what):
    """node-b is down while node-a drops t (or its database), creates it again with
    one row, and prunes its logs past both; node-b comes back: t holds only the new
    incarnation's row on both nodes."""
    a = node_factory("node-a", env=SHORT_RETENTION)
    b = node_factory("node-b", env=SHORT_RETENTION)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": i} for i in range(1, 6)])
    wait_for(lambda: b.count("t") == 5, timeout=15, message="rows on node-b")
    b.stop()
    if what == "table":
        a.call("drop_table", table="t")
    else:
        a.call("drop_database", database="data")
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 100}])
    heads = {name: log_head(a, name) for name in ("system", "data")}
    for name, head in heads.items():
        wait_for(lambda n=name, h=head: log_pruned_through(a, n) >= h, timeout=20,
                 message=f"node-a's {name} log pruned")
    b.start()
    wait_for(lambda: by_id(b, "t", 100) is not None, timeout=30, message="new row on node-b")
    a.call("insert", table="t", records=[{"id": 101}])
    wait_for(lambda: by_id(b, "t", 101) is not None, timeout=30, message="marker on node-b")
    stays(lambda: _ids(a, "t") == _ids(b, "t") == {100, 101}, duration=1.0)


@pytest.mark.timeout(60)
def test_a_peer_position_in_a_dropped_database_log_does_not_cover_the_new_one(node_factory):
    """node-a's data log reached sequence 20 on node-b; node-b stops, node-a drops the
    database and writes to a new one (its log starts again at 1): wait_for_replication
    of that write waits for node-b instead of answering that node-b applied it, and
    cluster_status does not call node-b caught up. Before, node-b's position in the old
    log (20) covered every sequence of the new one."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    for i in range(20):
        a.call("insert", table="t", records=[{"id": i}])
    wait_for(lambda: b.count("t") == 20, timeout=15, message="rows on node-b")
    head = log_head(a)
    wait_for(lambda: a.node.cluster.positions.get((b.name, "data"), 0) >= head,
             timeout=15, message="node-b's position at node-a's head")
    b.stop()
    a.call("drop_database", database="data")
    a.call("create_table", table="t", primary_key="id")
    response = a.post({"operation": "insert", "table": "t", "records": [{"id": 100}]})
    version = response.headers["x-harpsync-version"]
    waited = a.post({"operation": "wait_for_replication", "version": version,
                     "timeout": 300})
    assert waited.status_code == 504, waited.json()
