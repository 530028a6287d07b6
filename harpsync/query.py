"""Pure query logic: comparators, wildcard matching, projection, sort and paging."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from itertools import islice
from typing import Any

from harpsync.errors import BadRequestError

Predicate = Callable[[dict[str, Any]], bool]


def _ordered(a: Any, b: Any) -> tuple[Any, Any] | None:
    """Both values if they can be compared with < (numbers with numbers, str with str)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a, b
    if isinstance(a, str) and isinstance(b, str):
        return a, b
    return None


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def check(value: Any, target: Any) -> bool:
        pair = _ordered(value, target)
        return pair is not None and op(*pair)

    return check


def _between(value: Any, target: Any) -> bool:
    low, high = target
    lo, hi = _ordered(value, low), _ordered(value, high)
    return lo is not None and hi is not None and low <= value <= high


def _equal(value: Any, target: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's ``True == 1`` is)."""
    if isinstance(value, bool) != isinstance(target, bool):
        return False
    return bool(value == target)


def _contains(value: Any, target: Any) -> bool:
    if isinstance(value, str):
        return str(target) in value
    if isinstance(value, list):
        return target in value
    return False


COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "equals": _equal,
    "not_equal": lambda v, t: not _equal(v, t),
    "contains": _contains,
    "starts_with": lambda v, t: isinstance(v, str) and v.startswith(str(t)),
    "ends_with": lambda v, t: isinstance(v, str) and v.endswith(str(t)),
    "greater_than": _cmp(lambda a, b: a > b),
    "greater_than_equal": _cmp(lambda a, b: a >= b),
    "less_than": _cmp(lambda a, b: a < b),
    "less_than_equal": _cmp(lambda a, b: a <= b),
    "between": _between,
}


@lru_cache(maxsize=256)
def _wildcard(pattern: str) -> Callable[[str], bool]:
    """A matcher for a pattern where ``*`` stands for any run of characters.

    No regular expression: a backtracking ``.*`` per star takes exponential time on
    patterns such as ``*a*a*a*a*a*a*c``. Here the pieces between stars are found left
    to right with ``str.find`` (taking the leftmost place for each piece is always
    right when the only wildcard is ``*``), so a match costs one pass over the value.
    """
    if "*" not in pattern:
        return pattern.__eq__
    first, *middle, last = pattern.split("*")
    pieces = [p for p in middle if p]
    minimum = len(first) + len(last) + sum(len(p) for p in pieces)

    def match(value: str) -> bool:
        if len(value) < minimum or not value.startswith(first) or not value.endswith(last):
            return False
        position, end = len(first), len(value) - len(last)
        for piece in pieces:
            found = value.find(piece, position, end)
            if found < 0:
                return False
            position = found + len(piece)
        return True

    return match


