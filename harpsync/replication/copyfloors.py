"""What a full copy carries of each origin: the floors it lets the receiver raise (no I/O).

A link asks each origin for the versions above its floor (``hw:<origin>``), the newest
version held of it by any path. A full copy brings every row its publisher holds, so
once applied the receiver holds every transaction of an origin up to the publisher's
own floor for it (for the publisher itself, the newest entry through the snapshot
that it wrote itself: ``logscan.held_floors``).
The publisher sends those floors in ``copy_begin`` (``floors``, an optional field: a
receiver of an earlier release ignores it, and a copy from one raises no floor, as
before), read before the copy's tables and rows: a transaction held then has its table
among those copied and its rows among those read. The receiver raises its floors to
them in the job that ends the copy, after every chunk committed; before, a node that
received an origin's rows only by copy had no floor for it, and a relay (or a link
whose origins grew, which reads its peer's log again) sent every older transaction of
it again, applied as no-ops and counted in ``txns_received``.

Not raised:

- the floors of an origin the link does not carry all of (``narrow_origins``: this
  node takes more of that origin's tables than the copy carried), as for its entries;
- on a resumed copy, more than the first part's ``copy_begin`` said (kept with the
  resume point): the rows copied before the interruption were read then, and the
  publisher's floors may have risen since with transactions those rows lack;
- after a chunk of the copy went to the dead letters (its rows are not held here).

A publisher whose floor for an origin is below what its rows hold (it has only what
paths that raise floors brought) sends that lower floor: the transactions between come
again and count once more, as they would from a relay. Schema a node learns from a
hello is logged under the hello's sender, also when that node wrote nothing itself: its
copies then carry no floor of it (it has no entry of its own), and a relay of that name
sends those creates again, counted (``tests/test_relay_counts.py``, second test).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def parse_floors(raw: Any) -> dict[str, int]:
    """The well-formed ``{origin: version}`` of a ``copy_begin`` (or a resume point)."""
    if not isinstance(raw, dict):
        return {}
    return {name: version for name, version in raw.items()
            if isinstance(name, str) and type(version) is int and version > 0}


def begun(floors: Any, snapshot: int, resume: Mapping[str, Any] | None) -> dict[str, int]:
    """The floors a copy at ``snapshot`` will raise, from its ``copy_begin``'s
    ``floors``. When it resumes ``resume`` (an interrupted copy of the same snapshot),
    at most what the first part said, per origin, and only origins both name."""
    sent = parse_floors(floors)
    if resume is None or resume.get("snapshot") != snapshot:
        return sent
    before = parse_floors(resume.get("floors"))
    return {name: min(version, before[name]) for name, version in sent.items()
            if name in before}


def to_raise(floors: Mapping[str, int], held: Collection[str], local: str) -> dict[str, int]:
    """The floors to raise at the copy's end: not those of origins whose floors the
    link holds (``narrow_origins``), nor this node's own."""
    return {name: version for name, version in floors.items()
            if name not in held and name != local}
