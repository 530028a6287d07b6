"""The only module that imports msgpack: encoding of records, log entries and frames."""

from __future__ import annotations

from typing import Any

import msgpack


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack bytes."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes | memoryview) -> Any:
    """Decode msgpack bytes; maps may have integer keys."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
