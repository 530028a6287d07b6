"""get_configuration, set_configuration, restart and restart_service on real nodes.

Shapes follow Harper's configuration and system-operations documentation (4.7).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import InProcessNode, wait_for


def test_get_and_set_configuration(tmp_path: Path) -> None:
    """get_configuration shows the effective settings without secrets; set_configuration
    validates, writes config.yaml, applies live keys and names those needing a restart."""
    root = tmp_path / "cfg"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({
        "custom": {"apiToken": "s3cret", "name": "kept"},
        "logging": {"auditRetention": "3d"}}))
    node = InProcessNode("cfg", root).start()
    try:
        config = node.call("get_configuration")
        assert config["operationsApi"]["network"]["port"] == node.ops_port
        assert config["replication"]["hostname"] == "cfg"
        assert config["custom"] == {"name": "kept"}
        assert "s3cret" not in str(config)

        body = node.call("set_configuration", logging_auditRetention="2d",
                         operationsApi={"network": {"maxBodySize": 2_000_000}})
        assert body == {
            "message": "Configuration successfully set. You must restart harpsync for new "
                       "config settings to take effect.",
            "applied": ["logging.auditRetention"],
            "restart_required": ["operationsApi.network.maxBodySize"],
            "overridden_by_environment": []}
        written = yaml.safe_load((root / "config.yaml").read_text())
        assert written["logging"] == {"auditRetention": "2d"}
        assert written["operationsApi"]["network"]["maxBodySize"] == 2_000_000
        assert written["custom"] == {"apiToken": "s3cret", "name": "kept"}
        config = node.call("get_configuration")
        assert config["logging"]["auditRetention"] == "2d"  # live
        assert config["operationsApi"]["network"]["maxBodySize"] == 10 * 1024 * 1024

        # The tests set LOGGING_LEVEL in the environment, which wins over the file.
        body = node.call("set_configuration", **{"logging.level": "debug"})
        assert body["message"] == "Configuration successfully set."
        assert body["overridden_by_environment"] == ["logging.level"]

        for settings, fragment in (
                ({"logging_level": "loud"}, "logging.level must be one of"),
                ({"operationsApi_network_port": 70000}, "operationsApi.network.port"),
                ({"replication_compression": "gzip"}, "replication.compression"),
                ({"clustering_enabled": True}, "unknown configuration key "
                                               "'clustering_enabled'"),
                ({}, "at least one setting")):
            response = node.post({"operation": "set_configuration", **settings})
            assert response.status_code == 400, (settings, response.text)
            assert fragment in response.json()["error"], (settings, response.text)
        assert yaml.safe_load((root / "config.yaml").read_text())["logging"] == {
            "auditRetention": "2d", "level": "debug"}  # nothing half-written

        body = node.call("restart", expect=400)
        assert "not started by 'harpsync run'" in body["error"]
        node.call("add_role", role="r", permission={"super_user": False})
        node.call("add_user", role="r", username="bob", password="bobpw", active=True)
        for op in ("get_configuration", "set_configuration", "restart"):
            response = node.post({"operation": op, "logging_level": "info"},
                                 auth=("bob", "bobpw"))
            assert response.status_code == 403, op
    finally:
        node.close()


def test_restart_keeps_addresses_and_reads_new_settings(node_factory: Any) -> None:
    """restart answers as Harper, the process runs again on the same sockets with the
    settings written before it, and the data is still there."""
    node = node_factory("restarts", process=True)
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("insert", database="dev", table="dog", records=[{"id": 1}])
    node.call("set_configuration", operationsApi_network_maxBodySize=2_000_000)
    pid = node.proc.pid
    asked = time.monotonic()
    assert node.call("restart") == {
        "message": "Restarting HarperDB. This may take up to 60 seconds."}
    seen: list[tuple[float, float]] = []

    def restarted() -> bool:
        # A run that started after the restart was asked for is up for less time than
        # has passed since (the node's uptime and this clock are both CLOCK_MONOTONIC);
        # the old run, always for more. ``since`` is read before the request, so the
        # old run's answer can never pass. (Comparing with the old run's uptime raced:
        # under load the new run's own start outlasted it, and never answered below.)
        since = time.monotonic() - asked
        health = node.client.get(node.url + "health", timeout=2).json()
        seen.append((round(since, 3), health["uptime_seconds"]))
        return bool(health["uptime_seconds"] < since)

    try:
        wait_for(restarted, timeout=60, message="the node to run again")
    except AssertionError as exc:
        state = "running" if node.proc.poll() is None else f"exited {node.proc.returncode}"
        raise AssertionError(
            f"{exc}; process {state}; (seconds since restart, uptime) of the last "
            f"answers: {seen[-5:]} of {len(seen)}; the node's log ends: "
            f"{node.log_path.read_text()[-3000:]}") from None
    assert node.proc.pid == pid and node.proc.poll() is None  # the same process, exec'd
    config = node.call("get_configuration")
    assert config["operationsApi"]["network"]["maxBodySize"] == 2_000_000
    assert node.count("dog", "dev") == 1
    response = node.post({"operation": "restart_service", "service": "everything"})
    assert response.status_code == 400 and "'service'" in response.json()["error"]
    response = node.post({"operation": "restart_service", "service": "http_workers"})
    assert response.json() == {"message": "Restarting http_workers"}
    # No need to wait: a SIGTERM during the restart (the teardown's) stops it for good.
