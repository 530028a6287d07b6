"""The only module that imports msgpack: encoding of records, log entries and frames."""

from __future__ import annotations

from typing import Any

import msgpack


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack bytes."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(data: bytes | memoryview) -> Any:
    """Decode msgpack bytes; maps may have integer keys."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def unpack_head(data: bytes | memoryview, count: int) -> list[Any]:
    """Decode only the first ``count`` items of a msgpack array (a log entry's origin and
    version), without decoding the rest."""
    if len(data) < 4096:  # a small entry decodes faster whole than through an Unpacker
        return list(unpack(data)[:count])
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    unpacker.read_array_header()
    return [unpacker.unpack() for _ in range(count)]
