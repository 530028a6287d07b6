"""Tests for harpsync.replication.protocol: two sessions driven back to back in memory."""

from __future__ import annotations

import pytest

from harpsync.replication.messages import (
    BatchFrame,
    ControlFrame,
    CopyChunkFrame,
    Frame,
    decode_frame,
    encode_batch,
    encode_control,
    encode_copy_chunk,
)
from harpsync.replication.protocol import (
    AckReceived,
    CaughtUp,
    CopyBegan,
    CopyEnded,
    CopyRows,
    EntriesReceived,
    OperationCompleted,
    OperationRequested,
    OriginsAnnounced,
    PeerFailed,
    PeerHello,
    ProtocolFailed,
    PublisherSession,
    PublisherState,
    ResyncRequired,
    SubscribeRequested,
    SubscriberSession,
    SubscriberState,
    lag,
)

TABLES = {"dog": {"hash_attribute": "id"}}
NAMES = {1: "node-a", 2: "node-c"}


Session = SubscriberSession | PublisherSession


def pump(src: Session, dst: Session) -> list[Frame]:
    """Deliver every frame queued by ``src`` to ``dst``; return the decoded frames."""
    frames = src.data_to_send()
    for frame in frames:
        dst.receive(frame)
    return [decode_frame(frame) for frame in frames]


def handshake() -> tuple[SubscriberSession, PublisherSession]:
    """Return a subscriber and publisher that have exchanged hellos."""
    sub = SubscriberSession("node-b", "data", TABLES, {1: "node-b"})
    pub = PublisherSession("node-a")
    sub.start()
    pump(sub, pub)
    pub.accept("data", TABLES, {1: "node-a"})
    pump(pub, sub)
    sub.events_received()
    pub.events_received()
    return sub, pub


def subscribed(
    after_seq: int = 0, copy: bool = False
) -> tuple[SubscriberSession, PublisherSession]:
    """Return a linked pair whose subscriber has subscribed."""
    sub, pub = handshake()
    sub.subscribe(after_seq, {"node-a": None}, None, copy=copy)
    pump(sub, pub)
    pub.events_received()
    return sub, pub


def assert_failed(session: Session, state: object) -> None:
    """Check the session failed with a protocol_error frame queued and event emitted."""
    assert session.state is state
    frames = [decode_frame(f) for f in session.data_to_send()]
    assert frames and isinstance(frames[-1], ControlFrame)
    assert frames[-1].type == "error"
    assert frames[-1].fields["code"] == "protocol_error"
    assert any(isinstance(e, ProtocolFailed) for e in session.events_received())


def test_hello_exchange_reports_both_peers() -> None:
    """Each side reports the other's hello and the subscriber becomes READY."""
    sub = SubscriberSession("node-b", "data", TABLES, {1: "node-b"})
    pub = PublisherSession("node-a")
    sub.start()
    assert sub.state is SubscriberState.HELLO_SENT
    pump(sub, pub)
    assert pub.events_received() == [PeerHello("node-b", "data", 1, TABLES, {1: "node-b"})]
    assert pub.state is PublisherState.AWAIT_HELLO
    pub.accept("data", TABLES, {1: "node-a", 3: "node-c"})
    pump(pub, sub)
    assert pub.state is PublisherState.AWAIT_SUBSCRIBE
    assert sub.state is SubscriberState.READY
    assert sub.events_received() == [
        PeerHello("node-a", "data", 1, TABLES, {1: "node-a", 3: "node-c"})
    ]
    assert sub.peer_origins == {1: "node-a", 3: "node-c"}


