"""A database that reaches ``storage.mapSize``: a clear 507, nothing half written, the
rest of the node unharmed; a peer that fills up retries instead of dead-lettering, and
catches up once it has room."""

from __future__ import annotations

from typing import Any

from tests.helpers import wait_for
from tests.lifecycle_util import db_socket
from tests.repl_util import join, wait_linked

SMALL = str(2 * 1024 * 1024)  # 2 MiB: a few hundred rows of 500 bytes
ROOMY = str(64 * 1024 * 1024)
PAD = "x" * 500


def _batch(start: int, n: int = 100) -> list[dict[str, Any]]:
    return [{"id": start + i, "pad": PAD} for i in range(n)]


def _fill(node: Any, database: str, table: str) -> tuple[int, Any]:
    """Insert batches of 100 until one is refused; (rows acknowledged, the refusal)."""
    acked = 0
    for start in range(0, 100_000, 100):
        response = node.post({"operation": "insert", "database": database, "table": table,
                              "records": _batch(start)})
        if response.status_code != 200:
            return acked, response
        acked += 100
    raise AssertionError("the database never filled up")


def test_a_full_database_answers_507_and_the_node_keeps_serving(node_factory):
    node = node_factory("node-a", process=True, env={"STORAGE_MAPSIZE": SMALL})
    node.call("create_database", database="d")
    node.call("create_table", database="d", table="t", primary_key="id")
    acked, refused = _fill(node, "d", "t")

    assert refused.status_code == 507, refused.text
    body = refused.json()
    assert body["code"] == "STORAGE_ERROR", body
    assert "database 'd' is full" in body["error"], body
    assert "storage.mapSize" in body["error"], body
    # Nothing of the refused batch was written; everything acknowledged is there.
    assert node.count("t", "d") == acked > 0
    assert node.call("search_by_id", database="d", table="t", ids=[acked],
                     get_attributes=["id"]) == []
    # Reads, deletes and other databases go on.
    assert node.call("search_by_id", database="d", table="t", ids=[1],
                     get_attributes=["id"]) == [{"id": 1}]
    node.call("delete", database="d", table="t", ids=[1])
    node.call("create_database", database="e")
    node.call("create_table", database="e", table="t", primary_key="id")
    node.call("insert", database="e", table="t", records=[{"id": 1}])
    assert "Traceback" not in node.log_path.read_text()

    node.stop()
    node.extra_env["STORAGE_MAPSIZE"] = ROOMY  # a bigger map takes effect on restart
    node.start()
    node.call("insert", database="d", table="t", records=_batch(acked))
    assert node.count("t", "d") == acked + 100 - 1


def test_a_full_peer_retries_and_catches_up_once_it_has_room(node_factory):
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True, env={"STORAGE_MAPSIZE": SMALL})
    for node in (a, b):
        node.call("create_database", database="d")
        node.call("create_table", database="d", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "d"))
    for start in range(0, 6000, 500):
        a.call("insert", database="d", table="t", records=_batch(start, 500))

    def full_reported() -> bool:
        sock = db_socket(b.call("cluster_status"), a.name, "d")
        return sock is not None and "is full" in str(sock.get("last_error"))

    wait_for(full_reported, timeout=30, message="B's link from A reporting a full database")
    assert b.count("t", "d") < 6000
    assert b.call("list_dead_letters")["dead_letters"] == []
    log = b.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("is full") == 1, log[-3000:]  # a warning, not one per retry

    b.stop()
    b.extra_env["STORAGE_MAPSIZE"] = ROOMY
    b.start()
    wait_for(lambda: b.count("t", "d") == 6000, timeout=60, message="B caught up")
    assert b.call("list_dead_letters")["dead_letters"] == []


def test_a_database_refuses_a_table_it_has_no_room_for(node_factory):
    """Each table takes three of an environment's LMDB sub-databases: past the limit a
    create is refused whole with a 400, and a restart frees the slots of dropped tables."""
    node = node_factory("node-a", process=True)
    node.call("create_database", database="d")
    created = 0
    while True:
        response = node.post({"operation": "create_table", "database": "d",
                              "table": f"t{created}", "primary_key": "id"})
        if response.status_code != 200:
            break
        created += 1
        assert created < 5000, "no limit reached"
    assert response.status_code == 400, response.text
    body = response.json()
    assert "database 'd' cannot hold another table" in body["error"], body
    assert body["code"] == "VALIDATION_ERROR"
    assert f"t{created}" not in node.call("describe_database", database="d")
    node.call("insert", database="d", table="t0", records=[{"id": 1}])
    node.call("drop_table", database="d", table="t1")
    assert "Traceback" not in node.log_path.read_text()
    node.restart()
    node.call("create_table", database="d", table="fresh", primary_key="id")
    node.call("insert", database="d", table="fresh", records=[{"id": 1}])
    assert node.count("fresh", "d") == 1
