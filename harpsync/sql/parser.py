"""SQL text to a statement plan; the only module that imports sqlglot.

sqlglot parses (MySQL dialect: backtick identifiers, ``VALUE``/``VALUES``, ``LIMIT
o, n``); this module keeps the subset harpsync runs and turns it into the plain objects
of :mod:`harpsync.sql.expr` and :mod:`harpsync.sql.plan`. Everything else is a
``BadRequestError`` that names the clause, function or expression.
"""

from __future__ import annotations

from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

from harpsync.errors import BadRequestError
from harpsync.sql.expr import (
    Agg,
    And,
    Arith,
    Between,
    Cmp,
    Col,
    Expr,
    InList,
    IsNull,
    Like,
    Lit,
    Neg,
    Not,
    Or,
    contains_agg,
    in_range,
)
from harpsync.sql.plan import Delete, Insert, Select, SelectItem, Statement, TableRef, Update

DEFAULT_DATABASE = "data"
MAX_SQL = 1_000_000
_CLIP = 60

_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=",
}
_ARITHMETIC: dict[type[exp.Expression], str] = {
    exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.Mod: "%",
}
_AGGREGATES: dict[type[exp.Expression], str] = {
    exp.Count: "count", exp.Min: "min", exp.Max: "max", exp.Sum: "sum", exp.Avg: "avg",
}
# Clauses each statement may carry; any other clause that is set is refused by name.
_SELECT_CLAUSES = {"expressions", "from", "from_", "where", "group", "order", "limit",
                   "offset", "distinct"}
_INSERT_CLAUSES = {"this", "expression"}
_UPDATE_CLAUSES = {"this", "expressions", "where"}
_DELETE_CLAUSES = {"this", "where"}
_CLAUSE_NAMES = {"with_": "WITH", "with": "WITH", "having": "HAVING", "joins": "JOIN",
                 "locks": "FOR UPDATE", "conflict": "ON DUPLICATE KEY / ON CONFLICT",
                 "returning": "RETURNING", "qualify": "QUALIFY", "windows": "WINDOW",
                 "laterals": "LATERAL", "pivots": "PIVOT", "kind": "SELECT modifiers",
                 "using": "USING", "from": "FROM", "from_": "FROM"}


def _clip(text: str) -> str:
    return text if len(text) <= _CLIP else text[:_CLIP] + "..."


def _unsupported(what: str) -> BadRequestError:
    return BadRequestError(f"SQL {what} is not supported")


