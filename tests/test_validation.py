"""Unit and property tests for harpsync.validation and the schemas/*.json files."""

from __future__ import annotations

import json
import pathlib
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils
from hypothesis_jsonschema import _from_schema, from_schema

from harpsync.errors import BadRequestError, ValidationError
from harpsync.validation import SchemaRegistry, default_registry, validate_name

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent.parent / "schemas"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

CANONICAL_OPERATIONS = {
    "create_database",
    "drop_database",
    "describe_database",
    "describe_all",
    "create_table",
    "drop_table",
    "describe_table",
    "create_attribute",
    "drop_attribute",
    "insert",
    "update",
    "upsert",
    "delete",
    "search_by_id",
    "search_by_value",
    "search_by_conditions",
    "add_user",
    "alter_user",
    "drop_user",
    "list_users",
    "user_info",
    "add_role",
    "alter_role",
    "drop_role",
    "list_roles",
    "system_information",
    "add_node",
    "update_node",
    "set_node_replication",
    "remove_node",
    "cluster_status",
    "cluster_network",
    "configure_cluster",
    "cluster_set_routes",
    "cluster_delete_routes",
    "cluster_get_routes",
    "purge_stream",
    "pause_replication",
    "resume_replication",
    "replay_replication",
    "cluster_overview",
}
# Operator control of streams (operations/streams.py).
CANONICAL_OPERATIONS |= {"get_replication_status", "list_conflicts", "resolve_conflict",
                         "list_dead_letters", "reprocess_dead_letters", "delete_dead_letters"}
# Replication barrier (operations/waits.py).
CANONICAL_OPERATIONS |= {"wait_for_replication"}
CANONICAL_OPERATIONS |= {"verify_cluster", "repair_cluster"}

SUBSCRIPTION = {"database": "dev", "table": "dog", "subscribe": True, "publish": True}
PERMISSION = {
    "super_user": False,
    "dev": {
        "tables": {
            "dog": {
                "read": True,
                "insert": True,
                "update": False,
                "delete": False,
                "attribute_permissions": [{"attribute_name": "name", "read": True}],
            }
        }
    },
}

