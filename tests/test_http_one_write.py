"""The operations API's HTTP protocol writes each response in one piece.

uvicorn's protocol is driven in memory over a fake transport (no socket can show how a
response was split into writes).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from harpsync.node import _http_protocol


class _Transport:
    """What uvicorn's protocol uses of an asyncio transport; records every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 9925), "peername": ("127.0.0.1", 5000)}.get(
            name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def _serve(request: bytes) -> _Transport:
    config = uvicorn.Config(_app, http=_http_protocol(), lifespan="off", log_config=None)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(),
                                          app_state={})
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(request)
    for _ in range(1000):  # the app runs as a task: let it finish (bounded)
        if any(b'{"ok":true}' in w for w in transport.writes):
            break
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


async def test_response_head_and_body_leave_in_one_write():
    """Status line, headers and body go out in a single write (one segment)."""
    transport = await _serve(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    assert len(transport.writes) == 1, transport.writes
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b'\r\n\r\n{"ok":true}')


async def test_continue_is_not_held_back():
    """``100 Continue`` goes out at once, before the response (held, it would stall a
    client waiting to send its body)."""
    transport = await _serve(b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                             b"content-length: 2\r\n\r\n{}")
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
