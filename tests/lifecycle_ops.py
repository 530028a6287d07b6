"""The lifecycle run's operation vocabulary: schema changes (calm ones, made while every
link is up, and racing ones) and data writes, each bracketed by probe writes and
recorded in the reference model with the versions it may have.
"""

from __future__ import annotations

import math
from typing import Any

from tests.helpers import wait_for
from tests.lifecycle_model import INF, MARKER, Op, SchemaEvent, markers_of
from tests.lifecycle_nodes import (
    DATA,
    DATA_TABLES,
    EXTRA_DB,
    EXTRA_TABLE,
    KEYS,
    PROBE,
    TABLES,
    LifecycleNodes,
)


class LifecycleOps(LifecycleNodes):
    """Schema and data operations on the run's nodes, recorded in its model."""

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
        # What exists decides drop or create: read it once the nodes agree (right
        # after a heal they may not yet, and "no agreement" is not "no tables").
        self.wait_agree("every node to agree on the schema first")
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
        return True, (stored_record(rows[0]) if rows else None)

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


__all__ = ["LifecycleOps", "stored_record"]


def stored_record(row: dict[str, Any]) -> dict[str, Any]:
    """A record as stored: reads with ``get_attributes: ["*"]`` answer every attribute
    of the table, ``null`` where the record lacks it (Harper's shape), and the marker
    attributes that name a table's incarnation are never written to records."""
    return {k: v for k, v in row.items() if not (v is None and k.startswith(MARKER))}