VALID: dict[str, dict[str, Any]] = {
    "create_database": {"database": "dev"},
    "drop_database": {"database": "dev"},
    "describe_database": {"database": "dev"},
    "describe_all": {},
    "create_table": {
        "database": "dev",
        "table": "dog",
        "primary_key": "id",
        "attributes": [{"name": "name", "type": "String"}, {"name": "age"}],
    },
    "drop_table": {"database": "dev", "table": "dog"},
    "describe_table": {"table": "dog"},
    "create_attribute": {"database": "dev", "table": "dog", "attribute": "color"},
    "drop_attribute": {"table": "dog", "attribute": "color"},
    "insert": {"database": "dev", "table": "dog", "records": [{"id": 1, "name": "Rex"}]},
    "update": {"table": "dog", "records": [{"id": 1, "age": 3}]},
    "upsert": {"table": "dog", "records": []},
    "delete": {"database": "dev", "table": "dog", "ids": [1, "two", 3.5]},
    "search_by_id": {"table": "dog", "ids": [1, "a"], "get_attributes": ["*"]},
    "search_by_value": {
        "table": "dog",
        "attribute": "name",
        "value": "R*",
        "get_attributes": ["id"],
        "limit": 10,
        "offset": 0,
    },
    "search_by_conditions": {
        "database": "dev",
        "table": "dog",
        "operator": "or",
        "limit": 5,
        "offset": 1,
        "sort": {"attribute": "age", "descending": True},
        "get_attributes": ["id", "age"],
        "conditions": [
            {"attribute": "age", "comparator": "between", "value": [1, 10]},
            {"attribute": "name", "comparator": "starts_with", "value": "R"},
        ],
    },
    "add_user": {"username": "bob", "password": "pw", "role": "reader", "active": True},
    "alter_user": {"username": "bob", "active": False},
    "drop_user": {"username": "bob"},
    "list_users": {},
    "user_info": {},
    "add_role": {"role": "reader", "permission": PERMISSION},
    "alter_role": {"id": "6c0c4d0e-uuid", "permission": {"super_user": True}},
    "drop_role": {"id": "reader"},
    "list_roles": {},
    "system_information": {"attributes": ["cpu", "memory"]},
    "add_node": {
        "hostname": "127.0.0.2",
        "url": "ws://127.0.0.2:9933",
        "verify_tls": False,
        "authorization": {"username": "admin", "password": "pw"},
        "retain_authorization": True,
        "revoked_certificates": ["abc"],
        "shard": 1,
        "start_time": "2026-11-22T10:00:00Z",
        "subscriptions": [SUBSCRIPTION],
        "replicates": True,
    },
    "update_node": {"hostname": "127.0.0.2", "authorization": "Basic YWRtaW46cHc="},
    "set_node_replication": {"url": "wss://peer:9933", "subscriptions": [SUBSCRIPTION]},
    "remove_node": {"hostname": "127.0.0.2"},
    "cluster_status": {},
    "cluster_network": {"timeout": 1000, "connected_nodes": True, "routes": False},
    "configure_cluster": {
        "connections": [
            {"hostname": "127.0.0.2", "subscriptions": [SUBSCRIPTION]},
            {"url": "ws://127.0.0.3:9933"},
        ]
    },
    "cluster_set_routes": {
        "server": "hub",
        "routes": ["ws://a:9933", {"hostname": "b", "port": 9933}, {"host": "c", "port": 1}],
    },
    "cluster_delete_routes": {"routes": [{"hostname": "b", "port": 9933}]},
    "cluster_get_routes": {},
    "purge_stream": {"database": "dev", "table": "dog", "options": {"keep": 10, "seq": 0}},
    "pause_replication": {"hostname": "127.0.0.2", "database": "dev"},
    "resume_replication": {"hostname": "127.0.0.2"},
    "replay_replication": {"hostname": "127.0.0.2", "from_seq": 0},
    "cluster_overview": {"timeout": 800, "peers": False},
}
VALID |= {
    "get_replication_status": {"node": "b", "database": "data"},
    "list_conflicts": {"database": "data", "table": "dog", "node": "b", "limit": 10},
    "resolve_conflict": {"id": "abc", "keep": "remote"},
    "list_dead_letters": {"node": "b", "error": "unknown", "limit": 5},
    "reprocess_dead_letters": {"database": "data", "table": "dog", "limit": 5},
    "delete_dead_letters": {"ids": ["abc"]},
}
VALID |= {
    "wait_for_replication": {"version": 123, "nodes": ["b"], "database": "data", "timeout": 50},
}
# Issue 14: SQL, CSV jobs, the transaction log, configuration.
CANONICAL_OPERATIONS |= {"sql", "csv_data_load", "csv_file_load", "csv_url_load", "get_job",
                         "search_jobs_by_start_date", "read_transaction_log",
                         "delete_transaction_logs_before", "get_configuration",
                         "set_configuration", "restart", "restart_service"}
VALID.update({
    "sql": {"sql": "SELECT * FROM dev.dog WHERE id = 1"},
    "csv_data_load": {"database": "dev", "table": "breed", "action": "insert",
                      "data": "id,name\n1,Labrador\n"},
    "csv_file_load": {"database": "dev", "table": "breed", "action": "upsert",
                      "file_path": "/home/user/imports/breeds.csv"},
    "csv_url_load": {"table": "breed", "csv_url": "https://example.com/breeds.csv"},
    "get_job": {"id": "4a982782-929a-4507-8794-26dae1132def"},
    "search_jobs_by_start_date": {"from_date": "2021-01-25T22:05:27.464+0000",
                                  "to_date": "2021-01-25T23:05:27.464+0000"},
    "read_transaction_log": {"schema": "dev", "table": "dog", "from": 1560249020865,
                             "to": 1660585656639, "limit": 10},
    "delete_transaction_logs_before": {"schema": "dev", "table": "dog",
                                       "timestamp": 1598290282817},
    "get_configuration": {},
    "set_configuration": {"logging_level": "trace"},
    "restart": {},
    "restart_service": {"service": "http_workers"},
})
VALID["verify_cluster"] = {"database": "dev", "table": "dog", "nodes": ["node-b"],
                           "deep": True}
