"""Replication frames: encoding and decoding of the bytes on the wire.

Every WebSocket message is binary and starts with a one-byte tag:

* ``b"C"`` + msgpack map with a ``"type"`` key: a control frame.
* ``b"D"`` + u64 BE ``head_seq`` + repeated (u64 BE ``seq``, u32 BE ``length``,
  ``length`` bytes of value): a batch of log entries. The values are the
  publisher's stored log bytes, forwarded without re-encoding, which is why the
  batch is a hand-rolled binary layout rather than msgpack.
* ``b"R"`` + msgpack ``[table_name, [[key, value], ...]]``: a chunk of a full copy.
* ``b"Z"`` + zstd-compressed ``D`` or ``R`` frame, when both sides agreed to it.

This module is pure: it imports only :mod:`harpsync.codec` and the standard library.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harpsync.codec import pack, unpack

TAG_CONTROL = b"C"
TAG_BATCH = b"D"
TAG_COPY = b"R"
# ``b"Z"`` + a zstd frame holding one whole frame of the kinds above, on links that
# negotiated compression in their hello (see protocol.py).
TAG_ZSTD = b"Z"

MAX_BATCH_BYTES = 64 * 1024
MAX_BATCH_ENTRIES = 1000
MAX_CHUNK_BYTES = 64 * 1024

_HEAD = struct.Struct(">Q")
_ENTRY = struct.Struct(">QI")
BATCH_HEADER_SIZE = 1 + _HEAD.size
BATCH_ENTRY_OVERHEAD = _ENTRY.size
# Upper bound of msgpack framing per copied row: array header plus two bin32 headers.
_ROW_OVERHEAD = 1 + 5 + 5
_U64_MAX = (1 << 64) - 1
# The most rows a copy chunk can hold: split_rows cuts at MAX_CHUNK_BYTES counting at
# least _ROW_OVERHEAD per row (a larger row goes alone). Decoding refuses more, so a
# faulty peer's frame of millions of empty rows (or entries, at MAX_BATCH_ENTRIES) is
# refused before it is unpacked on the event loop.
MAX_CHUNK_ROWS = MAX_CHUNK_BYTES // _ROW_OVERHEAD + 1


# --- control frame schemas ---------------------------------------------------
# Fields are checked here, at decoding, so the sessions can trust every field they
# read. Unknown extra fields are allowed so that a newer peer can add some.

_Check = Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_origin_ids(value: Any) -> bool:
    return isinstance(value, dict) and all(
        _is_int(key) and isinstance(name, str) for key, name in value.items()
    )


def _is_origin_versions(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and (version is None or _is_int(version))
        for name, version in value.items()
    )


def _is_origin_floors(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and _is_int(version) for name, version in value.items()
    )


def _is_origin_tables(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and _is_names(tables) for name, tables in value.items()
    )


def _is_copy_resume(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("table"), str)
        and isinstance(value.get("key"), bytes)
    )


def _optional(check: _Check) -> _Check:
    return lambda value: value is None or check(value)


CONTROL_SCHEMAS: dict[str, dict[str, _Check]] = {
    "hello": {
        "node": _is_str,
        "database": _is_str,
        "protocol": _is_int,
        "tables": _is_map,
        "origins": _is_origin_ids,
    },
    "subscribe": {
        "after_seq": _is_int,
        "origins": _optional(_is_origin_versions),
        "tables": _optional(_is_names),
        "copy": lambda value: isinstance(value, bool),
        "copy_resume": _optional(_is_copy_resume),
        "origin_tables": _optional(_is_origin_tables),
    },
    "origins": {"origins": _is_origin_ids},
    "ack": {"seq": _is_int},
    "caught_up": {"seq": _is_int},
    "copy_begin": {"snapshot_seq": _is_int, "total": _is_int, "tables": _is_names,
                   "schema": _optional(_is_map), "horizons": _optional(_is_map),
                   "floors": _optional(_is_origin_floors)},
    "copy_end": {"snapshot_seq": _is_int},
    "resync_required": {"oldest_seq": _is_int, "reason": _is_str},
    "error": {"code": _is_str, "message": _is_str},
    "operation": {"id": _is_int, "body": _is_map},
    "operation_result": {"id": _is_int, "error": _optional(_is_str)},
    "ping_status": {},
}
"""Per control type, the required fields and their checks (``None`` = missing)."""


class ProtocolError(Exception):
    """A frame is malformed, or is not allowed in the session's current state."""


