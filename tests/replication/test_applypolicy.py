"""harpsync/replication/applypolicy.py over plain ``hdb_nodes`` rows."""

from __future__ import annotations

from typing import Any

from harpsync.replication.applypolicy import narrow_origins, policy_lookup


def _sub(*tables: str, conflict: str | None = None) -> list[dict[str, Any]]:
    return [{"database": "data", "table": t, "subscribe": True, "publish": True,
             **({"conflict": conflict} if conflict else {})} for t in tables]


def test_a_relay_carrying_all_the_receiver_takes_holds_no_floor() -> None:
    """Full subscriptions everywhere: a relay's entries raise every origin's floor."""
    rows: dict[str, dict[str, Any]] = {"node-b": {}, "node-c": {}}
    assert narrow_origins(rows, "node-b", "data") == frozenset()


def test_a_relay_taking_fewer_tables_than_the_origin_gives_holds_its_floor() -> None:
    """t1 from the relay, everything from the origin: the origin's floor is held; an
    origin with no data link here (relays are its only path) is not."""
    rows: dict[str, dict[str, Any]] = {"node-b": {"subscriptions": _sub("t1")},
                                       "node-c": {}, "node-d": {"replicates": False}}
    assert narrow_origins(rows, "node-b", "data") == frozenset({"node-c"})


def test_a_relay_that_itself_takes_only_some_tables_holds_the_floor() -> None:
    """The relay's hello says it takes only t1 of node-c (``relay_tables``)."""
    rows: dict[str, dict[str, Any]] = {"node-b": {}, "node-c": {}}
    assert narrow_origins(rows, "node-b", "data", {"node-c": ["t1"]}) == {"node-c"}
    limited: dict[str, dict[str, Any]] = {"node-b": {}, "node-c": {"subscriptions": _sub("t1")}}
    assert narrow_origins(limited, "node-b", "data", {"node-c": ["t1", "t2"]}) == frozenset()


def test_every_policy_last_writer_wins_skips_the_review() -> None:
    """No lookup while every policy is last-writer-wins, nor ever for system."""
    rows: dict[str, dict[str, Any]] = {"node-b": {"subscriptions": _sub("t1")}}
    assert policy_lookup(rows, "data", "last_writer_wins") is None
    rows["node-b"]["subscriptions"] = _sub("t1", conflict="dest_wins")
    lookup = policy_lookup(rows, "data", "last_writer_wins")
    assert lookup is not None and lookup("node-b", "t1") == "dest_wins"
    assert policy_lookup(rows, "system", "dest_wins") is None
