"""Which key ranges of a full copy show rows deleted on the publisher (no I/O).

A publisher that swept tombstones of a table tells its horizon per table in
``copy_begin`` (``horizons``: ``{table: [incarnation, version(, own_since)]}``; see
``storage/horizon.py``). It sends every live row of its own origin (it sends a horizon
only for tables whose rows of its origin it does not withhold), in key order, table by
table in name order, live rows before tombstones. So the live rows of one table that
arrive in consecutive chunks cover the key range from the previous chunk's last key to
their own last one, and a table's live rows are over once a chunk of its tombstones, of
a later table, or the copy's end arrives. In those ranges, a row of the publisher's
origin stored here, older than its horizon and not among the rows sent, was deleted
there: the ranges go with the chunk's own apply job (its cursor commits with them), and
the rest with the copy's end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harpsync.storage.horizon import Sweep


def parse_horizons(raw: Any) -> dict[str, tuple[int, int, int]]:
    """The well-formed ``{table: (incarnation, version, since)}`` of a ``copy_begin``
    (``since``, the version the publisher's own rows start from, 0 if not sent)."""
    out: dict[str, tuple[int, int, int]] = {}
    if not isinstance(raw, dict):
        return out
    for name, value in raw.items():
        if isinstance(name, str) and isinstance(value, list | tuple) \
                and len(value) in (2, 3) and all(type(v) is int for v in value) \
                and value[1] > 0:
            out[name] = (value[0], value[1], value[2] if len(value) == 3 else 0)
    return out


class CopySweeps:
    """The ranges still to sweep in one copy: tables whose live rows are not over yet,
    and where the one being copied stands."""

    def __init__(self, horizons: Mapping[str, tuple[int, int, int]],
                 resume: Mapping[str, Any] | None = None) -> None:
        self.horizons = dict(horizons)
        self.pending = sorted(self.horizons)
        self.position: dict[str, bytes] = {}
        if resume:  # the chunks up to the resume point were applied with their ranges
            table = resume.get("table")
            key = resume.get("key")
            if isinstance(table, str):
                done_through = table if resume.get("tombs") else None
                self.pending = [t for t in self.pending
                                if t > table or (t == table and done_through is None)]
                if table in self.pending and isinstance(key, bytes):
                    self.position[table] = key

    def _whole(self, table: str, through: bytes | None = None,
               present: frozenset[bytes] = frozenset()) -> Sweep:
        incarnation, version, since = self.horizons[table]
        return Sweep(table, incarnation, version, self.position.get(table), through, present,
                     since)

    def for_chunk(self, table: str, tombs: bool, keys: Sequence[bytes]) -> list[Sweep]:
        """The ranges a chunk of ``table`` (its tombstones if ``tombs``) closes. Changes
        nothing: :meth:`advance` does, once the chunk is applied (or dead-lettered)."""
        out = [self._whole(t) for t in self.pending if t < table or (t == table and tombs)]
        if not tombs and table in self.pending and keys:
            out.append(self._whole(table, keys[-1], frozenset(keys)))
        return out

    def advance(self, table: str, tombs: bool, keys: Sequence[bytes]) -> None:
        """A chunk is done: the ranges before it are over."""
        self.pending = [t for t in self.pending if t > table or (t == table and not tombs)]
        if not tombs and table in self.pending and keys:
            self.position[table] = keys[-1]

    def at_end(self) -> list[Sweep]:
        """The ranges left when the copy ends: every table to its last key."""
        return [self._whole(t) for t in self.pending]
