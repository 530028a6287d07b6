"""The seams of the replication glue, as small ``typing.Protocol``s.

Each consumer declares only what it uses from the rest of the node (rqlite's habit:
``http/service.go`` lists the few ``Store`` methods it calls). A publisher, a subscriber,
membership or maintenance reads through these, never through ``Replicator``'s
dictionaries, so each can be built with a fake of its seam instead of a whole node.

Who implements what (see DESIGN.md, "Seams"):

- :class:`LogSource` is one database's log as a publisher reads it;
  ``harpsync.storage.database.Database`` implements it.
- :class:`LinkHost` is what every link needs from the node: its name, how it talks
  to peers, the peer's row and the hooks it reports to. :class:`PublisherHost` and
  :class:`SubscriberHost` add what only one side uses; the subscriber's is made of
  small parts (:class:`PeerDialer`, :class:`ApplyPolicy`, :class:`SubscriberReports`).
  ``Replicator`` implements all of them, and ``_implements_seams`` at the end of
  ``replicator.py`` lets mypy check it.
- :class:`LinkStore` is what a subscriber reads and writes locally (cursor, hello
  schema, apply jobs); ``linkstore.StorageLinkStore`` implements it over storage.
  :class:`OriginPlanner` is which origins a link carries (``relays.RelayPlanner``).
- :class:`MeshHost` is what membership (``mesh.py``) needs from the link runtime.
- :class:`CopyListener`, :class:`PositionListener`: callbacks links invoke.

This module is typing only: it imports no asyncio (but for annotations), sockets or
LMDB, and nothing here runs at import time beyond the class definitions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    from harpsync.metrics import Metrics
    from harpsync.replication.linkcounts import LinkCounts
    from harpsync.replication.publisher import Publisher
    from harpsync.replication.reconnect import PeerGate
    from harpsync.replication.subscriber import Subscriber
    from harpsync.replication.transport import Link
    from harpsync.security import NodeKeys
    from harpsync.storage.conflicts import Review
    from harpsync.storage.database import Table
    from harpsync.storage.horizon import Sweep
    from harpsync.storage.ingest import ApplyStats
    from harpsync.storage.store import Storage

#: A peer's ``hdb_nodes`` row as this node keeps it (see peers.py for its fields).
PeerRow = Mapping[str, Any]
#: ``(key, stored value)`` rows of one table, in key order.
Rows = list[tuple[bytes, bytes]]
#: ``(publisher sequence, packed log entry)`` in increasing sequence order.
Entries = list[tuple[int, bytes]]
CommitListener = Callable[[int], None]
PositionListener = Callable[[], None]
#: Told ``(peer, database)`` when a link's full copy ended.
CopyListener = Callable[[str, str], None]


class LogSource(Protocol):
    """One database's replication log, as a publisher reads it.

    Reads are snapshots: ``read_log`` returns the pruned-through sequence and the
    entries after a cursor from one transaction, so they always agree.
    """

    name: str
    origin_names: dict[int, str]
    commit_listeners: list[CommitListener]
    tables: dict[str, Table]
    dropped: bool

    @property
    def head_seq(self) -> int:
        """The newest log sequence (0 for an empty log)."""
        ...

    @property
    def next_seq(self) -> int:
        """The sequence the next local commit will get."""
        ...

    def pruned_through(self) -> int:
        """Every entry up to this sequence was pruned."""
        ...

    opened_head: int  # the newest sequence when this process opened the log
    sent_to: dict[str, int]  # per peer, the highest sequence sent (this process)

    def pruned_max(self) -> dict[str, int]:
        """Per origin, the newest version pruned from this log."""
        ...

    def read_log(self, after_seq: int, limit: int) -> tuple[int, Entries]:
        """``(pruned_through, up to limit entries after after_seq)`` in one snapshot."""
        ...

    def origins_after(self, after_seq: int) -> set[int] | None:
        """The origin ids of the entries committed after ``after_seq``, when known
        without a read (None: unknown). Called by commit listeners."""
        ...

    def iter_rows(self, table: Table, after_key: bytes | None, limit: int,
                  tombs: bool = False) -> Rows:
        """Up to ``limit`` rows (or tombstones) of ``table`` after ``after_key``."""
        ...

    def table_size(self, table: Table) -> tuple[int, int]:
        """``(records, bytes)`` of ``table``."""
        ...

    def tombstone_count(self, table: Table) -> int:
        """How many tombstones ``table`` holds."""
        ...

    def swept_horizons(self) -> dict[str, list[int]]:
        """Per table, ``[incarnation, version]`` of the newest tombstone swept."""
        ...


class LinkHost(Protocol):
    """What any link (publisher, subscriber, a ``/.node`` exchange) needs from the node."""

    @property
    def node_name(self) -> str:
        """This node's name (it goes in every hello)."""
        ...

    @property
    def ping_interval(self) -> float:
        """Seconds between WebSocket pings on replication sockets."""
        ...

    def peer_row(self, peer: str) -> PeerRow | None:
        """``peer``'s ``hdb_nodes`` row, or None if this node does not know it."""
        ...

    def replicates_database(self, name: str) -> bool:
        """Whether ``name`` replicates here (``replication.databases``)."""
        ...

    def table_definitions(self, db: Any) -> dict[str, Any]:
        """The schema a hello describes for ``db``."""
        ...

    def check_peer(self, name: str, link: Link) -> str | None:
        """Why the certificate on ``link`` may not act as node ``name`` (None: it may)."""
        ...

    async def peer_operation(self, peer: str, body: dict[str, Any]) -> tuple[Any, str | None]:
        """Run an operation a peer asked for: ``(result, error message)``."""
        ...


