"""Mesh benchmark: full meshes of 2 to 5 real node processes on 127.0.0.1 (wss + mTLS).

For each mesh size and scenario it writes ``--records`` records (batches of 500) and
waits until every node holds every record. Scenarios:

- ``one``: all records written on the first node;
- ``spread``: the records split evenly over all nodes.

Per mesh size it prints: end-to-end records/s (first write until the last node has
everything), replication bytes received per node per record and transactions per node per
written batch (summed from each node's ``cluster_status`` counters for the bench database,
divided by the size - 1 nodes each record must reach), CPU seconds per node, and
peak RSS per node. Then the issue-9 targets: bytes per node per record in a 5-node mesh
within 15% of the pair's, and end-to-end records/s for 4 nodes at least 60% of the pair's.

Run: ``.venv/bin/python -m bench.mesh`` (``--quick`` for 10,000 records and sizes 2-4).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ADMIN, NodeProcess, cpu_seconds, fmt_num, format_table, rss_mib
from bench.replication import Client

BATCH = 500
DATABASE = "bench"


COMPRESSION = {"value": "zstd"}


def _start(workdir: Path, name: str) -> NodeProcess:
    node = NodeProcess(workdir / name, node_name=name)
    node.extra_env["REPLICATION_URL"] = f"wss://127.0.0.1:{node.repl_port}"
    node.extra_env["REPLICATION_COMPRESSION"] = COMPRESSION["value"]
    node.start()
    return node


def _mesh(workdir: Path, size: int) -> list[NodeProcess]:
    nodes = [_start(workdir, f"mesh-{i}") for i in range(size)]
    first = Client(nodes[0].port)
    first.call("create_database", database=DATABASE)
    first.call("create_table", database=DATABASE, table="t", primary_key="id")
    for other in nodes[1:]:
        first.call("add_node", hostname=other.name, url=f"wss://127.0.0.1:{other.repl_port}",
                   verify_tls=False, authorization={"username": ADMIN[0], "password": ADMIN[1]})
    deadline = time.monotonic() + 120
    for node in nodes:
        client = Client(node.port)
        while not _linked(client, size - 1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} did not link to its {size - 1} peers")
            time.sleep(0.05)
    return nodes


def _linked(client: Client, peers: int) -> bool:
    try:
        status = client.call("cluster_status")
    except Exception:
        return False
    socks = [s for c in status["connections"] for s in c["database_sockets"]
             if s["database"] == DATABASE]
    return len(socks) >= peers and all(s["connected"] for s in socks) and \
        client.call("describe_all").get(DATABASE, {}).get("t") is not None


def _received(client: Client) -> tuple[int, int]:
    """(bytes, transactions) received for the bench database, summed over peers."""
    status = client.call("cluster_status")
    socks = [s for c in status["connections"] for s in c["database_sockets"]
             if s["database"] == DATABASE]
    return (sum(int(s.get("bytes_received", 0)) for s in socks),
            sum(int(s.get("txns_received", 0)) for s in socks))


def _write(nodes: list[NodeProcess], writers: list[NodeProcess], records: int) -> None:
    starts = list(range(1, records + 1, BATCH))
    local = threading.local()

    def send(index_first: tuple[int, int]) -> None:
        index, first = index_first
        node = writers[index % len(writers)]
        clients = getattr(local, "clients", None)
        if clients is None:
            clients = local.clients = {}
        client = clients.get(node.port) or clients.setdefault(node.port, Client(node.port))
        # About 100 bytes of record data, half of it hex noise (compresses like real ids).
        batch = [{"id": i, "name": f"rec-{i}", "n": i % 97,
                  "pad": hashlib.sha256(str(i).encode()).hexdigest()[:60]}
                 for i in range(first, min(first + BATCH, records + 1))]
        client.call("insert", database=DATABASE, table="t", records=batch)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, enumerate(starts)))


def run_one(workdir: Path, size: int, scenario: str, records: int) -> dict[str, Any]:
    nodes = _mesh(workdir / f"{scenario}-{size}", size)
    try:
        clients = [Client(n.port) for n in nodes]
        before = [_received(c) for c in clients]
        cpu_before = [cpu_seconds(n.pid) for n in nodes]
        peak = [rss_mib(n.pid) or 0.0 for n in nodes]
        writers = nodes if scenario == "spread" else nodes[:1]
        began = time.perf_counter()
        _write(nodes, writers, records)
        done = [False] * size
        deadline = time.monotonic() + 900
        while not all(done):
            if time.monotonic() > deadline:
                raise TimeoutError("the mesh did not converge")
            for i, client in enumerate(clients):
                if not done[i]:
                    done[i] = client.count() >= records
                peak[i] = max(peak[i], rss_mib(nodes[i].pid) or 0.0)
            time.sleep(0.01)
        elapsed = time.perf_counter() - began
        after = [_received(c) for c in clients]
        cpu = [cpu_seconds(n.pid) - b for n, b in zip(nodes, cpu_before, strict=True)]
        got_bytes = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
        got_txns = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
        return {
            "size": size, "scenario": scenario, "rate": records / elapsed,
            # Every record must reach the size - 1 nodes that did not write it: per
            # delivery, a mesh that sends each transaction once per node matches the pair.
            "bytes_per_record": sum(got_bytes) / (size - 1) / records,
            "txns_per_batch": sum(got_txns) / (size - 1) / (records / BATCH),
            "cpu": sum(cpu) / size, "cpu_max": max(cpu), "rss": max(peak),
        }
    finally:
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records, sizes 2-4")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--sizes", default=None, help="comma-separated mesh sizes")
    parser.add_argument("--scenarios", default="one,spread")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "none"],
                        help="replication.compression on every node")
    args = parser.parse_args(argv)
    COMPRESSION["value"] = args.compression
    records = args.records or (10_000 if args.quick else 50_000)
    sizes = [int(s) for s in (args.sizes or ("2,3,4" if args.quick else "2,3,4,5")).split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="harpsync-mesh-") as tmp:
        for scenario in args.scenarios.split(","):
            for size in sizes:
                results.append(run_one(Path(tmp), size, scenario, records))
                r = results[-1]
                print(f"# {scenario} x{size}: {r['rate']:.0f} rec/s", flush=True)
    headers = ["scenario", "nodes", "records/s", "bytes/node/rec", "txns/node/batch",
               "cpu s/node", "cpu s max", "peak RSS MiB"]
    rows = [[r["scenario"], str(r["size"]), fmt_num(r["rate"]),
             fmt_num(r["bytes_per_record"], 1), fmt_num(r["txns_per_batch"], 2),
             fmt_num(r["cpu"], 1), fmt_num(r["cpu_max"], 1), fmt_num(r["rss"], 0)]
            for r in results]
    print(f"\nmesh benchmark: {records:,} records in batches of {BATCH}, "
          f"replication.compression={args.compression}\n")
    print(format_table(headers, rows))
    by = {(r["scenario"], r["size"]): r for r in results}
    print("\ntargets")
    pair = by.get(("one", 2))
    five, four = by.get(("one", 5)), by.get(("one", 4))
    if pair and five:
        ratio = five["bytes_per_record"] / pair["bytes_per_record"]
        print(f"  {'PASS' if ratio <= 1.15 else 'FAIL'}  bytes/node/record, 5 nodes vs pair: "
              f"{ratio:.2f}x (target <= 1.15x)")
    if pair and four:
        ratio = four["rate"] / pair["rate"]
        print(f"  {'PASS' if ratio >= 0.60 else 'FAIL'}  records/s, 4 nodes vs pair: "
              f"{ratio:.0%} (target >= 60%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
