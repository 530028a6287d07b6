"""JSON Schema validation of operation bodies, with Harper-style error messages.

This is the only module that imports :mod:`jsonschema`.  Every ``schemas/<op>.json``
is loaded and compiled once into a :class:`SchemaRegistry`; :meth:`SchemaRegistry.validate`
then raises :class:`harpsync.errors.ValidationError` carrying one message that names the
offending field, for example ``'records' must be an array`` or
``'conditions[0].attribute' is required``.

Patterns follow ECMA-262 semantics for ``$``: it matches only at the very end of the
string (Python's ``re`` would also let ``$`` match before a trailing newline, which would
accept a table called ``"dog\\n"``).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources.abc import Traversable
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import (
    ValidationError as SchemaValidationError,
)
from jsonschema.exceptions import best_match

from harpsync.errors import ValidationError

NAME_PATTERN = "^[A-Za-z0-9_-]+$"
NAME_MAX_LENGTH = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_CLIP = 50
_JSON_TYPES = ("array", "object", "string", "boolean", "number", "integer")

_ARTICLES = {t: ("an " if t[0] in "aeio" else "a ") + t for t in _JSON_TYPES} | {"null": "null"}
_COMPARISONS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_PATTERN_TEXT = {
    NAME_PATTERN: "must contain only letters, digits, underscore and dash",
    "^\\S+$": "must not contain whitespace",
    "^wss?://\\S+$": "must be a ws:// or wss:// URL",
    "^wss?://[^\\s]+$": "must be a ws:// or wss:// URL",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}T": "must be an ISO 8601 date-time (YYYY-MM-DDThh:mm:ss)",
}
_OR_CONDITIONS = 'An "or" operator requires at least two conditions'


@functools.lru_cache(maxsize=256)
def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a schema pattern, making a final unescaped ``$`` mean end of string."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern_keyword(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[SchemaValidationError]:
    """The ``pattern`` keyword with ECMA end-of-string semantics and cached regexes."""
    if validator.is_type(instance, "string") and not _compile_pattern(pattern).search(instance):
        yield SchemaValidationError(f"{_clip(instance)!r} does not match {pattern!r}")


_ITEMS = Draft202012Validator.VALIDATORS["items"]


def _items_keyword(
    validator: Any, items: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[SchemaValidationError]:
    """``items`` with a fast path for ``{"type": ...}`` item schemas (e.g. 100k records)."""
    if (
        isinstance(items, dict)
        and items.keys() == {"type"}
        and validator.is_type(instance, "array")
    ):
        types = items["type"]
        types = [types] if isinstance(types, str) else types
        is_type = validator.is_type
        if all(any(is_type(item, t) for t in types) for item in instance):
            return
    yield from _ITEMS(validator, items, instance, schema)


# ``extend`` is untyped in types-jsonschema.
_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": _pattern_keyword, "items": _items_keyword}
)


def _inline_refs(node: Any, defs: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """Replace bare local ``{"$ref": "#/$defs/x"}`` by a copy of ``x`` (saves lookups per call).

    Recursive definitions and refs with sibling keywords are left for jsonschema to resolve.
    """
    if isinstance(node, list):
        return [_inline_refs(item, defs, stack) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and len(node) == 1 and ref.startswith("#/$defs/"):
        name = ref[len("#/$defs/") :]
        if name in defs and name not in stack:
            return _inline_refs(defs[name], defs, (*stack, name))
        return node
    return {key: _inline_refs(value, defs, stack) for key, value in node.items()}


def _clip(value: object, limit: int = _CLIP) -> str:
    """``str(value)`` cut to ``limit`` characters, so no user value of unbounded size leaks."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(path: Iterable[object]) -> str:
    """Render an instance path as ``conditions[0].attribute`` (empty path: ``body``)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _clip(part)
    return out or "body"


def _types(types: str | Sequence[str]) -> str:
    """``"string"`` → ``a string``; ``["string", "number"]`` → ``a string or a number``."""
    words = [_ARTICLES.get(t, t) for t in ([types] if isinstance(types, str) else types)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _required_alternatives(error: SchemaValidationError) -> list[str] | None:
    """Names of an ``anyOf`` or ``oneOf`` whose branches are each a bare ``required``,
    else None."""
    branches = error.validator_value
    if error.validator not in ("anyOf", "oneOf") or not isinstance(branches, list):
        return None
    names = []
    for branch in branches:
        if not (isinstance(branch, dict) and list(branch) == ["required"]):
            return None
        names.extend(branch["required"])
    return names


def message_for(error: SchemaValidationError) -> str:
    """Turn one jsonschema error into a single Harper-style message naming the field."""
    path = list(error.absolute_path)
    kw = error.validator
    value: Any = error.validator_value
    field = _field(path)
    if kw == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        missing = next((name for name in value if name not in present), value[0])
        return f"'{_field([*path, missing])}' is required"
    alternatives = _required_alternatives(error)
    if alternatives is not None:
        names = " or ".join(f"'{_field([*path, n])}'" for n in alternatives)
        present = error.instance if isinstance(error.instance, dict) else {}
        if kw == "oneOf" and sum(name in present for name in alternatives) > 1:
            return f"give only one of {names}"
        return f"{names} is required"
    if kw == "type":
        return f"'{field}' must be {_types(value)}"
    if kw == "pattern":
        text = _PATTERN_TEXT.get(value, f"must match the pattern {_clip(value)}")
        return f"'{field}' {text}"
    if kw == "enum" and _is_comparator(path) and isinstance(error.instance, str):
        # Harper's recorded answer to a comparator it does not know.
        return f'Unknown query comparator "{_clip(error.instance)}"'
    if kw == "enum":
        return f"'{field}' must be one of: " + ", ".join(_clip(v) for v in value)
    if kw == "const":
        return f"'{field}' must be {_clip(json.dumps(value))}"
    if kw == "minItems":
        if value == 2 and path[-1:] == ["conditions"] and "then" in error.schema_path:
            return _OR_CONDITIONS
        if value == 1:
            return f"'{field}' must not be empty"
        return f"'{field}' must contain at least {value} items"
    if kw == "maxItems":
        return f"'{field}' must contain at most {value} items"
    if kw == "minLength":
        if value == 1:
            return f"'{field}' must not be empty"
        return f"'{field}' must be at least {value} characters"
    if kw == "maxLength":
        return f"'{field}' must be at most {value} characters"
    if kw in _COMPARISONS:
        return f"'{field}' must be {_COMPARISONS[kw]} {value}"
    if kw in ("anyOf", "oneOf"):
        return f"'{field}' does not match any allowed form"
    return f"'{field}' is invalid: {_clip(error.message)}"


def _is_comparator(path: list[Any]) -> bool:
    """Whether ``path`` is ``conditions[i].comparator`` of search_by_conditions."""
    return len(path) == 3 and path[0] == "conditions" and path[2] == "comparator"


def validate_name(kind: str, value: object) -> str:
    """Check a database/table/attribute name of ``kind``; return it or raise ValidationError."""
    if not isinstance(value, str):
        raise ValidationError(f"'{kind}' must be a string")
    if not value:
        raise ValidationError(f"'{kind}' must not be empty")
    if len(value) > NAME_MAX_LENGTH:
        raise ValidationError(f"'{kind}' must be at most {NAME_MAX_LENGTH} characters")
    if not _NAME_RE.fullmatch(value):
        raise ValidationError(f"'{kind}' {_PATTERN_TEXT[NAME_PATTERN]}")
    return value


def _attribute_problem(name: str) -> str | None:
    if len(name) > NAME_MAX_LENGTH:  # before the cache, which keeps only short names
        return f"attribute name '{_clip(name)}' is longer than {NAME_MAX_LENGTH} characters"
    return _short_attribute_problem(name)


@functools.lru_cache(maxsize=4096)
def _short_attribute_problem(name: str) -> str | None:
    if not name:
        return "an attribute name must not be empty"
    if not _NAME_RE.fullmatch(name):
        return f"attribute name '{_clip(name)}' {_PATTERN_TEXT[NAME_PATTERN]}"
    return None


def check_attribute_names(names: Iterable[object], where: str) -> None:
    """Refuse attribute names that ``create_attribute`` would refuse.

    The one check for every path that learns attributes from client data: the keys of
    written records, the columns of SQL ``INSERT`` and ``UPDATE``, and CSV headers.
    Names follow the rule for database and table names (letters, digits, underscore,
    dash; at most ``NAME_MAX_LENGTH``), so every attribute can be named in a query.

    Raises:
        ValidationError: naming ``where`` and the first bad attribute.
    """
    for name in names:
        problem = (_attribute_problem(name) if isinstance(name, str)
                   else "an attribute name must be a string")
        if problem is not None:
            raise ValidationError(f"{where}: {problem}")


def record_attributes(records: Iterable[object]) -> list[str]:
    """The distinct top-level keys of the object records in ``records``, in the order
    they first appear (so the first bad one is the one reported)."""
    names: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            for name in record:  # a plain loop: a third of the time of update(fromkeys)
                if name not in names:
                    names[name] = None
    return list(names)


class SchemaRegistry:
    """Every operation's JSON Schema, each compiled once into a Draft 2020-12 validator."""

    def __init__(self, schemas: dict[str, dict[str, Any]], check: bool = True) -> None:
        """Compile ``schemas`` (operation name → schema), each first checked against the
        draft 2020-12 metaschema unless ``check`` is False; prefer :meth:`load`."""
        self._schemas = schemas
        self._validators: dict[str, Any] = {}
        self._inlined: dict[str, dict[str, Any]] = {}
        self._fast: dict[str, Any] = {}
        for op, schema in schemas.items():
            if check:
                _Validator.check_schema(schema)
            compiled = _inline_refs(schema, schema.get("$defs") or {})
            self._inlined[op] = compiled
            self._validators[op] = _Validator(compiled, format_checker=None)

    def _fast_check(self, op: str) -> Any:
        """A generated-code validator for ``op``, compiled on first use.

        jsonschema is the reference (and writes the messages) but costs ~40 µs per body,
        a third of a single-record insert. fastjsonschema's generated code answers "valid"
        in a few µs; only bodies it rejects go through jsonschema, which has the last word.
        Patterns get ``\\Z`` for a final ``$`` so both agree on end-of-string.
        """
        fast = self._fast.get(op)
        if fast is None:
            definition = _fast_definition(self._inlined[op])
            try:
                fast = fastjsonschema.compile(definition, use_default=False, use_formats=False)
            except Exception:  # a schema it cannot compile: jsonschema alone checks it
                fast = _always_reject
            self._fast[op] = fast
        return fast

    @classmethod
    def load(cls, directory: pathlib.Path | Traversable | None = None,
             check: bool = True) -> SchemaRegistry:
        """Load every ``*.json`` in ``directory`` (default: the ``schemas`` package)."""
        root: Traversable = (
            directory if directory is not None else importlib.resources.files("schemas")
        )
        schemas: dict[str, dict[str, Any]] = {}
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(".json"):
                schemas[entry.name[: -len(".json")]] = json.loads(entry.read_text(encoding="utf-8"))
        return cls(schemas, check)

    def operations(self) -> set[str]:
        """Names of the operations that have a schema."""
        return set(self._schemas)

    def schema(self, op: str) -> dict[str, Any]:
        """A copy of the schema for ``op`` (KeyError if there is none)."""
        return copy.deepcopy(self._schemas[op])

    def validate(self, op: str, body: Any) -> None:
        """Raise :class:`ValidationError` with one message if ``body`` breaks ``op``'s schema.

        An operation without a schema is answered like Harper: ``Operation 'x' not found``.
        """
        validator = self._validators.get(op)
        if validator is None:
            raise ValidationError(f"Operation '{_clip(op)}' not found")
        try:
            self._fast_check(op)(body)
            return
        except fastjsonschema.JsonSchemaException:
            pass  # jsonschema decides, and names the field
        error = best_match(validator.iter_errors(body))
        if error is not None:
            raise ValidationError(message_for(error))


def _always_reject(_body: Any) -> None:
    raise fastjsonschema.JsonSchemaException("no fast validator")


def _fast_definition(schema: Any) -> Any:
    """A draft-07 copy for fastjsonschema: no ``$defs`` (already inlined), strict ``$``."""
    if isinstance(schema, dict):
        out = {k: _fast_definition(v) for k, v in schema.items()
               if k not in ("$defs", "$schema", "title", "description")}
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$") and not pattern.endswith("\\$"):
            out["pattern"] = pattern[:-1] + r"\Z"
        return out
    if isinstance(schema, list):
        return [_fast_definition(v) for v in schema]
    return schema


@functools.cache
def default_registry() -> SchemaRegistry:
    """The process-wide registry built from the ``schemas`` package (loaded once).

    The shipped schemas are not checked against the metaschema here: that took 0.2 s of
    every node start (62 schemas), and ``tests/test_validation.py`` checks each file.
    """
    return SchemaRegistry.load(check=False)