class PublisherHost(LinkHost, Protocol):
    """What a publisher (an accepted socket streaming this node's log) needs."""

    compression: bool

    def note_position(self, peer: str, database: str, seq: int, reset: bool = False) -> None:
        """``peer`` holds this node's log through ``seq`` (``reset``: a copy starts)."""
        ...

    def note_log_replaced(self, database: str) -> None:
        """A peer's cursor is past this node's log of ``database``: it was restored."""
        ...

    def note_ack(self, peer: str, database: str, seq: int) -> None:
        """``peer`` acknowledged this node's log through ``seq``."""
        ...

    async def held_floors(self, db: Any, through_seq: int) -> dict[str, int]:
        """Per origin, a version through which ``db`` holds all of that origin's
        transactions, as committed (``storage.logscan.held_floors``): what a copy taken
        at ``through_seq`` and read after this carries."""
        ...


class LinkStore(Protocol):
    """What a subscriber reads and writes on this node: its cursor, the schema its hello
    describes, and the apply jobs (each commits the cursor with the data it applies).

    The write methods return an awaitable that runs one writer job; the subscriber
    keeps it, so stopping a link can wait for a job already in the writer thread.
    ``harpsync.replication.linkstore.StorageLinkStore`` implements it over storage.
    """

    def has_database(self, name: str) -> bool:
        """Whether database ``name`` exists here."""
        ...

    def hello_schema(self, database: str) -> tuple[dict[str, Any], dict[int, str]]:
        """``(tables, origin names)`` this node's hello describes for ``database``."""
        ...

    def cursor(self, database: str, peer: str) -> dict[str, Any]:
        """The committed cursor of ``peer``'s link for ``database`` (``{}``: none)."""
        ...

    def origin_floors(self, database: str, origins: Iterable[str]) -> dict[str, int | None]:
        """The newest version held from each origin, by any path (None: nothing)."""
        ...

    def wall_now_ms(self) -> int:
        """This node's wall clock, in milliseconds (for lag)."""
        ...

    async def learn_schema(self, database: str, tables: Mapping[str, Any], peer: str) -> None:
        """Create what ``peer``'s hello for ``database`` describes and this node lacks."""
        ...

    def write_cursor(self, database: str, peer: str, cursor: dict[str, Any],
                     sweeps: Sequence[Sweep] = (),
                     floors: Mapping[str, int] | None = None) -> Awaitable[Any]:
        """Commit ``cursor`` for ``peer``'s link alone (with the ``sweeps`` of its copy's
        end: ingest.apply_sweeps, and the per-origin ``floors`` it carried, raised:
        ingest.raise_floors)."""
        ...

    def apply_entries(self, database: str, peer: str, entries: Entries,
                      origins: Mapping[int, str], cursor: dict[str, Any], max_skew_ms: int,
                      local_name: str, floor: int, review: Review | None,
                      held_floors: frozenset[str] = frozenset(),
                      ) -> Awaitable[ApplyStats]:
        """Apply log entries and commit ``cursor`` with them (see ingest.apply_entries_job)."""
        ...

    def apply_rows(self, database: str, peer: str, table: str, rows: Rows,
                   origins: Mapping[int, str], cursor: dict[str, Any], floor: int,
                   incarnation: int | None, review: Review | None,
                   sweeps: Sequence[Sweep] = ()) -> Awaitable[Any]:
        """Merge full-copy rows and commit ``cursor`` with them (ingest.apply_rows_job)."""
        ...

    def dead_letter(self, database: str, peer: str, letters: list[dict[str, Any]],
                    cursor: dict[str, Any]) -> Awaitable[Any]:
        """Store dead letters and move ``peer``'s cursor past them, together."""
        ...


