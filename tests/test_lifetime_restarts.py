"""Schema changes across process lifetimes: restarts with the clock set back, SIGKILL
in the middle of lifecycle operations, real subprocess nodes."""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.repl_util import (
    all_records,
    by_id,
    has_table,
    insert_batches,
    join,
    stays,
    wait_linked,
)

BACK = {"HARPSYNC_CLOCK_OFFSET_MS": "-300000"}  # 5 minutes, past the 60 s skew bound


def _pair(node_factory: Any) -> tuple[Any, Any]:
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_database", database="data")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    return a, b


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["table", "database"])
def test_a_drop_made_with_the_clock_set_back_drops_it_on_the_peer(node_factory, what):
    """node-b creates t (or database d2 with t); node-a restarts with its clock 5
    minutes back (its own versions keep rising, but the create is node-b's) and drops
    it: the drop must be newer than the incarnation it drops. Before, it took the
    clock's version, older than the create: node-b kept it and its rows (a drop older
    than the incarnation), and node-a took it back from node-b's next hello, empty."""
    a, b = _pair(node_factory)
    database = "data" if what == "table" else "d2"
    b.call("create_table", database=database, table="t", primary_key="id")
    b.call("insert", database=database, table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t", 1, database) is not None, timeout=20,
             message="t on node-a")
    a.stop()
    a.extra_env.update(BACK)
    a.start()
    wait_linked([(a, b), (b, a)], ("system", database))
    if what == "table":
        a.call("drop_table", database=database, table="t")
    else:
        a.call("drop_database", database=database)
    wait_for(lambda: not has_table(b, "t", database), timeout=20,
             message="t dropped on node-b")
    b.stop()  # node-a's links reconnect: node-b's hellos must not bring t back
    b.start()
    wait_linked([(a, b), (b, a)], ("system",))
    stays(lambda: not has_table(a, "t", database) and not has_table(b, "t", database),
          duration=1.0)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("what", ["table", "database"])
def test_a_re_create_made_with_the_clock_set_back_survives_the_peer(node_factory, what):
    """node-b drops t (or database d2); node-a, restarted with its clock 5 minutes back,
    creates t again and writes a row: the new incarnation must be newer than the drop.
    Before, it was older: node-b ignored the create (and held the row back as a write
    to a table it had not learned), and node-b's next hello carried the drop marker,
    which dropped node-a's new table with its row; a database re-created that way was
    deleted by node-a's own next start, as one whose drop outlived its files."""
    a, b = _pair(node_factory)
    database = "data" if what == "table" else "d2"
    b.call("create_table", database=database, table="t", primary_key="id")
    wait_for(lambda: has_table(a, "t", database), timeout=20, message="t on node-a")
    if what == "table":
        b.call("drop_table", database=database, table="t")
    else:
        b.call("drop_database", database=database)
    wait_for(lambda: not has_table(a, "t", database), timeout=20,
             message="t dropped on node-a")
    a.stop()
    a.extra_env.update(BACK)
    a.start()
    wait_linked([(a, b), (b, a)], ("system",))
    a.call("create_table", database=database, table="t", primary_key="id")
    a.call("insert", database=database, table="t", records=[{"id": 7}])
    wait_for(lambda: by_id(b, "t", 7, database) is not None, timeout=20,
             message="the row on node-b")
    a.restart()
    b.restart()
    wait_linked([(a, b), (b, a)], ("system", database))
    stays(lambda: by_id(a, "t", 7, database) is not None
          and by_id(b, "t", 7, database) is not None, duration=1.0)


