"""Helpers for the full-copy, retention and cluster-lifecycle tests."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any

import httpx
import pytest

from tests.helpers import ADMIN, bind_socket
from tests.repl_util import CREDS

__all__ = ["CREDS", "StatusWatcher", "db_socket", "free_port", "int_option", "log_head",
           "log_pruned_through", "peer_names", "post_with"]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    sock = bind_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def post_with(client: httpx.Client, node: Any, operation: str, **body: Any) -> httpx.Response:
    """Post one operation with a caller-owned client (safe to use from another thread)."""
    return client.post(node.url, json={"operation": operation, **body}, auth=ADMIN)


def db_socket(status: dict[str, Any], peer: str, database: str) -> dict[str, Any] | None:
    """The ``database_sockets`` entry for ``peer``/``database`` in a cluster_status body."""
    for conn in status.get("connections", []):
        if conn.get("name") == peer:
            for sock in conn.get("database_sockets", []):
                if sock.get("database") == database:
                    return sock
    return None


def peer_names(node: Any) -> set[str]:
    """Names of the connections in ``node``'s cluster_status."""
    return {c["name"] for c in node.call("cluster_status")["connections"]}


def log_pruned_through(node: Any, database: str = "data") -> int:
    """How far an in-process node's log for ``database`` has been pruned (read-only)."""
    return int(node.node.storage.databases[database].pruned_through())


def log_head(node: Any, database: str = "data") -> int:
    """The newest log sequence of an in-process node's ``database`` (read-only)."""
    return int(node.node.storage.databases[database].head_seq)


class StatusWatcher:
    """Polls one node's cluster_status in a thread, recording one link's states.

    It records every ``state`` seen for the (peer, database) socket, every ``copy``
    progress object, and every ``last_error``; it tolerates the node being down.
    """

    def __init__(self, node: Any, peer: str, database: str = "data") -> None:
        self.node = node
        self.peer = peer
        self.database = database
        self.states: list[str] = []
        self.copies: list[dict[str, Any]] = []
        self.errors: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"watch-{node.name}-{peer}")

    def __enter__(self) -> StatusWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def seen(self) -> set[str]:
        return set(self.states)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, OSError, socket.error):
                    res = post_with(client, self.node, "cluster_status")
                    if res.status_code == 200:
                        sock = db_socket(res.json(), self.peer, self.database)
                        if sock is not None:
                            if not self.states or self.states[-1] != sock.get("state"):
                                self.states.append(sock.get("state"))
                            if sock.get("copy") is not None:
                                self.copies.append(dict(sock["copy"]))
                            if sock.get("last_error"):
                                self.errors.add(str(sock["last_error"]))
                self._stop.wait(0.005)


def int_option(config: pytest.Config, name: str, env: str) -> int | None:
    """An integer command-line option of the long runs, else its environment variable."""
    value = config.getoption(name)
    if value is None and os.environ.get(env):
        value = int(os.environ[env])
    return value
