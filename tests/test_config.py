"""Configuration: defaults, then config.yaml, then environment, then validate(); and the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harpsync.config import Config, env_name
from harpsync.errors import ConfigError
from tests.helpers import harper_error

REPO = Path(__file__).resolve().parents[1]


def load(env: dict[str, str] | None = None, path: Path | None = None) -> Config:
    return Config.load(path, env=env or {})


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m harpsync.cli`` with a clean HARPSYNC/HDB environment."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("HDB_", "HARPSYNC_", "OPERATIONSAPI_", "REPLICATION_",
                                 "LOGGING_", "ROOTPATH"))}
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "harpsync.cli", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# -- defaults, file, environment -------------------------------------------------------
def test_defaults():
    """Without file or environment, Harper's defaults apply and the node name is the host."""
    config = load()
    assert config.get("rootPath") == "./hdb"
    assert config.get("operationsApi.network.port") == 9925
    assert config.get("operationsApi.network.host") == "127.0.0.1"
    assert config.get("replication.port") == 9933
    assert config.get("replication.url") is None
    assert config.get("logging.level") == "info"
    assert config.node_name == socket.gethostname()
    assert config.replication_url() == f"wss://{socket.gethostname()}:9933"
    assert config.retention_ms() == 3 * 86_400_000


def test_env_name():
    """A key's environment variable is its path upper-cased and joined with '_'."""
    assert env_name("operationsApi.network.port") == "OPERATIONSAPI_NETWORK_PORT"
    assert env_name("rootPath") == "ROOTPATH"
    assert env_name("replication.hostname") == "REPLICATION_HOSTNAME"


def test_yaml_file(tmp_path):
    """Values in config.yaml override the defaults and keep the others."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "rootPath: /srv/harp\n"
        "operationsApi:\n  network:\n    port: 9935\n"
        "replication:\n  hostname: node-b\n  url: wss://node-b.example:9943\n  port: 9943\n"
        "logging:\n  level: debug\n  auditRetention: 12h\n")
    config = load(path=path)
    assert config.get("rootPath") == "/srv/harp"
    assert config.get("operationsApi.network.port") == 9935
    assert config.get("operationsApi.network.host") == "127.0.0.1"  # default kept
    assert config.node_name == "node-b"
    assert config.replication_url() == "wss://node-b.example:9943"
    assert config.get("replication.port") == 9943
    assert config.get("logging.level") == "debug"
    assert config.retention_ms() == 12 * 3_600_000
    assert config.path == path


def test_shipped_config_is_valid():
    """The shipped config.yaml loads without edits."""
    config = load(path=REPO / "config.yaml")
    assert config.get("operationsApi.network.port") == 9925


def test_missing_yaml_file_uses_defaults(tmp_path):
    """A config path that does not exist leaves the defaults."""
    assert load(path=tmp_path / "absent.yaml").get("replication.port") == 9933


@pytest.mark.parametrize(("variable", "raw", "key", "expected"), [
    ("ROOTPATH", "./data-b", "rootPath", "./data-b"),
    ("ROOTPATH", "2024", "rootPath", "2024"),
    ("OPERATIONSAPI_NETWORK_PORT", "9935", "operationsApi.network.port", 9935),
    ("OPERATIONSAPI_NETWORK_HOST", "0.0.0.0", "operationsApi.network.host", "0.0.0.0"),
    ("REPLICATION_HOSTNAME", "node-b", "replication.hostname", "node-b"),
    ("REPLICATION_HOSTNAME", "123", "replication.hostname", "123"),
    ("REPLICATION_URL", "wss://node-b:9943", "replication.url", "wss://node-b:9943"),
    ("REPLICATION_PORT", "9943", "replication.port", 9943),
    ("LOGGING_LEVEL", "warn", "logging.level", "warn"),
    ("OPERATIONSAPI_NETWORK_MAXBODYSIZE", "4096", "operationsApi.network.maxBodySize", 4096),
])
def test_env_override(variable, raw, key, expected):
    """Each environment variable overrides its key, with numbers parsed and text kept."""
    assert load({variable: raw}).get(key) == expected


def test_env_beats_yaml(tmp_path):
    """The environment overrides config.yaml."""
    path = tmp_path / "config.yaml"
    path.write_text("operationsApi:\n  network:\n    port: 9935\n"
                    "replication:\n  hostname: from-file\n")
    config = load({"OPERATIONSAPI_NETWORK_PORT": "9936", "REPLICATION_HOSTNAME": "from-env"},
                  path)
    assert config.get("operationsApi.network.port") == 9936
    assert config.node_name == "from-env"


def test_root_argument_beats_everything(tmp_path):
    """An explicit root (``--root``) overrides ROOTPATH."""
    config = Config.load(None, env={"ROOTPATH": "/elsewhere"}, root=str(tmp_path))
    assert config.root == tmp_path.resolve()


def test_derived_replication_url():
    """Without replication.url, peers dial wss://<hostname>:<replication.port>."""
    config = load({"REPLICATION_HOSTNAME": "node-c", "REPLICATION_PORT": "9950"})
    assert config.replication_url() == "wss://node-c:9950"


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "key"), [
    ({"OPERATIONSAPI_NETWORK_PORT": "notaport"}, "operationsApi.network.port"),
    ({"OPERATIONSAPI_NETWORK_PORT": "70000"}, "operationsApi.network.port"),
    ({"OPERATIONSAPI_NETWORK_PORT": "true"}, "operationsApi.network.port"),
    ({"REPLICATION_PORT": "-1"}, "replication.port"),
    ({"REPLICATION_URL": "http://node-b:9943"}, "replication.url"),
    ({"REPLICATION_URL": "wss://a b"}, "replication.url"),
    ({"REPLICATION_HOSTNAME": "bad name"}, "replication.hostname"),
    ({"LOGGING_LEVEL": "loud"}, "logging.level"),
    ({"LOGGING_AUDITRETENTION": "forever"}, "logging.auditRetention"),
    ({"OPERATIONSAPI_NETWORK_MAXBODYSIZE": "12"}, "operationsApi.network.maxBodySize"),
    ({"ROOTPATH": ""}, "rootPath"),
    ({"REPLICATION_ROUTES": "not-a-list"}, "replication.routes"),
    ({"REPLICATION_PINGINTERVAL": "0"}, "replication.pingInterval"),
    ({"REPLICATION_RETENTIONINTERVAL": "0s"}, "replication.retentionInterval"),
    ({"OPERATIONSAPI_METRICS_ALLOWANONYMOUS": "maybe"}, "operationsApi.metrics.allowAnonymous"),
    ({"OPERATIONSAPI_NETWORK_MAXCONNECTIONSPERADDRESS": "-1"},
     "operationsApi.network.maxConnectionsPerAddress"),
])
def test_bad_value_raises_config_error_naming_key(env, key):
    """A bad value raises ConfigError whose message names the key."""
    with pytest.raises(ConfigError) as info:
        load(env)
    assert key in str(info.value)


