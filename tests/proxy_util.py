"""A loopback TCP proxy a test can cut and heal: one direct link between two nodes."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

from tests.helpers import bind_socket


class TcpProxy:
    """Forwards connections on its own port to ``target_port`` on 127.0.0.1.

    ``cut()`` closes every forwarded connection and refuses new ones (accepted, then
    closed at once); ``heal()`` forwards again. ``reply_delay`` (seconds) holds each
    chunk the target sends back for that long, ``request_delay`` each chunk sent to the
    target: a slow path, one way. ``stall()`` holds every chunk, both ways, with the
    connections left open (a peer that stops answering, as behind a partition) until
    ``unstall()``.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        if host == "127.0.0.1":
            self.listener = bind_socket()
        else:  # another loopback address: a name the target's certificate lacks
            self.listener = socket.socket()
            self.listener.bind((host, 0))
            self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self.reply_delay = 0.0
        self.request_delay = 0.0
        self._closed = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"proxy-{self.port}")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"wss://{self.host}:{self.port}"

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def heal(self) -> None:
        self._cut.clear()

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst, reply in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, reply),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        # Each chunk goes through a queue and is sent the current delay after it
        # arrived; the end of the stream (b"") too, so nothing queued is cut off.
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
        sender = threading.Thread(target=self._late, args=(chunks, dst), daemon=True)
        sender.start()
        try:
            while True:
                while not self._flowing.is_set() and not self._closed.is_set():
                    self._flowing.wait(0.05)  # stalled: nothing read, the sender's buffers fill
                data = src.recv(65536)
                delay = self.reply_delay if reply else self.request_delay
                chunks.put((time.monotonic() + delay, data))
                if not data:
                    break
        except OSError:
            chunks.put((0.0, b""))
        finally:
            sender.join(timeout=30)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def _late(self, chunks: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = chunks.get()
                if not data:
                    return
                self._closed.wait(max(0.0, due - time.monotonic()))  # the injected latency
                while not self._flowing.is_set() and not self._closed.is_set():
                    self._flowing.wait(0.05)  # stalled
                dst.sendall(data)
