"""Issue 8, points 1-3: a certificate names exactly one node, revocation and removal
hold, and no peer can impersonate another."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from harpsync import codec
from tests.helpers import bind_socket, wait_for
from tests.repl_util import PASSWORD as CREDS_PASSWORD
from tests.repl_util import by_id, connection, has_table, hdb_nodes, join, stays, wait_linked
from tests.security.attacker import (
    SUBPROTOCOL,
    client_context,
    csr,
    dial_outcome,
    load_cert,
    mint,
    mint_with_node_ca,
    new_ca,
    node_request,
    serial_hex,
)


def _row(node: Any, name: str) -> dict[str, Any]:
    return {r["name"]: r for r in hdb_nodes(node)}[name]


def _peer_cert_dir(node: Any, peer: Any) -> Path:
    """A directory holding the certificate ``peer``'s CA signed for ``node`` (+ key)."""
    keys = node.root / "keys"
    out = node.root.parent / f"{node.name}-for-{peer.name}"
    out.mkdir(exist_ok=True)
    (out / "node.pem").write_bytes((keys / "peer_certs" / f"{peer.name}.pem").read_bytes())
    (out / "node.key").write_bytes((keys / "node.key").read_bytes())
    return out


def _sans(pem: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v.value) for v in san}


# ---------------------------------------------------------------- 1. one name per cert

def test_certificate_only_join_cannot_get_a_csr_signed(node_factory):
    """With only its certificate, a joined node (B) asks A to sign a CSR named
    ``mallory`` with SANs A and localhost, and to move B's row to another URL and CA.
    A signs nothing and keeps B's URL, CA and pin."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(b, a)  # A signs B's CSR: B holds keys/peer_certs/node-a.pem
    wait_linked([(a, b), (b, a)])
    before = _row(a, b.name)
    attacker_key = ec.generate_private_key(ec.SECP256R1())
    _fake_key, fake_ca = new_ca("mallory CA")
    from cryptography.hazmat.primitives.serialization import Encoding

    answer = node_request(a.repl_url, {
        "type": "join", "node": b.name, "url": "wss://127.0.0.1:1",
        "ca": fake_ca.public_bytes(Encoding.PEM).decode(),
        "csr": csr(attacker_key, "mallory", (a.name, "localhost")),
        "subscriptions": None, "nodes": [],
    }, client_context(_peer_cert_dir(b, a)))
    assert not answer.get("cert"), "A signed a CSR for a certificate-only join"
    after = _row(a, b.name)
    for key in ("url", "ca", "pin"):
        assert after.get(key) == before.get(key), key
    assert before.get("pin"), "A pinned B's key when B joined"


def test_credentialed_join_gets_a_certificate_for_its_own_name_only(node_factory):
    """Even with super_user credentials, a CSR naming another node is refused, and the
    certificate issued carries only the joiner's name and URL host."""
    a = node_factory("node-a")
    key = ec.generate_private_key(ec.SECP256R1())
    _ca_key, ca = new_ca("joiner CA")
    from cryptography.hazmat.primitives.serialization import Encoding

    ca_pem = ca.public_bytes(Encoding.PEM).decode()
    body = {"type": "join", "node": "joiner", "url": "wss://10.9.9.9:9933", "ca": ca_pem,
            "csr": csr(key, "mallory", (a.name, "localhost")), "subscriptions": None,
            "nodes": [], "authorization": ["admin", CREDS_PASSWORD]}
    answer = node_request(a.repl_url, body, client_context())
    assert "error" in answer and "mallory" in answer["error"], answer
    assert "mallory" not in {r["name"] for r in hdb_nodes(a)}
    body["csr"] = csr(key, "joiner", (a.name, "localhost", "evil.example"))
    answer = node_request(a.repl_url, {**body, "url": "file:///etc/passwd"}, client_context())
    assert "url" in answer.get("error", ""), answer
    answer = node_request(a.repl_url, body, client_context())
    assert answer.get("cert"), answer
    assert _sans(answer["cert"]) == {"joiner", "10.9.9.9"}
    cert = x509.load_pem_x509_certificate(answer["cert"].encode())
    assert cert.subject.rfc4514_string() == "CN=joiner"