def parse(text: str) -> Statement:
    """Parse one statement.

    Raises:
        BadRequestError: a syntax error (with line and column), more than one
            statement, or anything outside the supported subset, named.
    """
    if not text.strip():
        raise BadRequestError("'sql' must not be empty")
    if len(text) > MAX_SQL:
        raise BadRequestError(f"'sql' is longer than {MAX_SQL} characters")
    try:
        statements = [s for s in sqlglot.parse(text, read="mysql") if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        detail = str(first.get("description") or "invalid statement")
        raise BadRequestError(f"SQL syntax error{where}: {_clip(detail)}") from None
    except (SqlglotError, RecursionError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid statement"
        raise BadRequestError(f"SQL syntax error: {_clip(message)}") from None
    if not statements:
        raise BadRequestError("'sql' holds no statement")
    if len(statements) > 1:
        raise BadRequestError("'sql' must hold exactly one statement")
    statement = statements[0]
    if not isinstance(statement, exp.Expression):
        raise BadRequestError(f"SQL statement not understood: '{_clip(text.strip())}'")
    try:
        return _statement(statement)
    except RecursionError:
        raise BadRequestError("SQL statement is nested too deeply") from None
    except (AttributeError, KeyError, TypeError, ValueError):
        # A shape of syntax tree this module does not know: still the client's input.
        raise BadRequestError(f"SQL statement not understood: '{_clip(text.strip())}'",
                              ) from None


def _statement(node: exp.Expression) -> Statement:
    if isinstance(node, exp.Select):
        return _select(node)
    if isinstance(node, exp.Insert):
        return _insert(node)
    if isinstance(node, exp.Update):
        return _update(node)
    if isinstance(node, exp.Delete):
        return _delete(node)
    if isinstance(node, exp.SetOperation):
        raise _unsupported(type(node).__name__.upper())
    if isinstance(node, exp.Condition | exp.Alias):  # an expression, not a statement
        raise BadRequestError(f"SQL syntax error: '{_clip(node.sql())}' is not a statement")
    kind = node.key.upper() if node.key else type(node).__name__
    raise BadRequestError(f"SQL statement {kind} is not supported: use SELECT, INSERT, "
                          "UPDATE or DELETE (schema changes have their own operations)")


def _check_clauses(node: exp.Expression, allowed: set[str], statement: str) -> None:
    for key, value in node.args.items():
        if key in allowed or value is None or value is False or value == []:
            continue
        name = _CLAUSE_NAMES.get(key, key.rstrip("_").upper())
        raise _unsupported(f"{name} in {statement}")


class _Scope:
    """The one table a statement reads: column qualifiers must name it or its alias."""

    def __init__(self, node: exp.Expression) -> None:
        if not isinstance(node, exp.Table):
            if isinstance(node, exp.Subquery):
                raise _unsupported("sub-SELECT")
            raise BadRequestError(f"SQL: expected a table name as database.table, got "
                                  f"'{_clip(node.sql())}'")
        if node.args.get("catalog"):
            raise BadRequestError(f"SQL: table name '{_clip(node.sql())}' has too many "
                                  "parts; use database.table")
        if not isinstance(node.this, exp.Identifier):
            raise BadRequestError(f"SQL: expected a table name, got '{_clip(node.sql())}'")
        self.ref = TableRef(node.db or DEFAULT_DATABASE, node.name)
        self.names = {node.name}
        if node.alias:
            self.names.add(node.alias)
        self.aggregates: list[Agg] = []

    def column(self, node: exp.Column) -> Col:
        if node.table and node.table not in self.names:
            raise BadRequestError(f"SQL: column '{_clip(node.sql())}' names table "
                                  f"'{node.table}', which is not in FROM")
        if node.args.get("db"):
            raise BadRequestError(f"SQL: column '{_clip(node.sql())}' has too many parts")
        return Col(node.name)


def _literal(node: exp.Literal) -> Any:
    if node.is_string:
        return node.this
    text = str(node.this)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)  # also an integer past Python's digit limit (infinity)
    except ValueError:
        raise BadRequestError(f"SQL: '{_clip(text)}' is not a number") from None
    return in_range(value, f"the number {_clip(text)}")


def _expr(node: exp.Expression, scope: _Scope, aggregates: bool = False) -> Expr:
    """Convert one sqlglot expression; aggregates only where ``aggregates`` allows."""
    converted = _convert(node, scope, aggregates)
    # sqlglot marks some negations on the node itself (``a NOT LIKE b``).
    return Not(converted) if node.args.get("negate") else converted


def _convert(node: exp.Expression, scope: _Scope, aggregates: bool) -> Expr:
    if isinstance(node, exp.Paren):
        return _expr(node.this, scope, aggregates)
    if isinstance(node, exp.Column):
        if isinstance(node.this, exp.Star):
            raise _unsupported(f"'{_clip(node.sql())}' here")
        return scope.column(node)
    if isinstance(node, exp.Literal):
        return Lit(_literal(node))
    if isinstance(node, exp.Boolean):
        return Lit(bool(node.this))
    if isinstance(node, exp.Null):
        return Lit(None)
    if isinstance(node, exp.Neg):
        return Neg(_expr(node.this, scope, aggregates))
    op = _COMPARISONS.get(type(node))
    if op is not None:
        return Cmp(op, _expr(node.this, scope, aggregates),
                   _expr(node.expression, scope, aggregates))
    op = _ARITHMETIC.get(type(node))
    if op is not None:
        return Arith(op, _expr(node.this, scope, aggregates),
                     _expr(node.expression, scope, aggregates))
    if isinstance(node, exp.And | exp.Or):
        items = tuple(_expr(n, scope, aggregates) for n in _flatten(node, type(node)))
        return And(items) if isinstance(node, exp.And) else Or(items)
    if isinstance(node, exp.Not):
        return Not(_expr(node.this, scope, aggregates))
    if isinstance(node, exp.Is):
        if isinstance(node.expression, exp.Null):
            return IsNull(_expr(node.this, scope, aggregates))
        raise _unsupported(f"'IS {_clip(node.expression.sql())}' (only IS [NOT] NULL)")
    if isinstance(node, exp.In):
        if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
            raise _unsupported("sub-SELECT in IN")
        return InList(_expr(node.this, scope, aggregates),
                      tuple(_expr(v, scope, aggregates) for v in node.expressions))
    if isinstance(node, exp.Like | exp.ILike):
        if node.args.get("escape"):
            raise _unsupported("LIKE ... ESCAPE")
        return Like(_expr(node.this, scope, aggregates),
                    _expr(node.expression, scope, aggregates))
    if isinstance(node, exp.Escape):
        raise _unsupported("LIKE ... ESCAPE")
    if isinstance(node, exp.Between):
        return Between(_expr(node.this, scope, aggregates),
                       _expr(node.args["low"], scope, aggregates),
                       _expr(node.args["high"], scope, aggregates))
    func = _AGGREGATES.get(type(node))
    if func is not None:
        return _aggregate(node, func, scope, aggregates)
    if isinstance(node, exp.Subquery | exp.Select | exp.Exists):
        raise _unsupported("sub-SELECT")
    if isinstance(node, exp.Func):
        name = node.sql_name() if hasattr(node, "sql_name") else type(node).__name__
        if isinstance(node, exp.Anonymous):
            name = str(node.this)
        raise BadRequestError(f"SQL function {_clip(name.upper())}() is not supported "
                              "(supported: COUNT, MIN, MAX, SUM, AVG)")
    raise _unsupported(f"expression '{_clip(node.sql())}'")


def _flatten(node: exp.Expression, kind: type[exp.Expression]) -> list[exp.Expression]:
    """The operands of a chain of one operator, iteratively (long AND/OR chains)."""
    out: list[exp.Expression] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, kind):
            stack.append(item.expression)
            stack.append(item.this)
        else:
            out.append(item)
    return out