def test_happy_path_streams_batches_and_acks() -> None:
    """After subscribing, batches arrive in order, counters advance and acks reach the publisher."""
    sub, pub = handshake()
    sub.subscribe(0, {"node-a": 5}, ["dog"])
    pump(sub, pub)
    assert pub.events_received() == [SubscribeRequested(0, {"node-a": 5}, ["dog"], False, None)]
    assert pub.state is PublisherState.STREAMING
    pub.send_entries(3, [(1, 1, b"one"), (2, 1, b"two"), (3, 1, b"three")], NAMES)
    pub.send_entries(4, [(4, 1, b"four")], NAMES)
    pub.send_caught_up(4)
    pump(pub, sub)
    assert sub.events_received() == [
        OriginsAnnounced({1: "node-a"}),
        EntriesReceived(3, [(1, b"one"), (2, b"two"), (3, b"three")]),
        EntriesReceived(4, [(4, b"four")]),
        CaughtUp(4),
    ]
    assert (sub.received_seq, sub.head_seq, sub.entries_received) == (4, 4, 4)
    assert sub.bytes_received > 0 and sub.bytes_received == pub.bytes_sent
    assert pub.sent_seq == 4 and pub.entries_sent == 4
    assert sub.ack(4)
    pump(sub, pub)
    assert pub.events_received() == [AckReceived(4)]
    assert pub.acked_seq == 4
    assert lag(sub.head_seq, sub.acked_seq) == 0


def test_origins_announced_once_per_id() -> None:
    """An origin id is announced before its first batch and never again in the session."""
    sub, pub = subscribed()
    pub.send_entries(2, [(1, 1, b"a"), (2, 2, b"b")], NAMES)
    pub.send_entries(4, [(3, 1, b"c"), (4, 2, b"d")], NAMES)
    pub.send_entries(5, [(5, 7, b"e")], {7: "node-z"})
    frames = pump(pub, sub)
    origin_frames = [f.fields["origins"] for f in frames if isinstance(f, ControlFrame)]
    assert origin_frames == [{1: "node-a", 2: "node-c"}, {7: "node-z"}]
    assert isinstance(frames[0], ControlFrame) and isinstance(frames[1], BatchFrame)
    assert sub.peer_origins == {1: "node-a", 2: "node-c", 7: "node-z"}


def test_send_entries_requires_origin_names() -> None:
    """An entry whose origin id has no name is refused before anything is queued."""
    _, pub = subscribed()
    with pytest.raises(ValueError):
        pub.send_entries(1, [(1, 9, b"x")], NAMES)
    assert pub.data_to_send() == []


def test_batches_cut_at_1000_entries() -> None:
    """2,500 small entries travel in batches of 1000, 1000 and 500."""
    sub, pub = subscribed()
    pub.send_entries(2500, [(seq, 1, b"v") for seq in range(1, 2501)], NAMES)
    batches = [f for f in pump(pub, sub) if isinstance(f, BatchFrame)]
    assert [len(b.entries) for b in batches] == [1000, 1000, 500]
    assert sub.received_seq == 2500
    assert sub.state is SubscriberState.SUBSCRIBED


def test_batches_cut_at_64_kib() -> None:
    """Entries of 10 KiB are cut so that no batch passes 64 KiB, oversized ones go alone."""
    sub, pub = subscribed()
    entries = [(seq, 1, bytes(10 * 1024)) for seq in range(1, 21)]
    entries.append((21, 1, bytes(100 * 1024)))
    pub.send_entries(21, entries, NAMES)
    raw = [f for f in pub.data_to_send() if f[:1] == b"D"]
    for frame in raw:
        sub.receive(frame)
    sizes = [len(decode_frame(f).entries) for f in raw]  # type: ignore[union-attr]
    assert sizes == [6, 6, 6, 2, 1]
    assert all(len(f) <= 64 * 1024 for f in raw[:-1])
    assert sub.received_seq == 21


def test_copy_flow_sets_received_seq_to_snapshot() -> None:
    """A copy is framed by begin/end, rows come in chunks, then streaming resumes after it."""
    sub, pub = subscribed(copy=True)
    rows = [(f"{i:05}".encode(), bytes(1000)) for i in range(200)]
    pub.begin_copy(50, len(rows), ["dog"])
    with pytest.raises(RuntimeError):
        pub.send_entries(51, [(51, 1, b"x")], NAMES)
    pub.send_copy_rows("dog", rows)
    pub.end_copy(50)
    pub.send_entries(51, [(51, 1, b"x")], NAMES)
    frames = pump(pub, sub)
    assert sum(isinstance(f, CopyChunkFrame) for f in frames) > 1
    events = sub.events_received()
    assert events[0] == CopyBegan(50, 200, ["dog"])
    copied = [row for e in events if isinstance(e, CopyRows) for row in e.rows]
    assert copied == rows
    assert CopyEnded(50) in events
    assert events[-1] == EntriesReceived(51, [(51, b"x")])
    assert sub.state is SubscriberState.SUBSCRIBED
    assert sub.received_seq == 51


