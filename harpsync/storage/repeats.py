"""Transactions that will come again: relayed without raising their origin's floor.

A link asks each origin for the versions above its high-water mark (``hw:<origin>``),
so a transaction that arrived by one path is not sent again by another. Some relayed
entries raise no floor, though: a relay that carries fewer of the origin's tables than
this node takes from it, and relayed schema-only entries (``ingest.SCHEMA_OPS``). The
origin's direct link, once back, sends those transactions again from the old floor;
they apply as no-ops, and must not count in ``txns_received`` a second time.

:class:`Repeats` keeps, per origin, the versions so applied above its floor, in memory
(as the counters are: both start anew with the process). An entry whose version is
kept is a repeat. A version leaves once the origin's floor reaches it: the path that
raised the floor sent, in version order, everything of the origin above the old floor
it was to send, and no path is asked for anything below the new one. Changes are made
inside the apply job and undone with it (``WriteContext.on_undo``), so a job that
fails leaves them as they were. At most ``KEEP`` versions are kept per origin (a long
outage with a partial relay); past that, a repeat may count twice.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harpsync.storage.writer import WriteContext

KEEP = 100_000


class Repeats:
    """Per origin, the sorted versions applied without raising its floor."""

    def __init__(self) -> None:
        self._versions: dict[str, list[int]] = {}

    def holds(self, origin: str, version: int) -> bool:
        """Whether ``origin``'s transaction at ``version`` was applied here already."""
        kept = self._versions.get(origin)
        if not kept:
            return False
        at = bisect.bisect_left(kept, version)
        return at < len(kept) and kept[at] == version

    def count(self, origin: str) -> int:
        """How many versions of ``origin`` are kept (for tests and status)."""
        return len(self._versions.get(origin, ()))

    def record(self, ctx: WriteContext, fresh: Mapping[str, Iterable[int]]) -> None:
        """Keep the versions ``fresh`` (per origin) that a job applied without raising
        the origin's floor; undone if the job fails."""
        for origin, versions in fresh.items():
            new = sorted(set(versions))
            old = self._versions.get(origin)
            if not new:
                continue
            if old and new[0] > old[-1] and len(old) + len(new) <= KEEP:
                # The usual case (a relay carries an origin in its version order): in
                # place, undone by cutting the list back.
                size = len(old)
                old.extend(new)
                ctx.on_undo(functools.partial(old.__delitem__, slice(size, None)))
                continue
            self._versions[origin] = sorted(set(old or ()).union(new))[-KEEP:]
            ctx.on_undo(functools.partial(self._restore, origin, old))

    def prune(self, ctx: WriteContext, floors: Mapping[str, int]) -> None:
        """Forget the versions at or below each origin's new floor; undone if the job
        fails."""
        for origin, floor in floors.items():
            old = self._versions.get(origin)
            if not old or old[0] > floor:
                continue
            self._versions[origin] = old[bisect.bisect_right(old, floor):]
            ctx.on_undo(functools.partial(self._restore, origin, old))

    def _restore(self, origin: str, versions: list[int] | None) -> None:
        if versions is None:
            self._versions.pop(origin, None)
        else:
            self._versions[origin] = versions
