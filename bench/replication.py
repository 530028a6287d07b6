"""Replication benchmark: two (then three) real nodes on 127.0.0.1 over wss:// + mTLS.

Prints one table:

- (a) latency from an insert on A until the record is visible on B (p50/p99, 500 samples);
- (b) 100,000 records inserted on A in batches of 500, until all are visible on B;
- (c) catch-up of a 100,000-record backlog after B restarts;
- (d) each node's RSS;
- full copy of 100,000 and 300,000 records to a new node, with its peak RSS.

Run: ``.venv/bin/python -m bench.replication`` (``--quick`` for smaller figures).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ADMIN, NodeProcess, format_table, rss_mib

AUTH = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
TARGETS = {"p50": 3.0, "p99": 20.0, "rate": 30_000, "rss": 150.0}


class Client:
    """A keep-alive HTTP client for one node (one per thread)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, operation: str, **body: Any) -> Any:
        payload = json.dumps({"operation": operation, **body})
        self.conn.request("POST", "/", payload, {"Authorization": AUTH,
                                                 "Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{operation}: {response.status} {data}")
        return data

    def count(self, table: str = "t", database: str = "bench") -> int:
        return int(self.call("describe_table", database=database, table=table)["record_count"])


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on a plain socket, for the latency loop:
    http.client's own overhead (~0.3 ms a request) is not the node's latency."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.buffer = b""

    def call(self, body: dict[str, Any]) -> Any:
        payload = json.dumps(body).encode()
        self.sock.sendall(self.head + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the node closed the connection")
            self.buffer += chunk
        header, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return json.loads(rest[:length])

    def close(self) -> None:
        self.sock.close()


def node(workdir: Path, name: str) -> NodeProcess:
    n = NodeProcess(workdir / name, node_name=name)
    n.extra_env["REPLICATION_URL"] = f"wss://127.0.0.1:{n.repl_port}"
    n.start()
    return n


def join(a: NodeProcess, b: NodeProcess) -> None:
    Client(a.port).call("add_node", hostname=b.name, url=f"wss://127.0.0.1:{b.repl_port}",
                        verify_tls=False,
                        authorization={"username": ADMIN[0], "password": ADMIN[1]})


def wait_count(client: Client, want: int, timeout: float = 600, table: str = "t",
               on_tick: Any = None) -> float:
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        try:
            if client.count(table) >= want:
                return time.perf_counter()
        except (RuntimeError, OSError, http.client.HTTPException):
            pass
        if on_tick:
            on_tick()
        time.sleep(0.005)
    raise TimeoutError(f"count did not reach {want}")


def insert_batches(port: int, start_id: int, total: int, batch: int, clients: int = 4) -> None:
    ids = list(range(start_id, start_id + total, batch))
    local = threading.local()

    def send(first: int) -> None:
        if not hasattr(local, "c"):
            local.c = Client(port)
        records = [{"id": i, "name": f"rec-{i}", "n": i % 97}
                   for i in range(first, min(first + batch, start_id + total))]
        local.c.call("insert", database="bench", table="t", records=records)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, ids))


def latency(a: NodeProcess, b: NodeProcess, samples: int) -> tuple[float, float]:
    ca, cb = RawClient(a.port), RawClient(b.port)
    out = []
    for i in range(samples):
        rid = 10_000_000 + i
        began = time.perf_counter()
        ca.call({"operation": "insert", "database": "bench", "table": "t",
                 "records": [{"id": rid}]})
        probe = {"operation": "search_by_id", "database": "bench", "table": "t",
                 "ids": [rid], "get_attributes": ["id"]}
        while not cb.call(probe):
            pass
        out.append((time.perf_counter() - began) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.99) - 1]


