"""Reference model for the randomized lifecycle and partition tests (pure Python).

It records what the test was told (acknowledged operations) and what it may only
suspect (writes in flight when a node died, requests whose outcome is unknown), and
computes the final states that last-writer-wins and the drop rule (SPEC.md) allow.

Versions. A write's version is known exactly when the test read its own value back
(``__updatedtime__`` = version / 65536, a float that can merge versions a few counter
steps apart, so equal floats count as a tie and either side may win). Otherwise it is
known to lie in an interval: a delete is newer than the version it removed and older
than a probe write made on the same node right after it; a schema change lies between
two probe writes made on its node just before and after it. An event ``X`` can be the
newest of its history iff no acknowledged event ``Y`` is surely newer:
``lo(Y) <= hi(X)`` for every acknowledged ``Y``.

Schema. Every ``create_table`` makes a new incarnation, numbered by the test and
recognisable on every node by a marker attribute ``inc<number>`` in its definition.
A write belongs to the incarnation its node had (the test reads the marker before and
after the write). The final state of a table name is decided by the newest of its
creates and drops; if that is a create, the table holds the last-writer-wins merge of
the writes to the incarnations created after the newest drop. Usually that is one, but
creates made concurrently (on nodes that had not heard of each other's, with no drop
between them) are one table by the drop rule (replication/DESIGN.md "Concurrent creates
merge"): its definition carries every one of their markers, and its rows merge the
writes to all of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

INF = math.inf
MARKER = "inc"  # incarnation marker attribute prefix: inc<number>
# Attributes the model does not predict (kept from whatever the writing node had).
UNPREDICTED = ("__createdtime__",)

TableKey = tuple[str, str]  # (database, table)


class Versioned(Protocol):
    lo: float
    hi: float
    acked: bool


@dataclass
class Op:
    """One data operation on one key."""

    kind: str  # "put" or "delete"
    record: dict[str, Any] | None  # the written attributes (None for deletes)
    lo: float  # lower bound of the version (ms as float)
    hi: float  # upper bound
    acked: bool  # acknowledged: it happened (else it may or may not have)
    exact: bool = False  # lo == hi is the version read back
    label: str = ""  # for failure messages: "#17 upsert on node-b"
    supersedes: str | None = None  # a delete: the ``v`` of the row it removed (older)

    def describe(self) -> str:
        rng = f"v={self.lo!r}" if self.exact else f"v in [{self.lo!r}, {self.hi!r}]"
        state = "acked" if self.acked else "unacked"
        what = "delete" if self.kind == "delete" else f"put {self.record}"
        return f"{self.label}: {what} ({rng}, {state})"


@dataclass
class SchemaEvent:
    """A create (with its incarnation number) or a drop of one table name."""

    kind: str  # "create" or "drop"
    lo: float
    hi: float
    acked: bool
    incarnation: int | None = None
    label: str = ""

    def describe(self) -> str:
        what = f"create inc{self.incarnation}" if self.kind == "create" else "drop"
        state = "acked" if self.acked else "unacked"
        return f"{self.label}: {what} (v in [{self.lo!r}, {self.hi!r}], {state})"


@dataclass
class Incarnation:
    """One create of a table and the writes made to it, per primary key."""

    number: int
    table: TableKey
    keys: dict[Any, list[Op]] = field(default_factory=dict)


def _surely_newer(y: Any, x: Any) -> bool:
    if y is x or not y.acked:
        return False
    if y.lo > x.hi:
        return True
    # A delete is newer than the row it removed, even when their floats are equal.
    record = getattr(x, "record", None)
    return bool(getattr(y, "supersedes", None) and record and y.supersedes == record.get("v"))


def possible_winners(events: list[Any]) -> list[Any]:
    """The events of one history that may be its newest."""
    return [x for x in events if not any(_surely_newer(y, x) for y in events)]


def markers_of(attributes: list[dict[str, Any]]) -> set[int]:
    """Incarnation numbers named by a describe_table ``attributes`` list."""
    found = set()
    for attr in attributes:
        name = str(attr.get("attribute", ""))
        if name.startswith(MARKER) and name[len(MARKER):].isdigit():
            found.add(int(name[len(MARKER):]))
    return found


class Model:
    """Schema events and data operations of one run."""

    def __init__(self) -> None:
        self.incarnations: dict[int, Incarnation] = {}
        self.events: dict[TableKey, list[SchemaEvent]] = {}

    # -- schema ----------------------------------------------------------------------
    def new_incarnation(self, db: str, table: str) -> int:
        number = len(self.incarnations) + 1
        self.incarnations[number] = Incarnation(number, (db, table))
        return number

    def add_event(self, db: str, table: str, event: SchemaEvent) -> SchemaEvent:
        self.events.setdefault((db, table), []).append(event)
        return event

    def allowed_tables(self, db: str, table: str) -> tuple[bool, set[int]]:
        """(absent allowed, incarnations that may be the final one) for a table name."""
        events = self.events.get((db, table), [])
        winners = possible_winners(events)
        absent = (not any(e.acked for e in events)
                  or any(e.kind == "drop" for e in winners))
        return absent, {e.incarnation for e in winners if e.kind == "create"
                        and e.incarnation is not None}

    def merged_tables(self, db: str, table: str) -> tuple[set[int], set[int]]:
        """(incarnations that may be live, those that must be) when the name exists.

        A create may be live unless an acknowledged drop is surely newer; it must be
        live when acknowledged and surely newer than every drop (acked or not)."""
        events = self.events.get((db, table), [])
        drops = [e for e in events if e.kind == "drop"]
        creates = [e for e in events if e.kind == "create"]
        may = {c.incarnation for c in creates if c.incarnation is not None
               and not any(d.acked and d.lo > c.hi for d in drops)}
        must = {c.incarnation for c in creates if c.incarnation is not None
                and c.acked and all(d.hi < c.lo for d in drops)}
        return may, must

    def table_names(self) -> list[TableKey]:
        return sorted(self.events)

    # -- data ------------------------------------------------------------------------
    def history(self, incarnation: int, rid: Any) -> list[Op]:
        return self.incarnations[incarnation].keys.setdefault(rid, [])

    def add(self, incarnation: int, rid: Any, op: Op) -> Op:
        self.history(incarnation, rid).append(op)
        return op

    def delete_bound(self, incarnation: int, rid: Any) -> float:
        """An upper bound for a delete that superseded a write read back as absent."""
        deletes = [op.hi for op in self.history(incarnation, rid) if op.kind == "delete"]
        return max(deletes) if deletes else INF

    # -- outcomes --------------------------------------------------------------------
    @staticmethod
    def allowed(ops: list[Op]) -> tuple[bool, list[Op]]:
        """(absent allowed, puts that may be the final value) for one key."""
        winners = possible_winners(ops)
        absent = (not any(op.acked for op in ops)
                  or any(op.kind == "delete" for op in winners))
        return absent, [op for op in winners if op.kind == "put"]

    def check_schema(self, tables: dict[TableKey, set[int]]) -> list[str]:
        """Differences between one node's tables (name -> markers) and the model."""
        problems = []
        for key in sorted(set(tables) | set(self.events)):
            absent_ok, allowed = self.allowed_tables(*key)
            history = "; ".join(e.describe() for e in self.events.get(key, [])) or "none"
            markers = tables.get(key)
            if markers is None:
                if not absent_ok:
                    problems.append(f"{key[0]}.{key[1]}: missing; expected incarnation "
                                    f"{sorted(allowed)}; history: {history}")
            elif not self._markers_allowed(key, markers, allowed):
                problems.append(f"{key[0]}.{key[1]}: has incarnation {sorted(markers)}; "
                                f"allowed: {'absent, ' if absent_ok else ''}"
                                f"{sorted(allowed)}; history: {history}")
        return problems

    def _markers_allowed(self, key: TableKey, markers: set[int], allowed: set[int]) -> bool:
        """One newest-possible incarnation, or concurrent creates merged into one table
        (one of them newest-possible, none surely dropped, none missing that surely
        followed every drop)."""
        if len(markers) == 1:
            return markers <= allowed
        may, must = self.merged_tables(*key)
        return bool(markers & allowed) and markers <= may and must <= markers

    def check_rows(self, incarnations: int | set[int],
                   rows: list[dict[str, Any]]) -> list[str]:
        """Differences between one node's rows of a table and the allowed ones: the
        merge of the writes to its incarnations (several when creates merged)."""
        problems: list[str] = []
        numbers = sorted({incarnations} if isinstance(incarnations, int) else incarnations)
        incs = [self.incarnations[n] for n in numbers]
        inc = incs[0]
        where = f"{inc.table[0]}.{inc.table[1]} ({'+'.join(f'inc{n}' for n in numbers)})"
        keys: dict[Any, list[Op]] = {}
        for one in incs:
            for rid, ops_of in one.keys.items():
                keys.setdefault(rid, []).extend(ops_of)
        found = {row["id"]: row for row in rows}
        for rid in sorted(set(found) | set(keys), key=repr):
            ops = keys.get(rid, [])
            absent_ok, puts = self.allowed(ops)
            history = "; ".join(op.describe() for op in ops) or "none"
            row = found.get(rid)
            if row is None:
                if not absent_ok:
                    problems.append(f"{where} id={rid!r}: missing; expected one of "
                                    f"{[op.label for op in puts]}; history: {history}")
            elif not any(_matches(row, op) for op in puts):
                problems.append(f"{where} id={rid!r}: holds {_short(row)}; allowed: "
                                + ("absent, " if absent_ok else "")
                                + f"{[op.label for op in puts]}; history: {history}")
        return problems


def _matches(row: dict[str, Any], op: Op) -> bool:
    assert op.record is not None
    shown = {k: v for k, v in row.items() if k not in UNPREDICTED and k != "__updatedtime__"}
    if shown != op.record:
        return False
    return not op.exact or row.get("__updatedtime__") == op.lo


def _short(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in UNPREDICTED}, sort_keys=True)


__all__ = ["INF", "MARKER", "Incarnation", "Model", "Op", "SchemaEvent", "markers_of",
           "possible_winners"]
