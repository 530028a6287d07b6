"""The lifecycle run's fault vocabulary: SIGKILL with writes in flight (the only
requests sent from a second thread; their keys are fresh, so they never race another
write), restarts, pauses, isolation, narrowed subscriptions, remove/re-add, waiting past
the log retention and racing schema changes; and the undoing of each.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.helpers import ADMIN, wait_for
from tests.lifecycle_model import INF, Op
from tests.lifecycle_nodes import DATA, DATA_TABLES, FRESH_BASE, PROBE
from tests.lifecycle_ops import LifecycleOps
from tests.repl_util import CREDS


class LifecycleFaults(LifecycleOps):
    """Disturbances of the run's nodes and links, and the steps that heal them."""

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


__all__ = ["LifecycleFaults"]
