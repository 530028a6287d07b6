"""Fuzzing the operations API with invalid bodies: always a 4xx, never a change to data.

Bodies are built from each operation's JSON Schema and then broken (a required field
dropped, a wrong type, a bad name, a bad array item, junk under an old field name, a
non-string ``operation``). Only bodies that the dispatcher's own validation rejects are
sent, checked locally with the same schemas and the same alias normalization, so no
handler can legitimately run. Arbitrary JSON values and raw bytes are sent as well.
Well-formed data requests carrying arbitrary values (huge integers, odd ids, mixed
comparator types) go to a separate scratch node, where they may write but never fail.

hypothesis-jsonschema 0.23.1 cannot draw objects with this Hypothesis (it calls the
removed ``many.more()``), so objects and arrays of objects are assembled here with
``fixed_dictionaries`` and ``lists``, and hypothesis-jsonschema draws the leaves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from harpsync.dispatch import OPERATION_ALIASES, Dispatcher, normalize
from harpsync.errors import BadRequestError
from harpsync.node import OPERATION_MODULES
from harpsync.validation import NAME_PATTERN, SchemaRegistry
from tests.helpers import InProcessNode, harper_error

pytestmark = pytest.mark.timeout(300)

REGISTRY = SchemaRegistry.load()
OPERATIONS = sorted(REGISTRY.operations())
EXAMPLES_PER_OPERATION = 80
ARBITRARY_EXAMPLES = 300
RAW_EXAMPLES = 200
MINIMUM_SENT = 3000

# What the node itself runs: the same registry and the same registered operations.
LOCAL = Dispatcher(REGISTRY)
for _module in OPERATION_MODULES:
    LOCAL.register(*_module.OPERATIONS)

OLD_NAMES: dict[str, list[str]] = {}
for _old, _new in OPERATION_ALIASES.items():
    OLD_NAMES.setdefault(_new, []).append(_old)
# Old field names that normalize() rewrites, so junk under them must be caught too.
FIELD_ALIASES = {"database": ["schema"], "primary_key": ["hash_attribute"],
                 "ids": ["hash_values"], "attribute": ["search_attribute"],
                 "value": ["search_value"], "hostname": ["node_name", "name"]}
ALIAS_KEYS = ["schema", "hash_attribute", "hash_values", "search_attribute", "search_value",
              "search_type", "node_name", "name"]
NAME_RE = re.compile(NAME_PATTERN.replace("$", r"\Z"))

SENT: dict[str, int] = {"bodies": 0}

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
bad_names = st.one_of(
    st.text(max_size=30).filter(lambda s: not NAME_RE.match(s)),
    st.text(alphabet="abcXYZ09_-", min_size=101, max_size=130),
    st.sampled_from(["bad name!", "dog\n", "a.b", "../etc", "x/y", "Äpfel", "", " ", "$1"]),
    st.integers(), st.booleans(), st.none(),
)


# -- strategies built from the schemas -------------------------------------------------------
def _resolve(schema: Any, defs: dict[str, Any]) -> Any:
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    return [kind] if isinstance(kind, str) else list(kind or [])


def strategy_for(schema: Any, defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values for ``schema``: objects and arrays here, leaves from the schema."""
    schema = _resolve(schema, defs)
    if not isinstance(schema, dict):
        return json_values
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    types = _types(schema)
    if "properties" in schema or types == ["object"]:
        props: dict[str, Any] = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in props]
        return st.fixed_dictionaries(
            {k: strategy_for(props[k], defs) for k in required},
            optional={k: strategy_for(v, defs) for k, v in props.items() if k not in required},
        )
    if types == ["array"]:
        low = int(schema.get("minItems", 0))
        return st.lists(strategy_for(schema.get("items", {}), defs), min_size=low,
                        max_size=max(low, 3))
    if types and "object" not in types and "array" not in types:
        return from_schema({**schema, "$defs": defs})
    return json_values


def _shape(op: str) -> dict[str, Any]:
    """The parts of an operation's schema the mutations aim at."""
    schema = REGISTRY.schema(op)
    defs = schema.get("$defs", {})
    props = {k: v for k, v in schema.get("properties", {}).items() if k != "operation"}
    required = [k for k in schema.get("required", []) if k != "operation"]
    for branch in schema.get("anyOf", []):
        required += [k for k in branch.get("required", []) if k not in required]
    names = [k for k, v in props.items() if v == {"$ref": "#/$defs/name"}]
    arrays = [k for k, v in props.items() if "array" in _types(_resolve(v, defs))]
    return {"base": strategy_for(schema, defs), "props": sorted(props), "required": required,
            "names": names, "arrays": arrays}


