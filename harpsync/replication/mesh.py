"""Membership: the ``hdb_nodes`` rows and who may act as which node.

This is the state behind joining and leaving (DESIGN.md, "hdb_nodes is local" and
"Trust model"): one row per peer, kept in memory and in ``system.hdb_nodes``; joining
(``accept_join`` for the target, ``join`` + ``adopt`` for the joiner), gossip
(``learn_nodes`` and telling the other peers), removal (``forget_node``), and the
certificate check every replication socket passes (``check_peer``).

A :class:`Mesh` changes rows; what that means for links (start, stop, restart, close
inbound sockets) it asks of its :class:`~harpsync.replication.seams.MeshHost`, the
link runtime, which it never reaches into.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from harpsync.errors import (
    BadRequestError,
    HarpsyncError,
    PeerError,
    ServiceUnavailableError,
    StorageError,
)
from harpsync.replication import peers
from harpsync.replication.membership import node_request
from harpsync.replication.seams import MeshHost
from harpsync.replication.transport import Link
from harpsync.security import NodeKeys, PeerCert, check_node_cert, valid_pin
from harpsync.storage import reads, writes
from harpsync.storage.ingest import forget_cursor, forget_floor
from harpsync.storage.keys import encode_id
from harpsync.storage.records import get_stored
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import crash_point

if TYPE_CHECKING:
    from harpsync.auth import Authenticator

log = logging.getLogger(__name__)


def _not_saved(name: str, exc: Exception) -> HarpsyncError:
    """What the operator is told when a peer's new settings could not be saved here."""
    cls = type(exc) if isinstance(exc, StorageError | ServiceUnavailableError) \
        else StorageError
    reason = exc.message if isinstance(exc, HarpsyncError) else str(exc)
    return cls(f"the settings of node '{name}' could not be saved on this node ({reason}); "
               "its links run with its previous settings here, while the peer may have "
               "the new ones: run the operation again")


def _flows(row: dict[str, Any]) -> tuple[Any, bool]:
    """What decides which tables flow with the peer of ``row``: its subscriptions
    (without policies), and its ``replicates`` flag when it has none."""
    subs = row.get("subscriptions")
    return peers.without_policies(subs), subs is not None or row.get("replicates") is not False


