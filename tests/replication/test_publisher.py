"""harpsync/replication/publisher.py over a socket pair, with a fake ``LogSource``.

The test plays the subscribing peer with a real ``SubscriberSession`` on the other end
of ``socket.socketpair()``: no node, no listener, no LMDB.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from harpsync import codec
from harpsync.replication import publisher as publisher_module
from harpsync.replication.protocol import (
    CaughtUp,
    CopyBegan,
    CopyEnded,
    CopyRows,
    EntriesReceived,
    OperationCompleted,
    PeerFailed,
    PeerHello,
    ResyncRequired,
    SubscriberSession,
    SubscriberState,
)
from harpsync.replication.publisher import Publisher
from harpsync.replication.transport import socket_pair

from .fakes import PEER, FakeLog, FakePublisherHost, Wire, entry, stored_row, until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each commit goes out at once unless a test sets ``SEND_LINGER`` itself."""
    monkeypatch.setattr(publisher_module, "SEND_LINGER", 0.0)


@dataclass
class Served:
    publisher: Publisher
    peer: Wire
    host: FakePublisherHost
    log: FakeLog
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def serve(log: FakeLog | None, database: str = "data") -> AsyncIterator[Served]:
    """A publisher serving ``log`` on one end of a socket pair; the test's peer on the
    other end has said hello and been answered."""
    dialed, accepted = await socket_pair("/" + database)
    host = FakePublisherHost()
    publisher = Publisher(host, accepted, PEER, database, log)
    task = asyncio.create_task(publisher.run())
    peer = Wire(dialed, SubscriberSession(PEER, database, {}, {}))
    try:
        yield Served(publisher, peer, host, log or FakeLog(), task)
    finally:
        await dialed.close()
        await asyncio.wait_for(task, 5)


async def hello(served: Served) -> SubscriberSession:
    session = served.peer.session
    assert isinstance(session, SubscriberSession)
    session.start()
    await served.peer.flush()
    await served.peer.expect(PeerHello)
    return session


async def subscribe(served: Served, after: int, copy: bool = False) -> None:
    session = await hello(served) if served.peer.session.peer is None else served.peer.session
    assert isinstance(session, SubscriberSession)
    session.subscribe(after_seq=after, origins=None, tables=None, copy=copy)
    await served.peer.flush()


def logged(log: FakeLog, count: int, origin_id: int = 1) -> None:
    for i in range(count):
        log.append(entry(origin_id, 1000 + log.next_seq, key=i))


async def two_sent(served: Served, log: FakeLog) -> Publisher:
    """Stream from the start: entry 1, ``caught_up``, then entry 2 sent by the pump,
    which then waits (parked once its report timer is set) for the next report."""
    logged(log, 1)
    await subscribe(served, after=0)
    assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [1]
    assert (await served.peer.expect(CaughtUp)).seq == 1
    logged(log, 1)
    assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [2]
    return served.publisher


async def test_streams_the_entries_after_the_cursor():
    """Entries after the subscriber's cursor arrive in order, then ``caught_up`` at the
    head; the host hears where the peer starts from."""
    log = FakeLog()
    logged(log, 5)
    async with serve(log) as served:
        await subscribe(served, after=2)
        got = await served.peer.expect(EntriesReceived)
        assert [seq for seq, _ in got.entries] == [3, 4, 5]
        assert (await served.peer.expect(CaughtUp)).seq == 5
        assert served.host.positions == [(PEER, "data", 2, False)]
        assert served.publisher.sent_seq == 5


async def test_skips_the_peers_own_entries_but_reports_past_them():
    """An entry that originated on the peer is not sent back; ``caught_up`` still
    covers it, so the subscriber's cursor moves past it."""
    log = FakeLog()
    logged(log, 1)
    logged(log, 1, origin_id=2)  # from the peer itself
    async with serve(log) as served:
        await subscribe(served, after=0)
        got = await served.peer.expect(EntriesReceived)
        assert [seq for seq, _ in got.entries] == [1]
        assert (await served.peer.expect(CaughtUp)).seq == 2