def test_state_is_copying_between_begin_and_end() -> None:
    """The subscriber is COPYING during a copy and rejects data batches there."""
    sub, pub = subscribed(copy=True)
    pub.begin_copy(10, 0, [])
    pump(pub, sub)
    assert sub.state is SubscriberState.COPYING
    sub.receive(encode_batch(11, [(11, b"x")]))
    assert_failed(sub, SubscriberState.FAILED)


def test_resync_required_then_resubscribe_with_copy() -> None:
    """After resync_required the subscriber is READY again and can subscribe with a copy."""
    sub, pub = subscribed(after_seq=3)
    pub.send_resync_required(100, "cursor behind retention")
    pump(pub, sub)
    assert sub.events_received() == [ResyncRequired(100, "cursor behind retention")]
    assert sub.state is SubscriberState.READY
    assert pub.state is PublisherState.AWAIT_SUBSCRIBE
    with pytest.raises(RuntimeError):
        pub.send_entries(101, [(101, 1, b"x")], NAMES)
    resume = {"table": "dog", "key": b"k"}
    sub.subscribe(0, None, None, copy=True, copy_resume=resume)
    pump(sub, pub)
    assert pub.events_received() == [SubscribeRequested(0, None, None, True, resume)]
    pub.begin_copy(120, 1, ["dog"])
    pub.send_copy_rows("dog", [(b"k1", b"v")])
    pub.end_copy(120)
    pub.send_entries(121, [(121, 1, b"x")], NAMES)
    pump(pub, sub)
    assert sub.events_received()[-1] == EntriesReceived(121, [(121, b"x")])
    assert sub.received_seq == 121


def test_publisher_resubscribe_resets_sent_seq() -> None:
    """A re-subscribe on a streaming publisher restarts from the new after_seq."""
    sub, pub = subscribed()
    pub.send_entries(5, [(5, 1, b"x")], NAMES)
    pub.data_to_send()
    pub.receive(encode_control("subscribe", after_seq=2, origins=None, tables=None, copy=False))
    assert pub.state is PublisherState.STREAMING
    assert pub.sent_seq == 2
    pub.send_entries(5, [(3, 1, b"y")], NAMES)


def test_batch_before_subscribe_fails() -> None:
    """A data batch before subscribing is a protocol violation."""
    sub, _ = handshake()
    sub.receive(encode_batch(1, [(1, b"x")]))
    assert_failed(sub, SubscriberState.FAILED)


def test_out_of_order_batch_fails() -> None:
    """A batch whose sequences do not increase past the last received fails the session."""
    sub, pub = subscribed()
    pub.send_entries(5, [(5, 1, b"x")], NAMES)
    pump(pub, sub)
    sub.receive(encode_batch(5, [(5, b"x")]))
    assert_failed(sub, SubscriberState.FAILED)


def test_entry_at_or_below_a_caught_up_report_fails() -> None:
    """After ``caught_up(seq)`` (the publisher read its log through seq) an entry at or
    below seq fails the session. Before, it was applied after the cursor had moved past
    it, and the cursor committed with it went back."""
    sub, pub = subscribed()
    pub.send_entries(5, [(5, 1, b"x")], NAMES)
    pub.send_caught_up(9)
    pump(pub, sub)
    sub.events_received()
    sub.receive(encode_batch(9, [(7, b"y")]))
    assert_failed(sub, SubscriberState.FAILED)


def test_unsorted_entries_in_one_batch_fail() -> None:
    """Sequences must be strictly increasing inside a single batch."""
    sub, _ = subscribed()
    sub.receive(encode_batch(3, [(2, b"a"), (1, b"b")]))
    assert_failed(sub, SubscriberState.FAILED)


def test_garbage_bytes_fail_both_sides() -> None:
    """Undecodable input fails a subscriber and a publisher alike."""
    sub, pub = subscribed()
    sub.receive(b"\x00garbage")
    assert_failed(sub, SubscriberState.FAILED)
    pub.receive(b"C\xc1\xc1")
    assert_failed(pub, PublisherState.FAILED)


