"""Verify and repair benchmark: two real nodes on 127.0.0.1 over wss:// + mutual TLS.

For each table size (100,000 and 1,000,000 rows by default) it prints the time, the
request rounds and the payload bytes exchanged with the peer of:

- a verify of identical tables;
- a verify with 10 and with 1,000 differences (rows changed on node B's disk while it
  was stopped, through the storage code so its hashes follow, but not logged: only a
  verify can see them);
- a repair of those differences, and a deep verify (both nodes rebuild their hashes);

and, on a single node, the insert throughput (batches of 500, 4 clients) with hash
maintenance on and off (``HARPSYNC_DIGEST=off``), in alternating rounds (medians, and
the node's CPU per row, which the neighbours on a shared machine disturb less).

Run: ``.venv/bin/python -m bench.verify`` (``--sizes 10000,100000`` for a quick run).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import NodeProcess, cpu_seconds, format_table
from bench.replication import Client, insert_batches, join, wait_count
from harpsync import codec
from harpsync.storage import digest
from harpsync.storage.database import Database
from harpsync.storage.keys import encode_id
from harpsync.storage.records import put_record

BATCH = 500


def damage(root: Path, ids: list[int]) -> None:
    """Give each id an older version and another value on a stopped node (hashes follow,
    the log does not: replication never sends it, only verify finds it)."""
    db = Database("bench", root / "database" / "bench", 1 << 36, "node-b")
    table = db.tables["t"]
    try:
        with db.env.begin(write=True) as txn:
            for rid in ids:
                key = encode_id(rid)
                version, origin, record = codec.unpack(txn.get(key, db=table.dbi))
                put_record(txn, table, key, version - 1, origin, {**record, "name": "stale"})
            digest.flush(txn)
    finally:
        db.close()


def timed(port: int, operation: str, **body: Any) -> tuple[float, dict[str, Any]]:
    client = Client(port)  # a fresh connection: a kept-alive one may have timed out
    began = time.perf_counter()
    result = client.call(operation, database="bench", table="t", **body)
    return time.perf_counter() - began, result


def row(label: str, seconds: float, result: dict[str, Any]) -> list[str]:
    entries = result["checked"]
    rounds = sum(e.get("rounds", 0) for e in entries)
    size = sum(e.get("bytes", 0) for e in entries)
    diffs = sum(e["differences"] for e in entries)
    changed = sum(len(v) for e in entries for v in (e.get("changed") or {}).values())
    notes = f"in_sync={result['in_sync']} differences={diffs}"
    if "changed" in (entries[0] if entries else {}):
        notes += f" changed={changed}"
    errors = [e["error"] for e in entries if e.get("error")]
    if errors:
        notes += f" ERROR: {errors[0][:120]}"
    return [label, f"{seconds * 1000:,.1f}", str(rounds), f"{size:,}", notes]


def restart_damaged(b: Any, a: Any, ids: list[int]) -> Client:
    b.stop()
    damage(b.root, ids)
    b.start()
    cb = Client(b.port)
    ca = Client(a.port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = ca.call("cluster_status")
            socks = [s for c in status["connections"] for s in c["database_sockets"]
                     if s["database"] == "bench"]
            status_b = cb.call("cluster_status")
            socks += [s for c in status_b["connections"] for s in c["database_sockets"]
                      if s["database"] == "bench"]
            if socks and all(s["connected"] and not s.get("lag_txns") for s in socks):
                return cb
        except (RuntimeError, OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise TimeoutError("node B did not relink")


def start_node(workdir: Path, name: str, env: dict[str, str] | None = None) -> NodeProcess:
    n = NodeProcess(workdir / name, node_name=name,
                    extra_env={"REPLICATION_VERIFYINTERVAL": "0", **(env or {})})
    n.extra_env["REPLICATION_URL"] = f"wss://127.0.0.1:{n.repl_port}"
    n.start()
    return n


def one_size(workdir: Path, size: int) -> list[list[str]]:
    rows: list[list[str]] = []
    a = start_node(workdir, "node-a")
    b = start_node(workdir, "node-b")
    try:
        ca, cb = Client(a.port), Client(b.port)
        ca.call("create_database", database="bench")
        ca.call("create_table", database="bench", table="t", primary_key="id")
        join(a, b)
        began = time.perf_counter()
        insert_batches(a.port, 0, size, BATCH)
        wait_count(cb, size)
        rows.append([f"{size:,} rows: insert on A until all on B",
                     f"{(time.perf_counter() - began) * 1000:,.0f}", "", "",
                     f"{size / (time.perf_counter() - began):,.0f} rows/s"])
        timed(a.port, "verify_cluster")  # warm up (TLS contexts, page cache)
        seconds, result = timed(a.port, "verify_cluster")
        rows.append([f"{size:,} rows: verify, identical", *row("", seconds, result)[1:]])
        for count in (10, 1000):
            ids = list(range(7, size, size // count))[:count]
            restart_damaged(b, a, ids)
            seconds, result = timed(a.port, "verify_cluster")
            rows.append([f"{size:,} rows: verify, {count:,} differences",
                         *row("", seconds, result)[1:]])
            seconds, result = timed(a.port, "repair_cluster")
            rows.append([f"{size:,} rows: repair, {count:,} differences",
                         *row("", seconds, result)[1:]])
        seconds, result = timed(a.port, "verify_cluster", deep=True)
        rows.append([f"{size:,} rows: deep verify (both rebuild)",
                     *row("", seconds, result)[1:]])
        seconds, result = timed(a.port, "verify_cluster")
        rows.append([f"{size:,} rows: verify after repair", *row("", seconds, result)[1:]])
    finally:
        a.stop()
        b.stop()
    return rows


def insert_rate(workdir: Path, name: str, maintained: bool, size: int) -> tuple[float, float]:
    """Rows/s and the node's CPU microseconds per row (the CPU figure is what hash
    maintenance costs; wall time on a shared machine also measures the neighbours)."""
    n = start_node(workdir, name, {"HARPSYNC_DIGEST": "on" if maintained else "off"})
    try:
        c = Client(n.port)
        c.call("create_database", database="bench")
        c.call("create_table", database="bench", table="t", primary_key="id")
        cpu = cpu_seconds(n.pid)
        began = time.perf_counter()
        insert_batches(n.port, 0, size, BATCH)
        elapsed = time.perf_counter() - began
        return size / elapsed, (cpu_seconds(n.pid) - cpu) / size * 1e6
    finally:
        n.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--insert-rows", type=int, default=100_000)
    parser.add_argument("--insert-runs", type=int, default=6)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s and s != "0"]
    workdir = Path(tempfile.mkdtemp(prefix="harpsync-verify-bench-"))
    rows: list[list[str]] = []
    for size in sizes:
        rows.extend(one_size(workdir / str(size), size))
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    for run in range(args.insert_runs):
        # Alternate which side goes first (A/B, B/A): the neighbours' load on a shared
        # machine drifts, and a fixed order would charge the drift to one side.
        for maintained in (False, True) if run % 2 == 0 else (True, False):
            rate, cpu = insert_rate(workdir / f"ins-{run}-{maintained}",
                                    f"ins-{run}-{int(maintained)}", maintained,
                                    args.insert_rows)
            rates[maintained].append(rate)
            cpus[maintained].append(cpu)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    cpu_on, cpu_off = statistics.median(cpus[True]), statistics.median(cpus[False])
    paired = statistics.median(1 - a / b for a, b in zip(rates[True], rates[False],
                                                        strict=True))
    print("harpsync verify/repair benchmark (2 nodes on 127.0.0.1, wss:// + mutual TLS)")
    print(format_table(["measure", "ms", "rounds", "payload bytes", "notes"], rows))
    print()
    print(format_table(
        ["insert throughput (batches of 500, 4 clients)", "median", "runs"],
        [[f"rows/s, hash maintenance on ({args.insert_rows:,} rows)", f"{on:,.0f}",
          ", ".join(f"{r:,.0f}" for r in rates[True])],
         [f"rows/s, hash maintenance off ({args.insert_rows:,} rows)", f"{off:,.0f}",
          ", ".join(f"{r:,.0f}" for r in rates[False])],
         ["cost of maintenance (median rates)", f"{(1 - on / off) * 100:.1f}%",
          f"median of each round's own cost: {paired * 100:.1f}%"],
         ["node CPU per row, maintenance on / off (µs)", f"{cpu_on:.2f} / {cpu_off:.2f}",
          f"cost {(cpu_on / cpu_off - 1) * 100:.1f}%; on: "
          + ", ".join(f"{c:.2f}" for c in cpus[True]) + "; off: "
          + ", ".join(f"{c:.2f}" for c in cpus[False])]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
