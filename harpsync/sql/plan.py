"""Parsed statements and how a SELECT runs over a stream of records.

Nothing here touches storage: the caller hands ``run_select`` the records (found by key
when ``key_lookup`` names the ids, or a scan otherwise) and the table's attributes.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from harpsync.query import page_bounds
from harpsync.sql.expr import (
    Agg,
    And,
    Cmp,
    Col,
    Expr,
    InList,
    Lit,
    Or,
    Row,
    in_range,
    sort_key,
    truth,
    value_token,
)


@dataclass(frozen=True)
class TableRef:
    database: str
    table: str


@dataclass(frozen=True)
class SelectItem:
    """One output column: ``expr`` named ``name``; ``expr`` None is ``*``."""

    expr: Expr | None
    name: str


@dataclass
class Select:
    table: TableRef
    items: list[SelectItem]
    where: Expr | None = None
    group_by: list[Expr] = field(default_factory=list)
    order: list[tuple[Expr, bool]] = field(default_factory=list)  # (expression, descending)
    limit: int | None = None
    offset: int = 0
    distinct: bool = False
    aggregates: list[Agg] = field(default_factory=list)

    @property
    def grouped(self) -> bool:
        return bool(self.aggregates or self.group_by)


@dataclass
class Insert:
    table: TableRef
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Update:
    table: TableRef
    assignments: list[tuple[str, Expr]]
    where: Expr | None = None


@dataclass
class Delete:
    table: TableRef
    where: Expr | None = None


Statement = Select | Insert | Update | Delete


# -- key lookups ----------------------------------------------------------------------
def key_lookup(where: Expr | None, primary_key: str) -> list[Any] | None:
    """The primary-key values that can match ``where``, or None when a scan is needed.

    ``pk = v`` and ``pk IN (...)`` name their ids; an ``AND`` is bounded by any of its
    parts that names ids; an ``OR`` only when every branch does.
    """
    if isinstance(where, Cmp) and where.op == "=":
        for a, b in ((where.left, where.right), (where.right, where.left)):
            if isinstance(a, Col) and a.name == primary_key and isinstance(b, Lit):
                return [] if b.value is None else [b.value]
        return None
    if isinstance(where, InList):
        if isinstance(where.item, Col) and where.item.name == primary_key and all(
                isinstance(v, Lit) for v in where.values):
            return _unique(v.value for v in where.values if isinstance(v, Lit)
                           and v.value is not None)
        return None
    if isinstance(where, And):
        for item in where.items:
            ids = key_lookup(item, primary_key)
            if ids is not None:
                return ids
        return None
    if isinstance(where, Or):
        found: list[Any] = []
        for item in where.items:
            ids = key_lookup(item, primary_key)
            if ids is None:
                return None
            found.extend(ids)
        return _unique(found)
    return None


def _unique(values: Iterable[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for value in values:
        token = value_token(value)
        if token not in seen:
            seen.add(token)
            out.append(value)
    return out


def matches(where: Expr | None, row: Row) -> bool:
    return where is None or truth(where.eval(row)) is True


# -- aggregation ------------------------------------------------------------------------
class _Accumulator:
    """One aggregate over one group, in constant memory (except COUNT DISTINCT)."""

    def __init__(self, agg: Agg) -> None:
        self.agg = agg
        self.count = 0
        self.total: float = 0
        self.numbers = 0
        self.best: Any = None
        self.seen: set[str] | None = set() if agg.distinct else None

    def add(self, row: Row) -> None:
        agg = self.agg
        if agg.arg is None:
            self.count += 1
            return
        value = agg.arg.eval(row)
        if value is None:
            return
        if self.seen is not None:
            token = value_token(value)
            if token in self.seen:
                return
            self.seen.add(token)
        self.count += 1
        if agg.func in ("sum", "avg"):
            if isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    self.total += value
                except OverflowError:  # a huge integer added to a float
                    self.total = math.inf
                self.numbers += 1
        elif agg.func == "min":
            if self.best is None or sort_key(value) < sort_key(self.best):
                self.best = value
        elif agg.func == "max":
            if self.best is None or sort_key(value) > sort_key(self.best):
                self.best = value

    def result(self) -> Any:
        func = self.agg.func
        if func == "count":
            return self.count
        if func in ("sum", "avg") and self.numbers:
            total = in_range(self.total, f"{func.upper()}()")
            if func == "sum":
                return total
            try:
                return total / self.numbers
            except OverflowError:  # an integer total beyond a float
                return in_range(math.inf, "AVG()")
        if func in ("sum", "avg"):
            return None
        return self.best


def _group(plan: Select, rows: Iterable[Row]) -> Iterator[Row]:
    """One row per group: the group's first record plus each aggregate in its slot."""
    groups: dict[str, tuple[Row, list[_Accumulator]]] = {}
    for row in rows:
        token = value_token([g.eval(row) for g in plan.group_by])
        group = groups.get(token)
        if group is None:
            group = groups[token] = (row, [_Accumulator(a) for a in plan.aggregates])
        for acc in group[1]:
            acc.add(row)
    if not groups and not plan.group_by:  # aggregates over no rows: one row (COUNT 0)
        groups[""] = ({}, [_Accumulator(a) for a in plan.aggregates])
    for first, accs in groups.values():
        out = dict(first)
        for acc in accs:
            out[acc.agg.slot] = acc.result()
        yield out


