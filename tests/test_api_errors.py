"""Login, bad input and the one error shape of the operations API.

Every failing request answers ``{"error": "<message>"}`` (plus Harper's extra keys on a
403), with the status Harper uses, and never a 500 or a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import ADMIN, InProcessNode, harper_error

# The ``code`` each status may carry (seed 000 section 6.2).
CODES = {400: {"VALIDATION_ERROR", "INVALID_REQUEST"}, 401: {"UNAUTHORIZED"},
         403: {"FORBIDDEN"}, 404: {"NOT_FOUND"}, 405: {"METHOD_NOT_ALLOWED"},
         413: {"PAYLOAD_TOO_LARGE"}, 429: {"RATE_LIMIT_EXCEEDED"}, 500: {"INTERNAL_ERROR"}}


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> str:
    """The response is ``status`` with a body of exactly ``{"error": str, "code": str,
    "request_id": str}``, the id matching the ``X-Request-Id`` header; returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["error", "code", "request_id"], body
    assert body["code"] in CODES[status], body
    assert body["request_id"] == response.headers["x-request-id"], (body, response.headers)
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    if message is not None:
        assert body["error"] == message
    return str(body["error"])


def raw_post(node: Any, content: Any, auth: tuple[str, str] | None = ADMIN,
             headers: dict[str, str] | None = None) -> httpx.Response:
    return node.client.post(node.url, content=content, auth=auth,
                            headers=headers or {"content-type": "application/json"})


@pytest.fixture
def dev(node: Any) -> Any:
    """A node with an empty dev.dog table."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    return node


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One node with an empty dev.dog, shared by tests whose requests must all fail."""
    shared = InProcessNode("api", tmp_path_factory.mktemp("api") / "api").start()
    shared.call("create_table", database="dev", table="dog", primary_key="id")
    yield shared
    assert shared.count("dog", "dev") == 0  # no failing request wrote anything
    shared.close()


# -- login ------------------------------------------------------------------------------
def test_no_authorization_header(api):
    """A request without an Authorization header is 401 Must login."""
    assert_error(api.post({"operation": "describe_all"}, auth=None), 401, "Must login")


def test_wrong_password(api):
    """A wrong password is 401 Login failed."""
    response = api.post({"operation": "describe_all"}, auth=("admin", "nope"))
    assert_error(response, 401, "Login failed")


def test_unknown_user(api):
    """An unknown user is 401 Login failed, the same as a wrong password."""
    response = api.post({"operation": "describe_all"}, auth=("mallory", "test-password"))
    assert_error(response, 401, "Login failed")


@pytest.mark.parametrize("header", ["Basic !!!", "Basic " + "YWRtaW4=", "Bearer token", "Basic"])
def test_malformed_authorization_header(api, header):
    """A malformed Authorization header is a 401 with the one error shape."""
    response = raw_post(api, b'{"operation": "describe_all"}', auth=None,
                        headers={"authorization": header, "content-type": "application/json"})
    assert_error(response, 401)


def test_login_is_checked_before_the_body(api):
    """Without credentials even a malformed body gets 401 Must login."""
    assert_error(raw_post(api, b"{not json", auth=None), 401, "Must login")


def test_health_needs_no_login(node):
    """GET /health answers without credentials: status, node name, uptime and storage."""
    response = node.client.get(node.url + "health")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok"
    assert report["node_name"] == node.name
    assert isinstance(report["uptime_seconds"], int | float) and report["uptime_seconds"] >= 0
    assert isinstance(report["storage"], dict) and report["storage"]


def test_unknown_path_and_method(api):
    """An unknown path is 404 and a GET on / is 405, both in the JSON error shape."""
    assert_error(api.client.get(api.url + "nope"), 404)
    assert_error(api.client.get(api.url), 405)


# -- the request body -------------------------------------------------------------------
def test_missing_operation(api):
    """A body without ``operation`` is Harper's recorded 400."""
    response = api.post({"database": "dev", "table": "dog"})
    assert_error(response, 400, "Request body must include an 'operation' property.")


def test_unknown_operation(api):
    """An unknown operation is Harper's recorded 400."""
    assert_error(api.post({"operation": "no_such_op"}), 400, "Operation 'no_such_op' not found")


def test_unknown_operation_name_is_clipped(api):
    """A huge unknown operation name is not echoed back in full."""
    message = assert_error(api.post({"operation": "x" * 5000}), 400)
    assert len(message) < 200


@pytest.mark.parametrize("value", [5, None, ["insert"], {"op": 1}, True])
def test_operation_not_a_string(api, value):
    """An ``operation`` that is not a string is a 400 naming it."""
    message = assert_error(api.post({"operation": value}), 400)
    assert "operation" in message


