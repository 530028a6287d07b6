"""Drops, re-creates and schema learned from peers (issue 7 items 2, 3, 4, 5, 9, the
concurrency 500s, and the schema half of item 10), with real nodes."""

from __future__ import annotations

import asyncio
import shutil
import threading
from typing import Any

import httpx

from harpsync import codec
from harpsync.storage import deadletters
from tests.helpers import ADMIN, wait_for
from tests.repl_util import by_id, has_table, join, stays, wait_linked


def _has_db(node: Any, database: str) -> bool:
    return node.post({"operation": "describe_database",
                      "database": database}).status_code == 200


def _on_loop(node: Any, coro: Any, timeout: float = 30) -> Any:
    """Run a coroutine on an in-process node's event loop and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, node.loop).result(timeout)


def _pair(node_factory: Any) -> tuple[Any, Any]:
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system",))
    return a, b


def _mesh_of_three(node_factory: Any, database: str, table: str) -> tuple[Any, Any, Any]:
    """Nodes a, b, c, fully linked for ``system`` and ``database``, which holds
    ``table`` (created on a before the joins)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    c = node_factory("node-c")
    a.call("create_table", database=database, table=table, primary_key="id")
    join(a, b)
    join(a, c)
    wait_linked([(a, b), (b, a), (a, c), (c, a), (b, c), (c, b)], ("system", database))
    return a, b, c


def test_local_database_is_never_dropped_or_created_by_a_peer(node_factory):
    """With ``replication.databases: data`` a peer's drop of a same-named database leaves
    this node's private copy alone, and a peer's other databases are not created here."""
    a = node_factory("node-a", env={"REPLICATION_DATABASES": "data"})
    b = node_factory("node-b")
    a.call("create_table", database="priv", table="t", primary_key="id")
    a.call("insert", database="priv", table="t", records=[{"id": 1, "secret": "a-only"}])
    b.call("create_table", database="priv", table="t", primary_key="id")
    b.call("create_table", database="other", table="t", primary_key="id")
    b.call("create_table", table="mark", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.call("drop_database", database="priv")
    b.call("create_database", database="later")
    b.call("insert", table="mark", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "mark", 1) is not None, timeout=20,
             message="B's later data write on A")
    row = by_id(a, "t", 1, database="priv")
    assert row is not None and row["secret"] == "a-only", "B's drop destroyed A's private data"
    assert not _has_db(a, "other") and not _has_db(a, "later")
    assert not _has_db(b, "priv"), "A's local database was announced to B"


def test_dropped_database_and_table_do_not_come_back_from_a_lagging_hello(node_factory):
    """A peer that has not yet seen a drop re-lists the database and table in its hello;
    they stay dropped here, and the peer drops them when it catches up."""
    a, b = _pair(node_factory)
    a.call("create_table", database="gone", table="t", primary_key="id")
    a.call("insert", database="gone", table="t", records=[{"id": 1}])
    a.call("create_table", table="t2", primary_key="id")
    a.call("insert", table="t2", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1, database="gone") and by_id(b, "t2", 1), timeout=20,
             message="gone.t and data.t2 on B")
    b.call("pause_replication", hostname="node-a")  # B lags: it will not see the drops
    a.call("drop_database", database="gone")
    a.call("drop_table", table="t2")
    # A's links from B reconnect: B's new hellos still list gone and data.t2.
    a.call("pause_replication", hostname="node-b")
    a.call("resume_replication", hostname="node-b")
    wait_linked([(a, b)], ("system", "data"))
    assert not _has_db(a, "gone") and not has_table(a, "t2"), "the lagging hello re-created them"
    b.call("resume_replication", hostname="node-a")
    wait_for(lambda: not _has_db(b, "gone") and not has_table(b, "t2"), timeout=20,
             message="B to apply the drops")
    stays(lambda: not any([_has_db(a, "gone"), has_table(a, "t2"), _has_db(b, "gone"),
                           has_table(b, "t2")]), duration=1.5)