def test_verify_interval_defaults_to_ten_minutes_and_is_validated():
    """replication.verifyInterval is 10 minutes unless set; 0 is allowed (off); a value
    that is not a duration names the key."""
    assert load({}).duration_ms("replication.verifyInterval") == 600_000
    assert load({"REPLICATION_VERIFYINTERVAL": "0"}).duration_ms(
        "replication.verifyInterval") == 0
    with pytest.raises(ConfigError, match="replication.verifyInterval"):
        load({"REPLICATION_VERIFYINTERVAL": "soon"})


def test_bad_yaml_value_names_key(tmp_path):
    """A bad value in config.yaml is reported with its key."""
    path = tmp_path / "config.yaml"
    path.write_text("replication:\n  port: lots\n")
    with pytest.raises(ConfigError, match="replication.port"):
        load(path=path)


def test_unreadable_yaml(tmp_path):
    """A config.yaml that is not YAML, or not a mapping, is a ConfigError naming the file."""
    path = tmp_path / "config.yaml"
    path.write_text("operationsApi: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        load(path=path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        load(path=path)


# -- the command line -----------------------------------------------------------------------
def test_run_with_bad_config_exits_with_one_line(tmp_path):
    """``harpsync run`` with a bad value exits non-zero with one line naming the key."""
    result = cli("run", "--root", str(tmp_path / "root"), cwd=tmp_path,
                 env={"OPERATIONSAPI_NETWORK_PORT": "notaport"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "operationsApi.network.port" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_run_with_bad_config_file_exits_with_one_line(tmp_path):
    """``harpsync run --config`` with a bad file value names the key on one line."""
    path = tmp_path / "bad.yaml"
    path.write_text("logging:\n  level: shouting\n")
    result = cli("run", "--config", str(path), "--root", str(tmp_path / "root"), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "logging.level" in lines[0], result.stderr


def test_call_prints_json(node, tmp_path):
    """``harpsync call describe_all`` prints the node's JSON answer and exits 0."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    result = cli("call", "describe_all", "--url", node.url, "--user", "admin",
                 "--password", "test-password", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    described: dict[str, Any] = json.loads(result.stdout)
    assert described["dev"]["dog"]["hash_attribute"] == "id"


def test_call_with_parameters(node, tmp_path):
    """key=value parameters are sent as fields, with JSON values parsed."""
    node.call("create_table", table="dog", primary_key="id")
    result = cli("call", "insert", "table=dog", 'records=[{"id": 1, "name": "rex"}]',
                 "--url", node.url, "--user", "admin", "--password", "test-password",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["inserted_hashes"] == [1]
    assert node.call("search_by_id", table="dog", ids=[1])[0]["name"] == "rex"


def test_call_error_exits_non_zero(node, tmp_path):
    """A failing operation prints the error JSON and exits non-zero."""
    result = cli("call", "describe_table", "table=nope", "--url", node.url, "--user", "admin",
                 "--password", "test-password", cwd=tmp_path)
    assert result.returncode != 0
    assert harper_error(json.loads(result.stdout)) == {"error": "database 'data' does not exist"}


def test_call_bad_password_exits_non_zero(node, tmp_path):
    """A failed login prints Harper's 401 body and exits non-zero."""
    result = cli("call", "describe_all", "--url", node.url, "--user", "admin",
                 "--password", "wrong", cwd=tmp_path)
    assert result.returncode != 0
    assert harper_error(json.loads(result.stdout)) == {"error": "Login failed"}


def test_replication_settings_are_typed_and_frozen():
    """The replication settings come out of the loader typed (durations in seconds)
    and frozen: a node cannot change one behind the config's back."""
    import dataclasses

    config = load({"REPLICATION_HOSTNAME": "node-x", "REPLICATION_PINGINTERVAL": "2s",
                   "REPLICATION_MAXCONNECTIONS": "7"})
    settings = config.replication_settings()
    assert settings.node_name == "node-x"
    assert settings.ping_interval == 2.0 and settings.retention_interval == 10.0
    assert settings.max_connections == 7 and settings.compression == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_saving_routes_keeps_the_config_file_private_whatever_the_umask(tmp_path):
    """``cluster_set_routes`` rewrites the config file as ``set_configuration`` does: a
    private file (0600), not one made with the umask (0666 under umask 0)."""
    path = tmp_path / "config.yaml"
    path.write_text("logging:\n  level: info\n")
    path.chmod(0o600)
    config = Config.load(path, env={})
    old = os.umask(0)
    try:
        config.save_routes(["wss://node-b:9933"])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Config.load(path, env={}).get("replication.routes") == ["wss://node-b:9933"]
    assert Config.load(path, env={}).get("logging.level") == "info"


def test_concurrent_setting_writes_keep_every_key(tmp_path):
    """write_settings from many threads at once (set_configuration runs it in a thread,
    add_node on the loop) loses no key, corrupts nothing and never fails."""
    import threading

    import yaml

    from harpsync.config import write_settings

    path = tmp_path / "config.yaml"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for round_ in range(20):
                write_settings(path, {f"k{n}.r{round_}": n})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    data = yaml.safe_load(path.read_text())
    assert data == {f"k{n}": {f"r{r}": n for r in range(20)} for n in range(8)}


def test_an_empty_section_keeps_its_defaults(tmp_path):
    """A section whose keys are all commented out (``replication:`` alone, null in YAML)
    keeps the defaults, takes environment overrides, and set_configuration can write
    into it (it was a port error, a TypeError traceback, and a 500)."""
    from harpsync.config import write_settings

    path = tmp_path / "config.yaml"
    path.write_text("replication:\n  # port: 9944\nlogging:\n")
    config = Config.load(path, env={})
    assert config.get("replication.port") == 9933
    assert Config.load(path, env={"REPLICATION_PORT": "9950"}).get("replication.port") == 9950
    write_settings(path, {"replication.port": 9951})
    assert Config.load(path, env={}).get("replication.port") == 9951


def test_writing_settings_syncs_the_file_before_its_rename_and_the_directory_after(
        tmp_path, monkeypatch):
    """write_settings fsyncs the new file before renaming it over config.yaml, then the
    directory: a crash (power loss) never leaves an empty or partial config.yaml."""
    import stat

    from harpsync.config import write_settings

    path = tmp_path / "config.yaml"
    path.write_text("logging:\n  level: info\n")
    synced: list[tuple[bool, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.read_text()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_settings(path, {"replication.port": 9951})
    new = path.read_text()
    assert "9951" in new
    assert synced == [(False, "logging:\n  level: info\n"), (True, new)]


@pytest.mark.parametrize(("before", "after"), [(0o640, 0o640), (0o644, 0o640),
                                               (0o600, 0o600)])
def test_writing_settings_keeps_the_files_mode_but_never_world_readable(
        tmp_path, before, after):
    """write_settings keeps the mode an operator gave config.yaml (a group that may read
    it), less any access for others: it holds secrets."""
    from harpsync.config import write_settings

    path = tmp_path / "config.yaml"
    path.write_text("logging:\n  level: info\n")
    path.chmod(before)
    write_settings(path, {"replication.port": 9951})
    assert path.stat().st_mode & 0o777 == after