@dataclass(frozen=True, slots=True)
class ControlFrame:
    """A control frame: its ``type`` and the remaining map entries."""

    type: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchFrame:
    """A batch of log entries as ``(seq, value)`` pairs, plus the publisher's head."""

    head_seq: int
    entries: list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class CopyChunkFrame:
    """Rows ``(key, value)`` of one table, in key order, from a full copy."""

    table: str
    rows: list[tuple[bytes, bytes]]


Frame = ControlFrame | BatchFrame | CopyChunkFrame


def encode_control(type_: str, **fields: Any) -> bytes:
    """Encode a control frame.

    Args:
        type_: the frame type, such as ``"hello"`` or ``"ack"``.
        **fields: the other map entries; must be msgpack-encodable.

    Returns:
        The frame bytes, starting with ``b"C"``.

    Raises:
        ValueError: if ``fields`` contains a ``type`` key.
    """
    if "type" in fields:
        raise ValueError("control fields must not contain 'type'")
    return TAG_CONTROL + pack({"type": type_, **fields})


def encode_batch(head_seq: int, entries: Sequence[tuple[int, bytes]]) -> bytes:
    """Encode a batch of log entries.

    Args:
        head_seq: the publisher's newest log sequence when the batch is sent.
        entries: ``(seq, value)`` pairs, in the order they should be applied.

    Returns:
        The frame bytes, starting with ``b"D"``.

    Raises:
        struct.error: if a sequence does not fit in u64 or a value in u32 length.
    """
    parts = [TAG_BATCH, _HEAD.pack(head_seq)]
    pack_entry = _ENTRY.pack
    for seq, value in entries:
        parts.append(pack_entry(seq, len(value)))
        parts.append(value)
    return b"".join(parts)


