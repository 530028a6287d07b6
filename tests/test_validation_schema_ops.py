"""Validation of the schema operations (operations/schema_ops.py): the messages for
invalid create_database, create_table and create_attribute bodies, and validate_name,
which checks database, table and attribute names with the schemas' wording.
"""

from __future__ import annotations

from typing import Any

import pytest

from harpsync.errors import ValidationError
from harpsync.validation import SchemaRegistry, validate_name
from tests.validation_cases import refused_with

# (operation, body, exact expected message)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("create_table", {"database": "dev", "table": "noattr"}, "'primary_key' is required"),
    (
        "create_table",
        {"table": "bad name!", "primary_key": "id"},
        "'table' must contain only letters, digits, underscore and dash",
    ),
    (
        "create_table",
        {"table": "dog\n", "primary_key": "id"},
        "'table' must contain only letters, digits, underscore and dash",
    ),
    (
        "create_table",
        {"table": "dog", "primary_key": "id", "attributes": [{"type": "x"}]},
        "'attributes[0].name' is required",
    ),
    ("create_database", {}, "'database' is required"),
    ("create_database", {"database": "x" * 101}, "'database' must be at most 100 characters"),
    ("create_attribute", {"table": "dog"}, "'attribute' is required"),
]


@pytest.mark.parametrize(("op", "body", "expected"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_body_message(
    registry: SchemaRegistry, op: str, body: dict[str, Any], expected: str
) -> None:
    """An invalid body raises one 400 ValidationError whose message names the field."""
    refused_with(registry, op, body, expected)


@pytest.mark.parametrize("value", ["dog", "Dog_2", "a-b", "x" * 100, "0"])
def test_validate_name_accepts(value: str) -> None:
    """validate_name returns names of letters, digits, underscore and dash unchanged."""
    assert validate_name("table", value) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, "'table' must be a string"),
        (None, "'table' must be a string"),
        ("", "'table' must not be empty"),
        ("x" * 101, "'table' must be at most 100 characters"),
        ("bad name!", "'table' must contain only letters, digits, underscore and dash"),
        ("dog\n", "'table' must contain only letters, digits, underscore and dash"),
        ("dög", "'table' must contain only letters, digits, underscore and dash"),
    ],
)
def test_validate_name_rejects(value: object, expected: str) -> None:
    """validate_name raises ValidationError with the same wording as the schemas."""
    with pytest.raises(ValidationError) as info:
        validate_name("table", value)
    assert info.value.message == expected