def test_lagging_hello_adds_nothing_to_a_recreated_database(node_factory):
    """A peer still holding a dropped database's old incarnation lists it, with its old
    tables, in its hello: none of those tables appear in the re-created database here."""
    a, b = _pair(node_factory)
    a.call("create_table", database="gone", table="old", primary_key="id")
    a.call("insert", database="gone", table="old", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "old", 1, database="gone"), timeout=20, message="gone.old on B")
    b.call("pause_replication", hostname="node-a")
    a.call("drop_database", database="gone")
    a.call("create_table", database="gone", table="fresh", primary_key="id")
    a.call("pause_replication", hostname="node-b")
    a.call("resume_replication", hostname="node-b")
    wait_linked([(a, b)], ("system",))
    assert sorted(a.call("describe_database", database="gone")) == ["fresh"]
    b.call("resume_replication", hostname="node-a")
    wait_for(lambda: _has_db(b, "gone") and sorted(
        b.call("describe_database", database="gone")) == ["fresh"], timeout=20,
        message="B on the new incarnation of gone")
    stays(lambda: sorted(a.call("describe_database", database="gone")) == ["fresh"],
          duration=1.0)


def test_drop_and_recreate_of_a_database_in_one_applied_batch(node_factory):
    """One batch holding drop_database X and create_database X leaves X existing as the
    new incarnation (the re-create is applied after the drop's files are gone)."""
    from harpsync.replication.applier import Work

    a, b = _pair(node_factory)
    a.call("create_table", database="x", table="t", primary_key="id")
    a.call("insert", database="x", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1, database="x"), timeout=20, message="x.t on B")
    b.call("pause_replication", hostname="node-a")
    a.call("drop_database", database="x")
    a.call("create_table", database="x", table="t", primary_key="id")
    a.call("insert", database="x", table="t", records=[{"id": 2}])

    # Deliver A's system log after B's cursor as ONE batch, as the apply loop would.
    a_system = a.node.storage.databases["system"]
    b_system = b.node.storage.databases["system"]
    after = int(b_system.cursor("node-a").get("seq", 0))
    entries = a_system.log_after(after, 1000)
    kinds = [op[1] for _seq, raw in entries for op in codec.unpack(raw)[3]]
    assert kinds.index("drop_database") < kinds.index("create_database"), kinds
    sub = b.node.cluster.subscribers[("node-a", "system")]
    _on_loop(b, sub.applier.apply_entries([Work("entries", entries, dict(a_system.origin_names))]))
    assert _has_db(b, "x"), "the re-create in the same batch was lost"
    assert b.node.storage.databases["x"].created == a.node.storage.databases["x"].created
    b.call("resume_replication", hostname="node-a")
    wait_for(lambda: by_id(b, "t", 2, database="x"), timeout=20, message="new x.t row on B")
    assert by_id(b, "t", 1, database="x") is None


def test_stale_write_does_not_land_in_a_recreated_table(node_factory):
    """A write to the old table, relayed late by a third node, is discarded by the table
    re-created under the same name."""
    a, b, c = _mesh_of_three(node_factory, "data", "t")
    b.call("pause_replication", hostname="node-c", database="data")
    a.call("insert", table="t", records=[{"id": 1, "v": "old"}])
    wait_for(lambda: by_id(c, "t", 1), timeout=20, message="the old write on C")
    a.call("drop_table", table="t")
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t", 2) and by_id(c, "t", 2), timeout=20,
             message="the new table's row on B and C")
    b.call("pause_replication", hostname="node-a", database="data")
    b.call("resume_replication", hostname="node-c", database="data")
    c.call("insert", table="t", records=[{"id": 3}])
    wait_for(lambda: by_id(b, "t", 3), timeout=20, message="C's write after the stale one")
    assert by_id(b, "t", 1) is None, "a write to the dropped table landed in the new one"
    assert b.count("t") == 2


