"""The composition root: builds storage, security, replication and the app, binds sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import uvicorn

from harpsync import procinfo, requests_ctx
from harpsync.app import build_app
from harpsync.auth import SUPER_ROLE, Authenticator, active_super_users, first_start_version
from harpsync.config import Config
from harpsync.dispatch import Dispatcher
from harpsync.errors import ConfigError
from harpsync.http_protocol import AddressLimit, protocol_class
from harpsync.jobs import JobManager
from harpsync.listening import bind as bind_listener
from harpsync.metrics import Metrics
from harpsync.passwords import hash_password
from harpsync.replication.replicator import Replicator
from harpsync.replication.status import refresh_gauges
from harpsync.replication.verifier import Verifier, peer_handlers
from harpsync.security import NodeKeys, server_context
from harpsync.storage import reads, writes
from harpsync.storage.database import CURSOR_PREFIX, Database
from harpsync.storage.hlc import OFFSET_ENV
from harpsync.storage.store import SYSTEM, Storage
from harpsync.validation import default_registry
from operations import bulk as bulk_ops
from operations import (
    cluster,
    cluster_admin,
    data,
    schema_ops,
    streams,
    system,
    users,
    waits,
)
from operations import configuration as configuration_ops
from operations import dashboard as dashboard_ops
from operations import sql as sql_ops
from operations import txlog as txlog_ops
from operations import verify as verify_ops

log = logging.getLogger("harpsync")

OPERATION_MODULES = [schema_ops, data, users, system, cluster, cluster_admin]
OPERATION_MODULES.append(streams)
OPERATION_MODULES.append(waits)
OPERATION_MODULES.append(dashboard_ops)
OPERATION_MODULES += [sql_ops, bulk_ops, txlog_ops, configuration_ops]
OPERATION_MODULES.append(verify_ops)


# Trims: how often the data files' size is checked, and the growth that trims at once.
TRIM_POLL = 0.25
TRIM_GROWTH = 16 << 20
# Seconds a stop (or a restart) waits for the operations API's responses in flight
# before it closes their connections.
SHUTDOWN_GRACE = 10.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the node's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install_event_loop_policy() -> None:
    """Use uvloop (from ``uvicorn[standard]``) when it is installed."""
    if _has("uvloop"):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Node:
    """One harpsync node: the operations API and the replication listener."""

    def __init__(self, config: Config, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.node_name = config.node_name
        if config.path is None:
            config.path = config.root / "config.yaml"  # where live route changes persist
        self.started_at = time.monotonic()
        self.storage = Storage(config.root, self.node_name, int(config.get("storage.mapSize")))
        self.storage.hlc.max_skew_ms = config.duration_ms("replication.maxClockSkew")
        if self.env.get(OFFSET_ENV):
            self.storage.hlc.offset_ms = int(self.env[OFFSET_ENV])
        self.metrics = Metrics()
        requests_ctx.install_log_context()
        self.storage.on_write_version = requests_ctx.note_version
        # A small write runs on the event loop only while no other request came in.
        self.storage.writer.activity = requests_ctx.begun
        self.storage.writer.on_group = self.metrics.observe_group
        self.dispatcher = Dispatcher(default_registry())
        for module in OPERATION_MODULES:
            self.dispatcher.register(*module.OPERATIONS)
        self._auth: Authenticator | None = None
        self.keys: NodeKeys | None = None
        self.cluster: Any = None
        self._verifier: Verifier | None = None
        self._servers: list[tuple[_Server, asyncio.Task[None]]] = []
        self._address_limit = AddressLimit(0)  # set from the config at start
        self.secure_sock: socket.socket | None = None
        self.ops_sock: socket.socket | None = None
        self.generated_password: str | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._jobs: JobManager | None = None
        self._root_lock: int | None = None
        # Set by ``harpsync run``: the restart operations call it to stop the node and
        # run it again (``restart_requested`` names what asked).
        self.restart_hook: Any = None
        self.restart_requested: str | None = None

    @property
    def jobs(self) -> JobManager:
        """Background jobs (from ``start()`` on)."""
        if self._jobs is None:
            raise RuntimeError("the node has not started")
        return self._jobs

    @property
    def verifier(self) -> Verifier:
        """Background and on-demand verification (from ``start()`` on)."""
        if self._verifier is None:
            raise RuntimeError("the node has not started")
        return self._verifier

    @property
    def auth(self) -> Authenticator:
        """Checks logins (from ``start()`` on: it reads the users in storage)."""
        if self._auth is None:
            raise RuntimeError("the node has not started")
        return self._auth

    # -- start / stop ------------------------------------------------------------------
    async def start(self, ops_sock: socket.socket | None = None,
                    repl_sock: socket.socket | None = None) -> None:
        """Open storage, make keys and the admin user, then bind both listeners."""
        root = self.config.root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # keys and databases live here, whatever the umask
        # Held until stop() (a failed start keeps it: its storage stays open).
        self._lock_root()
        await self._start(root, ops_sock, repl_sock)

    def _lock_root(self) -> None:
        """Hold ``<root>/harpsync.lock`` while the node runs: two nodes on one root would
        both open its LMDB files and write with their own sequence counters.

        Raises:
            OSError: another process (or node of this one) holds the root.
        """
        path = self.config.root / "harpsync.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OSError(errno.EBUSY, f"{self.config.root} is in use by another harpsync "
                                       f"node (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._root_lock = fd

    def _unlock_root(self) -> None:
        if self._root_lock is not None:
            os.close(self._root_lock)  # closing the descriptor releases the lock
            self._root_lock = None

    async def _start(self, root: Path, ops_sock: socket.socket | None,
                     repl_sock: socket.socket | None) -> None:
        await asyncio.to_thread(self.storage.open)
        self._jobs = await asyncio.to_thread(JobManager.open, root / "jobs")
        self._auth = Authenticator(self.storage)
        hosts = [self.node_name]
        url_host = urlparse(self.config.replication_url()).hostname
        if url_host:
            hosts.append(url_host)
        # HTTPS on the operations API serves the node certificate: it names that
        # address too, unless it is a wildcard (clients then use another name).
        ops_host = str(self.config.get("operationsApi.network.host") or "")
        if ops_host not in ("", "0.0.0.0", "::", "[::]"):
            hosts.append(ops_host)
        try:
            self.keys = await asyncio.to_thread(NodeKeys.load_or_create, root / "keys",
                                                self.node_name, hosts)
        except ValueError as exc:  # unusable key files: a message, not a traceback
            raise ConfigError(str(exc)) from None
        await self._bootstrap_users()
        self.metrics.bind(procinfo.rss_bytes, lambda: self.storage.writer.commits,
                          lambda: self.storage.writer.jobs)
        self.metrics.count_total(
            "harpsync_login_verifications", "Password checks (one scrypt each) run for "
            "logins the login cache did not answer, joins included",
            lambda: self.auth.verifications)
        self.cluster = Replicator(self.config, self.storage, self.keys, self.auth, self.metrics)
        cluster_admin.register_peer_handlers(self.cluster)
        dashboard_ops.register_peer_handlers(self.cluster)
        self._verifier = Verifier(self.cluster)
        self.cluster.operation_handlers.update(peer_handlers(self.cluster))
        self.cluster.copy_listeners.append(self.verifier.after_copy)
        await self.cluster.start(repl_sock)
        self.verifier.start(self.config.duration_ms("replication.verifyInterval") / 1000.0)
        self.ops_sock = ops_sock or bind_listener(
            self.config.get("operationsApi.network.host"),
            int(self.config.get("operationsApi.network.port")),
            "operationsApi.network.host, port", 1024)
        host = self.config.get("operationsApi.network.host")
        secure_port = self.config.get("operationsApi.network.securePort")
        if host not in ("127.0.0.1", "localhost", "::1") and secure_port is None:
            log.warning("the operations API listens on %s without TLS; credentials travel "
                        "in clear text (set operationsApi.network.securePort)", host)
        app = build_app(self)
        # One count per address for both listeners (HTTP and HTTPS).
        self._address_limit = AddressLimit(
            int(self.config.get("operationsApi.network.maxConnectionsPerAddress")))
        self._servers = [await self._serve(app, [self.ops_sock])]
        if secure_port is not None:
            self.secure_sock = bind_listener(host, int(secure_port),
                                             "operationsApi.network.host, securePort", 1024)
            cert = self.config.get("operationsApi.tls.certificate")
            key = self.config.get("operationsApi.tls.privateKey")
            if not (cert and key):
                cert, key = self.keys.https_files()
            try:  # a message naming the files, not uvicorn's bare "[Errno 2]"
                server_context(Path(cert), Path(key))
            except OSError as exc:  # ssl.SSLError included
                raise ConfigError(f"operationsApi.tls.certificate {cert!r} / privateKey "
                                  f"{key!r} cannot be used: {exc}") from None
            self._servers.append(await self._serve(app, [self.secure_sock],
                                                   ssl_certfile=cert, ssl_keyfile=key))
        self._trimmer = asyncio.create_task(self._trim_memory())
        log.info("node %s ready: operations API on port %d", self.node_name, self.ops_port)

    async def _serve(self, app: Any, sockets: list[socket.socket], **tls: Any,
                     ) -> tuple[_Server, asyncio.Task[None]]:
        """Run uvicorn on ``sockets`` and wait until it accepts."""
        protocol = protocol_class(
            self.config.duration_ms("operationsApi.network.headersTimeout") / 1000.0,
            self._address_limit)
        config = uvicorn.Config(app, lifespan="off", access_log=False, http=protocol,
                                log_config=None, server_header=False, date_header=False,
                                timeout_keep_alive=30, backlog=1024, **tls)
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the operations API stopped during start-up")
            await asyncio.sleep(0.005)
        return server, task

    async def _trim_memory(self) -> None:
        """Keep RSS to the heap: unmap LMDB pages every ``storage.trimInterval``, and
        sooner while the data files grow fast (a copy to this node, bulk loads): the
        pages touched between trims grow with the write rate, and a copy at 130,000
        rows/s touched most of a 67 MB file within one 2 s interval."""
        interval = self.config.duration_ms("storage.trimInterval") / 1000.0
        if interval <= 0:
            return
        storage = self.storage
        last, sizes = time.monotonic(), storage.data_sizes()
        while True:
            await asyncio.sleep(min(interval, TRIM_POLL))
            now = storage.data_sizes()
            # Growth per database since the last trim (a new one counts whole): a
            # database dropped since then must not hide what the others grew.
            grown = sum(max(0, size - sizes.get(db, 0)) for db, size in now.items())
            if time.monotonic() - last >= interval or grown >= TRIM_GROWTH:
                await asyncio.to_thread(storage.trim_memory)
                last, sizes = time.monotonic(), now

    async def stop(self) -> None:
        """Stop accepting, close links, then close storage (all writes are durable)."""
        if self._trimmer is not None:
            self._trimmer.cancel()
        await self._stop_servers()
        if self._jobs is not None:
            await self._jobs.stop()
        if self._verifier is not None:
            await self._verifier.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await asyncio.to_thread(self.storage.close)
        self._unlock_root()

    async def _stop_servers(self) -> None:
        """Stop the operations API: responses in flight get ``SHUTDOWN_GRACE`` seconds,
        then their connections are closed, with a warning. uvicorn alone waits for them
        without end: a client that stops reading a large response would hold a stop or
        a restart for as long as it keeps the connection open. (The bound was once a
        silent cancel of uvicorn: the 10 s went unexplained in the log, and the
        connections stayed open while storage closed.)"""
        for server, _task in self._servers:
            server.should_exit = True
        tasks = [task for _server, task in self._servers]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
        if pending:
            stuck = [conn for server, _task in self._servers
                     for conn in server.server_state.connections]
            log.warning("stopping: %d operations API connection(s) still open after %g s "
                        "(a client not reading its response?); closing them", len(stuck),
                        SHUTDOWN_GRACE)
            for server, _task in self._servers:
                server.force_exit = True  # uvicorn stops waiting for connections
            for conn in stuck:
                conn.transport.abort()
            # uvicorn ends within its 0.1 s poll; the bound is a backstop.
            _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("the operations API stopped with an error: %r", task.exception())

    def listening_sockets(self) -> tuple[socket.socket, socket.socket]:
        """The operations API and replication listeners (a restart hands them over)."""
        assert self.ops_sock is not None and self.cluster is not None
        return self.ops_sock, self.cluster._sock

    @property
    def ops_port(self) -> int:
        assert self.ops_sock is not None
        return int(self.ops_sock.getsockname()[1])

    # -- first start -------------------------------------------------------------------
    async def _bootstrap_users(self) -> None:
        """First start: the ``super_user`` role and the configured admin, at the
        first-start version. Later starts: if no active super user is left (two nodes
        each dropped a different one at once, each check passing on its own node), the
        configured admin is made again at the clock's version, so it beats the drops
        and replicates (the last-super-user check cannot see a peer's concurrent change).
        """
        version = first_start_version(self.storage.hlc.wall_now_ms())
        db, roles = self.storage.table(SYSTEM, "hdb_role")
        if not reads.get_by_ids(db, roles, [SUPER_ROLE]):
            role = {"id": SUPER_ROLE, "role": SUPER_ROLE, "permission": {"super_user": True}}
            await self.storage.write(writes.write_records(self.storage, SYSTEM, "hdb_role",
                                                          [role], "insert", None, version))
        db, user_table = self.storage.table(SYSTEM, "hdb_user")
        users = list(reads.scan(db, user_table))
        if active_super_users(users, reads.scan(db, roles)):
            return
        first = not users and db.tombstone_count(user_table) == 0
        username = self.env.get("HDB_ADMIN_USERNAME") or "admin"
        copying = _copying_from(db)
        if not first and copying and self.env.get(RECREATE_ADMIN_ENV) != "1":
            # A copy of system cut short: the cluster's users and roles have only
            # partly arrived (its super users may be in what is still to come). Made
            # now, at the clock's version, the admin and its role would beat the
            # cluster's own rows and replicate: an operator's demotion or drop undone
            # everywhere, the admin's password replaced. The copy resumes once the
            # links start.
            # A node removed by its peers while it was down never gets the rest: only
            # its operator can tell, and says so with RECREATE_ADMIN_ENV.
            log.warning("no active super_user here yet: the copy of system from %s was "
                        "interrupted, and the cluster's users come with it; '%s' is not "
                        "recreated (if this node was removed from the cluster, restart it "
                        "with %s=1 to recreate it)", ", ".join(copying), username,
                        RECREATE_ADMIN_ENV)
            return
        role_row = reads.get_by_ids(db, roles, [SUPER_ROLE])
        if not first:
            log.warning("no active super_user is left (super users dropped or demoted on "
                        "two nodes at once?): recreating super user '%s' from "
                        "HDB_ADMIN_USERNAME/HDB_ADMIN_PASSWORD", username)
        if not first and not active_super_users(
                [{"username": username, "role": SUPER_ROLE}], role_row):
            role = {"id": SUPER_ROLE, "role": SUPER_ROLE, "permission": {"super_user": True}}
            await self.storage.write(writes.write_records(self.storage, SYSTEM, "hdb_role",
                                                          [role], "upsert", None))
        password = self.env.get("HDB_ADMIN_PASSWORD")
        if not password:
            password = secrets.token_urlsafe(18)
            self.generated_password = password
            print(f"harpsync: created super user '{username}' with generated password: "
                  f"{password}", flush=True)
        record = {"username": username, "password": await asyncio.to_thread(hash_password,
                                                                              password),
                  "role": SUPER_ROLE, "active": True}
        await self.storage.write(writes.write_records(
            self.storage, SYSTEM, "hdb_user", [record], "insert" if first else "upsert",
            None, version if first else None))

    def listeners_up(self) -> dict[str, bool]:
        """Whether each listener accepts connections (``GET /ready``)."""
        up = {"operations API": bool(self._servers) and all(
            server.started and not server.should_exit and not task.done()
            for server, task in self._servers)}
        if self.cluster is not None:
            server = self.cluster._server
            up["replication"] = server is not None and bool(server.is_serving())
        return up

    def metrics_report(self) -> tuple[bytes, str]:
        """``GET /metrics``: refresh the per-link gauges, then render."""
        if self.cluster is not None:
            refresh_gauges(self.cluster)
        return self.metrics.render()

    # -- reports -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /health``: status, node name, uptime, storage, listeners and peers."""
        storage_ok = self.storage.writer._thread.is_alive()
        report: dict[str, Any] = {
            "status": "ok" if storage_ok else "degraded",
            "node_name": self.node_name,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "storage": {"state": "ok" if storage_ok else "writer stopped",
                        "databases": len(self.storage.databases),
                        "root": str(self.config.root)},
            "listeners": {"operations_api": self.ops_port if self.ops_sock else None,
                          "operations_api_tls": (self.secure_sock.getsockname()[1]
                                                 if self.secure_sock else None)},
        }
        if self.cluster is not None:
            report["listeners"]["replication"] = self.cluster.port
            report["peers"] = self.cluster.health()
        return report


# The operator's override of the wait above: recreate the configured admin although a
# copy of system is unfinished (the node was removed while it was down, and its copy
# will never resume).
RECREATE_ADMIN_ENV = "HARPSYNC_RECREATE_ADMIN"


def _copying_from(system: Database) -> list[str]:
    """The peers whose full copy of ``system`` to this node was interrupted (their
    cursor holds a resume point)."""
    return sorted(peer.decode() for peer, cursor in system.iter_meta(CURSOR_PREFIX)
                  if isinstance(cursor, dict) and cursor.get("copy"))
