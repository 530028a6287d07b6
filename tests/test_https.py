"""The operations API over HTTPS with the node certificate (operationsApi.network.securePort)."""

from __future__ import annotations

import ssl

import httpx

from tests.helpers import ADMIN


def test_operations_api_serves_https_with_node_certificate(node_factory):
    """With securePort set, the API answers over TLS verified against the node's CA."""
    node = node_factory("node-a", env={"OPERATIONSAPI_NETWORK_SECUREPORT": "0"})
    port = node.node.secure_sock.getsockname()[1]
    trust = ssl.create_default_context(cafile=str(node.root / "keys" / "ca.pem"))
    with httpx.Client(verify=trust, timeout=30) as client:
        res = client.post(f"https://127.0.0.1:{port}/", json={"operation": "describe_all"},
                          auth=ADMIN)
        assert res.status_code == 200, res.text
        assert client.get(f"https://127.0.0.1:{port}/health", auth=ADMIN).json()["listeners"][
            "operations_api_tls"] == port
    assert node.call("describe_all") == res.json()  # plain HTTP keeps working too


def test_https_certificate_names_the_operations_host(node_factory):
    """The operations API bound to its own address (operationsApi.network.host) serves a
    certificate naming that address, so clients verifying it against the node's CA
    connect (before, only the node name, the replication host and localhost were
    named, and such a client failed host name verification)."""
    node = node_factory("node-a", env={"OPERATIONSAPI_NETWORK_SECUREPORT": "0",
                                       "OPERATIONSAPI_NETWORK_HOST": "127.0.0.2"})
    port = node.node.secure_sock.getsockname()[1]
    trust = ssl.create_default_context(cafile=str(node.root / "keys" / "ca.pem"))
    with httpx.Client(verify=trust, timeout=30) as client:
        res = client.post(f"https://127.0.0.2:{port}/", json={"operation": "describe_all"},
                          auth=ADMIN)
        assert res.status_code == 200, res.text


def test_set_configuration_refuses_an_unusable_https_certificate(node_factory, tmp_path):
    """operationsApi.tls.certificate / privateKey that cannot serve TLS (not PEM, or a key
    that does not match) are a 400 naming them, not written (before, they were saved
    and the node could not start again after the restart they asked for)."""
    node = node_factory("node-a")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    other = node_factory("node-b")
    cases = [(garbage, node.root / "keys" / "node.key"),
             (node.root / "keys" / "node.pem", other.root / "keys" / "node.key")]
    for cert, key in cases:
        body = node.call("set_configuration", expect=400,
                         operationsApi_tls_certificate=str(cert),
                         operationsApi_tls_privateKey=str(key))
        assert "operationsApi.tls" in body["error"], body
    assert node.call("get_configuration")["operationsApi"]["tls"]["certificate"] is None