def test_rows_of_a_recreated_table_never_land_in_the_dropped_incarnation(node_factory):
    """C drops and re-creates table t while B's link from C is paused; A learns the new
    incarnation from C and writes a row to it, which reaches B before C's drop does.
    B must not put the row into its old incarnation (C's late drop would then delete it
    there for good): it learns the drop and the new table from A's hello first, so every
    node ends with exactly the new incarnation's rows."""
    a, b, c = _mesh_of_three(node_factory, "data", "t")
    a.call("insert", table="t", records=[{"id": 100, "v": "old"}])
    wait_for(lambda: by_id(b, "t", 100) and by_id(c, "t", 100), timeout=20,
             message="the old incarnation's row everywhere")
    b.call("pause_replication", hostname="node-c", database="data")
    c.call("drop_table", table="t")
    c.call("create_table", table="t", primary_key="id")
    c.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t", 1) and by_id(a, "t", 100) is None, timeout=20,
             message="C's new incarnation on A")
    a.call("insert", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(b, "t", 2), timeout=20, message="A's row on B")
    b.call("resume_replication", hostname="node-c", database="data")
    for n in (a, b, c):
        wait_for(lambda n=n: by_id(n, "t", 1) and by_id(n, "t", 2), timeout=20,
                 message=f"both rows of the new incarnation on {n.name}")
        assert by_id(n, "t", 100) is None, f"the dropped incarnation's row on {n.name}"
        assert n.count("t") == 2, n.name


def test_reprocessed_create_database_drops_the_incarnation_it_follows(node_factory):
    """A dead-lettered create_database whose creator had seen a drop of the incarnation
    still live here is reprocessed in two steps: the drop (its files go after that
    commit), then the create. Before, the one job refused it (the new environment was
    never prepared, and the drop in the same job could not free the name)."""
    a = node_factory("node-a")
    a.call("create_table", database="x", table="old", primary_key="id")
    storage = a.node.storage
    old = storage.databases["x"].created
    dropped, created = storage.hlc.now(), storage.hlc.now()
    letter = deadletters.dead_letter(
        "node-b", "system", "node-b", created, None,
        [[None, "create_database", "x", {"after_drop": dropped}]], "test: held back")
    _on_loop(a, storage.write(deadletters.record_job(
        storage, "system", "node-b", [letter], storage.databases["system"].cursor("node-b"))))
    done = a.call("reprocess_dead_letters", node="node-b")
    assert (done["succeeded"], done["failed"]) == (1, 0), done
    db = storage.databases["x"]
    assert db.created == created and db.created != old
    assert not has_table(a, "old", "x")
    assert a.call("list_dead_letters")["dead_letters"] == []
    # The drop is remembered: the old incarnation's late writes are stale here.
    assert storage.database_markers()["x"] == dropped


def test_drop_database_survives_a_crash_before_its_files_go(node_factory, tmp_path):
    """A database whose drop committed but whose directory survived (a crash between the
    two) stays dropped after restart, and its directory is removed."""
    a = node_factory("node-a")
    a.call("create_table", database="x", table="t", primary_key="id")
    a.call("insert", database="x", table="t", records=[{"id": 1}])
    a.stop()
    path = a.root / "database" / "x"
    shutil.copytree(path, tmp_path / "x-copy")
    a.start()
    a.call("drop_database", database="x")
    a.stop()
    shutil.copytree(tmp_path / "x-copy", path)  # the files the crash left behind
    a.start()
    assert not _has_db(a, "x")
    assert "x" not in a.call("describe_all")
    assert not path.exists()
    a.call("create_table", database="x", table="t", primary_key="id")  # and it can come back
    assert a.count("t", database="x") == 0


