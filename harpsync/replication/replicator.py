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
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from harpsync.errors import BadRequestError, PeerError
from harpsync.replication import peers
from harpsync.replication.maintenance import retention_loop
from harpsync.replication.membership import NODE_PATH, node_request, serve_node_request
from harpsync.replication.publisher import Publisher
from harpsync.replication.relays import RelayPlanner
from harpsync.replication.seams import LogSource, PublisherHost, SubscriberHost
from harpsync.replication.subscriber import PeerGate, Subscriber, backoff_delay
from harpsync.replication.transport import Gate, Link, listen
from harpsync.security import PeerCert, check_node_cert, valid_pin
from harpsync.storage import deadletters, reads, writes
from harpsync.storage.conflicts import LWW, PolicyLookup, Review
from harpsync.storage.database import Database
from harpsync.storage.hlc import wall_ms_of
from harpsync.storage.ingest import forget_cursor, write_cursor
from harpsync.storage.keys import encode_id
from harpsync.storage.records import get_stored
from harpsync.storage.schema import describe_schema
from harpsync.storage.store import SYSTEM, Storage

log = logging.getLogger(__name__)

DEFAULT_PORT = 9933


class Replicator:
    """All replication of one node."""

    def __init__(self, config: Any, storage: Storage, keys: Any, auth: Any, metrics: Any) -> None:
        self.config = config
        self.storage = storage
        self.keys = keys
        self.auth = auth
        self.metrics = metrics
        self.node_name: str = config.node_name
        self.url: str = ""
        self.ping_interval = config.duration_ms("replication.pingInterval") / 1000.0
        self.max_skew_ms = config.duration_ms("replication.maxClockSkew")
        # "auto": compress except to peers on this host (there bytes cost nothing and
        # compressing would only spend CPU); "zstd": always; "none": never.
        self.compression_mode = str(config.get("replication.compression"))
        self.compression: bool = self.compression_mode != "none"
        self.default_conflict = str(config.get("replication.conflict"))
        self.rows: dict[str, dict[str, Any]] = {}
        self.subscribers: dict[tuple[str, str], Subscriber] = {}
        self.gates: dict[str, PeerGate] = {}
        self.relays = RelayPlanner(self.node_name, lambda: self.subscribers,
                                   self.replicated_databases, self._known_origins)
        self.publishers: dict[tuple[str, str], set[Publisher]] = {}
        self.acks: dict[tuple[str, str], int] = {}
        # How far each peer has durably applied this node's log, per database (acks and
        # the cursor a subscribe starts from); listeners hear of every advance.
        self.positions: dict[tuple[str, str], int] = {}
        self.position_listeners: list[Callable[[], None]] = []
        self._dialed: set[tuple[str, str]] = set()
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self._server: Any = None
        self._sock: socket.socket | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._reconcile_lock = asyncio.Lock()
        self.operation_handlers: dict[str, Callable[..., Any]] = {}
        storage.replicates = self.replicates_database

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        if sock is None:
            # IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted sockets.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.get("replication.host"),
                       int(self.config.get("replication.port"))))
            sock.listen(256)
            sock.setblocking(False)
        self._sock = sock
        self.url = self.config.replication_url(self.port)
        context = self.keys.server_context() if self.url.startswith("wss://") else None
        self.gate = Gate(int(self.config.get("replication.maxPendingPerAddress")),
                         int(self.config.get("replication.maxConnections")))
        self._server = await listen(sock, context, self._accept, self.ping_interval, self.gate)
        self._load_rows()
        await self._save_own_row()
        await self._scrub_secrets()
        self.storage.database_listeners.append(self._on_database_event)
        self.metrics.bind_pending(
            lambda: deadletters.count(self.storage, deadletters.CONFLICTS),
            lambda: deadletters.count(self.storage, deadletters.DEAD_LETTERS))
        await self.reconcile()
        self.spawn(retention_loop(self))
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

    def spawn(self, coro: Any) -> None:
        # A fresh context: background work outlives the request that started it.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- rows of hdb_nodes -------------------------------------------------------------
    def _load_rows(self) -> None:
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        self.rows = {r["name"]: r for r in reads.scan(db, table) if r.get("name") != self.node_name}
        for row in self.rows.values():
            if row.get("ca"):
                with contextlib.suppress(ValueError):
                    self.keys.trust_ca(row["ca"])

    async def _scrub_secrets(self) -> None:
        """Forget peer passwords older versions kept with ``retain_authorization``."""
        for name, row in list(self.rows.items()):
            if row.get("authorization") is not None:
                await self.save_row({"name": name, "authorization": None})

    async def _write_row(self, row: dict[str, Any], mode: str = "upsert") -> None:
        await self.storage.write(writes.write_records(self.storage, SYSTEM, "hdb_nodes", [row],
                                                      mode, None))

    async def _save_own_row(self) -> None:
        await self._write_row({"name": self.node_name, "url": self.url,
                               "ca": self.keys.ca_pem.decode(), "replicates": True})

    async def save_row(self, row: dict[str, Any]) -> None:
        await self._write_row(row)
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        stored = reads.get_by_ids(db, table, [row["name"]])
        if stored:
            self.rows[row["name"]] = stored[0]

    def peer_row(self, peer: str) -> dict[str, Any] | None:
        """``peer``'s ``hdb_nodes`` row (None: not known here)."""
        return self.rows.get(peer)

    def _was_removed(self, name: str) -> bool:
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        with db.env.begin() as txn:
            stored = get_stored(txn, table, encode_id(name))
        return stored is not None and stored[2] is None

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
                    await self.subscribers.pop(key).retire()
            for key in sorted(wanted):
                if key not in self.subscribers:
                    sub = Subscriber(self, *key)
                    self.subscribers[key] = sub
                    if key[1] in (self.rows.get(key[0], {}).get("paused") or []):
                        sub.paused, sub.state = True, "paused"  # paused before a restart
                        continue
                    sub.start()

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

    async def _stop_links(self, name: str) -> None:
        """Stop every link from ``name`` and wait for their in-flight writes (call with
        the reconcile lock held, so nothing restarts them meanwhile)."""
        for key in [k for k in self.subscribers if k[0] == name]:
            await self.subscribers.pop(key).retire()

    def _on_database_event(self, _event: str, _name: str) -> None:
        self.loop.call_soon_threadsafe(lambda: self.spawn(self.reconcile()))

    def table_definitions(self, db: Database) -> dict[str, Any]:
        """The schema our hello describes (tables, drop markers; databases in system)."""
        return describe_schema(self.storage, db,
                               lambda name: peers.table_allowed(db.name, name, None))

    # -- the listener ------------------------------------------------------------------
    async def _accept(self, link: Link) -> None:
        if link.path == NODE_PATH:
            await serve_node_request(self, link)
            return
        database = link.path.strip("/")
        peer = link.peer
        if peer is None:
            await link.close(1008, "a verified node certificate is required")
            return
        refused = self.check_peer(peer.common_name, link)
        if refused is not None:
            await link.close(1008, refused)
            return
        link.authenticated()
        publisher = Publisher(self, link, peer.common_name, database)
        key = (peer.common_name, database)
        self.publishers.setdefault(key, set()).add(publisher)
        try:
            await publisher.run()
        finally:
            self.publishers.get(key, set()).discard(publisher)

    # -- trust (DESIGN.md "Trust model") -----------------------------------------------
    def revoked(self, row: dict[str, Any], serial_hex: str | None = None) -> bool:
        """Whether the node of ``row`` is revoked: the presented serial, or any serial
        recorded for that node when it joined, is in ``revoked_certificates``. A
        revoked node is refused whatever certificate it makes for its key."""
        revoked = row.get("revoked_certificates")
        if not revoked:
            return False
        known = [str(s) for s in row.get("serials") or []]
        return any(peers.serial_revoked(s, revoked)
                   for s in [*known, *([serial_hex] if serial_hex else [])])

    def check_peer(self, name: str, link: Link) -> str | None:
        """Why the certificate on ``link`` may not act as node ``name`` (None: it may).

        Used for accepted sockets (the client's certificate) and for dialed ones (the
        server's). The certificate must be named ``name``, be signed by that node's own
        CA or ours, carry the key pinned for that node, and the node must not be
        revoked. A row without a pin yet (a node learned by gossip from an older peer)
        is pinned to the first key that passes the CA check.
        """
        row = self.rows.get(name)
        if row is None:
            return f"unknown node {name}"
        cert = link.cert
        if cert is None:
            return "a node certificate is required"
        if cert.common_name != name:
            return f"certificate names {cert.common_name!r}, not {name!r}"
        if self.revoked(row, cert.serial_hex):
            return f"certificate of {name} revoked"
        if cert.pin in self.keys.barred_pins():
            return f"certificate of {name} carries the key of a removed node"
        if not cert.issued_by([row.get("ca") or "", self.keys.ca_pem]):
            return f"certificate for {name} not issued by its CA"
        pin = row.get("pin")
        if pin is None:
            row["pin"] = cert.pin  # trust on first verified use, limited to this name
            self.spawn(self._write_row({"name": name, "pin": cert.pin}))
        elif pin != cert.pin:
            return f"certificate key of {name} does not match the key pinned for it"
        return None

    # -- membership --------------------------------------------------------------------
    async def check_super_user(self, username: str, password: str) -> bool:
        """Whether these are a super_user's credentials (not throttled; see below)."""
        user = await asyncio.to_thread(self.auth.check_password, username, password)
        return user is not None and user.super_user

    async def check_join_credentials(self, address: str, username: str,
                                     password: str) -> None:
        """Check a joiner's super_user credentials, throttled per client address like
        HTTP logins (10 failures a minute, then 429 until the window passes).

        Raises:
            TooManyRequestsError: the address failed too often recently.
            PeerError: the credentials are wrong or not a super_user's.
        """
        self.auth.throttle.check(address)
        # scrypt is deliberately slow: keep it off the event loop.
        if not await self.check_super_user(username, password):
            self.auth.throttle.failed(address)
            raise PeerError("authorization failed: super_user credentials are required")

    async def accept_join(self, body: dict[str, Any],
                          credentialed: bool = False) -> dict[str, Any]:
        """A peer joins (or updates) its relationship with this node.

        With super_user credentials (``credentialed``) the joiner may name itself and
        its URL: its CSR is signed for exactly that name and URL host, and its key is
        pinned. A join proven only by the node's certificate changes settings
        (subscriptions, shard, start time): no certificate is issued and the recorded
        CA, URL and pin stay as they are.
        """
        name = str(body["node"])
        if name == self.node_name:
            raise BadRequestError("a node cannot join itself")
        subs = peers.normalize_subscriptions(body.get("subscriptions"))
        # Policies are this node's own: the peer's mirror never carries them.
        subs = peers.keep_policies((self.rows.get(name) or {}).get("subscriptions"), subs)
        existed = name in self.rows
        settings = {"replicates": subs is None, "subscriptions": subs,
                    "shard": body.get("shard"), "start_time": body.get("start_time")}
        cert: str | None = None
        if credentialed:
            url = str(body["url"])
            if urlparse(url).scheme not in ("ws", "wss") or not urlparse(url).hostname:
                raise BadRequestError(f"'url' must look like wss://host:port, got {url[:100]!r}")
            issued = self.keys.sign_csr(str(body.get("csr") or ""), name,
                                        urlparse(url).hostname)
            ca = str(body["ca"])
            serials = [issued.serial_hex]
            if body.get("cert"):  # the joiner's own certificate: same key, its CA
                serials.append(check_node_cert(str(body["cert"]), ca, name, issued.pin))
            self.keys.trust_ca(ca)
            cert = issued.pem
            self.keys.bar_pin(issued.pin, barred=False)  # an operator adds it back
            row = {"name": name, "url": url, "ca": ca, "pin": issued.pin,
                   "serials": serials, **settings}
        else:
            row = {"name": name, **settings}
        await self._replace_row({**row, "learned": False})
        # The joiner's other nodes: one add_node joins this node to its whole mesh.
        await self.learn_nodes(list(body.get("nodes", [])), reconcile=False)
        await self.reconcile(restart_peer=name if existed else None)
        if credentialed and existed:  # a new key or CA: sockets made with the old go
            await self.drop_inbound(name, "node re-joined")
        self._gossip(exclude={name}, nodes=[peers.identity(self.rows[name])])
        return {"node": self.node_name, "url": self.url, "ca": self.keys.ca_pem.decode(),
                "cert": cert,
                "nodes": [peers.identity(r) for n, r in self.rows.items() if n != name]}

    async def join(self, url: str, credentials: tuple[str, str] | None, verify: bool,
                   subscriptions: list[dict[str, Any]] | None, extra: dict[str, Any],
                   expect: str | None = None) -> dict[str, Any]:
        """Ask the node at ``url`` to pair with this one; returns its answer.

        Without credentials the request is proven by this node's certificate and the
        server must be ``expect`` (its pinned key).
        """
        body: dict[str, Any] = {
            "type": "join", "node": self.node_name, "url": self.url,
            "ca": self.keys.ca_pem.decode(), "csr": self.keys.make_csr().decode(),
            "cert": self.keys.node_cert_pem.decode(),
            "subscriptions": peers.mirror(subscriptions),
            "shard": extra.get("shard"), "start_time": extra.get("start_time"),
            "nodes": [peers.identity(r) for r in self.rows.values() if r.get("url") != url],
        }
        if credentials is not None:
            body["authorization"] = list(credentials)
        return await node_request(self, url, body, verify=verify,
                                  present_cert=credentials is None, expect=expect)

    async def probe(self, url: str, credentials: tuple[str, str] | None,
                    verify: bool) -> str:
        """Check that the node at ``url`` answers over TLS and accepts these credentials
        (or this node's certificate), without joining; returns its name.

        Raises:
            PeerError: unreachable, TLS refused, or credentials refused.
        """
        body: dict[str, Any] = {"type": "probe", "node": self.node_name}
        if credentials is not None:
            body["authorization"] = list(credentials)
        answer = await node_request(self, url, body, verify=verify,
                                    present_cert=credentials is None)
        return str(answer.get("node", ""))

    async def adopt(self, answer: dict[str, Any], url: str, row: dict[str, Any]) -> str:
        """Record a peer after a successful join answer.

        The peer is pinned to the key its server certificate carried on the join
        socket, which must be named after the peer and signed by the CA it answered
        with (or, when the row exists already, the pin must match: node_request checked).
        """
        name = str(answer["node"])
        server: PeerCert | None = answer.pop("__server_cert__", None)
        existing = self.rows.get(name)
        pin_fields: dict[str, Any] = {}
        if server is None:
            raise BadRequestError(f"node at '{url}' presented no certificate")
        if server.common_name != name or not server.issued_by([str(answer["ca"])]):
            raise BadRequestError(f"node at '{url}' answered as {name!r} with a certificate "
                                  "that is not that node's")
        if existing is None or existing.get("pin") != server.pin:
            pin_fields = {"pin": server.pin, "serials": [server.serial_hex]}
        self.keys.bar_pin(server.pin, barred=False)  # an operator adds it (back)
        self.keys.trust_ca(answer["ca"])
        if answer.get("cert"):
            self.keys.store_peer_signed_cert(name, answer["cert"])
        existed = existing is not None
        await self._replace_row({**row, "name": name, "url": url, "ca": str(answer["ca"]),
                                 "learned": False, **pin_fields})
        await self.learn_nodes(list(answer.get("nodes", [])), reconcile=False)
        await self.reconcile(restart_peer=name if existed else None)
        if existed:  # settings such as revoked_certificates apply to its sockets now
            await self.drop_inbound(name, "node settings changed")
        self._gossip(exclude={name}, nodes=[peers.identity(self.rows[name])])
        return name

    async def _replace_row(self, row: dict[str, Any]) -> None:
        """Save an operator-made row. When the peer's subscriptions change, its cursors
        go: tables that now replicate must arrive with their history, so the links
        start with a full copy (merged by last-writer-wins, so nothing here is lost).

        The links are stopped first, and their in-flight apply jobs finished, so no
        late cursor write can bring a forgotten cursor back (which would skip the
        copy); the reconcile lock keeps them from restarting until the row is saved.
        """
        name = str(row["name"])
        async with self._reconcile_lock:
            old = self.rows.get(name)
            if old is not None and peers.without_policies(old.get("subscriptions")) \
                    != peers.without_policies(row.get("subscriptions")):
                await self._stop_links(name)
                await self._forget_cursors(name, include_system=False)
            await self.save_row(row)

    async def _forget_cursors(self, name: str, include_system: bool) -> None:
        for db in list(self.storage.databases.values()):
            if include_system or db.name != SYSTEM:
                await self.storage.write(functools.partial(forget_cursor, db=db, peer=name))

    def is_selective(self) -> bool:
        """Whether an operator gave this node explicit subscriptions with some peer:
        then links formed by gossip carry no data (see DESIGN.md, gossip rule)."""
        return any(r.get("subscriptions") is not None and not r.get("learned")
                   for r in list(self.rows.values()))

    async def learn_nodes(self, nodes: list[Any], reconcile: bool = True) -> None:
        """Add nodes heard of from a peer, unless known or deliberately removed here."""
        changed = False
        for node in nodes:
            if not isinstance(node, dict) or not node.get("name") or not node.get("url"):
                continue
            name = str(node["name"])
            if name == self.node_name or name in self.rows or self._was_removed(name):
                continue
            # Trust for a learned node is bound to its name: its CA vouches only for
            # certificates named after it (check_peer), with the key the introducer
            # saw (``pin``) or, if it sent none, the first key seen.
            learned = peers.identity(node)
            if not valid_pin(learned.get("pin")):
                learned.pop("pin", None)
            elif learned["pin"] in self.keys.barred_pins():
                continue  # a removed node coming back under another name
            if node.get("ca"):
                try:
                    self.keys.trust_ca(str(node["ca"]))
                except ValueError:
                    continue
            # Gossip never widens what an operator configured: a selective node, or a
            # node added somewhere with subscriptions, gets a system-only link.
            system_only = self.is_selective() or bool(node.get("selective"))
            await self.save_row({**learned, "learned": True,
                                 "selective": bool(node.get("selective")),
                                 "replicates": not system_only,
                                 "subscriptions": [] if system_only else None})
            changed = True
        if changed and reconcile:
            await self.reconcile()

    def _gossip(self, exclude: set[str], nodes: list[dict[str, Any]]) -> None:
        for name, row in list(self.rows.items()):
            if name in exclude or not row.get("url"):
                continue
            self.spawn(self._tell(row["url"], {"type": "mesh", "nodes": nodes}, name))

    async def _tell(self, url: str, body: dict[str, Any], name: str) -> None:
        try:
            await node_request(self, url, body, verify=True, present_cert=True, expect=name)
        except Exception as exc:
            log.info("could not tell %s about the mesh: %s", url, exc)

    async def forget_node(self, name: str, notify: bool) -> None:
        """Stop replicating with ``name`` and delete its row (both sides if ``notify``)."""
        row = self.rows.get(name)
        if row is None:
            raise BadRequestError(f"{name} does not exist")
        if notify and row.get("url"):
            with contextlib.suppress(Exception):
                await node_request(self, row["url"], {"type": "remove"}, verify=True,
                                   present_cert=True, timeout=5, expect=name)
        if row.get("pin"):
            self.keys.bar_pin(str(row["pin"]))
        async with self._reconcile_lock:
            await self.storage.write(writes.delete_records(self.storage, SYSTEM, "hdb_nodes",
                                                           [name], None))
            self.rows.pop(name, None)
            # Its cursors go too: if it comes back, it may be a new node with a new log.
            # The links stop (in-flight writes done) first, or one could write it back.
            await self._stop_links(name)
            await self._forget_cursors(name, include_system=True)
        await self.reconcile()
        await self.drop_inbound(name, "node removed")

    async def drop_inbound(self, name: str, reason: str) -> None:
        """Close the sockets ``name`` opened to this node; it reconnects if still allowed."""
        links = [pub.link for key, pubs in list(self.publishers.items()) if key[0] == name
                 for pub in list(pubs)]

        async def close(link: Link) -> None:
            with contextlib.suppress(Exception):
                await link.close(1000, reason)

        # Together: each close may wait for the peer's close frame (close_timeout), and
        # an operation such as set_node_replication waits for all of them.
        await asyncio.gather(*(close(link) for link in links))

    # -- operator controls: pause, resume, replay --------------------------------------
    def links_of(self, peer: str, database: str | None) -> list[Subscriber]:
        if peer not in self.rows:
            raise BadRequestError(f"{peer} does not exist")
        subs = [s for (p, d), s in sorted(self.subscribers.items())
                if p == peer and (database is None or d == database)]
        if not subs:
            raise BadRequestError(f"no replication link from '{peer}'"
                                  + (f" for database '{database}'" if database else ""))
        return subs

    async def pause(self, peer: str, database: str | None) -> list[str]:
        """Stop receiving from ``peer``; the committed cursor is kept."""
        subs = self.links_of(peer, database)
        for sub in subs:
            sub.paused = True  # first: a relay hand-over restarts only unpaused links
            await sub.stop()
            sub.state = "paused"
        await self._persist_paused(peer, {s.database for s in subs}, set())
        return [s.database for s in subs]

    async def _persist_paused(self, peer: str, add: set[str], remove: set[str]) -> None:
        """Keep the paused databases in the peer's row, so a pause survives a restart."""
        old = set(self.rows.get(peer, {}).get("paused") or [])
        new = (old | add) - remove
        if new != old and peer in self.rows:
            await self.save_row({"name": peer, "paused": sorted(new)})

    async def resume(self, peer: str, database: str | None) -> list[str]:
        """Restart paused links from their committed cursor."""
        subs = self.links_of(peer, database)
        for sub in subs:
            if sub.paused:
                sub.paused, sub.state = False, "connecting"
                sub.start()
        await self._persist_paused(peer, set(), {s.database for s in subs})
        return [s.database for s in subs]

    async def replay(self, peer: str, database: str | None, from_seq: int | None,
                     from_version: int | None) -> list[str]:
        """Rewind links to a publisher sequence (or to the start, skipping versions older
        than ``from_version``) and stream again; applying twice is harmless."""
        subs = self.links_of(peer, database)
        for sub in subs:
            sub.paused = True  # held while the cursor is rewound (no restart meanwhile)
            await sub.stop()
            try:
                db = self.storage.databases[sub.database]
                seq = from_seq if from_seq is not None else 0
                await self.storage.write(functools.partial(write_cursor, db=db, peer=peer,
                                                           cursor={"seq": seq}))
                sub.replay_floor = from_version or 0
                sub.replaying = True
            finally:  # whatever happened, the link runs again
                sub.paused, sub.state = False, "connecting"
                sub.start()
        await self._persist_paused(peer, set(), {s.database for s in subs})
        return [s.database for s in subs]

    # -- conflict policies (storage/conflicts.py) --------------------------------------
    def policy_lookup(self, database: str) -> PolicyLookup | None:
        """``(origin, table) -> policy`` for changes to ``database``; None while every
        policy is last-writer-wins (the apply path then skips the review)."""
        if database == SYSTEM:
            return None  # users, roles and schema always converge (and hold secrets)
        default = self.default_conflict
        rows = self.rows
        if default == LWW and not any(
                row.get("conflict") not in (None, LWW)
                or any(s.get("conflict") not in (None, LWW)
                       for s in row.get("subscriptions") or [])
                for row in list(rows.values())):
            return None
        return lambda origin, table: peers.conflict_policy(rows.get(origin), database, table,
                                                           default)

    def review(self, peer: str, database: str) -> Review | None:
        """The policy review for one apply job of the link from ``peer``."""
        lookup = self.policy_lookup(database)
        if lookup is None:
            return None
        return Review(self.storage, peer, lookup, deadletters.refuser(self.storage, peer))

    # -- routes ----------------------------------------------------------------------
    @staticmethod
    def route_url(route: Any) -> str | None:
        """``wss://host:port`` for a route string or ``{hostname|host, port}`` object."""
        if isinstance(route, str):
            return route.rstrip("/")
        if isinstance(route, dict):
            host = route.get("hostname") or route.get("host")
            port = route.get("port", DEFAULT_PORT)
            if host:
                return f"wss://{host}:{port}"
        return None

    async def connect_route(self, route: Any) -> None:
        """Pair with a configured route, retrying with backoff until it answers.

        A route carries no credentials, so this works once the peer knows this node
        (its certificate): after an earlier ``add_node`` or when routes are set on
        both sides of an existing pair.
        """
        url = self.route_url(route)
        if not url or url == self.url:
            return
        failures = 0
        while True:
            configured = {self.route_url(r) for r in self.config.get("replication.routes") or []}
            if url not in configured:
                return  # the route was deleted meanwhile
            if any(r.get("url") == url for r in list(self.rows.values())):
                return
            try:
                answer = await self.join(url, None, True, None, {})
                await self.adopt(answer, url, {"replicates": True, "subscriptions": None})
                return
            except Exception as exc:
                log.info("route %s not connected yet: %s", url, exc)
            failures += 1
            await asyncio.sleep(max(0.5, backoff_delay(failures)))

    async def drop_route(self, route: Any) -> None:
        url = self.route_url(route)
        for name, row in list(self.rows.items()):
            if row.get("url") == url:
                await self.forget_node(name, notify=True)

    # -- hooks used by links -----------------------------------------------------------
    def note_ack(self, peer: str, database: str, seq: int) -> None:
        self.acks[(peer, database)] = seq
        self.note_position(peer, database, seq)

    def note_position(self, peer: str, database: str, seq: int, reset: bool = False) -> None:
        """``peer`` holds this node's ``database`` log through ``seq`` (``reset``: it
        starts a full copy, so it holds nothing certain until that ends)."""
        key = (peer, database)
        if reset:
            self.positions[key] = 0
        elif seq > self.positions.get(key, 0):
            self.positions[key] = seq
            for listener in list(self.position_listeners):
                listener()

    def note_received(self, peer: str, database: str, txns: int, size: int) -> None:
        self.metrics.txns_received.labels(peer, database).inc(txns)
        self.metrics.bytes_received.labels(peer, database).inc(size)
        sub = self.subscribers.get((peer, database))
        if sub is not None and sub.last_version and txns:
            # From the newest applied transaction's commit on its origin to now.
            delay_ms = self.storage.hlc.wall_now_ms() - wall_ms_of(sub.last_version)
            self.metrics.apply_delay.labels(peer).observe(max(0, delay_ms) / 1000.0)

    def note_dialed(self, peer: str, database: str) -> None:
        """A link's socket opened; every open after its first is a reconnect."""
        if (peer, database) in self._dialed:
            self.metrics.reconnects.labels(peer, database).inc()
        self._dialed.add((peer, database))

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
        from harpsync.storage.hlc import ms_to_version

        start = self.rows.get(peer, {}).get("start_time")
        if not start:
            return 0
        from datetime import datetime

        try:
            when = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        except ValueError:
            return 0
        return ms_to_version(when.timestamp() * 1000)

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
                        "state": sub.state, "lag_txns": sub.lag_txns()})
        return out


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (localhost or a loopback address)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_url(hostname: str) -> str:
    return f"wss://{hostname}:{DEFAULT_PORT}"



if TYPE_CHECKING:
    def _implements_seams(rep: Replicator, db: Database,
                          ) -> tuple[PublisherHost, SubscriberHost, LogSource]:
        """mypy checks that the replicator and a database fill the seams they serve."""
        return rep, rep, db