async def test_sends_caught_up_at_once_for_a_cursor_at_the_head():
    """A subscriber already at the head hears ``caught_up`` right away."""
    log = FakeLog()
    logged(log, 3)
    async with serve(log) as served:
        await subscribe(served, after=3)
        assert (await served.peer.expect(CaughtUp)).seq == 3
        assert not [e for e in served.peer.events if isinstance(e, EntriesReceived)]


async def test_resyncs_a_cursor_behind_the_pruned_log():
    """A cursor older than what was pruned gets ``resync_required`` naming the oldest
    sequence still held, and no entries."""
    log = FakeLog()
    logged(log, 6)
    log.prune(through=4)
    async with serve(log) as served:
        await subscribe(served, after=1)
        resync = await served.peer.expect(ResyncRequired)
        assert resync.oldest_seq == 5 and "pruned" in resync.reason
        assert not [e for e in served.peer.events if isinstance(e, EntriesReceived)]


async def test_entries_left_inside_a_purged_range_are_sent():
    """``purge_stream`` removed entries 1 and 3 (one table's) and left 2 (another
    origin's): a subscriber whose floors cover what was removed streams on, and still
    receives entry 2 instead of jumping past the whole purged range."""
    log = FakeLog()
    log.append(entry(1, 1001, table="purged"))
    log.append(entry(3, 1002))
    log.append(entry(1, 1003, table="purged"))
    log.entries = [e for e in log.entries if e[0] == 2]
    log._pruned, log._pruned_max = 3, {"node-a": 1003}
    async with serve(log) as served:
        session = await hello(served)
        session.subscribe(after_seq=0, origins={"node-a": 1003, "node-c": None}, tables=None)
        await served.peer.flush()
        got = await served.peer.expect(EntriesReceived)
        assert [seq for seq, _ in got.entries] == [2]
        assert (await served.peer.expect(CaughtUp)).seq == 3


async def test_resyncs_a_cursor_past_the_head():
    """A cursor past this node's head (its log was reset) must copy again."""
    log = FakeLog()
    logged(log, 2)
    async with serve(log) as served:
        await subscribe(served, after=9)
        assert "beyond" in (await served.peer.expect(ResyncRequired)).reason


async def test_resyncs_a_cursor_into_entries_written_after_a_restore():
    """This node opened its log at 4 (restored from a backup) and wrote on to 9 before
    the peer came back with cursor 7 from the old history: nothing this process sent
    took the peer there, so it must copy again, or it would skip entries 5 to 7."""
    log = FakeLog()
    logged(log, 9)
    log.opened = 4
    async with serve(log) as served:
        await subscribe(served, after=7)
        resync = await served.peer.expect(ResyncRequired)
        assert "restored" in resync.reason
        assert not [e for e in served.peer.events if isinstance(e, EntriesReceived)]


async def test_streams_a_cursor_past_the_opened_head_that_it_sent():
    """A cursor past the head at start is right when this process sent it there (a
    link that reconnects): it streams on from it, with no copy."""
    log = FakeLog()
    logged(log, 9)
    log.opened = 4
    async with serve(log) as served:
        log.sent_to[PEER] = 7
        await subscribe(served, after=7)
        got = await served.peer.expect(EntriesReceived)
        assert [seq for seq, _ in got.entries] == [8, 9]


async def test_notes_what_it_sends_for_the_restore_check():
    """Batches and ``caught_up`` reports record how far they let the peer's cursor go."""
    log = FakeLog()
    logged(log, 3)
    async with serve(log) as served:
        await subscribe(served, after=0)
        await served.peer.expect(CaughtUp)
        assert log.sent_to[PEER] == 3


async def test_waits_at_the_end_of_the_log_and_resumes_on_a_commit():
    """At the end of its log the publisher waits for a commit notification; a new
    entry wakes it and is streamed."""
    log = FakeLog()
    logged(log, 2)
    async with serve(log) as served:
        await subscribe(served, after=0)
        await served.peer.expect(EntriesReceived)
        await served.peer.expect(CaughtUp)
        assert served.publisher.notify in log.commit_listeners
        seq = log.append(entry(1, 5000))  # the writer commits and notifies
        got = await served.peer.expect(EntriesReceived)
        assert [s for s, _ in got.entries] == [seq]