def _aggregate(node: exp.Expression, func: str, scope: _Scope, allowed: bool) -> Agg:
    if not allowed:
        raise BadRequestError(f"SQL: aggregate {func.upper()}() is allowed only in the "
                              "SELECT list and ORDER BY")
    arg = node.this
    distinct = False
    if isinstance(arg, exp.Distinct):
        values = arg.expressions
        if len(values) != 1:
            raise _unsupported(f"{func.upper()}(DISTINCT ...) of several values")
        arg, distinct = values[0], True
    if node.expressions:
        raise BadRequestError(f"SQL: {func.upper()}() takes one argument")
    if isinstance(arg, exp.Star):
        if func != "count":
            raise BadRequestError(f"SQL: {func.upper()}(*) is not valid; only COUNT(*)")
        inner: Expr | None = None
    elif arg is None:
        raise BadRequestError(f"SQL: {func.upper()}() needs an argument")
    else:
        inner = _expr(arg, scope, aggregates=False)
    agg = Agg(func, inner, distinct, f"\x00agg{len(scope.aggregates)}")
    scope.aggregates.append(agg)
    return agg


def _count(node: exp.Expression | None, what: str) -> int | None:
    if node is None:
        return None
    value = node.expression if isinstance(node, exp.Limit | exp.Offset) else node
    if isinstance(value, exp.Literal) and not value.is_string:
        number = _literal(value)
        if isinstance(number, int) and number >= 0:
            return number
    raise BadRequestError(f"SQL: {what} must be a non-negative integer")


def _select(node: exp.Select) -> Select:
    _check_clauses(node, _SELECT_CLAUSES, "SELECT")
    source = node.args.get("from") or node.args.get("from_")
    if source is None:
        raise BadRequestError("SQL: SELECT needs FROM database.table")
    scope = _Scope(source.this)
    distinct = node.args.get("distinct")
    if distinct is not None and distinct.args.get("on"):
        raise _unsupported("DISTINCT ON")
    items: list[SelectItem] = []
    for item in node.expressions:
        alias = item.alias if isinstance(item, exp.Alias) else None
        inner = item.this if isinstance(item, exp.Alias) else item
        if isinstance(inner, exp.Star) or (isinstance(inner, exp.Column)
                                           and isinstance(inner.this, exp.Star)):
            if isinstance(inner, exp.Column) and inner.table not in scope.names:
                raise BadRequestError(f"SQL: '{_clip(inner.sql())}' names table "
                                      f"'{inner.table}', which is not in FROM")
            items.append(SelectItem(None, "*"))
            continue
        expr = _expr(inner, scope, aggregates=True)
        # Written back in the dialect it was read in: the default dialect would show
        # MySQL's safe division as ``age / NULLIF(2, 0)``.
        name = alias or (inner.name if isinstance(inner, exp.Column)
                         else inner.sql(dialect="mysql"))
        items.append(SelectItem(expr, name))
    where = node.args.get("where")
    group = node.args.get("group")
    order = node.args.get("order")
    plan = Select(table=scope.ref, items=items,
                  where=_expr(where.this, scope) if where is not None else None,
                  group_by=[_expr(g, scope) for g in group.expressions] if group else [],
                  distinct=distinct is not None)
    if group is not None and any(group.args.get(k) for k in ("rollup", "cube",
                                                                 "grouping_sets")):
        raise _unsupported("ROLLUP / CUBE / GROUPING SETS")
    if order is not None:
        for term in order.expressions:
            expr = _expr(term.this, scope, aggregates=True)
            if isinstance(expr, Lit) and type(expr.value) is int:
                _check_position(expr.value, items)
            plan.order.append((expr, bool(term.args.get("desc"))))
    plan.limit = _count(node.args.get("limit"), "LIMIT")
    plan.offset = _count(node.args.get("offset"), "OFFSET") or 0
    plan.aggregates = scope.aggregates
    if plan.grouped:
        for item in items:
            if item.expr is None:
                raise BadRequestError("SQL: SELECT * cannot be combined with GROUP BY or "
                                      "aggregates; name the columns")
    elif any(contains_agg(e) for e, _ in plan.order):
        raise BadRequestError("SQL: ORDER BY an aggregate needs aggregates in the SELECT")
    return plan


