"""Full copy (DESIGN §5): a new node receives every record under concurrent writes,
keeps versions and its own rows, reports progress, and resumes after SIGKILL."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.lifecycle_util import StatusWatcher, db_socket, post_with
from tests.repl_util import all_records, by_id, insert_batches, join, table_hash

ONLY_ON_B = 9_000_000


class BackgroundWriter:
    """Keeps inserting new records and updating old ones on a node from a thread."""

    def __init__(self, node: Any, table: str, update_ids: range) -> None:
        self.node = node
        self.table = table
        self.update_ids = update_ids
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="writer")

    def start(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        next_id = 1_000_000
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                n = self.rounds
                res = post_with(client, self.node, "insert", table=self.table,
                                records=[{"id": next_id + i, "v": f"new{n}"} for i in range(20)])
                next_id += 20
                if res.status_code != 200:
                    self.errors.append(res.text)
                lo = self.update_ids.start + (n * 10) % len(self.update_ids)
                ids = [self.update_ids[(lo - self.update_ids.start + i) % len(self.update_ids)]
                       for i in range(10)]
                res = post_with(client, self.node, "update", table=self.table,
                                records=[{"id": i, "v": f"upd{n}"} for i in ids])
                if res.status_code != 200:
                    self.errors.append(res.text)
                self.rounds += 1


@pytest.mark.timeout(240)
def test_full_copy_under_writes_keeps_versions_and_local_rows(node_factory):
    """A node joining a 50,000-record node under concurrent writes ends with identical
    contents, original versions, its own prior rows, and shows copy progress."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    total = 50_000
    a.call("create_table", table="t", primary_key="id")
    insert_batches(a, "t", 1, total, batch=1000)
    b.call("create_table", table="t", primary_key="id")
    b.call("insert", table="t", records=[{"id": ONLY_ON_B, "v": "only-b"}])
    sample = [1, 777, 25_000, 39_999]
    before = {i: by_id(a, "t", i) for i in sample}
    joined_at_ms = time.time() * 1000

    writer = BackgroundWriter(a, "t", range(40_000, 50_001))
    with StatusWatcher(b, "node-a", "data") as watch:
        writer.start()
        try:
            join(b, a)
            wait_for(lambda: "copying" in watch.seen, timeout=30, interval=0.01,
                     message="B's link from A to report copying")
            wait_for(lambda: watch.states and watch.states[-1] == "streaming", timeout=120,
                     interval=0.05, message="B's copy from A to finish and stream")
            wait_for(lambda: writer.rounds >= 3, timeout=30, message="some concurrent writes")
        finally:
            writer.stop()
    assert not writer.errors, writer.errors[:3]

    assert watch.copies, f"no copy progress seen; states {watch.states}"
    for progress in watch.copies:
        assert set(progress) >= {"records_copied", "records_total"}, progress
        assert isinstance(progress["records_copied"], int)
        assert isinstance(progress["records_total"], int)
        assert 0 <= progress["records_copied"] <= progress["records_total"] + 10_000, progress
    assert max(p["records_total"] for p in watch.copies) >= total

    expected = a.count("t")
    wait_for(lambda: b.count("t") == a.count("t"), timeout=60, interval=0.2,
             message="B's count to equal A's")
    wait_for(lambda: table_hash(b, "t") == table_hash(a, "t"), timeout=60, interval=0.5,
             message="B's contents to equal A's")
    assert b.count("t") == expected == total + 1 + 20 * writer.rounds

    only_b = by_id(b, "t", ONLY_ON_B)
    assert only_b is not None and only_b["v"] == "only-b", "a row only B had was deleted"
    for rid, original in before.items():
        on_b = by_id(b, "t", rid)
        on_a = by_id(a, "t", rid)
        assert on_b is not None and original is not None
        assert on_b["__updatedtime__"] == on_a["__updatedtime__"] == original["__updatedtime__"]
        assert on_b["__updatedtime__"] < joined_at_ms
        assert on_b == original
    status = b.call("cluster_status")
    sock = db_socket(status, "node-a", "data")
    assert sock is not None and sock["state"] == "streaming" and "copy" not in sock


@pytest.mark.timeout(240)
def test_copy_interrupted_by_sigkill_resumes(node_factory):
    """A receiver SIGKILLed in the middle of a full copy resumes after restart and ends
    with exactly the source's contents."""
    a = node_factory("node-a")
    b = node_factory("node-b", process=True)
    total = 60_000
    a.call("create_table", table="t", primary_key="id")
    insert_batches(a, "t", 1, total, batch=1000)

    def partial() -> bool:
        res = b.post({"operation": "describe_table", "table": "t"})
        return res.status_code == 200 and 0 < res.json()["record_count"] < total

    join(a, b)
    wait_for(partial, timeout=60, interval=0.005, message="B part-way through the copy")
    b.kill()
    b.start()
    wait_for(lambda: b.count("t") == total, timeout=120, interval=0.2,
             message="B to finish the copy after restart")
    assert table_hash(b, "t") == table_hash(a, "t")
    rows = all_records(b, "t", attributes=["id"])
    assert [r["id"] for r in rows] == list(range(1, total + 1))


@pytest.mark.timeout(180)
def test_copy_progress_after_a_resumed_copy_counts_the_rows_copied_before(node_factory):
    """A copy paused part-way and resumed reports the rows it copied before the pause in
    ``records_copied``: the resumed copy sends only the rest, while ``records_total``
    is the whole table, so counting from 0 again never got near the total."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    total = 40_000
    a.call("create_table", table="t", primary_key="id")
    insert_batches(a, "t", 1, total, batch=2000)

    def partial() -> bool:
        res = b.post({"operation": "describe_table", "table": "t"})
        return res.status_code == 200 and 2_000 < res.json()["record_count"] < total

    join(b, a)
    wait_for(partial, timeout=60, interval=0.005, message="B part-way through the copy")
    b.call("pause_replication", hostname="node-a", database="data")
    held = b.count("t")
    assert held < total, "the copy ended before the pause: nothing to resume"
    with StatusWatcher(b, "node-a", "data") as watch:
        b.call("resume_replication", hostname="node-a", database="data")
        wait_for(lambda: b.count("t") == total, timeout=60, interval=0.05,
                 message="B to finish the resumed copy")
    assert watch.copies, "no copy progress seen"
    for progress in watch.copies:
        assert held <= progress["records_copied"] <= progress["records_total"], (
            held, progress)
