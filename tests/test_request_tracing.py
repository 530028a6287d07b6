"""Request ids and error codes: every response carries ``X-Request-Id`` (a well-formed
one sent by the client is kept), every error body is Harper's ``error`` plus ``code``
(seed 000 section 6.2) and ``request_id``, and log lines about a request carry its id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harpsync.dispatch import Operation
from tests.helpers import ADMIN, InProcessNode, harper_error

FORBIDDEN = ("This operation is not authorized due to role restrictions and/or invalid "
             "database items")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One node with a 4 KiB body limit, a dev.dog table and a role user without rights."""
    shared = InProcessNode("trace", tmp_path_factory.mktemp("trace") / "trace",
                           {"OPERATIONSAPI_NETWORK_MAXBODYSIZE": "4096"}).start()
    shared.call("create_table", database="dev", table="dog", primary_key="id")
    shared.call("add_role", role="nobody", permission={"super_user": False})
    shared.call("add_user", role="nobody", username="eve", password="evepw", active=True)
    yield shared
    shared.close()


def raw(node: Any, content: bytes, **headers: str) -> httpx.Response:
    return node.client.post(node.url, content=content, auth=ADMIN,
                            headers={"content-type": "application/json", **headers})


def check_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error shape: Harper's keys, then ``code`` and ``request_id`` = the header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"], body
    assert isinstance(harper_error(body)["error"], str) and body["error"]
    return body


def test_every_response_carries_a_request_id(node):
    """Operations, /health, /metrics, unknown paths and methods all answer X-Request-Id,
    a new one each time."""
    responses = [node.post({"operation": "describe_all"}),
                 node.client.get(node.url + "health"),
                 node.client.get(node.url + "metrics"),
                 node.client.get(node.url + "nope"),
                 node.client.get(node.url)]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids), ids


def test_a_client_request_id_is_kept_and_a_bad_one_replaced(node):
    """A well-formed X-Request-Id comes back in the header and error body; one with
    spaces or over 128 characters is replaced by a generated id."""
    ok = node.post({"operation": "describe_all"}, headers={"X-Request-Id": "order-42:retry.1"})
    assert ok.headers["x-request-id"] == "order-42:retry.1"
    failed = node.post({"operation": "nope"}, headers={"X-Request-Id": "order-43"})
    assert check_error(failed, 400, "VALIDATION_ERROR")["request_id"] == "order-43"
    for bad in ("two words", "x" * 129, "semi;colon"):
        response = node.post({"operation": "describe_all"}, headers={"X-Request-Id": bad})
        assert response.headers["x-request-id"].startswith("req-"), bad
    health = node.client.get(node.url + "health", headers={"X-Request-Id": "probe-1"})
    assert health.headers["x-request-id"] == "probe-1"


def test_every_error_path_has_a_code_and_the_request_id(node):
    """400 (malformed and invalid), 401, 403, 404, 405, 409 and 413 keep Harper's text and
    add their code."""
    check_error(raw(node, b"{nope"), 400, "INVALID_REQUEST")
    body = check_error(node.post({"operation": "insert", "database": "dev", "table": "dog",
                                  "records": "x"}), 400, "VALIDATION_ERROR")
    assert body["error"] == "'records' must be an array"
    assert check_error(node.post({"operation": "describe_all"}, auth=None), 401,
                       "UNAUTHORIZED")["error"] == "Must login"
    forbidden = check_error(node.post({"operation": "create_database", "database": "x"},
                                      auth=("eve", "evepw")), 403, "FORBIDDEN")
    assert harper_error(forbidden) == {
        "error": FORBIDDEN, "invalid_schema_items": [],
        "unauthorized_access": ["Operation 'createDatabase' is restricted to 'super_user' "
                                "roles"]}
    missing = check_error(node.post({"operation": "describe_table", "database": "dev",
                                     "table": "nope"}), 404, "NOT_FOUND")
    assert missing["error"] == "Table 'dev.nope' does not exist"
    check_error(node.client.get(node.url + "nope"), 404, "NOT_FOUND")
    check_error(node.client.get(node.url), 405, "METHOD_NOT_ALLOWED")
    check_error(node.post({"operation": "add_user", "role": "nobody", "username": "eve",
                           "password": "x", "active": True}), 409, "CONFLICT")
    too_big = raw(node, b'{"operation": "describe_all", "pad": "' + b"x" * 5000 + b'"}')
    check_error(too_big, 413, "PAYLOAD_TOO_LARGE")


def test_throttled_logins_answer_429_with_its_code(node):
    """Failed logins from one address end in 429 RATE_LIMIT_EXCEEDED with Retry-After."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"),
                      timeout=60) as client:
        for _ in range(10):
            wrong = client.post(node.url, json={"operation": "describe_all"},
                                auth=("admin", "guess"))
            check_error(wrong, 401, "UNAUTHORIZED")
        blocked = client.post(node.url, json={"operation": "describe_all"},
                              auth=("admin", "another-guess"))
        check_error(blocked, 429, "RATE_LIMIT_EXCEEDED")
        assert int(blocked.headers["retry-after"]) > 0


def test_an_unexpected_failure_is_500_and_logged_with_the_request_id(node, caplog):
    """A handler that raises (the real system_information is swapped for one that fails)
    answers 500 INTERNAL_ERROR, and the logged traceback carries the request's id."""
    dispatcher = node.node.dispatcher
    real = dispatcher.operations["system_information"]

    async def broken(ctx: Any, body: dict[str, Any]) -> Any:
        raise RuntimeError("disk on fire")

    dispatcher.register(Operation("system_information", broken))
    caplog.set_level(logging.DEBUG, logger="harpsync")
    try:
        response = node.post({"operation": "system_information"},
                             headers={"X-Request-Id": "boom-1"})
    finally:
        dispatcher.register(real)
    body = check_error(response, 500, "INTERNAL_ERROR")
    assert "disk on fire" not in response.text and "Traceback" not in response.text
    assert body["request_id"] == "boom-1"
    failures = [r for r in caplog.records if r.exc_info and r.name == "harpsync.app"]
    assert failures and all(r.request_id == "boom-1" for r in failures)
    assert " [boom-1]" in failures[0].request_tag


def test_log_lines_about_a_request_carry_its_id(node, caplog):
    """Every record written while serving a request carries that request's id."""
    caplog.set_level(logging.DEBUG, logger="harpsync")
    node.post({"operation": "insert", "database": "dev", "table": "dog",
               "records": [{"id": 1}]}, headers={"X-Request-Id": "write-7"})
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "write-7"]
    assert any("insert" in r.getMessage() for r in lines), [r.getMessage() for r in lines]
