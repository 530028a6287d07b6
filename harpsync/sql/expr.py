"""SQL expressions over one record, with SQL's three-valued logic.

A condition evaluates to ``True``, ``False`` or ``None`` (unknown: a comparison with a
missing or null value). ``WHERE`` keeps a row only when its condition is ``True``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harpsync.errors import BadRequestError

Row = dict[str, Any]
# Numbers must stay within a double's range, as in Harper (JavaScript): an infinite float
# would be written as ``Infinity`` (not JSON) or stored, and an integer past it can
# overflow a conversion to float or grow beyond what a JSON encoder writes.
_MAX_INT_BITS = 1024


class Expr:
    """Base of every expression node."""

    def eval(self, row: Row) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Col(Expr):
    """A column; a record without it reads as null."""

    name: str

    def eval(self, row: Row) -> Any:
        return row.get(self.name)


@dataclass(frozen=True)
class Lit(Expr):
    value: Any

    def eval(self, row: Row) -> Any:
        return self.value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ordered(a: Any, b: Any) -> bool:
    """Whether ``a < b`` means something: numbers with numbers, text with text."""
    return (_number(a) and _number(b)) or (isinstance(a, str) and isinstance(b, str))


def equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's ``True == 1`` is)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


@dataclass(frozen=True)
class Cmp(Expr):
    """``=``, ``<>``, ``<``, ``<=``, ``>``, ``>=``."""

    op: str
    left: Expr
    right: Expr

    def eval(self, row: Row) -> bool | None:
        a, b = self.left.eval(row), self.right.eval(row)
        if a is None or b is None:
            return None
        if self.op == "=":
            return equal(a, b)
        if self.op == "<>":
            return not equal(a, b)
        return _ORDER_OPS[self.op](a, b) if _ordered(a, b) else False


@dataclass(frozen=True)
class And(Expr):
    items: tuple[Expr, ...]

    def eval(self, row: Row) -> bool | None:
        unknown = False
        for item in self.items:
            value = truth(item.eval(row))
            if value is False:
                return False
            if value is None:
                unknown = True
        return None if unknown else True


@dataclass(frozen=True)
class Or(Expr):
    items: tuple[Expr, ...]

    def eval(self, row: Row) -> bool | None:
        unknown = False
        for item in self.items:
            value = truth(item.eval(row))
            if value is True:
                return True
            if value is None:
                unknown = True
        return None if unknown else False


@dataclass(frozen=True)
class Not(Expr):
    item: Expr

    def eval(self, row: Row) -> bool | None:
        value = truth(self.item.eval(row))
        return None if value is None else not value


def truth(value: Any) -> bool | None:
    """A value used as a condition: null is unknown, otherwise its truthiness."""
    if value is None or isinstance(value, bool):
        return value
    return bool(value)


@dataclass(frozen=True)
class InList(Expr):
    item: Expr
    values: tuple[Expr, ...]

    def eval(self, row: Row) -> bool | None:
        value = self.item.eval(row)
        if value is None:
            return None
        unknown = False
        for candidate in self.values:
            target = candidate.eval(row)
            if target is None:
                unknown = True
            elif equal(value, target):
                return True
        return None if unknown else False


@dataclass(frozen=True)
class Between(Expr):
    item: Expr
    low: Expr
    high: Expr

    def eval(self, row: Row) -> bool | None:
        value, low, high = self.item.eval(row), self.low.eval(row), self.high.eval(row)
        if value is None or low is None or high is None:
            return None
        return _ordered(value, low) and _ordered(value, high) and low <= value <= high


@dataclass(frozen=True)
class IsNull(Expr):
    item: Expr

    def eval(self, row: Row) -> bool:
        return self.item.eval(row) is None


def _fits(piece: str, value: str, at: int) -> bool:
    """Whether ``piece`` (``_`` = any one character) matches ``value`` at ``at``."""
    if len(value) - at < len(piece):
        return False
    if "_" not in piece:
        return value.startswith(piece, at)
    return all(p == "_" or p == c for p, c in zip(piece, value[at:at + len(piece)],
                                                     strict=False))


def _finder(piece: str) -> Callable[[str, int, int], int]:
    """The leftmost place of ``piece`` in ``value[start:end]`` (-1 if none)."""
    if "_" not in piece:
        return lambda value, start, end: value.find(piece, start, end)
    regex = re.compile("".join("." if c == "_" else re.escape(c) for c in piece), re.DOTALL)

    def find(value: str, start: int, end: int) -> int:
        found = regex.search(value, start, end)
        return -1 if found is None else found.start()

    return find


@functools.lru_cache(maxsize=256)
def _like_pieces(pattern: str) -> tuple[str, list[tuple[str, Callable[[str, int, int], int]]],
                                        str] | None:
    """``pattern`` casefolded and split at ``%``: first piece, middle pieces with their
    finders, last piece; None when there is no ``%``."""
    parts = pattern.casefold().split("%")
    if len(parts) == 1:
        return None
    first, *middle, last = parts
    return first, [(p, _finder(p)) for p in middle if p], last


def like_match(pattern: str, value: str) -> bool:
    """SQL ``LIKE``: ``%`` any run, ``_`` one character, case-insensitive (as Harper).

    The pieces between ``%`` have fixed lengths, so taking the leftmost place of each,
    left to right, is always right: one pass with ``str.find`` (a regex search for a
    piece holding ``_``), never the ``len(pattern) * len(value)`` steps of backtracking.
    """
    v = value.casefold()
    pieces = _like_pieces(pattern)
    if pieces is None:
        p = pattern.casefold()
        return len(v) == len(p) and _fits(p, v, 0)
    first, middle, last = pieces
    end = len(v) - len(last)
    if end < len(first) or not _fits(first, v, 0) or not _fits(last, v, end):
        return False
    position = len(first)
    for piece, find in middle:
        found = find(v, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


@dataclass(frozen=True)
class Like(Expr):
    item: Expr
    pattern: Expr

    def eval(self, row: Row) -> bool | None:
        value, pattern = self.item.eval(row), self.pattern.eval(row)
        if value is None or pattern is None:
            return None
        if _number(value):
            value = str(value)
        if not isinstance(value, str) or not isinstance(pattern, str):
            return False
        return like_match(pattern, value)


def _divide(a: Any, b: Any) -> Any:
    return None if b == 0 else a / b


def _modulo(a: Any, b: Any) -> Any:
    return None if b == 0 else a % b


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _divide, "%": _modulo,
}


def in_range(value: Any, what: str) -> Any:
    """``value``, or a 400 if it is a number beyond a double's range (see above)."""
    if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, int) and value.bit_length() > _MAX_INT_BITS):
        raise BadRequestError(f"SQL: {what} is out of range")
    return value


