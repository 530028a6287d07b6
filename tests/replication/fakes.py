"""In-memory fakes of the seams in harpsync/replication/seams.py, for unit tests of the
glue (the way litestream's ``mock/`` implements its ``ReplicaClient``).

Each fake keeps what it was told in plain lists and dicts so a test can read it back.
None of them touches LMDB, a listener or a node. :class:`Wire` drives the far end of a
socket pair with a real sans-I/O session, playing the peer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from harpsync import codec
from harpsync.replication.events import Event
from harpsync.replication.reconnect import PeerGate
from harpsync.replication.session import Session
from harpsync.replication.transport import Link, LinkClosed, socket_pair
from harpsync.storage.ingest import ApplyStats

LOCAL = "node-a"  # the node under test
PEER = "node-b"  # the node at the other end of the link
WAIT = 5.0  # deadline for anything to arrive on the wire


def entry(origin_id: int, version: int, table: str = "dog", key: int = 1) -> bytes:
    """A packed log entry ``[origin, version, user, ops]`` writing one record."""
    return codec.pack([origin_id, version, None, [[table, "upsert", {"id": key}]]])


def stored_row(origin_id: int, version: int, key: int) -> tuple[bytes, bytes]:
    """A ``(key, stored value)`` row as a copy sends it (origin id at index 1)."""
    return str(key).encode(), codec.pack([version, origin_id, {"id": key}])


class FakeTable:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeLog:
    """A ``LogSource``: one database's log and tables in memory."""

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self.origin_names: dict[int, str] = {1: LOCAL, 2: PEER, 3: "node-c"}
        self.commit_listeners: list[Any] = []
        self.tables: dict[str, Any] = {}
        self.rows: dict[str, list[tuple[bytes, bytes]]] = {}
        self.tombs: dict[str, list[tuple[bytes, bytes]]] = {}
        self.dropped = False
        self.entries: list[tuple[int, bytes]] = []
        self._pruned = 0
        self._pruned_max: dict[str, int] = {}
        # The head when "this process" opened the log; None: the head now (a test
        # fills the log before it subscribes).
        self.opened: int | None = None
        self.sent_to: dict[str, int] = {}

    @property
    def opened_head(self) -> int:
        return self.head_seq if self.opened is None else self.opened

    @property
    def head_seq(self) -> int:
        return self.entries[-1][0] if self.entries else self._pruned

    @property
    def next_seq(self) -> int:
        return self.head_seq + 1

    def append(self, raw: bytes) -> int:
        """Log one entry and tell the commit listeners, as the writer does."""
        seq = self.next_seq
        self.entries.append((seq, raw))
        for listener in list(self.commit_listeners):
            listener(seq)
        return seq

    def prune(self, through: int) -> None:
        self.entries = [e for e in self.entries if e[0] > through]
        self._pruned = max(self._pruned, through)

    def pruned_through(self) -> int:
        return self._pruned

    def pruned_max(self) -> dict[str, int]:
        return dict(self._pruned_max)

    def read_log(self, after_seq: int, limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        return self._pruned, [e for e in self.entries if e[0] > after_seq][:limit]

    def origins_after(self, after_seq: int) -> set[int] | None:
        return {codec.entry_head(raw)[0] for seq, raw in self.entries if seq > after_seq}

    def add_table(self, name: str, rows: list[tuple[bytes, bytes]],
                  tombs: list[tuple[bytes, bytes]] | None = None) -> None:
        self.tables[name] = FakeTable(name)
        self.rows[name] = sorted(rows)
        self.tombs[name] = sorted(tombs or [])

    def iter_rows(self, table: Any, after_key: bytes | None, limit: int,
                  tombs: bool = False) -> list[tuple[bytes, bytes]]:
        source = (self.tombs if tombs else self.rows)[table.name]
        return [r for r in source if after_key is None or r[0] > after_key][:limit]

    def table_size(self, table: Any) -> tuple[int, int]:
        return len(self.rows[table.name]), 0

    def tombstone_count(self, table: Any) -> int:
        return len(self.tombs[table.name])

    def swept_horizons(self) -> dict[str, list[int]]:
        return {}


class FakeLinkHost:
    """What every link needs from the node (``LinkHost``), answering plainly."""

    node_name = LOCAL
    ping_interval = 5.0

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {PEER: {"name": PEER, "url": "wss://node-b:1"}}
        self.operations: list[dict[str, Any]] = []

    def peer_row(self, peer: str) -> dict[str, Any] | None:
        return self.rows.get(peer)

    def replicates_database(self, name: str) -> bool:
        return True

    def table_definitions(self, db: Any) -> dict[str, Any]:
        return {}

    def check_peer(self, name: str, link: Link) -> str | None:
        return None

    async def peer_operation(self, peer: str, body: dict[str, Any]) -> tuple[Any, str | None]:
        self.operations.append(body)
        return {"ok": True}, None


class FakePublisherHost(FakeLinkHost):
    """A ``PublisherHost`` recording positions and acks."""

    compression = False

    def __init__(self) -> None:
        super().__init__()
        self.positions: list[tuple[str, str, int, bool]] = []
        self.replaced: list[str] = []
        self.acks: list[tuple[str, str, int]] = []
        # What ``held_floors`` answers (a test sets it), and the sequences it was asked.
        self.floors: dict[str, int] = {}
        self.floors_asked: list[int] = []

    def note_position(self, peer: str, database: str, seq: int, reset: bool = False) -> None:
        self.positions.append((peer, database, seq, reset))

    def note_ack(self, peer: str, database: str, seq: int) -> None:
        self.acks.append((peer, database, seq))

    def note_log_replaced(self, database: str) -> None:
        self.replaced.append(database)

    async def held_floors(self, db: Any, through_seq: int) -> dict[str, int]:
        self.floors_asked.append(through_seq)
        return dict(self.floors)


class FakeSubscriberHost(FakeLinkHost):
    """A ``SubscriberHost`` whose dials open socket pairs: the test plays the peer on
    the accepted ends, which it takes from :attr:`accepted`."""

    max_skew_ms = 60_000

    def __init__(self) -> None:
        super().__init__()
        self.accepted: asyncio.Queue[Link] = asyncio.Queue()
        self.dialed: list[tuple[str, str]] = []
        self.gate = PeerGate()
        self.received: list[tuple[int, int]] = []
        self.dead_letters = 0
        self.skewed = 0
        self.copies: list[tuple[str, str]] = []
        self.logins_forgotten = 0
        self.narrow: frozenset[str] = frozenset()  # what ``narrow_origins`` answers

    async def dial_peer(self, peer: str, url: str, path: str) -> Link:
        dialed, accepted = await socket_pair(path)
        self.dialed.append((peer, path))
        await self.accepted.put(accepted)
        return dialed

    def peer_gate(self, peer: str) -> PeerGate:
        return self.gate

    def offers_compression(self, url: str) -> bool:
        return False

    def start_floor(self, peer: str) -> int:
        return 0

    def review(self, peer: str, database: str) -> None:
        return None

    def origin_tables(self, peer: str, database: str) -> dict[str, list[str]]:
        return {}

    def narrow_origins(self, peer: str, database: str,
                       relay_tables: Mapping[str, list[str]] | None = None,
                       origins: Collection[str] = ()) -> frozenset[str]:
        return self.narrow

    def note_dialed(self, peer: str, database: str, reconnect: bool) -> None:
        pass

    def note_received(self, peer: str, database: str, txns: int, last_version: int) -> None:
        self.received.append((txns, last_version))

    def note_apply_seconds(self, peer: str, database: str, seconds: float) -> None:
        pass

    def note_review(self, peer: str, database: str, review: Any) -> None:
        pass

    def note_dead_letters(self, peer: str, database: str, count: int) -> None:
        self.dead_letters += count

    def note_skew(self, peer: str, count: int) -> None:
        self.skewed += count

    def copy_finished(self, peer: str, database: str) -> None:
        self.copies.append((peer, database))

    def logins_changed(self) -> None:
        self.logins_forgotten += 1

    def operation_completed(self, event: Any) -> None:
        pass


class FakeLinkStore:
    """A ``LinkStore`` in memory: cursors, and every apply job in the order it ran.

    ``refuse`` names log sequences whose apply fails as a bad change would (a
    ``ValueError``), to exercise the dead-letter path; ``refuse_keys`` copied rows.
    ``held`` is the floor per origin (raised by entries, and by a copy's end).
    """

    def __init__(self, database: str = "data") -> None:
        self.databases = {database}
        self.cursors: dict[tuple[str, str], dict[str, Any]] = {}
        self.applied: list[int] = []  # log sequences, in apply order
        self.jobs: list[list[int]] = []  # the sequences of each apply job
        self.copied: list[tuple[str, list[bytes], dict[str, Any]]] = []
        self.letters: list[dict[str, Any]] = []
        self.hellos: list[Mapping[str, Any]] = []
        self.held: dict[str, int] = {}
        self.refuse: set[int] = set()
        self.refuse_keys: set[bytes] = set()

    def has_database(self, name: str) -> bool:
        return name in self.databases

    def hello_schema(self, database: str) -> tuple[dict[str, Any], dict[int, str]]:
        return {}, {1: LOCAL}

    def cursor(self, database: str, peer: str) -> dict[str, Any]:
        return dict(self.cursors.get((database, peer), {}))

    def origin_floors(self, database: str, origins: Iterable[str]) -> dict[str, int | None]:
        return {name: self.held.get(name) for name in origins}

    def wall_now_ms(self) -> int:
        return int(time.time() * 1000)

    async def learn_schema(self, database: str, tables: Mapping[str, Any], peer: str) -> None:
        self.hellos.append(tables)

    async def write_cursor(self, database: str, peer: str, cursor: dict[str, Any],
                           sweeps: Any = (), floors: Mapping[str, int] | None = None) -> None:
        self.cursors[(database, peer)] = dict(cursor)
        for name, version in (floors or {}).items():
            self.held[name] = max(self.held.get(name, 0), version)

    async def apply_entries(self, database: str, peer: str, entries: list[tuple[int, bytes]],
                            origins: Mapping[int, str], cursor: dict[str, Any],
                            max_skew_ms: int, local_name: str, floor: int,
                            review: Any, held_floors: frozenset[str] = frozenset(),
                            ) -> ApplyStats:
        if any(seq in self.refuse for seq, _ in entries):
            raise ValueError("a change that cannot be applied")
        stats = ApplyStats()
        for seq, raw in entries:
            origin, version = codec.unpack_head(raw, 2)
            self.held[origins[origin]] = max(self.held.get(origins[origin], 0), version)
            self.applied.append(seq)
            stats.entries += 1
            stats.last_version = version
        self.jobs.append([seq for seq, _ in entries])
        self.cursors[(database, peer)] = dict(cursor)
        return stats

    async def apply_rows(self, database: str, peer: str, table: str,
                         rows: list[tuple[bytes, bytes]], origins: Mapping[int, str],
                         cursor: dict[str, Any], floor: int, incarnation: int | None,
                         review: Any, sweeps: Any = ()) -> int:
        if any(key in self.refuse_keys for key, _ in rows):
            raise ValueError("a row that cannot be applied")
        self.copied.append((table, [key for key, _ in rows], dict(cursor)))
        self.cursors[(database, peer)] = dict(cursor)
        return len(rows)

    async def dead_letter(self, database: str, peer: str, letters: list[dict[str, Any]],
                          cursor: dict[str, Any]) -> int:
        self.letters.extend(letters)
        self.cursors[(database, peer)] = dict(cursor)
        return len(letters)


class FakeRelays:
    """An ``OriginPlanner`` with no relays: a link carries its peer's own transactions."""

    def __init__(self) -> None:
        self.released: list[tuple[str, str]] = []

    def covered(self, peer: str, database: str) -> set[str]:
        return {peer}

    async def release(self, origin: str, database: str) -> None:
        self.released.append((origin, database))


class Wire:
    """One end of a socket pair driven by a real sans-I/O session: the test plays the
    node at the other end of the link under test."""

    def __init__(self, link: Link, session: Session) -> None:
        self.link = link
        self.session = session
        self.events: list[Event] = []  # received and not taken yet

    async def flush(self) -> None:
        for frame in self.session.data_to_send():
            await self.link.send(frame)

    async def expect(self, kind: type[Any], timeout: float = WAIT) -> Any:
        """The next event of type ``kind`` (events of other types stay in
        :attr:`events`). Fails if none arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if isinstance(event, kind):
                    del self.events[i]
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; "
                                     f"received {self.events}")
            data = await asyncio.wait_for(self.link.recv(), left)
            self.session.receive(data)
            self.events.extend(self.session.events_received())

    async def closed(self, timeout: float = WAIT) -> tuple[int | None, str | None]:
        """Read until the socket closes; return the close code and reason."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                data = await asyncio.wait_for(self.link.recv(),
                                              max(0.01, deadline - time.monotonic()))
                self.session.receive(data)
                self.events.extend(self.session.events_received())
        except LinkClosed as exc:
            frame = exc.rcvd
            return (frame.code, frame.reason) if frame is not None else (None, None)


async def until(predicate: Any, timeout: float = WAIT, message: str = "condition") -> Any:
    """Poll ``predicate`` on the event loop until it is truthy (tests/helpers.py's
    ``wait_for`` for code running on this loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
