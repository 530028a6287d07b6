"""A verify's peers: unpublished tables withheld, unreachable peers, bad requests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from harpsync.storage.keys import encode_id
from tests.helpers import ADMIN, wait_for
from tests.repl_util import join, wait_linked
from tests.verify.util import _socket, _unlogged_row, verify


def test_a_peer_reads_records_through_verify_only_of_tables_published_to_it(node_factory):
    """verify_keys answers with whole records only for a table this node publishes to
    the asking peer. a takes t1 from b but does not send t1 to b: b may compare (row
    digests and versions, which its own verify of what it sends needs), but asking for
    records returned a's own t1 rows, which a never let b have."""
    from harpsync.replication.membership import node_request

    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    join(a, b, subscriptions=[{"database": "data", "table": "t1",
                               "subscribe": True, "publish": False}])
    wait_linked([(a, b), (b, a)], ("system",))
    a.call("insert", table="t1", records=[{"id": 1, "secret": "a's own"}])

    def ask(records: bool) -> Any:
        body = {"operation": "verify_keys", "database": "data", "table": "t1",
                "keys": [encode_id(1)], "records": records}
        coro = node_request(b.node.cluster, a.repl_url, {"type": "operation", "body": body},
                            verify=True, present_cert=True, timeout=10, expect=a.name)
        return asyncio.run_coroutine_threadsafe(coro, b.loop).result(20)

    answer = ask(records=True)
    assert answer.get("error") is None, answer
    (row,) = answer["result"]["rows"]
    assert row is not None and row[2] == a.name  # compared: digest, version, origin
    assert "a's own" not in json.dumps(row, default=str), "a's record went to b"


def test_a_peer_lists_no_keys_of_a_table_not_published_to_it(node_factory):
    """a takes t1 from b but does not send t1 to b. verify_rows answered b with every
    key of a's rows in the ranges asked (and verify_buckets with a's bucket start keys):
    ids are data b may not read. Now a lists neither; b's own verify of what it sends
    still finds (and repairs) a row a lacks, comparing its own keys one by one."""
    from harpsync.errors import PeerError
    from harpsync.replication.membership import node_request

    a = node_factory("node-a", env={"REPLICATION_VERIFYINTERVAL": "0"})
    b = node_factory("node-b", env={"REPLICATION_VERIFYINTERVAL": "0"})
    a.call("create_table", table="t1", primary_key="id")
    join(a, b, subscriptions=[{"database": "data", "table": "t1",
                               "subscribe": True, "publish": False}])
    wait_linked([(a, b)], ("system", "data"))
    wait_for(lambda: "t1" in b.call("describe_database", database="data"), timeout=20,
             message="t1 on node-b")
    a.call("insert", table="t1", records=[{"id": f"secret-{i}"} for i in range(200)])

    def ask(operation: str, **body: Any) -> Any:
        request = {"type": "operation", "body": {
            "operation": operation, "database": "data", "table": "t1", **body}}
        coro = node_request(b.node.cluster, a.repl_url, request, verify=True,
                            present_cert=True, timeout=10, expect=a.name)
        return asyncio.run_coroutine_threadsafe(coro, b.loop).result(20)

    for operation in ("verify_rows", "verify_buckets"):
        try:
            answer = json.dumps(ask(operation, ranges=[[b"", None]]), default=str)
        except PeerError as exc:  # refused
            answer = exc.message
        assert "secret" not in answer, f"{operation} listed a's keys to b: {answer[:300]}"

    _unlogged_row(b, "t1", 7)  # a row b sends and a lacks
    [entry] = b.call("verify_cluster", database="data", table="t1")["checked"]
    assert entry["direction"] == "push" and entry.get("error") is None, entry
    assert [k["id"] for k in entry["keys"]] == [7], entry
    [entry] = b.call("repair_cluster", database="data", table="t1")["checked"]
    assert entry["changed"] == {"node-b": [], "node-a": [7]}, entry
    assert b.call("verify_cluster", database="data", table="t1")["in_sync"] is True