def wildcard_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` (``*`` = any run of characters)."""
    return _wildcard(pattern)(value)


def _condition(attribute: str, compare: Callable[[Any, Any], bool], target: Any) -> Predicate:
    return lambda r: attribute in r and compare(r[attribute], target)


def value_predicate(attribute: str, value: Any) -> Predicate:
    """``search_by_value``: equality, or ``*`` wildcards for strings."""
    if isinstance(value, str) and "*" in value:
        if value == "*":
            return lambda r: attribute in r
        match = _wildcard(value)
        return lambda r: isinstance(r.get(attribute), str) and match(r[attribute])
    return lambda r: attribute in r and _equal(r[attribute], value)


# How deep search_by_conditions groups may nest (each level is a few stack frames).
MAX_GROUP_DEPTH = 8
_LEGACY = {"search_attribute": "attribute", "search_type": "comparator",
           "search_value": "value"}


def conditions_predicate(operator: str, conditions: list[dict[str, Any]],
                         where: str = "conditions", depth: int = 1) -> Predicate:
    """``search_by_conditions``: ``and``/``or`` over comparator conditions. A condition
    holding ``conditions`` is a group with its own ``operator`` (Harper's grouped
    conditions). The schema types the fields of the top level only (a condition is
    either kind, which JSON Schema says only with a recursive or either-or schema, whose
    error messages are vague), so which fields each condition needs is checked here, at
    every level.

    Raises:
        BadRequestError: naming the condition (``'conditions[0].conditions[1].attribute'
            is required``).
    """
    checks: list[Predicate] = []
    for index, cond in enumerate(conditions):
        at = f"{where}[{index}]"
        cond = _checked(cond, at)
        if "conditions" in cond:
            if depth >= MAX_GROUP_DEPTH:
                raise BadRequestError(f"'{at}' nests groups deeper than {MAX_GROUP_DEPTH}")
            checks.append(conditions_predicate(cond.get("operator", "and"),
                                               cond["conditions"], f"{at}.conditions",
                                               depth + 1))
            continue
        comparator = cond["comparator"]
        compare = COMPARATORS.get(comparator)
        if compare is None:
            raise BadRequestError(f'Unknown query comparator "{comparator}"')
        target = cond.get("value")
        if comparator == "between" and not (isinstance(target, list) and len(target) == 2):
            raise BadRequestError(f"'{at}.value' must be an array of two values")
        attr = cond["attribute"]
        checks.append(_condition(attr, compare, target))
    if operator == "or":
        if len(checks) < 2:
            raise BadRequestError('An "or" operator requires at least two conditions')
        return lambda r: any(check(r) for check in checks)
    return lambda r: all(check(r) for check in checks)


def _checked(raw: Any, at: str) -> dict[str, Any]:
    """``raw`` with Harper's old names renamed (the dispatcher renames only the top
    level), checked: a group needs a non-empty ``conditions``, a condition its
    ``attribute``, ``comparator`` and ``value``."""
    if not isinstance(raw, dict):
        raise BadRequestError(f"'{at}' must be an object")
    fixed: dict[str, Any] = dict(raw)
    for old, new in _LEGACY.items():
        if old in fixed and new not in fixed:
            fixed[new] = fixed.pop(old)
    cond = fixed
    if "conditions" in cond:
        inner, operator = cond["conditions"], cond.get("operator", "and")
        if not isinstance(inner, list) or not inner:
            raise BadRequestError(f"'{at}.conditions' must be a non-empty array")
        if operator not in ("and", "or"):
            raise BadRequestError(f"'{at}.operator' must be one of: and, or")
        return cond
    for name in ("attribute", "comparator", "value"):
        if name not in cond:
            raise BadRequestError(f"'{at}.{name}' is required")
    if not isinstance(cond["attribute"], str) or not cond["attribute"]:
        raise BadRequestError(f"'{at}.attribute' must be a non-empty string")
    if not isinstance(cond["comparator"], str):
        raise BadRequestError(f"'{at}.comparator' must be a string")
    return cond


def project(record: dict[str, Any], attributes: list[str] | None,
            known: list[str] | None = None) -> dict[str, Any]:
    """Keep ``get_attributes``; ``["*"]`` (the default) keeps everything.

    With ``*``, each attribute in ``known`` that the record lacks comes back as null
    (Harper's shape); explicitly listed attributes are returned only where present.
    """
    if not attributes or "*" in attributes:
        if known:
            for name in known:  # a plain loop: any() over a generator costs twice as much
                if name not in record:
                    record = dict(record)
                    for missing in known:
                        record.setdefault(missing, None)
                    break
        return record
    return {a: record[a] for a in attributes if a in record}


def _sort_key(attribute: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    def key(record: dict[str, Any]) -> tuple[int, Any]:
        value = record.get(attribute)
        if value is None:
            return (0, 0)
        if isinstance(value, bool):
            return (1, int(value))
        if isinstance(value, int | float):
            return (2, value)
        return (3, str(value))

    return key


def sort_levels(sort: dict[str, Any]) -> list[dict[str, Any]]:
    """``sort`` and its chain of ``next`` (Harper's tie-breaks), each level checked as the
    schema checks the first (the schema does not recurse, so a chain costs no recursion).

    Raises:
        BadRequestError: a level without an attribute name, or with a ``descending`` or
            ``next`` of the wrong type, naming it (``'sort.next.attribute' is required``).
    """
    levels = []
    level: Any = sort
    path = "sort"
    while level is not None:
        if not isinstance(level, dict):
            raise BadRequestError(f"'{path}' must be an object")
        attribute = level.get("attribute")
        if attribute is None:
            raise BadRequestError(f"'{path}.attribute' is required")
        if not isinstance(attribute, str) or not attribute:
            raise BadRequestError(f"'{path}.attribute' must be a non-empty string")
        if not isinstance(level.get("descending", False), bool):
            raise BadRequestError(f"'{path}.descending' must be a boolean")
        levels.append(level)
        level = level.get("next")
        path += ".next"
    return levels


def select(records: Iterable[dict[str, Any]], predicate: Predicate,
           attributes: list[str] | None, sort: dict[str, Any] | None = None,
           offset: int = 0, limit: int | None = None,
           known: list[str] | None = None) -> list[dict[str, Any]]:
    """Filter, then sort (``sort.next`` breaks ties), page and project. Without
    ``sort`` it streams."""
    matched: Iterator[dict[str, Any]] = (r for r in records if predicate(r))
    if sort:
        levels = sort_levels(sort)
        ordered = list(matched)
        # Stable sorts, last tie-break first: ``next`` orders records the level above it
        # finds equal (``reverse`` keeps equal records in their order).
        for level in reversed(levels):
            ordered.sort(key=_sort_key(level["attribute"]),
                         reverse=bool(level.get("descending")))
        matched = iter(ordered)
    start, stop = page_bounds(offset, limit)
    return [project(r, attributes, known) for r in islice(matched, start, stop)]


def page_bounds(offset: int, limit: int | None) -> tuple[int, int | None]:
    """``islice`` bounds for ``offset`` and ``limit``, capped at ``sys.maxsize`` (which
    no table reaches), since ``islice`` refuses larger numbers."""
    start = min(offset, sys.maxsize)
    return start, None if limit is None else min(offset + limit, sys.maxsize)
