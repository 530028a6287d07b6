"""harpsync/replication/transport.py: links over a socket pair (no TLS, no node)."""

from __future__ import annotations

import asyncio

import pytest

from harpsync.replication.transport import FRAGMENT, socket_pair

pytestmark = pytest.mark.timeout(30)


async def test_a_pong_waits_behind_one_fragment_not_behind_a_large_frame() -> None:
    """A 68 MB log entry travels in one message. Written whole, it sat in the socket's
    buffer ahead of every pong: under load its transfer outlasted the peer's keepalive
    timeout, the peer dropped the link, reconnected, was sent the same entry, and never
    got it. In fragments, each written once the buffer drained, the pong to a ping sent
    while the message is under way arrives long before the message ends."""
    dialed, accepted = await socket_pair("/d")
    big = bytes(range(256)) * (32 * FRAGMENT // 256)
    receiver = dialed._conn
    seen = 0
    original = receiver.data_received

    def counting(data: bytes) -> None:  # bytes the receiving end read so far
        nonlocal seen
        seen += len(data)
        original(data)

    receiver.data_received = counting
    assert not accepted.send_now(big)  # too large to write at once: send() fragments it
    sending = asyncio.create_task(accepted.send(big))
    while not seen:  # the message is under way
        await asyncio.sleep(0)
    pong = await receiver.ping()
    seen_at_pong: list[int] = []
    pong.add_done_callback(lambda _: seen_at_pong.append(seen))
    received, _ = await asyncio.gather(dialed.recv(), sending)
    assert received == big  # reassembled whole
    assert accepted.bytes_sent == len(big)
    assert seen_at_pong and seen_at_pong[0] < len(big) // 2, (seen_at_pong, len(big))


async def test_frames_up_to_a_fragment_are_written_at_once() -> None:
    dialed, accepted = await socket_pair("/d")
    assert accepted.send_now(b"x" * FRAGMENT)
    assert await dialed.recv() == b"x" * FRAGMENT