def encode_copy_chunk(table: str, rows: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Encode one chunk of a full copy.

    Args:
        table: the table the rows belong to.
        rows: ``(key, value)`` pairs in key order.

    Returns:
        The frame bytes, starting with ``b"R"``.
    """
    return TAG_COPY + pack([table, [[key, value] for key, value in rows]])


def decode_frame(data: bytes) -> Frame:
    """Decode one WebSocket message into a frame.

    Args:
        data: the whole binary message.

    Returns:
        A :class:`ControlFrame`, :class:`BatchFrame` or :class:`CopyChunkFrame`.

    Raises:
        ProtocolError: if the message is empty, has an unknown tag, is truncated,
            is not valid msgpack, or has the wrong shape.
    """
    if not data:
        raise ProtocolError("empty frame")
    tag = data[:1]
    if tag == TAG_BATCH:
        return _decode_batch(data)
    if tag == TAG_CONTROL:
        return _decode_control(data)
    if tag == TAG_COPY:
        return _decode_copy_chunk(data)
    raise ProtocolError(f"unknown frame tag {tag!r}")


def _unpack_body(data: bytes, max_array_len: int | None = None) -> Any:
    try:
        return unpack(memoryview(data)[1:], max_array_len)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"undecodable frame body: {exc}") from exc


def _decode_control(data: bytes) -> ControlFrame:
    body = _unpack_body(data)
    if not isinstance(body, dict):
        raise ProtocolError("control frame is not a map")
    type_ = body.pop("type", None)
    if not isinstance(type_, str):
        raise ProtocolError("control frame has no string 'type'")
    schema = CONTROL_SCHEMAS.get(type_)
    if schema is None:
        raise ProtocolError(f"unknown control frame type {type_!r}")
    for name, check in schema.items():
        if not check(body.get(name)):
            raise ProtocolError(f"{type_} frame has a missing or malformed {name!r}")
    return ControlFrame(type_, body)


def _decode_batch(data: bytes) -> BatchFrame:
    # Slices of the bytes themselves: each value is copied once, with no view between.
    view = data if isinstance(data, bytes) else bytes(data)
    size = len(view)
    if size < BATCH_HEADER_SIZE:
        raise ProtocolError("truncated batch header")
    (head_seq,) = _HEAD.unpack_from(view, 1)
    entries: list[tuple[int, bytes]] = []
    append = entries.append
    unpack_entry = _ENTRY.unpack_from
    entry_size = _ENTRY.size
    offset = BATCH_HEADER_SIZE
    while offset < size:
        if len(entries) == MAX_BATCH_ENTRIES:  # BatchBuilder never puts in more
            raise ProtocolError(f"batch has more than {MAX_BATCH_ENTRIES} entries")
        if offset + entry_size > size:
            raise ProtocolError("truncated batch entry header")
        seq, length = unpack_entry(view, offset)
        offset += entry_size
        end = offset + length
        if end > size:
            raise ProtocolError("batch entry overruns the frame")
        append((seq, view[offset:end]))
        offset = end
    return BatchFrame(head_seq, entries)


def _decode_copy_chunk(data: bytes) -> CopyChunkFrame:
    body = _unpack_body(data, MAX_CHUNK_ROWS)
    if not (isinstance(body, list) and len(body) == 2):
        raise ProtocolError("copy chunk is not [table, rows]")
    table, raw_rows = body
    if not isinstance(table, str) or not isinstance(raw_rows, list):
        raise ProtocolError("copy chunk has a bad table name or rows")
    if not raw_rows:  # split_rows never yields an empty chunk; a copy resumes after its last key
        raise ProtocolError("copy chunk has no rows")
    rows: list[tuple[bytes, bytes]] = []
    for row in raw_rows:
        if not (
            isinstance(row, list)
            and len(row) == 2
            and isinstance(row[0], bytes)
            and isinstance(row[1], bytes)
        ):
            raise ProtocolError("copy chunk row is not [key_bytes, value_bytes]")
        rows.append((row[0], row[1]))
    return CopyChunkFrame(table, rows)


class BatchBuilder:
    """Accumulates log entries and cuts them into batch frames.

    A batch is cut at about ``max_bytes`` of frame or ``max_entries`` entries,
    whichever comes first. Use :meth:`fits` before :meth:`add` to keep a batch
    under ``max_bytes``; an entry larger than ``max_bytes`` still goes alone in
    its own batch.
    """

    def __init__(
        self, max_bytes: int = MAX_BATCH_BYTES, max_entries: int = MAX_BATCH_ENTRIES
    ) -> None:
        if max_bytes <= 0 or max_entries <= 0:
            raise ValueError("max_bytes and max_entries must be positive")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._parts: list[bytes] = []
        self._count = 0
        self._size = BATCH_HEADER_SIZE

    def __len__(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        """The size in bytes of the frame :meth:`build` would return now."""
        return self._size

    @property
    def full(self) -> bool:
        """Whether the batch has reached its byte or entry limit."""
        return self._count >= self.max_entries or self._size >= self.max_bytes

    def fits(self, value: bytes) -> bool:
        """Whether ``value`` can join this batch without passing a limit.

        Args:
            value: the entry's value bytes.

        Returns:
            True when the batch is empty (a lone entry always fits) or when adding
            the entry keeps the batch within both limits.
        """
        if self._count == 0:
            return True
        new_size = self._size + BATCH_ENTRY_OVERHEAD + len(value)
        return self._count < self.max_entries and new_size <= self.max_bytes

    def add(self, seq: int, value: bytes) -> None:
        """Append one entry.

        Args:
            seq: the entry's log sequence (u64).
            value: the stored log value.

        Raises:
            ValueError: if ``seq`` does not fit in u64 or ``value`` in u32 length.
        """
        if not 0 <= seq <= _U64_MAX or len(value) > 0xFFFFFFFF:
            raise ValueError("sequence or value length out of range")
        self._parts.append(_ENTRY.pack(seq, len(value)))
        self._parts.append(value)
        self._count += 1
        self._size += BATCH_ENTRY_OVERHEAD + len(value)

    def build(self, head_seq: int) -> bytes:
        """Encode the accumulated entries as one batch frame and reset.

        Args:
            head_seq: the publisher's newest log sequence.

        Returns:
            The frame bytes.
        """
        frame = b"".join([TAG_BATCH, _HEAD.pack(head_seq), *self._parts])
        self.reset()
        return frame

    def reset(self) -> None:
        """Drop the accumulated entries."""
        self._parts = []
        self._count = 0
        self._size = BATCH_HEADER_SIZE


def split_rows(
    rows: Iterable[tuple[bytes, bytes]], max_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[list[tuple[bytes, bytes]]]:
    """Group copy rows into chunks whose encoded size stays near ``max_bytes``.

    Args:
        rows: ``(key, value)`` pairs in key order.
        max_bytes: the target chunk size; a larger row still gets its own chunk.

    Returns:
        An iterator of non-empty row lists, preserving order.
    """
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in rows:
        row_size = len(key) + len(value) + _ROW_OVERHEAD
        if chunk and size + row_size > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((key, value))
        size += row_size
    if chunk:
        yield chunk
