"""Reference model for the randomized lifecycle test (pure Python, no I/O).

It records what the test was told (acknowledged operations) and what it may only
suspect (writes in flight when a node died, requests that failed), and computes, for
every key, the set of final states last-writer-wins allows.

Versions: a write's version is known exactly when the test read its own value back
(``__updatedtime__`` = version / 65536, a float that may merge versions a few counter
steps apart, so equal floats count as a tie and either side may win). A delete's
version is only known to lie in an interval: above the version of what it deleted
(and of every earlier version the node issued), below a probe write made on the same
node right after it. An operation ``X`` can be the final state of its key iff no
acknowledged operation ``Y`` is surely newer: ``lo(Y) <= hi(X)`` for every such ``Y``.

Schema (SPEC.md, the drop rule): every create of a table makes a new incarnation;
writes belong to the incarnation the writing node had; only writes to the final
incarnation survive, and a table exists iff its newest create/drop is a create. The
generator only changes schema while every link is up and waits until every node shows
the change, so the incarnation of each later write is the model's current one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

INF = math.inf
# Attributes the model does not predict (kept from whatever the writing node had).
UNPREDICTED = ("__createdtime__",)

TableKey = tuple[str, str]  # (database, table)


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

    def describe(self) -> str:
        rng = f"v={self.lo!r}" if self.exact else f"v in [{self.lo!r}, {self.hi!r}]"
        state = "acked" if self.acked else "unacked"
        what = "delete" if self.kind == "delete" else f"put {self.record}"
        return f"{self.label}: {what} ({rng}, {state})"


@dataclass
class Incarnation:
    """One create of a table and the writes made to it, per primary key."""

    number: int
    keys: dict[Any, list[Op]] = field(default_factory=dict)


class Model:
    """Schema events and data operations, in acknowledgement order."""

    def __init__(self) -> None:
        self.databases: set[str] = set()
        self.current: dict[TableKey, Incarnation] = {}  # tables that exist now
        self._numbers = 0

    # -- schema ----------------------------------------------------------------------
    def create_database(self, db: str) -> None:
        self.databases.add(db)

    def drop_database(self, db: str) -> None:
        self.databases.discard(db)
        for key in [k for k in self.current if k[0] == db]:
            del self.current[key]

    def create_table(self, db: str, table: str) -> None:
        self.databases.add(db)
        self._numbers += 1
        self.current[(db, table)] = Incarnation(self._numbers)

    def drop_table(self, db: str, table: str) -> None:
        self.current.pop((db, table), None)

    def tables(self) -> list[TableKey]:
        return sorted(self.current)

    # -- data ------------------------------------------------------------------------
    def history(self, db: str, table: str, rid: Any) -> list[Op]:
        return self.current[(db, table)].keys.setdefault(rid, [])

    def add(self, db: str, table: str, rid: Any, op: Op) -> Op:
        self.history(db, table, rid).append(op)
        return op

    def delete_bound(self, db: str, table: str, rid: Any) -> float:
        """An upper bound for a delete that superseded a write read back as absent."""
        deletes = [op.hi for op in self.history(db, table, rid) if op.kind == "delete"]
        return max(deletes) if deletes else INF

    # -- outcomes --------------------------------------------------------------------
    @staticmethod
    def possible_winners(ops: list[Op]) -> list[Op]:
        """The operations that may be the newest of a key's history."""
        winners = []
        for x in ops:
            if all(y is x or not y.acked or y.lo <= x.hi for y in ops):
                winners.append(x)
        return winners

    def allowed(self, ops: list[Op]) -> tuple[bool, list[Op]]:
        """(absent allowed, puts that may be the final value) for one key."""
        winners = self.possible_winners(ops)
        absent = (not any(op.acked for op in ops)
                  or any(op.kind == "delete" for op in winners))
        return absent, [op for op in winners if op.kind == "put"]

    def check_table(self, db: str, table: str,
                    rows: list[dict[str, Any]]) -> list[str]:
        """Differences between one node's rows of a table and the allowed outcomes."""
        problems: list[str] = []
        inc = self.current[(db, table)]
        found = {row["id"]: row for row in rows}
        for rid in sorted(set(found) | set(inc.keys), key=repr):
            ops = inc.keys.get(rid, [])
            absent_ok, puts = self.allowed(ops)
            row = found.get(rid)
            if row is None:
                if not absent_ok:
                    problems.append(f"{db}.{table} id={rid!r}: missing; expected one of "
                                    f"{[op.label for op in puts]}; history: "
                                    + "; ".join(op.describe() for op in ops))
                continue
            if not any(_matches(row, op) for op in puts):
                problems.append(f"{db}.{table} id={rid!r}: holds {_short(row)}; allowed: "
                                + ("absent, " if absent_ok else "")
                                + f"{[op.label for op in puts]}; history: "
                                + ("; ".join(op.describe() for op in ops) or "none"))
        return problems


def _matches(row: dict[str, Any], op: Op) -> bool:
    assert op.record is not None
    shown = {k: v for k, v in row.items() if k not in UNPREDICTED and k != "__updatedtime__"}
    if shown != op.record:
        return False
    return not op.exact or row.get("__updatedtime__") == op.lo


def _short(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in UNPREDICTED}, sort_keys=True)


__all__ = ["INF", "Incarnation", "Model", "Op"]