async def test_a_new_subscribe_restarts_the_stream_from_its_cursor():
    """Subscribing again on the same socket (after a resync, say) streams from the new
    cursor; the old stream stops."""
    log = FakeLog()
    logged(log, 4)
    async with serve(log) as served:
        await subscribe(served, after=3)
        await served.peer.expect(EntriesReceived)
        await served.peer.expect(CaughtUp)
        session = served.peer.session
        assert isinstance(session, SubscriberSession)
        # The peer's session lets a resubscribe only after resync_required: force READY.
        session.state = SubscriberState.READY
        session.subscribe(after_seq=1, origins=None, tables=None)
        await served.peer.flush()
        got = await served.peer.expect(EntriesReceived)
        assert [s for s, _ in got.entries] == [2, 3, 4]


async def test_full_copy_sends_rows_and_tombstones_then_streams():
    """A copy sends every table's rows, then its tombstones (NUL-suffixed name), ends
    at the snapshot it began at, and streams on from there."""
    log = FakeLog()
    log.add_table("dog", [stored_row(1, 10, k) for k in (1, 2, 3)],
                  tombs=[stored_row(3, 11, 9)])
    logged(log, 2)
    async with serve(log) as served:
        await subscribe(served, after=0, copy=True)
        began = await served.peer.expect(CopyBegan)
        assert (began.snapshot_seq, began.total, began.tables) == (2, 4, ["dog"])
        rows = await served.peer.expect(CopyRows)
        assert (rows.table, [k for k, _ in rows.rows]) == ("dog", [b"1", b"2", b"3"])
        tombs = await served.peer.expect(CopyRows)
        assert (tombs.table, [k for k, _ in tombs.rows]) == ("dog\x00", [b"9"])
        assert (await served.peer.expect(CopyEnded)).snapshot_seq == 2
        assert (await served.peer.expect(CaughtUp)).seq == 2
        assert served.host.positions == [(PEER, "data", 0, True)]
        # Origin 3 (node-c) was announced before the tombstone that uses it.
        session = served.peer.session
        assert isinstance(session, SubscriberSession)
        assert session.peer_origins[3] == "node-c"


async def test_a_copy_begins_with_the_floors_it_carries():
    """``copy_begin`` names, per origin, the version through which this node held its
    transactions, asked at the snapshot before any row is read: not the peer's own,
    nor an origin whose rows the copy withholds from every table it carries."""
    log = FakeLog()
    log.add_table("dog", [stored_row(1, 10, k) for k in (1, 2)])
    logged(log, 3)
    async with serve(log) as served:
        served.host.floors = {"node-a": 30, PEER: 20, "node-c": 10, "node-d": 5}
        session = await hello(served)
        session.subscribe(after_seq=0, origins=None, tables=None, copy=True,
                          origin_tables={"node-c": ["dog"], "node-d": ["cat"]})
        await served.peer.flush()
        began = await served.peer.expect(CopyBegan)
        assert began.floors == {"node-a": 30, "node-c": 10}
        assert served.host.floors_asked == [3]
        await served.peer.expect(CopyRows)
        await served.peer.expect(CopyEnded)


async def test_a_copy_resumed_past_a_restored_log_starts_over():
    """An interrupted copy resumes at its snapshot only if this log can have sent it:
    restored to 4 and written on to 9, a resume at snapshot 7 would stream on after 7
    and skip entries 5 to 7 for good, so the copy starts over at the head."""
    log = FakeLog()
    log.add_table("dog", [stored_row(1, 10, k) for k in (1, 2, 3)])
    logged(log, 9)
    log.opened = 4
    async with serve(log) as served:
        session = await hello(served)
        session.subscribe(after_seq=0, origins=None, tables=None, copy=True,
                          copy_resume={"table": "dog", "key": b"2", "snapshot": 7})
        await served.peer.flush()
        began = await served.peer.expect(CopyBegan)
        assert began.snapshot_seq == 9
        rows = await served.peer.expect(CopyRows)
        assert [k for k, _ in rows.rows] == [b"1", b"2", b"3"]
        assert (await served.peer.expect(CopyEnded)).snapshot_seq == 9


