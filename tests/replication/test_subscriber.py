"""harpsync/replication/subscriber.py over socket pairs, with fakes of its seams.

The subscriber dials through a fake host whose every dial opens a
``socket.socketpair()``; the test plays the publishing peer on the accepted end with a
real ``PublisherSession``, and a fake ``LinkStore`` records what was applied: no node,
no listener, no LMDB.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest

from harpsync.replication import acks
from harpsync.replication.protocol import (
    AckReceived,
    PeerFailed,
    SubscribeRequested,
)
from harpsync.replication.streams import HOUR, stream_entry
from harpsync.replication.subscriber import LinkState, Subscriber
from harpsync.storage.hlc import ms_to_version

from .fakes import (
    PEER,
    WAIT,
    FakeLinkStore,
    FakeRelays,
    FakeSubscriberHost,
    entry,
    stored_row,
    until,
)
from .links import (
    PEER_IDS,
    HeldApplyStore,
    Linked,
    WriterLikeStore,
    accept,
    acked,
    publisher,
    running,
    send_entries,
)

pytestmark = pytest.mark.timeout(30)
async def test_a_new_pairing_starts_with_a_full_copy_then_streams():
    """With no cursor the subscriber asks for a copy; rows land with a cursor holding
    the resume point, the end of the copy commits the snapshot, acks it, tells the host,
    and the link streams."""
    async with running() as linked:
        peer, sub = await accept(linked)
        assert sub.copy and sub.after_seq == 0 and sub.origins == {PEER: None}
        assert linked.store.hellos == [{"dog": {"version": 1}}]
        session = publisher(peer)
        session.begin_copy(7, 2, ["dog"])
        session.send_copy_rows("dog", [stored_row(1, 50, 1), stored_row(1, 51, 2)], PEER_IDS)
        session.end_copy(7)
        await peer.flush()
        await acked(peer, 7)
        [(table, keys, cursor)] = linked.store.copied
        assert (table, keys) == ("dog", [b"1", b"2"])
        assert cursor["copy"] == {"table": "dog", "key": b"2", "tombs": False, "snapshot": 7,
                                  "copied": 2}
        cursor = dict(linked.store.cursors[("data", PEER)])
        assert isinstance(cursor.pop("at"), float)  # when it committed
        assert cursor == {"seq": 7, "origins": [PEER]}
        assert linked.host.copies == [(PEER, "data")]
        assert linked.sub.state == LinkState.STREAMING and linked.sub.copy_progress is None


async def test_applies_batches_in_order_and_acks_them():
    """Batches after the cursor are applied in sequence order, the cursor committed with
    them, and each commit acked."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, sub = await accept(linked)
        assert (sub.after_seq, sub.copy) == (5, False)
        await send_entries(peer, [6, 7])
        await send_entries(peer, [8, 9])
        await acked(peer, 9)
        assert linked.store.applied == [6, 7, 8, 9]
        assert linked.store.cursors[("data", PEER)]["seq"] == 9
        assert (linked.sub.committed_seq, linked.sub.received_seq) == (9, 9)
        assert linked.sub.txns_received == 4 and linked.sub.lag_txns() == 0


async def test_acks_of_commits_in_quick_succession_are_coalesced(monkeypatch):
    """The first commit is acked at once; commits that follow within ``ACK_INTERVAL``
    (long here, so that none of it depends on the machine's speed) share one ack,
    sent when the interval ends, with the newest sequence."""
    monkeypatch.setattr(acks, "ACK_INTERVAL", 1.0)
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6])
        assert (await peer.expect(AckReceived)).seq == 6
        for seq in (7, 8, 9):  # one apply job each
            await send_entries(peer, [seq])
            await until(lambda seq=seq: linked.store.applied[-1:] == [seq])
        assert (await peer.expect(AckReceived, timeout=5)).seq == 9
        assert linked.store.jobs == [[6], [7], [8], [9]]


async def test_caught_up_moves_the_cursor_past_filtered_entries():
    """``caught_up`` past the last entry received (the rest was filtered out on the
    publisher's side) commits the cursor there and acks it."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6])
        publisher(peer).send_caught_up(12)
        await peer.flush()
        await acked(peer, 12)
        assert linked.store.cursors[("data", PEER)]["seq"] == 12
        assert linked.store.applied == [6]


class HeldCursorStore(FakeLinkStore):
    """Cursor writes wait for ``release``: a writer job that outlives its session."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writing = asyncio.Event()

    async def write_cursor(self, database: str, peer: str, cursor: dict[str, Any],
                           sweeps: Any = (), floors: Any = None) -> None:
        self.writing.set()
        await self.release.wait()
        await super().write_cursor(database, peer, cursor, sweeps, floors)


