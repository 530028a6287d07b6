"""Row digests and bucket boundaries: the hash layout itself, without storage.

Every node computes the same values from the same rows: ``row_digest`` for a stored row
(the layout is ``FORMAT``), ``is_boundary`` for where a bucket starts, and XOR to combine
digests into bucket, range and top hashes (``storage/DESIGN.md``, "Table hashes").
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import Any

import xxhash

LEAF_BITS = 5
GROUP_BITS = 12
DIGEST_SIZE = 8
ZERO = bytes(DIGEST_SIZE)
# The row-digest layout (stored under the hash DBI's mark); hashes of another layout are
# rebuilt when the table opens, and peers compare only equal layouts.
FORMAT = 4
LEAF_MASK = (1 << LEAF_BITS) - 1
GROUP_MASK = (1 << GROUP_BITS) - 1
FLAG = (b"\0", b"\1")
# XXH3-64 of bytes with a seed, as an integer (one C call per row; most of a row's cost
# is the call, so 64 bits, not 128: no second half to build and XOR).
XXH_INT = xxhash.xxh3_64_intdigest
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# An origin name's UTF-8 bytes and the NUL after them, by name.
_NAMES: dict[str, bytes] = {}
Bucket = tuple[bytes, bytes]  # (start key, b"" for the head; hash)


def is_boundary(key: bytes) -> bool:
    """Whether ``key`` starts a bucket (the same answer on every node)."""
    return zlib.crc32(key) & LEAF_MASK == 0


def is_group_boundary(key: bytes) -> bool:
    """Whether ``key`` starts a group of buckets (about one boundary in 128)."""
    return zlib.crc32(key) & GROUP_MASK == 0


def _uint(raw: bytes, pos: int) -> tuple[int, int]:
    # A non-negative msgpack integer at ``pos``: (value, position after it).
    tag = raw[pos]
    if tag < 0x80:
        return tag, pos + 1
    if tag == 0xCF:
        return _U64.unpack_from(raw, pos + 1)[0], pos + 9
    if tag == 0xCE:
        return _U32.unpack_from(raw, pos + 1)[0], pos + 5
    if tag == 0xCD:
        return _U16.unpack_from(raw, pos + 1)[0], pos + 3
    if tag == 0xCC:
        return raw[pos + 1], pos + 2
    raise ValueError(f"stored row does not start with a version and origin (0x{tag:02x})")


def row_digest(key: bytes, raw: bytes, deleted: bool, origin_names: Mapping[int, str],
               last: list[Any] | None = None) -> bytes:
    """The digest of a stored ``[version, origin, record]``; equal on every node that
    holds the same row.

    XXH3-64 of the record's msgpack bytes as stored followed by the key, seeded with
    ``row_seed`` of the version, the origin *name* and the deleted flag; 8 bytes,
    big-endian. The record is self-delimiting, so the key needs no length. The seed is
    the same for rows written together (one version and origin): ``last`` keeps the
    previous row's across calls with one origin map.
    """
    return row_digest_int(key, raw, deleted, origin_names, last).to_bytes(DIGEST_SIZE, "big")


def row_digest_int(key: bytes, raw: bytes, deleted: bool, origin_names: Mapping[int, str],
                   last: list[Any] | None = None) -> int:
    """``row_digest`` as an integer."""
    if raw[1] == 0xCF and raw[10] < 0x80:  # the usual head: a uint64 version, origin < 128
        if last is None:
            seed = row_seed(raw[2:10], origin_names.get(raw[10], ""), deleted)
        else:  # [head and flag, seed] of the previous row, for rows in a scan
            head = raw[:11] + FLAG[deleted]
            if last[0] != head:
                last[:] = head, row_seed(raw[2:10], origin_names.get(raw[10], ""), deleted)
            seed = last[1]
        return XXH_INT(raw[11:] + key, seed)
    number, pos = _uint(raw, 1)
    origin, pos = _uint(raw, pos)
    return XXH_INT(raw[pos:] + key,
                   row_seed(_U64.pack(number), origin_names.get(origin, ""), deleted))


def row_seed(version: bytes, origin_name: str, deleted: bool) -> int:
    """A row digest's seed: XXH3-64 of the version (8 bytes, big-endian), the origin
    name's UTF-8 bytes, a NUL and the deleted flag (one byte)."""
    return XXH_INT(version + name_bytes(origin_name) + FLAG[deleted])


def name_bytes(name: str) -> bytes:
    # An origin name's bytes in a row seed: UTF-8, then NUL.
    out = _NAMES.get(name)
    if out is None:
        out = _NAMES[name] = name.encode() + b"\0"
    return out


def xor(a: bytes | None, b: bytes) -> bytes:
    if not a:
        return b
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(DIGEST_SIZE, "big")


def top(items: list[Bucket]) -> bytes:
    """The XOR of every bucket: equal on two nodes that hold the same rows."""
    value = 0
    for _, h in items:
        value ^= int.from_bytes(h, "big")
    return value.to_bytes(DIGEST_SIZE, "big")


def combine(items: list[Bucket], starts: list[bytes]) -> list[bytes]:
    """The XOR of ``items`` per range ``[starts[i], starts[i+1])``; ``starts[0]`` must
    be at or before every item (``items`` and ``starts`` sorted)."""
    out = [0] * len(starts)
    i = 0
    for start, h in items:
        while i + 1 < len(starts) and starts[i + 1] <= start:
            i += 1
        out[i] ^= int.from_bytes(h, "big")
    return [v.to_bytes(DIGEST_SIZE, "big") for v in out]


def group_starts(items: list[Bucket]) -> list[bytes]:
    """Start keys of the coarse ranges (head first) used for the first comparison."""
    return [b""] + [start for start, _ in items if start and is_group_boundary(start)]