@pytest.mark.parametrize("content", [
    b'{"operation": "describe_all",', b"{not json}", b"[1, 2", b"\xff\xfe\x00", b"nul",
])
def test_malformed_json(api, content):
    """Malformed JSON is a 400."""
    assert_error(raw_post(api, content), 400)


def test_empty_body(api):
    """An empty body is Harper's recorded 400."""
    assert_error(raw_post(api, b""), 400,
                 "Body cannot be empty when content-type is set to 'application/json'")
    assert_error(raw_post(api, b"  \n"), 400)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"describe_all"', b"42", b"null", b"true"])
def test_body_not_an_object(api, content):
    """A JSON body that is not an object is a 400."""
    assert_error(raw_post(api, content), 400, "Request body must be a JSON object")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_rejected(api, literal):
    """NaN, Infinity and out-of-range numbers are refused, not stored as invalid JSON."""
    content = b'{"operation": "insert", "database": "dev", "table": "dog", ' \
              b'"records": [{"id": 1, "x": ' + literal + b"}]}"
    assert_error(raw_post(api, content), 400)
    assert api.count("dog", "dev") == 0


@pytest.mark.parametrize("content", [
    b'{"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": "\\ud800"}]}',
    b'{"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1, '
    b'"\\udfff": 1}]}',
    b'{"operation": "delete", "database": "dev", "table": "dog", "ids": ["a\\uDC00"]}',
    b'{"operation": "add_user", "username": "\\ud800", "password": "p", "role": "super_user"}',
    b'{"operation": "add_user", "username": "zed", "password": "\\ud83d", "role": "super_user"}',
])
def test_lone_surrogate_escape_rejected(api, content):
    """A string holding an unpaired surrogate escape is a 400, wherever it appears."""
    assert "surrogate" in assert_error(raw_post(api, content), 400)


def test_surrogate_pair_escape_accepted(dev):
    """A correctly paired surrogate escape (an emoji) is ordinary text."""
    content = (b'{"operation": "insert", "database": "dev", "table": "dog", '
               b'"records": [{"id": "\\ud83d\\ude00", "n": "\\ud83d\\udc36"}]}')
    assert raw_post(dev, content).json()["inserted_hashes"] == ["\U0001f600"]
    found = dev.call("search_by_id", database="dev", table="dog", ids=["\U0001f600"])
    assert found[0]["n"] == "\U0001f436"


def test_integer_literal_too_long(api):
    """An integer literal longer than Python parses is a 400, not a 500."""
    assert_error(raw_post(api, b'{"operation": "describe_all", "x": ' + b"9" * 5000 + b"}"),
                 400)


def test_nesting_too_deep(api):
    """JSON nested deeper than the parser allows is a 400."""
    content = b'{"operation": "describe_all", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(raw_post(api, content), 400)


@pytest.mark.parametrize("depth", [600, 1000])
def test_value_nested_too_deep_to_answer_is_refused(dev, depth):
    """A body nested deeper than MAX_DEPTH (512) levels is a 400. orjson reads 1024 levels
    but the standard library writes only about 990: a value nested 1000 deep, once
    stored, made every later read of its record, or scan of its table, a 500."""
    value = b"[" * depth + b"]" * depth
    content = (b'{"operation": "insert", "database": "dev", "table": "dog", "records": '
               b'[{"id": 4242, "v": ' + value + b"}]}")
    assert "nested" in assert_error(raw_post(dev, content), 400)
    response = dev.post({"operation": "search_by_value", "database": "dev", "table": "dog",
                         "attribute": "id", "value": "*"})
    assert response.status_code == 200, response.text
    assert 4242 not in [r["id"] for r in response.json()]


def test_body_over_size_limit(node_factory):
    """A body over operationsApi.network.maxBodySize is 413, declared or streamed."""
    small = node_factory("small", env={"OPERATIONSAPI_NETWORK_MAXBODYSIZE": "4096"})
    small.call("create_table", table="dog", primary_key="id")
    big = {"operation": "insert", "table": "dog", "records": [{"id": 1, "pad": "x" * 5000}]}
    assert_error(small.post(big), 413)

    def chunks():
        yield b'{"operation": "insert", "table": "dog", "records": [{"id": 2, "pad": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(raw_post(small, chunks()), 413)
    assert small.count("dog") == 0
    assert small.call("insert", table="dog", records=[{"id": 3, "pad": "z" * 1000}])[
        "inserted_hashes"] == [3]