class Mesh:
    """This node's view of its peers: their rows, joins, gossip and removals."""

    def __init__(self, host: MeshHost, storage: Storage, keys: NodeKeys, auth: Authenticator,
                 node_name: str) -> None:
        self._host = host
        self.storage = storage
        self.keys = keys
        self.auth = auth
        self.node_name = node_name
        self.rows: dict[str, dict[str, Any]] = {}
        # Names this node had before (its own old rows), removed at start.
        self._former_names: list[str] = []
        # Saved rows replaced in memory by staged settings (stage_settings), by peer.
        self._staged: dict[str, dict[str, Any] | None] = {}

    def peer_row(self, peer: str) -> dict[str, Any] | None:
        """``peer``'s ``hdb_nodes`` row (None: not known here)."""
        return self.rows.get(peer)

    def load_rows(self) -> None:
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        own_ca = self.keys.ca_pem.decode()
        self.rows = {}
        self._former_names = []
        for r in reads.scan(db, table):
            if r.get("name") == self.node_name:
                continue
            if r.get("learned") is None and (r.get("ca") == own_ca
                                             or r.get("url") == self._host.url):
                # This node's own row from when it had another replication.hostname:
                # left in, it became a "peer" this node dialed (itself, under its old
                # name). Peers' rows always say whether they were learned.
                self._former_names.append(str(r["name"]))
                continue
            self.rows[r["name"]] = r
        for row in self.rows.values():
            if row.get("ca"):
                with contextlib.suppress(ValueError):
                    self.keys.trust_ca(row["ca"])

    async def scrub_secrets(self) -> None:
        """Forget peer passwords older versions kept with ``retain_authorization``."""
        for name, row in list(self.rows.items()):
            if row.get("authorization") is not None:
                await self.save_row({"name": name, "authorization": None})

    async def write_row(self, row: dict[str, Any], mode: str = "upsert") -> None:
        await self.storage.write(writes.write_records(self.storage, SYSTEM, "hdb_nodes", [row],
                                                      mode, None))

    async def save_own_row(self) -> None:
        await self.write_row({"name": self.node_name, "url": self._host.url,
                              "ca": self.keys.ca_pem.decode(), "replicates": True})
        if self._former_names:
            log.warning("this node was named %s before it became %s: that row is removed; "
                        "on its peers, remove_node the old name and add_node this one",
                        ", ".join(self._former_names), self.node_name)
            await self.storage.write(writes.delete_records(
                self.storage, SYSTEM, "hdb_nodes", self._former_names, None))
            self._former_names = []

    async def save_row(self, row: dict[str, Any]) -> None:
        await self.write_row(row)
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        stored = reads.get_by_ids(db, table, [row["name"]])
        if stored:
            self.rows[row["name"]] = stored[0]

    def _was_removed(self, name: str) -> bool:
        db, table = self.storage.table(SYSTEM, "hdb_nodes")
        with db.env.begin() as txn:
            stored = get_stored(txn, table, encode_id(name))
        return stored is not None and stored[2] is None

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
            return (f"certificate names {cert.common_name!r}, not {name!r} (if {name} was "
                    f"renamed, remove_node {name} and add_node it by its new name)")
        if self.revoked(row, cert.serial_hex):
            return f"certificate of {name} revoked"
        if cert.pin in self.keys.barred_pins():
            return f"certificate of {name} carries the key of a removed node"
        if not cert.issued_by([row.get("ca") or "", self.keys.ca_pem]):
            return f"certificate for {name} not issued by its CA"
        pin = row.get("pin")
        if pin is None:
            row["pin"] = cert.pin  # trust on first verified use, limited to this name
            self._host.spawn(self.write_row({"name": name, "pin": cert.pin}))
        elif pin != cert.pin:
            return f"certificate key of {name} does not match the key pinned for it"
        return None

    async def set_revoked(self, name: str, revoked: list[Any] | None) -> None:
        """Record the serials revoked for ``name`` here, and apply them to its sockets.

        Revocation is this node's own decision: it needs nothing from the peer, which
        may be down (a compromised node taken offline) or already refused (clearing
        the list lets it back). Its links restart, so dials check the new list, and
        the sockets it opened to this node close.
        """
        if name not in self.rows:
            raise BadRequestError(f"{name} does not exist")
        await self.save_row({"name": name, "revoked_certificates": revoked})
        await self._host.reconcile(restart_peer=name)
        await self._host.drop_inbound(name, "node revocations changed")

    def check_vouched(self, link: Link) -> str | None:
        """Why the server on ``link`` may not receive a verified request to an address
        whose key is not checked (a credentialed join with ``verify_tls``, which may
        re-key the node), or None.

        The TLS trust store holds every peer's CA, so the handshake alone would let any
        member mint a certificate for another node's host and receive the credentials:
        the certificate must be signed by the CA recorded for the node it names.
        """
        cert = link.cert
        if cert is None:
            return "it presented no certificate"
        row = self.rows.get(cert.common_name)
        if row is None or not row.get("ca"):
            return (f"its certificate names {cert.common_name!r}, a node whose CA is not "
                    "recorded here")
        if not cert.issued_by([row["ca"]]):
            return f"its certificate for {cert.common_name!r} was not issued by that node's CA"
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
            raise BadRequestError(
                f"a node cannot join itself, nor another node named '{name}' as it is: "
                "each node of a mesh needs its own replication.hostname")
        subs = peers.normalize_subscriptions(body.get("subscriptions"))
        # Policies are this node's own: the peer's mirror never carries them.
        subs = peers.keep_policies((self.rows.get(name) or {}).get("subscriptions"), subs)
        existed = name in self.rows
        # ``replicates: false`` (no subscriptions) is mirrored as well: else this node's
        # link kept reading the joiner's log while it published nothing here, its
        # cursor passed what the joiner wrote meanwhile, and replicating again resumed
        # after it. Older joiners do not send it. With subscriptions the row replicates
        # (those tables), as the joiner's own row says and Harper's rows read.
        settings = {"replicates": subs is not None or body.get("replicates") is not False,
                    "subscriptions": subs,
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
            # A certificate the joiner's old CA signed for us (it lost its keys) is
            # refused by it now: dial it with node.pem, which it has just trusted.
            with contextlib.suppress(ValueError):
                self.keys.forget_peer_signed_cert(name, unless_issued_by=ca)
            cert = issued.pem
            self.keys.bar_pin(issued.pin, barred=False)  # an operator adds it back
            row = {"name": name, "url": url, "ca": ca, "pin": issued.pin,
                   "serials": serials, **settings}
        else:
            row = {"name": name, **settings}
        # What this node now sends the joiner that it did not (its row for the joiner
        # may have said less than the joiner's: a row learned by gossip).
        sends_more = self.sends_more(name, {**(self.rows.get(name) or {}), **settings})
        # What the joiner's open sockets here were served by (a staged row included).
        before = _flows(self.rows[name]) if existed else None
        await self._replace_row({**row, "learned": False},
                                also={str(d) for d in body.get("sends_more") or []})
        # The joiner's other nodes: one add_node joins this node to its whole mesh.
        await self.learn_nodes(list(body.get("nodes", [])), reconcile=False)
        await self._host.reconcile(restart_peer=name if existed else None)
        if credentialed and existed:  # a new key or CA: sockets made with the old go
            await self._host.drop_inbound(name, "node re-joined")
        elif existed and _flows(self.rows[name]) != before:
            # Their publishers filter by the old row, and their hello told the joiner
            # what this node relays by it (``relay_tables``). Before, they went on so
            # until the joiner restarted its links: for good when its last step failed
            # (the answer lost), while this node's row said otherwise.
            await self._host.drop_inbound(name, "node settings changed")
        self._gossip(exclude={name}, nodes=[peers.identity(self.rows[name])])
        return {"node": self.node_name, "url": self._host.url, "ca": self.keys.ca_pem.decode(),
                "cert": cert, "sends_more": sends_more,
                "nodes": [peers.identity(r) for n, r in self.rows.items() if n != name]}

    async def join(self, url: str, credentials: tuple[str, str] | None, verify: bool,
                   subscriptions: list[dict[str, Any]] | None, extra: dict[str, Any],
                   expect: str | None = None) -> dict[str, Any]:
        """Ask the node at ``url`` to pair with this one; returns its answer.

        Without credentials the request is proven by this node's certificate and the
        server must be ``expect`` (its pinned key).
        """
        body: dict[str, Any] = {
            "type": "join", "node": self.node_name, "url": self._host.url,
            "ca": self.keys.ca_pem.decode(), "csr": self.keys.make_csr().decode(),
            "cert": self.keys.node_cert_pem.decode(),
            "subscriptions": peers.mirror(subscriptions),
            "replicates": subscriptions is not None or extra.get("replicates") is not False,
            "shard": extra.get("shard"), "start_time": extra.get("start_time"),
            "sends_more": list(extra.get("sends_more") or []),
            "nodes": [peers.identity(r) for r in self.rows.values() if r.get("url") != url],
        }
        if credentials is not None:
            body["authorization"] = list(credentials)
        return await node_request(self._host, url, body, verify=verify,
                                  present_cert=credentials is None, expect=expect)

    async def probe(self, url: str, credentials: tuple[str, str] | None,
                    verify: bool, expect: str | None = None) -> str:
        """Check that the node at ``url`` answers over TLS and accepts these credentials
        (or this node's certificate), without joining; returns its name. With
        ``expect`` the server must show that peer's pinned key (see ``node_request``).

        Raises:
            PeerError: unreachable, TLS refused, or credentials refused.
        """
        body: dict[str, Any] = {"type": "probe", "node": self.node_name}
        if credentials is not None:
            body["authorization"] = list(credentials)
        answer = await node_request(self._host, url, body, verify=verify,
                                    present_cert=credentials is None, expect=expect)
        return str(answer.get("node", ""))

    async def adopt(self, answer: dict[str, Any], url: str, row: dict[str, Any]) -> str:
        """Record a peer after a successful join answer.

        The peer is pinned to the key its server certificate carried on the join
        socket, which must be named after the peer and signed by the CA it answered
        with (or, when the row exists already, the pin must match: node_request checked).
        """
        crash_point("adopt")  # the peer has the settings, this node not yet (tests)
        name = str(answer["node"])
        server: PeerCert | None = answer.pop("__server_cert__", None)
        existing = self.rows.get(name)
        pin_fields: dict[str, Any] = {}
        if server is None:
            raise BadRequestError(f"node at '{url}' presented no certificate")
        if server.common_name != name or not server.issued_by([str(answer["ca"])]):
            raise BadRequestError(f"node at '{url}' answered as {name!r} with a certificate "
                                  "that is not that node's")
        # Checked before anything of it is kept (its CA trusted, its pin un-barred).
        try:
            self.keys.check_peer_answer(str(answer["ca"]),
                                        str(answer["cert"]) if answer.get("cert") else None)
        except ValueError as exc:
            raise PeerError(f"node at '{url}' ({name}) answered with an unusable "
                            f"certificate: {exc}") from None
        if existing is None or existing.get("pin") != server.pin:
            pin_fields = {"pin": server.pin, "serials": [server.serial_hex]}
        self.keys.bar_pin(server.pin, barred=False)  # an operator adds it (back)
        self.keys.trust_ca(answer["ca"])
        if answer.get("cert"):
            self.keys.store_peer_signed_cert(name, answer["cert"])
        existed = existing is not None
        await self._replace_row({**row, "name": name, "url": url, "ca": str(answer["ca"]),
                                 "learned": False, **pin_fields},
                                also={str(d) for d in answer.get("sends_more") or []})
        await self.learn_nodes(list(answer.get("nodes", [])), reconcile=False)
        await self._host.reconcile(restart_peer=name if existed else None)
        if existed:  # settings such as revoked_certificates apply to its sockets now
            await self._host.drop_inbound(name, "node settings changed")
        self._gossip(exclude={name}, nodes=[peers.identity(self.rows[name])])
        return name

    def stage_settings(self, row: dict[str, Any]) -> None:
        """Use an operator's new settings for a known peer here BEFORE telling the peer,
        in memory only; ``adopt`` saves them (and forgets cursors if the subscriptions
        changed) once the peer has them too, ``unstage_settings`` drops them.

        The peer forgets its cursors and re-copies from this node as soon as it hears of
        the change: that copy must already be filtered by what this node now publishes,
        or the peer's cursor passes rows written while they were not published and they
        never arrive (lifecycle seeds 77 and 88). This node's own re-copy waits for
        ``adopt``, when the peer publishes what it now subscribes to.
        """
        name = str(row["name"])
        self._staged.setdefault(name, self.rows.get(name))
        self.rows[name] = row

    def unstage_settings(self, name: str) -> None:
        """Back to the saved row (telling the peer failed)."""
        if name in self._staged:
            old = self._staged.pop(name)
            if old is not None:
                self.rows[name] = old

    def sends_more(self, name: str, row: dict[str, Any]) -> list[str]:
        """The databases of which ``row`` has this node send peer ``name`` tables its
        saved row did not: the peer must copy them again (``_replace_row``'s ``also``
        there), even where its own row already said it takes them."""
        old = self._staged[name] if name in self._staged else self.rows.get(name)
        if old is None:
            return []
        return sorted(db for db in list(self.storage.databases)
                      if db != SYSTEM and peers.sends_more(old, row, db))

    async def _replace_row(self, row: dict[str, Any],
                           also: set[str] | frozenset[str] = frozenset()) -> None:
        """Save an operator-made row. When the peer's subscriptions change, its links
        restart with the new tables, and where this node now receives more of a
        database the cursor goes: tables that now replicate must arrive with their
        history, so that link starts with a full copy (merged by last-writer-wins, so
        nothing here is lost).

        The links are stopped first, and their in-flight apply jobs finished, so no
        late cursor write can bring a forgotten cursor back (which would skip the
        copy); the reconcile lock keeps them from restarting until the row is saved.

        ``also`` (the peer's ``sends_more``) is forgotten even if this row's flows did
        not change, because the other side's did. A change is saved on the two nodes
        one after the other, so a node killed between (its peer saved it, it did not)
        comes back with its old row and the peer's re-copy passes what that row did not
        publish; when the operator retries (on either node), the peer's row is already
        the new one, and the side whose saved row was old says what it now sends.
        """
        name = str(row["name"])
        failure: Exception | None = None
        async with self._host.reconcile_lock:
            # Compare with the row the links last ran with, not a staged one.
            old = self._staged.pop(name) if name in self._staged else self.rows.get(name)
            changed = old is not None and _flows(old) != _flows(row)
            # Only where this node now receives more (or the peer now sends more:
            # ``also``, from the peer) is a cursor forgotten: narrowing, or a change of
            # the publish side alone, catches up from the cursor (before, every change
            # copied every database again, both ways).
            forget = set() if old is None else {
                db for db in list(self.storage.databases) if db != SYSTEM
                and (db in also or changed and peers.receives_more(old, row, db))}
            # A name with no row here (removed, or never paired) or with a new key may
            # be a new node under an old name: wiped, its clock behind, its versions
            # start below the old node's, and the floor held for the name (``hw:``)
            # filtered them out as already held. Forgotten before the row is saved: a
            # node killed between has a floor too low, which only sends entries again.
            renewed = old is None or old.get("pin") not in (None, row.get("pin", old["pin"]))
            try:
                if changed or forget or renewed and old is not None:
                    await self._host.stop_links(name)
                    await self._forget_cursors(name, include_system=False,
                                               only=forget.__contains__)
                if renewed:
                    for db in list(self.storage.databases.values()):
                        await self.storage.write(functools.partial(forget_floor, db=db,
                                                                   origin=name))
                await self.save_row(row)
            except Exception as exc:
                # Back to the saved row (a staged one included); the links restart with
                # it below, outside the lock. Forgotten cursors or floors only copy or
                # send again.
                if old is None:
                    self.rows.pop(name, None)
                else:
                    self.rows[name] = old
                failure = exc
            else:
                if changed:
                    # Peers this node relays ``name`` to hold what it takes from
                    # ``name`` from its hello: they say hello again before the new
                    # links apply anything (before, a narrowed relay's writes raised
                    # their floor for ``name`` past writes it no longer carried, and
                    # the direct link, once back, skipped those for good).
                    await self._host.drop_relaying(name, f"subscriptions from {name} "
                                                         "changed")
        if failure is not None:
            # Before, the stopped links stayed down until some later reconcile.
            await self._host.reconcile()
            raise _not_saved(name, failure) from failure

    async def _forget_cursors(self, name: str, include_system: bool,
                              only: Callable[[str], bool] | None = None) -> None:
        for db in list(self.storage.databases.values()):
            if (include_system or db.name != SYSTEM) and (only is None or only(db.name)):
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
            await self._host.reconcile()

    def _gossip(self, exclude: set[str], nodes: list[dict[str, Any]]) -> None:
        for name, row in list(self.rows.items()):
            if name in exclude or not row.get("url"):
                continue
            self._host.spawn(self._tell(row["url"], {"type": "mesh", "nodes": nodes}, name))

    async def _tell(self, url: str, body: dict[str, Any], name: str) -> None:
        try:
            await node_request(self._host, url, body, verify=True, present_cert=True, expect=name)
        except Exception as exc:
            log.info("could not tell %s about the mesh: %s", url, exc)

    async def forget_node(self, name: str, notify: bool) -> None:
        """Stop replicating with ``name`` and delete its row (both sides if ``notify``)."""
        row = self.rows.get(name)
        if row is None:
            raise BadRequestError(f"{name} does not exist")
        if notify and row.get("url"):
            with contextlib.suppress(Exception):
                await node_request(self._host, row["url"], {"type": "remove"}, verify=True,
                                   present_cert=True, timeout=5, expect=name)
        # The key is barred unless another row carries it: the same node under a new
        # name (renamed, added before its old name was removed) stays.
        if row.get("pin") and not any(r.get("pin") == row["pin"]
                                      for n, r in self.rows.items() if n != name):
            self.keys.bar_pin(str(row["pin"]))
        with contextlib.suppress(ValueError):  # if it comes back, it signs a new one
            self.keys.forget_peer_signed_cert(name)
        try:
            async with self._host.reconcile_lock:
                # Its cursors go too: if it comes back, it may be a new node with a new
                # log. The links stop (in-flight writes done) first, or one could write
                # it back. Before the row: a node killed between keeps the peer, whose
                # links copy again; the other way round the cursors outlived the row,
                # and a new node of that name, added later, was read from the old
                # cursor on.
                await self._host.stop_links(name)
                await self._forget_cursors(name, include_system=True)
                crash_point("forget_node")
                await self.storage.write(writes.delete_records(
                    self.storage, SYSTEM, "hdb_nodes", [name], None))
                self.rows.pop(name, None)
        finally:  # a failed write (a full disk) leaves the peer: its links start again
            await self._host.reconcile()
        await self._host.drop_inbound(name, "node removed")