def test_a_verify_stops_trying_a_peer_it_found_unreachable(node_factory, monkeypatch):
    """With node-b down, a verify of many tables dialled it again for every table, each
    waiting for its own dial to fail (with 1,000 tables and a peer dropping packets:
    hours for one answer). Once the peer is found unreachable, its other pairs of the
    run are reported as not compared, at once."""
    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = node_factory("node-a", env=env)
    b = node_factory("node-b", env=env)
    tables = [f"t{n}" for n in range(6)]
    for name in tables:
        a.call("create_table", table=name, primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: all(t in b.call("describe_database", database="data") for t in tables),
             timeout=20, message="the tables on node-b")
    b.stop()  # its sockets stay open, unanswered: a peer dropping packets
    dials: list[str] = []
    from harpsync.replication import verifier as verifier_module

    real = verifier_module.node_request

    async def counted(*args: Any, **kwargs: Any) -> Any:
        dials.append(args[1])
        return await real(*args, **kwargs)

    from harpsync.replication import verify_tables

    for module in (verifier_module, verify_tables):
        monkeypatch.setattr(module, "node_request", counted)
    monkeypatch.setattr(verifier_module, "REQUEST_TIMEOUT", 1.0)
    result = a.call("verify_cluster", database="data")
    assert result["in_sync"] is False
    errors = [c.get("error") or "" for c in result["checked"]]
    assert len(errors) == len(tables), result
    assert all("Could not reach node at" in e for e in errors), errors
    assert len(dials) == 1, dials


def test_a_verify_that_could_not_compare_keeps_the_differences_last_counted(
        node_factory, monkeypatch):
    """A verify that failed (node-b unreachable) set harpsync_divergent_keys and the
    link's verified differences to 0, as if the difference found before were gone; now
    they keep the last count (and the link says out of sync)."""
    from harpsync.replication import verifier as verifier_module

    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = node_factory("node-a", env=env)
    b = node_factory("node-b", env=env)
    a.call("create_table", table="kept", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: "kept" in b.call("describe_database", database="data"), timeout=20,
             message="the table on node-b")
    _unlogged_row(b, "kept", 7)
    assert verify(a, "kept")["checked"][0]["differences"] == 1
    b.stop()
    monkeypatch.setattr(verifier_module, "REQUEST_TIMEOUT", 1.0)
    [entry] = verify(a, "kept")["checked"]
    assert "Could not reach" in entry["error"], entry
    verified = _socket(a, "node-b", "data")["verified"]
    assert (verified["in_sync"], verified["differences"]) == (False, 1), verified
    metrics = a.client.get(a.url + "metrics", auth=ADMIN).text
    assert 'harpsync_divergent_keys{database="data",peer="node-b",table="kept"} 1.0' in metrics


def test_a_verify_request_with_a_number_for_a_key_is_refused(node_factory):
    """Keys in verify messages must be bytes: ``bytes(n)`` of a number a peer sent would
    allocate n zero bytes (a peer could make this node allocate whatever it named)."""
    from harpsync.errors import PeerError
    from harpsync.replication.membership import node_request

    a = node_factory("node-a", env={"REPLICATION_VERIFYINTERVAL": "0"})
    b = node_factory("node-b", env={"REPLICATION_VERIFYINTERVAL": "0"})
    a.call("create_table", table="t1", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: "t1" in b.call("describe_database", database="data"), timeout=20,
             message="t1 on node-b")

    def ask(operation: str, **body: Any) -> Any:
        request = {"type": "operation", "body": {
            "operation": operation, "database": "data", "table": "t1", **body}}
        coro = node_request(b.node.cluster, a.repl_url, request, verify=True,
                            present_cert=True, timeout=10, expect=a.name)
        return asyncio.run_coroutine_threadsafe(coro, b.loop).result(20)

    for operation, body in (("verify_keys", {"keys": [1 << 20]}),
                            ("verify_ranges", {"starts": [b"", 1 << 20]}),
                            ("verify_rows", {"ranges": [[1 << 20, None]]})):
        with pytest.raises(PeerError, match="must be bytes, not int"):
            ask(operation, **body)


@pytest.mark.timeout(120)
def test_a_verify_that_could_not_reach_the_peer_keeps_the_last_comparison(node_factory):
    """A verify while the peer is down answers with the error, but the link's
    ``verified`` in cluster_status stays the last real comparison (README: "as each was
    last compared"). Before, it became ``in_sync: false`` with 0 differences and stayed
    so after the peer came back, until the next background verify (10 minutes)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b)], databases=("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: b.count("t") == 1, timeout=15, message="the row on node-b")
    assert a.call("verify_cluster", database="data")["in_sync"] is True
    compared = _socket(a, "node-b", "data")["verified"]
    assert compared["in_sync"] is True, compared
    b.close()  # its sockets too: connections are refused, not left in a backlog
    res = a.call("verify_cluster", database="data")
    assert res["in_sync"] is False and res["checked"][0].get("error"), res
    assert _socket(a, "node-b", "data")["verified"] == compared
