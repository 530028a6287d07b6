"""Transactions whose log entry is large: an update that merges many large records
from a small request replicates (its entry travels alone in one frame), and a write
whose entry no peer could take is refused whole with a 413."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpsync import compression
from harpsync.errors import PayloadTooLargeError
from harpsync.replication import transport
from harpsync.storage import database, reads, writes
from harpsync.storage.store import Storage
from tests.helpers import wait_for
from tests.lifecycle_util import db_socket
from tests.repl_util import join, wait_linked

PAD = "p" * 10_000


@pytest.mark.timeout(180)
def test_an_update_logging_more_than_64_mib_reaches_the_peer(node_factory):
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    for node in (a, b):
        node.call("create_database", database="d")
        node.call("create_table", database="d", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "d"))
    n = 6_800  # 6,800 records of 10 KB: the update's log entry is about 68 MB
    for start in range(0, n, 500):
        a.call("insert", database="d", table="t",
               records=[{"id": i, "pad": PAD} for i in range(start, min(n, start + 500))])
    # A 150 KB request; the entry holds every record as it is after the update.
    a.call("update", database="d", table="t", records=[{"id": i, "flag": 1} for i in range(n)])

    def flagged() -> int:
        rows = b.call("sql", sql="SELECT count(*) AS c FROM d.t WHERE flag = 1")
        return int(rows[0]["c"])

    wait_for(lambda: flagged() == n, timeout=90, interval=0.5,
             message="B holding the update of every record")
    # The link carried it, and is up (under a loaded machine a keep-alive may have
    # timed out while the entry was applied: it reconnects at once).
    def connected() -> bool:
        sock = db_socket(b.call("cluster_status"), a.name, "d")
        return sock is not None and bool(sock["connected"])

    wait_for(connected, timeout=20, message="B's link from A for d up")


def test_frames_fit_the_largest_entry_a_write_may_log():
    assert transport.MAX_FRAME > database.MAX_LOG_ENTRY + 1024  # the batch head
    assert compression.MAX_OUTPUT >= transport.MAX_FRAME  # also when it came compressed


async def test_a_write_logging_more_than_peers_take_is_refused_whole(tmp_path: Path) -> None:
    storage = Storage(tmp_path, "node-a", 1 << 27, max_log_entry=200_000)  # scaled down
    storage.open()
    try:
        await storage.create_database("d")
        await storage.create_table("d", "t", "id")
        db = storage.database("d")
        head = db.next_seq
        big = [{"id": i, "pad": "x" * 1_000} for i in range(300)]
        with pytest.raises(PayloadTooLargeError, match="at most 0 MiB replicate") as info:
            await storage.write(writes.write_records(storage, "d", "t", big, "insert", "u"))
        assert info.value.status == 413
        assert reads.get_by_ids(db, db.tables["t"], [0, 299]) == []
        assert db.next_seq == head  # no sequence was used up
        await storage.write(writes.write_records(storage, "d", "t", big[:100], "insert", "u"))
        assert len(reads.get_by_ids(db, db.tables["t"], list(range(100)))) == 100
    finally:
        storage.close()