# ------------------------------------------------------------ 2. revocation and removal

@pytest.mark.timeout(120)
def test_revoked_node_is_refused_with_a_freshly_minted_certificate(node_factory, tmp_path):
    """A revokes the certificate B presents (B's node.pem). B holds its CA key and mints
    new certificates: with its own key and with a new one. A refuses every socket."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_linked([(b, a)], ("system", "data"))
    presented = serial_hex(load_cert(b.root / "keys" / "node.pem"))
    a.call("update_node", hostname=b.name, revoked_certificates=[presented])
    same_key = mint_with_node_ca(b.root, b.name, tmp_path / "same", same_key=True)
    new_key = mint_with_node_ca(b.root, b.name, tmp_path / "new")
    for cert_dir in (same_key, new_key, b.root / "keys"):
        kind, detail = dial_outcome(a.repl_url + "/data", client_context(cert_dir))
        assert (kind, detail) == ("closed", 1008), (cert_dir.name, kind, detail)
    answer = node_request(a.repl_url, {"type": "join", "node": b.name, "url": b.repl_url,
                                       "subscriptions": None, "nodes": []},
                          client_context(same_key))
    assert "error" in answer, answer


def _stockpile(node: Any, target: Any, common_name: str, out: Path) -> Path | None:
    """While ``node`` is a member, ask ``target`` (certificate only) to sign a CSR named
    ``common_name`` for a new key. Returns the directory with what it got, if anything."""
    key = ec.generate_private_key(ec.SECP256R1())
    answer = node_request(target.repl_url, {
        "type": "join", "node": node.name, "url": node.repl_url,
        "csr": csr(key, common_name, (common_name,)), "subscriptions": None, "nodes": [],
        "ca": (node.root / "keys" / "ca.pem").read_text(),
    }, client_context(_peer_cert_dir(node, target)))
    if not answer.get("cert"):
        return None
    from cryptography.hazmat.primitives import serialization

    out.mkdir(parents=True, exist_ok=True)
    (out / "node.pem").write_text(answer["cert"])
    (out / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out


@pytest.mark.timeout(120)
def test_removed_node_is_refused_with_any_certificate_it_can_make(node_factory, tmp_path):
    """X, while a member, tries to stockpile certificates from A's CA (for its own name
    with a new key, and for B's name). After A removes X, none of them, nor X's
    certificate from A's CA, nor one X mints with its own CA, opens a socket to A, and a
    certificate-only join is refused."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    x = node_factory("node-x")
    a.call("create_table", table="dog", primary_key="id")
    join(x, a)
    join(b, a)
    wait_linked([(x, a), (b, a)], ("system", "data"))
    stock = {name: _stockpile(x, a, name, tmp_path / f"stock-{name}")
             for name in (x.name, b.name)}
    kept = _peer_cert_dir(x, a)  # X's copy: removed, X deletes its own
    a.call("remove_node", hostname=x.name)
    wait_for(lambda: connection(a, x.name) is None, timeout=10, message="A forgot X")
    minted = mint_with_node_ca(x.root, x.name, tmp_path / "minted", same_key=True)
    tries = [kept, minted, x.root / "keys",
             *[d for d in stock.values() if d is not None]]
    for cert_dir in tries:
        kind, detail = dial_outcome(a.repl_url + "/data", client_context(cert_dir))
        assert (kind, detail) == ("closed", 1008), (cert_dir.name, kind, detail)
        answer = node_request(a.repl_url, {"type": "join", "node": x.name, "url": x.repl_url,
                                           "subscriptions": None, "nodes": []},
                              client_context(cert_dir))
        assert "error" in answer, answer
    assert x.name not in {r["name"] for r in hdb_nodes(a)}


