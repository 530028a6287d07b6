"""Helpers of the identity tests: hdb_nodes rows, peer certificates, a forged server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path
from typing import Any

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from harpsync import codec
from tests.repl_util import connection, hdb_nodes
from tests.security.attacker import (
    SUBPROTOCOL,
)


def _row(node: Any, name: str) -> dict[str, Any]:
    return {r["name"]: r for r in hdb_nodes(node)}[name]


def _peer_cert_dir(node: Any, peer: Any) -> Path:
    """A directory holding the certificate ``peer``'s CA signed for ``node`` (+ key)."""
    keys = node.root / "keys"
    out = node.root.parent / f"{node.name}-for-{peer.name}"
    out.mkdir(exist_ok=True)
    (out / "node.pem").write_bytes((keys / "peer_certs" / f"{peer.name}.pem").read_bytes())
    (out / "node.key").write_bytes((keys / "node.key").read_bytes())
    return out


class FakeServer:
    """A TLS WebSocket server on a stopped node's port, with a forged certificate.
    Records every frame a client sends it."""

    def __init__(self, sock: Any, cert_dir: Path, answer: dict[str, Any] | None = None,
                 ) -> None:
        self.frames: list[bytes] = []
        self._answer = answer
        self.connections = 0
        self._sock = sock.dup()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert_dir / "node.pem", cert_dir / "node.key")
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handler(ws: Any) -> None:
            self.connections += 1
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:
                    self.frames.append(frame)
                    if self._answer is not None:  # a peer's answer to a /.node request
                        await ws.send(codec.pack(self._answer))

        async def main() -> None:
            self._stop = self._loop.create_future()
            self._sock.setblocking(False)
            async with serve(handler, sock=self._sock, ssl=self._ctx,
                             subprotocols=[SUBPROTOCOL]):  # type: ignore[list-item]
                self._ready.set()
                await self._stop

        self._loop.run_until_complete(main())

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


def _last_errors(node: Any, peer: str) -> list[str]:
    conn = connection(node, peer)
    return [s.get("last_error") or "" for s in (conn or {}).get("database_sockets", [])]
