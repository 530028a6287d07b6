"""Randomized convergence under each conflict policy: three in-process nodes in a full
mesh write conflicting inserts, upserts, partial updates and deletes to the same few ids
at once; once the links are idle every node must hold the same rows *and* tombstones
(version, origin and record, read straight from LMDB).

- ``last_writer_wins``: equal as soon as the links are idle.
- ``dest_wins``: equal once every node reprocesses its dead letters (the refused
  changes) under last-writer-wins.
- ``manual_review``: equal once operators resolve the conflicts, one node at a time.
- ``source_wins`` is left out: it keeps nodes different by design (README).

Default: one seed (a few seconds). More: ``--conflict-seeds=N`` (seeds 1..N, marked
slow, or HARPSYNC_CONFLICT_SEEDS=N); one: ``--conflict-seed=S``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import ADMIN, InProcessNode, wait_for
from tests.lifecycle_util import int_option
from tests.repl_util import join

FIXED = 7
DB = "conv"
IDS = 6
OPS_PER_WRITER = 40


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conflict_seed" not in metafunc.fixturenames:
        return
    one = int_option(metafunc.config, "--conflict-seed", "HARPSYNC_CONFLICT_SEED")
    many = int_option(metafunc.config, "--conflict-seeds", "HARPSYNC_CONFLICT_SEEDS") or 0
    seeds = [one] if one is not None else [FIXED, *range(1, many + 1)]
    metafunc.parametrize("conflict_seed", [
        pytest.param(s, id=f"seed{s}", marks=() if s == FIXED or one is not None
                     else (pytest.mark.slow,)) for s in seeds])


Snapshot = dict[Any, tuple[int, str, Any]]


def snapshot(node: Any, table: str) -> Snapshot:
    """Every row and tombstone of ``table`` as ``key -> (version, origin name, record)``,
    read from the node's LMDB environment (tombstones have no API)."""
    from harpsync import codec
    from harpsync.storage.keys import decode_id

    db = node.node.storage.databases[DB]
    tbl = db.tables[table]
    out: Snapshot = {}
    with db.env.begin() as txn:
        for dbi in (tbl.dbi, tbl.tomb_dbi):
            for key, raw in txn.cursor(db=dbi):
                version, origin, record = codec.unpack(raw)
                out[decode_id(bytes(key))] = (version, db.origin_names.get(origin, "?"),
                                              record)
    return out


def diverged(nodes: list[Any], table: str) -> list[str]:
    snaps = [snapshot(n, table) for n in nodes]
    problems = []
    for key in sorted(set().union(*snaps), key=repr):
        seen = [s.get(key) for s in snaps]
        if any(v != seen[0] for v in seen[1:]):
            problems.append(f"{table}[{key!r}]: " + "; ".join(
                f"{n.name}={v}" for n, v in zip(nodes, seen, strict=True)))
    return problems


def idle(nodes: list[Any]) -> bool:
    """Every node's stream from every peer is running with nothing left to apply."""
    for node in nodes:
        entries = node.call("get_replication_status", database=DB)["streams"]
        if len(entries) != len(nodes) - 1 or any(
                e["state"] != "running" or e["lag_events"] != 0 for e in entries):
            return False
    return True


def settle(nodes: list[Any], table: str, done: Callable[[], bool] = lambda: True) -> None:
    """Wait until the links are idle and ``done`` holds, twice in a row with the same
    rows everywhere (a write still travelling shows as a change)."""
    last: list[Any] = [None]

    def still() -> bool:
        if not idle(nodes) or not done():
            last[0] = None
            return False
        now = [snapshot(n, table) for n in nodes]
        same, last[0] = now == last[0], now
        return same

    wait_for(still, timeout=30, interval=0.1, message=f"{table}: links idle")


def set_policy(nodes: list[Any], policy: str) -> None:
    for node in nodes:
        for peer in nodes:
            if peer is not node:
                node.call("update_node", hostname=peer.name, conflict=policy)


