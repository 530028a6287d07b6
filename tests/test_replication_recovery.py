"""Recovery: remove and re-add, catch-up after a stop, and after SIGKILL mid-stream."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lmdb
import pytest

from harpsync import codec
from tests.helpers import harper_error, wait_for
from tests.repl_util import (
    all_records,
    by_id,
    connection,
    has_table,
    hdb_nodes,
    insert_batches,
    join,
    stays,
    wait_linked,
)


@pytest.mark.timeout(180)
def test_remove_node_then_add_again(node_factory):
    """remove_node stops replication on both sides; add_node again restores both directions."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_for(lambda: has_table(b, "dog"), timeout=15, message="table on B")
    wait_linked([(a, b), (b, a)], ("system", "data"))

    res = a.call("remove_node", hostname=b.name)
    assert res == {"message": f"Successfully removed '{b.name}' from cluster"}
    wait_for(lambda: connection(a, b.name) is None and connection(b, a.name) is None,
             timeout=10, message="no connection left on either side")
    assert b.name not in {r["name"] for r in hdb_nodes(a)}
    assert a.name not in {r["name"] for r in hdb_nodes(b)}
    # Nothing B acknowledged stays trusted (wait_for_replication, retention) for a node
    # re-added under its name before it subscribes again.
    rep = a.node.cluster
    wait_for(lambda: not [k for k in (*rep.acks, *rep.positions) if k[0] == b.name],
             timeout=10, message="A forgets B's acknowledgements")

    a.call("insert", table="dog", records=[{"id": 1, "side": "a"}])
    b.call("insert", table="dog", records=[{"id": 2, "side": "b"}])
    stays(lambda: by_id(b, "dog", 1) is None and by_id(a, "dog", 2) is None, duration=1.0)

    res = a.post({"operation": "remove_node", "hostname": "ghost-node"})
    assert res.status_code == 400
    assert harper_error(res.json()) == {"error": "ghost-node does not exist"}

    res = join(a, b)
    assert res == {"message": f"Successfully added '{b.repl_url}' to cluster"}
    wait_for(lambda: connection(a, b.name) is not None and connection(b, a.name) is not None,
             timeout=15, message="connections back on both sides")
    a.call("insert", table="dog", records=[{"id": 3, "side": "a"}])
    b.call("insert", table="dog", records=[{"id": 4, "side": "b"}])
    wait_for(lambda: by_id(b, "dog", 3) is not None, timeout=15, message="A->B after re-add")
    wait_for(lambda: by_id(a, "dog", 4) is not None, timeout=15, message="B->A after re-add")

    a.call("create_database", database="later")
    a.call("create_table", database="later", table="cat", primary_key="id")
    a.call("insert", database="later", table="cat", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "cat", 1, "later") is not None, timeout=15,
             message="database created after re-add to reach B")
    b.call("insert", database="later", table="cat", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "cat", 2, "later") is not None, timeout=15,
             message="B's write to the new database to reach A")
    wait_linked([(a, b), (b, a)], ("system", "data", "later"))


@pytest.mark.timeout(180)
def test_catch_up_after_stop(node_factory):
    """B stopped while A writes 1,000 records catches up to the same count after restart."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_for(lambda: has_table(b, "dog"), timeout=15, message="table on B")
    wait_linked([(b, a)], ("system", "data"))
    b.stop()
    insert_batches(a, "dog", 0, 1000, batch=100)
    b.start()
    wait_for(lambda: b.count("dog") == 1000, timeout=30, message="B to catch up")
    assert a.count("dog") == b.count("dog") == 1000
    assert all_records(a, "dog") == all_records(b, "dog")


def _log_entries(root: Path) -> list[list[Any]]:
    env = lmdb.open(str(root / "database" / "data"), readonly=True, lock=False, max_dbs=4096)
    try:
        dbi = env.open_db(b"__txns__", create=False)
        with env.begin() as txn:
            return [codec.unpack(value) for _key, value in txn.cursor(db=dbi)]
    finally:
        env.close()


@pytest.mark.timeout(180)
def test_catch_up_after_sigkill_mid_stream(node_factory):
    """B killed with SIGKILL while behind catches up, and counts every transaction once."""
    total = 20_000
    a = node_factory("node-a")
    b = node_factory("node-b", process=True)
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_for(lambda: has_table(b, "dog"), timeout=15, message="table on B")
    wait_linked([(b, a)], ("system", "data"))

    errors: list[BaseException] = []

    def load() -> None:
        try:
            insert_batches(a, "dog", 0, total, batch=500)
        except BaseException as exc:
            errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: 0 < b.count("dog") < total, timeout=60, interval=0.005,
                 message="B to be part-way through the stream")
        b.kill()
    finally:
        loader.join(120)
    assert not errors, errors
    assert a.count("dog") == total
    b.start()
    wait_for(lambda: b.count("dog") == total, timeout=90, interval=0.1,
             message="B to catch up after SIGKILL")
    ids = [r["id"] for r in all_records(b, "dog", attributes=["id"])]
    assert len(ids) == len(set(ids)) == total

    b.stop()
    seen: Counter[tuple[int, int]] = Counter()
    inserted = 0
    for origin, version, _user, ops in _log_entries(b.root):
        if origin == 0:
            continue
        seen[(origin, version)] += 1
        inserted += sum(1 for op in ops if op[0] == "dog" and op[1] == "insert")
    duplicated = [pair for pair, n in seen.items() if n > 1]
    assert not duplicated, f"transactions logged twice on B: {duplicated[:5]}"
    assert inserted == total
