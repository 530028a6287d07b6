"""Operator control of streams (issue 11, items 1-3): conflict policies, conflicts and
their resolution, dead letters, stream status, pause across a restart, replay from a
time. Two real nodes share one module-scoped pair; node a receives from node b."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from harpsync.config import CONFLICT_POLICIES, Config
from harpsync.errors import ConfigError
from harpsync.storage.conflicts import APPLY, CONFLICT, POLICIES, REFUSE, SKIP, decide
from tests.helpers import ADMIN, InProcessNode, wait_for

POLICY_TABLES = {"t_lww": "last_writer_wins", "t_src": "source_wins",
                 "t_dst": "dest_wins", "t_man": "manual_review"}


def sub(database: str, table: str, conflict: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"database": database, "table": table, "subscribe": True,
                           "publish": True}
    if conflict:
        out["conflict"] = conflict
    return out


SUBSCRIPTIONS = [*(sub("pol", t, p) for t, p in POLICY_TABLES.items()),
                 sub("dl", "audit"), sub("dl", "fine")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    root = tmp_path_factory.mktemp("streams")
    a = InProcessNode("node-a", root / "a").start()
    b = InProcessNode("node-b", root / "b").start()
    try:
        b.call("create_database", database="pol")
        for table in POLICY_TABLES:
            b.call("create_table", database="pol", table=table, primary_key="id")
        a.call("add_node", hostname="node-b", url=b.repl_url, verify_tls=False,
               authorization={"username": ADMIN[0], "password": ADMIN[1]},
               subscriptions=SUBSCRIPTIONS)
        wait_for(lambda: _has_db(a, "pol") and set(a.call("describe_database",
                                                          database="pol")) >= set(POLICY_TABLES),
                 timeout=20, message="pol tables on node-a")
        wait_for(lambda: running(a, "node-b", "pol"), timeout=20, message="pol streaming")
        yield a, b
    finally:
        b.close()
        a.close()


def _has_db(node: Any, name: str) -> bool:
    return name in node.call("describe_all")


def streams(target: Any, **filters: Any) -> list[dict[str, Any]]:
    return target.call("get_replication_status", **filters)["streams"]


def stream(target: Any, peer: str, database: str) -> dict[str, Any]:
    found = streams(target, node=peer, database=database)
    assert len(found) == 1, found
    return found[0]


def running(node: Any, peer: str, database: str) -> bool:
    entry = stream(node, peer, database)
    return entry["state"] == "running" and entry["lag_events"] == 0


def value(node: Any, table: str, rid: str, database: str = "pol") -> Any:
    rows = node.call("search_by_id", database=database, table=table, ids=[rid],
                     get_attributes=["*"])
    return rows[0]["v"] if rows else None


def upsert(node: Any, table: str, rid: str, v: str, database: str = "pol") -> None:
    node.call("upsert", database=database, table=table, records=[{"id": rid, "v": v}])


def test_decide_is_the_pure_policy_rule() -> None:
    """The rule: LWW between one origin's versions, else what the policy says."""
    assert POLICIES == CONFLICT_POLICIES
    local_old, remote_new = (5, 0, {"v": 1}), 9
    assert decide("last_writer_wins", local_old, "a", remote_new, "b") == APPLY
    assert decide("last_writer_wins", (10, 0, {}), "a", 9, "b") == SKIP
    assert decide("source_wins", (10, 0, {}), "a", 9, "b") == APPLY
    assert decide("source_wins", (10, 2, {}), "b", 9, "b") == SKIP  # own older version
    assert decide("dest_wins", local_old, "a", remote_new, "b") == REFUSE
    assert decide("dest_wins", (10, 0, {}), "a", 9, "b") == SKIP
    assert decide("dest_wins", (5, 3, {}), "c", 9, "b") == APPLY  # not written here
    assert decide("manual_review", local_old, "a", remote_new, "b") == CONFLICT
    assert decide("manual_review", (10, 0, {}), "a", 9, "b") == CONFLICT
    assert decide("manual_review", None, "", 9, "b") == APPLY
    # A delete over a record deleted here: nothing to keep, the tombstones agree.
    assert decide("manual_review", (5, 0, None), "a", 9, "b", deleting=True) == APPLY
    assert decide("dest_wins", (5, 0, None), "a", 9, "b", deleting=True) == APPLY
    assert decide("manual_review", (5, 0, None), "a", 9, "b") == CONFLICT


def test_node_default_policy_is_validated() -> None:
    """replication.conflict defaults to last_writer_wins and rejects unknown names."""
    assert Config.load(None, env={}).get("replication.conflict") == "last_writer_wins"
    with pytest.raises(ConfigError, match="replication.conflict"):
        Config.load(None, env={"REPLICATION_CONFLICT": "newest"})


