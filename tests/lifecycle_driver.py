"""Driver for the randomized lifecycle test: three subprocess nodes, a seeded generator
of operations and disturbances, healing, and the convergence check against the model.

Every operation is issued from one thread, one at a time, so the model sees them in
acknowledgement order; only the writes sent while a node is being SIGKILLed run in a
second thread (their keys are fresh, so they never race another write).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ADMIN, ProcessNode, wait_for
from tests.lifecycle_model import INF, Model, Op
from tests.repl_util import CREDS

DATA = "data"
DATA_TABLES = ("t1", "t2")
EXTRA_DB = "dbx"
EXTRA_TABLE = "u1"
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


class LifecycleRun:
    """One seeded run against three ``ProcessNode`` s under ``tmp``."""

    def __init__(self, tmp: Path, settings: Settings) -> None:
        self.settings = settings
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
        res = self.post(i, operation, **body)
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

    # -- start, mesh, stop -------------------------------------------------------------
    def start(self) -> None:
        for i, node in enumerate(self.nodes):
            node.start()
            self.up[i] = True
        a = self.nodes[0]
        for other in self.nodes[1:]:
            a.call("add_node", hostname=other.name, url=other.repl_url, verify_tls=False,
                   authorization=CREDS)
        self.wait_links()
        self.schema("create_table", DATA, PROBE[1])
        for table in DATA_TABLES:
            self.schema("create_table", DATA, table)

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

        wait_for(linked, timeout=timeout, interval=0.1, message="every link connected")

    def link_summary(self) -> dict[str, list[str]]:
        """Per node, each socket as ``peer/database:state`` (for failure messages)."""
        out: dict[str, list[str]] = {}
        for i in self.live():
            status = self.nodes[i].call("cluster_status")
            out[self.nodes[i].name] = [
                f"{c['name']}/{s['database']}:{s.get('state')}"
                + (f"({s['last_error']})" if s.get("last_error") else "")
                for c in status["connections"] for s in c["database_sockets"]]
        return out

    # -- schema (calm only) ------------------------------------------------------------
    def schema(self, operation: str, db: str, table: str | None = None) -> None:
        assert self.calm(), "schema changes only while every link is up"
        i = self.rng.choice(self.live())
        body: dict[str, Any] = {"database": db}
        if table is not None:
            body["table"] = table
        if operation == "create_table":
            body["primary_key"] = "id"
        self.counter += 1
        self.note(f"{operation} {db}.{table or ''} on {self.nodes[i].name}")
        if self.ok(i, operation, **body) is None:
            raise AssertionError(f"schema change failed: {self.anomalies[-1]}")
        self.stats.schema_changes += 1
        getattr(self.model, operation)(db, *([table] if table else []))
        wanted = self.model_schema()
        try:
            wait_for(lambda: all(self.node_schema(n) == wanted for n in self.live()),
                     timeout=20, interval=0.05, message=f"{operation} {db}.{table} on every node")
        except AssertionError as exc:
            seen = {self.nodes[n].name: sorted(self.node_schema(n) ^ wanted)
                    for n in self.live()}
            raise AssertionError(f"{exc}; tables differing from the model per node: {seen}; "
                                 f"links: {self.link_summary()}") from None

    def model_schema(self) -> set[tuple[str, str]]:
        return set(self.model.tables())

    def node_schema(self, i: int) -> set[tuple[str, str]]:
        described = self.nodes[i].call("describe_all")
        return {(db, t) for db, tables in described.items() for t in tables}

    def schema_step(self) -> None:
        choice = self.rng.random()
        if choice < 0.45:
            table = self.rng.choice(DATA_TABLES)
            if (DATA, table) in self.model.current:
                self.schema("drop_table", DATA, table)
            self.schema("create_table", DATA, table)  # drop + re-create of the same name
        elif choice < 0.6:
            table = self.rng.choice(DATA_TABLES)
            if (DATA, table) in self.model.current:
                self.schema("drop_table", DATA, table)
            else:
                self.schema("create_table", DATA, table)
        elif EXTRA_DB in self.model.databases:
            self.schema("drop_database", EXTRA_DB)
        else:
            self.schema("create_database", EXTRA_DB)
            self.schema("create_table", EXTRA_DB, EXTRA_TABLE)

    # -- data --------------------------------------------------------------------------
    def token(self) -> str:
        return f"s{self.settings.seed}o{self.counter}"

    def read(self, i: int, db: str, table: str, rid: Any) -> tuple[bool, dict[str, Any] | None]:
        """(read worked, the record or None)."""
        res = self.post(i, "search_by_id", database=db, table=table, ids=[rid],
                        get_attributes=["*"])
        if res is None or res.status_code != 200:
            return False, None
        rows = res.json()
        return True, (rows[0] if rows else None)

    def put(self, i: int, db: str, table: str, rid: Any, mode: str) -> None:
        record = {"id": rid, "v": self.token(), "n": self.nodes[i].name,
                  "x": self.rng.randrange(1000)}
        label = f"#{self.counter} {mode} on {self.nodes[i].name}"
        res = self.post(i, mode, database=db, table=table, records=[record])
        if res is None or res.status_code != 200:
            # Unknown outcome: it may have been applied (at any version).
            self.model.add(db, table, rid, Op("put", record, 0.0, INF, False, label=label))
            self.stats.unacked_writes += 1
            self.note(f"{label} {db}.{table} id={rid} unacked")
            return
        body = res.json()
        written = body.get("inserted_hashes", body.get("update_hashes",
                                                       body.get("upserted_hashes", [])))
        if rid not in written:
            self.note(f"{label} {db}.{table} id={rid} skipped")
            return
        self.stats.acked_writes += 1
        ok, row = self.read(i, db, table, rid)
        if ok and row is not None and row.get("v") == record["v"]:
            version = float(row["__updatedtime__"])
            op = Op("put", record, version, version, True, exact=True, label=label)
        elif ok and row is not None:
            # Already superseded here by a newer write from a peer.
            newer = float(row["__updatedtime__"])
            op = Op("put", record, 0.0, math.nextafter(newer, 0.0), True, label=label)
        elif ok:  # superseded by a delete made earlier elsewhere
            op = Op("put", record, 0.0, self.model.delete_bound(db, table, rid), True,
                    label=label)
        else:
            op = Op("put", record, 0.0, INF, True, label=label)
        self.model.add(db, table, rid, op)
        self.note(f"{op.describe()} {db}.{table} id={rid}")

    def probe(self, i: int) -> float:
        """Write node ``i``'s probe key and return its version (an upper bound)."""
        ops = self.model.history(*PROBE, i)
        before = len(ops)
        self.put(i, *PROBE, i, "upsert")
        if len(ops) == before or not ops[-1].exact:
            return INF
        return ops[-1].lo

    def delete(self, i: int, db: str, table: str, rid: Any) -> None:
        label = f"#{self.counter} delete on {self.nodes[i].name}"
        # A delete observes the version it removes, so it is newer than that one.
        ok, row = self.read(i, db, table, rid)
        lo = float(row["__updatedtime__"]) if ok and row is not None else 0.0
        res = self.post(i, "delete", database=db, table=table, ids=[rid])
        if res is None or res.status_code != 200:
            self.model.add(db, table, rid, Op("delete", None, lo, INF, False, label=label))
            self.note(f"{label} {db}.{table} id={rid} unacked")
            return
        if rid not in res.json().get("deleted_hashes", []):
            self.note(f"{label} {db}.{table} id={rid} skipped (not present there)")
            return
        self.stats.acked_writes += 1
        hi = self.probe(i)
        op = self.model.add(db, table, rid, Op("delete", None, lo, hi, True, label=label))
        self.note(f"{op.describe()} {db}.{table} id={rid}")

    def data_step(self) -> None:
        i = self.rng.choice(self.live())
        db, table = self.rng.choice([t for t in self.model.tables() if t != PROBE])
        rid = self.rng.randrange(KEYS)
        roll = self.rng.random()
        if roll < 0.5:
            self.put(i, db, table, rid, "upsert")
        elif roll < 0.65:
            self.put(i, db, table, rid, "insert")
        elif roll < 0.8:
            self.put(i, db, table, rid, "update")
        else:
            self.delete(i, db, table, rid)

    # -- disturbances ------------------------------------------------------------------
    def pairs(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(3) for j in range(3) if i != j]

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` while a second thread writes fresh keys to it."""
        db, table = self.rng.choice([t for t in self.model.tables() if t != PROBE])
        results: list[tuple[dict[str, Any], bool]] = []
        sent = threading.Event()
        stop = threading.Event()
        node = self.nodes[i]
        base = FRESH_BASE + 100 * self.counter

        def writer() -> None:
            with httpx.Client(timeout=10) as client:
                n = 0
                while not stop.is_set() and n < 100:
                    record = {"id": base + n, "v": f"{self.token()}k{n}", "n": node.name,
                              "x": n}
                    n += 1
                    try:
                        res = client.post(node.url, auth=ADMIN, json={
                            "operation": "upsert", "database": db, "table": table,
                            "records": [record]})
                        acked = res.status_code == 200
                    except httpx.HTTPError:
                        acked = False
                    results.append((record, acked))
                    sent.set()
                    if not acked:
                        return

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        sent.wait(10)
        node.kill()
        stop.set()
        thread.join(15)
        self.up[i] = False
        self.paused = {p for p in self.paused if p[0] != i}  # pauses are not durable
        for record, acked in results:
            state = "acked" if acked else "unacked"
            label = f"#{self.counter} in-flight upsert on {node.name} ({state})"
            self.model.add(db, table, record["id"], Op("put", record, 0.0, INF, acked,
                                                       label=label))
            if acked:
                self.stats.acked_writes += 1
            else:
                self.stats.unacked_writes += 1
        self.stats.kills += 1
        self.note(f"SIGKILL {node.name} with {len(results)} writes sent to {db}.{table}")

    def start_node(self, i: int) -> None:
        self.nodes[i].start()
        self.up[i] = True
        self.stats.restarts += 1
        self.note(f"started {self.nodes[i].name}")

    def disturb(self) -> None:
        options: list[str] = []
        if len(self.live()) == 3:
            options += ["kill", "restart"]
        if len(self.live()) < 3:
            options += ["start"]
        options += ["pause", "narrow", "remove", "wait_prune"]
        if self.paused:
            options.append("resume")
        if self.narrowed:
            options.append("widen")
        if self.removed:
            options.append("readd")
        action = self.rng.choice(options)
        live = self.live()
        self.stats.disturbances += 1
        if action == "kill":
            self.kill(self.rng.choice(live))
        elif action == "restart":
            i = self.rng.choice(live)
            self.nodes[i].restart()
            self.paused = {p for p in self.paused if p[0] != i}
            self.stats.restarts += 1
            self.note(f"restarted {self.nodes[i].name}")
        elif action == "start":
            self.start_node(next(i for i in range(3) if not self.up[i]))
        elif action == "pause":
            i, j = self.rng.choice([(i, j) for i, j in self.pairs() if i in live])
            db = self.rng.choice([None, DATA])
            body: dict[str, Any] = {"hostname": self.nodes[j].name}
            if db:
                body["database"] = db
            if (i, j) not in self.removed and (j, i) not in self.removed:
                if self.ok(i, "pause_replication", **body) is not None:
                    self.paused.add((i, j, db))
                    self.note(f"{self.nodes[i].name} paused {self.nodes[j].name} {db}")
        elif action == "resume":
            i, j, db = sorted(self.paused, key=repr)[self.rng.randrange(len(self.paused))]
            self.resume(i, j, db)
        elif action == "narrow":
            candidates = [(i, j) for i, j in self.pairs() if i in live and j in live
                          and (i, j) not in self.removed and (j, i) not in self.removed]
            if candidates:
                i, j = self.rng.choice(candidates)
                table = self.rng.choice(DATA_TABLES)
                sub = {"database": DATA, "table": table, "subscribe": self.rng.random() < 0.5,
                       "publish": self.rng.random() < 0.5}
                if self.ok(i, "set_node_replication", hostname=self.nodes[j].name,
                           subscriptions=[sub]) is not None:
                    self.narrowed.add((i, j))
                    self.note(f"{self.nodes[i].name} subscriptions for "
                              f"{self.nodes[j].name}: {sub}")
        elif action == "widen":
            i, j = sorted(self.narrowed)[self.rng.randrange(len(self.narrowed))]
            if self.up[i] and self.up[j]:
                self.widen(i, j)
        elif action == "remove":
            candidates = [(i, j) for i, j in self.pairs() if i in live and j in live
                          and not any({i, j} == set(p) for p in self.removed)]
            if candidates and not self.removed:
                i, j = self.rng.choice(candidates)
                if self.ok(i, "remove_node", hostname=self.nodes[j].name) is not None:
                    self.removed.add((i, j))
                    self.narrowed -= {(i, j), (j, i)}
                    self.paused = {p for p in self.paused if {p[0], p[1]} != {i, j}}
                    self.note(f"{self.nodes[i].name} removed {self.nodes[j].name}")
        elif action == "readd":
            i, j = sorted(self.removed)[0]
            if self.up[i] and self.up[j]:
                self.readd(i, j)
        elif action == "wait_prune":
            # Longer than the log's retention: a stopped or paused link may now need a
            # full copy. Polling a clock, not a condition of the product, by design.
            end = time.monotonic() + 2.6
            wait_for(lambda: time.monotonic() > end, timeout=10, interval=0.2,
                     message="retention to pass")
            self.note("waited past the log retention")

    def resume(self, i: int, j: int, db: str | None) -> None:
        body: dict[str, Any] = {"hostname": self.nodes[j].name}
        if db:
            body["database"] = db
        if self.up[i]:
            self.ok(i, "resume_replication", **body)
        self.paused.discard((i, j, db))
        self.note(f"{self.nodes[i].name} resumed {self.nodes[j].name} {db}")

    def widen(self, i: int, j: int) -> None:
        self.ok(i, "set_node_replication", hostname=self.nodes[j].name, replicates=True)
        self.narrowed.discard((i, j))
        self.note(f"{self.nodes[i].name} back to full replication with {self.nodes[j].name}")

    def readd(self, i: int, j: int) -> None:
        self.ok(i, "add_node", hostname=self.nodes[j].name, url=self.nodes[j].repl_url,
                verify_tls=False, authorization=CREDS)
        self.removed.discard((i, j))
        self.note(f"{self.nodes[i].name} added {self.nodes[j].name} again")

    # -- the run -----------------------------------------------------------------------
    def heal(self) -> None:
        for i in range(3):
            if not self.up[i]:
                self.start_node(i)
        for i, j, db in sorted(self.paused, key=repr):
            self.resume(i, j, db)
        for i, j in sorted(self.narrowed):
            self.widen(i, j)
        for i, j in sorted(self.removed):
            self.readd(i, j)
        self.note("healed")
        self.wait_links()

    def run(self) -> None:
        self.start()
        for _round in range(self.settings.rounds):
            for _ in range(self.settings.steps):
                self.counter += 1
                if self.rng.random() < 0.22:
                    self.disturb()
                else:
                    self.data_step()
            self.heal()
            for _ in range(self.rng.randrange(1, 3)):
                self.counter += 1
                self.schema_step()
            for _ in range(4):
                self.counter += 1
                self.data_step()
        self.heal()

    # -- the check ---------------------------------------------------------------------
    def snapshot(self, i: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
        out = {}
        for db, table in sorted(self.node_schema(i)):
            rows = self.nodes[i].call(
                "search_by_conditions", database=db, table=table, get_attributes=["*"],
                conditions=[{"attribute": "id", "comparator": "greater_than_equal",
                             "value": 0}])
            out[(db, table)] = sorted(rows, key=lambda r: r["id"])
        return out

    def problems(self) -> list[str]:
        """Everything that differs from the model or between nodes (empty = converged)."""
        problems: list[str] = []
        snaps = [self.snapshot(i) for i in range(3)]
        wanted = self.model_schema()
        for i, snap in enumerate(snaps):
            name = self.nodes[i].name
            if set(snap) != wanted:
                problems.append(f"{name}: tables {sorted(snap)} != model {sorted(wanted)}")
            for db, table in sorted(set(snap) & wanted):
                problems += [f"{name}: {p}" for p in
                             self.model.check_table(db, table, snap[(db, table)])]
        for i in (1, 2):
            for key in sorted(set(snaps[0]) | set(snaps[i])):
                if snaps[0].get(key) != snaps[i].get(key):
                    problems.append(f"{key[0]}.{key[1]} differs between "
                                    f"{self.nodes[0].name} and {self.nodes[i].name}")
        return problems

    def converge(self, timeout: float = 40) -> list[str]:
        started = time.monotonic()
        last: list[str] = []

        def done() -> bool:
            nonlocal last
            last = self.problems()
            return not last

        try:
            wait_for(done, timeout=timeout, interval=0.25, message="convergence")
        except AssertionError:
            return (last or ["no convergence (a node did not answer)"]) + [
                f"links: {self.link_summary()}"]
        self.stats.convergence_s = time.monotonic() - started
        return []


__all__ = ["LifecycleRun", "Settings", "Stats"]