async def test_a_copy_whose_end_commits_as_the_link_drops_is_not_left_in_progress():
    """The end of a copy commits its cursor in a writer job that finishes even when
    the link drops meanwhile (the applier is cancelled while it waits). The next
    session streams from that cursor, and no copy is shown in progress: status, the
    copy gauge and verify (which refuses while a copy runs) read ``copy_progress``."""
    async def check(sub: Subscriber, _host: FakeSubscriberHost) -> None:
        await until(lambda: sub.state == LinkState.STREAMING)
        assert sub.copy_progress is None

    await _copy_end_commits_as_the_link_drops(check)


async def _copy_end_commits_as_the_link_drops(check: Any) -> None:
    """A copy's end whose cursor job is held while the link drops, then released; the
    next session must subscribe after the copy's snapshot; then ``check(sub, host)``."""
    host, store = FakeSubscriberHost(), HeldCursorStore()
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    linked = Linked(sub, host, store)
    try:
        peer, _ = await accept(linked)
        session = publisher(peer)
        session.begin_copy(7, 1, ["dog"])
        session.send_copy_rows("dog", [stored_row(1, 50, 1)], PEER_IDS)
        session.end_copy(7)
        await peer.flush()
        await asyncio.wait_for(store.writing.wait(), WAIT)
        await peer.link.close(1001, "going away")
        await until(lambda: sub.state == LinkState.CONNECTING)
        store.release.set()
        again, subscribed = await accept(linked)
        assert (subscribed.after_seq, subscribed.copy) == (7, False)
        await check(sub, host)
    finally:
        await sub.retire()


async def test_an_apply_that_commits_as_the_link_drops_is_counted_and_not_asked_again():
    """The link drops while an apply job is in the writer (it commits anyway). The next
    session subscribes after what that job committed, not from the cursor before it,
    and the job's entries are counted once."""
    host, store = FakeSubscriberHost(), HeldApplyStore()
    store.cursors[("data", PEER)] = {"seq": 5, "origins": [PEER]}
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    linked = Linked(sub, host, store)
    try:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7])
        await asyncio.wait_for(store.applying.wait(), WAIT)
        await peer.link.close(1001, "going away")
        await until(lambda: len(host.dialed) == 2, message="the next dial")
        # The job commits a while after the new socket opened: a session that did not
        # wait for it would have subscribed by then, from the cursor before it.
        asyncio.get_running_loop().call_later(0.3, store.release.set)
        again, subscribed = await accept(linked)
        assert store.release.is_set()
        assert (subscribed.after_seq, subscribed.copy) == (7, False)
        assert store.applied == [6, 7]
        assert sub.txns_received == 2 and sub.committed_seq == 7
    finally:
        await sub.retire()


async def test_reconnects_and_resumes_from_its_cursor():
    """When the socket closes the subscriber dials again and subscribes after the
    cursor it committed, without a copy."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7])
        await acked(peer, 7)
        await peer.link.close(1001, "going away")
        again, sub = await accept(linked)
        assert (sub.after_seq, sub.copy) == (7, False)
        assert len(linked.host.dialed) == 2
        await send_entries(again, [8])
        await acked(again, 8)
        assert linked.store.applied == [6, 7, 8]


async def test_resync_required_asks_for_a_copy():
    """After ``resync_required`` the subscriber asks for a full copy on the same socket."""
    async with running({"seq": 2, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        publisher(peer).send_resync_required(10, "log entries up to 9 were pruned")
        await peer.flush()
        sub = await peer.expect(SubscribeRequested)
        assert sub.copy and sub.copy_resume is None
        assert linked.sub.state == LinkState.COPYING
        assert "resync required" in (linked.sub.last_error or "")


async def test_an_interrupted_copy_resumes_where_it_stopped():
    """A cursor holding a copy's resume point asks for the copy again from there."""
    resume = {"table": "dog", "key": b"2", "tombs": False, "snapshot": 7}
    async with running({"seq": 0, "origins": [PEER], "copy": resume}) as linked:
        _, sub = await accept(linked)
        assert sub.copy and sub.copy_resume == resume


