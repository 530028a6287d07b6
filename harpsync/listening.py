"""Listening sockets for the operations API and the replication port."""

from __future__ import annotations

import socket


def bind(host: str, port: int, keys: str, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (IPv6 when ``host`` holds a
    colon, ``::`` included); a failure names the address and the settings ``keys``.

    ``IPPROTO_TCP`` explicitly: asyncio sets TCP_NODELAY only on sockets it knows are
    TCP, and without it every response waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # name the address and the settings, not just errno
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} ({keys}): "
                                 f"{exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