VALID["repair_cluster"] = {"database": "dev", "dry_run": True}

# (operation, body, exact expected message)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("insert", {"table": "dog", "records": {"id": 1}}, "'records' must be an array"),
    ("insert", {"table": "dog"}, "'records' is required"),
    ("insert", {"records": []}, "'table' is required"),
    ("insert", {"table": "dog", "records": [{}, {}, {}, 7]}, "'records[3]' must be an object"),
    ("update", {"table": "", "records": []}, "'table' must not be empty"),
    ("upsert", {"table": "dog", "database": 5, "records": []}, "'database' must be a string"),
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
        {"table": "dog", "conditions": [{"comparator": "equals", "value": 1}]},
        "'conditions[0].attribute' is required",
    ),
    (
        "search_by_conditions",
        {"table": "dog", "conditions": [{"attribute": "a", "comparator": "between", "value": 1}]},
        "'conditions[0].value' must be an array",
    ),
    (
        "search_by_conditions",
        {"table": "dog", "conditions": [{"attribute": "a", "comparator": "bogus", "value": 1}]},
        "'conditions[0].comparator' must be one of: equals, contains, starts_with, ends_with, "
        "greater_than, greater_than_equal, less_than, less_than_equal, between, not_equal",
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
    ("add_user", {"username": "bob", "password": "pw"}, "'role' is required"),
    ("add_user", {"username": "bob", "password": "", "role": "r"}, "'password' must not be empty"),
    ("alter_user", {"username": "bob", "active": "yes"}, "'active' must be a boolean"),
    ("drop_user", {}, "'username' is required"),
    ("add_role", {"role": "reader"}, "'permission' is required"),
    (
        "add_role",
        {"role": "r", "permission": {"dev": {"tables": {"dog": {"read": 1}}}}},
        "'permission.dev.tables.dog.read' must be a boolean",
    ),
    ("alter_role", {"permission": {}}, "'id' or 'role' is required"),
    ("drop_role", {}, "'id' is required"),
    ("add_node", {"verify_tls": False}, "'hostname' or 'url' is required"),
    ("add_node", {"url": "http://x"}, "'url' must be a ws:// or wss:// URL"),
    ("add_node", {"hostname": "a b"}, "'hostname' must not contain whitespace"),
    (
        "add_node",
        {"hostname": "a", "authorization": {"username": "u"}},
        "'authorization.password' is required",
    ),
    (
        "add_node",
        {"hostname": "a", "authorization": 1},
        "'authorization' must be an object or a string",
    ),
    (
        "add_node",
        {"hostname": "a", "subscriptions": [{"table": "dog", "publish": True}]},
        "'subscriptions[0].subscribe' is required",
    ),
    (
        "add_node",
        {"hostname": "a", "start_time": "yesterday"},
        "'start_time' must be an ISO 8601 date-time (YYYY-MM-DDThh:mm:ss)",
    ),
    (
        "set_node_replication",
        {"hostname": "127.0.0.2", "url": "ws://127.0.0.1:9943", "subscriptions": "notarray"},
        "'subscriptions' must be an array",
    ),
    ("update_node", {}, "'hostname' or 'url' is required"),
    ("remove_node", {}, "'hostname' is required"),
    ("cluster_network", {"timeout": -1}, "'timeout' must be >= 0"),
    ("cluster_overview", {"timeout": 0}, "'timeout' must be >= 1"),
    ("cluster_overview", {"peers": "yes"}, "'peers' must be a boolean"),
    ("configure_cluster", {}, "'connections' is required"),
    (
        "configure_cluster",
        {"connections": [{"subscriptions": []}]},
        "'connections[0].hostname' or 'connections[0].url' is required",
    ),
    ("cluster_set_routes", {"routes": []}, "'routes' must not be empty"),
    ("cluster_set_routes", {"routes": [5]}, "'routes[0]' must be a string or an object"),
    ("cluster_set_routes", {"routes": ["http://x"]}, "'routes[0]' must be a ws:// or wss:// URL"),
    ("cluster_set_routes", {"routes": [{"hostname": "a"}]}, "'routes[0].port' is required"),
    (
        "cluster_set_routes",
        {"routes": [{"hostname": "a", "port": 70000}]},
        "'routes[0].port' must be <= 65535",
    ),
    (
        "cluster_set_routes",
        {"routes": [{"port": 1}]},
        "'routes[0].hostname' or 'routes[0].host' is required",
    ),
    (
        "cluster_set_routes",
        {"routes": ["ws://a"], "server": "x"},
        "'server' must be one of: hub, leaf",
    ),
    ("cluster_delete_routes", {}, "'routes' is required"),
    ("purge_stream", {"table": "dog", "options": {"keep": -5}}, "'options.keep' must be >= 0"),
    ("pause_replication", {"database": "dev"}, "'hostname' is required"),
    ("replay_replication", {"hostname": "a"},
     "'from_seq' or 'from_time' or 'from' is required"),
    ("system_information", {"attributes": "cpu"}, "'attributes' must be an array"),
]


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    """The registry loaded from the shipped schemas package."""
    return SchemaRegistry.load()


