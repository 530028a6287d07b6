"""Shared pieces of the benchmarks: node and echo subprocesses, the load generator, tables.

The load generator runs in its own process (``python -m bench.common loadgen SPEC``) so
that the client and the server never share an interpreter or a GIL. It is deliberately
lean: one asyncio ``Protocol`` per keep-alive connection, hand-written HTTP/1.1 request
bytes, and a response parser that reads only the status line and ``Content-Length``.
Each completed response sends the next request straight from ``data_received``, so no
coroutine switch or stream buffer sits on the hot path.

Subcommands of this module, used by the benchmarks themselves:

- ``python -m bench.common loadgen '<json spec>'`` runs one load scenario. It prints
  ``start`` when the measured window opens, then one JSON result line.
- ``python -m bench.common echo PORT`` serves a bare Starlette app that answers every
  ``POST /`` with a fixed JSON body, on uvicorn with the node's settings.
"""

from __future__ import annotations

import asyncio
import base64
import compileall
import contextlib
import functools
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN = ("admin", "bench-password")
ECHO_BODY = b'{"message":"inserted 1 of 1 records","inserted_hashes":[1],"skipped_hashes":[]}'


# -- process facts -------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """``VmRSS`` of a process in MiB, from ``/proc/<pid>/status`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_breakdown_mib(pid: int) -> dict[str, float]:
    """``RssAnon`` (heap), ``RssFile`` (mapped files such as LMDB) and ``RssShmem`` in MiB."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return 0.0
    # The command name may hold spaces; fields after the closing ")" are fixed.
    fields = raw[raw.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def post(port: int, body: dict[str, Any], auth: tuple[str, str] | None = ADMIN,
         timeout: float = 30.0) -> tuple[int, Any]:
    """One blocking ``POST /`` (for set-up, not for load); returns status and JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = basic_auth(*auth)
        conn.request("POST", "/", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HARPSYNC_OPS_FD", "HARPSYNC_REPL_FD")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


class _Server:
    """A server subprocess with its log in a file; ``start()`` returns seconds to ready."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.port = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> float:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            began = time.perf_counter()
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir,
                                         env=_child_env(self.env()), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = began + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                if self.ready():
                    return time.perf_counter() - began
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout} s:\n" + self.log_tail())

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM, wait; returns seconds until the process exited."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        began = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return time.perf_counter() - began

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float | None:
        return rss_mib(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class NodeProcess(_Server):
    """``python -m harpsync.cli run --root ROOT`` with ports and admin set by environment.

    Ready means ``POST describe_all`` answered 200, so ``start()`` measures the time an
    operator waits from spawning the process to the first useful answer.
    """

    def __init__(self, workdir: Path, node_name: str = "bench-node",
                 auth: tuple[str, str] = ADMIN, extra_env: dict[str, str] | None = None) -> None:
        self.name = node_name
        super().__init__(workdir)
        self.root = workdir / "root"
        self.auth = auth
        self.port = free_port()
        self.repl_port = free_port()
        self.extra_env = extra_env or {}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "harpsync.cli", "run", "--root", str(self.root)]

    def start(self, timeout: float = 60.0) -> float:
        _compiled(self.extra_env.get("PYTHONPATH", str(REPO_ROOT)))
        return super().start(timeout)

    def env(self) -> dict[str, str]:
        return {
            "REPLICATION_HOSTNAME": self.name,
            "REPLICATION_PORT": str(self.repl_port),
            "OPERATIONSAPI_NETWORK_PORT": str(self.port),
            "HDB_ADMIN_USERNAME": self.auth[0],
            "HDB_ADMIN_PASSWORD": self.auth[1],
            "LOGGING_LEVEL": "warn",
            **self.extra_env,
        }

    def ready(self) -> bool:
        status, _ = post(self.port, {"operation": "describe_all"}, self.auth, timeout=5)
        return status == 200

    def call(self, operation: str, **body: Any) -> tuple[int, Any]:
        return post(self.port, {"operation": operation, **body}, self.auth)


@functools.cache
def _compiled(code_root: str) -> None:
    """Write the node's bytecode once, before the first start is timed. An installed
    node has it (pip compiles it, or the first start writes it), but where
    PYTHONDONTWRITEBYTECODE is set (the development machines here set it) every start compiled
    each module from source again, about 0.3 s of the start measured."""
    for package in ("harpsync", "operations"):
        compileall.compile_dir(Path(code_root) / package, quiet=1)


class EchoProcess(_Server):
    """The ceiling: a bare Starlette endpoint on uvicorn with the node's settings."""

    name = "echo"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.common", "echo", str(self.port)]

    def ready(self) -> bool:
        status, _ = post(self.port, {"operation": "describe_all"}, None, timeout=5)
        return status == 200


def echo_main(port: int) -> None:
    """Serve the echo app; the uvicorn settings copy ``harpsync.node``'s."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request: Request) -> Response:
        await request.body()  # the node reads every body too
        return Response(ECHO_BODY, media_type="application/json")

    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", access_log=False,
                            log_config=None, server_header=False, date_header=False,
                            timeout_keep_alive=30, backlog=1024)
    uvicorn.Server(config).run()


# -- load scenarios --------------------------------------------------------------------------
@dataclass
class Scenario:
    """What one load run sends. ``kind`` is ``insert`` or ``search_by_id``."""

    label: str
    kind: str
    clients: int
    batch: int = 1
    database: str = "bench"
    table: str = "dog"
    id_base: int = 0
    search_ids: tuple[int, int] = (0, 1)

    def spec(self, port: int, auth: tuple[str, str] | None, warmup: float,
             duration: float) -> dict[str, Any]:
        return {"port": port, "auth": basic_auth(*auth) if auth else None, "kind": self.kind,
                "clients": self.clients, "batch": self.batch, "database": self.database,
                "table": self.table, "id_base": self.id_base,
                "search_ids": list(self.search_ids), "warmup": warmup, "duration": duration}


@dataclass
class LoadResult:
    """One scenario's figures; server figures are None when no server pid was given."""

    label: str
    clients: int
    batch: int
    requests: int
    records: int
    errors: int
    duration: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float
    server_cpu_s: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    error_sample: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    @property
    def rec_per_s(self) -> float:
        return self.records / self.duration if self.duration else 0.0

    @property
    def client_cpu_pct(self) -> float:
        return 100 * self.client_cpu_s / self.duration if self.duration else 0.0

    @property
    def server_cpu_pct(self) -> float | None:
        if self.server_cpu_s is None or not self.duration:
            return None
        return 100 * self.server_cpu_s / self.duration


def run_load(scenario: Scenario, port: int, auth: tuple[str, str] | None, warmup: float,
             duration: float, server_pid: int | None = None,
             client_cores: set[int] | None = None) -> LoadResult:
    """Run one scenario in a separate client process; sample the server while it runs.

    ``client_cores`` pins the client process to those cores (it is pinned before it
    connects: it waits for nothing but its own start-up)."""
    spec = scenario.spec(port, auth, warmup, duration)
    proc = subprocess.Popen([sys.executable, "-m", "bench.common", "loadgen", json.dumps(spec)],
                            cwd=REPO_ROOT, env=_child_env({}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if client_cores is not None:
        os.sched_setaffinity(proc.pid, client_cores)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if first != "start":
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"load generator failed ({first!r}): {err[-2000:]}")
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    window_end = time.perf_counter() + duration
    peak: float | None = None
    while server_pid and time.perf_counter() < window_end:
        rss = rss_mib(server_pid)
        if rss is not None:
            peak = max(peak or 0.0, rss)
        time.sleep(min(0.2, max(0.0, window_end - time.perf_counter())))
    cpu_after = cpu_seconds(server_pid) if server_pid else None
    out, err = proc.communicate(timeout=duration + 60)
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    data = json.loads(lines[-1])
    result = LoadResult(label=scenario.label, clients=scenario.clients, batch=scenario.batch,
                        requests=data["requests"], records=data["records"],
                        errors=data["errors"], duration=data["duration"],
                        p50_ms=data["p50_ms"], p99_ms=data["p99_ms"],
                        client_cpu_s=data["client_cpu_s"], error_sample=data["error_sample"])
    if server_pid:
        result.rss_end_mib = rss_mib(server_pid)
        result.rss_peak_mib = max(peak or 0.0, result.rss_end_mib or 0.0)
        assert cpu_before is not None and cpu_after is not None
        result.server_cpu_s = cpu_after - cpu_before
    return result


# -- the load generator (runs in its own process) ------------------------------------------
def _body_maker(spec: dict[str, Any]) -> Callable[[int, int], bytes]:
    """``make(worker, seq)`` -> JSON body; insert ids are unique across workers and runs."""
    clients, batch, base = int(spec["clients"]), int(spec["batch"]), int(spec["id_base"])
    head = json.dumps({"operation": spec["kind"], "database": spec["database"],
                       "table": spec["table"]}, separators=(",", ":"))[:-1] + ","
    if spec["kind"] == "search_by_id":
        lo, hi = spec["search_ids"]
        prefix = (head + '"ids":[').encode()
        randrange = random.randrange
        return lambda worker, seq: prefix + b"%d]}" % randrange(lo, hi)
    prefix = (head + '"records":[').encode()
    record = b'{"id":%d,"name":"dog-%d","breed":"labrador","age":%d,"weight":31.5}'

    def make(worker: int, seq: int) -> bytes:
        first = base + (seq * clients + worker) * batch
        return prefix + b",".join([record % (i, i, i % 15) for i in
                                   range(first, first + batch)]) + b"]}"
    return make


class _Stats:
    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.latencies: list[float] = []
        self.errors = 0
        self.error_sample: str | None = None
        self.window_start = float("inf")
        self.window_end = float("inf")


class _Connection(asyncio.Protocol):
    """One keep-alive connection issuing requests back to back."""

    def __init__(self, worker: int, head: bytes, make: Callable[[int, int], bytes],
                 stats: _Stats, done: asyncio.Future[None]) -> None:
        self.worker = worker
        self.head = head
        self.make = make
        self.stats = stats
        self.done = done
        self.seq = 0
        self.sent_at = 0.0
        self.buffer = b""
        self.need = -1  # total bytes of the current response, once its head is parsed
        self.body_start = 0
        self.status = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        body = self.make(self.worker, self.seq)
        self.seq += 1
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.head + b"%d\r\n\r\n" % len(body) + body)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0 and not self._parse_head():
                return
            if len(self.buffer) < self.need:
                return
            self._complete()

    def _parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self.buffer[:end].lower()
        self.status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._fail("response without Content-Length")
            return False
        stop = head.find(b"\r\n", at + 2)
        self.body_start = end + 4
        self.need = self.body_start + int(head[at + 17:stop if stop > 0 else None])
        return True

    def _complete(self) -> None:
        now = time.perf_counter()
        body = self.buffer[self.body_start:self.need]
        self.buffer = self.buffer[self.need:]
        self.need = -1
        stats = self.stats
        if stats.window_start <= now <= stats.window_end:
            if self.status == 200:
                stats.latencies.append(now - self.sent_at)
            else:
                stats.errors += 1
                if stats.error_sample is None:
                    stats.error_sample = f"{self.status} {body[:300].decode(errors='replace')}"
        if now < stats.window_end:
            self._send()
        else:
            assert self.transport is not None
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def _fail(self, why: str) -> None:
        self.stats.errors += 1
        self.stats.error_sample = self.stats.error_sample or why
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.stats.errors += 1
            self.stats.error_sample = self.stats.error_sample or f"connection lost: {exc!r}"
            self.done.set_result(None)


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    port, clients = int(spec["port"]), int(spec["clients"])
    warmup, duration = float(spec["warmup"]), float(spec["duration"])
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            + (f"Authorization: {spec['auth']}\r\n" if spec.get("auth") else "")
            + "Content-Type: application/json\r\nContent-Length: ").encode()
    stats = _Stats(int(spec["batch"]))
    make = _body_maker(spec)
    cpu: dict[str, float] = {}
    now = time.perf_counter()
    stats.window_start = now + warmup
    stats.window_end = now + warmup + duration

    def open_window() -> None:
        cpu["start"] = sum(os.times()[:2])
        print("start", flush=True)

    loop.call_later(warmup, open_window)
    dones: list[asyncio.Future[None]] = []
    for worker in range(clients):
        done: asyncio.Future[None] = loop.create_future()
        dones.append(done)
        await loop.create_connection(
            lambda w=worker, d=done: _Connection(w, head, make, stats, d), "127.0.0.1", port)
    await asyncio.gather(*dones)
    cpu_end = sum(os.times()[:2])
    latencies = sorted(stats.latencies)

    def pct(q: float) -> float:
        return 1000 * latencies[int(q * (len(latencies) - 1))] if latencies else 0.0

    return {"requests": len(latencies), "records": len(latencies) * stats.batch,
            "errors": stats.errors, "duration": duration, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "client_cpu_s": cpu_end - cpu.get("start", cpu_end),
            "error_sample": stats.error_sample}


def loadgen_main(raw_spec: str) -> None:
    result = asyncio.run(_loadgen(json.loads(raw_spec)))
    print(json.dumps(result), flush=True)


# -- output ----------------------------------------------------------------------------------
def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 left: int = 1) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Any:
    """A temporary directory, removed afterwards unless ``keep``."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "loadgen":
        loadgen_main(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_main(int(sys.argv[2]))
    else:
        print("usage: python -m bench.common loadgen SPEC | echo PORT", file=sys.stderr)
        sys.exit(2)