def _check_position(position: int, items: list[SelectItem]) -> None:
    """``ORDER BY n`` names the n-th output column: a number past the list, or a ``*``,
    would sort by a constant, leaving the rows silently unsorted."""
    if not 1 <= position <= len(items):
        raise BadRequestError(f"SQL: ORDER BY {position} is not a position in the SELECT "
                              f"list (1 to {len(items)})")
    if items[position - 1].expr is None:
        raise BadRequestError(f"SQL: ORDER BY {position} names '*'; name the column")


def _target(node: exp.Expression | None) -> _Scope:
    if node is None:
        raise BadRequestError("SQL: the statement names no table")
    return _Scope(node)


def _constant(node: exp.Expression, scope: _Scope, where: str) -> Any:
    expr = _expr(node, scope)
    if _has_column(expr):
        raise BadRequestError(f"SQL: {where} must be constants, got '{_clip(node.sql())}'")
    return expr.eval({})


def _has_column(expr: Expr) -> bool:
    if isinstance(expr, Col):
        return True
    for value in vars(expr).values():
        if isinstance(value, Expr) and _has_column(value):
            return True
        if isinstance(value, tuple) and any(isinstance(v, Expr) and _has_column(v)
                                            for v in value):
            return True
    return False


def _insert(node: exp.Insert) -> Insert:
    _check_clauses(node, _INSERT_CLAUSES, "INSERT")
    target = node.this
    if not isinstance(target, exp.Schema):
        raise BadRequestError("SQL: INSERT needs a column list: INSERT INTO db.table "
                              "(col, ...) VALUES (...)")
    scope = _target(target.this)
    columns = [c.name for c in target.expressions]
    if len(set(columns)) != len(columns):
        raise BadRequestError("SQL: INSERT names a column twice")
    values = node.expression
    if not isinstance(values, exp.Values):
        raise _unsupported("INSERT ... SELECT (use VALUES)")
    rows: list[list[Any]] = []
    for number, row in enumerate(values.expressions, start=1):
        cells = row.expressions if isinstance(row, exp.Tuple) else [row]
        if len(cells) != len(columns):
            raise BadRequestError(f"SQL: VALUES row {number} has {len(cells)} values for "
                                  f"{len(columns)} columns")
        rows.append([_constant(c, scope, "INSERT values") for c in cells])
    return Insert(scope.ref, columns, rows)


def _update(node: exp.Update) -> Update:
    _check_clauses(node, _UPDATE_CLAUSES, "UPDATE")
    scope = _target(node.this)
    assignments: list[tuple[str, Expr]] = []
    for item in node.expressions:
        if not isinstance(item, exp.EQ) or not isinstance(item.this, exp.Column):
            raise BadRequestError(f"SQL: expected column = value in SET, got "
                                  f"'{_clip(item.sql())}'")
        column = scope.column(item.this).name
        if any(name == column for name, _ in assignments):
            raise BadRequestError(f"SQL: UPDATE sets '{column}' twice")
        assignments.append((column, _expr(item.expression, scope)))
    where = node.args.get("where")
    return Update(scope.ref, assignments, _expr(where.this, scope) if where else None)


def _delete(node: exp.Delete) -> Delete:
    _check_clauses(node, _DELETE_CLAUSES, "DELETE")
    scope = _target(node.this)
    where = node.args.get("where")
    return Delete(scope.ref, _expr(where.this, scope) if where else None)
