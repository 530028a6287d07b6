"""Issue 8, point 3: no peer impersonates another; renamed or re-keyed peers return."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import wait_for
from tests.repl_util import PASSWORD as CREDS_PASSWORD
from tests.repl_util import by_id, connection, has_table, join, wait_linked
from tests.security.attacker import (
    client_context,
    dial_outcome,
    mint,
    mint_with_node_ca,
    new_ca,
    node_request,
)
from tests.security.identity_util import FakeServer, _last_errors, _row


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