class OriginPlanner(Protocol):
    """Which origins a link carries (``relays.RelayPlanner``)."""

    def covered(self, peer: str, database: str) -> set[str]:
        """The origins the link from ``peer`` asks for: the peer and those it relays."""
        ...

    async def release(self, origin: str, database: str) -> None:
        """Hand ``origin`` back from its relay before its direct link subscribes."""
        ...


class PeerDialer(Protocol):
    """How a subscriber reaches its peer."""

    async def dial_peer(self, peer: str, url: str, path: str) -> Link:
        """Open a replication socket to ``peer`` at ``url`` + ``path`` (mutual TLS).

        Raises:
            One of ``transport.DIAL_ERRORS`` when the peer cannot be reached.
        """
        ...

    def peer_gate(self, peer: str) -> PeerGate:
        """The reachability shared by every link to ``peer``."""
        ...

    def offers_compression(self, url: str) -> bool:
        """Whether a link dialing ``url`` offers zstd."""
        ...


class ApplyPolicy(Protocol):
    """The settings an apply job follows."""

    max_skew_ms: int

    def start_floor(self, peer: str) -> int:
        """Versions of ``peer`` at or below this are skipped (its ``start_time``)."""
        ...

    def review(self, peer: str, database: str) -> Review | None:
        """The conflict-policy review for one apply job (None: all last-writer-wins)."""
        ...

    def narrow_origins(self, peer: str, database: str,
                       relay_tables: Mapping[str, list[str]] | None = None,
                       origins: Collection[str] = ()) -> frozenset[str]:
        """Origins (of those with rows here, and ``origins``) this node takes tables of
        that the link from ``peer`` does not carry: entries of theirs applied from it
        must not raise their floors."""
        ...

    def origin_tables(self, peer: str, database: str) -> dict[str, list[str]]:
        """Per origin an operator limited the tables of (``peers.origin_tables``): the
        only ones of its writes the link from ``peer`` may hand over."""
        ...


class SubscriberReports(Protocol):
    """What a subscriber tells the node (metrics, logs, listeners)."""

    def note_dialed(self, peer: str, database: str, reconnect: bool) -> None:
        """A link's socket opened (``reconnect``: after an earlier one dropped; not
        after a pause, a restart to change origins, or a link re-made)."""
        ...

    def note_received(self, peer: str, database: str, txns: int, last_version: int) -> None:
        """Count transactions applied from ``peer`` (``last_version``: the newest
        applied, 0 if none). Bytes are the link's wire bytes, counted at each scrape."""
        ...

    def note_apply_seconds(self, peer: str, database: str, seconds: float) -> None:
        """How long one writer job of the link took."""
        ...

    def note_review(self, peer: str, database: str, review: Review | None) -> None:
        """Count what the conflict policies of one apply job did."""
        ...

    def note_dead_letters(self, peer: str, database: str, count: int) -> None:
        """Count changes moved to the dead letters."""
        ...

    def note_skew(self, peer: str, count: int) -> None:
        """Count transactions held back for clock skew."""
        ...

    def copy_finished(self, peer: str, database: str) -> None:
        """A link's full copy ended."""
        ...

    def logins_changed(self) -> None:
        """Users or roles may have changed (a ``system`` copy applied rows)."""
        ...

    def operation_completed(self, event: Any) -> None:
        """A peer answered an operation this node asked for."""
        ...


