"""harpsync/replication/membership.py: one ``/.node`` request and its answer."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest

from harpsync import codec
from harpsync.errors import PeerError, TooManyRequestsError
from harpsync.replication.membership import node_request
from harpsync.replication.transport import Link, listen


async def _answering(answer: Any) -> tuple[Any, int]:
    """A plain-WebSocket listener on 127.0.0.1 answering every request with ``answer``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]

    async def handler(link: Link) -> None:
        await link.recv()
        await link.send(codec.pack(answer))
        await link.close()

    return await listen(sock, None, handler, 20.0), port


_CLIENT = SimpleNamespace(keys=SimpleNamespace(client_context=lambda **_: None),
                          ping_interval=20.0, check_peer=lambda *_: None)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("retry_after", ["soon", None, -5, 10**15, float("inf"), [1]])
async def test_a_429_answer_with_a_bad_retry_after_is_still_a_429(retry_after: Any) -> None:
    """A peer's 429 answer whose ``retry_after_seconds`` is not a sane whole number of
    seconds still gives TooManyRequestsError, with a bounded delay. Before, int() of it
    raised ValueError or TypeError outside the answer's checks (a 500 from add_node),
    and 10**15 went out as the Retry-After header."""
    server, port = await _answering({"error": "busy", "status": 429,
                                     "retry_after_seconds": retry_after})
    try:
        with pytest.raises(TooManyRequestsError) as caught:
            await node_request(_CLIENT, f"ws://127.0.0.1:{port}", {"type": "probe"},
                               verify=False, present_cert=False, timeout=5)
        assert 1 <= caught.value.retry_after <= 3600
    finally:
        server.close()


@pytest.mark.timeout(20)
async def test_an_answer_that_is_not_a_map_is_a_peer_error() -> None:
    """A peer answering with something other than a map gives PeerError."""
    server, port = await _answering([1, 2])
    try:
        with pytest.raises(PeerError, match="unreadable"):
            await node_request(_CLIENT, f"ws://127.0.0.1:{port}", {"type": "probe"},
                               verify=False, present_cert=False, timeout=5)
    finally:
        server.close()
