"""Pieces of ``bench/ops_api.py`` for a node with one live peer.

- ``Pair``: three node processes: ``alone`` (no peers), ``origin`` and its live ``peer``.
  The node-alone and with-peer rounds alternate in one run, so both see the same
  machine load; after each with-peer round the bench waits until the peer holds every
  record, so no catch-up spills into the next node-alone round.
- ``pin``: core affinity for every thread of a process (``os.sched_setaffinity`` on each
  task, as ``taskset -a -p`` does).
- ``lmdb_synced_commits``: the raw py-lmdb ceiling, single-record synced commits in a
  fresh environment on the same disk as the nodes' roots.
- ``replication_latency``: insert on the origin through the operations API until a
  ``search_by_id`` on the peer returns the record.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import ADMIN, NodeProcess, basic_auth
from bench.replication import RawClient

DATABASE, TABLE = "bench", "dog"


# -- core affinity -----------------------------------------------------------------------
def all_cores() -> set[int]:
    return set(range(os.cpu_count() or 1))


def pin(pid: int, cores: set[int]) -> None:
    """Set the affinity of every thread of ``pid``; threads it starts later inherit it."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass  # a thread that just ended


# -- raw LMDB ceiling -----------------------------------------------------------------------
def lmdb_synced_commits(path: Path, seconds: float) -> float:
    """Synced single-record write transactions per second in a fresh environment."""
    import lmdb  # bench-only: the node's own lmdb use stays in harpsync/storage

    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True, max_dbs=2)
    value = (b'{"id":%d,"name":"dog-%d","breed":"labrador","age":7,"weight":31.5}' * 1)
    try:
        n = 0
        end = time.perf_counter() + seconds
        began = time.perf_counter()
        while time.perf_counter() < end:
            with env.begin(write=True) as txn:
                txn.put(n.to_bytes(8, "big"), value % (n, n))
            n += 1
        return n / (time.perf_counter() - began)
    finally:
        env.close()


# -- a raw keep-alive client (no http.client overhead on the latency path) ----------------
# -- the three nodes ------------------------------------------------------------------------
class Pair:
    """``alone`` without peers, and ``origin`` replicating to ``peer``."""

    def __init__(self, workdir: Path, code_root: str | None = None) -> None:
        extra = {"PYTHONPATH": code_root} if code_root else {}
        self.alone = NodeProcess(workdir / "alone", node_name="alone", extra_env=dict(extra))
        self.origin = NodeProcess(workdir / "origin", node_name="origin",
                                  extra_env=dict(extra))
        self.peer = NodeProcess(workdir / "peer", node_name="peer", extra_env=dict(extra))
        for node in (self.origin, self.peer):
            node.extra_env["REPLICATION_URL"] = f"wss://127.0.0.1:{node.repl_port}"

    @property
    def nodes(self) -> list[NodeProcess]:
        return [self.alone, self.origin, self.peer]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in (self.alone, self.origin):
            _ok(node.call("create_database", database=DATABASE))
            _ok(node.call("create_table", database=DATABASE, table=TABLE, primary_key="id"))
        _ok(self.origin.call("add_node", hostname="peer",
                             url=f"wss://127.0.0.1:{self.peer.repl_port}", verify_tls=False,
                             authorization={"username": ADMIN[0], "password": ADMIN[1]}))
        _ok(self.origin.call("insert", database=DATABASE, table=TABLE,
                             records=[{"id": -1, "name": "first"}]))
        self.wait_synced(timeout=120)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pin(self, pinned: bool) -> None:
        """Origin and alone on core 0 and the peer on core 1, or all unpinned."""
        if pinned and len(all_cores()) >= 2:
            pin(self.alone.pid, {0})
            pin(self.origin.pid, {0})
            pin(self.peer.pid, {1})
        else:
            for node in self.nodes:
                pin(node.pid, all_cores())

    def wait_synced(self, timeout: float = 300) -> float:
        """Wait until the peer holds as many records as the origin; returns seconds."""
        began = time.perf_counter()
        deadline = began + timeout
        want = count(self.origin)
        while time.perf_counter() < deadline:
            if count(self.peer) >= want:
                return time.perf_counter() - began
            time.sleep(0.01)
        raise TimeoutError(f"the peer did not reach {want} records in {timeout} s")


def writer_commits(node: NodeProcess) -> float:
    """``harpsync_writer_commits_total`` from ``/metrics`` (synced group commits so far;
    older nodes name it without ``_total``)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": basic_auth(*node.auth)})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(("harpsync_writer_commits ", "harpsync_writer_commits_total ")):
            return float(line.split()[1])
    return 0.0


def count(node: NodeProcess) -> int:
    status, body = node.call("describe_table", database=DATABASE, table=TABLE)
    if status != 200:
        return -1
    return int(body.get("record_count", 0))


def _ok(answer: tuple[int, Any]) -> None:
    status, body = answer
    if status != 200:
        raise RuntimeError(f"set-up call answered {status}: {body}")


POLL_PAUSE = 0.0002


def replication_latency(origin: NodeProcess, peer: NodeProcess, samples: int,
                        id_base: int) -> list[float]:
    """Milliseconds from sending an insert to the origin until the peer returns it.

    The peer is polled with ``search_by_id`` with a 0.2 ms pause between polls, so on a
    small machine the poller does not take the CPU the peer needs to apply the write.
    """
    a, b = RawClient(origin.port), RawClient(peer.port)
    out: list[float] = []
    try:
        for i in range(samples):
            rid = id_base + i
            probe = {"operation": "search_by_id", "database": DATABASE, "table": TABLE,
                     "ids": [rid], "get_attributes": ["id"]}
            began = time.perf_counter()
            a.call({"operation": "insert", "database": DATABASE, "table": TABLE,
                    "records": [{"id": rid, "name": f"lat-{rid}"}]})
            while not b.call(probe):
                time.sleep(POLL_PAUSE)
            out.append((time.perf_counter() - began) * 1000)
    finally:
        a.close()
        b.close()
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
