"""get_configuration, set_configuration, restart and restart_service on real nodes.

Shapes follow Harper's configuration and system-operations documentation (4.7).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import harpsync.node
from tests.helpers import ADMIN, InProcessNode, wait_for


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


def test_a_client_not_reading_its_answer_holds_a_stop_only_for_the_grace(
        node_factory: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop (what a restart runs) waits ``SHUTDOWN_GRACE`` for an answer a client does
    not read, then closes that connection and says so in the log."""
    monkeypatch.setattr(harpsync.node, "SHUTDOWN_GRACE", 0.5)
    node = node_factory("stalled")
    node.call("create_table", database="dev", table="dog", primary_key="id")
    for batch in range(4):  # an answer of about 8 MB: more than both socket buffers hold
        node.call("insert", database="dev", table="dog",
                  records=[{"id": batch * 1000 + i, "pad": "x" * 2000} for i in range(1000)])
    body = json.dumps({"operation": "search_by_value", "database": "dev", "table": "dog",
                       "search_attribute": "id", "search_value": "*",
                       "get_attributes": ["*"]}).encode()
    auth = base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode())
    with socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", node.ops_port))
        reader.sendall(b"POST / HTTP/1.1\r\nHost: node\r\nAuthorization: Basic " + auth
                       + b"\r\nContent-Type: application/json\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert reader.recv(15) == b"HTTP/1.1 200 OK"  # the answer started, then unread
        caplog.set_level(logging.WARNING)
        node.stop()
        assert node.node.storage.writer._thread.is_alive() is False  # the stop finished
        stuck = [r.getMessage() for r in caplog.records if "still open" in r.getMessage()]
        assert stuck == ["stopping: 1 operations API connection(s) still open after 0.5 s "
                         "(a client not reading its response?); closing them"]
        reader.settimeout(30)  # closed, not left open: what the buffers held, then the end
        received = 15
        with contextlib.suppress(ConnectionResetError):
            while chunk := reader.recv(1 << 20):
                received += len(chunk)
        assert received < 4000 * 2000
