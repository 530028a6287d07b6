"""The only module that imports msgpack: encoding of records, log entries and frames."""

from __future__ import annotations

from typing import Any

import msgpack


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack bytes."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(data: bytes | memoryview, max_array_len: int | None = None) -> Any:
    """Decode msgpack bytes; maps may have integer keys.

    Args:
        data: the msgpack bytes.
        max_array_len: refuse (ValueError) any array longer than this, before
            decoding its items (None: bounded only by the size of ``data``).
    """
    if max_array_len is None:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    return msgpack.unpackb(data, raw=False, strict_map_key=False,
                           max_array_len=max_array_len)


def unpack_head(data: bytes | memoryview, count: int) -> list[Any]:
    """Decode only the first ``count`` items of a msgpack array (a log entry's origin and
    version), without decoding the rest."""
    if len(data) < 4096:  # a small entry decodes faster whole than through an Unpacker
        return list(unpack(data)[:count])
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    unpacker.read_array_header()
    return [unpacker.unpack() for _ in range(count)]


_UINT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def with_first_item(data: bytes, first: int) -> bytes | None:
    """``data`` (a msgpack array whose first item is a non-negative integer, as a log
    entry's origin id is) with that item replaced by ``first``, the rest of the bytes as
    they are; None if ``data`` is not shaped so."""
    if len(data) < 2 or not 0x91 <= data[0] <= 0x9F:
        return None
    old = data[1]
    at = 2 if old < 0x80 else 2 + _UINT_SIZES.get(old, -2)
    if at < 2 or at > len(data):
        return None
    return data[:1] + pack(first) + data[at:]


def entry_head(data: bytes) -> tuple[Any, Any]:
    """The first two items of a msgpack array (a log entry's origin id and version).

    Read straight from the bytes when the array is a fixarray and both items are
    non-negative integers (how log entries are packed); anything else goes through
    :func:`unpack_head`.
    """
    if len(data) > 2 and 0x92 <= data[0] <= 0x9F:
        first = data[1]
        if first < 0x80:  # positive fixint
            at = 2
        else:
            size = _UINT_SIZES.get(first)
            if size is None:
                head = unpack_head(data, 2)
                return head[0], head[1]
            at = 2 + size
            first = int.from_bytes(data[2:at], "big")
        if at < len(data):
            second = data[at]
            if second < 0x80:
                return first, second
            size = _UINT_SIZES.get(second)
            if size is not None and at + 1 + size <= len(data):
                return first, int.from_bytes(data[at + 1:at + 1 + size], "big")
    head = unpack_head(data, 2)
    return head[0], head[1]
