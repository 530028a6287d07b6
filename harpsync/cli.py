"""Command line: ``harpsync run`` starts a node, ``harpsync call`` posts one operation."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from harpsync import requests_ctx
from harpsync.config import Config
from harpsync.errors import ConfigError, StorageError

_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
               "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
               "fatal": logging.CRITICAL, "notify": logging.INFO}


async def _serve(config: Config, root: str | None = None) -> dict[str, str] | None:
    """Run a node until a signal (returns None) or a restart operation (returns the
    variables that hand the still-open listening sockets to the next run)."""
    from harpsync.node import Node

    node = Node(config, dict(os.environ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)  # a signal, even during a restart, means stop for good
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    node.restart_hook = stop.set
    # Test harnesses may hand over listening sockets they bound themselves.
    await node.start(ops_sock=_inherited("HARPSYNC_OPS_FD"),
                     repl_sock=_inherited("HARPSYNC_REPL_FD"))
    print(f"harpsync node {node.node_name} listening: operations API "
          f"http://{config.get('operationsApi.network.host')}:{node.ops_port}/"
          + (f", replication port {node.cluster.port}" if node.cluster else ""), flush=True)
    await stop.wait()
    handover = None
    if (node.restart_requested and not signalled and node.ops_sock is not None
            and node.cluster is not None):
        # Duplicates outlive the node's own close: the addresses stay bound (and accept
        # into the backlog) until the next run takes them over.
        ops_sock, repl_sock = node.listening_sockets()
        # A listener whose address set_configuration changed is not handed over: the
        # next run binds the new one (an unreadable file: the next run reports it).
        try:
            after = Config.load(config.path, root=root)
        except ConfigError:
            after = config
        handover = {}
        for variable, sock, host, port in (
                ("HARPSYNC_OPS_FD", ops_sock, "operationsApi.network.host",
                 "operationsApi.network.port"),
                ("HARPSYNC_REPL_FD", repl_sock, "replication.host", "replication.port")):
            if (after.get(host), after.get(port)) == (config.get(host), config.get(port)):
                handover[variable] = _keep(sock)
            else:
                handover[variable] = ""  # not inherited: the next run binds
        logging.getLogger("harpsync").info("restarting (%s)", node.restart_requested)
    else:
        logging.getLogger("harpsync").info("shutting down")
    await node.stop()
    if handover and signalled:
        for fd in handover.values():
            if fd:
                os.close(int(fd))
        return None
    return handover


def _keep(sock: socket.socket) -> str:
    fd = os.dup(sock.fileno())
    os.set_inheritable(fd, True)
    return str(fd)


def _restart(handover: dict[str, str]) -> None:
    """Run the same command line again in this process, with the listening sockets."""
    os.environ.update(handover)
    # A signal mask survives exec: the next run must see SIGTERM and SIGINT again.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "harpsync.cli", *sys.argv[1:]])


def _inherited(variable: str) -> socket.socket | None:
    fd = os.environ.get(variable)
    if not fd or not fd.isdigit():
        return None
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock


def run(args: argparse.Namespace) -> int:
    config_path = Path(args.config) if args.config else None
    # Without --config: <root>/config.yaml when --root is given (where live route changes
    # persist), else ./config.yaml.
    if config_path is None and not args.root and Path("config.yaml").exists():
        config_path = Path("config.yaml")
    try:
        config = Config.load(config_path, root=args.root)
    except ConfigError as exc:
        print(f"harpsync: configuration error: {exc}", file=sys.stderr)
        return 2
    level = _LOG_LEVELS.get(str(config.get("logging.level")).lower(), logging.INFO)
    requests_ctx.install_log_context()  # lines about a request carry its id
    logging.basicConfig(level=level, format=requests_ctx.LOG_FORMAT)
    from harpsync.node import install_event_loop_policy

    install_event_loop_policy()
    try:
        handover = asyncio.run(_serve(config, args.root))
    except (OSError, StorageError, ConfigError) as exc:
        print(f"harpsync: cannot start: {exc}", file=sys.stderr)
        return 1
    if handover:
        _restart(handover)
    return 0


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def call(args: argparse.Namespace) -> int:
    import httpx

    body: dict[str, Any] = {"operation": args.operation}
    for pair in args.params:
        key, sep, raw = pair.partition("=")
        if not sep:
            print(f"harpsync: expected key=value, got {pair!r}", file=sys.stderr)
            return 2
        body[key] = _value(raw)
    url = args.url or os.environ.get("HARPSYNC_URL", "http://127.0.0.1:9925/")
    user = args.user or os.environ.get("HDB_ADMIN_USERNAME", "admin")
    password = args.password or os.environ.get("HDB_ADMIN_PASSWORD", "")
    try:
        response = httpx.post(url, json=body, auth=(user, password), timeout=args.timeout,
                              verify=not args.insecure)
    except httpx.HTTPError as exc:
        print(f"harpsync: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.status_code < 400 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harpsync")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="start a node")
    p_run.add_argument("--root", help="data directory (overrides rootPath)")
    p_run.add_argument("--config", help="path to config.yaml")
    p_run.set_defaults(func=run)
    p_call = sub.add_parser("call", help="post one operation to a node and print the JSON")
    p_call.add_argument("operation")
    p_call.add_argument("params", nargs="*", help="key=value (values parsed as JSON if possible)")
    p_call.add_argument("--url", help="node URL (default $HARPSYNC_URL or http://127.0.0.1:9925/)")
    p_call.add_argument("--user", help="username (default $HDB_ADMIN_USERNAME or admin)")
    p_call.add_argument("--password", help="password (default $HDB_ADMIN_PASSWORD)")
    p_call.add_argument("--timeout", type=float, default=30.0)
    p_call.add_argument("--insecure", action="store_true", help="skip TLS verification")
    p_call.set_defaults(func=call)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