def _race(node: Any, calls: list[dict[str, Any]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(calls))
    out: list[httpx.Response] = [None] * len(calls)  # type: ignore[list-item]

    def run(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            out[i] = client.post(node.url, json=calls[i], auth=ADMIN)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_create_database_never_answers_500(node):
    """Eight concurrent create_database calls of one name: one 200, the rest 400."""
    for round_ in range(3):
        name = f"db{round_}"
        res = _race(node, [{"operation": "create_database", "database": name}] * 8)
        codes = sorted(r.status_code for r in res)
        assert codes == [200] + [400] * 7, [(r.status_code, r.text[:100]) for r in res]
        assert _has_db(node, name)


def test_describe_racing_drops_never_answers_500(node):
    """describe_database / describe_all racing drop_table and drop_database give 200/404."""
    stop = threading.Event()
    codes: list[tuple[str, int, str]] = []

    def describe() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                for body in ({"operation": "describe_database", "database": "r"},
                             {"operation": "describe_all"}):
                    res = client.post(node.url, json=body, auth=ADMIN)
                    codes.append((body["operation"], res.status_code, res.text[:200]))

    threads = [threading.Thread(target=describe) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            for j in range(4):
                node.call("create_table", database="r", table=f"t{j}", primary_key="id")
            for j in range(4):
                node.call("drop_table", database="r", table=f"t{j}")
            if i % 3 == 2:
                node.call("drop_database", database="r")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert codes and all(code in (200, 404) for _op, code, _ in codes), \
        [c for c in codes if c[1] not in (200, 404)][:3]
    assert all(code == 200 for op, code, _ in codes if op == "describe_all")


def test_publish_only_node_learns_the_tables_it_publishes_from(node_factory):
    """Schema is not data: a node that only publishes table t to its peer gets t's
    definition through the system hello, so it can write rows that reach the peer."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1, "from": "a"}])
    join(b, a, subscriptions=[{"database": "data", "table": "t", "subscribe": False,
                               "publish": True}])
    wait_for(lambda: has_table(b, "t"), timeout=20, message="table t on the publish-only B")
    b.call("insert", table="t", records=[{"id": 5, "from": "b"}])
    wait_for(lambda: by_id(a, "t", 5), timeout=20, message="B's row on A")
    assert by_id(b, "t", 1) is None  # schema only: B does not subscribe to A's rows


def test_copied_rows_of_a_dropped_table_incarnation_never_land(node_factory):
    """Full-copy rows from a peer that still has the table's dropped incarnation are
    refused (the link retries), and the peer converges to the new incarnation."""
    from harpsync.replication.applier import Work

    a, b = _pair(node_factory)
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 1, "v": "old"}])
    wait_for(lambda: by_id(b, "t", 1), timeout=20, message="the old row on B")
    wait_linked([(a, b)], ("system", "data"))
    b.call("pause_replication", hostname="node-a")  # B keeps the old incarnation
    a.call("drop_table", table="t")
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 2}])
    # A's link from B reconnects: B's hello names the old incarnation of t.
    a.call("pause_replication", hostname="node-b", database="data")
    a.call("resume_replication", hostname="node-b", database="data")
    wait_linked([(a, b)], ("system", "data"))

    # B's rows of the old table, delivered as a copy chunk to A's link from B (whose
    # hello, from before the drop, named the old incarnation).
    b_data = b.node.storage.databases["data"]
    rows = b_data.iter_rows(b_data.tables["t"], None, 500)
    sub = a.node.cluster.subscribers[("node-b", "data")]
    work = Work("rows", ("t", rows), dict(b_data.origin_names))
    try:
        _on_loop(a, sub.applier.apply_rows(work))
        refused = False
    except ValueError as exc:  # DroppedIncarnationError: the link would retry
        refused = "dropped here" in str(exc)
    assert by_id(a, "t", 1) is None, "a row of the dropped table came back by copy"
    assert refused
    b.call("resume_replication", hostname="node-a")
    wait_for(lambda: by_id(b, "t", 2) and by_id(b, "t", 1) is None, timeout=20,
             message="B on the new incarnation")


def test_concurrent_creates_converge_on_one_definition(node_factory):
    """Two nodes create the same table apart (no drop between): after they pair, both
    hold one table with the united attributes and the same incarnation."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id", attributes=[{"name": "from_a"}])
    b.call("create_table", table="t", primary_key="id", attributes=[{"name": "from_b"}])
    a.call("insert", table="t", records=[{"id": 1}])
    b.call("insert", table="t", records=[{"id": 2}])
    join(a, b)

    def described(node):
        d = node.call("describe_table", table="t")
        return sorted(x["attribute"] for x in d["attributes"]), d["record_count"]

    wait_for(lambda: described(a) == described(b) and described(a)[1] == 2, timeout=20,
             message="one definition and both rows on both nodes")
    names, _ = described(a)
    assert {"from_a", "from_b"} <= set(names)
    versions = {n.node.storage.databases["data"].tables["t"].version for n in (a, b)}
    assert len(versions) == 1


def test_concurrent_creates_with_different_primary_keys_converge_on_the_newer(node_factory):
    """The same table created apart with different primary keys: after the nodes pair,
    both name the newer create's key (the other is an attribute), hold both rows, and
    take writes keyed by it from either side."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    b.call("create_table", table="t", primary_key="key")  # the newer create
    a.call("insert", table="t", records=[{"id": 1, "v": "a"}])
    b.call("insert", table="t", records=[{"key": 2, "v": "b"}])
    join(a, b)

    def described(node: Any) -> tuple[str, list[str], int]:
        d = node.call("describe_table", table="t")
        return (d["hash_attribute"], sorted(x["attribute"] for x in d["attributes"]),
                d["record_count"])

    wait_for(lambda: described(a) == described(b) and described(a)[2] == 2, timeout=20,
             message="one definition and both rows on both nodes")
    key, names, _ = described(a)
    assert key == "key" and "id" in names, described(a)
    a.call("insert", table="t", records=[{"key": 3, "v": "a again"}])
    wait_for(lambda: by_id(b, "t", 3) is not None, timeout=10, message="A's row on B")
    assert by_id(b, "t", 3)["v"] == "a again"


def _system_seq(node: Any) -> int:
    return node.node.storage.databases["system"].next_seq - 1


def _caught_up(node: Any, peer: Any) -> bool:
    """``node`` has applied ``peer``'s system log through its current end."""
    cursor = node.node.storage.databases["system"].cursor(peer.name)
    return int(cursor.get("seq", 0)) >= _system_seq(peer)


def test_recreated_database_survives_its_drop_arriving_after_it(node_factory):
    """B drops database x, C (having seen the drop) re-creates it by creating a table,
    and A gets C's create before B's drop (one copy per link: A's link from B is
    paused, and B's from C, so B's next hello does not list the new x). A applies the
    drop the create follows first, so B's late drop removes nothing and every node ends
    with C's incarnation and its table."""
    a, b, c = _mesh_of_three(node_factory, "x", "old")
    a.call("pause_replication", hostname="node-b", database="system")
    b.call("pause_replication", hostname="node-c", database="system")
    b.call("drop_database", database="x")
    wait_for(lambda: not _has_db(c, "x"), timeout=20, message="the drop on C")
    c.call("create_table", database="x", table="fresh", primary_key="id")
    wait_for(lambda: _caught_up(a, c), timeout=20, message="C's create on A")
    a.call("resume_replication", hostname="node-b", database="system")
    wait_for(lambda: _caught_up(a, b), timeout=20, message="B's drop on A")
    b.call("resume_replication", hostname="node-c", database="system")
    created = c.node.storage.databases["x"].created

    def converged() -> bool:
        for n in (a, b, c):
            db = n.node.storage.databases.get("x")
            if db is None or db.created != created or not has_table(n, "fresh", "x"):
                return False
        return True

    wait_for(converged, timeout=10, message="C's incarnation of x with its table everywhere")
    stays(lambda: _has_db(a, "x") and not has_table(a, "old", "x"), duration=1.0)


def _attributes(node: Any, table: str) -> set[str]:
    described = node.call("describe_table", table=table)
    return {a["attribute"] for a in described["attributes"]}


def _data_link_state(node: Any, peer: str) -> str | None:
    for conn in node.call("cluster_status")["connections"]:
        if conn["name"] == peer:
            for sock in conn["database_sockets"]:
                if sock["database"] == "data":
                    return str(sock.get("state"))
    return None


def test_a_drop_and_re_create_between_hello_and_copy_reaches_the_copying_peer(node_factory):
    """A full copy starts at the publisher's head when it is asked for, which may be
    well after its hello (a resync is asked for within the session). A drop and a
    re-create made in between were in neither: the hello named the old incarnation,
    and the stream went on from after them. The peer put the new incarnation's rows
    into its old one and never dropped it: its old rows stayed, and the old
    definition. The copy now names the schema it was taken with.

    node-b reaches node-a through a proxy that holds what node-b sends for half a
    second; node-a's log was purged while node-b was paused, so node-b's subscribe is
    answered with resync_required and its second subscribe asks for the copy. The drop
    comes once node-b has node-a's hello, before either subscribe lands."""
    from tests.proxy_util import TcpProxy
    from tests.repl_util import CREDS

    slow_pings = {"REPLICATION_PINGINTERVAL": "2000"}  # pongs come half a second late
    a = node_factory("node-a", env=slow_pings)
    b = node_factory("node-b", env=slow_pings)
    a.call("create_table", table="t1", primary_key="id", attributes=[{"name": "old"}])
    a.call("insert", table="t1", records=[{"id": 1}, {"id": 2}])
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        wait_for(lambda: by_id(b, "t1", 2) is not None, timeout=20, message="t1 on node-b")
        wait_for(lambda: _data_link_state(b, a.name) == "streaming", timeout=20,
                 message="node-b streaming from node-a")
        b.call("pause_replication", hostname=a.name, database="data")
        wait_for(lambda: _data_link_state(b, a.name) == "paused", timeout=20,
                 message="node-b paused")
        a.call("insert", table="t1", records=[{"id": 4}])
        a.call("purge_stream", table="t1")  # node-b's cursor is behind the log now
        to_a.request_delay = 0.5
        b.call("resume_replication", hostname=a.name, database="data")
        # Streaming once node-b has learned node-a's hello and sent its subscribe (held
        # by the proxy).
        wait_for(lambda: _data_link_state(b, a.name) == "streaming", timeout=30,
                 interval=0.01, message="node-b to have node-a's hello")
        a.call("drop_table", table="t1")
        a.call("create_table", table="t1", primary_key="id", attributes=[{"name": "new"}])
        a.call("insert", table="t1", records=[{"id": 3}])
        to_a.request_delay = 0.0
        wait_for(lambda: by_id(b, "t1", 3) is not None, timeout=30, message="row 3 on node-b")
        wait_for(lambda: by_id(b, "t1", 1) is None and "old" not in _attributes(b, "t1"),
                 timeout=20, message="node-b to drop the old incarnation")
        assert "new" in _attributes(b, "t1") and by_id(b, "t1", 4) is None
    finally:
        to_a.close()


def test_reprocessing_a_dead_letter_of_a_table_dropped_since_fails_and_keeps_it(node_factory):
    """A dead letter whose table was dropped afterwards (also when it was re-created) can
    never apply: reprocess reports it failed, naming the drop, and keeps it (it may hold
    the only copy of the change; delete_dead_letters removes it). A letter of another
    table in the same call still applies. Before, the stale op was skipped, the letter
    deleted and counted as succeeded."""
    a = node_factory("node-a")
    for table in ("gone", "kept", "again"):
        a.call("create_table", table=table, primary_key="id")
    storage = a.node.storage
    db = storage.databases["data"]
    letters = [deadletters.dead_letter(
        "node-b", "data", "node-b", storage.hlc.now(), None,
        [[table, "upsert", 7, {"id": 7, "v": table}, db.tables[table].version]],
        "test: held back") for table in ("gone", "kept", "again")]
    _on_loop(a, storage.write(deadletters.record_job(
        storage, "data", "node-b", letters, db.cursor("node-b"))))
    a.call("drop_table", table="gone")
    a.call("drop_table", table="again")
    a.call("create_table", table="again", primary_key="id")
    done = a.call("reprocess_dead_letters", node="node-b")
    assert (done["succeeded"], done["failed"]) == (1, 2), done
    assert done["message"] == "reprocessed 1 of 3 dead letters", done
    by_id_ = {f["id"]: f["error"] for f in done["failures"]}
    for letter, table in ((letters[0], "gone"), (letters[2], "again")):
        assert f"table 'data.{table}' was dropped after this change" in by_id_[letter["id"]]
    assert (by_id(a, "kept", 7) or {}).get("v") == "kept"
    assert by_id(a, "again", 7) is None
    left = a.call("list_dead_letters")["dead_letters"]
    assert sorted(d["table"] for d in left) == ["again", "gone"]
    again = a.call("reprocess_dead_letters", node="node-b")  # the same answer again
    assert (again["succeeded"], again["failed"]) == (0, 2), again