def _message(registry: SchemaRegistry, op: str, body: Any) -> str:
    """Validate and return the ValidationError message (fails if nothing was raised)."""
    with pytest.raises(ValidationError) as info:
        registry.validate(op, body)
    return info.value.message


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
    assert _message(reg, "ping", {}) == "'x' is required"


def test_schema_returns_a_copy(registry: SchemaRegistry) -> None:
    """schema() hands out a copy, so callers cannot corrupt the compiled validator."""
    schema = registry.schema("insert")
    schema["required"].clear()
    assert "records" in registry.schema("insert")["required"]
    assert _message(registry, "insert", {"table": "dog"}) == "'records' is required"


def test_every_valid_example_passes(registry: SchemaRegistry) -> None:
    """A realistic valid body for every operation passes, with and without 'operation'."""
    assert set(VALID) == registry.operations()
    for op, body in VALID.items():
        registry.validate(op, body)
        registry.validate(op, {"operation": op, "extra_harper_field": [1], **body})


@pytest.mark.parametrize(("op", "body", "expected"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_body_message(
    registry: SchemaRegistry, op: str, body: dict[str, Any], expected: str
) -> None:
    """An invalid body raises one 400 ValidationError whose message names the field."""
    with pytest.raises(ValidationError) as info:
        registry.validate(op, {"operation": op, **body})
    assert info.value.message == expected
    assert info.value.status == 400
    assert isinstance(info.value, BadRequestError)


def test_unknown_operation_is_a_validation_error(registry: SchemaRegistry) -> None:
    """An operation without a schema gets Harper's 'not found' wording, not a KeyError."""
    assert _message(registry, "no_such_op", {}) == "Operation 'no_such_op' not found"


def test_non_object_body(registry: SchemaRegistry) -> None:
    """A body that is not a JSON object is rejected with a clear message."""
    assert _message(registry, "describe_all", [1, 2]) == "'body' must be an object"


def test_user_values_are_truncated(registry: SchemaRegistry) -> None:
    """Neither huge keys nor huge values are echoed in full into the message."""
    huge = "q" * 10_000
    msg = _message(registry, "add_role", {"role": "r", "permission": {huge: {"tables": 1}}})
    assert msg.startswith("'permission.qqq") and msg.endswith(".tables' must be an object")
    assert len(msg) < 120
    msg = _message(registry, "create_table", {"table": huge, "primary_key": "id"})
    assert msg == "'table' must be at most 100 characters"
    reg = SchemaRegistry({"x": {"type": "object", "properties": {"v": {"not": {}}}}})
    assert len(_message(reg, "x", {"v": huge})) < 120


def test_large_insert_reports_the_bad_record(registry: SchemaRegistry) -> None:
    """A 100,000-record insert validates, and one bad record is named by index."""
    records: list[Any] = [{"id": i} for i in range(100_000)]
    registry.validate("insert", {"table": "dog", "records": records})
    records[76_543] = "oops"
    assert _message(registry, "insert", {"table": "dog", "records": records}) == (
        "'records[76543]' must be an object"
    )
    too_many = {"table": "dog", "records": records + [{}]}
    assert _message(registry, "insert", too_many) == "'records' must contain at most 100000 items"


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
