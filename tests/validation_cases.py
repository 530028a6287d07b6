"""The catalogue the validation tests share: the canonical operations (one schema each),
a realistic valid body for every one of them, and ``message``, which returns the
message of the ValidationError a body raises.

The invalid bodies live with their family: tests/test_validation_schema_ops.py,
test_validation_data_ops.py and test_validation_user_cluster_ops.py; the property tests
are in test_validation_properties.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from harpsync.errors import BadRequestError, ValidationError
from harpsync.validation import SchemaRegistry

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


def message(registry: SchemaRegistry, op: str, body: Any) -> str:
    """Validate and return the ValidationError message (fails if nothing was raised)."""
    with pytest.raises(ValidationError) as info:
        registry.validate(op, body)
    return info.value.message


__all__ = ["CANONICAL_OPERATIONS", "PERMISSION", "SUBSCRIPTION", "VALID", "message"]


def refused_with(registry: SchemaRegistry, op: str, body: dict[str, Any], expected: str,
                 ) -> None:
    """``body`` for ``op`` raises one 400 ValidationError with exactly ``expected``."""
    with pytest.raises(ValidationError) as info:
        registry.validate(op, {"operation": op, **body})
    assert info.value.message == expected
    assert info.value.status == 400
    assert isinstance(info.value, BadRequestError)