@dataclass(frozen=True)
class Arith(Expr):
    """Arithmetic on numbers; anything else (or division by zero) gives null, and a
    result beyond a double's range is a 400."""

    op: str
    left: Expr
    right: Expr

    def eval(self, row: Row) -> Any:
        a, b = self.left.eval(row), self.right.eval(row)
        if not (_number(a) and _number(b)):
            return None
        try:
            result = _ARITH[self.op](a, b)
        except OverflowError:  # an integer too large to convert to float
            result = math.inf
        return in_range(result, f"the result of '{self.op}'")


@dataclass(frozen=True)
class Neg(Expr):
    item: Expr

    def eval(self, row: Row) -> Any:
        value = self.item.eval(row)
        return -value if _number(value) else None




@dataclass(frozen=True)
class Agg(Expr):
    """An aggregate; after grouping its result sits in the group row under ``slot``."""

    func: str
    arg: Expr | None  # None: COUNT(*)
    distinct: bool
    slot: str

    def eval(self, row: Row) -> Any:
        return row.get(self.slot)


def contains_agg(expr: Expr | None) -> bool:
    """Whether an aggregate appears anywhere in ``expr``."""
    if expr is None:
        return False
    if isinstance(expr, Agg):
        return True
    for value in vars(expr).values():
        if isinstance(value, Expr) and contains_agg(value):
            return True
        if isinstance(value, tuple) and any(isinstance(v, Expr) and contains_agg(v)
                                            for v in value):
            return True
    return False


def column_names(expr: Expr | None) -> set[str]:
    """The names of every column ``expr`` reads."""
    if expr is None:
        return set()
    if isinstance(expr, Col):
        return {expr.name}
    names: set[str] = set()
    for value in vars(expr).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Expr):
                names |= column_names(item)
    return names


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def value_token(value: Any) -> str:
    """A text that is the same for values ``=`` calls equal, for grouping and DISTINCT.

    ``1`` and ``1.0`` are one number (JSON, and Harper's JavaScript, have one number
    type), so they make one group; ``true`` and ``1``, or ``"1"`` and ``1``, do not.
    """
    return json.dumps(_canonical(value), sort_keys=True, default=str)


def sort_key(value: Any) -> tuple[int, Any]:
    """A total order over JSON values: null, booleans, numbers, text, then the rest."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, int(value))
    if _number(value):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    return (4, json.dumps(value, sort_keys=True, default=str))
