"""read_transaction_log and delete_transaction_logs_before on replicating nodes."""

from __future__ import annotations

import math
import time
from typing import Any

from tests.bulk_jobs.util import TIMES, finished, started
from tests.helpers import wait_for


def _plain(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def cutoff_after(entry: dict[str, Any]) -> float:
    """A whole millisecond after ``entry``'s timestamp, once the clock has passed it by
    one more: a write from now on is stamped after the cutoff, and none shares its
    millisecond (a wall-clock reading could share one with the write just before it)."""
    cutoff = float(math.floor(entry["timestamp"]) + 1)
    wait_for(lambda: time.time() * 1000 >= cutoff + 1, timeout=5, interval=0.001,
             message="the clock passes the cutoff")
    return cutoff


def test_read_transaction_log_shape_and_filters(mesh):
    """Each write to the table is one entry, in order, with user, timestamp and records;
    from/to/limit filter; other tables stay out; only super users may read it."""
    node, _ = mesh
    node.call("create_table", database="dev", table="logdog", primary_key="id")
    node.call("create_table", database="dev", table="cat", primary_key="id")
    node.call("insert", database="dev", table="logdog",
              records=[{"id": 1, "dog_name": "Penny"}, {"id": 2, "dog_name": "Harper"}])
    node.call("insert", database="dev", table="cat", records=[{"id": 1}])
    middle = cutoff_after(node.call("read_transaction_log", database="dev", table="logdog")[-1])
    node.call("update", database="dev", table="logdog", records=[{"id": 1, "dog_name": "Penny B"}])
    node.call("sql", sql="DELETE FROM dev.logdog WHERE id = 2")
    log = node.call("read_transaction_log", schema="dev", table="logdog")
    assert [(e["operation"], e["user"]) for e in log] == [
        ("insert", "admin"), ("update", "admin"), ("delete", "admin")]
    assert _plain(log[0]["records"]) == [{"id": 1, "dog_name": "Penny"},
                                         {"id": 2, "dog_name": "Harper"}]
    assert all(isinstance(t, float) for r in log[0]["records"] for t in
               (r["__createdtime__"], r["__updatedtime__"]))
    assert _plain(log[1]["records"]) == [{"id": 1, "dog_name": "Penny B"}]
    assert log[2]["hash_values"] == [2] and log[2]["records"] == [{"id": 2}]
    stamps = [e["timestamp"] for e in log]
    assert stamps == sorted(stamps) and all(isinstance(s, float) for s in stamps)
    assert stamps[0] < middle <= stamps[1]
    later = node.call("read_transaction_log", database="dev", table="logdog", **{"from": middle})
    assert [e["operation"] for e in later] == ["update", "delete"]
    assert [e["operation"] for e in node.call("read_transaction_log", database="dev",
                                              table="logdog", to=middle)] == ["insert"]
    assert len(node.call("read_transaction_log", database="dev", table="logdog", limit=2)) == 2
    assert node.call("read_transaction_log", database="dev", table="logdog",
                     **{"from": middle, "to": middle - 1}, expect=400)["error"] == \
        "'to' is before 'from'"
    assert node.call("read_transaction_log", database="dev", table="nope",
                     expect=404)["error"] == "Table 'dev.nope' does not exist"
    for body in ({"operation": "read_transaction_log", "database": "dev", "table": "dog"},
                 {"operation": "delete_transaction_logs_before", "database": "dev",
                  "table": "dog", "timestamp": 1}):
        assert node.post(body, auth=("bob", "bobpw")).status_code == 403, body


def test_pruned_log_sends_a_lagging_peer_to_resync(mesh):
    """delete_transaction_logs_before prunes only what is older, answers with a job, and
    a peer that was down past the pruned point repairs itself to every record."""
    a, b = mesh
    a.call("create_table", database="dev", table="t", primary_key="id")
    a.call("insert", database="dev", table="t", records=[{"id": i} for i in range(1, 51)])
    wait_for(lambda: b.post({"operation": "describe_table", "database": "dev", "table": "t"})
             .status_code == 200 and b.count("t", "dev") == 50, timeout=20,
             message="50 records on B")
    b.stop()
    for start in range(51, 91, 10):
        a.call("insert", database="dev", table="t",
               records=[{"id": i} for i in range(start, start + 10)])
    cutoff = cutoff_after(a.call("read_transaction_log", database="dev", table="t")[-1])
    a.call("insert", database="dev", table="t", records=[{"id": 91}])
    response = a.call("delete_transaction_logs_before", schema="dev", table="t",
                      timestamp=cutoff)
    assert response["message"] == f"Starting job with id {response['job_id']}"
    record = finished(a, response["job_id"])
    # The table's create and its first five inserts; the insert after the cutoff stays.
    assert record["status"] == "COMPLETE" and record["result"]["removed"] == 6, record
    remaining = a.call("read_transaction_log", database="dev", table="t")
    assert [[r["id"] for r in e["records"]] for e in remaining] == [[91]]
    b.start()
    wait_for(lambda: b.count("t", "dev") == 91, timeout=40, message="B repaired to 91 records")
    a.call("insert", database="dev", table="t", records=[{"id": 92}])
    wait_for(lambda: b.count("t", "dev") == 92, timeout=20, message="streaming after the repair")


def test_delete_transaction_logs_before_a_huge_timestamp_deletes_all(node):
    """A timestamp past any version (even 1e308 ms) prunes the whole log; the job does
    not fail on the conversion to a version."""
    node.call("create_table", database="dev", table="t", primary_key="id")
    node.call("insert", database="dev", table="t", records=[{"id": 1}])
    record = finished(node, started(node.call("delete_transaction_logs_before",
                                              database="dev", table="t", timestamp=1e308)))
    assert record["status"] == "COMPLETE", record
    assert record["result"]["removed"] == 2, record
    assert node.call("read_transaction_log", database="dev", table="t") == []


def test_read_transaction_log_leaves_out_a_dropped_incarnation(node):
    """A table dropped and created again under the same name shows only its own
    writes: the dropped table's entries are another table's history."""
    node.call("create_table", database="dev", table="again", primary_key="id")
    node.call("insert", database="dev", table="again", records=[{"id": 1, "old": True}])
    node.call("drop_table", database="dev", table="again")
    node.call("create_table", database="dev", table="again", primary_key="id")
    node.call("insert", database="dev", table="again", records=[{"id": 2}])
    log = node.call("read_transaction_log", database="dev", table="again")
    assert [[r["id"] for r in e["records"]] for e in log] == [[2]], log


def test_delete_transaction_logs_before_takes_an_older_entry_that_arrived_late(mesh):
    """An entry older than the timestamp goes even when it reached the log after a newer
    one (a peer's write that arrived late): the log is not in time order."""
    a, b = mesh
    a.call("create_table", database="dev", table="late_log", primary_key="id")
    wait_for(lambda: b.post({"operation": "describe_table", "database": "dev",
                             "table": "late_log"}).status_code == 200, timeout=20,
             message="dev.late_log on B")
    a.call("pause_replication", hostname=b.name, database="dev")
    try:
        b.call("insert", database="dev", table="late_log", records=[{"id": "from-b"}])
        cutoff = cutoff_after(b.call("read_transaction_log", database="dev",
                                     table="late_log")[-1])
        a.call("insert", database="dev", table="late_log", records=[{"id": "from-a"}])
    finally:
        a.call("resume_replication", hostname=b.name, database="dev")
    wait_for(lambda: a.count("late_log", "dev") == 2, timeout=20, message="B's write on A")
    log = a.call("read_transaction_log", database="dev", table="late_log")
    assert [e["records"][0]["id"] for e in log] == ["from-a", "from-b"]  # newer one first
    record = finished(a, started(a.call("delete_transaction_logs_before", database="dev",
                                        table="late_log", timestamp=cutoff)))
    assert record["status"] == "COMPLETE", record
    log = a.call("read_transaction_log", database="dev", table="late_log")
    assert [e["records"][0]["id"] for e in log] == ["from-a"], log
