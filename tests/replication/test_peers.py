"""harpsync/replication/peers.py: reading a peer's row (pure functions)."""

from __future__ import annotations

from harpsync.replication.peers import start_floor
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