def test_each_policy_on_a_conflicting_pair_then_resolution_replicates(pair) -> None:
    """node-a pauses its stream from node-b; both write the same ids; on resume each
    table's policy decides, manual_review holds both versions, a resolution replicates,
    and a dest_wins refusal is reprocessed once the policy is changed."""
    a, b = pair
    a.call("pause_replication", hostname="node-b", database="pol")
    assert stream(a, "node-b", "pol")["state"] == "paused"
    for table in POLICY_TABLES:  # "older": node-b writes first, node-a after it
        upsert(b, table, "older", "b")
    for table in POLICY_TABLES:
        upsert(a, table, "older", "a")
        upsert(a, table, "newer", "a")
    wait_for(lambda: all(value(b, t, "newer") == "a" for t in POLICY_TABLES),
             message="node-a's writes on node-b")
    for table in POLICY_TABLES:  # "newer": node-b overwrites node-a's write
        upsert(b, table, "newer", "b")
    a.call("resume_replication", hostname="node-b", database="pol")
    wait_for(lambda: value(a, "t_lww", "newer") == "b", message="stream resumed")
    wait_for(lambda: running(a, "node-b", "pol"), message="caught up")

    assert (value(a, "t_lww", "older"), value(a, "t_lww", "newer")) == ("a", "b")
    assert (value(a, "t_src", "older"), value(a, "t_src", "newer")) == ("b", "b")
    assert (value(a, "t_dst", "older"), value(a, "t_dst", "newer")) == ("a", "a")
    assert (value(a, "t_man", "older"), value(a, "t_man", "newer")) == ("a", "a")

    found = a.call("list_conflicts", database="pol", table="t_man")["conflicts"]
    assert sorted(c["record_id"] for c in found) == ["newer", "older"]
    for conflict in found:
        assert conflict["local"]["record"]["v"] == "a"
        assert conflict["remote"]["record"]["v"] == "b"
        assert conflict["node"] == "node-b" and conflict["local"]["node"] == "node-a"
    assert a.call("list_conflicts", node="node-c")["conflicts"] == []
    assert len(a.call("list_conflicts", limit=1)["conflicts"]) == 1
    by_id = {c["record_id"]: c for c in found}
    a.call("resolve_conflict", id=by_id["older"]["id"], keep="remote")
    a.call("resolve_conflict", id=by_id["newer"]["id"], record={"v": "merged"})
    assert value(a, "t_man", "older") == "b"
    wait_for(lambda: value(b, "t_man", "newer") == "merged", message="resolution replicated")
    wait_for(lambda: value(b, "t_man", "older") == "b", message="resolution replicated")
    assert a.call("list_conflicts")["conflicts"] == []
    a.call("resolve_conflict", expect=404, id=by_id["older"]["id"], keep="local")

    # dest_wins refused node-b's newer write: a dead letter, kept until the cause goes.
    letters = a.call("list_dead_letters", table="t_dst")
    assert [d["record_id"] for d in letters["dead_letters"]] == ["newer"]
    assert "dest_wins" in letters["dead_letters"][0]["error"]
    assert letters["summary"]["by_peer"] == {"node-b": 1}
    assert letters["summary"]["by_table"] == {"pol.t_dst": 1}
    assert stream(a, "node-b", "pol")["dead_letters"] == 1
    again = a.call("reprocess_dead_letters", table="t_dst")
    assert (again["succeeded"], again["failed"]) == (0, 1)
    a.call("update_node", hostname="node-b",
           subscriptions=[sub("pol", "t_dst", "last_writer_wins")])
    done = a.call("reprocess_dead_letters", node="node-b", table="t_dst", error="dest_wins")
    assert (done["succeeded"], done["failed"]) == (1, 0)
    assert value(a, "t_dst", "newer") == "b"
    assert a.call("list_dead_letters", table="t_dst")["dead_letters"] == []

    metrics = httpx.get(a.url + "metrics", auth=ADMIN).text
    assert 'harpsync_replication_conflicts_total{database="pol",peer="node-b"} 2.0' in metrics
    assert 'harpsync_replication_dead_letters_total{database="pol",peer="node-b"} 1.0' \
        in metrics
    assert "harpsync_replication_conflicts_pending 0.0" in metrics