class ApplyHost(ApplyPolicy, SubscriberReports, Protocol):
    """What a link's applier (``applier.py``) needs from the node."""

    @property
    def node_name(self) -> str:
        """This node's name (its own entries are never applied)."""
        ...


class SubscriberHost(LinkHost, PeerDialer, ApplyHost, Protocol):
    """Everything a subscriber needs from the node besides its :class:`LinkStore` and
    :class:`OriginPlanner`: each part is one of the small protocols above."""


class NodeClient(Protocol):
    """What one ``/.node`` request to a peer needs (membership.py's ``node_request``)."""

    keys: NodeKeys

    @property
    def ping_interval(self) -> float: ...

    def check_peer(self, name: str, link: Link) -> str | None: ...

    def check_vouched(self, link: Link) -> str | None: ...


class NodeServer(Protocol):
    """What answering a ``/.node`` request needs (membership.py's ``serve_node_request``)."""

    @property
    def node_name(self) -> str: ...

    def check_peer(self, name: str, link: Link) -> str | None: ...

    async def check_join_credentials(self, address: str, username: str,
                                     password: str) -> None:
        """Check (and throttle) a joiner's super_user credentials."""
        ...

    async def accept_join(self, body: dict[str, Any],
                          credentialed: bool = False) -> dict[str, Any]: ...

    async def forget_node(self, name: str, notify: bool) -> None: ...

    async def learn_nodes(self, nodes: list[Any], reconcile: bool = True) -> None: ...

    async def peer_operation(self, peer: str, body: dict[str, Any]) -> tuple[Any, str | None]:
        ...


class MeshHost(Protocol):
    """What membership (mesh.py) needs from the link runtime: its address and the
    power to start, stop and close links when rows change."""

    keys: NodeKeys

    @property
    def url(self) -> str:
        """This node's replication URL."""
        ...

    @property
    def ping_interval(self) -> float: ...

    @property
    def reconcile_lock(self) -> asyncio.Lock:
        """Held while links are reconciled; hold it to change a peer's cursors."""
        ...

    def check_peer(self, name: str, link: Link) -> str | None: ...

    def check_vouched(self, link: Link) -> str | None: ...

    async def reconcile(self, restart_peer: str | None = None) -> None:
        """Start the links the rows call for, stop the others (restart ``restart_peer``'s)."""
        ...

    async def stop_links(self, name: str) -> None:
        """Stop ``name``'s links and wait for their writes (reconcile lock held)."""
        ...

    async def drop_inbound(self, name: str, reason: str) -> None:
        """Close the sockets ``name`` opened to this node."""
        ...

    async def drop_relaying(self, origin: str, reason: str) -> None:
        """Close the sockets of peers this node relays ``origin``'s writes to."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, outliving the request that started it."""
        ...



class StatusSource(Protocol):
    """What the read side (``cluster_status``, ``get_replication_status``, the gauges of
    ``/metrics``) reads of the link runtime; it changes nothing through it."""

    metrics: Metrics
    storage: Storage
    default_conflict: str
    subscribers: dict[tuple[str, str], Subscriber]
    publishers: dict[tuple[str, str], set[Publisher]]
    verified: dict[tuple[str, str], dict[str, Any]]
    counts: LinkCounts
    acks: dict[tuple[str, str], int]
    positions: dict[tuple[str, str], int]
    keys: NodeKeys

    @property
    def node_name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """The peers' ``hdb_nodes`` rows."""
        ...