# -- field validation -------------------------------------------------------------------
FIELD_CASES: list[tuple[dict[str, Any], str]] = [
    ({"operation": "insert", "database": "dev", "table": "dog"}, "'records' is required"),
    ({"operation": "insert", "database": "dev", "table": "dog", "records": {"id": 1}},
     "'records' must be an array"),
    ({"operation": "insert", "database": "dev", "table": "dog", "records": [1]},
     "'records[0]' must be an object"),
    ({"operation": "insert", "database": "dev", "records": []}, "'table' is required"),
    ({"operation": "insert", "database": "dev", "table": 5, "records": []},
     "'table' must be a string"),
    ({"operation": "create_table", "database": "dev", "table": "noattr"},
     "'primary_key' is required"),
    ({"operation": "create_table", "database": "dev", "table": "bad name!", "primary_key": "id"},
     "'table' must contain only letters, digits, underscore and dash"),
    ({"operation": "create_table", "database": "dev", "table": "t", "primary_key": "i d"},
     "'primary_key' must contain only letters, digits, underscore and dash"),
    ({"operation": "create_table", "database": "dev", "table": "dog\n", "primary_key": "id"},
     "'table' must contain only letters, digits, underscore and dash"),
    ({"operation": "create_table", "database": "dev", "table": "", "primary_key": "id"},
     "'table' must not be empty"),
    ({"operation": "create_database", "database": "my db"},
     "'database' must contain only letters, digits, underscore and dash"),
    ({"operation": "create_schema", "schema": "sch/ema"},
     "'database' must contain only letters, digits, underscore and dash"),
    ({"operation": "create_attribute", "database": "dev", "table": "dog", "attribute": "a.b"},
     "'attribute' must contain only letters, digits, underscore and dash"),
    ({"operation": "search_by_id", "database": "dev", "table": "dog"}, "'ids' is required"),
    ({"operation": "search_by_id", "database": "dev", "table": "dog", "ids": "1"},
     "'ids' must be an array"),
    ({"operation": "search_by_id", "database": "dev", "table": "dog", "ids": [1],
      "get_attributes": "id"}, "'get_attributes' must be an array"),
    ({"operation": "search_by_value", "database": "dev", "table": "dog",
      "search_attribute": "name"}, "'value' is required"),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog",
      "operator": "or", "get_attributes": ["id"],
      "conditions": [{"attribute": "age", "comparator": "between", "value": [1, 10]}]},
     'An "or" operator requires at least two conditions'),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog",
      "conditions": [{"comparator": "equals", "value": 1}]},
     "'conditions[0].attribute' is required"),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog",
      "conditions": [{"attribute": "age", "comparator": "between", "value": 3}]},
     "'conditions[0].value' must be an array"),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog", "limit": "10",
      "conditions": [{"attribute": "age", "comparator": "equals", "value": 3}]},
     "'limit' must be an integer"),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog", "offset": -1,
      "conditions": [{"attribute": "age", "comparator": "equals", "value": 3}]},
     "'offset' must be >= 0"),
    ({"operation": "search_by_conditions", "database": "dev", "table": "dog",
      "sort": {"descending": True},
      "conditions": [{"attribute": "age", "comparator": "equals", "value": 3}]},
     "'sort.attribute' is required"),
    ({"operation": "delete", "database": "dev", "table": "dog", "ids": []},
     "'ids' must not be empty"),
    ({"operation": "delete", "database": "dev", "table": "dog", "ids": [{"id": 1}]},
     "'ids[0]' must be a string or a number"),
    ({"operation": "add_user", "username": "amy", "password": "pw", "role": "super_user",
      "active": "yes"}, "'active' must be a boolean"),
    ({"operation": "add_user", "username": "amy", "role": "super_user"},
     "'password' is required"),
    ({"operation": "add_role", "role": "r", "permission": "all"},
     "'permission' must be an object"),
    ({"operation": "drop_user"}, "'username' is required"),
    # str.isdigit() holds for superscripts and other scripts' digits, which int() refuses
    ({"operation": "wait_for_replication", "version": "\u00b2"},
     "'version' must be an integer or a string of digits"),
]


@pytest.mark.parametrize(("body", "message"), FIELD_CASES,
                         ids=[f"{b['operation']}-{i}" for i, (b, _) in enumerate(FIELD_CASES)])
def test_field_problem_is_400_naming_the_field(api, body, message):
    """Each field problem is a 400 whose one message names the field."""
    assert_error(api.post(body), 400, message)


def test_search_comparator_unknown(api):
    """An unknown comparator (legacy search_type) is Harper's recorded 400."""
    response = api.post({"operation": "search_by_conditions", "database": "dev", "table": "dog",
                         "conditions": [{"search_attribute": "age", "search_type": "bogus",
                                         "search_value": 1}]})
    assert_error(response, 400, 'Unknown query comparator "bogus"')


def test_insert_into_missing_table(api):
    """An insert into a missing table is Harper's recorded 400."""
    response = api.post({"operation": "insert", "database": "dev", "table": "missing",
                         "records": [{"id": 1}]})
    assert_error(response, 400, "Table 'dev.missing' does not exist")


