"""The lifecycle run's node management: its constants, settings and tallies, and the
base of the run: three subprocess nodes, one request at a time to them (failures recorded
as anomalies), and waiting for every replication link to connect.

The operations on top are in tests/lifecycle_ops.py, the faults in
tests/lifecycle_faults.py, the run and its convergence check in tests/lifecycle_driver.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ProcessNode, wait_for
from tests.lifecycle_model import Model

DATA = "data"
DATA_TABLES = ("t1", "t2")
EXTRA_DB = "dbx"  # created and dropped only while every link is up
EXTRA_TABLE = "u1"
TABLES = [(DATA, t) for t in DATA_TABLES] + [(EXTRA_DB, EXTRA_TABLE)]
PROBE = ("data", "probe")  # never dropped: a node's own key brackets its deletes
KEYS = 6  # ids per table: few, so writes collide
FRESH_BASE = 1000  # ids of writes sent while a node dies (written once each)
RETENTION = "2s"


@dataclass
class Settings:
    seed: int
    rounds: int = 3
    steps: int = 20  # disturbed steps per round (calm schema steps come on top)
    skew_ms: int = 0  # HARPSYNC_CLOCK_OFFSET_MS of node-c (below maxClockSkew)


@dataclass
class Stats:
    operations: int = 0
    acked_writes: int = 0
    unacked_writes: int = 0
    kills: int = 0
    restarts: int = 0
    schema_changes: int = 0
    disturbances: int = 0
    convergence_s: float = 0.0
    log: list[str] = field(default_factory=list)


class LifecycleNodes:
    """The state of one seeded run against three ``ProcessNode`` s under ``tmp``, with
    the requests and node management every later layer uses."""

    def __init__(self, tmp: Path, settings: Settings) -> None:
        self.settings = settings
        # Each step draws from its own generator seeded by the master one, so a step
        # whose course depends on timing does not shift the steps after it.
        self.master = random.Random(settings.seed)
        self.rng = random.Random(settings.seed)
        self.model = Model()
        self.stats = Stats()
        self.anomalies: list[str] = []
        self.nodes: list[ProcessNode] = []
        env = {"LOGGING_AUDITRETENTION": RETENTION, "REPLICATION_RETENTIONINTERVAL": "500ms",
               "REPLICATION_MAXCLOCKSKEW": "60000"}
        for i, name in enumerate(("node-a", "node-b", "node-c")):
            extra = dict(env)
            if i == 2 and settings.skew_ms:
                extra["HARPSYNC_CLOCK_OFFSET_MS"] = str(settings.skew_ms)
            self.nodes.append(ProcessNode(name, tmp / name, extra))
        self.up = [False] * 3
        self.paused: set[tuple[int, int, str | None]] = set()  # (on, from, database)
        self.narrowed: set[tuple[int, int]] = set()  # (on, peer): subscriptions set
        self.removed: set[tuple[int, int]] = set()  # (on, peer): remove_node called
        self.counter = 0
        self.tokens = 0
        self.probe_inc = 0

    # -- plumbing ----------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.stats.log.append(f"#{self.counter} {text}")

    def post(self, i: int, operation: str, **body: Any) -> httpx.Response | None:
        """One request; None if the node could not be reached (recorded)."""
        self.stats.operations += 1
        try:
            res = self.nodes[i].post({"operation": operation, **body}, timeout=20)
        except httpx.HTTPError as exc:
            self.anomalies.append(f"#{self.counter} {operation} on {self.nodes[i].name}: "
                                  f"{exc!r}")
            return None
        if res.status_code >= 500:
            self.anomalies.append(f"#{self.counter} {operation} on {self.nodes[i].name}: "
                                  f"{res.status_code} {res.text[:300]}")
        return res

    def ok(self, i: int, operation: str, **body: Any) -> Any:
        return self.ok_response(i, operation, body, self.post(i, operation, **body))

    def ok_response(self, i: int, operation: str, body: dict[str, Any], res: Any) -> Any:
        """The JSON of a 200 answer; anything else is recorded as an anomaly (None)."""
        if res is None or res.status_code != 200:
            self.anomalies.append(f"#{self.counter} {operation} {json.dumps(body)[:200]} on "
                                  f"{self.nodes[i].name} failed: "
                                  f"{None if res is None else (res.status_code, res.text[:300])}")
            return None
        return res.json()

    def live(self) -> list[int]:
        return [i for i in range(3) if self.up[i]]

    def calm(self) -> bool:
        return all(self.up) and not (self.paused or self.narrowed or self.removed)

    # -- nodes, links ------------------------------------------------------------------
    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def wait_links(self, timeout: float = 30) -> None:
        """Every node has connected sockets to both others for every database."""

        def linked() -> bool:
            for i in range(3):
                status = self.nodes[i].call("cluster_status")
                conns = {c["name"]: c for c in status["connections"]}
                for j in range(3):
                    if j == i:
                        continue
                    conn = conns.get(self.nodes[j].name)
                    if conn is None or not conn["database_sockets"]:
                        return False
                    if not all(s["connected"] for s in conn["database_sockets"]):
                        return False
            return True

        try:
            wait_for(linked, timeout=timeout, interval=0.1, message="every link connected")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; links: {self.link_summary()}") from None

    def link_summary(self) -> dict[str, list[str]]:
        """Per node, each socket as ``peer/database:state`` (for failure messages)."""
        out: dict[str, list[str]] = {}
        for i in self.live():
            status = self.nodes[i].call("cluster_status")
            out[self.nodes[i].name] = [
                f"{c['name']}/{s['database']}:{s.get('state')}"
                f"[recv={s.get('received_seq')},commit={s.get('committed_seq')},"
                f"lag={s.get('lag_txns')},sent={s.get('sent_seq')}]"
                + (f"({s['last_error']})" if s.get("last_error") else "")
                for c in status["connections"] for s in c["database_sockets"]]
        return out

    def start_node(self, i: int) -> None:
        self.nodes[i].start()
        self.up[i] = True
        self.stats.restarts += 1
        self.note(f"started {self.nodes[i].name}")


__all__ = ["DATA", "DATA_TABLES", "EXTRA_DB", "EXTRA_TABLE", "FRESH_BASE", "KEYS", "PROBE",
           "RETENTION", "TABLES", "LifecycleNodes", "Settings", "Stats"]
