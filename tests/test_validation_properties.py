"""Property tests of harpsync.validation: bodies generated from each schema by
hypothesis-jsonschema pass; arbitrary JSON only ever raises a short ValidationError; and
the generated-code fast path never accepts what the reference jsonschema rejects.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils
from hypothesis_jsonschema import _from_schema, from_schema

from harpsync.errors import ValidationError
from harpsync.validation import SchemaRegistry, default_registry
from tests.validation_cases import CANONICAL_OPERATIONS

# (operation, examples): a few hundred for cheap schemas, fewer for the slow generators.
HYPOTHESIS_OPS = [
    ("create_table", 200),
    ("delete", 200),
    ("search_by_value", 200),
    ("add_node", 200),
    ("replay_replication", 200),
    ("search_by_conditions", 60),
    ("cluster_set_routes", 60),
]


class _OldStyleMany:
    """The ``more()``/``reject()`` API of ``conjecture.utils.many`` that hypothesis-jsonschema
    0.23 still calls; newer Hypothesis replaced it with ``with many(...) as m: for _ in m``."""

    def __init__(self, data: Any, **kwargs: Any) -> None:
        """Enter a new-style ``many`` and keep its element iterator."""
        self._many = conjecture_utils.many(data, **kwargs)
        self._many.__enter__()
        self._elements = iter(self._many)

    def more(self) -> bool:
        """Whether to draw another element (closes the ``many`` when done)."""
        if next(self._elements, self) is self:
            self._many.__exit__(None, None, None)
            return False
        return True

    def reject(self, why: str | None = None) -> None:
        """Reject the element being drawn."""
        self._many.reject(why)


@pytest.fixture
def jsonschema_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let hypothesis-jsonschema generate objects under the installed Hypothesis."""
    if not hasattr(conjecture_utils.many, "more"):
        monkeypatch.setattr(_from_schema, "cu", types.SimpleNamespace(many=_OldStyleMany))


@pytest.mark.parametrize(("op", "examples"), HYPOTHESIS_OPS)
@pytest.mark.usefixtures("jsonschema_strategies")
def test_generated_bodies_validate(registry: SchemaRegistry, op: str, examples: int) -> None:
    """Bodies generated from a schema by hypothesis-jsonschema always pass validation."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    @given(from_schema(registry.schema(op)))
    def check(body: dict[str, Any]) -> None:
        registry.validate(op, body)

    check()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
FIELD_NAMES = st.sampled_from(
    [
        "table",
        "database",
        "records",
        "ids",
        "conditions",
        "operator",
        "hostname",
        "url",
        "routes",
        "connections",
        "subscriptions",
        "permission",
        "role",
        "value",
        "attribute",
        "limit",
        "authorization",
        "options",
        "from_seq",
        "primary_key",
        "sort",
    ]
) | st.text(max_size=8)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    op=st.sampled_from(sorted(CANONICAL_OPERATIONS) + ["bogus"]),
    body=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6) | JSON_VALUES,
)
def test_random_json_only_raises_validation_error(op: str, body: Any) -> None:
    """Arbitrary JSON never makes validate raise anything but a short ValidationError."""
    try:
        default_registry().validate(op, body)
    except ValidationError as exc:
        assert exc.message and len(exc.message) < 400


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    op=st.sampled_from(sorted(CANONICAL_OPERATIONS)),
    body=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6),
)
def test_fast_path_never_accepts_what_jsonschema_rejects(op: str, body: Any) -> None:
    """Whatever the generated-code fast path accepts, the reference jsonschema accepts too."""
    registry = default_registry()
    try:
        registry._fast_check(op)(body)
    except Exception:
        return
    assert not list(registry._validators[op].iter_errors(body)), (op, body)


@pytest.mark.parametrize("op", sorted(CANONICAL_OPERATIONS))
def test_fast_path_agrees_on_generated_valid_bodies(op: str) -> None:
    """The fast path accepts a minimal valid body of every operation (no silent fallback)."""
    registry = default_registry()
    fast = registry._fast_check(op)
    assert fast.__name__ != "_always_reject"