async def test_a_peer_removed_while_connected_is_sent_no_rows():
    """A subscribe that arrives after the peer's row was removed (``forget_node`` closes
    its sockets only after stopping links and reconciling; a ``remove`` request is the
    peer's own) gets no table: a missing row means nothing is published, not all."""
    log = FakeLog()
    log.add_table("dog", [stored_row(1, 10, k) for k in (1, 2)])
    logged(log, 2)
    async with serve(log) as served:
        await hello(served)
        served.host.rows.pop(PEER)
        await subscribe(served, after=0, copy=True)
        began = await served.peer.expect(CopyBegan)
        assert began.tables == [] and began.total == 0
        await served.peer.expect(CopyEnded)
        await served.peer.expect(CaughtUp)
        assert not [e for e in served.peer.events if isinstance(e, CopyRows | EntriesReceived)]


async def test_acks_reach_the_host():
    """An ack from the subscriber is reported once, with the publisher's acked_seq."""
    log = FakeLog()
    logged(log, 3)
    async with serve(log) as served:
        await subscribe(served, after=0)
        await served.peer.expect(CaughtUp)
        session = served.peer.session
        assert isinstance(session, SubscriberSession)
        session.ack(3)
        await served.peer.flush()
        await until(lambda: served.host.acks, message="the ack")
        assert served.host.acks == [(PEER, "data", 3)]
        assert served.publisher.acked_seq == 3


async def test_answers_a_peer_operation():
    """An operation the subscriber asks for runs on the host and its result returns."""
    log = FakeLog()
    async with serve(log) as served:
        session = await hello(served)
        session.request_operation({"operation": "ping"})
        await served.peer.flush()
        done = await served.peer.expect(OperationCompleted)
        assert done.result == {"ok": True} and done.error is None
        assert served.host.operations == [{"operation": "ping"}]


async def test_refuses_a_database_that_does_not_exist():
    """A socket for an unknown database is closed with 1008, naming it."""
    async with serve(None, "nope") as served:
        code, reason = await served.peer.closed()
        assert code == 1008 and reason is not None and "nope" in reason


async def test_closes_when_the_database_is_dropped():
    """A dropped database ends the stream with 1001."""
    log = FakeLog()
    logged(log, 1)
    async with serve(log) as served:
        await subscribe(served, after=0)
        await served.peer.expect(CaughtUp)
        log.dropped = True
        log.append(entry(1, 9000))
        code, _ = await served.peer.closed()
        assert code == 1001


async def test_a_malformed_frame_gets_a_protocol_error_frame_and_a_close() -> None:
    """A peer that sends a frame the session refuses is told why (an ``error`` frame with
    code ``protocol_error``) before the link closes. Before, the publisher raised as it
    handled the ProtocolFailed event, ahead of sending what the session had queued:
    the peer saw the socket close with no reason, and nothing was logged."""
    async with serve(FakeLog()) as served:
        await hello(served)
        await served.peer.link.send(b"C\xc1")  # not msgpack
        failed = await served.peer.expect(PeerFailed)
        assert failed.code == "protocol_error" and "undecodable" in failed.message
        await served.peer.closed()


