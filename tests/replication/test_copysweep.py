"""harpsync/replication/copysweep.py: the key ranges a full copy went through, in memory."""

from __future__ import annotations

from harpsync.replication.copysweep import CopySweeps, parse_horizons
from harpsync.storage.horizon import Sweep

HORIZONS = {"a": (10, 100, 0), "c": (30, 300, 0)}


def test_only_well_formed_horizons_are_taken():
    raw = {"a": [10, 100], "b": [1], "c": "x", 5: [1, 2], "d": [1, 0], "e": [1.5, 2],
           "f": [10, 100, 7], "g": [1, 2, 3, 4]}
    assert parse_horizons(raw) == {"a": (10, 100, 0), "f": (10, 100, 7)}
    assert parse_horizons(None) == {}


def test_chunks_close_the_ranges_before_them_and_the_end_closes_the_rest():
    sweeps = CopySweeps(HORIZONS)
    # A table without a horizon closes nothing of its own, but the tables before it.
    assert sweeps.for_chunk("b", False, [b"k"]) == [Sweep("a", 10, 100, None, None)]
    sweeps.advance("b", False, [b"k"])
    first = sweeps.for_chunk("c", False, [b"k1", b"k5"])
    assert first == [Sweep("c", 30, 300, None, b"k5", frozenset({b"k1", b"k5"}))]
    sweeps.advance("c", False, [b"k1", b"k5"])
    assert sweeps.for_chunk("c", False, [b"k7"]) == [
        Sweep("c", 30, 300, b"k5", b"k7", frozenset({b"k7"}))]
    sweeps.advance("c", False, [b"k7"])
    # Its tombstones: its live rows are over, past the last key sent.
    assert sweeps.for_chunk("c", True, [b"k2"]) == [Sweep("c", 30, 300, b"k7", None)]
    sweeps.advance("c", True, [b"k2"])
    assert sweeps.at_end() == []


def test_a_table_with_no_chunk_is_swept_whole_at_the_end():
    sweeps = CopySweeps(HORIZONS)
    sweeps.advance("a", False, [b"x"])
    assert sweeps.at_end() == [Sweep("a", 10, 100, b"x", None), Sweep("c", 30, 300, None, None)]


def test_nothing_moves_until_the_chunk_is_done():
    """A chunk whose job failed is sent again: its ranges are asked for again."""
    sweeps = CopySweeps(HORIZONS)
    once = sweeps.for_chunk("c", False, [b"k1"])
    assert sweeps.for_chunk("c", False, [b"k1"]) == once
    assert len(once) == 2


def test_a_resumed_copy_goes_on_from_the_chunk_its_cursor_holds():
    live = CopySweeps(HORIZONS, {"table": "c", "key": b"k5", "tombs": False})
    assert live.at_end() == [Sweep("c", 30, 300, b"k5", None)]
    tombs = CopySweeps(HORIZONS, {"table": "c", "key": b"k0", "tombs": True})
    assert tombs.at_end() == []
    early = CopySweeps(HORIZONS, {"table": "b", "key": b"k", "tombs": False})
    assert early.at_end() == [Sweep("c", 30, 300, None, None)]
