"""Writes answer their version in ``X-Harpsync-Version``; ``wait_for_replication`` waits
until peers have applied it (200) or reports each peer's applied version (504).

Two real nodes joined over mutual TLS, shared by the module; the stopped-peer test
restarts the peer it stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import ADMIN, InProcessNode, harper_error, wait_for
from tests.repl_util import by_id, has_table, join, wait_linked

VERSION = "x-harpsync-version"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    root = tmp_path_factory.mktemp("barrier")
    a = InProcessNode("node-a", root / "node-a").start()
    b = InProcessNode("node-b", root / "node-b").start()
    try:
        join(a, b)
        a.call("create_table", database="dev", table="dog", primary_key="id")
        wait_for(lambda: has_table(b, "dog", "dev"), timeout=20, message="dev.dog on b")
        wait_linked([(a, b), (b, a)], ("system", "dev"))
        yield a, b
    finally:
        b.close()
        a.close()


def wait(node: Any, **body: Any) -> Any:
    return node.post({"operation": "wait_for_replication", **body})


def test_writes_answer_their_version_with_harpers_body(pair):
    """insert, update, upsert and delete carry X-Harpsync-Version (rising); bodies are Harper's."""
    a, _ = pair
    seen = []
    for op, body in (("insert", {"records": [{"id": 1, "name": "Penny"}]}),
                     ("update", {"records": [{"id": 1, "name": "Kato"}]}),
                     ("upsert", {"records": [{"id": 2, "name": "Rex"}]}),
                     ("delete", {"ids": [2]})):
        response = a.post({"operation": op, "database": "dev", "table": "dog", **body})
        assert response.status_code == 200, response.text
        seen.append(int(response.headers[VERSION]))
        assert set(response.json()) <= {"message", "inserted_hashes", "skipped_hashes",
                                        "update_hashes", "upserted_hashes", "deleted_hashes"}
    assert seen == sorted(seen) and len(set(seen)) == 4
    read = a.post({"operation": "search_by_id", "database": "dev", "table": "dog", "ids": [1]})
    assert VERSION not in read.headers  # a read commits nothing
    skipped = a.post({"operation": "insert", "database": "dev", "table": "dog",
                      "records": [{"id": 1}]})
    assert skipped.json()["skipped_hashes"] == [1] and VERSION not in skipped.headers


def test_wait_for_replication_on_a_live_peer(pair):
    """Once wait_for_replication answers 200, the peer serves the write (read-your-writes)."""
    a, b = pair
    response = a.post({"operation": "insert", "database": "dev", "table": "dog",
                       "records": [{"id": 10, "name": "Barrier"}]})
    version = response.headers[VERSION]
    answer = wait(a, version=version, database="dev", timeout=20000)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["nodes"]["node-b"]["applied"] is True
    assert body["nodes"]["node-b"]["applied_version"] >= int(version)
    assert by_id(b, "dog", 10, "dev") is not None  # no polling: the barrier said so
    # Named explicitly, and the version as a JSON integer, give the same answer.
    again = wait(a, version=int(version), database="dev", nodes=["node-b"], timeout=1000)
    assert again.status_code == 200, again.text


def test_wait_for_replication_refuses_bad_requests(pair):
    """Unknown nodes, versions from the future and malformed versions are 400s."""
    a, _ = pair
    head = a.post({"operation": "upsert", "database": "dev", "table": "dog",
                   "records": [{"id": 11}]}).headers[VERSION]
    for body, text in (({"nodes": ["ghost"]}, "node 'ghost' is not a peer of this node"),
                       ({"version": str(int(head) + (1 << 40))}, "is newer than any version"),
                       ({"version": "12ab"}, "'version' must be an integer"),
                       ({"version": "9" * 26}, "'version' must be an integer from 0 to 2^64-1"),
                       ({"database": "nodb"}, "database 'nodb' does not exist")):
        response = wait(a, **{"version": head, "database": "dev", **body})
        assert response.status_code in (400, 404), response.text
        assert text in harper_error(response.json())["error"]


def test_wait_for_replication_times_out_on_a_stopped_peer(pair):
    """With the peer stopped: 504, code REPLICATION_LAG_EXCEEDED, and the peer's applied
    version below the write's; after it restarts, the same wait answers 200."""
    a, b = pair
    b.stop()
    try:
        response = a.post({"operation": "insert", "database": "dev", "table": "dog",
                           "records": [{"id": 20, "name": "Offline"}]})
        version = int(response.headers[VERSION])
        answer = wait(a, version=version, database="dev", timeout=300)
        assert answer.status_code == 504, answer.text
        body = answer.json()
        assert body["code"] == "REPLICATION_LAG_EXCEEDED"
        assert body["request_id"] == answer.headers["x-request-id"]
        assert "node-b" in body["error"]
        peer = body["nodes"]["node-b"]
        assert peer["applied"] is False and peer["connected"] is False
        assert 0 < peer["applied_version"] < version
    finally:
        b.start()
    answer = wait(a, version=version, database="dev", timeout=30000)
    assert answer.status_code == 200, answer.text
    assert by_id(b, "dog", 20, "dev") is not None


def test_metrics_follow_prometheus_conventions(pair):
    """/metrics has latency histograms per operation, apply time and delay per peer,
    group commit size and time, reconnects (node-b was restarted above) and copy
    progress; every counter ends in _total and no _created series is sent."""
    a, b = pair
    write = a.post({"operation": "upsert", "database": "dev", "table": "dog",
                    "records": [{"id": 30}]})
    assert wait(a, version=write.headers[VERSION], database="dev",
                timeout=20000).status_code == 200
    text = a.client.get(a.url + "metrics", auth=ADMIN).text
    samples = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['harpsync_operation_duration_seconds_count{operation="upsert"}'] >= 1
    assert samples['harpsync_operation_duration_seconds_count{operation="rejected"}'] >= 1
    assert samples["harpsync_writer_group_jobs_count"] >= 1
    assert samples["harpsync_writer_commit_seconds_count"] >= 1
    assert samples["harpsync_writer_commits_total"] >= 1
    assert any(k.startswith('harpsync_replication_reconnects_total{database="dev",'
                            'peer="node-b"}') and v >= 1 for k, v in samples.items()), text
    assert samples['harpsync_replication_copy_active{database="dev",peer="node-b"}'] == 0
    b_text = b.client.get(b.url + "metrics", auth=ADMIN).text
    assert 'harpsync_replication_apply_seconds_count{database="dev",peer="node-a"}' in b_text
    assert 'harpsync_replication_apply_delay_seconds_count{peer="node-a"}' in b_text
    for body in (text, b_text):
        assert "_created" not in body
        for line in body.splitlines():
            if line.startswith("# TYPE ") and line.endswith(" counter"):
                assert line.split()[2].endswith("_total"), line

def test_a_restarted_node_learns_positions_from_its_peers_cursors(pair):
    """After this node restarts (its in-memory acks gone), a caught-up peer that has
    nothing new to acknowledge still counts: its subscribe starts from its cursor."""
    a, b = pair
    version = int(a.post({"operation": "upsert", "database": "dev", "table": "dog",
                          "records": [{"id": 25}]}).headers[VERSION])
    assert wait(a, version=version, database="dev", timeout=20000).status_code == 200
    a.restart()
    answer = wait(a, version=version, database="dev", timeout=20000)
    assert answer.status_code == 200, answer.text
    assert answer.json()["nodes"]["node-b"]["applied_version"] >= version
