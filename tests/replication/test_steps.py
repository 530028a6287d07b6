"""harpsync/replication/steps.py: the publisher's decisions, tested in memory."""

from __future__ import annotations

import pytest

from harpsync.replication.steps import (
    CAUGHT_UP_INTERVAL,
    CaughtUp,
    Copy,
    LogRead,
    Reported,
    Resync,
    Stream,
    Wait,
    copy_resumable,
    first_step,
    floors_cover,
    next_step,
    sendable,
)

NEVER = Reported()


# -- first_step ------------------------------------------------------------------------------
def test_first_step_copies_when_asked():
    """A subscribe asking for a copy gets a copy, even with a cursor past the head."""
    assert first_step(after_seq=99, copy=True, head_seq=5) == Copy()


def test_first_step_streams_from_a_cursor_within_the_log():
    """A cursor at or below the head streams after that cursor."""
    assert first_step(after_seq=5, copy=False, head_seq=5) == Stream(5)
    assert first_step(after_seq=0, copy=False, head_seq=5) == Stream(0)


def test_first_step_resyncs_a_cursor_past_the_head():
    """A cursor past the head (a wiped or restored log) must copy again, naming both."""
    step = first_step(after_seq=9, copy=False, head_seq=4)
    assert isinstance(step, Resync)
    assert step.oldest_seq == 4
    assert "9" in step.reason and "4" in step.reason


def test_first_step_resyncs_a_cursor_past_what_this_log_knows():
    """A cursor within the head but past ``known_through`` (the head at start, or what
    was sent since) names entries of another history: copy again."""
    step = first_step(after_seq=7, copy=False, head_seq=9, known_through=4)
    assert isinstance(step, Resync) and "restored" in step.reason
    assert first_step(after_seq=4, copy=False, head_seq=9, known_through=4) == Stream(4)


# -- pruning -------------------------------------------------------------------------------------
def test_pruned_past_the_cursor_resyncs_without_floors():
    """Entries after the cursor were pruned and the subscriber takes every origin: resync."""
    step = next_step(3, LogRead(pruned_through=10), NEVER, 0.0, origins=None,
                     pruned_max={"a": 5})
    assert step == Resync(11, "log entries up to 10 were pruned; cursor is 3")


def test_pruned_below_every_floor_skips_the_pruned_part():
    """When every floor is at or above the newest pruned version, reading goes on from
    the pruned point instead of a full copy."""
    step = next_step(3, LogRead(pruned_through=10), NEVER, 0.0,
                     origins={"a": 7, "b": 9}, pruned_max={"a": 7, "b": 2})
    assert step == Stream(10)


def test_entries_left_in_a_partly_pruned_range_are_streamed():
    """``purge_stream`` leaves other tables' entries inside the pruned range: covered by
    the floors, those read are sent (``sendable``) and reading goes on after the last,
    not from the pruned point past them."""
    origins, pruned_max = {"a": 7}, {"a": 7}
    assert sendable(3, 10, origins, pruned_max)
    assert not sendable(3, 10, None, pruned_max)
    step = next_step(3, LogRead(pruned_through=10, last_seq=6), NEVER, 0.0,
                     origins=origins, pruned_max=pruned_max)
    assert step == Stream(6)


def test_pruned_above_one_floor_resyncs():
    """One origin whose pruned versions pass its floor is enough to need a copy."""
    step = next_step(3, LogRead(pruned_through=10), NEVER, 0.0,
                     origins={"a": 7, "b": None}, pruned_max={"a": 7, "b": 1})
    assert isinstance(step, Resync)


def test_pruned_at_the_cursor_is_not_a_gap():
    """A cursor exactly at the pruned point lost nothing."""
    assert next_step(10, LogRead(pruned_through=10), NEVER, 0.0) == CaughtUp(10)


@pytest.mark.parametrize("origins, pruned_max, covered", [
    (None, {"a": 1}, False),
    ({"a": 5}, {}, False),
    ({"a": 5}, {"a": 5}, True),
    ({"a": 5}, {"a": 6}, False),
    ({"a": None}, {"a": 1}, False),
    ({"a": 5}, {"b": 9}, True),
])
def test_floors_cover(origins, pruned_max, covered):
    """Floors cover pruning only with a record of pruned versions, each at or below its floor."""
    assert floors_cover(origins, pruned_max) is covered


# -- streaming and caught_up -------------------------------------------------------------------
def test_a_full_read_reads_again_after_its_last_entry():
    """A read that hit its limit is followed by another read after its last entry."""
    step = next_step(0, LogRead(0, last_seq=1000, full=True), NEVER, 0.0)
    assert step == Stream(1000)


def test_a_commit_during_the_read_reads_again():
    """A commit that woke the publisher during the read is read before reporting."""
    step = next_step(0, LogRead(0, last_seq=7, woken=True), Reported(7, 0.0), 100.0)
    assert step == Stream(7)


def test_the_first_report_goes_out_at_once():
    """The first caught_up of a session is sent as soon as the log is read to its end."""
    assert next_step(0, LogRead(0), NEVER, 0.0) == CaughtUp(0)
    assert next_step(4, LogRead(0, last_seq=9), NEVER, 0.0) == CaughtUp(9)


def test_a_reported_position_waits_for_a_commit():
    """Nothing new since the last report: wait for a commit, with no time limit."""
    assert next_step(9, LogRead(0), Reported(9, 1.0), 50.0) == Wait(None)


def test_later_reports_are_paced():
    """A new position reported less than the interval after the last report waits for
    the rest of the interval."""
    step = next_step(9, LogRead(0, last_seq=12), Reported(9, 10.0), 10.2)
    assert isinstance(step, Wait)
    assert step.timeout == pytest.approx(CAUGHT_UP_INTERVAL - 0.2)


def test_a_report_after_the_interval_goes_out():
    """Once the interval has passed, the new end of the log is reported."""
    step = next_step(9, LogRead(0, last_seq=12), Reported(9, 10.0), 10.0 + CAUGHT_UP_INTERVAL)
    assert step == CaughtUp(12)


def test_the_interval_is_a_parameter():
    """With no interval every new end of the log is reported at once."""
    assert next_step(9, LogRead(0, last_seq=12), Reported(9, 10.0), 10.0,
                     interval=0.0) == CaughtUp(12)


def test_a_copy_resumes_only_at_a_snapshot_this_log_can_have_sent():
    """A resume snapshot past the head, or past the head at open and all sent since (a
    restored log), starts the copy over; one within them resumes."""
    assert copy_resumable(7, head_seq=9, known_through=9)
    assert not copy_resumable(7, head_seq=9, known_through=4)
    assert not copy_resumable(12, head_seq=9, known_through=12)