def full_copy(workdir: Path, a: NodeProcess, records: int, label: str) -> dict[str, Any]:
    ca = Client(a.port)
    have = ca.count()
    if have < records:
        insert_batches(a.port, have, records - have, 500)
    total = ca.count()
    c = node(workdir, f"copy-{label}")
    peak = [c.rss_mib() or 0.0]

    def sample() -> None:
        peak[0] = max(peak[0], c.rss_mib() or 0.0)

    began = time.perf_counter()
    join(a, c)
    done = wait_count(Client(c.port), total, on_tick=sample)
    sample()
    elapsed = done - began
    result = {"records": total, "seconds": elapsed, "rate": total / elapsed, "peak": peak[0],
              "after": c.rss_mib()}
    c.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    bulk = 100_000 // scale
    workdir = Path(tempfile.mkdtemp(prefix="harpsync-repl-bench-"))
    a, b = node(workdir, "node-a"), node(workdir, "node-b")
    rows: list[list[str]] = []
    verdicts: list[str] = []
    try:
        ca, cb = Client(a.port), Client(b.port)
        ca.call("create_database", database="bench")
        ca.call("create_table", database="bench", table="t", primary_key="id")
        join(a, b)
        wait_count(cb, 0)
        ca.call("insert", database="bench", table="t", records=[{"id": -1}])
        wait_count(cb, 1)

        p50, p99 = latency(a, b, args.samples // scale if args.quick else args.samples)
        rows.append(["(a) insert on A -> visible on B", f"{args.samples} samples", "",
                     f"{p50:.2f}", f"{p99:.2f}"])
        verdicts.append(_verdict(p50 <= TARGETS["p50"], f"latency p50 {p50:.2f} ms <= 3 ms"))
        verdicts.append(_verdict(p99 <= TARGETS["p99"], f"latency p99 {p99:.2f} ms <= 20 ms"))

        base = cb.count()
        began = time.perf_counter()
        insert_batches(a.port, 0, bulk, 500)
        inserted = time.perf_counter()
        done = wait_count(cb, base + bulk)
        rate_b = bulk / (done - began)
        rows.append(["(b) batches of 500 on A until all on B", f"{bulk:,}",
                     f"{rate_b:,.0f}", "", f"insert {bulk / (inserted - began):,.0f}/s"])
        verdicts.append(_verdict(rate_b >= TARGETS["rate"], f"(b) {rate_b:,.0f} rec/s >= 30,000"))

        b.stop()
        base = ca.count()
        insert_batches(a.port, 1_000_000, bulk, 500)
        restart_began = time.perf_counter()
        b.start()
        cb = Client(b.port)
        ready = time.perf_counter()
        done = wait_count(cb, base + bulk)
        rate_c = bulk / (done - ready)
        rows.append(["(c) backlog catch-up after B restarts", f"{bulk:,}", f"{rate_c:,.0f}", "",
                     f"B start {ready - restart_began:.2f} s"])
        verdicts.append(_verdict(rate_c >= TARGETS["rate"], f"(c) {rate_c:,.0f} rec/s >= 30,000"))

        ra, rb = rss_mib(a.pid) or 0, rss_mib(b.pid) or 0
        rows.append(["(d) RSS after (b)+(c)", "", "", "", f"A {ra:.1f} MiB, B {rb:.1f} MiB"])
        verdicts.append(_verdict(max(ra, rb) < TARGETS["rss"],
                                 f"(d) RSS A {ra:.1f} / B {rb:.1f} MiB < 150"))
        b.stop()
        a.stop()

        # A fresh source, so the copies hold exactly 100,000 and then 300,000 records.
        source = node(workdir, "source")
        cs = Client(source.port)
        cs.call("create_database", database="bench")
        cs.call("create_table", database="bench", table="t", primary_key="id")
        for size in (100_000 // scale, 300_000 // scale):
            copy = full_copy(workdir, source, size, str(size))
            rows.append([f"full copy to a new node ({copy['records']:,} records)",
                         f"{copy['records']:,}", f"{copy['rate']:,.0f}", "",
                         f"peak RSS {copy['peak']:.1f} MiB"])
            verdicts.append(_verdict(copy["rate"] >= TARGETS["rate"],
                                     f"full copy {copy['records']:,}: {copy['rate']:,.0f} rec/s"))
            verdicts.append(_verdict(copy["peak"] < TARGETS["rss"],
                                     f"full copy {copy['records']:,}: peak RSS "
                                     f"{copy['peak']:.1f} MiB < 150"))
        source.stop()
    finally:
        for n in (a, b):
            n.stop()
    print("harpsync replication benchmark (2 nodes on 127.0.0.1, wss:// with mutual TLS)")
    print(format_table(["measure", "records", "records/s", "p50 ms", "p99 ms / notes"], rows))
    print()
    print("targets (HarperDB 4.7.29: p50 17 ms, p99 168 ms, 3,115 records/s)")
    for line in verdicts:
        print(line)


def _verdict(ok: bool, text: str) -> str:
    return ("PASS  " if ok else "FAIL  ") + text


if __name__ == "__main__":
    main()