@pytest.mark.timeout(120)
def test_a_database_re_created_by_a_job_killed_between_its_commits_reaches_the_peer(
        node_factory):
    """node-a drops database d and creates d.t again; SIGKILL between the new
    environment's commit (its creation version and t) and system's (the create's log
    entry): after a restart d.t exists on node-a with no trace of the old rows, and
    node-b, which applied the drop, learns the new incarnation and its rows."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_table", database="d", table="t", primary_key="id")
    a.call("insert", database="d", table="t", records=[{"id": 1}])
    join(b, a)
    wait_for(lambda: by_id(b, "t", 1, "d") is not None, timeout=20, message="d.t on node-b")
    a.call("drop_database", database="d")
    wait_for(lambda: not has_table(b, "t", "d"), timeout=20, message="d dropped on node-b")
    a.stop()
    a.extra_env["HARPSYNC_CRASH_AT"] = "between_commits"
    a.start()
    with pytest.raises(httpx.HTTPError):  # no answer: it died between the two commits
        a.post({"operation": "create_table", "database": "d", "table": "t",
                "primary_key": "id"})
    assert a.proc is not None and a.proc.wait(30) == 137
    del a.extra_env["HARPSYNC_CRASH_AT"]
    a.start()
    assert has_table(a, "t", "d") and a.count("t", "d") == 0
    a.call("insert", database="d", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t", 2, "d") is not None, timeout=30,
             message="the new incarnation's row on node-b")
    stays(lambda: by_id(b, "t", 1, "d") is None and b.count("t", "d") == 1, duration=1.0)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("retry_on", ["node-a", "node-b"])
def test_a_widening_killed_before_it_was_saved_and_retried_copies_the_rows(node_factory,
                                                                          retry_on):
    """node-a widens what it replicates with node-b (t1 to every table) and is killed
    after node-b took the change, before node-a saved it (``adopt``). node-b re-copied
    from node-a as it heard of it, but node-a came back with its old row and sent t1
    only: node-b's cursor passed t2's rows. The operator retries (on either node) and
    it succeeds: t2's rows written before must reach node-b. Before, node-b's row was
    already wide, so it kept its cursor and never got them."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    a.call("insert", table="t2", records=[{"id": 1, "v": "before"}])
    join(b, a, subscriptions=[{"database": "data", "table": "t1",
                               "subscribe": True, "publish": True}])
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20, message="t1 flowing")
    a.stop()
    a.extra_env["HARPSYNC_CRASH_AT"] = "adopt"
    a.start()
    with pytest.raises(httpx.HTTPError):  # killed once node-b answered
        a.post({"operation": "set_node_replication", "hostname": b.name,
                "replicates": True})
    assert a.proc is not None and a.proc.wait(30) == 137
    del a.extra_env["HARPSYNC_CRASH_AT"]
    a.start()
    wait_linked([(a, b), (b, a)], ("system", "data"), timeout=30)
    if retry_on == "node-a":
        a.call("set_node_replication", hostname=b.name, replicates=True)
    else:
        b.call("set_node_replication", hostname=a.name, replicates=True)
    a.call("insert", table="t2", records=[{"id": 2, "v": "after"}])
    wait_for(lambda: by_id(b, "t2", 2) is not None, timeout=30, message="t2 flowing")
    wait_for(lambda: by_id(b, "t2", 1) is not None, timeout=30,
             message="t2's row written before the widening on node-b")


@pytest.mark.timeout(150)
def test_a_remove_killed_before_the_cursors_went_does_not_skip_a_new_node_s_log(
        node_factory):
    """node-a removes node-b and is killed between deleting its row and forgetting its
    cursors. node-b is then wiped and comes back with a new log, longer than node-a's
    old cursor, and node-a adds it again: node-a must read the new log from its start.
    Before, the old cursor survived the kill and node-a resumed after it, skipping
    node-b's first writes for good."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    for i in range(5):
        b.call("insert", table="t", records=[{"id": i}])
    wait_for(lambda: a.count("t") == 5, timeout=20, message="node-b's rows on node-a")
    a.stop()
    a.extra_env["HARPSYNC_CRASH_AT"] = "forget_node"
    a.start()
    with pytest.raises(httpx.HTTPError):
        a.post({"operation": "remove_node", "hostname": b.name})
    assert a.proc is not None and a.proc.wait(30) == 137
    del a.extra_env["HARPSYNC_CRASH_AT"]
    a.start()
    b.kill()
    shutil.rmtree(b.root)  # a new node-b: new keys, a new log
    b.start()
    b.call("create_table", table="t", primary_key="id")
    for i in range(100, 120):
        b.call("insert", table="t", records=[{"id": i}])
    b.restart()  # its log as this process opens it is past node-a's old cursor
    join(a, b)
    wait_for(lambda: by_id(a, "t", 119) is not None, timeout=30,
             message="the new node-b's last row on node-a")
    missing = [i for i in range(100, 120) if by_id(a, "t", i) is None]
    assert not missing, f"node-a skipped node-b's rows {missing}"


@pytest.mark.timeout(150)
def test_an_add_node_killed_before_it_was_saved_can_be_retried(node_factory):
    """node-a's add_node of node-b is killed once node-b recorded node-a (and signed its
    certificate) but before node-a recorded node-b: after a restart node-a has no row
    for node-b and replicates nothing with it; the retried add_node pairs them and the
    rows written meanwhile flow both ways."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1}])
    a.stop()
    a.extra_env["HARPSYNC_CRASH_AT"] = "adopt"
    a.start()
    with pytest.raises(httpx.HTTPError):
        a.post({"operation": "add_node", "hostname": b.name, "url": b.repl_url,
                "verify_tls": False,
                "authorization": {"username": "admin", "password": "test-password"}})
    assert a.proc is not None and a.proc.wait(30) == 137
    del a.extra_env["HARPSYNC_CRASH_AT"]
    a.start()
    assert a.call("cluster_status")["connections"] == []
    b.call("create_table", table="u", primary_key="id")
    b.call("insert", table="u", records=[{"id": 2}])
    join(a, b)
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=30, message="t's row on node-b")
    wait_for(lambda: by_id(a, "u", 2) is not None, timeout=30, message="u's row on node-a")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("what", ["table", "database"])