SHAPES = {op: _shape(op) for op in OPERATIONS}
MUTATIONS = ["drop_required", "wrong_value", "wrong_value", "bad_name", "bad_name",
             "bad_item", "alias_junk", "random_fields", "operation_type"]


def schema_rejects(op: str, body: Any) -> bool:
    """Whether the node's validation refuses ``body`` for ``op`` before any handler runs."""
    canonical = OPERATION_ALIASES.get(op, op)
    try:
        REGISTRY.validate(canonical, normalize(canonical, body))
        LOCAL.resolve(body)
    except BadRequestError:
        return True
    return False


@st.composite
def invalid_bodies(draw: st.DrawFn, op: str) -> dict[str, Any]:
    """A body for ``op`` (or one of its old names) that breaks its schema."""
    shape = SHAPES[op]
    body: dict[str, Any] = dict(draw(shape["base"]))
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation == "drop_required" and shape["required"]:
        key = draw(st.sampled_from(shape["required"]))
        for name in [key, *FIELD_ALIASES.get(key, [])]:
            body.pop(name, None)
    elif mutation == "wrong_value" and shape["props"]:
        body[draw(st.sampled_from(shape["props"]))] = draw(json_values)
    elif mutation == "bad_name" and shape["names"]:
        body[draw(st.sampled_from(shape["names"]))] = draw(bad_names)
    elif mutation == "bad_item" and shape["arrays"]:
        body[draw(st.sampled_from(shape["arrays"]))] = draw(
            st.lists(json_values, min_size=1, max_size=3))
    elif mutation == "alias_junk":
        body[draw(st.sampled_from(ALIAS_KEYS))] = draw(json_values | bad_names)
    elif mutation == "random_fields":
        keys = st.sampled_from(shape["props"] + ALIAS_KEYS) | st.text(max_size=12)
        body = draw(st.dictionaries(keys, json_values, max_size=6))
    if mutation == "operation_type":
        body["operation"] = draw(json_values.filter(lambda v: not isinstance(v, str)))
    else:
        body["operation"] = draw(st.sampled_from([op, *OLD_NAMES.get(op, [])]))
    assume(schema_rejects(op, body))
    return body


# -- the node under fire ---------------------------------------------------------------------
def check_refused(response: httpx.Response, sent: Any) -> None:
    """A 4xx with exactly ``{"error": str}`` (or Harper's 403 keys), and no traceback."""
    SENT["bodies"] += 1
    assert 400 <= response.status_code < 500, (sent, response.status_code, response.text)
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), (sent, body)
    assert set(harper_error(body)) <= {"error", "unauthorized_access", "invalid_schema_items"}, body


def snapshot(node: InProcessNode) -> dict[str, Any]:
    """Everything a stray write would change: counts, rows, users, roles and log heads."""
    described = node.call("describe_all")
    storage = node.node.storage
    return {
        "counts": {db: {t: d["record_count"] for t, d in tables.items()}
                   for db, tables in described.items()},
        "attributes": {db: {t: d["attributes"] for t, d in tables.items()}
                       for db, tables in described.items()},
        "dogs": node.call("search_by_conditions", database="dev", table="dog",
                          get_attributes=["*"], conditions=[
                              {"attribute": "id", "comparator": "greater_than_equal",
                               "value": 0}]),
        "users": node.call("list_users"),
        "roles": node.call("list_roles"),
        "log_heads": {name: db.head_seq for name, db in storage.databases.items()},
    }


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One seeded node for the whole module, with a snapshot of its data taken first."""
    node = InProcessNode("fuzz", tmp_path_factory.mktemp("fuzz") / "fuzz").start()
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("create_table", database="data", table="cat", primary_key="id")
    node.call("insert", database="dev", table="dog",
              records=[{"id": i, "name": f"dog-{i}", "age": i % 7} for i in range(30)])
    node.call("insert", database="data", table="cat", records=[{"id": "tom"}])
    node.call("add_role", role="reader", permission={
        "super_user": False, "dev": {"tables": {"dog": {"read": True}}}})
    node.call("add_user", role="reader", username="bob", password="bobpw")
    yield {"node": node, "before": snapshot(node)}
    node.close()


FUZZ_SETTINGS = settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("op", OPERATIONS)
def test_invalid_bodies_are_refused(target, op):
    """Bodies that break an operation's schema are all answered 4xx with the error shape."""
    node = target["node"]

    @FUZZ_SETTINGS
    @given(body=invalid_bodies(op))
    def post(body: dict[str, Any]) -> None:
        check_refused(node.post(body), body)

    post()