def test_wrong_database_in_hello_fails() -> None:
    """A publisher hello for another database fails the subscriber."""
    sub = SubscriberSession("node-b", "data", TABLES, {})
    pub = PublisherSession("node-a")
    sub.start()
    pump(sub, pub)
    pub.accept("other", TABLES, {})
    pump(pub, sub)
    assert_failed(sub, SubscriberState.FAILED)


def test_wrong_protocol_version_fails_publisher() -> None:
    """A hello with an unsupported protocol version fails the publisher."""
    pub = PublisherSession("node-a")
    pub.receive(
        encode_control("hello", node="n", database="data", protocol=2, tables={}, origins={})
    )
    assert_failed(pub, PublisherState.FAILED)


def test_unknown_control_type_fails() -> None:
    """An unknown control frame type is a protocol violation."""
    sub, pub = subscribed()
    sub.receive(encode_control("frobnicate"))
    assert_failed(sub, SubscriberState.FAILED)
    pub.receive(encode_control("caught_up", seq=1))
    assert_failed(pub, PublisherState.FAILED)


def test_subscribe_before_accept_fails_publisher() -> None:
    """A subscribe before the publisher accepted the hello fails the session."""
    pub = PublisherSession("node-a")
    pub.receive(encode_control("subscribe", after_seq=0, origins=None, tables=None, copy=False))
    assert_failed(pub, PublisherState.FAILED)


def test_input_after_failure_is_ignored() -> None:
    """Once failed, further frames produce no events and no frames."""
    sub, pub = subscribed()
    sub.receive(b"")
    sub.events_received()
    sub.data_to_send()
    pub.send_entries(1, [(1, 1, b"x")], NAMES)
    pump(pub, sub)
    assert sub.events_received() == [] and sub.data_to_send() == []


def test_peer_error_frame_reports_peer_failed() -> None:
    """An error frame from the peer yields PeerFailed and fails the session without replying."""
    sub = SubscriberSession("node-b", "data", TABLES, {})
    pub = PublisherSession("node-a")
    sub.start()
    pump(sub, pub)
    pub.reject("unauthorized", "node-b is not allowed")
    assert pub.state is PublisherState.FAILED
    pump(pub, sub)
    assert sub.events_received() == [PeerFailed("unauthorized", "node-b is not allowed")]
    assert sub.state is SubscriberState.FAILED
    assert sub.data_to_send() == []


def test_operation_round_trip_both_directions() -> None:
    """An operation requested by either side is answered with the same id."""
    sub, pub = handshake()
    op_id = sub.request_operation({"operation": "add_node_back", "hostname": "b"})
    pump(sub, pub)
    assert pub.events_received() == [
        OperationRequested(op_id, {"operation": "add_node_back", "hostname": "b"})
    ]
    pub.respond_operation(op_id, result={"message": "ok"})
    pump(pub, sub)
    assert sub.events_received() == [OperationCompleted(op_id, {"message": "ok"}, None)]
    back = pub.request_operation({"operation": "cluster_network"})
    pump(pub, sub)
    assert sub.events_received() == [OperationRequested(back, {"operation": "cluster_network"})]
    sub.respond_operation(back, error="not supported")
    pump(sub, pub)
    assert pub.events_received() == [OperationCompleted(back, None, "not supported")]


def test_operation_result_for_unknown_id_fails() -> None:
    """A result for an operation never requested is a protocol violation."""
    sub, _ = handshake()
    sub.receive(encode_control("operation_result", id=42, result=None, error=None))
    assert_failed(sub, SubscriberState.FAILED)


def test_operation_before_hello_exchange_is_refused() -> None:
    """Operations cannot be requested before the hellos are exchanged."""
    with pytest.raises(RuntimeError):
        SubscriberSession("b", "data", {}, {}).request_operation({"operation": "x"})
    with pytest.raises(RuntimeError):
        PublisherSession("a").request_operation({"operation": "x"})


def test_subscriber_acks_are_monotonic() -> None:
    """The subscriber queues an ack only when the sequence moves past the last one."""
    sub, pub = subscribed()
    assert sub.ack(5)
    assert not sub.ack(5)
    assert not sub.ack(3)
    assert sub.ack(7)
    frames = pump(sub, pub)
    assert [f.fields["seq"] for f in frames if isinstance(f, ControlFrame)] == [5, 7]
    assert sub.acked_seq == 7