# ---------------------------------------------------------------- 3. impersonation

class FakeServer:
    """A TLS WebSocket server on a stopped node's port, with a forged certificate.
    Records every frame a client sends it."""

    def __init__(self, sock: Any, cert_dir: Path, answer: dict[str, Any] | None = None,
                 ) -> None:
        self.frames: list[bytes] = []
        self._answer = answer
        self.connections = 0
        self._sock = sock.dup()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert_dir / "node.pem", cert_dir / "node.key")
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handler(ws: Any) -> None:
            self.connections += 1
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:
                    self.frames.append(frame)
                    if self._answer is not None:  # a peer's answer to a /.node request
                        await ws.send(codec.pack(self._answer))

        async def main() -> None:
            self._stop = self._loop.create_future()
            self._sock.setblocking(False)
            async with serve(handler, sock=self._sock, ssl=self._ctx,
                             subprotocols=[SUBPROTOCOL]):  # type: ignore[list-item]
                self._ready.set()
                await self._stop

        self._loop.run_until_complete(main())

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


def _last_errors(node: Any, peer: str) -> list[str]:
    conn = connection(node, peer)
    return [s.get("last_error") or "" for s in (conn or {}).get("database_sockets", [])]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("forger", ["peer_ca", "gossiped_ca"])
def test_no_peer_can_impersonate_another_peers_server(node_factory, tmp_path, forger):
    """X, a peer of A, takes over B's address with a certificate named B that X made:
    signed by X's own CA, or by a fake CA X gossiped to A in a ``mesh`` request (with a
    fake row for B and a new node). A never talks to the impostor, and the gossip neither
    replaces B's row nor lets the fake CA vouch for B."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    x = node_factory("node-x")
    join(a, b)
    join(a, x)
    wait_linked([(a, b), (a, x), (x, a)])
    b_row = _row(a, b.name)
    if forger == "peer_ca":
        forged = mint_with_node_ca(x.root, b.name, tmp_path / "forged")
    else:
        fake_key, fake_ca = new_ca("mallory CA")
        from cryptography.hazmat.primitives.serialization import Encoding

        fake_pem = fake_ca.public_bytes(Encoding.PEM).decode()
        answer = node_request(a.repl_url, {"type": "mesh", "nodes": [
            {"name": b.name, "url": "wss://127.0.0.1:1", "ca": fake_pem},
            {"name": "ghost", "url": "wss://127.0.0.1:2", "ca": fake_pem},
        ]}, client_context(x.root / "keys"))
        assert answer.get("ok"), answer
        forged = mint(fake_key, fake_ca, b.name, tmp_path / "forged")
        after = _row(a, b.name)
        assert (after["url"], after["ca"], after.get("pin")) == (
            b_row["url"], b_row["ca"], b_row.get("pin"))
    b.stop()
    fake = FakeServer(b.repl_sock, forged)
    try:
        # Restart A's links to B now rather than after their reconnect backoff.
        a.call("pause_replication", hostname=b.name)
        a.call("resume_replication", hostname=b.name)
        wait_for(lambda: fake.connections > 0 and any(
            "pinned" in e or "not issued by its CA" in e for e in _last_errors(a, b.name)),
            timeout=30, message="A refusing the impostor at B's address")
        assert fake.frames == [], "A sent replication frames to the impostor"
    finally:
        fake.close()
    # The forged certificate does not open a socket to A as B either.
    kind, detail = dial_outcome(a.repl_url + "/system", client_context(forged))
    assert (kind, detail) in {("closed", 1008)} or kind == "refused", (kind, detail)


@pytest.mark.timeout(120)
def test_revocation_stops_reads_through_every_socket(node_factory):
    """After A revokes B, A's writes stop reaching B and A no longer pulls from B."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_linked([(b, a), (a, b)], ("system", "data"))
    presented = serial_hex(load_cert(b.root / "keys" / "node.pem"))
    a.call("update_node", hostname=b.name, revoked_certificates=[presented])
    wait_for(lambda: all("revoked" in e for e in _last_errors(a, b.name))
             and _last_errors(a, b.name), timeout=20, message="A's dials to B refused")
    a.call("insert", table="dog", records=[{"id": 7}])
    b.call("insert", table="dog", records=[{"id": 8}])
    wait_for(lambda: not (connection(b, a.name) or {}).get("database_sockets")
             or not any(s["connected"] for s in connection(b, a.name)["database_sockets"]),
             timeout=20, message="B's sockets to A closed")
    assert by_id(b, "dog", 7) is None
    assert by_id(a, "dog", 8) is None


