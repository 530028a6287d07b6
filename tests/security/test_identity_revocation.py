"""Issue 8, point 2: a revoked or removed node is refused with any certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import wait_for
from tests.repl_util import by_id, connection, hdb_nodes, join, stays, wait_linked
from tests.security.attacker import (
    client_context,
    csr,
    dial_outcome,
    load_cert,
    mint_with_node_ca,
    node_request,
    serial_hex,
)
from tests.security.identity_util import _last_errors, _peer_cert_dir, _row


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