async def test_pause_keeps_the_cursor_and_resume_streams_from_it():
    """Pausing closes the link and keeps the committed cursor; resuming dials again and
    subscribes after it."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6])
        await acked(peer, 6)
        await linked.sub.pause()
        assert linked.sub.state == LinkState.PAUSED and not linked.sub.connected
        await peer.closed()
        linked.sub.resume()
        _, sub = await accept(linked)
        assert (sub.after_seq, sub.copy) == (6, False)


async def test_an_unappliable_change_goes_to_the_dead_letters():
    """A batch failing on one change is applied entry by entry; the bad entry becomes a
    dead letter with the cursor past it, the others apply."""
    async with running({"seq": 0, "origins": [PEER]}) as linked:
        linked.store.refuse = {2}
        peer, _ = await accept(linked)
        await send_entries(peer, [1, 2, 3])
        await acked(peer, 3)
        assert linked.store.applied == [1, 3]
        assert [letter["peer"] for letter in linked.store.letters] == [PEER]
        assert linked.host.dead_letters == 1
        assert (linked.sub.last_error or "").startswith("dead letter:")


async def test_counters_come_from_the_session():
    """The link reports the session's byte and sequence counters, and keeps bytes
    across reconnects."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7])
        await acked(peer, 7)
        session = linked.sub.session
        assert session is not None
        assert linked.sub.bytes_received == session.bytes_received > 0
        assert linked.sub.head_seq == session.head_seq == 7
        first = linked.sub.bytes_received
        await peer.link.close(1001, "going away")
        again, _ = await accept(linked)
        await send_entries(again, [8])
        await acked(again, 8)
        assert linked.sub.bytes_received > first
        await until(lambda: linked.sub.head_seq == 8)


async def test_a_link_stopped_while_its_next_session_waits_for_the_last_job_waits_too():
    """The link drops while an apply job is in the writer; its next session waits for
    the job (``settle``) and the link is stopped meanwhile (pause, restart, shutdown).
    ``stop`` returns only once the job committed, and the job is counted."""
    host, store = FakeSubscriberHost(), WriterLikeStore()
    store.cursors[("data", PEER)] = {"seq": 5, "origins": [PEER]}
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    linked = Linked(sub, host, store)
    try:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7])
        await asyncio.wait_for(store.applying.wait(), WAIT)
        await peer.link.close(1001, "going away")
        await until(lambda: len(host.dialed) == 2, message="the next dial")
        for _ in range(5):  # the new session reaches settle()
            await asyncio.sleep(0)
        asyncio.get_running_loop().call_later(0.3, store.release.set)
        await sub.pause()
        assert store.applied == [6, 7], "stop() returned with a job of the link left"
        assert sub.txns_received == 2 and sub.committed_seq == 7
    finally:
        store.release.set()
        await sub.retire()


async def test_a_copy_whose_end_commits_as_the_link_drops_is_reported_finished():
    """The end of a copy commits its cursor as the link drops: the copy still counts as
    finished (``copy_finished``: the verification after a copy), and the next session
    streams after it."""
    async def check(_sub: Subscriber, host: FakeSubscriberHost) -> None:
        assert host.copies == [(PEER, "data")]

    await _copy_end_commits_as_the_link_drops(check)


async def test_a_link_paused_right_after_a_commit_still_acks_it(monkeypatch):
    """A commit acked by the timer (``ACK_INTERVAL``) when the link pauses first: the
    ack goes before the socket closes, so the origin knows the peer holds it."""
    monkeypatch.setattr(acks, "ACK_INTERVAL", 1.0)
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6])
        assert (await peer.expect(AckReceived)).seq == 6
        await send_entries(peer, [7])
        await until(lambda: linked.store.applied[-1:] == [7])
        await linked.sub.pause()
        assert (await peer.expect(AckReceived, timeout=3)).seq == 7


async def test_a_resume_while_the_pause_is_stopping_the_link_runs_it_again():
    """resume() arriving while pause() still waits for the link's task to end: the
    resume came last, so the link runs again (it was left stopped, unpaused, and a
    later resume did nothing)."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        sub = linked.sub
        await accept(linked)
        pausing = asyncio.create_task(sub.pause())
        await asyncio.sleep(0)  # pause() has cancelled the link's task; it is ending
        assert sub.paused
        sub.resume()
        await pausing
        assert not sub.paused
        _, request = await accept(linked)
        assert request.after_seq == 5


async def test_a_malformed_frame_from_the_publisher_gets_a_protocol_error_frame() -> None:
    """A publisher's frame the session refuses fails the link with a ``last_error`` naming
    it, and the publisher is told why (an ``error`` frame with code ``protocol_error``).
    Before, the link raised as it handled the failure, ahead of sending the frame the
    session had queued."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await peer.link.send(b"D\x00\x00")  # a truncated batch header
        failed = await peer.expect(PeerFailed)
        assert failed.code == "protocol_error" and "truncated" in failed.message
        await until(lambda: linked.sub.last_error and "truncated" in linked.sub.last_error)