@pytest.mark.timeout(120)
def test_removed_node_cannot_come_back_under_another_name(node_factory, tmp_path):
    """After A removes X, X has B (still its peer) learn a node ``x2`` with X's key and
    CA; when A hears of ``x2`` from B, it does not take it, and a certificate named
    ``x2`` that X mints is refused."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    x = node_factory("node-x")
    a.call("create_table", table="dog", primary_key="id")
    join(x, a)
    join(b, a)
    wait_linked([(x, a), (b, a), (x, b)], ("system",))
    x_pin = _row(a, x.name).get("pin")
    a.call("remove_node", hostname=x.name)
    wait_for(lambda: connection(a, x.name) is None, timeout=10, message="A forgot X")
    answer = node_request(b.repl_url, {
        "type": "mesh", "nodes": [{"name": "x2", "url": x.repl_url,
                                   "ca": (x.root / "keys" / "ca.pem").read_text(),
                                   **({"pin": x_pin} if x_pin else {})}],
    }, client_context(x.root / "keys"))
    assert answer.get("ok"), answer
    wait_for(lambda: "x2" in {r["name"] for r in hdb_nodes(b)}, timeout=10,
             message="B learned x2")
    a.call("update_node", hostname=b.name, replicates=True)  # A hears B's nodes again
    assert "x2" not in {r["name"] for r in hdb_nodes(a)}
    minted = mint_with_node_ca(x.root, "x2", tmp_path / "x2", same_key=True)
    kind, detail = dial_outcome(a.repl_url + "/data", client_context(minted))
    assert (kind, detail) == ("closed", 1008), (kind, detail)


def test_a_peer_whose_keys_were_replaced_is_named_and_rejoins_by_add_node(node_factory):
    """B loses its keys and restarts with new ones: A refuses it (its pin and trust are
    for the old keys) and its link says what to do; add_node again brings B back."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.stop()
    shutil.rmtree(b.root / "keys")
    b.start()

    def told() -> bool:
        conn = connection(a, b.name)
        return conn is not None and any(
            "run add_node for it again" in (s.get("last_error") or "")
            for s in conn["database_sockets"])

    wait_for(told, timeout=20, message="A's link to B naming the fix")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=10, message="A's row on B")


