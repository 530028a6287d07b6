"""harpsync/replication/peers.py: reading a peer's row (pure functions)."""

from __future__ import annotations

from harpsync.replication.peers import receives_more, sends_more, start_floor
from harpsync.storage.hlc import ms_to_version


def test_start_floor_is_the_rows_start_time_as_a_version():
    """A row's ``start_time`` becomes the version below which its changes are skipped."""
    row = {"name": "node-b", "start_time": "2026-11-22T10:00:00Z"}
    assert start_floor(row) == ms_to_version(1795341600000)


def test_start_floor_is_zero_without_a_usable_start_time():
    """No row, no ``start_time`` or one that does not parse: nothing is skipped."""
    assert start_floor(None) == 0
    assert start_floor({"name": "node-b"}) == 0
    assert start_floor({"start_time": "yesterday"}) == 0


def _row(*subs: tuple[str, bool, bool], replicates: bool = True) -> dict[str, object]:
    return {"replicates": replicates,
            "subscriptions": [{"database": "data", "table": t, "subscribe": sub,
                               "publish": pub} for t, sub, pub in subs] if subs else None}


def test_only_a_side_that_receives_more_needs_a_copy():
    """A table added to what this node receives (or everything after some) needs a copy;
    a narrowing or a change of the publish flags alone does not."""
    full, t1 = _row(), _row(("t1", True, True))
    t1_sent_only = _row(("t1", False, True))
    nothing = _row(replicates=False)
    assert receives_more(t1, full, "data") and receives_more(nothing, t1, "data")
    assert receives_more(t1_sent_only, t1, "data")
    assert not receives_more(full, t1, "data") and not receives_more(t1, nothing, "data")
    assert not receives_more(t1, _row(("t1", True, False)), "data")
    assert not receives_more(full, full, "data")
    # The other direction, as the peer sees it.
    assert sends_more(_row(("t1", True, False)), t1, "data")
    assert sends_more(nothing, full, "data") and not sends_more(full, t1, "data")
    # The system database always replicates: nothing to copy again there.
    assert not receives_more(nothing, full, "system")