async def test_a_commit_while_a_report_is_due_goes_out_from_the_commit_itself():
    """While a ``caught_up`` report is due, the pump waits parked and a commit writes its
    entries to the socket from the commit callback itself, before the event loop runs
    anything else (before, it woke the pump, and the frame left a task switch later).
    The report that follows covers what went out so, filtered entries included; commits
    made by another thread go the same way."""
    log = FakeLog()
    async with serve(log) as served:
        publisher = await two_sent(served, log)
        await until(lambda: publisher._report_timer is not None, message="a report due")
        sent = publisher.link.bytes_sent
        logged(log, 1)
        assert publisher.link.bytes_sent > sent  # on the socket already, no await between
        assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [3]
        logged(log, 1, origin_id=2)  # the peer's own: filtered out, still reported past
        await asyncio.get_running_loop().run_in_executor(
            None, log.append, entry(1, 1000 + log.next_seq, key=9))
        assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [5]
        assert (await served.peer.expect(CaughtUp)).seq == 5
        assert publisher.sent_seq == 5


async def test_commits_soon_after_a_batch_wait_and_go_out_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits within ``SEND_LINGER`` of the link's last batch are held and go out in one
    frame when it ends; the first commit after a quiet spell goes at once (the timer's
    batch counts as the last one: a commit right after it waits again)."""
    monkeypatch.setattr(publisher_module, "SEND_LINGER", 0.3)
    log = FakeLog()
    async with serve(log) as served:
        publisher = await two_sent(served, log)
        await until(lambda: publisher._parked, message="parked")
        publisher._sent_at = -1.0  # a quiet spell
        sent = publisher.link.bytes_sent
        logged(log, 1)
        assert publisher.link.bytes_sent > sent  # at once
        assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [3]
        sent = publisher.link.bytes_sent
        logged(log, 1)
        logged(log, 1)
        assert publisher.link.bytes_sent == sent  # held
        assert publisher._linger is not None
        assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [4, 5]
        logged(log, 1)
        assert publisher._linger is not None
        assert [s for s, _ in (await served.peer.expect(EntriesReceived)).entries] == [6]
        assert publisher.sent_seq == 6


async def test_frames_a_full_socket_did_not_take_go_out_first_and_in_order():
    """A commit callback whose frame the socket does not take at once (its write buffer
    is above the limit) leaves it to the pump, which sends it first once the socket
    drains: nothing is lost or reordered."""
    log = FakeLog()
    logged(log, 1)
    async with serve(log) as served:
        publisher = served.publisher
        await subscribe(served, after=0)
        await served.peer.expect(EntriesReceived)
        assert (await served.peer.expect(CaughtUp)).seq == 1
        logged(log, 1)
        await served.peer.expect(EntriesReceived)
        await until(lambda: publisher._report_timer is not None, message="a report due")
        # Every write now pauses the connection until the test's peer reads.
        publisher.link._conn.transport.set_write_buffer_limits(high=1, low=0)
        big = codec.pack([1, 1000 + log.next_seq, None,
                          [["dog", "upsert", {"id": 7, "blob": "x" * 3_000_000}]]])
        log.append(big)  # sent from the callback; the socket cannot take it all
        logged(log, 3)  # the socket is paused: these wait for the pump
        assert publisher._backlog  # what the callback could not write
        seqs: list[int] = []
        while len(seqs) < 4:
            seqs += [s for s, _ in (await served.peer.expect(EntriesReceived)).entries]
        assert seqs == [3, 4, 5, 6]
        assert (await served.peer.expect(CaughtUp)).seq == 6


async def test_a_socket_answered_and_not_subscribed_yet_counts_as_relaying():
    """Once its hello is answered, a socket may relay any origin: its peer knows from
    that answer which tables of each origin this node takes (``relay_tables``), and may
    subscribe to any of them next. ``Replicator.drop_relaying`` must close it too when
    those change; before, it skipped such a socket, which then relayed on with the
    old ``relay_tables``. A subscribed socket relays what it asked for."""
    async with serve(FakeLog()) as served:
        assert not served.publisher.may_relay("node-x"), "no hello answered yet"
        await hello(served)
        assert served.publisher.may_relay("node-x")
        session = served.peer.session
        assert isinstance(session, SubscriberSession)
        session.subscribe(after_seq=0, origins={PEER: None, "node-y": None}, tables=None)
        await served.peer.flush()
        await served.peer.expect(CaughtUp)
        assert served.publisher.may_relay("node-y")
        assert not served.publisher.may_relay("node-x")
