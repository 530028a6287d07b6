"""harpsync/replication/copyfloors.py, and a link raising the floors a copy carried
(a subscriber over a socket pair with fakes of its seams: no node, no LMDB)."""

from __future__ import annotations

import pytest

from harpsync import codec
from harpsync.replication.copyfloors import begun, parse_floors, to_raise
from harpsync.replication.protocol import SubscribeRequested
from harpsync.storage.keys import encode_id

from .fakes import PEER, until
from .links import PEER_IDS, Linked, accept, acked, publisher, running

pytestmark = pytest.mark.timeout(30)

# Rows of the peer (origin id 1) and of node-c (3), keyed as stored (a dead letter
# decodes its key).
ROWS = [(encode_id(1), codec.pack([50, 1, {"id": 1}])),
        (encode_id(2), codec.pack([51, 3, {"id": 2}]))]


def test_only_well_formed_floors_are_taken() -> None:
    """Names with positive integer versions; anything else is left out."""
    raw = {"a": 5, "b": None, 3: 4, "c": True, "d": 0, "e": -1, "f": "7"}
    assert parse_floors(raw) == {"a": 5}
    assert parse_floors(None) == {} and parse_floors([("a", 5)]) == {}


def test_a_resumed_copy_raises_no_more_than_its_first_part_said() -> None:
    """Resuming the same snapshot, each origin's floor is the lower of the two, and an
    origin only one of them names is not raised; another snapshot starts afresh."""
    resume = {"snapshot": 7, "floors": {"a": 5, "b": 12, "c": 3}}
    assert begun({"a": 9, "b": 9, "d": 9}, 7, resume) == {"a": 5, "b": 9}
    assert begun({"a": 9}, 8, resume) == {"a": 9}
    assert begun({"a": 9}, 7, {"snapshot": 7}) == {}  # its first part raised nothing
    assert begun(None, 7, None) == {}


def test_origins_the_link_holds_floors_of_and_this_node_are_not_raised() -> None:
    assert to_raise({"a": 1, "b": 2, "node-a": 3}, {"b"}, "node-a") == {"a": 1}


async def _copy(linked: Linked, floors: dict[str, int] | None,
                resume: bool = False) -> SubscribeRequested:
    """Play the peer: a copy at snapshot 7 of ``ROWS`` with ``floors``, to its end."""
    peer, sub = await accept(linked)
    assert sub.copy
    session = publisher(peer)
    session.begin_copy(7, 2, ["dog"], floors=floors)
    session.send_copy_rows("dog", ROWS, PEER_IDS)
    await peer.flush()
    await until(lambda: bool(linked.store.copied or linked.store.letters))
    assert linked.store.held == {}, "floors raised before the copy's end"
    session.end_copy(7)
    await peer.flush()
    await acked(peer, 7)
    return sub


async def test_the_end_of_a_copy_raises_the_floors_it_carried():
    """A copy's floors are kept with its resume point while it runs and raised by the
    job that ends it, after its rows: the next subscribe asks each origin for what is
    above them. Before, a copy raised none."""
    async with running() as linked:
        await _copy(linked, {PEER: 60, "node-c": 40})
        [(_table, _keys, cursor)] = linked.store.copied
        assert cursor["copy"]["floors"] == {PEER: 60, "node-c": 40}
        assert linked.store.held == {PEER: 60, "node-c": 40}
        assert "copy" not in linked.store.cursors[("data", PEER)]


async def test_a_copy_raises_no_floor_of_an_origin_whose_floors_the_link_holds():
    """An origin this node takes more tables of than the link carries
    (``narrow_origins``) keeps its floor, as for its relayed entries."""
    async with running() as linked:
        linked.host.narrow = frozenset({"node-c"})
        await _copy(linked, {PEER: 60, "node-c": 40})
        assert linked.store.held == {PEER: 60}


async def test_a_resumed_copy_raises_the_floors_its_first_part_allowed():
    """An interrupted copy's floors stay on this side (not sent with the resume point);
    resumed, it raises no origin past what the first part's ``copy_begin`` said: the
    rows copied then were read before the publisher's floors rose."""
    resume = {"table": "dog", "key": encode_id(0), "tombs": False, "snapshot": 7,
              "copied": 1, "floors": {PEER: 50, "node-c": 30}}
    async with running({"seq": 0, "origins": [PEER], "copy": resume}) as linked:
        sub = await _copy(linked, {PEER: 60, "node-c": 20, "node-d": 10})
        assert sub.copy_resume == {"table": "dog", "key": encode_id(0), "tombs": False,
                                   "snapshot": 7}
        assert linked.store.held == {PEER: 50, "node-c": 20}


async def test_a_copy_with_a_dead_lettered_chunk_raises_no_floor():
    """Rows that went to the dead letters are not held here: the copy raises nothing."""
    async with running() as linked:
        linked.store.refuse_keys = {encode_id(1)}
        await _copy(linked, {PEER: 60})
        assert [letter["peer"] for letter in linked.store.letters] == [PEER, PEER]
        assert linked.store.held == {}


async def test_a_copy_from_a_peer_that_sends_no_floors_raises_none():
    """An earlier release sends no ``floors``: nothing is raised, as before."""
    async with running() as linked:
        await _copy(linked, None)
        assert linked.store.held == {}
