"""Peak memory of a large repair: two real nodes on 127.0.0.1 (wss:// + mutual TLS).

Each node gets ``--rows / 2`` rows of about 1 KB that the other lacks (written into its
store while it is stopped, hashes maintained, not logged: only a repair brings them
over), then node A runs ``repair_cluster``. A sampler reads both processes'
``RssAnon`` (heap; LMDB's mapped pages are ``RssFile`` and not counted) every 50 ms
and the table prints its peak growth over the level before the repair.

Run: ``.venv/bin/python -m bench.repair_memory`` (``--rows 20000`` for a quick run).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.common import format_table, rss_breakdown_mib
from bench.replication import Client, join
from bench.verify import restart_damaged, start_node
from harpsync.storage import digest
from harpsync.storage.database import Database
from harpsync.storage.keys import encode_id
from harpsync.storage.records import put_record


def add_rows(root: Path, node: str, ids: range) -> None:
    """Store ``ids`` on a stopped node (its own rows, hashes kept, no log entry)."""
    db = Database("bench", root / "database" / "bench", 1 << 36, node)
    table = db.tables["t"]
    blob = "x" * 1000
    version = (int(time.time() * 1000) - 60_000) << 16  # an HLC version a minute ago
    try:
        for lo in range(ids.start, ids.stop, 10_000):
            with db.env.begin(write=True) as txn:
                for rid in range(lo, min(ids.stop, lo + 10_000)):
                    put_record(txn, table, encode_id(rid), version + rid, 0,
                               {"id": rid, "blob": blob})
                digest.flush(txn)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="harpsync-repair-memory-"))
    a = start_node(workdir, "node-a")
    b = start_node(workdir, "node-b")
    try:
        ca = Client(a.port)
        ca.call("create_database", database="bench")
        ca.call("create_table", database="bench", table="t", primary_key="id")
        join(a, b)
        ca.call("insert", database="bench", table="t", records=[{"id": -1}])
        time.sleep(2)  # the table and its row reach node B (a bench, not a test)
        half = args.rows // 2
        a.stop()
        add_rows(a.root, "node-a", range(0, half))
        a.start()
        restart_damaged(b, a, [])  # b stopped, nothing changed, started, linked
        b.stop()
        add_rows(b.root, "node-b", range(half, args.rows))
        restart_damaged(b, a, [])
        base = {n.name: rss_breakdown_mib(n.pid).get("RssAnon", 0.0) for n in (a, b)}
        peak = dict(base)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for n in (a, b):
                    now = rss_breakdown_mib(n.pid).get("RssAnon", 0.0)
                    peak[n.name] = max(peak[n.name], now)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        began = time.perf_counter()
        client = Client(a.port)
        client.conn.timeout = 1800
        result = client.call("repair_cluster", database="bench", table="t")
        seconds = time.perf_counter() - began
        done.set()
        sampler.join()
        [entry] = result["checked"]
        changed = {k: len(v) for k, v in entry["changed"].items()}
        print(f"repair of {args.rows:,} differing ~1 KB rows ({half:,} each way): "
              f"{seconds:,.1f} s, changed {changed}, error: {entry.get('error')}")
        print(format_table(["node", "RssAnon before (MiB)", "peak (MiB)", "growth (MiB)"],
                           [[n, f"{base[n]:,.0f}", f"{peak[n]:,.0f}",
                             f"{peak[n] - base[n]:,.0f}"] for n in ("node-a", "node-b")]))
    finally:
        a.stop()
        b.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
