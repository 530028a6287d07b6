"""The replication runtime: links to every peer in ``hdb_nodes``, and the listener.

It ties the sans-I/O sessions to storage and sockets: one ``Subscriber`` per
(peer, database) dials out and applies; one ``Publisher`` per accepted socket streams
this node's log. Membership changes (``add_node``, mesh gossip, ``remove_node``)
reconcile the set of links.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from harpsync.listening import bind as bind_listener
from harpsync.replication import applypolicy, maintenance, peers, routes
from harpsync.replication.controls import StreamControls
from harpsync.replication.inbound import Inbound
from harpsync.replication.linkcounts import LinkCounts
from harpsync.replication.linkstore import StorageLinkStore, held_floors, table_definitions
from harpsync.replication.mesh import Mesh
from harpsync.replication.publisher import Publisher
from harpsync.replication.reconnect import DIAL_TIMEOUT, PeerGate
from harpsync.replication.relays import RelayPlanner, asking
from harpsync.replication.routes import is_loopback
from harpsync.replication.seams import (
    LinkStore,
    LogSource,
    MeshHost,
    NodeServer,
    OriginPlanner,
    PublisherHost,
    StatusSource,
    SubscriberHost,
)
from harpsync.replication.subscriber import Subscriber
from harpsync.replication.transport import Gate, Link, dial, listen
from harpsync.storage import deadletters
from harpsync.storage.conflicts import PolicyLookup, Review
from harpsync.storage.database import Database
from harpsync.storage.store import SYSTEM, Storage

if TYPE_CHECKING:
    from harpsync.auth import Authenticator
    from harpsync.config import Config
    from harpsync.metrics import Metrics
    from harpsync.security import NodeKeys

log = logging.getLogger(__name__)


class Replicator:
    """All replication of one node."""

    def __init__(self, config: Config, storage: Storage, keys: NodeKeys, auth: Authenticator,
                 metrics: Metrics) -> None:
        self.config = config
        self.settings = settings = config.replication_settings()
        self.storage = storage
        self.keys = keys
        self.auth = auth
        self.metrics = metrics
        self.node_name: str = settings.node_name
        self.url: str = ""
        self.ping_interval = settings.ping_interval
        self.max_skew_ms = config.duration_ms("replication.maxClockSkew")  # live setting
        # "auto": compress except to peers on this host (there bytes cost nothing and
        # compressing would only spend CPU); "zstd": always; "none": never.
        self.compression_mode = settings.compression
        self.compression: bool = self.compression_mode != "none"
        self.default_conflict = settings.conflict
        # The hdb_nodes rows, joins, gossip and removals (mesh.py).
        self.mesh = Mesh(self, storage, keys, auth, self.node_name)
        self.subscribers: dict[tuple[str, str], Subscriber] = {}
        self.gates: dict[str, PeerGate] = {}
        self.link_store = StorageLinkStore(storage)
        self.relays = RelayPlanner(self.node_name, lambda: self.subscribers,
                                   self.replicated_databases, self._known_origins,
                                   lambda db: asking(self.publishers, db),
                                   self._carries_all)
        # The sockets peers opened here (inbound.py), and the operator's stream
        # controls (controls.py).
        self.inbound = Inbound(self, lambda name: storage.databases.get(name))
        # Its publishers by (peer, database): the one dict, read by status and relays.
        self.publishers: dict[tuple[str, str], set[Publisher]] = self.inbound.publishers
        self.controls = StreamControls(self, self.relays)
        self.acks: dict[tuple[str, str], int] = {}
        # How far each peer has durably applied this node's log, per database (acks and
        # the cursor a subscribe starts from); listeners hear of every advance.
        self.positions: dict[tuple[str, str], int] = {}
        self.position_listeners: list[Callable[[], None]] = []
        self.counts = LinkCounts(metrics, storage.hlc.wall_now_ms)
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self._server: Any = None
        self._sock: socket.socket | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._reconcile_lock = asyncio.Lock()
        self.operation_handlers: dict[str, Callable[..., Any]] = {}
        # Last verification per (peer, database) and who to tell when a full copy ends.
        self.verified: dict[tuple[str, str], dict[str, Any]] = {}
        self.copy_listeners: list[Callable[[str, str], None]] = []
        storage.replicates = self.replicates_database

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        if sock is None:
            sock = bind_listener(self.settings.host, self.settings.port,
                                 "replication.host, replication.port", 256)
        self._sock = sock
        self.url = self.config.replication_url(self.port)
        context = self.keys.server_context() if self.url.startswith("wss://") else None
        self.gate = Gate(self.settings.max_pending_per_address, self.settings.max_connections)
        self._server = await listen(sock, context, self.inbound.accept, self.ping_interval,
                                    self.gate)
        self.mesh.load_rows()
        await self.mesh.save_own_row()
        await self.mesh.scrub_secrets()
        self.storage.database_listeners.append(self._on_database_event)
        self.metrics.bind_pending(
            lambda: deadletters.count(self.storage, deadletters.CONFLICTS),
            lambda: deadletters.count(self.storage, deadletters.DEAD_LETTERS))
        await self.reconcile()
        self.spawn(maintenance.retention_loop(
            self.storage, self.settings.retention_interval, self.config.retention_ms,
            self.ack_floor, lambda db: maintenance.limited_tables(self.rows, db)))
        self.spawn(self.relays.run())
        for route in self.config.get("replication.routes") or []:
            self.spawn(self.connect_route(route))

    async def stop(self) -> None:
        for task in list(self._background):  # the relay planner restarts links: first
            task.cancel()
        for sub in list(self.subscribers.values()):
            await sub.retire()
        self.subscribers.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        # A fresh context: background work outlives the request that started it.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- membership (mesh.py) ----------------------------------------------------------
    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """The peers' ``hdb_nodes`` rows (owned by :attr:`mesh`)."""
        return self.mesh.rows

    def peer_row(self, peer: str) -> dict[str, Any] | None:
        """``peer``'s ``hdb_nodes`` row (None: not known here)."""
        return self.mesh.rows.get(peer)

    async def save_row(self, row: dict[str, Any]) -> None:
        await self.mesh.save_row(row)

    def check_peer(self, name: str, link: Link) -> str | None:
        """Why the certificate on ``link`` may not act as node ``name`` (see
        :meth:`Mesh.check_peer`)."""
        return self.mesh.check_peer(name, link)

    def check_vouched(self, link: Link) -> str | None:
        """The server's certificate is signed by the CA of the node it names (see
        :meth:`Mesh.check_vouched`)."""
        return self.mesh.check_vouched(link)

    async def check_join_credentials(self, address: str, username: str,
                                     password: str) -> None:
        await self.mesh.check_join_credentials(address, username, password)

    async def accept_join(self, body: dict[str, Any],
                          credentialed: bool = False) -> dict[str, Any]:
        return await self.mesh.accept_join(body, credentialed)

    async def join(self, url: str, credentials: tuple[str, str] | None, verify: bool,
                   subscriptions: list[dict[str, Any]] | None, extra: dict[str, Any],
                   expect: str | None = None) -> dict[str, Any]:
        return await self.mesh.join(url, credentials, verify, subscriptions, extra, expect)

    async def probe(self, url: str, credentials: tuple[str, str] | None,
                    verify: bool, expect: str | None = None) -> str:
        return await self.mesh.probe(url, credentials, verify, expect)

    async def adopt(self, answer: dict[str, Any], url: str, row: dict[str, Any]) -> str:
        return await self.mesh.adopt(answer, url, row)

    async def set_revoked(self, name: str, revoked: list[Any] | None) -> None:
        await self.mesh.set_revoked(name, revoked)

    def stage_settings(self, row: dict[str, Any]) -> None:
        self.mesh.stage_settings(row)

    def sends_more(self, name: str, row: dict[str, Any]) -> list[str]:
        return self.mesh.sends_more(name, row)

    def unstage_settings(self, name: str) -> None:
        self.mesh.unstage_settings(name)

    async def learn_nodes(self, nodes: list[Any], reconcile: bool = True) -> None:
        await self.mesh.learn_nodes(nodes, reconcile)

    async def forget_node(self, name: str, notify: bool) -> None:
        await self.mesh.forget_node(name, notify)

    def is_selective(self) -> bool:
        return self.mesh.is_selective()

    # -- links -------------------------------------------------------------------------
    def replicates_database(self, name: str) -> bool:
        """Whether ``name`` replicates: ``replication.databases`` ("*" or a list) + system."""
        setting = self.config.get("replication.databases")
        if setting in (None, "*") or name == SYSTEM:
            return True
        allowed = setting if isinstance(setting, list) else str(setting).split(",")
        return name in {str(a).strip() for a in allowed}

    def replicated_databases(self) -> list[str]:
        """Databases that replicate here (the others are local to this node)."""
        return [n for n in list(self.storage.databases) if self.replicates_database(n)]

    def _wanted(self) -> set[tuple[str, str]]:
        wanted = set()
        for name, row in list(self.rows.items()):
            if not row.get("url"):
                continue
            for db_name in self.replicated_databases():
                if peers.subscribe_tables(row, db_name) is not False:
                    wanted.add((name, db_name))
        return wanted

    async def reconcile(self, restart_peer: str | None = None) -> None:
        """Start links that should exist and stop those that should not."""
        async with self._reconcile_lock:
            wanted = self._wanted()
            for key in list(self.subscribers):
                if key not in wanted or key[0] == restart_peer:
                    await self._retire(key)
                elif restart_peer is not None and restart_peer in self.relays.covered(*key):
                    # It relays restart_peer's writes: subscribe again, with the limits
                    # of restart_peer's new row (``origin_tables``).
                    await self.subscribers[key].restart()
            for key in sorted(wanted):
                if key not in self.subscribers:
                    sub = Subscriber(self, self.link_store, self.relays, *key)
                    sub.count_from(*self.counts.carried(key))
                    self.subscribers[key] = sub
                    if key[1] in (self.rows.get(key[0], {}).get("paused") or []):
                        sub.hold()  # paused before a restart
                        continue
                    sub.start()
            for key in self.counts.forget(wanted, self.rows):
                self.verified.pop(key, None)
            maintenance.forget_removed(self.rows, self.acks, self.positions, self.gates)

    async def _retire(self, key: tuple[str, str]) -> None:
        """Stop a link; a link re-made for it (update_node) counts on from its counts,
        as the Prometheus counters do (before, cluster_status's restarted at 0)."""
        sub = self.subscribers.pop(key)
        await sub.retire()
        self.counts.retired(key, sub.txns_received, sub.bytes_received)

    def offers_compression(self, url: str) -> bool:
        """Whether a link dialing ``url`` offers zstd (see ``compression_mode``)."""
        if self.compression_mode == "auto":
            return not is_loopback(url)
        return self.compression_mode == "zstd"

    def _known_origins(self, database: str) -> list[str]:
        """Every node whose transactions this node may need for ``database``."""
        names = set(self.rows)
        db = self.storage.databases.get(database)
        if db is not None:
            names.update(db.origin_names.values())
        return sorted(names)

    def peer_gate(self, peer: str) -> PeerGate:
        """The reachability shared by every link to ``peer``."""
        gate = self.gates.get(peer)
        if gate is None:
            gate = self.gates[peer] = PeerGate()
        return gate

    async def stop_links(self, name: str) -> None:
        """Stop every link from ``name`` and wait for their in-flight writes (call with
        the reconcile lock held, so nothing restarts them meanwhile)."""
        for key in [k for k in self.subscribers if k[0] == name]:
            await self._retire(key)

    @property
    def reconcile_lock(self) -> asyncio.Lock:
        """Held while links are reconciled, and while a link's cursors change (mesh.py)."""
        return self._reconcile_lock

    def _on_database_event(self, event: str, name: str) -> None:
        def run() -> None:
            if event == "dropped":  # a new log of that name starts again at sequence 1
                maintenance.forget_database(name, self.acks, self.positions)
            self.spawn(self.reconcile())

        self.loop.call_soon_threadsafe(run)

    def table_definitions(self, db: Database) -> dict[str, Any]:
        """The schema our hello describes (tables, drop markers; databases in system)."""
        return table_definitions(self.storage, db)

    async def held_floors(self, db: Database, through_seq: int) -> dict[str, int]:
        """What a copy of ``db`` taken at ``through_seq`` carries of each origin."""
        return await held_floors(db, through_seq)

    async def dial_peer(self, peer: str, url: str, path: str) -> Link:
        """Open a replication socket to ``peer`` (mutual TLS, its name checked)."""
        # Who answers is checked by its certificate's name, CA and pinned key before a
        # byte is sent (Subscriber._connect_once), not by the URL's host: an operator
        # may add a peer by an address its certificate does not list.
        context = self.keys.client_context(verify=True, peer_name=peer, check_hostname=False)
        return await dial(url, path, context, self.ping_interval, timeout=DIAL_TIMEOUT)

    # -- the listener (inbound.py) ----------------------------------------------------
    async def drop_inbound(self, name: str, reason: str) -> None:
        """Close the sockets ``name`` opened to this node; it reconnects if still allowed."""
        await self.inbound.drop_inbound(name, reason)

    async def drop_relaying(self, origin: str, reason: str) -> None:
        """Close the sockets of the peers this node relays ``origin``'s writes to."""
        await self.inbound.drop_relaying(origin, reason)

    # -- operator controls (controls.py) ----------------------------------------------
    async def pause(self, peer: str, database: str | None) -> list[str]:
        """Stop receiving from ``peer``; the committed cursor is kept."""
        return await self.controls.pause(peer, database)

    async def resume(self, peer: str, database: str | None) -> list[str]:
        """Restart paused links from their committed cursor."""
        return await self.controls.resume(peer, database)

    async def replay(self, peer: str, database: str | None, from_seq: int | None,
                     from_version: int | None) -> list[str]:
        """Rewind links to a publisher sequence and stream again."""
        return await self.controls.replay(peer, database, from_seq, from_version)

    # -- conflict policies (storage/conflicts.py) --------------------------------------
    def policy_lookup(self, database: str) -> PolicyLookup | None:
        """``(origin, table) -> policy`` for ``database`` (None: all last-writer-wins)."""
        return applypolicy.policy_lookup(self.rows, database, self.default_conflict)

    def review(self, peer: str, database: str) -> Review | None:
        """The policy review for one apply job of the link from ``peer``."""
        lookup = self.policy_lookup(database)
        if lookup is None:
            return None
        return Review(self.storage, peer, lookup, deadletters.refuser(self.storage, peer))

    def origin_tables(self, peer: str, database: str) -> dict[str, list[str]]:
        return peers.origin_tables(dict(self.mesh.rows), peer, database)

    def _carries_all(self, peer: str, origin: str, database: str) -> bool:
        """Whether the link from ``peer`` carries all this node takes of ``origin``
        (the relay planner prefers such a relay)."""
        link = self.subscribers.get((peer, database))
        relay_tables = link.applier.relay_tables if link is not None else None
        return origin not in self.narrow_origins(peer, database, relay_tables, (origin,))

    def narrow_origins(self, peer: str, database: str,
                       relay_tables: Mapping[str, list[str]] | None = None,
                       origins: Collection[str] = ()) -> frozenset[str]:
        """Origins whose floors entries from ``peer`` must not raise (applypolicy.py)."""
        return applypolicy.narrow_origins(self.rows, peer, database, relay_tables, origins)

    # -- routes (routes.py) ------------------------------------------------------------
    route_url = staticmethod(routes.route_url)

    async def connect_route(self, route: Any) -> None:
        """Pair with a configured route, retrying with backoff until it answers."""
        await routes.connect_route(self.mesh, self.config, self.url, route)

    async def drop_route(self, route: Any) -> None:
        await routes.drop_route(self.mesh, route)

    def ack_floor(self, database: str) -> int | None:
        """The sequence of ``database``'s log every peer receiving it acknowledged."""
        return maintenance.ack_floor(self.acks, self.rows, database)

    # -- hooks used by links -----------------------------------------------------------
    def note_ack(self, peer: str, database: str, seq: int) -> None:
        self.acks[(peer, database)] = seq
        self.note_position(peer, database, seq)

    def note_position(self, peer: str, database: str, seq: int, reset: bool = False) -> None:
        """``peer`` holds this node's ``database`` log through ``seq`` (``reset``: it starts
        a full copy, so it holds nothing certain until that ends). Its acknowledgement (what
        retention lets tombstones go by) and the position ``wait_for_replication`` trusts
        come down to it: a subscribe from an older cursor (a peer restored from a backup)
        or a copy says the peer no longer holds what its previous session acknowledged."""
        key = (peer, database)
        if reset or seq < self.acks.get(key, 0):
            self.acks[key] = 0 if reset else seq
        if reset or seq < self.positions.get(key, 0):
            self.positions[key] = 0 if reset else seq
        elif seq > self.positions.get(key, 0):
            self.positions[key] = seq
            for listener in list(self.position_listeners):
                listener()

    def note_log_replaced(self, database: str) -> None:
        self.spawn(maintenance.note_log_replaced(self.storage, database))

    def note_received(self, peer: str, database: str, txns: int, last_version: int) -> None:
        self.counts.received((peer, database), txns, last_version)

    def note_apply_seconds(self, peer: str, database: str, seconds: float) -> None:
        self.counts.apply_seconds((peer, database), seconds)

    def copy_finished(self, peer: str, database: str) -> None:
        for listener in list(self.copy_listeners):
            listener(peer, database)

    def logins_changed(self) -> None:
        self.auth.forget_logins()

    def note_dialed(self, peer: str, database: str, reconnect: bool) -> None:
        if reconnect:
            self.metrics.reconnects.labels(peer, database).inc()

    def note_review(self, peer: str, database: str, review: Review | None) -> None:
        """Count what the conflict policies of one apply job did."""
        if review is None:
            return
        if review.conflicts:
            self.metrics.conflicts.labels(peer, database).inc(review.conflicts)
        if review.refused:
            self.metrics.dead_letters.labels(peer, database).inc(review.refused)
        review.conflicts = review.refused = 0

    def note_dead_letters(self, peer: str, database: str, count: int) -> None:
        self.metrics.dead_letters.labels(peer, database).inc(count)
        log.warning("%d change(s) from %s for '%s' moved to the dead letters", count, peer,
                    database)

    def note_skew(self, peer: str, count: int) -> None:
        self.metrics.clock_skew.labels(peer).inc(count)
        log.warning("%d transaction(s) from %s carry versions more than %d ms ahead of this "
                    "node's clock; check the clocks", count, peer, self.max_skew_ms)

    def start_floor(self, peer: str) -> int:
        return peers.start_floor(self.rows.get(peer))

    async def peer_operation(self, peer: str, body: dict[str, Any]) -> tuple[Any, str | None]:
        handler = self.operation_handlers.get(str(body.get("operation")))
        if handler is None:
            return None, f"unsupported operation {body.get('operation')!r}"
        try:
            return await handler(peer, body), None
        except Exception as exc:
            return None, str(exc)[:200]

    def operation_completed(self, event: Any) -> None:  # responses to our requests
        log.debug("operation result from peer: %s", event)

    # -- reports -----------------------------------------------------------------------
    def health(self) -> list[dict[str, Any]]:
        out = []
        for (peer, database), sub in sorted(self.subscribers.items()):
            out.append({"node": peer, "database": database, "connected": sub.connected,
                        "state": sub.state,
                        "lag_txns": None if sub.lag_unknown else sub.lag_txns()})
        return out


if TYPE_CHECKING:
    def _implements_seams(rep: Replicator, db: Database,
                          ) -> tuple[PublisherHost, SubscriberHost, MeshHost, NodeServer,
                                     LogSource, LinkStore, OriginPlanner, StatusSource]:
        """mypy checks that the replicator and a database fill the seams they serve."""
        return rep, rep, rep, rep, db, rep.link_store, rep.relays, rep
