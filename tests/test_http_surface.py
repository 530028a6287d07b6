"""The HTTP surface around the operations: what a browser on another site can make the
node do, and what an idle or half-sent connection costs it."""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers import ADMIN, wait_for

# What a cross-site <form enctype="text/plain"> (or a no-cors fetch) would send: a body
# that is JSON, a content type that needs no preflight, and the browser's own headers.
FORGED = b'{"operation": "create_database", "database": "forged"}'
AUTH = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()


def _post(node: Any, headers: dict[str, str], body: bytes = FORGED) -> Any:
    return node.client.post(node.url, content=body,
                            headers={"Authorization": AUTH, "Content-Type": "text/plain",
                                     **headers})


def _databases(node: Any) -> set[str]:
    return set(node.call("describe_all"))


FORGERIES = [
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://evil.example"},                      # a browser without Fetch metadata
    {"Origin": "null"},                                     # a sandboxed frame or data: page
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},  # another port
]


def test_a_cross_origin_browser_request_is_refused_before_it_runs(node):
    """A request a page on another origin made the browser send (with credentials the
    browser holds) is a 403 naming the origin, and nothing of it runs."""
    for headers in FORGERIES:
        response = _post(node, headers)
        assert response.status_code == 403, (headers, response.text)
        body = response.json()
        assert body["code"] == "FORBIDDEN" and "origin" in body["error"], body
    assert "forged" not in _databases(node)


def test_the_nodes_own_pages_and_clients_without_an_origin_are_served(node):
    """The dashboard's own requests (same origin) and non-browser clients still work,
    whatever the content type."""
    own = node.url.rstrip("/")
    response = _post(node, {"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert response.status_code == 200, response.text
    body = b'{"operation": "create_database", "database": "plain"}'
    assert _post(node, {}, body).status_code == 200  # curl, SDKs: no Origin at all
    # Behind a proxy that rewrites Host but says what the browser asked for.
    body = b'{"operation": "create_database", "database": "proxied"}'
    response = _post(node, {"Origin": "http://db.example", "X-Forwarded-Host": "db.example"},
                     body)
    assert response.status_code == 200, response.text
    assert {"forged", "plain", "proxied"} <= _databases(node)


def test_the_change_feed_refuses_a_cross_origin_browser(node):
    """A page on another site cannot open /changes with the browser's credentials."""
    url = node.url.replace("http://", "ws://") + "changes"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers={"Authorization": AUTH},
                origin="http://evil.example", open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    with connect(url, additional_headers={"Authorization": AUTH},
                 origin=node.url.rstrip("/"), open_timeout=5) as ws:  # type: ignore[arg-type]
        assert ws.protocol.state.name == "OPEN"


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the node has closed ``sock`` (reads what it sent until then)."""
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_that_never_finishes_a_request_head_is_closed(node_factory):
    """Silent sockets and heads sent a byte at a time (slowloris) are closed after
    operationsApi.network.headersTimeout; a full request on a fresh socket still works."""
    node = node_factory(env={"OPERATIONSAPI_NETWORK_HEADERSTIMEOUT": "300ms"})
    silent = socket.create_connection(("127.0.0.1", node.ops_port))
    partial = socket.create_connection(("127.0.0.1", node.ops_port))
    partial.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
    # After one whole request, the next head is held to the same limit.
    second = socket.create_connection(("127.0.0.1", node.ops_port))
    second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: b"\r\n\r\n" in second.recv(65536, socket.MSG_PEEK), timeout=5,
             message="the first response")
    second.recv(65536)
    second.sendall(b"GET /health HTTP/1.1\r\n")
    sockets = (silent, partial, second)
    for sock in sockets:
        sock.setblocking(False)
    try:
        for sock, what in zip(sockets, ("silent", "partial head", "second head"), strict=True):
            wait_for(lambda sock=sock: _closed_by_server(sock), timeout=5,
                     message=f"the {what} socket closed by the node")
    finally:
        for sock in sockets:
            sock.close()
    assert node.call("user_info")["username"] == ADMIN[0]


def test_requests_for_unknown_dashboard_files_leave_nothing_behind(node):
    """Anyone may ask for /dashboard/<anything>: each unknown name is a 404 and is not
    remembered (the file cache holds the shipped files only, however many names come)."""
    from harpsync import dashboard

    for i in range(300):
        response = node.client.get(f"{node.url}dashboard/{i:04d}-{'x' * 2000}.js")
        assert response.status_code == 404
    assert node.client.get(node.url + "dashboard/dashboard.js").status_code == 200
    assert dashboard._read.cache_info().currsize <= len(dashboard.TYPES)


def test_a_request_head_too_large_is_refused_before_it_is_buffered(node_factory):
    """A head of endless small header lines (no login needed) is answered 431 and closed
    once it passes the cap, instead of being held in memory until it ends; ordinary
    requests on other sockets are unaffected."""
    node = node_factory()
    sock = socket.create_connection(("127.0.0.1", node.ops_port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    lines = b"".join(b"X-%d: a\r\n" % i for i in range(20000))  # 220 KB, far past the cap
    answer = b""
    try:
        sock.sendall(lines)
        sock.sendall(b"\r\n")
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:  # reset while we still wrote: the node stopped reading
        pass
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == "INVALID_REQUEST" and body["request_id"], body
    assert node.client.get(node.url + "health").status_code == 200


def test_a_body_still_arriving_after_the_answer_is_cut_off(node_factory):
    """A request answered before its body ended (a failed login, 413) is read and
    dropped for at most headersTimeout; a body trickled after that cannot hold the
    connection (no login needed), and the client does get its answer first."""
    node = node_factory(env={"OPERATIONSAPI_NETWORK_HEADERSTIMEOUT": "300ms"})
    sock = socket.create_connection(("127.0.0.1", node.ops_port), timeout=10)
    try:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
        sock.setblocking(False)

        def cut_off() -> bool:
            try:
                sock.send(b" ")  # one byte at a time, as a slowloris body would
            except OSError:
                return True
            return _closed_by_server(sock)

        wait_for(cut_off, timeout=5, interval=0.05, message="the trickling socket closed")
    finally:
        sock.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _request(operation: str, version: str = "1.1") -> bytes:
    body = json.dumps({"operation": operation}).encode()
    return (f"POST / HTTP/{version}\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def test_pipelined_requests_are_answered_whole_and_in_order(node):
    """Requests sent back to back on one connection get their answers in order, each
    head with its whole body (a head is held until its body comes)."""
    sock = socket.create_connection(("127.0.0.1", node.ops_port), timeout=10)
    try:
        sock.sendall(_request("describe_all") + _request("user_info")
                     + _request("describe_all") + _request("no_such_op", "1.0"))
        data = _read_until_closed(sock)  # HTTP/1.0: the last answer closes
    finally:
        sock.close()
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        answers.append((head.split(b" ")[1], json.loads(rest[:length])))
        data = rest[length:]
    assert [status for status, _ in answers] == [b"200", b"200", b"200", b"400"]
    assert isinstance(answers[0][1], dict) and answers[1][1]["username"] == ADMIN[0]
    assert "no_such_op" in answers[3][1]["error"]


def test_an_answer_before_the_connection_closes_is_delivered_whole(node):
    """An HTTP/1.0 request (the connection closes after its answer) gets its whole
    answer: what is written is sent before the close."""
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", node.ops_port), timeout=10)
        try:
            sock.sendall(_request("user_info", "1.0"))
            head, _, body = _read_until_closed(sock).partition(b"\r\n\r\n")
        finally:
            sock.close()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body)["username"] == ADMIN[0]
