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


def test_a_partial_relay_of_an_origin_known_only_by_gossip_holds_its_floor() -> None:
    """node-a is learned with no data link (relays are its only path); t1 from the
    relay node-c, everything from node-d, which may relay node-a later: node-a's floor
    is held. With t1 from every peer, the relay carries all this node takes of it."""
    learned = {"learned": True, "replicates": False, "subscriptions": []}
    rows: dict[str, dict[str, Any]] = {"node-a": learned, "node-d": {},
                                       "node-c": {"subscriptions": _sub("t1")}}
    assert narrow_origins(rows, "node-c", "data") == frozenset({"node-a", "node-d"})
    rows["node-d"] = {"subscriptions": _sub("t1")}
    assert narrow_origins(rows, "node-c", "data") == frozenset()
    assert narrow_origins(rows, "node-c", "data", {"node-a": ["t1"]}) == frozenset()


def test_a_partial_relay_of_an_origin_with_no_row_holds_its_floor() -> None:
    """node-a has no row here (removed): the names the link uses count as origins,
    relayed only, as one known by gossip."""
    rows: dict[str, dict[str, Any]] = {"node-d": {}, "node-c": {"subscriptions": _sub("t1")}}
    assert narrow_origins(rows, "node-c", "data") == frozenset({"node-d"})
    assert narrow_origins(rows, "node-c", "data", origins=["node-a", "node-c"]) == {
        "node-a", "node-d"}
    rows["node-d"] = {"subscriptions": _sub("t1")}
    assert narrow_origins(rows, "node-c", "data", origins=["node-a"]) == frozenset()


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