@pytest.mark.timeout(120)
def test_a_renamed_joiner_is_brought_back_by_add_node_on_its_peer(node_factory):
    """B joined A (so B holds a certificate A's CA signed for its old name), then B is
    renamed: remove_node and add_node on A, as A's link says, bring B's links to A back
    (before, B kept presenting the certificate naming its old name and A refused it)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(b, a)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.stop()
    b.extra_env["REPLICATION_HOSTNAME"] = "node-b2"
    b.start()
    a.call("remove_node", hostname="node-b")
    a.call("add_node", hostname="node-b2", url=b.repl_url, verify_tls=False,
           authorization={"username": "admin", "password": CREDS_PASSWORD})
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=20, message="A's row on B")


@pytest.mark.timeout(120)
def test_a_peer_with_new_keys_that_rejoins_by_itself_is_dialed_again(node_factory):
    """A joined B (so A holds a certificate B's CA signed for it); B loses its keys and
    runs add_node for A itself: A's links to B come back (before, A kept presenting the
    certificate from B's old CA, which B no longer trusts, and every handshake failed)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.stop()
    shutil.rmtree(b.root / "keys")
    b.start()
    join(b, a)
    wait_for(lambda: has_table(b, "t"), timeout=20, message="the table on B")
    b.call("insert", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t", 2) is not None, timeout=20, message="B's row on A")


@pytest.mark.timeout(120)
def test_a_node_that_is_down_can_be_revoked(node_factory):
    """A revokes B's certificate while B is down (a compromised node taken offline): the
    revocation is saved at once, and B, back, is refused (before, update_node failed
    because B could not be told, and nothing was revoked)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    presented = serial_hex(load_cert(b.root / "keys" / "node.pem"))
    b.stop()
    a.call("update_node", hostname=b.name, revoked_certificates=[presented])
    assert _row(a, b.name)["revoked_certificates"] == [presented]
    b.start()
    wait_for(lambda: _last_errors(a, b.name)
             and all("revoked" in e for e in _last_errors(a, b.name)),
             timeout=20, message="A's dials to B refused as revoked")
    a.call("insert", table="dog", records=[{"id": 7}])
    stays(lambda: by_id(b, "dog", 7) is None, duration=1.0)


@pytest.mark.timeout(120)
def test_clearing_a_revocation_lets_the_node_back(node_factory):
    """A revokes B, then clears revoked_certificates: update_node succeeds and the links
    come back (before, A refused to tell B, whom it still saw as revoked)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    presented = serial_hex(load_cert(b.root / "keys" / "node.pem"))
    a.call("update_node", hostname=b.name, revoked_certificates=[presented])
    wait_for(lambda: _last_errors(a, b.name)
             and all("revoked" in e for e in _last_errors(a, b.name)),
             timeout=20, message="A's dials to B refused as revoked")
    a.call("update_node", hostname=b.name, revoked_certificates=[])
    a.call("insert", table="dog", records=[{"id": 9}])
    wait_for(lambda: by_id(b, "dog", 9) is not None, timeout=20, message="A's row on B")


@pytest.mark.timeout(120)
def test_a_peer_added_by_an_address_its_certificate_does_not_name_replicates(node_factory):
    """A adds B by an address B's certificate does not list (another IP of its host, a
    load balancer's name): the links work both ways, because who answers is decided by
    B's name, CA and pinned key, not by the address (before, every dial from A failed
    TLS host name verification after the join had worked)."""
    from tests.proxy_util import TcpProxy

    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    alias = TcpProxy(b.repl_port, host="127.0.0.2")
    try:
        a.call("add_node", hostname=b.name, url=alias.url, verify_tls=False,
               authorization={"username": "admin", "password": CREDS_PASSWORD})
        wait_for(lambda: has_table(b, "t"), timeout=20, message="the table on B")
        b.call("insert", table="t", records=[{"id": 1}])
        wait_for(lambda: by_id(a, "t", 1) is not None, timeout=20,
                 message=f"B's row on A ({_last_errors(a, b.name)})")
        # Requests to B as a known peer (its pin checked) reach it at that address too.
        overview = a.call("cluster_overview")
        assert all(n["reachable"] for n in overview["nodes"]), overview
        network = a.call("cluster_network")["nodes"]
        assert {n["name"] for n in network} == {a.name, b.name}, network
        a.call("configure_cluster", connections=[{"hostname": b.name, "url": alias.url}])
    finally:
        alias.close()


# ---------------------------------------------------------------- 4. what status shows

def test_cluster_status_shows_each_peers_ca_and_this_nodes_certificate(node_factory):
    """Each connection carries Harper's ca_info (the peer's CA), and the top level this
    node's own certificate with its CA's expiry (before, neither was shown anywhere)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    info = connection(a, b.name)["ca_info"]
    ca = load_cert(b.root / "keys" / "ca.pem")
    assert info["serialNumber"].lstrip("0") == serial_hex(ca)
    assert info["subject"] == info["issuer"] == ca.subject.rfc4514_string()
    own = a.call("cluster_status")["certificate"]
    assert own["serialNumber"].lstrip("0") == serial_hex(load_cert(a.root / "keys" /
                                                                   "node.pem"))
    assert own["subject"] == "CN=node-a" and own["expires_soon"] is False


def test_a_ca_near_its_end_is_reported(tmp_path):
    """A node whose CA ends within 30 days says so (its node certificate, re-issued from
    that CA, cannot outlive it, and the CA is never replaced by itself)."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from harpsync.security import NodeKeys
    from harpsync.security.issuing import issue

    keys = tmp_path / "keys"
    keys.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("harpsync CA n", ca_key.public_key(), ca_key, None, days=10)
    (keys / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (keys / "ca.key").write_bytes(ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    info = NodeKeys.load_or_create(keys, "n", []).certificate_info()
    assert info["expires_soon"] is True
    assert info["ca_validTo"] == info["validTo"]
    assert ca.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=11)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["garbage_cert", "cert_for_another_key", "ended_ca"])
def test_a_join_answer_with_a_bad_certificate_is_a_4xx_and_changes_nothing(
        node_factory, tmp_path, bad):
    """A peer answers add_node with a certificate that is not PEM, or not for this
    node's key, or a CA that has ended: add_node is a 400 naming the problem, and
    nothing of that peer is kept (before: a 500, with its CA already trusted)."""
    from cryptography.hazmat.primitives import serialization

    a = node_factory("node-a")
    ca_key, ca = new_ca("fake CA")
    server_dir = mint(ca_key, ca, "node-f", tmp_path / "f")
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    answer: dict[str, Any] = {"node": "node-f", "ca": ca_pem, "nodes": []}
    if bad == "garbage_cert":
        answer["cert"] = "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    elif bad == "cert_for_another_key":
        answer["cert"] = (mint(ca_key, ca, "node-a", tmp_path / "other") /
                          "node.pem").read_text()
    else:  # a CA that has ended (its server certificate still signed by it)
        import datetime as dt

        from cryptography.hazmat.primitives import hashes

        now = dt.datetime.now(dt.UTC)
        ca = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(days=30))
              .not_valid_after(now - dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
        ca_pem = answer["ca"] = ca.public_bytes(serialization.Encoding.PEM).decode()
    sock = bind_socket()
    fake = FakeServer(sock, server_dir, answer)
    try:
        url = f"wss://127.0.0.1:{sock.getsockname()[1]}"
        answer["url"] = url
        body = a.call("add_node", expect=400, hostname="node-f", url=url,
                      verify_tls=False, authorization={"username": "admin",
                                                       "password": CREDS_PASSWORD})
        assert "node-f" in str(body) or "certificate" in str(body).lower(), body
    finally:
        fake.close()
        sock.close()
    assert "node-f" not in {r["name"] for r in hdb_nodes(a)}
    trusted = a.root / "keys" / "trusted"
    assert not any(p.read_text() == ca_pem for p in trusted.glob("*.pem"))


def test_a_long_node_name_gets_keys_or_a_message_saying_why_not(tmp_path):
    """A node name of 53 to 64 characters (a cluster-internal DNS name) gets its CA and
    certificate (before, the CA's name, "harpsync CA " + the node name, passed X.509's 64
    characters and the node could not start); a longer one is refused with a message
    naming replication.hostname, not cryptography's bare attribute-length error."""
    from harpsync.security import NodeKeys

    name = "harpsync-0.harpsync-headless.prod.svc.cluster.local.x"  # 53 characters
    keys = NodeKeys.load_or_create(tmp_path / "ok", name, [])
    assert keys.node_cert.subject.rfc4514_string() == f"CN={name}"
    with pytest.raises(ValueError, match="replication.hostname .* 1 to 64"):
        NodeKeys.load_or_create(tmp_path / "long", name + ".internal.example", [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["expired", "not_yet_valid"])
def test_a_peer_certificate_out_of_its_dates_is_named_in_cluster_status(
        node_factory, tmp_path, when):
    """B answers with its own key and CA but a certificate out of its validity dates: A
    refuses it and its cluster_status says that and what to check (before, it told the
    operator that B's keys were replaced and to run add_node, which fixes nothing)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization

    from tests.security.attacker import load_key

    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(a, b)])
    keys = b.root / "keys"
    node_key, ca_key = load_key(keys / "node.key"), load_key(keys / "ca.key")
    ca = load_cert(keys / "ca.pem")
    now = dt.datetime.now(dt.UTC)
    start, end = ((now - dt.timedelta(days=20), now - dt.timedelta(days=1))
                  if when == "expired" else
                  (now + dt.timedelta(days=1), now + dt.timedelta(days=20)))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME,
                                                        b.name)]))
            .issuer_name(ca.subject).public_key(node_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(b.name)]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = tmp_path / "dated"
    out.mkdir()
    (out / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "node.key").write_bytes((keys / "node.key").read_bytes())
    b.stop()
    fake = FakeServer(b.repl_sock, out)
    word = "expired" if when == "expired" else "not yet valid"
    try:
        a.call("pause_replication", hostname=b.name)
        a.call("resume_replication", hostname=b.name)
        errors = wait_for(lambda: [e for e in _last_errors(a, b.name) if word in e],
                          timeout=20, message=f"A naming B's {word} certificate")
    finally:
        fake.close()
    assert all("clock" in e and "keys of node-b were replaced" not in e for e in errors), \
        errors


@pytest.mark.timeout(120)
def test_a_credentialed_join_to_a_known_node_is_not_sent_to_another_members_cert(
        node_factory, tmp_path):
    """X, a member, answers at B's address with a certificate its own CA made for B's
    name and host. A's add_node for B with credentials and verify_tls (X's CA is in A's
    trust store) refuses it before sending anything (before, the handshake passed and
    X received the super_user credentials)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    x = node_factory("node-x")
    join(a, b)
    join(a, x)
    forged = mint_with_node_ca(x.root, b.name, tmp_path / "forged")
    b.stop()
    fake = FakeServer(b.repl_sock, forged, answer={"error": "nope"})
    try:
        body = a.call("add_node", expect=400, hostname=b.name, url=b.repl_url,
                      verify_tls=True, authorization={"username": "admin",
                                                      "password": CREDS_PASSWORD})
    finally:
        fake.close()
    assert fake.frames == [], "A sent its credentials to X"
    assert "not node-b's" in str(body) or "not issued by" in str(body), body


@pytest.mark.timeout(120)
def test_a_renamed_node_added_before_its_old_name_is_removed_stays(node_factory):
    """B is renamed; on A the operator adds the new name first, then removes the old:
    B, under its new name, keeps replicating (before, removing the old name barred the
    key both rows carry, and the new row was refused as a removed node's key)."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    b.stop()
    b.extra_env["REPLICATION_HOSTNAME"] = "node-b2"
    b.start()
    a.call("add_node", hostname="node-b2", url=b.repl_url, verify_tls=False,
           authorization={"username": "admin", "password": CREDS_PASSWORD})
    a.call("remove_node", hostname="node-b")
    a.call("insert", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t", 1) is not None, timeout=20,
             message=f"A's row on B ({_last_errors(a, 'node-b2')})")
    b.call("insert", table="t", records=[{"id": 2}])
    wait_for(lambda: by_id(a, "t", 2) is not None, timeout=20,
             message=f"B's row on A ({_last_errors(a, 'node-b2')})")