def test_rows_of_a_table_whose_schema_is_late_apply_after_a_fresh_hello(pair) -> None:
    """Rows of a table node-a has not learned yet (its schema travels over the paused
    ``system`` link) do not wedge the link and are not dead-lettered: the link
    reconnects, its fresh hello brings the table, and the rows apply."""
    a, b = pair
    b.call("create_database", database="dl")
    b.call("create_table", database="dl", table="fine", primary_key="id")
    b.call("insert", database="dl", table="fine", records=[{"id": 1}])
    wait_for(lambda: _has_db(a, "dl") and a.count("fine", "dl") == 1, timeout=20,
             message="dl.fine on node-a")
    a.call("pause_replication", hostname="node-b", database="system")
    try:
        b.call("create_table", database="dl", table="audit", primary_key="id")
        b.call("insert", database="dl", table="audit", records=[{"id": 1}, {"id": 2}])
        b.call("insert", database="dl", table="fine", records=[{"id": 2}])
        wait_for(lambda: a.count("fine", "dl") == 2 and "audit" in a.call(
            "describe_database", database="dl") and a.count("audit", "dl") == 2,
            timeout=20, message="the late table and its rows on node-a")
        assert a.call("list_dead_letters", database="dl")["summary"]["total"] == 0
    finally:
        a.call("resume_replication", hostname="node-b", database="system")


def test_table_names_starting_with_underscores_replicate(pair) -> None:
    """A user table named ``__x`` is an ordinary table: its schema reaches the peer
    (schema hellos once skipped every name starting with ``__``); only the hello's own
    keys are refused as names."""
    a, b = pair
    b.call("create_table", database="pol", table="__audit", primary_key="id")
    b.call("insert", database="pol", table="__audit", records=[{"id": 1}])
    a.call("pause_replication", hostname="node-b", database="system")
    a.call("resume_replication", hostname="node-b", database="system")
    wait_for(lambda: "__audit" in a.call("describe_database", database="pol"), timeout=20,
             message="__audit's schema on node-a")
    for name in ("__dropped__", "__created__", "__databases__"):
        res = b.post({"operation": "create_table", "database": "pol", "table": name,
                      "primary_key": "id"})
        assert res.status_code == 400 and "reserved" in res.json()["error"], res.text


def test_status_fields_pause_survives_restart_and_replay_from_a_time(pair) -> None:
    """Streaming status carries checkpoints and counters; a pause survives a restart;
    replay from a wall-clock time re-applies what node-b wrote after it."""
    a, b = pair
    before = datetime.now(UTC).isoformat()
    upsert(b, "t_src", "replayed", "b")
    wait_for(lambda: value(a, "t_src", "replayed") == "b", message="write replicated")
    wait_for(lambda: running(a, "node-b", "pol"), message="pol running")
    entry = stream(a, "node-b", "pol")
    assert entry["name"] == "node-b/pol" and entry["connected"]
    assert entry["last_event"]["version"] > 0 and entry["last_event"]["time"].endswith("Z")
    assert entry["last_checkpoint"]["sequence"] > 0 and entry["last_checkpoint"]["time"]
    assert entry["events_replicated"] > 0 and entry["bytes_replicated"] > 0
    assert entry["lag_seconds"] == 0 and entry["lag_events"] == 0
    assert entry["conflict"] == "last_writer_wins"
    assert entry["conflict_tables"]["t_src"] == "source_wins"
    assert {s["database"] for s in streams(a, node="node-b")} >= {"pol", "system", "dl"}

    upsert(a, "t_src", "replayed", "a")  # source_wins: a replay brings node-b's back

    a.call("pause_replication", hostname="node-b", database="pol")
    a.restart()
    assert stream(a, "node-b", "pol")["state"] == "paused"
    assert stream(a, "node-b", "system")["state"] != "paused"
    subs = a.call("cluster_status")["connections"][0]["subscriptions"]
    assert {s["table"]: s.get("conflict") for s in subs}["t_man"] == "manual_review"
    upsert(b, "t_lww", "while-paused", "b")
    a.call("resume_replication", hostname="node-b", database="pol")
    wait_for(lambda: value(a, "t_lww", "while-paused") == "b", message="resumed after restart")
    assert value(a, "t_src", "replayed") == "a"

    a.call("replay_replication", hostname="node-b", database="pol", **{"from": before})
    wait_for(lambda: value(a, "t_src", "replayed") == "b", message="replayed from the time")
    a.call("replay_replication", expect=400, hostname="node-b", **{"from": "yesterday"})
    # ``from_time`` is the older name of ``from``: milliseconds since 1970 work too.
    a.call("replay_replication", hostname="node-b", database="pol",
           from_time=int(datetime.now(UTC).timestamp() * 1000))


def test_bad_input_is_a_4xx_naming_the_problem(pair) -> None:
    """Unknown policies, peers and conflicts, and ambiguous resolutions are refused."""
    a, _b = pair
    bad = a.call("update_node", expect=400, hostname="node-b",
                 subscriptions=[sub("pol", "t_lww", "newest_wins")])
    assert "conflict" in bad["error"]
    assert "node-z" in a.call("get_replication_status", expect=400, node="node-z")["error"]
    assert "nope" in a.call("get_replication_status", expect=400, database="nope")["error"]
    both = a.call("resolve_conflict", expect=400, id="x", keep="local", record={"v": 1})
    assert both["error"] == "give only one of 'keep' or 'record'", both
    neither = a.call("resolve_conflict", expect=400, id="x")
    assert neither["error"] == "'keep' or 'record' is required", neither
    a.call("resolve_conflict", expect=400, id="x", keep="mine")
    a.call("resolve_conflict", expect=404, id="x", keep="local")
    assert "ids" in a.call("delete_dead_letters", expect=400)["error"]
    assert a.call("delete_dead_letters", all=True)["deleted"] == 0
    a.call("list_dead_letters", expect=400, limit=0)
    response = a.post({"operation": "list_conflicts"}, auth=("nobody", "x"))
    assert response.status_code == 401


