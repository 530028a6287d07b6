"""Tests for harpsync.replication.messages: frame encoding, decoding and batching."""

from __future__ import annotations

import struct

import pytest

from harpsync.codec import entry_head, pack, unpack, unpack_head, with_first_item
from harpsync.replication.messages import (
    BATCH_ENTRY_OVERHEAD,
    BATCH_HEADER_SIZE,
    MAX_BATCH_ENTRIES,
    MAX_CHUNK_ROWS,
    BatchBuilder,
    BatchFrame,
    ControlFrame,
    CopyChunkFrame,
    ProtocolError,
    decode_frame,
    encode_batch,
    encode_control,
    encode_copy_chunk,
    split_rows,
)


def test_control_round_trip_keeps_int_keys_and_bytes() -> None:
    """A control frame decodes to its type and fields, keeping integer map keys and bytes."""
    data = encode_control(
        "subscribe",
        after_seq=7,
        origins={"a": 3, "b": None},
        tables=["dog"],
        copy=True,
        copy_resume={"table": "dog", "key": b"\x00k"},
    )
    frame = decode_frame(data)
    assert data[:1] == b"C"
    assert frame == ControlFrame(
        "subscribe",
        {
            "after_seq": 7,
            "origins": {"a": 3, "b": None},
            "tables": ["dog"],
            "copy": True,
            "copy_resume": {"table": "dog", "key": b"\x00k"},
        },
    )
    hello = decode_frame(
        encode_control("hello", node="n", database="d", protocol=1, tables={}, origins={2: "x"})
    )
    assert isinstance(hello, ControlFrame)
    assert hello.fields["origins"] == {2: "x"}


def test_encode_control_rejects_type_field() -> None:
    """Passing a 'type' keyword among the fields is refused."""
    with pytest.raises(ValueError):
        encode_control("ack", **{"type": "x", "seq": 1})


def test_batch_round_trip() -> None:
    """A batch decodes to its head sequence and (seq, bytes) entries in order."""
    entries = [(1, b"a"), (2, b""), (300, b"x" * 1000)]
    frame = decode_frame(encode_batch(500, entries))
    assert frame == BatchFrame(500, entries)
    assert isinstance(frame, BatchFrame)
    assert all(type(value) is bytes for _, value in frame.entries)


def test_empty_batch_round_trip() -> None:
    """A batch without entries carries only the head sequence."""
    assert decode_frame(encode_batch(9, [])) == BatchFrame(9, [])


def test_copy_chunk_round_trip() -> None:
    """A copy chunk decodes to its table name and (key, value) rows."""
    rows = [(b"k1", b"v1"), (b"k2", b"v2")]
    data = encode_copy_chunk("dog", rows)
    assert data[:1] == b"R"
    assert decode_frame(data) == CopyChunkFrame("dog", rows)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Z123",
        b"D\x00\x00",
        b"D" + struct.pack(">Q", 1) + b"\x00\x00\x00",
        b"D" + struct.pack(">QQI", 1, 2, 10) + b"short",
        b"C\xc1",
        b"C" + pack([1, 2]),
        b"C" + pack({"seq": 1}),
        b"C" + pack({"type": 5}),
        b"C" + pack({"type": "bogus"}),
        b"C" + pack({"type": "ack"}),
        b"C" + pack({"type": "ack", "seq": True}),
        b"C" + pack({"type": "ack", "seq": -1}),
        b"C" + pack({"type": "subscribe", "after_seq": 0, "copy": "yes"}),
        b"C" + pack({"type": "hello", "node": "n", "database": "d", "protocol": 1}),
        b"R" + pack(["dog"]),
        b"R" + pack([1, []]),
        b"R" + pack(["dog", [["k"]]]),
        b"R" + pack(["dog", [["k", b"v"]]]),
        b"R\xff\xff",
    ],
)
def test_decode_rejects_malformed_frames(data: bytes) -> None:
    """Empty, unknown-tag, truncated, undecodable or ill-shaped frames raise ProtocolError."""
    with pytest.raises(ProtocolError):
        decode_frame(data)


def test_decode_rejects_a_copy_chunk_without_rows() -> None:
    """A copy chunk with no rows is a protocol error: no publisher sends one, and the
    applier took its resume key from the last row, so such a frame from a faulty peer
    failed the link with an IndexError ('list index out of range') on every retry."""
    with pytest.raises(ProtocolError, match="no rows"):
        decode_frame(encode_copy_chunk("dog", []))


def test_decode_refuses_more_entries_or_rows_than_a_publisher_sends() -> None:
    """A batch of more than MAX_BATCH_ENTRIES entries, or a copy chunk of more than
    MAX_CHUNK_ROWS rows, is a protocol error: a peer's frame of millions of empty
    entries (12 bytes each, up to MAX_FRAME) was decoded whole on the event loop,
    seconds and gigabytes for one frame."""
    full = [(seq, b"") for seq in range(1, MAX_BATCH_ENTRIES + 1)]
    assert len(decode_frame(encode_batch(1, full)).entries) == MAX_BATCH_ENTRIES
    with pytest.raises(ProtocolError, match="entries"):
        decode_frame(encode_batch(1, [*full, (MAX_BATCH_ENTRIES + 1, b"")]))
    chunks = list(split_rows((b"k%d" % i, b"") for i in range(4 * MAX_CHUNK_ROWS)))
    assert max(len(chunk) for chunk in chunks) <= MAX_CHUNK_ROWS
    rows = [(b"", b"")] * MAX_CHUNK_ROWS
    assert len(decode_frame(encode_copy_chunk("t", rows)).rows) == MAX_CHUNK_ROWS
    with pytest.raises(ProtocolError):
        decode_frame(encode_copy_chunk("t", [*rows, (b"", b"")]))


