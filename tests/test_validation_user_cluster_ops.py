"""Validation of the user, role, cluster, replication and system operations
(operations/users.py, cluster.py, cluster_admin.py, dashboard.py, system.py): the
messages for invalid user and role bodies, and for invalid node, route, stream,
pause/replay, cluster overview and system_information bodies.
"""

from __future__ import annotations

from typing import Any

import pytest

from harpsync.validation import SchemaRegistry
from tests.validation_cases import refused_with

# (operation, body, exact expected message)
INVALID: list[tuple[str, dict[str, Any], str]] = [
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


@pytest.mark.parametrize(("op", "body", "expected"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_body_message(
    registry: SchemaRegistry, op: str, body: dict[str, Any], expected: str
) -> None:
    """An invalid body raises one 400 ValidationError whose message names the field."""
    refused_with(registry, op, body, expected)
