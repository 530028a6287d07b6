"""Unit tests for harpsync.validation and the schemas/*.json files: each schema file is
well formed, the registry holds exactly the canonical operations, every valid example
passes, and the messages for unknown operations, non-object bodies and huge values.

The invalid bodies of each family of operations are tested in
tests/test_validation_{schema,data,user_cluster}_ops.py, the generated and random bodies
in tests/test_validation_properties.py; the shared catalogue is tests/validation_cases.py.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from harpsync.validation import SchemaRegistry, default_registry
from tests.validation_cases import CANONICAL_OPERATIONS, VALID, message

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent.parent / "schemas"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_schema_file_is_valid_draft_2020_12(path: pathlib.Path) -> None:
    """Each schema file is a well-formed, standalone draft 2020-12 object schema."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema["$schema"] == DRAFT_2020_12
    assert schema["type"] == "object"
    assert "operation" not in schema.get("required", [])
    assert schema.get("additionalProperties", True) is not False
    refs = {part.split('"')[0] for part in json.dumps(schema).split('"#/$defs/')[1:]}
    assert refs <= set(schema.get("$defs", {}))
    SchemaRegistry({path.stem: schema})  # check_schema raises on an invalid schema


def test_registry_covers_exactly_the_canonical_operations(registry: SchemaRegistry) -> None:
    """The default registry loads one schema per canonical operation and nothing else."""
    assert registry.operations() == CANONICAL_OPERATIONS
    assert default_registry().operations() == CANONICAL_OPERATIONS
    assert not {"create_schema", "drop_schema", "describe_schema", "search_by_hash"} & (
        registry.operations()
    )


def test_load_from_explicit_directory(tmp_path: pathlib.Path) -> None:
    """load() accepts a directory and ignores files that are not JSON."""
    (tmp_path / "ping.json").write_text(json.dumps({"type": "object", "required": ["x"]}))
    (tmp_path / "notes.txt").write_text("ignored")
    reg = SchemaRegistry.load(tmp_path)
    assert reg.operations() == {"ping"}
    assert message(reg, "ping", {}) == "'x' is required"


def test_schema_returns_a_copy(registry: SchemaRegistry) -> None:
    """schema() hands out a copy, so callers cannot corrupt the compiled validator."""
    schema = registry.schema("insert")
    schema["required"].clear()
    assert "records" in registry.schema("insert")["required"]
    assert message(registry, "insert", {"table": "dog"}) == "'records' is required"


def test_every_valid_example_passes(registry: SchemaRegistry) -> None:
    """A realistic valid body for every operation passes, with and without 'operation'."""
    assert set(VALID) == registry.operations()
    for op, body in VALID.items():
        registry.validate(op, body)
        registry.validate(op, {"operation": op, "extra_harper_field": [1], **body})



def test_unknown_operation_is_a_validation_error(registry: SchemaRegistry) -> None:
    """An operation without a schema gets Harper's 'not found' wording, not a KeyError."""
    assert message(registry, "no_such_op", {}) == "Operation 'no_such_op' not found"


def test_non_object_body(registry: SchemaRegistry) -> None:
    """A body that is not a JSON object is rejected with a clear message."""
    assert message(registry, "describe_all", [1, 2]) == "'body' must be an object"


def test_user_values_are_truncated(registry: SchemaRegistry) -> None:
    """Neither huge keys nor huge values are echoed in full into the message."""
    huge = "q" * 10_000
    msg = message(registry, "add_role", {"role": "r", "permission": {huge: {"tables": 1}}})
    assert msg.startswith("'permission.qqq") and msg.endswith(".tables' must be an object")
    assert len(msg) < 120
    msg = message(registry, "create_table", {"table": huge, "primary_key": "id"})
    assert msg == "'table' must be at most 100 characters"
    reg = SchemaRegistry({"x": {"type": "object", "properties": {"v": {"not": {}}}}})
    assert len(message(reg, "x", {"v": huge})) < 120

