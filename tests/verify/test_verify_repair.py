"""repair_cluster: damage repaired, what a repair keeps and sends; who may run it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from harpsync import codec
from harpsync.storage import rowhash
from harpsync.storage.database import Database
from harpsync.storage.keys import encode_id
from tests.helpers import wait_for
from tests.repl_util import join, wait_linked
from tests.verify.util import _linked, _socket, _unlogged_row, rows, same_rows, setup_table, verify

MAP_SIZE = 1 << 30


def _damage(root: Path) -> dict[int, bytes]:
    """Change node-b's stored rows of ``data.dmg`` behind the write path (its hashes stay
    as they were). Returns the original stored bytes of key 1."""
    db = Database("data", root / "database" / "data", MAP_SIZE, "node-b")
    table = db.tables["dmg"]
    try:
        with db.env.begin(write=True) as txn:
            raw1 = bytes(txn.get(encode_id(1), db=table.dbi))
            version, origin, record = codec.unpack(raw1)
            # 1: another value under the same version and origin (only damage does that)
            txn.put(encode_id(1), codec.pack([version, origin, {**record, "v": "damaged"}]),
                    db=table.dbi)
            # 2: another value under an older version
            v2, o2, r2 = codec.unpack(txn.get(encode_id(2), db=table.dbi))
            txn.put(encode_id(2), codec.pack([v2 - 1, o2, {**r2, "v": "old"}]), db=table.dbi)
            # 3: the row is gone
            txn.delete(encode_id(3), db=table.dbi)
            # 5000: a row only this node holds
            txn.put(encode_id(5000), codec.pack([version, 0, {"id": 5000, "v": "extra"}]),
                    db=table.dbi)
            # 10: a deleted row comes back (older than its tombstone)
            vt, ot, _ = codec.unpack(txn.pop(encode_id(10), db=table.tomb_dbi))
            txn.put(encode_id(10), codec.pack([vt - 1, ot, {"id": 10, "v": "back"}]),
                    db=table.dbi)
            damaged1 = bytes(txn.get(encode_id(1), db=table.dbi))
            names = dict(db.origin_names)
    finally:
        db.close()
    return {0: rowhash.row_digest(encode_id(1), raw1, False, names),
            1: rowhash.row_digest(encode_id(1), damaged1, False, names)}


def _keys(entry: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {k["id"]: k for k in entry["keys"]}


def test_deep_verify_finds_damage_and_repair_fixes_it(pair):
    """Rows changed on disk while node-b was stopped (a changed value, a deleted row, an
    extra row, a resurrected deleted row) are found by a deep verify with the right
    winners; dry_run changes nothing; repair_cluster makes the tables equal."""
    a, b = pair
    setup_table(a, b, "dmg", 300)
    a.call("delete", database="data", table="dmg", ids=[10, 11])
    wait_for(lambda: b.count("dmg") == 298, timeout=15, message="the deletes replicated")
    b.stop()
    digests = _damage(b.root)
    b.start()
    wait_for(lambda: _linked(a, b.name) and _linked(b, a.name), timeout=20,
             message="relinked after the restart")
    # The damage bypassed the write path: only a deep verify rebuilds the hashes.
    assert verify(a, "dmg")["in_sync"] is True
    tie_winner = "node-a" if digests[0] > digests[1] else "node-b"
    expected = {1: tie_winner, 2: "node-a", 3: "node-a", 5000: "node-b", 10: "node-a"}

    result = verify(a, "dmg", deep=True)
    assert result["in_sync"] is False
    [entry] = result["checked"]
    found = _keys(entry)
    assert entry["differences"] == 5
    assert {k: v["winner"] for k, v in found.items()} == expected
    assert found[3]["peer"] == {"absent": True}
    assert found[5000]["this"] == {"absent": True}
    assert found[10]["this"]["deleted"] is True and found[10]["peer"]["deleted"] is False
    assert found[1]["this"]["version"] == found[1]["peer"]["version"]
    assert found[2]["this"]["version"] == found[2]["peer"]["version"] + 1

    before = (rows(a, "dmg"), rows(b, "dmg"))
    dry = a.call("repair_cluster", database="data", table="dmg", deep=True, dry_run=True)
    [dry_entry] = dry["checked"]
    would = {k: sorted(v) for k, v in dry_entry["changed"].items()}
    assert would == {"node-a": sorted(k for k, w in expected.items() if w == "node-b"),
                     "node-b": sorted(k for k, w in expected.items() if w == "node-a")}
    assert (rows(a, "dmg"), rows(b, "dmg")) == before
    assert verify(a, "dmg", deep=True)["checked"][0]["differences"] == 5

    repaired = b.call("repair_cluster", database="data", table="dmg", deep=True)
    [rep_entry] = repaired["checked"]
    assert {k: sorted(v) for k, v in rep_entry["changed"].items()} == would
    assert verify(a, "dmg", deep=True)["in_sync"] is True
    assert verify(b, "dmg", deep=True)["in_sync"] is True
    assert same_rows(a, b, "dmg")
    by_id = {r["id"]: r for r in rows(a, "dmg")}
    assert 10 not in by_id and 3 in by_id and by_id[5000]["v"] == "extra"
    assert by_id[2]["v"] == "value-2"


def test_only_super_users_verify_or_repair(pair):
    """verify_cluster and repair_cluster need super_user: others get 403."""
    a, _b = pair
    a.call("add_role", role="reader", permission={
        "super_user": False, "data": {"tables": {"live": {
            "read": True, "insert": False, "update": False, "delete": False}}}})
    a.call("add_user", username="reader", password="reader-pass", role="reader",
           active=True)
    for operation in ("verify_cluster", "repair_cluster"):
        response = a.post({"operation": operation}, auth=("reader", "reader-pass"))
        assert response.status_code == 403, response.text
        assert operation in response.text or "super" in response.text.lower()


def test_bad_filters_are_named(pair):
    """Unknown tables, databases and nodes are 4xx answers naming them."""
    a, _b = pair
    response = a.post({"operation": "verify_cluster", "database": "data", "table": "nope"})
    assert response.status_code == 404 and "nope" in response.text
    response = a.post({"operation": "verify_cluster", "nodes": ["node-x"]})
    assert response.status_code == 400 and "node-x" in response.text
    response = a.post({"operation": "repair_cluster", "dry_run": "yes"})
    assert response.status_code == 400 and "dry_run" in response.text


def test_repair_keeps_what_dest_wins_and_manual_review_keep(node_factory):
    """node-a takes t_dst from node-b under dest_wins and t_man under manual_review;
    both nodes wrote id x, node-b last. Replication kept node-a's row (a dead letter, a
    conflict), and the nodes differ. A repair, from either side, used to overwrite it
    with node-b's newer row all the same; now node-a's policies hold as for the
    replicated change: its row stays, the repair lists the id as refused or held for
    review, and the review queue keeps the conflict."""
    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = node_factory("node-a", env=env)
    b = node_factory("node-b", env=env)
    policies = {"t_dst": "dest_wins", "t_man": "manual_review"}
    for table in policies:
        b.call("create_table", database="data", table=table, primary_key="id")
    join(a, b, subscriptions=[{"database": "data", "table": t, "subscribe": True,
                               "publish": True, "conflict": p} for t, p in policies.items()])
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: all(t in a.call("describe_database", database="data")
                         for t in policies), timeout=20, message="the tables on node-a")
    a.call("pause_replication", hostname="node-b", database="data")

    def value(node: Any, table: str) -> Any:
        found = node.call("search_by_id", database="data", table=table, ids=["x"],
                          get_attributes=["*"])
        return found[0]["v"] if found else None

    for table in policies:
        a.call("upsert", database="data", table=table, records=[{"id": "x", "v": "a"}])
    wait_for(lambda: all(value(b, t) == "a" for t in policies), timeout=15,
             message="node-a's writes on node-b")
    for table in policies:
        b.call("upsert", database="data", table=table, records=[{"id": "x", "v": "b"}])
    a.call("resume_replication", hostname="node-b", database="data")
    wait_for(lambda: len(a.call("list_dead_letters", table="t_dst")["dead_letters"]) == 1
             and len(a.call("list_conflicts", table="t_man")["conflicts"]) == 1,
             timeout=15, message="the policies applied on node-a")
    assert (value(a, "t_dst"), value(a, "t_man")) == ("a", "a")

    for node in (a, b):  # node-a stores node-b's row itself, then node-b sends it
        for table, held in (("t_dst", "refused"), ("t_man", "conflicts")):
            # A dry run says what the repair will do (it said node-a's row would change).
            [dry] = node.call("repair_cluster", database="data", table=table,
                              dry_run=True)["checked"]
            assert dry["changed"] == {"node-a": [], "node-b": []}, dry
            assert dry[held]["node-a"] == ["x"], dry
            [entry] = node.call("repair_cluster", database="data", table=table)["checked"]
            assert entry["differences"] == 1, entry
            assert entry["changed"] == {"node-a": [], "node-b": []}, entry
            assert entry[held]["node-a"] == ["x"], entry
            assert value(a, table) == "a", f"{node.name}'s repair overwrote {table}"
    assert value(b, "t_dst") == value(b, "t_man") == "b"
    assert len(a.call("list_conflicts", table="t_man")["conflicts"]) == 1
    assert len(a.call("list_dead_letters", table="t_dst")["dead_letters"]) == 1


def test_a_repair_of_large_records_fits_its_messages_in_frames(node_factory, monkeypatch):
    """verify_keys answered every candidate's record in one message (up to 2,000) and
    verify_repair sent 500 rows per message, whatever their size: a repair of a table
    of large records needed frames past the limit and failed every time. And the rows a
    repair fetched went into one job logging one entry per origin: for this node's own
    rows (lost here, say by a restore) an entry past the log limit, refused. Here the
    frame limit is 1 MiB and each side lacks 1.6 MB of the other's records; node-b's
    claim node-a as their origin."""
    from harpsync.replication import transport

    monkeypatch.setattr(transport, "MAX_FRAME", 1024 * 1024)
    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = node_factory("node-a", env=env)
    b = node_factory("node-b", env=env)
    for node in (a, b):  # a node's own log entries must fit in frames
        node.node.storage.max_log_entry = transport.MAX_FRAME
    a.call("create_table", table="big", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="big", records=[{"id": 1000}])
    wait_for(lambda: b.count("big") == 1, timeout=20, message="the table on node-b")
    blob = "x" * 40_000
    _unlogged_row(a, "big", *range(40), blob=blob)
    _unlogged_row(b, "big", *range(100, 140), origin="node-a", blob=blob)
    [entry] = a.call("repair_cluster", database="data", table="big")["checked"]
    assert entry.get("error") is None, entry
    assert (sorted(entry["changed"]["node-a"]), sorted(entry["changed"]["node-b"])) == (
        list(range(100, 140)), list(range(40)))
    assert a.count("big") == b.count("big") == 81
    assert a.call("verify_cluster", database="data", table="big")["in_sync"] is True


def test_a_repair_holds_back_rows_stamped_beyond_the_clock_skew_bound(node_factory):
    """node-a's clock is an hour ahead: node-b holds its write back (clock skew) until
    the clocks agree. node-a's repair pushed that row to node-b all the same, past the
    bound replication keeps; now node-b holds it back there too and says so."""
    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = node_factory("node-a", env={**env, "HARPSYNC_CLOCK_OFFSET_MS": str(3_600_000)})
    b = node_factory("node-b", env=env)
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    wait_for(lambda: "t" in b.call("describe_database", database="data"), timeout=20,
             message="table t on node-b")
    a.call("insert", table="t", records=[{"id": 1, "v": "from the future"}])
    wait_for(lambda: "clock skew" in str(_socket(b, "node-a", "data").get("last_error")),
             timeout=20, message="node-b holding node-a's write back")
    [entry] = a.call("repair_cluster", database="data", table="t")["checked"]
    assert entry["differences"] == 1, entry
    assert entry["changed"]["node-b"] == [] and entry["skewed"]["node-b"] == [1], entry
    assert b.count("t") == 0, "the repair stored a row replication holds back"


def test_a_repair_holds_only_keys_and_versions_and_reads_records_per_chunk(
        pair, monkeypatch):
    """A repair kept every differing row's record (both sides') in memory from the
    comparison to the end of the repair: millions of differing rows needed gigabytes.
    Now the comparison keeps digests and versions only, and the repair reads records a
    chunk (about answer_budget bytes) at a time, storing each before reading the next.
    The budget is lowered to 16 KiB; each side lacks 60 of the other's 2 KB rows."""
    from harpsync.replication import verify_peer
    from harpsync.storage import compare

    a, b = pair
    monkeypatch.setattr(verify_peer, "ANSWER_BYTES", 16 * 1024)
    budget = verify_peer.answer_budget()
    jobs: list[int] = []
    real_job = compare.repair_job

    def spy(*args: Any, **kwargs: Any) -> Any:
        jobs.append(sum(compare.row_size(row) for _key, row in args[4]))
        return real_job(*args, **kwargs)

    monkeypatch.setattr(compare, "repair_job", spy)
    setup_table(a, b, "chunked", 1)
    blob = "y" * 2000
    _unlogged_row(a, "chunked", *range(100, 160), blob=blob)
    _unlogged_row(b, "chunked", *range(200, 260), blob=blob)
    verifier = a.node.verifier
    [outcome] = asyncio.run_coroutine_threadsafe(
        verifier.run(verifier.plan("data", "chunked"), repair=True), a.loop).result(60)
    assert outcome.error is None, outcome.error
    assert len(outcome.differences) == 120
    assert all(m is None or m[4] is None for _k, m, _t, _s in outcome.differences)
    assert all(t is None or t[4] is None for _k, _m, t, _s in outcome.differences)
    assert (sorted(outcome.changed["node-a"]), sorted(outcome.changed["node-b"])) == (
        list(range(200, 260)), list(range(100, 160)))
    # Every job (here, and there through verify_repair) held one chunk: about the
    # budget (it ends on the row that reaches it).
    assert len(jobs) >= 120 * 2000 // budget and max(jobs) <= 2 * budget, jobs
    assert a.count("chunked") == b.count("chunked") == 121
    assert verify(a, "chunked")["in_sync"] is True
