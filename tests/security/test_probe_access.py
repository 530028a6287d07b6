"""``/metrics`` needs a super user's login unless ``operationsApi.metrics.allowAnonymous``;
``/health``, ``/health/{component}`` and ``/ready`` need none but answer anonymous
probes with their status only (no data directory, ports, peers or databases)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import ADMIN, harper_error
from tests.repl_util import join, wait_linked


def _get(node: Any, path: str, auth: tuple[str, str] | None = None) -> Any:
    return node.client.get(node.url + path, auth=auth)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["request_id"] == response.headers["x-request-id"]
    return harper_error(body)


@pytest.mark.timeout(120)
def test_metrics_need_a_super_users_login(node_factory):
    """Anonymous: 401 Must login; a wrong password: 401 Login failed; a user who is not
    a super user: 403; a super user: the Prometheus text."""
    a = node_factory("node-a")
    a.call("add_role", role="reader", permission={"super_user": False})
    a.call("add_user", username="rita", password="rita-pw", role="reader", active=True)
    assert _error(_get(a, "metrics"), 401, "UNAUTHORIZED") == {"error": "Must login"}
    assert _error(_get(a, "metrics", ("admin", "wrong")), 401,
                  "UNAUTHORIZED") == {"error": "Login failed"}
    refused = _error(_get(a, "metrics", ("rita", "rita-pw")), 403, "FORBIDDEN")
    assert refused["unauthorized_access"] == ["GET /metrics is restricted to 'super_user' roles"]
    ok = _get(a, "metrics", ADMIN)
    assert ok.status_code == 200 and "harpsync_operations_total" in ok.text
    assert ok.headers["content-type"].startswith("text/plain")


@pytest.mark.timeout(120)
def test_anonymous_metrics_when_the_operator_allows_them(node_factory):
    """``OPERATIONSAPI_METRICS_ALLOWANONYMOUS=true`` serves /metrics without a login."""
    a = node_factory("node-a", env={"OPERATIONSAPI_METRICS_ALLOWANONYMOUS": "true"})
    response = _get(a, "metrics")
    assert response.status_code == 200 and "harpsync_operations_total" in response.text


@pytest.mark.timeout(120)
def test_anonymous_probes_answer_their_status_only(node_factory):
    """Without a login /health, /ready and the built-in components answer their status
    and code but no data directory, ports, peers or databases; a peer's component needs
    a super user (401 anonymously, for a name that is no peer as well); with the
    admin's login every detail is there as before."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(b, a)], ("system",))
    health = _get(a, "health")
    assert health.status_code == 200
    report = health.json()
    assert set(report) == {"status", "node_name", "uptime_seconds", "storage"}
    assert report["storage"] == {"state": "ok"} and report["node_name"] == "node-a"
    assert str(a.node.config.root) not in health.text and "node-b" not in health.text
    assert _get(a, "ready").json() == {"ready": True}
    for name in ("storage", "operations_api", "replication"):
        part = _get(a, f"health/{name}")
        assert part.status_code == 200, part.text
        assert part.json() == {"component": name, "status": "ok"}
    for name in ("node-b", "no-such-peer"):
        assert _error(_get(a, f"health/{name}"), 401, "UNAUTHORIZED") == {
            "error": "Must login"}

    full = _get(a, "health", ADMIN).json()
    assert full["storage"]["root"] == str(a.node.config.root)
    assert {link["node"] for link in full["peers"]} == {"node-b"}
    assert "replication" in full["listeners"]
    assert _get(a, "health/replication", ADMIN).json()["links"]
    assert _get(a, "health/node-b", ADMIN).json()["node"] == "node-b"
    assert _get(a, "health/no-such-peer", ADMIN).status_code == 404
    assert _error(_get(a, "health", ("admin", "wrong")), 401,
                  "UNAUTHORIZED") == {"error": "Login failed"}