def test_publisher_ignores_stale_acks() -> None:
    """The publisher reports an ack only when it moves acked_seq forward."""
    _, pub = subscribed()
    for seq in (4, 2, 4, 9):
        pub.receive(encode_control("ack", seq=seq))
    assert pub.events_received() == [AckReceived(4), AckReceived(9)]
    assert pub.acked_seq == 9


def test_ack_outside_subscription_is_not_sent() -> None:
    """ack() is a no-op before subscribing."""
    sub, _ = handshake()
    assert not sub.ack(1)
    assert sub.data_to_send() == []


def test_subscribe_outside_ready_raises() -> None:
    """subscribe() is only allowed in READY."""
    sub = SubscriberSession("b", "data", {}, {})
    with pytest.raises(RuntimeError):
        sub.subscribe(0, None, None)
    sub, _ = subscribed()
    with pytest.raises(RuntimeError):
        sub.subscribe(0, None, None)


def test_publisher_rejects_data_frames() -> None:
    """A publisher never accepts batches or copy chunks from its subscriber."""
    _, pub = subscribed()
    pub.receive(encode_copy_chunk("dog", []))
    assert_failed(pub, PublisherState.FAILED)


def test_close_stops_processing() -> None:
    """A closed session ignores input."""
    sub, pub = subscribed()
    sub.close()
    pub.send_entries(1, [(1, 1, b"x")], NAMES)
    pump(pub, sub)
    assert sub.state is SubscriberState.CLOSED
    assert sub.events_received() == []


def test_lag_is_never_negative() -> None:
    """lag() is head minus applied, floored at zero."""
    assert lag(10, 4) == 6
    assert lag(4, 10) == 0


def test_copy_begin_raises_the_reported_head() -> None:
    """The snapshot a copy begins at is the publisher's head as far as the subscriber
    knows (its lag counts from there)."""
    sub, pub = subscribed(copy=True)
    pub.begin_copy(40, 0, [])
    pump(pub, sub)
    assert sub.head_seq == 40


def test_copy_begin_carries_the_floors_and_an_older_one_none() -> None:
    """``floors`` is an optional field of ``copy_begin``: sent when there are any,
    absent otherwise (an earlier release's), and refused when malformed."""
    sub, pub = subscribed(copy=True)
    pub.begin_copy(40, 0, [], floors={"node-a": 7, "node-c": 3})
    pump(pub, sub)
    assert [e.floors for e in sub.events_received() if isinstance(e, CopyBegan)] == [
        {"node-a": 7, "node-c": 3}]
    sub, pub = subscribed(copy=True)
    pub.begin_copy(40, 0, [])
    pump(pub, sub)
    assert [e.floors for e in sub.events_received() if isinstance(e, CopyBegan)] == [None]
    sub, _ = subscribed(copy=True)
    sub.receive(encode_control("copy_begin", snapshot_seq=40, total=0, tables=[],
                               floors={"node-a": "7"}))
    assert_failed(sub, SubscriberState.FAILED)


def test_a_session_continues_the_positions_of_the_one_before() -> None:
    """A link's new session reports the head and received sequence of its last one
    until it subscribes (status reads them from the session); bytes start at zero."""
    old, pub = subscribed(after_seq=3)
    pub.send_entries(9, [(4, 1, b"x")], NAMES)
    pump(pub, old)
    new = SubscriberSession("node-b", "data", TABLES, {1: "node-b"}, previous=old)
    assert (new.head_seq, new.received_seq, new.bytes_received) == (9, 4, 0)


def test_publisher_last_entry_seq_moves_only_with_entries() -> None:
    """``last_entry_seq`` is the newest entry sent: a re-subscribe or a copy leaves it."""
    sub, pub = subscribed()
    pub.send_entries(5, [(5, 1, b"x")], NAMES)
    pub.receive(encode_control("subscribe", after_seq=2, origins=None, tables=None, copy=True))
    pub.begin_copy(30, 0, [])
    pub.end_copy(30)
    assert (pub.sent_seq, pub.last_entry_seq) == (30, 5)
