"""Validation of the data operations (operations/data.py): the messages for invalid
insert, update, upsert, delete and search bodies, and a 100,000-record insert that
names its one bad record.
"""

from __future__ import annotations

from typing import Any

import pytest

from harpsync.validation import SchemaRegistry
from tests.validation_cases import message, refused_with

# (operation, body, exact expected message)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("insert", {"table": "dog", "records": {"id": 1}}, "'records' must be an array"),
    ("insert", {"table": "dog"}, "'records' is required"),
    ("insert", {"records": []}, "'table' is required"),
    ("insert", {"table": "dog", "records": [{}, {}, {}, 7]}, "'records[3]' must be an object"),
    ("update", {"table": "", "records": []}, "'table' must not be empty"),
    ("upsert", {"table": "dog", "database": 5, "records": []}, "'database' must be a string"),
    ("delete", {"table": "dog", "ids": []}, "'ids' must not be empty"),
    ("delete", {"table": "dog", "ids": [True]}, "'ids[0]' must be a string or a number"),
    ("search_by_id", {"table": "dog"}, "'ids' is required"),
    (
        "search_by_id",
        {"table": "dog", "ids": [1], "get_attributes": []},
        "'get_attributes' must not be empty",
    ),
    ("search_by_value", {"table": "dog", "attribute": "name"}, "'value' is required"),
    (
        "search_by_value",
        {"table": "dog", "attribute": "a", "value": 1, "limit": -1},
        "'limit' must be >= 0",
    ),
    (
        "search_by_value",
        {"table": "dog", "attribute": "a", "value": 1, "offset": 1.5},
        "'offset' must be an integer",
    ),
    (
        "search_by_value",
        {"table": "dog", "attribute": "a", "value": {}},
        "'value' must be a string, a number, a boolean or null",
    ),
    (
        "search_by_conditions",
        {
            "table": "dog",
            "operator": "or",
            "get_attributes": ["id"],
            "conditions": [{"attribute": "age", "comparator": "between", "value": [1, 10]}],
        },
        'An "or" operator requires at least two conditions',
    ),
    (
        "search_by_conditions",
        {
            "table": "dog",
            "operator": "OR",
            "conditions": [{"attribute": "a", "comparator": "equals", "value": 1}],
        },
        "'operator' must be one of: and, or",
    ),
    (
        "search_by_conditions",
        {"table": "dog", "conditions": [{"attribute": 5, "comparator": "equals", "value": 1}]},
        "'conditions[0].attribute' must be a string",
    ),
    (
        "search_by_conditions",
        {"table": "dog", "conditions": [{"attribute": "a", "comparator": "between", "value": 1}]},
        "'conditions[0].value' must be an array",
    ),
    (
        "search_by_conditions",
        {"table": "dog", "conditions": [{"attribute": "a", "comparator": "bogus", "value": 1}]},
        'Unknown query comparator "bogus"',
    ),
    ("search_by_conditions", {"table": "dog", "conditions": []}, "'conditions' must not be empty"),
    (
        "search_by_conditions",
        {
            "table": "dog",
            "conditions": [{"attribute": "a", "comparator": "equals", "value": 1}],
            "sort": {"descending": True},
        },
        "'sort.attribute' is required",
    ),
]


@pytest.mark.parametrize(("op", "body", "expected"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_body_message(
    registry: SchemaRegistry, op: str, body: dict[str, Any], expected: str
) -> None:
    """An invalid body raises one 400 ValidationError whose message names the field."""
    refused_with(registry, op, body, expected)


def test_large_insert_reports_the_bad_record(registry: SchemaRegistry) -> None:
    """A 100,000-record insert validates, and one bad record is named by index."""
    records: list[Any] = [{"id": i} for i in range(100_000)]
    registry.validate("insert", {"table": "dog", "records": records})
    records[76_543] = "oops"
    assert message(registry, "insert", {"table": "dog", "records": records}) == (
        "'records[76543]' must be an object"
    )
    too_many = {"table": "dog", "records": records + [{}]}
    assert message(registry, "insert", too_many) == "'records' must contain at most 100000 items"