def test_insert_into_missing_database(api):
    """An insert into a missing database is Harper's recorded 400."""
    response = api.post({"operation": "insert", "database": "nodb", "table": "dog",
                         "records": [{"id": 1}]})
    assert_error(response, 400, "database 'nodb' does not exist")


def test_insert_without_database_names_data(api):
    """Without ``database`` the default is ``data``, and the error names it."""
    response = api.post({"operation": "insert", "table": "dog", "records": [{"id": 77}]})
    assert_error(response, 400, "database 'data' does not exist")


@pytest.mark.parametrize("operation", ["update", "upsert"])
def test_write_to_missing_table(api, operation):
    """update and upsert into a missing table are 400s naming it."""
    response = api.post({"operation": operation, "database": "dev", "table": "missing",
                         "records": [{"id": 1}]})
    assert_error(response, 400, "Table 'dev.missing' does not exist")


def test_delete_from_missing_table(api):
    """A delete from a missing table is a 400 naming it."""
    response = api.post({"operation": "delete", "database": "dev", "table": "missing",
                         "ids": [1]})
    assert_error(response, 400, "Table 'dev.missing' does not exist")


def test_describe_missing_table_is_404(api):
    """describe_table of a missing table is Harper's recorded 404."""
    response = api.post({"operation": "describe_table", "database": "dev", "table": "nope"})
    assert_error(response, 404, "Table 'dev.nope' does not exist")


@pytest.mark.parametrize("operation", ["search_by_id", "search_by_value"])
def test_search_missing_table_is_404(api, operation):
    """A search of a missing table is a 404 naming it."""
    body = {"operation": operation, "database": "dev", "table": "nope", "ids": [1],
            "attribute": "a", "value": 1}
    assert_error(api.post(body), 404, "Table 'dev.nope' does not exist")


@pytest.mark.parametrize("record", [
    {"id": True}, {"id": [1]}, {"id": {"a": 1}}, {"id": 10**30}, {"id": -(2**64)},
    {"id": "x" * 600},
])
def test_bad_primary_key_value(api, record):
    """A primary key that is not a storable string or number is a 400; nothing is written."""
    response = api.post({"operation": "insert", "database": "dev", "table": "dog",
                         "records": [{"id": 1}, record]})
    assert_error(response, 400)
    assert api.count("dog", "dev") == 0


def test_unstorable_value_is_400(api):
    """An integer beyond 64 bits in a record is a 400 naming the record; nothing is written."""
    response = api.post({"operation": "insert", "database": "dev", "table": "dog",
                         "records": [{"id": 1}, {"id": 2, "big": 10**30}]})
    assert "records[1]" in assert_error(response, 400)
    assert api.count("dog", "dev") == 0


def test_failed_request_leaves_no_trace(dev):
    """After a failed insert the table and its log are as before, and writes still work."""
    dev.call("insert", database="dev", table="dog", records=[{"id": 1}])
    dev.post({"operation": "insert", "database": "dev", "table": "dog",
              "records": [{"id": 2}, {"id": True}]})
    dev.post({"operation": "insert", "database": "dev", "table": "dog", "records": "x"})
    assert dev.call("search_by_conditions", database="dev", table="dog", get_attributes=["id"],
                    conditions=[{"attribute": "id", "comparator": "greater_than",
                                 "value": 0}]) == [{"id": 1}]
    assert dev.call("insert", database="dev", table="dog", records=[{"id": 2}])[
        "inserted_hashes"] == [2]


def test_forbidden_body_has_harper_keys(node):
    """A 403 carries Harper's unauthorized_access and invalid_schema_items keys."""
    node.call("add_role", role="nobody", permission={"super_user": False})
    node.call("add_user", role="nobody", username="eve", password="evepw")
    response = node.post({"operation": "create_database", "database": "x"}, auth=("eve", "evepw"))
    assert response.status_code == 403
    assert harper_error(response.json()) == {
        "error": "This operation is not authorized due to role restrictions and/or invalid "
                 "database items",
        "unauthorized_access": ["Operation 'createDatabase' is restricted to 'super_user' roles"],
        "invalid_schema_items": []}


def test_metrics_count_operations_and_expose_link_gauges(node):
    """GET /metrics is Prometheus text that counts answered operations by name and status."""
    node.call("describe_all")
    node.post({"operation": "no_such_op"})
    text = node.client.get(node.url + "metrics", auth=ADMIN).text
    assert 'harpsync_operations_total{operation="describe_all",status="200"}' in text
    assert 'harpsync_operations_total{operation="rejected",status="400"}' in text
    assert "harpsync_process_rss_bytes" in text
