"""Sending a full copy on a publisher's socket (``publisher.py`` streams after it).

A copy is taken at a snapshot sequence of this node's log: ``copy_begin`` (the schema
read after the snapshot, the tombstone horizons, the floors the copy carries), then
every table the peer takes, in name order, its live rows then its tombstones, in key
order, then ``copy_end``. An interrupted copy resumes at the key its receiver last
committed, with the same snapshot, if this log can have sent it (``copy_resumable``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from harpsync import codec
from harpsync.replication import peers
from harpsync.replication.protocol import PublisherSession, SubscribeRequested
from harpsync.replication.seams import LogSource, PublisherHost
from harpsync.replication.steps import copy_resumable

if TYPE_CHECKING:
    from harpsync.storage.database import Table

COPY_CHUNK = 500


class CopyLink(Protocol):
    """The publisher a copy is sent by (``publisher.Publisher``)."""

    host: PublisherHost
    peer: str
    database: str
    session: PublisherSession

    async def flush(self) -> None:
        """Send what the session queued."""
        ...


def note_sent(db: LogSource, peer: str, seq: int) -> None:
    """What this process let ``peer``'s cursor reach: a restored log is told by a cursor
    past it and past the head at open (``steps.first_step``)."""
    if seq > db.sent_to.get(peer, 0):
        db.sent_to[peer] = seq


async def send_copy(link: CopyLink, db: LogSource, sub: SubscribeRequested,
                    tables: list[str] | None, known_through: int) -> int:
    """Send a full copy of ``db``'s ``tables`` (None: all) for subscription ``sub``,
    resuming ``sub.copy_resume`` if it can; returns the snapshot sequence, after which
    the stream goes on."""
    host, database = link.host, link.database
    resume = sub.copy_resume or {}
    head = db.head_seq
    if resume.get("snapshot") is not None and not copy_resumable(
            int(resume["snapshot"]), head, known_through):
        resume = {}  # this log never sent that snapshot: start over
    snapshot = head if resume.get("snapshot") is None else int(resume["snapshot"])
    # What this node holds of each origin, read before anything the copy carries:
    # a transaction held by then has its table among the names read below and its
    # rows among those read after them.
    held = await host.held_floors(db, snapshot)
    # The schema goes with the copy, read after its snapshot: the hello may be older
    # (a resync within the session, or a subscribe that came late), and a drop and
    # re-create in between would be in neither the hello nor the stream that
    # follows the copy, so the peer would take the new incarnation's rows into its
    # old one and never drop it.
    schema = host.table_definitions(db)
    names = sorted(t for t in list(db.tables) if peers.table_allowed(database, t, tables))
    total = 0
    for name in names:
        table = db.tables[name]
        total += db.table_size(table)[0] + db.tombstone_count(table)
    # Read before any row: a row of this node's written after it is newer than it.
    horizons = {name: value for name, value in db.swept_horizons().items()
                if name in names and name in (sub.origin_tables or {}).get(
                    host.node_name, [name])}
    floors = copy_floors(held, sub, names, link.peer)
    note_sent(db, link.peer, snapshot)
    link.session.begin_copy(snapshot, total, names, schema, horizons, floors)
    await link.flush()
    start_table = resume.get("table")
    for name in names:
        if start_table and name < start_table:
            continue
        found = db.tables.get(name)
        if found is None:
            continue
        table = found
        resuming = name == start_table
        for tombs in (False, True):
            if resuming and resume.get("tombs") and not tombs:
                continue
            after = resume.get("key") if resuming and bool(resume.get("tombs")) == tombs \
                else None
            # Rows of origins the peer takes this table from only directly (if at
            # all) stay out, as they do from the stream.
            withheld = {o for o, t in (sub.origin_tables or {}).items() if name not in t}
            await _send_rows(link, db, table, tombs, after, withheld)
    link.session.end_copy(snapshot)
    await link.flush()
    return snapshot


def copy_floors(held: Mapping[str, int], sub: SubscribeRequested, names: list[str],
                peer: str) -> dict[str, int]:
    """Per origin, the version through which the copy carries all of its transactions
    (``held``, read before the copy's tables and rows, which hold at least that much):
    the receiver raises its floors to them once the copy is applied, so no path sends
    those transactions again (``copyfloors.py``). Not the peer's own, nor an origin
    whose rows the copy withholds from every table it carries (the peer takes none of
    them from this node)."""
    limits = sub.origin_tables or {}
    copied = set(names)
    return {origin: version for origin, version in held.items()
            if origin != peer and (origin not in limits or copied & set(limits[origin]))}


async def _send_rows(link: CopyLink, db: LogSource, table: Table, tombs: bool,
                     after: bytes | None, withheld: set[str]) -> None:
    while True:
        read = db.iter_rows(table, after, COPY_CHUNK, tombs=tombs)
        if not read:
            return
        rows = read
        if withheld:
            ids = {oid for oid, name in db.origin_names.items() if name in withheld}
            rows = [row for row in read if codec.unpack(row[1])[1] not in ids]
        if rows:
            link.session.send_copy_rows(table.name + ("\x00" if tombs else ""), rows,
                                        _row_origins(db, rows))
            await link.flush()
        after = read[-1][0]
        if len(read) < COPY_CHUNK:
            return


def _row_origins(db: LogSource, rows: list[tuple[bytes, bytes]]) -> dict[int, str]:
    """Names of the origin ids the stored rows use (ids may be newer than our hello)."""
    names = db.origin_names
    ids = {codec.unpack(raw)[1] for _, raw in rows}
    return {oid: names[oid] for oid in ids if oid in names}
