"""Order-preserving encoding of primary keys and log sequences as LMDB keys."""

from __future__ import annotations

import struct

from harpsync import codec
from harpsync.errors import BadRequestError

_U64 = struct.Struct(">Q")
_INT_BIAS = 1 << 63
MAX_KEY_BYTES = 500

Id = int | float | str


def seq_key(seq: int) -> bytes:
    """A log sequence as a big-endian uint64 key."""
    return _U64.pack(seq)


def seq_of(key: bytes | memoryview) -> int:
    """The log sequence held in a ``seq_key``."""
    seq: int = _U64.unpack(key)[0]
    return seq


def encode_id(value: object) -> bytes:
    """Encode a primary key so that LMDB's byte order sorts integers numerically.

    Raises:
        BadRequestError: the value is not a string or number, or is too long.
    """
    if isinstance(value, bool) or value is None:
        raise BadRequestError(f"primary key value {value!r} must be a string or a number")
    if isinstance(value, int):
        if -_INT_BIAS <= value < _INT_BIAS:
            return b"i" + _U64.pack(value + _INT_BIAS)
        if _INT_BIAS <= value < 1 << 64:
            return b"m" + codec.pack(value)
        raise BadRequestError("primary key value must be an integer that fits in 64 bits")
    if isinstance(value, float):
        if value.is_integer() and -_INT_BIAS <= value < _INT_BIAS:
            return b"i" + _U64.pack(int(value) + _INT_BIAS)
        return b"f" + codec.pack(value)
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) > MAX_KEY_BYTES:
            raise BadRequestError(f"primary key value is longer than {MAX_KEY_BYTES} bytes")
        return b"s" + raw
    raise BadRequestError("primary key value must be a string or a number")


def decode_id(key: bytes) -> Id:
    """Invert ``encode_id``."""
    tag, body = key[:1], key[1:]
    if tag == b"i":
        biased: int = _U64.unpack(body)[0]
        return biased - _INT_BIAS
    if tag == b"s":
        return body.decode()
    value: Id = codec.unpack(body)
    return value