# -- ordering and projection ------------------------------------------------------------
def _order_exprs(plan: Select) -> list[tuple[Expr, bool]]:
    """ORDER BY terms, with output aliases and positions (``ORDER BY 2``) resolved."""
    by_name = {item.name: item.expr for item in plan.items if item.expr is not None}
    out = []
    for expr, desc in plan.order:
        if isinstance(expr, Col) and expr.name in by_name and not _is_plain_col(
                by_name[expr.name], expr.name):
            expr = by_name[expr.name]
        elif isinstance(expr, Lit) and isinstance(expr.value, int) and not isinstance(
                expr.value, bool) and 1 <= expr.value <= len(plan.items):
            target = plan.items[expr.value - 1].expr
            if target is not None:
                expr = target
        out.append((expr, desc))
    return out


def _is_plain_col(expr: Expr | None, name: str) -> bool:
    return isinstance(expr, Col) and expr.name == name


def _comparator(terms: list[tuple[Expr, bool]]) -> Any:
    def compare(a: Row, b: Row) -> int:
        for expr, desc in terms:
            ka, kb = sort_key(expr.eval(a)), sort_key(expr.eval(b))
            if ka != kb:
                less = ka < kb
                return (1 if less else -1) if desc else (-1 if less else 1)
        return 0

    return functools.cmp_to_key(compare)


def project(plan: Select, row: Row, known: list[str]) -> Row:
    """The output row: ``*`` is every known attribute (null where the record lacks it)."""
    out: Row = {}
    for item in plan.items:
        if item.expr is None:
            out.update(row)
            for name in known:
                out.setdefault(name, None)
        else:
            out[item.name] = item.expr.eval(row)
    return out


def run_select(plan: Select, records: Iterable[Row], known: list[str]) -> list[Row]:
    """Filter, group and aggregate, order, page and project ``records``.

    Without ORDER BY rows stream; with ORDER BY and LIMIT only ``offset + limit`` rows
    are kept at a time.
    """
    rows: Iterable[Row] = (r for r in records if matches(plan.where, r))
    if plan.grouped:
        rows = _group(plan, rows)
    terms = _order_exprs(plan)
    start, stop = page_bounds(plan.offset, plan.limit)
    if plan.distinct:
        if terms:
            rows = sorted(rows, key=_comparator(terms))
        distinct = _distinct(project(plan, r, known) for r in rows)
        return list(islice(distinct, start, stop))
    if terms:
        key = _comparator(terms)
        rows = heapq.nsmallest(stop, rows, key=key) if stop is not None else sorted(
            rows, key=key)
    return [project(plan, r, known) for r in islice(rows, start, stop)]


def _distinct(rows: Iterable[Row]) -> Iterator[Row]:
    seen: set[str] = set()
    for row in rows:
        token = value_token(row)
        if token not in seen:
            seen.add(token)
            yield row
