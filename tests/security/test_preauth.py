"""Issue 8, point 4: work before authentication is bounded (frame size, connection
caps), measured on a real node process."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.security.attacker import dial_outcome

MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _upgrade(port: int, source: str = "127.0.0.1", path: str = "/.node") -> ssl.SSLSocket | None:
    """A TLS socket with a finished WebSocket handshake and no client certificate, or
    None if the node refused it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0))
    try:
        conn = _tls_client().wrap_socket(raw, server_hostname="127.0.0.1")
        conn.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Protocol: harpsync-replication-1\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return None
            head += chunk
    except (OSError, ssl.SSLError):
        raw.close()
        return None
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        conn.close()
        return None
    return conn


def _big_frame_start(declared: int) -> bytes:
    """The header of a masked binary frame declaring ``declared`` payload bytes."""
    return bytes([0x82, 0x80 | 127]) + declared.to_bytes(8, "big") + os.urandom(4)


@pytest.mark.timeout(300)
def test_unauthenticated_connection_storm_leaves_rss_near_idle(node_factory):
    """100 certificate-less sockets each start a 60 MiB frame on /.node and send 4 MiB
    of it. The node reads at most 64 KiB per frame before authentication and caps
    unauthenticated sockets per address, so its RSS stays within 30 MiB of idle."""
    a = node_factory("node-a", process=True)
    assert a.proc is not None
    a.client.get(a.url + "health")
    idle = rss_bytes(a.proc.pid)
    payload = os.urandom(4 * MiB)
    conns: list[ssl.SSLSocket] = []
    accepted = 0
    try:
        for _ in range(100):
            conn = _upgrade(a.repl_port)
            if conn is None:
                continue
            accepted += 1
            conns.append(conn)
            with contextlib.suppress(OSError, ssl.SSLError):
                conn.sendall(_big_frame_start(60 * MiB))
                conn.sendall(payload)
        assert a.client.get(a.url + "health").status_code == 200
        storm = rss_bytes(a.proc.pid)
        print(f"\nRSS idle {idle / MiB:.1f} MiB, under the storm {storm / MiB:.1f} MiB "
              f"({accepted} of 100 sockets upgraded)")
        assert storm - idle < 30 * MiB, (idle, storm, accepted)
    finally:
        for conn in conns:
            conn.close()


def test_unauthenticated_sockets_are_capped_per_address(node_factory):
    """Past the per-address cap on unauthenticated sockets the node refuses more from
    that address, while another address still gets through."""
    a = node_factory("node-a", env={"REPLICATION_MAXPENDINGPERADDRESS": "8"})
    held: list[Any] = []
    try:
        for _ in range(12):
            conn = _upgrade(a.repl_port)
            if conn is not None:
                held.append(conn)
        assert len(held) == 8, len(held)
        other = _upgrade(a.repl_port, source="127.0.0.2")
        assert other is not None
        other.close()
    finally:
        for conn in held:
            conn.close()
    # Once they are gone, the address is welcome again.
    wait_for(lambda: (c := _upgrade(a.repl_port)) is not None and (c.close() or True),
             timeout=10, message="a new socket after the others closed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("process", [False, True], ids=["asyncio", "uvloop"])
def test_sockets_that_never_start_tls_count_against_the_per_address_cap(node_factory,
                                                                        process):
    """TCP sockets that send nothing (no TLS handshake) count as unauthenticated sockets
    of their address: with 20 silent sockets from one address open and a cap of 8, a
    WebSocket upgrade from that address is refused, whichever event loop serves it (a
    node process runs uvloop)."""
    a = node_factory("node-a", process=process, env={"REPLICATION_MAXPENDINGPERADDRESS": "8"})
    silent = [socket.create_connection(("127.0.0.1", a.repl_port), timeout=10)
              for _ in range(20)]
    try:
        conn = _upgrade(a.repl_port)
        if conn is not None:
            conn.close()
        assert conn is None
    finally:
        for sock in silent:
            sock.close()


def test_large_frame_before_authentication_is_refused(node_factory):
    """A certificate-less socket sending a frame over 64 KiB is closed (1009), before
    the node has buffered it."""
    a = node_factory("node-a")
    conn = _upgrade(a.repl_port)
    assert conn is not None
    with contextlib.suppress(OSError, ssl.SSLError):
        conn.sendall(_big_frame_start(200 * 1024) + os.urandom(200 * 1024))
    data = b""
    with contextlib.suppress(OSError, ssl.SSLError):
        while chunk := conn.recv(4096):
            data += chunk
    conn.close()
    # A close frame: 0x88, then the status code 1009 (message too big).
    assert data[:1] == b"\x88" and data[2:4] == (1009).to_bytes(2, "big"), data[:8]
    # An ordinary replication socket without a certificate is still answered with 1008.
    assert dial_outcome(a.repl_url + "/data", _tls_client()) == ("closed", 1008)