@settings(max_examples=ARBITRARY_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(value=json_values | st.dictionaries(
    st.sampled_from(["operation", "database", "table", "records", "ids"]) | st.text(max_size=8),
    json_values, max_size=5))
def test_arbitrary_json_is_refused(target, value):
    """Any JSON value that is not a valid operation is answered 4xx with the error shape."""
    try:
        LOCAL.resolve(value)
    except BadRequestError:
        check_refused(target["node"].post(value), value)
        return
    assume(False)


@settings(max_examples=RAW_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_raw_bytes_are_refused(target, raw):
    """Arbitrary bytes as a body are answered 4xx with the error shape."""
    try:
        LOCAL.resolve(json.loads(raw))
    except (ValueError, RecursionError, BadRequestError):
        pass
    else:
        assume(False)
    node = target["node"]
    response = node.client.post(node.url, content=raw, auth=("admin", "test-password"),
                                headers={"content-type": "application/json"})
    check_refused(response, raw)


ids = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False,
       allow_infinity=False) | st.text(max_size=12) | st.booleans() | st.none())
records = st.lists(st.dictionaries(st.sampled_from(["id", "name", "age", "tags"])
                                   | st.text(max_size=6), json_values | ids, max_size=5)
                   | st.fixed_dictionaries({"id": ids}, optional={"name": json_values}),
                   max_size=4)
COMPARATORS = ["equals", "not_equal", "contains", "starts_with", "ends_with", "greater_than",
               "greater_than_equal", "less_than", "less_than_equal", "between"]
conditions = st.lists(st.fixed_dictionaries({
    "attribute": st.sampled_from(["id", "name", "age", "tags", "nope"]),
    "comparator": st.sampled_from(COMPARATORS),
    "value": json_values | st.lists(ids, min_size=2, max_size=2)}), min_size=1, max_size=3)
scratch_bodies = st.one_of(
    st.fixed_dictionaries({"operation": st.sampled_from(["insert", "upsert", "update"]),
                           "records": records}),
    st.fixed_dictionaries({"operation": st.just("delete"),
                           "ids": st.lists(ids.filter(lambda v: v is not None
                                                      and not isinstance(v, bool)),
                                           min_size=1, max_size=4)}),
    st.fixed_dictionaries({"operation": st.just("search_by_id"),
                           "ids": st.lists(ids.filter(lambda v: v is not None
                                                      and not isinstance(v, bool)),
                                           max_size=4)}),
    st.fixed_dictionaries({"operation": st.just("search_by_value"),
                           "attribute": st.sampled_from(["id", "name", "age", "x"]),
                           "value": scalars}),
    st.fixed_dictionaries({"operation": st.just("search_by_conditions"),
                           "conditions": conditions},
                          optional={"operator": st.sampled_from(["and", "or"]),
                                    "sort": st.fixed_dictionaries(
                                        {"attribute": st.sampled_from(["id", "name", "age"])},
                                        optional={"descending": st.booleans()}),
                                    "limit": st.integers(0, 5), "offset": st.integers(0, 5)}),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    """A node of its own for requests that may really write."""
    node = InProcessNode("scratch", tmp_path_factory.mktemp("scratch") / "scratch").start()
    node.call("create_table", database="scratch", table="junk", primary_key="id")
    yield node
    node.close()


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=scratch_bodies)
def test_well_formed_data_requests_never_fail_the_node(scratch, body):
    """Data requests with any values answer 200 or a 4xx, never a 500 (on a scratch node)."""
    response = scratch.post({**body, "database": "scratch", "table": "junk"})
    assert response.status_code < 500, (body, response.text)
    assert "Traceback" not in response.text
    if response.status_code != 200:
        assert list(harper_error(response.json())) == ["error"], response.text


def test_role_user_invalid_bodies_are_refused(target):
    """A role user's invalid bodies get the same 400s: validation runs before permissions."""
    node = target["node"]
    response = node.post({"operation": "insert", "database": "dev", "table": "dog",
                          "records": "nope"}, auth=("bob", "bobpw"))
    check_refused(response, "role user insert")
    assert response.status_code == 400
    assert harper_error(response.json()) == {"error": "'records' must be an array"}


def test_data_unchanged_after_fuzzing(target):
    """After every fuzzed request the data, users, roles and logs are exactly as seeded."""
    assert SENT["bodies"] >= MINIMUM_SENT, SENT
    assert snapshot(target["node"]) == target["before"]
