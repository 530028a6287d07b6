"""The node as a process: a second node on the same root, start-up errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ADMIN, ProcessNode, bind_socket, wait_for

pytestmark = pytest.mark.timeout(90)


def test_second_node_on_the_same_root_refuses(tmp_path: Path) -> None:
    """A second ``harpsync run`` on a root a running node holds exits with a clear error."""
    first = ProcessNode("node-a", tmp_path / "a").start()
    try:
        first.call("create_table", table="dog", primary_key="id")
        first.call("insert", table="dog", records=[{"id": 1}])
        env = {**os.environ, **first.env(), "OPERATIONSAPI_NETWORK_PORT": "0",
               "REPLICATION_PORT": "0", "REPLICATION_URL": ""}
        proc = subprocess.Popen([sys.executable, "-m", "harpsync.cli", "run", "--root",
                                 str(first.root)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"a second node ran on the same root: {out[-1000:]}")
        assert proc.returncode != 0, out
        assert "in use by another" in out, out
        assert "Traceback" not in out, out
        assert first.count("dog") == 1
    finally:
        first.close()


def test_unusable_map_size_is_a_clear_error(tmp_path: Path) -> None:
    """A ``storage.mapSize`` LMDB cannot map stops the start with a message, no traceback."""
    env = {**os.environ, "STORAGE_MAPSIZE": str(1 << 60), "OPERATIONSAPI_NETWORK_PORT": "0",
           "REPLICATION_PORT": "0", "HDB_ADMIN_PASSWORD": "x", "LOGGING_LEVEL": "error"}
    proc = subprocess.run([sys.executable, "-m", "harpsync.cli", "run", "--root",
                           str(tmp_path / "a")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "storage.mapSize" in proc.stderr, proc.stderr


def _start_in(cwd: Path, node: ProcessNode, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    """``harpsync run`` with no --root and no --config, from ``cwd``."""
    env = {**os.environ, **node.env(), **extra,
           "HARPSYNC_OPS_FD": str(node.ops_sock.fileno()),
           "HARPSYNC_REPL_FD": str(node.repl_sock.fileno())}
    proc = subprocess.Popen([sys.executable, "-m", "harpsync.cli", "run"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(node.ops_sock.fileno(), node.repl_sock.fileno()))
    node.proc = proc
    wait_for(node._ready, timeout=30, message="node to start")
    return proc


def test_settings_saved_under_rootpath_are_read_at_the_next_start(tmp_path: Path) -> None:
    """Without --root or ./config.yaml, set_configuration writes <rootPath>/config.yaml,
    and the next start (same command line) reads it back."""
    node = ProcessNode("node-a", tmp_path / "data")
    extra = {"ROOTPATH": str(tmp_path / "data")}
    try:
        _start_in(tmp_path, node, extra)
        answer = node.call("set_configuration", replication_verifyInterval="7m")
        assert answer["restart_required"] == ["replication.verifyInterval"]
        node.stop()
        _start_in(tmp_path, node, extra)
        config = node.call("get_configuration")
        assert config["replication"]["verifyInterval"] == "7m"
    finally:
        node.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_restart_listens_on_a_port_set_configuration_changed(tmp_path: Path) -> None:
    """After set_configuration of operationsApi.network.port and restart, the node
    answers on the new port (the old listener is not handed over)."""
    old, new = _free_port(), _free_port()
    root = tmp_path / "data"
    root.mkdir()
    (root / "config.yaml").write_text(
        f"operationsApi:\n  network:\n    port: {old}\nreplication:\n  port: 0\n")
    env = {**os.environ, "REPLICATION_HOSTNAME": "node-a", "HDB_ADMIN_USERNAME": ADMIN[0],
           "HDB_ADMIN_PASSWORD": ADMIN[1], "LOGGING_LEVEL": "warn"}
    proc = subprocess.Popen([sys.executable, "-m", "harpsync.cli", "run", "--root", str(root)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=10, auth=ADMIN) as http:
            def up(port: int) -> bool:
                assert proc.poll() is None
                return http.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success

            wait_for(lambda: up(old), timeout=30, message="the node to start")
            answer = http.post(f"http://127.0.0.1:{old}/", json={
                "operation": "set_configuration", "operationsApi_network_port": new})
            assert answer.json()["restart_required"] == ["operationsApi.network.port"]
            http.post(f"http://127.0.0.1:{old}/", json={"operation": "restart"})
            wait_for(lambda: up(new), timeout=30, message="the node on its new port")
            config = http.post(f"http://127.0.0.1:{new}/",
                               json={"operation": "get_configuration"}).json()
            assert config["operationsApi"]["network"]["port"] == new
    finally:
        proc.terminate()
        proc.wait(30)


def test_first_start_interrupted_between_the_ca_files_starts_again(tmp_path: Path) -> None:
    """A first start killed after writing ca.key but before ca.pem (no node certificate
    yet) does not keep the node from starting: the CA certificate is issued then."""
    node = ProcessNode("node-a", tmp_path / "a").start()
    try:
        node.kill()
        keys = node.root / "keys"
        for name in ("ca.pem", "node.pem", "node.key"):  # what such a kill leaves
            (keys / name).unlink()
        node.start()
        assert node.call("cluster_status")["node_name"] == "node-a"
        assert (keys / "ca.pem").exists() and (keys / "node.pem").exists()
    finally:
        node.close()


def test_a_lost_ca_certificate_is_a_clear_error(tmp_path: Path) -> None:
    """ca.key without ca.pem after node certificates were issued is refused with a
    message naming the files, not a traceback."""
    node = ProcessNode("node-a", tmp_path / "a").start()
    node.stop()
    (node.root / "keys" / "ca.pem").unlink()
    env = {**os.environ, **node.env(), "OPERATIONSAPI_NETWORK_PORT": "0",
           "REPLICATION_PORT": "0"}
    try:
        proc = subprocess.run([sys.executable, "-m", "harpsync.cli", "run", "--root",
                               str(node.root)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "ca.pem" in proc.stderr, proc.stderr
    finally:
        node.close()


def test_a_create_that_never_committed_leaves_no_database(node_factory: Any) -> None:
    """The environment a create opened before a crash kept it from committing is removed
    at start: the name reads as absent and create_database makes it (it said "already
    exists", and the database never replicated)."""
    from harpsync.storage.database import Database

    a = node_factory("node-a")
    a.stop()
    path = a.root / "database" / "ghost"
    Database("ghost", path, 1 << 30, "node-a").close()  # what such a crash leaves
    a.start()
    assert "ghost" not in a.call("describe_all")
    assert not path.exists()
    a.call("create_database", database="ghost")
    assert "ghost" in a.call("describe_all")
    a.restart()
    assert "ghost" in a.call("describe_all")  # a committed create (no tables) stays


def test_unusable_https_files_are_named(tmp_path: Path) -> None:
    """A TLS certificate or key that is missing or not PEM stops the start with a
    message naming the setting and the file, not a bare errno."""
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    for cert, key in ((tmp_path / "missing.pem", bad), (bad, bad)):
        env = {**os.environ, "OPERATIONSAPI_NETWORK_PORT": "0", "REPLICATION_PORT": "0",
               "OPERATIONSAPI_NETWORK_SECUREPORT": "0", "HDB_ADMIN_PASSWORD": "x",
               "OPERATIONSAPI_TLS_CERTIFICATE": str(cert),
               "OPERATIONSAPI_TLS_PRIVATEKEY": str(key), "LOGGING_LEVEL": "error"}
        proc = subprocess.run([sys.executable, "-m", "harpsync.cli", "run", "--root",
                               str(tmp_path / "a")], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "operationsApi.tls.certificate" in proc.stderr and str(cert) in proc.stderr, \
            proc.stderr


@pytest.mark.parametrize("taken", ["OPERATIONSAPI_NETWORK_PORT", "REPLICATION_PORT"])
def test_a_port_in_use_is_named(tmp_path: Path, taken: str) -> None:
    """A listener address already in use stops the start with the address and the
    setting named (it was a bare "[Errno 98] Address already in use")."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "OPERATIONSAPI_NETWORK_PORT": "0", "REPLICATION_PORT": "0",
               "REPLICATION_HOST": "127.0.0.1", taken: str(port),
               "HDB_ADMIN_PASSWORD": "x", "LOGGING_LEVEL": "error"}
        proc = subprocess.run([sys.executable, "-m", "harpsync.cli", "run", "--root",
                               str(tmp_path / "a")], env=env, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert ("replication.port" if taken == "REPLICATION_PORT" else "port") in proc.stderr


def test_replication_listens_on_ipv6(tmp_path: Path) -> None:
    """``replication.host: "::"`` binds (it was bound as IPv4 and failed to start)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    ops = bind_socket()
    port = ops.getsockname()[1]
    env = {**os.environ, "REPLICATION_HOST": "::", "REPLICATION_PORT": "0",
           "REPLICATION_HOSTNAME": "node-a", "HDB_ADMIN_PASSWORD": "x",
           "LOGGING_LEVEL": "error", "HARPSYNC_OPS_FD": str(ops.fileno())}
    proc = subprocess.Popen([sys.executable, "-m", "harpsync.cli", "run", "--root",
                             str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, pass_fds=(ops.fileno(),))

    def up() -> bool:
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(proc.stderr.read())
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success

    try:
        wait_for(up, timeout=30, message="the node to start")
    finally:
        proc.terminate()
        proc.wait(30)
        ops.close()
