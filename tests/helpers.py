"""Test helpers: real nodes on 127.0.0.1 with sockets the test binds itself.

``InProcessNode`` runs a node on its own event loop in a background thread; ``ProcessNode``
runs ``harpsync run`` as a subprocess (for SIGKILL tests), handing it the listening
sockets the test bound, so a restarted process keeps the same ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ADMIN = ("admin", "test-password")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    answered = 0  # polls since the last error that returned a false value
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            answered += 1
        except Exception as exc:  # the node may be restarting
            last_exc, answered = exc, 0
        time.sleep(interval)
    # Whether the condition was still raising at the end or was answered false since:
    # a node that answers for the whole wait is not one that is down.
    detail = f"last error: {last_exc!r}" if last_exc else ""
    if answered and last_exc:
        detail += f", then {answered} polls answered false"
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" ({detail})" if detail else ""))


TRACE_KEYS = ("code", "request_id")


def harper_error(body: Any) -> dict[str, Any]:
    """An error body as Harper sends it: harpsync's ``code`` and ``request_id`` are
    checked present and taken out, so the rest compares with Harper's body."""
    assert isinstance(body, dict), body
    assert isinstance(body.get("code"), str) and body["code"].isupper(), body
    assert isinstance(body.get("request_id"), str) and body["request_id"], body
    return {k: v for k, v in body.items() if k not in TRACE_KEYS}


def bind_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


class BaseNode:
    """Common client side of a test node: ``.url``, ``.call()``, ``.post()``."""

    name: str
    root: Path
    ops_sock: socket.socket
    repl_sock: socket.socket

    def _init_common(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.ops_sock = bind_socket()
        self.repl_sock = bind_socket()
        self.client = httpx.Client(timeout=60.0)

    @property
    def ops_port(self) -> int:
        return int(self.ops_sock.getsockname()[1])

    @property
    def repl_port(self) -> int:
        return int(self.repl_sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}/"

    @property
    def repl_url(self) -> str:
        return f"wss://127.0.0.1:{self.repl_port}"

    def env(self) -> dict[str, str]:
        return {
            "REPLICATION_HOSTNAME": self.name,
            "REPLICATION_URL": self.repl_url,
            "REPLICATION_PORT": str(self.repl_port),
            "OPERATIONSAPI_NETWORK_PORT": str(self.ops_port),
            "HDB_ADMIN_USERNAME": ADMIN[0],
            "HDB_ADMIN_PASSWORD": ADMIN[1],
            "LOGGING_LEVEL": "warn",
            "REPLICATION_PINGINTERVAL": "200",
        }

    def post(self, body: Any, auth: tuple[str, str] | None = ADMIN, **kw: Any) -> httpx.Response:
        return self.client.post(self.url, json=body, auth=auth, **kw)

    def call(self, operation: str, expect: int | None = 200, **body: Any) -> Any:
        """Post one operation as admin; assert the status (unless ``expect`` is None)."""
        response = self.post({"operation": operation, **body})
        if expect is not None:
            assert response.status_code == expect, (operation, response.status_code,
                                                     response.text)
        return response.json()

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> Any:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self.client.close()
        self.ops_sock.close()
        self.repl_sock.close()

    def count(self, table: str, database: str = "data") -> int:
        return int(self.call("describe_table", database=database, table=table)["record_count"])


class InProcessNode(BaseNode):
    """A node on its own event loop in a background thread of the test process."""

    def __init__(self, name: str, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self._init_common(name, root)
        self.extra_env = extra_env or {}
        self.node: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> InProcessNode:
        from harpsync.config import Config
        from harpsync.node import Node

        env = {**self.env(), **self.extra_env}
        config = Config.load(None, env=env, root=str(self.root))
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            self.node = Node(config, env)
            try:
                loop.run_until_complete(self.node.start(
                    ops_sock=_dup(self.ops_sock), repl_sock=_dup(self.repl_sock)))
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.node.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"node-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        self.loop = None



def _dup(sock: socket.socket) -> socket.socket:
    copy = sock.dup()
    copy.setblocking(False)
    return copy


class ProcessNode(BaseNode):
    """``harpsync run`` in a subprocess, given the test's own listening sockets."""

    def __init__(self, name: str, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self._init_common(name, root)
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root.parent / f"{name}.log"

    def start(self) -> ProcessNode:
        env = {**os.environ, **self.env(), **self.extra_env,
               "HARPSYNC_OPS_FD": str(self.ops_sock.fileno()),
               "HARPSYNC_REPL_FD": str(self.repl_sock.fileno())}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harpsync.cli", "run", "--root", str(self.root)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(self.ops_sock.fileno(), self.repl_sock.fileno()))
        log.close()
        wait_for(self._ready, timeout=30, message=f"{self.name} to start")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
        return self.client.get(self.url + "health", timeout=2).status_code == 200

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

