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
from tests.lifecycle_model import INF, MARKER, Model, Op, SchemaEvent, markers_of
from tests.repl_util import CREDS

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


class LifecycleRun:
    """One seeded run against three ``ProcessNode`` s under ``tmp``."""

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
        # The probe table first, unbracketed (there is nothing to probe with yet).
        self.probe_inc = self.model.new_incarnation(*PROBE)
        self.ok(0, "create_table", database=DATA, table=PROBE[1], primary_key="id",
                attributes=[{"name": f"{MARKER}{self.probe_inc}"}])
        self.model.add_event(*PROBE, SchemaEvent("create", 0.0, 0.0, True, self.probe_inc,
                                                 "probe table"))
        self.wait_agree("the probe table on every node", lambda t: PROBE in t)
        for table in DATA_TABLES:
            self.calm_schema("create_table", DATA, table)

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

    # -- markers, probes --------------------------------------------------------------
    def markers(self, i: int) -> dict[tuple[str, str], set[int]] | None:
        """Node ``i``'s tables and the incarnation markers in their definitions."""
        res = self.post(i, "describe_all")
        if res is None or res.status_code != 200:
            return None
        return {(db, t): markers_of(d.get("attributes", []))
                for db, tables in res.json().items() for t, d in tables.items()}

    def marker(self, i: int, db: str, table: str) -> int | None:
        """The incarnation node ``i`` has of a table (None: none, or unreadable)."""
        res = self.post(i, "describe_table", database=db, table=table)
        if res is None or res.status_code != 200:
            return None
        found = markers_of(res.json().get("attributes", []))
        if not found:
            self.anomalies.append(f"#{self.counter} {db}.{table} on {self.nodes[i].name} "
                                  f"shows no incarnation marker")
            return None
        # Several markers: creates made concurrently (no drop between them) are one table
        # by the drop rule, its definition the union of theirs; every one of them is live,
        # and the newest names the table.
        return max(found)

    def probe(self, i: int) -> float | None:
        """Write node ``i``'s probe key; its version bounds what the node did just
        before (above) or just after (below)."""
        before = len(self.model.history(self.probe_inc, i))
        self.put(i, *PROBE, i, "upsert")
        ops = self.model.history(self.probe_inc, i)
        if len(ops) == before or not ops[-1].exact:
            return None
        return ops[-1].lo

    def place(self, rid: Any, op: Op, m1: int | None, m2: int | None) -> None:
        """Record ``op`` in the incarnation its node had: if the marker changed around
        it, it may be in either one (or, for a put, superseded): record it as unsure."""
        if m1 is not None and m1 == m2:
            self.model.add(m1, rid, op)
            return
        for inc in {m1, m2} - {None}:
            assert inc is not None
            self.model.add(inc, rid, Op(op.kind, op.record, op.lo, op.hi, False,
                                        label=op.label + " (incarnation changed)"))

    # -- schema ------------------------------------------------------------------------
    def schema_op(self, i: int, operation: str, db: str, table: str | None = None) -> bool:
        """One create/drop on node ``i``, bracketed by probe writes; True if acked."""
        node = self.nodes[i].name
        label = f"#{self.counter} {operation} {db}.{table or ''} on {node}"
        lo = self.probe(i) or 0.0
        body: dict[str, Any] = {"database": db}
        number = None
        if table is not None:
            body["table"] = table
        if operation == "create_table":
            assert table is not None
            number = self.model.new_incarnation(db, table)
            body["primary_key"] = "id"
            body["attributes"] = [{"name": f"{MARKER}{number}"}]
        res = self.post(i, operation, **body)
        acked = res is not None and res.status_code == 200
        if res is not None and res.status_code < 500 and not acked:
            self.note(f"{label}: refused {res.status_code} {res.text[:120]}")
            return False
        hi = self.probe(i) or INF
        kind = "create" if operation == "create_table" else "drop"
        tables = [table] if table is not None else [EXTRA_TABLE]  # drop_database: its tables
        if operation != "create_database":
            for name in tables:
                self.model.add_event(db, name, SchemaEvent(kind, lo, hi, acked, number, label))
        self.stats.schema_changes += acked
        self.note(f"{label} ({'acked' if acked else 'unknown outcome'}"
                  f"{f', inc{number}' if number else ''})")
        return acked

    def agree(self) -> dict[tuple[str, str], set[int]] | None:
        """Every live node's tables and markers, if they are all the same."""
        seen = [self.markers(i) for i in self.live()]
        if any(m is None for m in seen) or any(m != seen[0] for m in seen):
            return None
        return seen[0]

    def wait_agree(self, what: str, check: Any = None) -> None:
        def done() -> bool:
            tables = self.agree()
            return tables is not None and (check is None or check(tables))

        try:
            wait_for(done, timeout=20, interval=0.05, message=what)
        except AssertionError as exc:
            seen = {self.nodes[i].name: self.markers(i) for i in self.live()}
            raise AssertionError(f"{exc}; tables per node: {seen}; "
                                 f"links: {self.link_summary()}") from None

    def calm_schema(self, operation: str, db: str, table: str | None = None) -> None:
        """A schema change while every link is up, then a wait until every node shows
        the same tables (any state: convergence is what is waited for)."""
        assert self.calm(), "calm schema changes need every link up"
        self.wait_agree("every node to agree on the schema first")
        i = self.rng.choice(self.live())
        if not self.schema_op(i, operation, db, table):
            raise AssertionError(f"schema change refused: {self.stats.log[-1]}")
        # Wait until every node shows the same tables again. Not necessarily this
        # change: a drop made on a skewed clock during a partition may be newer, and
        # the final check judges the outcome against the model.
        self.wait_agree(f"every node to agree after {operation} {db}.{table or ''}")

    def schema_step(self) -> None:
        """Calm: drop and re-create a table, toggle one, or drop/create a database."""
        choice = self.rng.random()
        tables = self.agree() or {}
        if choice < 0.45:
            table = self.rng.choice(DATA_TABLES)
            if (DATA, table) in tables:
                self.calm_schema("drop_table", DATA, table)
            self.calm_schema("create_table", DATA, table)  # drop + re-create of the name
        elif choice < 0.6:
            table = self.rng.choice(DATA_TABLES)
            if (DATA, table) in tables:
                self.calm_schema("drop_table", DATA, table)
            else:
                self.calm_schema("create_table", DATA, table)
        elif (EXTRA_DB, EXTRA_TABLE) in tables:
            self.calm_schema("drop_database", EXTRA_DB)
        else:
            self.calm_schema("create_database", EXTRA_DB)
            self.calm_schema("create_table", EXTRA_DB, EXTRA_TABLE)

    def racing_schema(self) -> None:
        """A drop, create or drop + re-create on one node while links may be down:
        other nodes may write to the old incarnation meanwhile."""
        i = self.rng.choice(self.live())
        table = self.rng.choice(DATA_TABLES)
        current = self.marker(i, DATA, table)
        if current is not None:
            self.schema_op(i, "drop_table", DATA, table)
            if self.rng.random() < 0.5:
                return
        self.schema_op(i, "create_table", DATA, table)

    # -- data --------------------------------------------------------------------------
    def token(self) -> str:
        self.tokens += 1
        return f"s{self.settings.seed}w{self.tokens}"

    def read(self, i: int, db: str, table: str, rid: Any) -> tuple[bool, dict[str, Any] | None]:
        """(read worked, the record or None)."""
        res = self.post(i, "search_by_id", database=db, table=table, ids=[rid],
                        get_attributes=["*"])
        if res is None or res.status_code != 200:
            return False, None
        rows = res.json()
        return True, (_stored(rows[0]) if rows else None)

    def incarnation_of(self, i: int, db: str, table: str) -> int | None:
        if (db, table) == PROBE:
            return self.probe_inc
        return self.marker(i, db, table)

    def put(self, i: int, db: str, table: str, rid: Any, mode: str) -> None:
        m1 = self.incarnation_of(i, db, table)
        if m1 is None:
            self.note(f"{mode} {db}.{table} on {self.nodes[i].name}: no such table there")
            return
        record = {"id": rid, "v": self.token(), "n": self.nodes[i].name,
                  "x": self.rng.randrange(1000)}
        label = f"#{self.counter} {mode} on {self.nodes[i].name}"
        res = self.post(i, mode, database=db, table=table, records=[record])
        if res is not None and res.status_code < 500 and res.status_code != 200:
            self.note(f"{label} {db}.{table} refused: {res.status_code} {res.text[:100]}")
            return
        if res is None or res.status_code != 200:
            # Unknown outcome: it may have been applied (at any version).
            op = Op("put", record, 0.0, INF, False, label=label)
            self.place(rid, op, m1, self.incarnation_of(i, db, table))
            self.stats.unacked_writes += 1
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
            op = Op("put", record, 0.0, self.model.delete_bound(m1, rid), True, label=label)
        else:
            op = Op("put", record, 0.0, INF, True, label=label)
        self.place(rid, op, m1, self.incarnation_of(i, db, table))
        self.note(f"{op.describe()} {db}.{table} id={rid}")

    def delete(self, i: int, db: str, table: str, rid: Any) -> None:
        m1 = self.incarnation_of(i, db, table)
        if m1 is None:
            return
        label = f"#{self.counter} delete on {self.nodes[i].name}"
        # A delete observes the version it removes, so it is newer than that one.
        ok, row = self.read(i, db, table, rid)
        lo = float(row["__updatedtime__"]) if ok and row is not None else 0.0
        res = self.post(i, "delete", database=db, table=table, ids=[rid])
        if res is not None and res.status_code < 500 and res.status_code != 200:
            return
        if res is None or res.status_code != 200:
            self.place(rid, Op("delete", None, lo, INF, False, label=label), m1,
                       self.incarnation_of(i, db, table))
            return
        if rid not in res.json().get("deleted_hashes", []):
            self.note(f"{label} {db}.{table} id={rid} skipped (not present there)")
            return
        self.stats.acked_writes += 1
        hi = self.probe(i) or INF
        op = Op("delete", None, lo, hi, True, label=label,
                supersedes=row.get("v") if row is not None else None)
        self.place(rid, op, m1, self.incarnation_of(i, db, table))
        self.note(f"{op.describe()} {db}.{table} id={rid}")

    def data_step(self) -> None:
        i = self.rng.choice(self.live())
        db, table = self.rng.choice(TABLES)
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
        """SIGKILL node ``i`` while a second thread writes fresh keys to it (in the
        probe table, whose one incarnation is sure)."""
        db, table = PROBE
        results: list[tuple[dict[str, Any], bool]] = []
        sent = threading.Event()
        stop = threading.Event()
        node = self.nodes[i]
        base = FRESH_BASE + 100 * self.counter
        prefix = self.token()

        def writer() -> None:
            with httpx.Client(timeout=10) as client:
                n = 0
                while not stop.is_set() and n < 100:
                    record = {"id": base + n, "v": f"{prefix}k{n}", "n": node.name,
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
        # Pauses are durable (kept in the peer's row), so the heal still resumes them.
        for record, acked in results:
            state = "acked" if acked else "unacked"
            label = f"#{self.counter} in-flight upsert on {node.name} ({state})"
            self.model.add(self.probe_inc, record["id"], Op("put", record, 0.0, INF, acked,
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
        options += ["pause", "narrow", "remove", "wait_prune", "schema", "schema", "isolate"]
        if self.paused:  # a partition is where the drop rule matters most
            options += ["schema", "schema"]
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
            self.nodes[i].restart()  # its pauses survive (kept in the peer's row)
            self.stats.restarts += 1
            self.note(f"restarted {self.nodes[i].name}")
        elif action == "start":
            self.start_node(next(i for i in range(3) if not self.up[i]))
        elif action == "pause":
            i, j = self.rng.choice([(i, j) for i, j in self.pairs() if i in live])
            db = self.rng.choice([None, DATA, "system"])
            body: dict[str, Any] = {"hostname": self.nodes[j].name}
            if db:
                body["database"] = db
            if (i, j) not in self.removed and (j, i) not in self.removed:
                res = self.post(i, "pause_replication", **body)
                if res is not None and res.status_code == 400 \
                        and "no replication link" in res.text \
                        and ((i, j) in self.narrowed or (j, i) in self.narrowed):
                    # Narrowed subscriptions left no such link: nothing to pause.
                    self.note(f"pause {self.nodes[i].name} <- {self.nodes[j].name} {db}: "
                              f"{res.text[:100]}")
                elif self.ok_response(i, "pause_replication", body, res) is not None:
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
        elif action == "isolate":
            # Pause every link to and from one node: a partition that both sides keep
            # writing through (and may change the schema through).
            i = self.rng.choice(live)
            for j in range(3):
                if j == i or {i, j} in [set(p) for p in self.removed]:
                    continue
                for on, peer in ((i, j), (j, i)):
                    if self.up[on] and self.ok(on, "pause_replication",
                                               hostname=self.nodes[peer].name) is not None:
                        self.paused.add((on, peer, None))
            self.note(f"isolated {self.nodes[i].name} (paused both ways)")
        elif action == "schema":
            self.racing_schema()
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
        if not self.up[i]:
            return  # its pause is durable: resumed once it is up (heal starts it first)
        res = self.post(i, "resume_replication", **body)
        if res is not None and res.status_code == 400 and "no replication link" in res.text:
            # A subscription change since the pause removed that link: nothing to do.
            self.note(f"resume {self.nodes[i].name} <- {self.nodes[j].name} {db}: "
                      f"{res.text[:100]}")
        elif res is None or res.status_code != 200:
            self.anomalies.append(f"#{self.counter} resume_replication {body} on "
                                  f"{self.nodes[i].name}: "
                                  f"{None if res is None else (res.status_code, res.text)}")
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
                self.rng = random.Random(self.master.getrandbits(64))
                if self.rng.random() < 0.3:
                    self.disturb()
                else:
                    self.data_step()
            self.heal()
            for _ in range(self.master.randrange(1, 3)):
                self.counter += 1
                self.rng = random.Random(self.master.getrandbits(64))
                self.schema_step()
            self.wait_agree("every node to agree on the schema")
            for _ in range(4):
                self.counter += 1
                self.rng = random.Random(self.master.getrandbits(64))
                self.data_step()
        self.heal()

    # -- the check ---------------------------------------------------------------------
    def snapshot(self, i: int) -> tuple[dict[tuple[str, str], set[int]],
                                        dict[tuple[str, str], list[dict[str, Any]]]]:
        """Node ``i``'s tables with their markers, and every table's rows."""
        tables = self.markers(i)
        if tables is None:
            raise AssertionError(f"{self.nodes[i].name} did not answer describe_all")
        rows = {}
        for db, table in sorted(tables):
            found = self.nodes[i].call(
                "search_by_conditions", database=db, table=table, get_attributes=["*"],
                conditions=[{"attribute": "id", "comparator": "greater_than_equal",
                             "value": 0}])
            rows[(db, table)] = sorted((_stored(r) for r in found), key=lambda r: r["id"])
        return tables, rows

    def problems(self) -> list[str]:
        """Everything that differs from the model or between nodes (empty = converged)."""
        problems: list[str] = []
        snaps = [self.snapshot(i) for i in range(3)]
        for i, (tables, rows) in enumerate(snaps):
            name = self.nodes[i].name
            problems += [f"{name}: {p}" for p in self.model.check_schema(tables)]
            for key, markers in sorted(tables.items()):
                # Several markers: concurrent creates merged into one table.
                if markers and markers <= set(self.model.incarnations):
                    problems += [f"{name}: {p}" for p in
                                 self.model.check_rows(markers, rows[key])]
        for i in (1, 2):
            if snaps[i][0] != snaps[0][0]:
                problems.append(f"tables differ between {self.nodes[0].name} "
                                f"({snaps[0][0]}) and {self.nodes[i].name} ({snaps[i][0]})")
            for key in sorted(set(snaps[0][1]) | set(snaps[i][1])):
                if snaps[0][1].get(key) != snaps[i][1].get(key):
                    problems.append(f"{key[0]}.{key[1]} rows differ between "
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


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    """A record as stored: reads with ``get_attributes: ["*"]`` answer every attribute
    of the table, ``null`` where the record lacks it (Harper's shape), and the marker
    attributes that name a table's incarnation are never written to records."""
    return {k: v for k, v in row.items() if not (v is None and k.startswith(MARKER))}