def test_policy_lookup_order_and_the_system_database(pair) -> None:
    """A table's policy beats the peer's, which beats the node default; the system
    database (users, roles) is always last-writer-wins."""
    a, _b = pair
    a.call("update_node", hostname="node-b", conflict="source_wins")
    rep = a.node.cluster
    lookup = rep.policy_lookup("pol")
    assert lookup("node-b", "t_man") == "manual_review"
    assert lookup("node-b", "untracked") == "source_wins"
    assert lookup("node-x", "t_man") == "last_writer_wins"
    assert rep.policy_lookup("system") is None
    assert stream(a, "node-b", "pol")["conflict"] == "source_wins"
    a.call("update_node", hostname="node-b", conflict="last_writer_wins")
    assert stream(a, "node-b", "pol")["conflict"] == "last_writer_wins"


@pytest.mark.timeout(120)
def test_a_replay_asked_while_the_peer_is_down_survives_a_restart(node_factory) -> None:
    """replay_replication while node-b is unreachable, then node-a restarts before the
    link is back: the replay still happens once it is (under source_wins it brings
    node-b's value back over node-a's local write). Before, the replay lived only in
    memory: after the restart the link subscribed with its floors and skipped it."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    b.call("create_table", table="t", primary_key="id")
    a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
           authorization={"username": ADMIN[0], "password": ADMIN[1]},
           subscriptions=[sub("data", "t", "source_wins")])
    upsert(b, "t", "r", "b", database="data")
    wait_for(lambda: value(a, "t", "r", database="data") == "b", timeout=20,
             message="node-b's write on node-a")
    upsert(a, "t", "r", "a", database="data")
    b.stop()
    wait_for(lambda: not stream(a, "node-b", "data")["connected"], timeout=20,
             message="the link down")
    a.call("replay_replication", hostname="node-b", database="data", from_seq=0)
    a.restart()
    b.start()
    wait_for(lambda: value(a, "t", "r", database="data") == "b", timeout=20,
             message="the replay to bring node-b's value back")


def _race_a_pause(node_factory: Any, other: Any) -> tuple[Any, Any]:
    """node-a streaming from node-b; then, on a's loop, ``pause_replication`` of that
    link with ``other(cluster)`` awaited while the pause is stopping the link."""
    import asyncio

    a = node_factory("node-a")
    b = node_factory("node-b")
    b.call("create_table", table="t", primary_key="id")
    a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
           authorization={"username": ADMIN[0], "password": ADMIN[1]})
    wait_for(lambda: running(a, "node-b", "data"), timeout=20, message="streaming")
    cluster = a.node.cluster

    async def race() -> None:
        pausing = asyncio.ensure_future(cluster.pause("node-b", "data"))
        await asyncio.sleep(0)  # the pause is stopping the link
        await other(cluster)
        await pausing

    asyncio.run_coroutine_threadsafe(race(), a.loop).result(20)
    return a, b


@pytest.mark.timeout(120)
def test_a_resume_racing_a_pause_is_what_a_restart_keeps(node_factory) -> None:
    """pause_replication and resume_replication for one link at once, the resume
    reaching the link while the pause still stops it: the link runs, and the row does
    not say paused either, so a restart keeps it running (before, the pause saved
    'paused' after the resume had cleared it)."""
    a, b = _race_a_pause(node_factory, lambda cluster: cluster.resume("node-b", "data"))
    cluster = a.node.cluster
    assert "data" not in (cluster.rows["node-b"].get("paused") or [])
    a.restart()
    assert stream(a, "node-b", "data")["state"] != "paused"


@pytest.mark.timeout(120)
def test_a_pause_racing_a_link_restart_pauses_the_new_link(node_factory) -> None:
    """pause_replication while a subscription change (here: a reconcile restarting the
    peer's links) replaces the link: the link that runs afterwards is the paused one.
    Before, the pause stopped the old link and the new one streamed on, paused only
    in the row."""
    a, b = _race_a_pause(node_factory,
                         lambda cluster: cluster.reconcile(restart_peer="node-b"))
    assert stream(a, "node-b", "data")["state"] == "paused"
    upsert(b, "t", "r", "while paused", database="data")
    from tests.repl_util import stays
    stays(lambda: value(a, "t", "r", database="data") is None, duration=1.0)
