"""Replication security: unknown nodes and revoked certificates are refused."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.helpers import wait_for
from tests.repl_util import by_id, connection, hdb_nodes, join, wait_linked

SUBPROTOCOL = "harpsync-replication-1"


def _serial(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return f"{cert.serial_number:X}"


def _dial_outcome(url: str, context: ssl.SSLContext) -> tuple[str, Any]:
    """Dial ``url`` and report how the listener treated us.

    Returns ``("closed", code)`` when the WebSocket opened and the server closed it,
    ``("refused", error)`` when TLS or the handshake failed, or ``("open", None)`` if the
    server kept talking to us (sent a frame) without closing.
    """

    async def run() -> tuple[str, Any]:
        try:
            ws = await connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               open_timeout=5, close_timeout=2, proxy=None,
                               server_hostname="127.0.0.1")
        except (TimeoutError, OSError, ssl.SSLError, InvalidHandshake, EOFError) as exc:
            return "refused", repr(exc)
        except ConnectionClosed as exc:
            return "closed", exc.rcvd.code if exc.rcvd else None
        try:
            await asyncio.wait_for(ws.recv(), 5)
            return "open", None
        except TimeoutError:  # still open and silent: accepted as a peer
            return "open", None
        except ConnectionClosed as exc:
            return "closed", exc.rcvd.code if exc.rcvd else None
        except (ssl.SSLError, OSError) as exc:
            return "refused", repr(exc)
        finally:
            await ws.close()

    return asyncio.run(run())


def _client_context(cert_root: Path, trust_root: Path, present: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(trust_root / "keys" / "ca.pem")
    ctx.check_hostname = False
    if present:
        ctx.load_cert_chain(cert_root / "keys" / "node.pem", cert_root / "keys" / "node.key")
    return ctx


def test_unknown_node_cannot_join_with_wrong_credentials(node_factory):
    """A node that never joined gets a 4xx naming the target and cause; nothing is stored."""
    a = node_factory("node-a")
    x = node_factory("node-x")
    before = hdb_nodes(a)
    res = x.post({"operation": "add_node", "hostname": a.name, "url": a.repl_url,
                  "verify_tls": False,
                  "authorization": {"username": "admin", "password": "wrong-secret"}})
    assert 400 <= res.status_code < 500, res.text
    error = res.json()["error"]
    assert a.repl_url in error
    assert "authoriz" in error.lower() or "credential" in error.lower()
    assert "wrong-secret" not in res.text
    assert hdb_nodes(a) == before
    assert a.name not in {r["name"] for r in hdb_nodes(x)}
    assert connection(x, a.name) is None


def test_socket_with_unknown_certificate_is_refused(node_factory):
    """A socket presenting a certificate from an unknown CA never gets a replication session.

    The listener asks for a client certificate and verifies it during the handshake, so
    OpenSSL refuses a certificate that chains to no known CA before any WebSocket exists;
    a verified certificate of a node that is not in hdb_nodes gets 1008 (tested below).
    """
    a = node_factory("node-a")
    x = node_factory("node-x")
    url = a.repl_url + "/data"
    kind, detail = _dial_outcome(url, _client_context(x.root, a.root))
    assert kind != "open", (kind, detail)
    assert kind == "refused" or (kind, detail) == ("closed", 1008), (kind, detail)


def test_socket_without_certificate_is_closed_1008(node_factory):
    """A replication socket without any client certificate is closed with 1008."""
    a = node_factory("node-a")
    url = a.repl_url + "/data"
    kind, detail = _dial_outcome(url, _client_context(a.root, a.root, present=False))
    assert (kind, detail) == ("closed", 1008), (kind, detail)


def test_known_ca_but_removed_node_is_closed_1008(node_factory):
    """A certificate from a trusted CA whose node is no longer in hdb_nodes gets 1008."""
    a = node_factory("node-a")
    x = node_factory("node-x")
    join(x, a)
    wait_linked([(a, x)])
    x.call("remove_node", hostname=a.name)
    wait_for(lambda: connection(a, x.name) is None, timeout=10, message="A forgot X")
    kind, detail = _dial_outcome(a.repl_url + "/data", _client_context(x.root, a.root))
    assert (kind, detail) == ("closed", 1008), (kind, detail)


def _b_serials(b: Any) -> list[str]:
    """Serials of every certificate B may present (its node cert and peer-signed ones)."""
    keys = b.root / "keys"
    return sorted({_serial(p) for p in keys.rglob("*.pem")
                   if p.name != "ca.pem" and "trusted" not in p.parts
                   and b"BEGIN CERTIFICATE" in p.read_bytes()})


@pytest.mark.timeout(120)
def test_revoked_certificate_is_refused(node_factory, tmp_path):
    """After A revokes B's certificate, B's sockets to A drop and A's writes stop reaching B."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="dog", primary_key="id")
    join(a, b)
    wait_for(lambda: b.post({"operation": "describe_table", "table": "dog"}).status_code
             == 200, timeout=15, message="table on B")
    wait_linked([(b, a)], ("system", "data"))
    a.call("insert", table="dog", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "dog", 1) is not None, timeout=15, message="flowing before")

    serial = _serial(b.root / "keys" / "node.pem")
    res = a.call("update_node", hostname=b.name, revoked_certificates=_b_serials(b))
    assert "message" in res
    row = {r["name"]: r for r in hdb_nodes(a)}[b.name]
    assert serial in [str(s).upper() for s in row["revoked_certificates"]]

    def refused() -> bool:
        conn = connection(b, a.name)
        assert conn is not None
        socks = conn["database_sockets"]
        return bool(socks) and all(
            not s["connected"] and s["last_error"]
            and ("1008" in s["last_error"] or "revoked" in s["last_error"].lower())
            for s in socks)

    wait_for(refused, timeout=10, message="B's sockets to A refused as revoked")
    a.call("insert", table="dog", records=[{"id": 2}])
    wait_for(refused, timeout=5, message="still refused")
    assert by_id(b, "dog", 2) is None
    # B holds its CA key: a certificate it mints now has a serial nobody revoked, with
    # its own key or a new one. A refuses it all the same.
    for same_key in (True, False):
        minted = _forge(b.root, b.name, tmp_path / f"minted-{same_key}" / "keys",
                        key_from=b.root if same_key else None).parent
        kind, detail = _dial_outcome(a.repl_url + "/data", _client_context(minted, a.root))
        assert (kind, detail) == ("closed", 1008), (same_key, kind, detail)


def _forge(signer_root: Path, common_name: str, out: Path,
          key_from: Path | None = None) -> Path:
    """A certificate named ``common_name`` signed by the CA under ``signer_root``, for
    the node key under ``key_from`` (a new key if None)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = serialization.load_pem_private_key(
        (signer_root / "keys" / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((signer_root / "keys" / "ca.pem").read_bytes())
    key = (serialization.load_pem_private_key(
        (key_from / "keys" / "node.key").read_bytes(), password=None)
        if key_from is not None else ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out


def test_peer_cannot_impersonate_another_node(node_factory, tmp_path):
    """A joined node's CA signing a certificate named after another node gets 1008."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    x = node_factory("node-x")
    a.call("create_table", table="dog", primary_key="id")  # so /data exists on A
    join(a, b)
    join(a, x)
    wait_linked([(a, b), (a, x)], ("system", "data"))
    forged = _forge(x.root, b.name, tmp_path / "forged" / "keys").parent
    kind, detail = _dial_outcome(a.repl_url + "/data", _client_context(forged, a.root))
    assert (kind, detail) == ("closed", 1008), (kind, detail)