async def test_a_replay_shows_its_lag_until_the_log_is_read_again():
    """After replay_replication rewinds the link, ``lag_txns`` counts what is to be
    read again: a ``caught_up`` of the session before the rewind no longer counts (it
    showed 0, and the stream ``running``, for the whole replay)."""
    async with running({"seq": 5, "origins": [PEER]}) as linked:
        peer, _ = await accept(linked)
        await send_entries(peer, [6, 7, 8])
        publisher(peer).send_caught_up(8)
        await peer.flush()
        await acked(peer, 8)
        await until(lambda: linked.sub.caught_up_seq == 8)
        assert linked.sub.lag_txns() == 0
        await linked.sub.rewind(2, 0)
        again, sub = await accept(linked)
        assert sub.after_seq == 2
        await until(lambda: linked.sub.state == LinkState.STREAMING)
        assert linked.sub.lag_txns() == 6
        await send_entries(again, [3, 4])
        await acked(again, 4)
        assert linked.sub.lag_txns() == 4


async def test_errors_last_hour_counts_every_error_of_the_hour():
    """get_replication_status's ``errors_last_hour`` counts each error of the last hour,
    however many (a link retrying every 2 s fails 1,800 times an hour; it showed at most
    1,000), and forgets those older than an hour."""
    sub = Subscriber(FakeSubscriberHost(), FakeLinkStore(), FakeRelays(), PEER, "data")
    status = SimpleNamespace(rows={}, storage=SimpleNamespace(databases={}),
                             default_conflict="last_writer_wins")
    for _ in range(1800):
        sub.last_error = "connection refused"
    assert stream_entry(status, sub, [], [])["errors_last_hour"] == 1800  # type: ignore[arg-type]
    later = time.time() + HOUR + 120
    with patch("time.time", return_value=later):
        assert stream_entry(status, sub, [], [])["errors_last_hour"] == 0  # type: ignore[arg-type]


async def test_lag_ms_is_the_age_of_the_oldest_entry_not_applied():
    """While a batch waits to apply, ``lag_ms`` is the age of its oldest entry: after an
    idle hour it read an hour (the age of the last entry applied) for a write made a
    moment ago."""
    host, store = FakeSubscriberHost(), WriterLikeStore()
    store.cursors[("data", PEER)] = {"seq": 5, "origins": [PEER]}
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    linked = Linked(sub, host, store)
    now_ms = int(time.time() * 1000)
    try:
        peer, _ = await accept(linked)
        store.release.set()
        publisher(peer).send_entries(6, [(6, 1, entry(1, ms_to_version(now_ms - 3_600_000),
                                                       key=6))], PEER_IDS)
        await peer.flush()
        await acked(peer, 6)
        store.release.clear()
        store.applying.clear()
        publisher(peer).send_entries(7, [(7, 1, entry(1, ms_to_version(now_ms), key=7))],
                                     PEER_IDS)
        await peer.flush()
        await asyncio.wait_for(store.applying.wait(), WAIT)
        assert sub.lag_txns() == 1
        assert 0 <= sub.lag_ms() < 60_000, sub.lag_ms()
    finally:
        store.release.set()
        await sub.retire()


class HeldRowsStore(HeldApplyStore):
    """Copy chunks (not log entries) wait for ``release``: a chunk that commits as the
    link is paused."""

    apply_entries = FakeLinkStore.apply_entries

    async def apply_rows(self, *args: Any, **kwargs: Any) -> Any:
        self.applying.set()
        await self.release.wait()
        return await FakeLinkStore.apply_rows(self, *args, **kwargs)


async def test_a_copy_chunk_that_commits_as_the_link_pauses_is_counted():
    """A pause cancels the applier while a copy chunk is in the writer; the chunk still
    commits (its cursor says so). Its rows count in ``copy_progress``, which status
    shows until the next session begins: it lagged a chunk behind what was held."""
    host, store = FakeSubscriberHost(), HeldRowsStore()
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    linked = Linked(sub, host, store)
    try:
        peer, _ = await accept(linked)
        session = publisher(peer)
        session.begin_copy(7, 3, ["dog"])
        session.send_copy_rows("dog", [stored_row(1, 50, 1), stored_row(1, 51, 2)], PEER_IDS)
        await peer.flush()
        await asyncio.wait_for(store.applying.wait(), WAIT)
        task = sub._task
        assert task is not None
        pausing = asyncio.ensure_future(sub.pause())
        await until(task.done)  # the link's task is cancelled, its chunk still held
        store.release.set()
        await asyncio.wait_for(pausing, WAIT)
        assert store.cursors[("data", PEER)]["copy"]["copied"] == 2
        assert sub.copy_progress == {"records_copied": 2, "records_total": 3}
    finally:
        await sub.retire()


