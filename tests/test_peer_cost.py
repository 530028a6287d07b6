"""What one live peer costs the origin, counted in synced commits (never in time).

Writes on A that B applies land in B's log too (for relaying), so B's link back to A
reads them and filters them all out. Reporting that progress made A commit its cursor
for B after every single write: one extra synced commit on A per write. Such reports
now go out at most every ``CAUGHT_UP_INTERVAL``.
"""

from __future__ import annotations

import time

from harpsync.replication.publisher import CAUGHT_UP_INTERVAL
from tests.helpers import wait_for
from tests.repl_util import by_id, has_table

WRITES = 40


def test_a_peer_costs_the_origin_no_commit_per_write(cluster):
    a, b = cluster(2)
    a.call("create_table", table="dog", primary_key="id")
    wait_for(lambda: has_table(b, "dog"), timeout=20, message="dog to reach node-b")
    a.call("insert", table="dog", records=[{"id": 0}])
    wait_for(lambda: by_id(b, "dog", 0) is not None, timeout=20, message="id 0 on node-b")
    writer = a.node.storage.writer
    before, started = writer.commits, time.monotonic()
    for i in range(1, WRITES + 1):
        a.call("insert", table="dog", records=[{"id": i, "name": f"dog-{i}"}])
        # B applies each write (and logs it) before the next one is made.
        wait_for(lambda i=i: by_id(b, "dog", i) is not None, timeout=20,
                 message=f"id {i} on node-b")
    spent = writer.commits - before
    reports = (time.monotonic() - started) / CAUGHT_UP_INTERVAL + 1
    # One commit per write, plus at most one cursor commit per progress report and a
    # little slack for other bookkeeping; before, every write cost a second commit.
    assert spent <= WRITES + reports + 5, (spent, WRITES, reports)
    assert b.count("dog") == WRITES + 1



def test_the_peers_link_back_is_not_woken_per_write_it_applied(cluster):
    """B logs each write of A it applies (for relaying); its link back to A filters them
    all out. Waking that publisher for each of them cost B a cross-thread call and a log
    read per write; now the due ``caught_up`` report's timer reads them at once."""
    a, b = cluster(2)
    a.call("create_table", table="dog", primary_key="id")
    wait_for(lambda: has_table(b, "dog"), timeout=20, message="dog to reach node-b")
    a.call("insert", table="dog", records=[{"id": 0}])
    wait_for(lambda: by_id(b, "dog", 0) is not None, timeout=20, message="id 0 on node-b")
    back = next(iter(b.node.cluster.publishers[("node-a", "data")]))
    before, started = back.log_reads, time.monotonic()
    for i in range(1, WRITES + 1):
        a.call("insert", table="dog", records=[{"id": i, "name": f"dog-{i}"}])
        wait_for(lambda i=i: by_id(b, "dog", i) is not None, timeout=20,
                 message=f"id {i} on node-b")
    reads = back.log_reads - before
    reports = (time.monotonic() - started) / CAUGHT_UP_INTERVAL + 1
    # About two reads per report (the first write after one, and the report's timer);
    # before, one read per write.
    assert reads <= 2 * reports + 5, (reads, WRITES, reports)
    # Nothing was lost on the way: A's cursor in B's log still moves past those writes.
    sub = a.node.cluster.subscribers[("node-b", "data")]
    head = b.node.storage.database("data").head_seq
    wait_for(lambda: sub.applier.committed_seq >= head, timeout=20,
             message="node-a's cursor in node-b's log to reach its head")