def test_a_copy_killed_part_way_resumes_after_its_table_was_dropped_and_re_created(
        node_factory, what):
    """node-b is SIGKILLed part-way through its first copy of t; while it is down node-a
    drops t (or its database) and creates it again with five rows (ids below where the
    copy stopped). node-b resumes: it holds exactly the new incarnation's rows."""
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    total = 40_000
    a.call("create_table", table="t", primary_key="id")
    insert_batches(a, "t", 1, total, batch=2000)

    def partial() -> bool:
        res = b.post({"operation": "describe_table", "table": "t"})
        return res.status_code == 200 and 2_000 < res.json()["record_count"] < total

    join(b, a)
    wait_for(partial, timeout=60, interval=0.005, message="node-b part-way through the copy")
    b.kill()
    if what == "table":
        a.call("drop_table", table="t")
    else:
        a.call("drop_database", database="data")
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": i, "v": "new"} for i in range(1, 6)])
    b.start()
    wait_for(lambda: b.count("t") == 5, timeout=60, message="node-b holding the new rows")
    a.call("insert", table="t", records=[{"id": 6, "v": "new"}])
    wait_for(lambda: by_id(b, "t", 6) is not None, timeout=30, message="the stream on")
    stays(lambda: b.count("t") == 6, duration=1.0)
    assert {r["v"] for r in all_records(b, "t")} == {"new"}


@pytest.mark.timeout(150)
def test_a_wiped_node_re_added_with_its_clock_behind_has_its_writes_arrive(node_factory):
    """node-a removes node-b, which is wiped and comes back under its name with its
    clock 2 minutes behind (past the skew bound, so it never learns the old versions):
    its new writes are older than the old node-b's, and node-a must take them. Before,
    node-a's floor for the name (``hw:node-b``, the newest version held from it)
    outlived the removal and its link filtered them out as already held."""
    a = node_factory("node-a")
    b = node_factory("node-b", process=True)
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.call("insert", table="t", records=[{"id": i} for i in range(5)])
    wait_for(lambda: a.count("t") == 5, timeout=20, message="node-b's rows on node-a")
    a.call("remove_node", hostname=b.name)
    b.stop()
    shutil.rmtree(b.root)  # a new node-b: new keys, a new log, a clock behind
    b.extra_env["HARPSYNC_CLOCK_OFFSET_MS"] = "-120000"
    b.start()
    join(a, b)
    wait_for(lambda: has_table(b, "t"), timeout=30, message="node-b learning t")
    b.call("insert", table="t", records=[{"id": 99}])
    wait_for(lambda: by_id(a, "t", 99) is not None, timeout=30,
             message="the new node-b's first row on node-a")
    b.call("insert", table="t", records=[{"id": 100}])  # after node-a's copy began
    wait_for(lambda: by_id(a, "t", 100) is not None, timeout=30,
             message="the new node-b's streamed row on node-a")