class HeldSweepStore(FakeLinkStore):
    """The first copy chunk's apply waits for ``release``; every chunk's sweep ranges
    (and a copy end's) are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.applying = asyncio.Event()
        self.sweeps: list[tuple[str, list[Any]]] = []

    async def apply_rows(self, database: str, peer: str, table: str, rows: Any,
                         origins: Any, cursor: dict[str, Any], floor: int,
                         incarnation: int | None, review: Any, sweeps: Any = ()) -> int:
        self.sweeps.append((f"rows {rows[-1][0]!r}", list(sweeps)))
        self.applying.set()
        await self.release.wait()
        return await super().apply_rows(database, peer, table, rows, origins, cursor, floor,
                                         incarnation, review, sweeps)

    async def write_cursor(self, database: str, peer: str, cursor: dict[str, Any],
                           sweeps: Any = (), floors: Any = None) -> None:
        if sweeps:
            self.sweeps.append((f"end {cursor['seq']}", list(sweeps)))
        await super().write_cursor(database, peer, cursor, sweeps, floors)


async def test_a_copy_after_resync_does_not_sweep_with_the_ranges_of_the_copy_before():
    """A resync right after a copy (its log pruned past the snapshot meanwhile) starts
    a second copy while the first one's chunks still wait in the apply queue. Their
    sweep ranges (rows of the publisher it deleted: ``copysweep.py``) must be the first
    copy's. Before, ``copy_begin`` replaced the ranges as it arrived: the first copy's
    next chunk swept from the table's first key (deleting, with new tombstones that
    replicate, the publisher's rows the first copy had just landed), and its end from
    the last key it reached."""
    host, store = FakeSubscriberHost(), HeldSweepStore()
    sub = Subscriber(host, store, FakeRelays(), PEER, "data")
    sub.start()
    try:
        peer, _ = await accept(Linked(sub, host, store))
        session = publisher(peer)
        horizons = {"dog": [1, 1000]}
        session.begin_copy(7, 4, ["dog"], None, horizons)
        session.send_copy_rows("dog", [stored_row(1, 50, 1), stored_row(1, 51, 2)], PEER_IDS)
        session.send_copy_rows("dog", [stored_row(1, 52, 3), stored_row(1, 53, 4)], PEER_IDS)
        session.end_copy(7)
        await peer.flush()
        await asyncio.wait_for(store.applying.wait(), WAIT)  # the first chunk is held
        session.send_resync_required(9, "log entries up to 8 were pruned")
        await peer.flush()
        again = await peer.expect(SubscribeRequested)
        assert again.copy
        session.begin_copy(9, 4, ["dog"], None, horizons)
        session.send_copy_rows("dog", [stored_row(1, 50, 1), stored_row(1, 51, 2)], PEER_IDS)
        session.end_copy(9)
        await peer.flush()
        await until(lambda: any(w.kind == "copy_end" and w.payload == 9
                                for w in sub.applier.queue.pending()),
                    message="the second copy queued behind the first")
        store.release.set()
        await acked(peer, 9)
        ranges = [(what, [(s.after, s.through, sorted(s.present)) for s in sweeps])
                  for what, sweeps in store.sweeps]
        assert ranges == [
            ("rows b'2'", [(None, b"2", [b"1", b"2"])]),
            ("rows b'4'", [(b"2", b"4", [b"3", b"4"])]),
            ("end 7", [(b"4", None, [])]),
            ("rows b'2'", [(None, b"2", [b"1", b"2"])]),
            ("end 9", [(b"2", None, [])]),
        ]
    finally:
        await sub.retire()


async def test_a_resumed_copy_shows_the_rows_copied_before_from_its_first_status():
    """A copy that resumes one paused part-way counts its rows copied before from the
    moment its ``copy_begin`` arrives, not only once the apply queue reaches it: a
    status read in between showed ``records_copied`` 0 (a flake of
    ``test_full_copy``'s resumed-copy test under load). Another snapshot starts at 0."""
    sub = Subscriber(FakeSubscriberHost(), FakeLinkStore(), FakeRelays(), PEER, "data")
    sub.applier.copy_resume = {"table": "dog", "key": b"9", "tombs": False, "snapshot": 7,
                               "copied": 1200}
    await sub.applier.queue_copy(7, 5000)  # nothing takes it from the queue here
    assert sub.copy_progress == {"records_copied": 1200, "records_total": 5000}
    sub.applier.new_session()
    await sub.applier.queue_copy(8, 5000)
    assert sub.copy_progress == {"records_copied": 0, "records_total": 5000}
