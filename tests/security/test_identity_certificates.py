"""Issue 8, point 1: a certificate names one node; what is issued, accepted, shown."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import bind_socket, wait_for
from tests.repl_util import PASSWORD as CREDS_PASSWORD
from tests.repl_util import connection, hdb_nodes, join, wait_linked
from tests.security.attacker import (
    client_context,
    csr,
    load_cert,
    mint,
    new_ca,
    node_request,
    serial_hex,
)
from tests.security.identity_util import FakeServer, _last_errors, _peer_cert_dir, _row


def _sans(pem: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v.value) for v in san}


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
