"""Driver for the randomized lifecycle test: three subprocess nodes, a seeded generator
of operations and disturbances, healing, and the convergence check against the model.

Every operation is issued from one thread, one at a time, so the model sees them in
acknowledgement order; only the writes sent while a node is being SIGKILLed run in a
second thread (their keys are fresh, so they never race another write).

The layers under ``LifecycleRun``: tests/lifecycle_nodes.py (settings, requests, node
management), tests/lifecycle_ops.py (schema and data operations) and
tests/lifecycle_faults.py (disturbances). This module holds the run and the check.
"""

from __future__ import annotations

import random
import time
from typing import Any

from tests.helpers import wait_for
from tests.lifecycle_faults import LifecycleFaults
from tests.lifecycle_model import MARKER, SchemaEvent
from tests.lifecycle_nodes import DATA, DATA_TABLES, PROBE, Settings, Stats
from tests.lifecycle_ops import stored_record
from tests.repl_util import CREDS


class LifecycleRun(LifecycleFaults):
    """One seeded run against three ``ProcessNode`` s under ``tmp``."""

    # -- start, mesh -------------------------------------------------------------------
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
            rows[(db, table)] = sorted((stored_record(r) for r in found), key=lambda r: r["id"])
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
