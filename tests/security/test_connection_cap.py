"""``operationsApi.network.maxConnectionsPerAddress``: one client address cannot hold
more than that many connections to the operations port (real sockets)."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest

from tests.helpers import ADMIN, wait_for

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _connect(node: Any, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.ops_port), timeout=10,
                                    source_address=(source, 0))
    return sock


def _answer(sock: socket.socket) -> bytes:
    """One whole answer (head and ``content-length`` body) read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _health(node: Any, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """A /health request on a fresh socket: status and answer (0 if the node closed or
    reset the connection without one)."""
    sock = _connect(node, source)
    try:
        sock.sendall(HEALTH)
        answer = _answer(sock)
    except OSError:
        return 0, b""
    finally:
        sock.close()
    return (_status(answer) if answer else 0), answer


@pytest.mark.timeout(120)
def test_connections_over_the_cap_from_one_address_are_refused(node_factory, caplog):
    """With a cap of 3 and three kept-alive connections open from 127.0.0.1, a fourth
    from it is answered 429 in the error shape and closed, with one warning naming the
    address; 127.0.0.2 connects as usual; once one of the three closes, 127.0.0.1 is
    served again."""
    node = node_factory(env={"OPERATIONSAPI_NETWORK_MAXCONNECTIONSPERADDRESS": "3"})
    held = [_connect(node) for _ in range(3)]
    try:
        for sock in held:  # each accepted and served: counted by the node
            sock.sendall(HEALTH)
            assert _status(_answer(sock)) == 200
        with caplog.at_level(logging.WARNING, logger="harpsync.http_protocol"):
            status, answer = _health(node)
            assert status == 429, answer[:300]
            assert b"retry-after: 1" in answer.lower()
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["code"] == "RATE_LIMIT_EXCEEDED" and body["request_id"]
            assert "Too many connections from this address: 3" in body["error"]
            assert _health(node)[0] == 429
        warnings = [r.getMessage() for r in caplog.records
                    if "maxConnectionsPerAddress" in r.getMessage()]
        assert len(warnings) == 1 and "from 127.0.0.1" in warnings[0], warnings
        assert _health(node, "127.0.0.2")[0] == 200
        held.pop().close()
        wait_for(lambda: _health(node)[0] == 200, timeout=10,
                 message="a connection from 127.0.0.1 served after one closed")
    finally:
        for sock in held:
            sock.close()
    assert node.call("user_info")["username"] == ADMIN[0]


@pytest.mark.timeout(120)
def test_the_default_cap_is_generous_and_zero_turns_it_off(node_factory):
    """By default 64 connections from one address are all served; with 0 there is no
    cap."""
    for env in ({}, {"OPERATIONSAPI_NETWORK_MAXCONNECTIONSPERADDRESS": "0"}):
        node = node_factory(f"node-{len(env)}", env=env)
        held = [_connect(node) for _ in range(64)]
        try:
            for sock in held:
                sock.sendall(HEALTH)
            assert [_status(_answer(sock)) for sock in held] == [200] * 64
        finally:
            for sock in held:
                sock.close()


@pytest.mark.timeout(120)
def test_websocket_connections_are_released_when_they_end(node_factory):
    """A connection upgraded to a WebSocket (``/changes``, accepted or refused) counts
    until the socket closes and no longer after: five feeds opened and closed one after
    another leave room for three plain connections under a cap of 3."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    node = node_factory(env={"OPERATIONSAPI_NETWORK_MAXCONNECTIONSPERADDRESS": "3"})
    url = f"ws://127.0.0.1:{node.ops_port}/changes"
    token = "Basic " + __import__("base64").b64encode(b"%s:%s" % (
        ADMIN[0].encode(), ADMIN[1].encode())).decode()
    for _ in range(5):
        with connect(url, additional_headers={"Authorization": token}, proxy=None,
                     open_timeout=30) as ws:
            ws.send(json.dumps({"action": "subscribe", "database": "data"}))
    for _ in range(2):
        with pytest.raises(InvalidStatus):
            connect(url, additional_headers={"Authorization": "Basic eDp5"}, proxy=None,
                    open_timeout=30)

    def three_served() -> bool:
        held = [_connect(node) for _ in range(3)]
        try:
            for sock in held:
                sock.sendall(HEALTH)
            return [_status(_answer(sock) or b"x 0 ") for sock in held] == [200] * 3
        except OSError:
            return False
        finally:
            for sock in held:
                sock.close()

    wait_for(three_served, timeout=10, message="three connections served after the feeds")