def test_control_frame_allows_unknown_extra_fields() -> None:
    """Fields a schema does not name pass through, so newer peers can add some."""
    frame = decode_frame(encode_control("ack", seq=3, extra="x"))
    assert frame == ControlFrame("ack", {"seq": 3, "extra": "x"})


def test_batch_builder_is_full_at_max_entries() -> None:
    """The builder reports full once it holds max_entries entries."""
    builder = BatchBuilder()
    for seq in range(1, 1000):
        builder.add(seq, b"v")
        assert not builder.full
    builder.add(1000, b"v")
    assert builder.full
    assert len(builder) == 1000
    assert not builder.fits(b"v")


def test_batch_builder_fits_respects_max_bytes() -> None:
    """An entry that would push the frame past max_bytes does not fit a non-empty batch."""
    builder = BatchBuilder(max_bytes=100)
    builder.add(1, b"x" * 40)
    assert builder.size == BATCH_HEADER_SIZE + BATCH_ENTRY_OVERHEAD + 40
    assert builder.fits(b"x" * (100 - builder.size - BATCH_ENTRY_OVERHEAD))
    assert not builder.fits(b"x" * (101 - builder.size - BATCH_ENTRY_OVERHEAD))


def test_batch_builder_takes_oversized_entry_alone() -> None:
    """An entry larger than max_bytes fits an empty batch and then makes it full."""
    builder = BatchBuilder(max_bytes=100)
    assert builder.fits(b"x" * 500)
    builder.add(1, b"x" * 500)
    assert builder.full
    assert decode_frame(builder.build(1)) == BatchFrame(1, [(1, b"x" * 500)])


def test_batch_builder_build_matches_encoder_and_resets() -> None:
    """build() returns the same bytes as encode_batch and empties the builder."""
    builder = BatchBuilder()
    builder.add(1, b"a")
    builder.add(2, b"bc")
    assert builder.build(5) == encode_batch(5, [(1, b"a"), (2, b"bc")])
    assert len(builder) == 0
    assert builder.size == BATCH_HEADER_SIZE
    assert not builder.full


def test_batch_builder_rejects_out_of_range_sequence() -> None:
    """A negative sequence cannot be encoded as u64 and is refused."""
    with pytest.raises(ValueError):
        BatchBuilder().add(-1, b"")


def test_split_rows_keeps_order_and_bounds_chunks() -> None:
    """Rows are grouped in order into chunks whose encoded size stays within the limit."""
    rows = [(f"k{i:04}".encode(), b"v" * 100) for i in range(2000)]
    chunks = list(split_rows(rows, max_bytes=4096))
    assert len(chunks) > 1
    assert [row for chunk in chunks for row in chunk] == rows
    assert all(len(encode_copy_chunk("t", chunk)) <= 4096 for chunk in chunks)


def test_split_rows_gives_oversized_row_its_own_chunk() -> None:
    """A row larger than the limit goes alone in its own chunk."""
    rows = [(b"a", b"1"), (b"b", b"x" * 10_000), (b"c", b"3")]
    assert list(split_rows(rows, max_bytes=1000)) == [[rows[0]], [rows[1]], [rows[2]]]


@pytest.mark.parametrize("origin", [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32, 2**63])
@pytest.mark.parametrize("version", [0, 127, 128, 2**16, 2**40, 2**64 - 1])
def test_entry_head_reads_origin_and_version_from_the_bytes(origin: int, version: int) -> None:
    """A publisher filters log entries by their head read straight from the bytes: it
    agrees with decoding for every integer width msgpack uses."""
    for rest in ([None, []], ["admin", [["dog", "insert", 1, {"id": 1, "name": "x"}]]]):
        raw = pack([origin, version, *rest])
        assert entry_head(raw) == tuple(unpack_head(raw, 2)) == (origin, version)


def test_entry_head_falls_back_to_decoding_other_shapes() -> None:
    """Anything but a fixarray of two non-negative integers first is decoded."""
    for value in ([-1, 5, None, []], [1, -5, None, []], ["x", 1, None, []], [1, 2],
                  list(range(20)), [1, "v" * 5000, None, []]):
        raw = pack(value)
        assert entry_head(raw) == tuple(unpack_head(raw, 2)) == tuple(value[:2])


@pytest.mark.parametrize("old", [0, 5, 127, 128, 255, 256, 65_536, 2**32])
@pytest.mark.parametrize("new", [0, 1, 127, 128, 70_000])
def test_with_first_item_swaps_the_origin_id_and_keeps_the_rest(old: int, new: int) -> None:
    """A peer's entry applied whole is logged as received with the local origin id in
    front: the same as packing it again."""
    rest = [2**40 + 7, "admin", [["dog", "upsert", 1, {"id": 1, "n": "x" * 300}, 9]]]
    assert with_first_item(pack([old, *rest]), new) == pack([new, *rest])
    assert unpack(with_first_item(pack([old, *rest]), new) or b"") == [new, *rest]


def test_with_first_item_leaves_other_shapes_alone() -> None:
    for value in ([-1, 2, None, []], ["x", 1], list(range(20)), []):
        assert with_first_item(pack(value), 1) is None