def write_at_once(nodes: list[Any], table: str, seed: int) -> None:
    """One thread per node, each writing random conflicting changes to the same ids."""
    errors: list[str] = []

    def writer(node: Any, rng: random.Random) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(OPS_PER_WRITER):
                rid = rng.randrange(IDS)
                kind = rng.choice(("upsert", "upsert", "update", "update", "insert",
                                   "delete"))
                attrs = rng.sample(("a", "b", "c"), rng.randint(1, 3))
                record = {"id": rid, **{a: f"{node.name}-{rng.randrange(1000)}"
                                        for a in attrs}}
                body: dict[str, Any] = {"operation": kind, "database": DB, "table": table}
                if kind == "delete":
                    body["ids"] = [rid]
                else:
                    body["records"] = [record]
                response = client.post(node.url, json=body, auth=ADMIN)
                if response.status_code != 200:
                    errors.append(f"{node.name} {kind}: {response.status_code} "
                                  f"{response.text}")

    threads = [threading.Thread(target=writer, args=(n, random.Random(seed * 31 + i)))
               for i, n in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def make_table(nodes: list[Any], table: str) -> None:
    nodes[0].call("create_table", database=DB, table=table, primary_key="id")
    for node in nodes:
        wait_for(lambda n=node: table in n.node.storage.databases[DB].tables, timeout=20,
                 message=f"{table} on {node.name}")


def all_conflicts(nodes: list[Any], table: str) -> int:
    return sum(len(n.call("list_conflicts", database=DB, table=table)["conflicts"])
               for n in nodes)


@pytest.mark.timeout(180)
def test_conflicting_writes_converge_under_each_policy(cluster: Callable[[int], list[Any]],
                                                       conflict_seed: int) -> None:
    """Under last-writer-wins, dest_wins (after reprocessing) and manual_review (after
    resolving), concurrent conflicting writes from three nodes (two with skewed clocks) leave every
    node with the same rows and tombstones."""
    nodes = cluster(3)
    # Skewed clocks (within replication.maxClockSkew): node-b runs behind, node-c ahead.
    for node, offset_ms in zip(nodes[1:], (-1500, 2500), strict=True):
        node.node.storage.hlc.offset_ms = offset_ms
    nodes[0].call("create_database", database=DB)
    wait_for(lambda: all(DB in n.node.storage.databases for n in nodes), timeout=20,
             message="database everywhere")
    rng = random.Random(conflict_seed)

    # last_writer_wins
    make_table(nodes, "t_lww")
    wait_for(lambda: idle(nodes), timeout=20, message="streams running")
    write_at_once(nodes, "t_lww", rng.randrange(1 << 30))
    settle(nodes, "t_lww")
    assert diverged(nodes, "t_lww") == []

    # dest_wins: the refused changes are dead letters; reprocessed under LWW they land.
    set_policy(nodes, "dest_wins")
    make_table(nodes, "t_dst")
    write_at_once(nodes, "t_dst", rng.randrange(1 << 30))
    settle(nodes, "t_dst")
    set_policy(nodes, "last_writer_wins")
    for node in nodes:
        result = node.call("reprocess_dead_letters", database=DB, table="t_dst")
        assert result["failed"] == 0, result
    settle(nodes, "t_dst")
    assert diverged(nodes, "t_dst") == []

    # manual_review: operators resolve what each node lists, one node at a time.
    set_policy(nodes, "manual_review")
    make_table(nodes, "t_man")
    write_at_once(nodes, "t_man", rng.randrange(1 << 30))
    settle(nodes, "t_man")
    resolved = 0
    for _round in range(4):
        if all_conflicts(nodes, "t_man") == 0:
            break
        for node in nodes:
            for conflict in node.call("list_conflicts", database=DB,
                                      table="t_man")["conflicts"]:
                node.call("resolve_conflict", id=conflict["id"],
                          keep=rng.choice(("local", "remote")))
                resolved += 1
            # Before resolutions converged, each one raised new conflicts on the other
            # nodes: thousands after a few rounds.
            assert resolved < 3 * OPS_PER_WRITER * len(nodes), "conflicts keep multiplying"
            settle(nodes, "t_man")
    assert all_conflicts(nodes, "t_man") == 0
    assert diverged(nodes, "t_man") == []


def conflicts_of(node: Any, table: str) -> list[dict[str, Any]]:
    return list(node.call("list_conflicts", database=DB, table=table)["conflicts"])


@pytest.fixture(scope="module")
def reviewing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """Two nodes that review each other's changes (manual_review both ways), sharing
    database ``conv``, streams running."""
    root = tmp_path_factory.mktemp("review")
    env = {"REPLICATION_CONFLICT": "manual_review"}
    a = InProcessNode("node-a", root / "a", env).start()
    b = InProcessNode("node-b", root / "b", env).start()
    try:
        b.call("create_database", database=DB)
        join(a, b)
        wait_for(lambda: DB in a.node.storage.databases, timeout=20, message="database")
        wait_for(lambda: idle([a, b]), timeout=20, message="streams running")
        yield a, b
    finally:
        b.close()
        a.close()


def make_reviewed_table(a: Any, b: Any, table: str) -> None:
    b.call("create_table", database=DB, table=table, primary_key="id")
    wait_for(lambda: table in a.node.storage.databases[DB].tables, message=table)


def write_conflict(a: Any, b: Any, table: str, rid: Any) -> None:
    """Both nodes write ``rid`` while their streams are paused: a conflict on each."""
    a.call("pause_replication", hostname="node-b", database=DB)
    b.call("pause_replication", hostname="node-a", database=DB)
    a.call("upsert", database=DB, table=table, records=[{"id": rid, "v": "a"}])
    b.call("upsert", database=DB, table=table, records=[{"id": rid, "v": "b"}])
    a.call("resume_replication", hostname="node-b", database=DB)
    b.call("resume_replication", hostname="node-a", database=DB)
    wait_for(lambda: len(conflicts_of(a, table)) == 1 and len(conflicts_of(b, table)) == 1,
             message="a conflict on each node")


def test_a_resolution_on_one_node_settles_the_conflict_on_both(
        reviewing: tuple[Any, Any]) -> None:
    """Two nodes review each other's changes (manual_review both ways); a concurrent
    pair of writes is a conflict on each. Resolving it on one node writes the choice on
    both and clears both conflicts, instead of raising a new one on the other node."""
    a, b = reviewing
    make_reviewed_table(a, b, "t")
    write_conflict(a, b, "t", 1)
    assert snapshot(a, "t")[1][2]["v"] == "a" and snapshot(b, "t")[1][2]["v"] == "b"

    a.call("resolve_conflict", id=conflicts_of(a, "t")[0]["id"], keep="remote")
    wait_for(lambda: not conflicts_of(b, "t") and snapshot(b, "t")[1][2]["v"] == "b"
             and snapshot(a, "t") == snapshot(b, "t"), timeout=5,
             message="the resolution landed on node-b and settled its conflict")
    assert conflicts_of(a, "t") == [] and conflicts_of(b, "t") == []
    assert snapshot(b, "t")[1][1] == "node-a"  # the resolution's version, not b's own


def test_a_conflict_of_a_dropped_table_is_discarded_not_written(
        reviewing: tuple[Any, Any]) -> None:
    """A conflict recorded before its table was dropped and re-created is discarded when
    resolved: its record does not come back in the new table (on either node), and a
    conflict whose table is gone can still be cleared (it stayed listed for good)."""
    a, b = reviewing
    make_reviewed_table(a, b, "d")
    write_conflict(a, b, "d", 1)
    stale = conflicts_of(a, "d")[0]
    b.call("drop_table", database=DB, table="d")
    wait_for(lambda: "d" not in a.node.storage.databases[DB].tables, message="dropped")
    make_reviewed_table(a, b, "d")
    answer = a.call("resolve_conflict", id=stale["id"], keep="remote")
    assert answer["record"] is None and "dropped" in answer["message"], answer
    assert snapshot(a, "d") == {}
    assert a.call("search_by_id", database=DB, table="d", ids=[1]) == []
    a.call("resolve_conflict", expect=404, id=stale["id"], keep="remote")

    # The table is gone for good: the conflict is cleared, not refused with a 400.
    other = conflicts_of(b, "d")[0]
    b.call("drop_table", database=DB, table="d")
    answer = b.call("resolve_conflict", id=other["id"], keep="local")
    assert "dropped" in answer["message"], answer
    assert conflicts_of(b, "d") == []


def test_deletes_of_a_record_deleted_on_both_nodes_are_no_conflict(
        reviewing: tuple[Any, Any]) -> None:
    """Both nodes delete the same record while their streams are paused: nothing is
    kept or lost, so neither node lists a conflict (or a dest_wins dead letter), and
    both keep the same tombstone."""
    a, b = reviewing
    make_reviewed_table(a, b, "x")
    a.call("insert", database=DB, table="x", records=[{"id": 1, "v": "a"}])
    wait_for(lambda: 1 in snapshot(b, "x"), message="the record on node-b")
    a.call("pause_replication", hostname="node-b", database=DB)
    b.call("pause_replication", hostname="node-a", database=DB)
    a.call("delete", database=DB, table="x", ids=[1])
    b.call("delete", database=DB, table="x", ids=[1])
    a.call("resume_replication", hostname="node-b", database=DB)
    b.call("resume_replication", hostname="node-a", database=DB)
    wait_for(lambda: idle([a, b]) and snapshot(a, "x") == snapshot(b, "x"), timeout=5,
             message="the same tombstone on both nodes")
    assert snapshot(a, "x")[1][2] is None
    assert conflicts_of(a, "x") == [] and conflicts_of(b, "x") == []


def test_a_resolution_with_a_value_that_cannot_be_stored_is_a_400(
        reviewing: tuple[Any, Any]) -> None:
    """resolve_conflict with a record holding a value storage refuses (an integer past
    64 bits) answers 400 naming it, writes nothing and leaves the conflict pending."""
    a, b = reviewing
    make_reviewed_table(a, b, "o")
    write_conflict(a, b, "o", 1)
    pending = conflicts_of(a, "o")
    answer = a.call("resolve_conflict", expect=400, id=pending[0]["id"],
                    record={"v": 2 ** 70})
    assert "cannot be stored" in answer["error"], answer
    answer = a.call("resolve_conflict", expect=400, id=pending[0]["id"],
                    record={"bad name!": 1})
    assert "'record'" in answer["error"] and "bad name!" in answer["error"], answer
    assert conflicts_of(a, "o") == pending
    assert snapshot(a, "o")[1][2]["v"] == "a"


def test_a_write_over_a_peer_version_past_the_skew_bound_keeps_later_writes_after_it(
        node_factory: Callable[..., Any]) -> None:
    """node-a restarts with its clock 5 minutes behind and updates a record node-b wrote
    last: the update ranks after node-b's version, beyond the skew bound. Its next write
    must rank after that update, or node-b, which holds the update, filters the next
    write out as already held when it subscribes again (lost for good)."""
    from harpsync.storage.hlc import OFFSET_ENV

    a, b = node_factory("node-a"), node_factory("node-b")
    b.call("create_database", database=DB)
    b.call("create_table", database=DB, table="t", primary_key="id")
    join(a, b)
    wait_for(lambda: DB in a.node.storage.databases
             and "t" in a.node.storage.databases[DB].tables, timeout=20, message="table")
    b.call("insert", database=DB, table="t", records=[{"id": 1, "v": "b"}])
    wait_for(lambda: 1 in snapshot(a, "t"), timeout=20, message="node-b's record on a")
    a.stop()
    a.extra_env[OFFSET_ENV] = "-300000"
    a.start()
    a.call("update", database=DB, table="t", records=[{"id": 1, "v": "a"}])
    wait_for(lambda: snapshot(b, "t").get(1, (0, "", {}))[2].get("v") == "a", timeout=20,
             message="node-a's update on node-b")
    b.stop()
    a.call("insert", database=DB, table="t", records=[{"id": 2, "v": "later"}])
    assert snapshot(a, "t")[2][0] > snapshot(a, "t")[1][0]  # in the order they were made
    b.start()
    wait_for(lambda: 2 in snapshot(b, "t"), timeout=20, message="the later write on b")


def test_a_replay_raises_no_conflict_for_changes_already_reviewed(
        reviewing: tuple[Any, Any]) -> None:
    """A conflict resolved, then node-a replays node-b's log from the start: node-b's
    old write, reviewed when it first arrived, is no new conflict (a replay applies
    idempotently), and a new write of node-b still is one."""
    a, b = reviewing
    make_reviewed_table(a, b, "p")
    write_conflict(a, b, "p", 1)
    a.call("resolve_conflict", id=conflicts_of(a, "p")[0]["id"], keep="local")
    wait_for(lambda: not conflicts_of(b, "p") and idle([a, b])
             and snapshot(a, "p") == snapshot(b, "p"), timeout=5, message="resolved")
    resolved = snapshot(a, "p")
    a.call("replay_replication", hostname="node-b", database=DB, from_seq=0)
    b.call("upsert", database=DB, table="p", records=[{"id": 99, "v": "marker"}])
    wait_for(lambda: 99 in snapshot(a, "p") and idle([a, b]), timeout=10,
             message="the replay read to its end")
    assert conflicts_of(a, "p") == []
    assert {k: v for k, v in snapshot(a, "p").items() if k != 99} == resolved
    # A change node-a has not seen is still reviewed.
    write_conflict(a, b, "p", 1)


def test_concurrent_resolutions_of_one_conflict_write_once(
        reviewing: tuple[Any, Any]) -> None:
    """Several operators resolve one conflict at once: one resolution is written, the
    others are told it is gone (404), instead of each writing its own version."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = reviewing
    make_reviewed_table(a, b, "q")
    write_conflict(a, b, "q", 1)
    conflict_id = conflicts_of(a, "q")[0]["id"]

    def resolve(keep: str) -> int:
        with httpx.Client(timeout=30) as client:
            return client.post(a.url, auth=ADMIN, json={
                "operation": "resolve_conflict", "id": conflict_id, "keep": keep}).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(resolve, ["local", "remote"] * 3))
    assert sorted(codes) == [200] + [404] * 5, codes


def test_a_resolution_record_keeps_the_creation_time(reviewing: tuple[Any, Any]) -> None:
    """A record given to resolve_conflict replaces the stored one but keeps its
    ``__createdtime__`` (every record has one; it was lost), on both nodes."""
    a, b = reviewing
    make_reviewed_table(a, b, "c")
    a.call("insert", database=DB, table="c", records=[{"id": 1, "v": "first"}])
    wait_for(lambda: 1 in snapshot(b, "c"), message="the record on node-b")
    created = snapshot(a, "c")[1][2]["__createdtime__"]
    write_conflict(a, b, "c", 1)
    a.call("resolve_conflict", id=conflicts_of(a, "c")[0]["id"], record={"v": "mine"})
    wait_for(lambda: snapshot(b, "c")[1][2]["v"] == "mine", message="resolution on b")
    for node in (a, b):
        record = snapshot(node, "c")[1][2]
        assert record["__createdtime__"] == created
        assert record["__updatedtime__"] > created
