"""What a verify compares: the pairs, their outcomes, and the per-row decisions
(pure functions, run in worker threads by ``verifier.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harpsync.errors import HarpsyncError, PeerError
from harpsync.storage import compare
from harpsync.storage.keys import encode_id


def wire_bytes(value: Any) -> bytes:
    """A key or hash from a verify message: bytes only. ``bytes(n)`` of an integer
    would allocate ``n`` zero bytes, so a peer sending a huge integer where a key
    belongs could make this node allocate whatever it named."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise PeerError(f"a key in a verify message must be bytes, not {type(value).__name__}")

BOTH, PULL, PUSH = "both", "pull", "push"


@dataclass
class Pair:
    """One (peer, database, table) to compare, and which way it replicates."""

    peer: str
    url: str
    database: str
    table: str
    direction: str  # both; pull: this node receives only; push: it sends only


@dataclass
class Outcome:
    """What comparing one pair found."""

    pair: Pair
    in_sync: bool = True
    differences: list[tuple[bytes, compare.RowState, compare.RowState, int]] = field(
        default_factory=list)
    bytes_exchanged: int = 0
    rounds: int = 0
    error: str | None = None
    changed: dict[str, list[Any]] = field(default_factory=dict)
    # Per node, the ids a repair left as they were because a conflict policy there keeps
    # them: dest_wins (a dead letter) and manual_review (system.hdb_conflicts).
    refused: dict[str, list[Any]] = field(default_factory=dict)
    conflicts: dict[str, list[Any]] = field(default_factory=dict)
    # Per node, the ids stamped beyond its clock-skew bound: held back, as replication
    # holds them, until the clocks agree.
    skewed: dict[str, list[Any]] = field(default_factory=dict)
    timings: list[Any] = field(default_factory=list)
    # A full copy between the two was under way and the tops differed: nothing was
    # compared (a half-copied table differs in every row not copied yet).
    busy: bool = False
    # The peer could not be asked at all (unreachable, TLS): nothing was compared.
    unreached: bool = False
    # The table's incarnation both sides held when compared: a repair writes only into
    # it (a drop and re-create since makes the comparison's rows another table's).
    incarnation: int | None = None
    # A repair (not a dry run) stored rows: the differences it changed are gone.
    repaired: bool = False
    # The peer decides a dry run of a repair (an earlier release would write it): then
    # its policies show in the dry run too.
    peer_plans: bool = False
    # The table exists on the peer only (a repair leaves it: see ``peer_only``).
    missing_here: bool = False
    # Shared by a run's outcomes: peer -> why it could not be reached. The run's other
    # pairs with it are not tried (each would wait for its own dial to fail: with
    # 1,000 tables and a peer that drops packets, hours).
    down: dict[str, str] = field(default_factory=dict, repr=False)

    def remaining(self) -> int:
        """Differences still there once the comparison (and a repair) ended."""
        if not self.repaired:
            return len(self.differences)
        fixed = {encode_id(rid) for ids in self.changed.values() for rid in ids}
        return sum(1 for key, *_ in self.differences if key not in fixed)


def candidate_keys(mine_by_range: list[dict[bytes, bytes]], theirs_by_range: list[list[Any]],
                by_key: bool) -> set[bytes]:
    """The keys whose row digests differ between the two sides' rows per bucket."""
    candidates: set[bytes] = set()
    if by_key:
        # The peer does not publish the table to this node, so it does not list its
        # keys: only this node's rows can differ the way it sends (rows only the peer
        # holds are no difference one way), and they are compared key by key.
        for mine in mine_by_range:
            candidates.update(mine)
    for mine, theirs in zip(mine_by_range, theirs_by_range, strict=False):
        theirs_map = {wire_bytes(k): wire_bytes(v) for k, v in theirs}
        for key in mine.keys() | theirs_map.keys():
            if mine.get(key) != theirs_map.get(key):
                candidates.add(key)
    return candidates


def real_differences(pair: Pair, keys: list[bytes], mine: list[compare.RowState],
                      theirs: list[compare.RowState], start_version: int,
                      limits: dict[str, list[str]],
                      their_limits: dict[str, Any] | None = None,
                      ) -> list[tuple[bytes, compare.RowState, compare.RowState, int]]:
    """The candidates that differ as the verify reports them, with the winning side.

    ``limits``: the tables this node takes from each origin; ``their_limits``: the
    peer's (a row either side does not take is no difference: no repair can move it)."""
    their_limits = their_limits or {}
    found = []
    for key, m, t in zip(keys, mine, theirs, strict=False):
        if not compare.differs(m, t):
            continue
        newest = max(m[1] if m else 0, t[1] if t else 0)
        if newest > start_version:
            continue  # written after the verify began: replication's job
        side = compare.winner(m, t)
        if pair.direction == PULL and side > 0 or pair.direction == PUSH and side < 0:
            continue  # one-way: the receiver must hold at least the sender's rows
        if side < 0 and t and t[2] in limits and pair.table not in limits[t[2]]:
            continue  # a row of an origin this node does not take this table from
        if (side > 0 and m and m[2] in their_limits
                and pair.table not in (their_limits[m[2]] or [])):
            continue  # ... nor the peer (its verify_repair would refuse it)
        found.append((key, m, t, side))
    return found


def unreachable(exc: HarpsyncError) -> bool:
    """Whether a request failed because the peer could not be reached at all (rather
    than refusing this one request)."""
    return isinstance(exc, PeerError) and exc.message.startswith("Could not reach")


def unchanged(compared: compare.RowState, now: compare.RowState) -> bool:
    """Whether a row read for a repair is the one compared (digest, version, origin)."""
    return (compared is not None and now is not None
            and list(compared[:3]) == list(now[:3]))
