"""Settings: built-in defaults, then ``config.yaml``, then environment, then ``validate()``.

Key names follow Harper's config file. An environment variable overrides a key when its
name is the key path upper-cased and joined with ``_`` (``OPERATIONSAPI_NETWORK_PORT``).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harpsync.durable import sync_directory
from harpsync.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "rootPath": "./hdb",
    "operationsApi": {
        "network": {"host": "127.0.0.1", "port": 9925, "securePort": None,
                    "maxBodySize": 10 * 1024 * 1024, "headersTimeout": "10s",
                    "maxConnectionsPerAddress": 256},
        "tls": {"certificate": None, "privateKey": None},
        "rateLimit": {"requestsPerMinute": 0, "burst": 10},
        "changes": {"maxQueue": 10_000, "maxClients": 100},
        # GET /metrics without a super user's login (labels name peers, databases and
        # tables; Prometheus scrapers can send Basic credentials).
        "metrics": {"allowAnonymous": False},
    },
    "replication": {
        "hostname": None,
        "url": None,
        "host": "0.0.0.0",
        "port": 9933,
        "routes": [],
        "databases": "*",
        "maxClockSkew": 60_000,
        "pingInterval": 1_000,
        "retentionInterval": "10s",
        "compression": "auto",
        "maxConnections": 1024,
        "maxPendingPerAddress": 32,
        "conflict": "last_writer_wins",
        "verifyInterval": "10m",
    },
    "logging": {"level": "info", "auditRetention": "3d"},
    "storage": {"mapSize": 64 * 1024**3, "trimInterval": "2s"},
}

# Keys whose environment values are taken verbatim: YAML would read ROOTPATH=2024 as a
# number, and a node name or URL is never anything but text.
_TEXT_KEYS = {"rootPath", "operationsApi.network.host", "replication.hostname",
              "replication.url", "replication.host", "logging.level",
              "replication.compression", "replication.conflict"}
# The conflict policies of a subscription (see harpsync/storage/conflicts.py).
CONFLICT_POLICIES = ("last_writer_wins", "source_wins", "dest_wins", "manual_review")
_LEVELS = {"trace", "debug", "info", "warn", "warning", "error", "fatal", "notify"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def env_name(key: str) -> str:
    """``operationsApi.network.port`` -> ``OPERATIONSAPI_NETWORK_PORT``."""
    return key.replace(".", "_").upper()


def _merge(base: dict[str, Any], over: Mapping[str, Any], where: str) -> None:
    for key, value in over.items():
        if value is None and isinstance(base.get(key), dict):
            continue  # a section whose keys are all commented out: its defaults stand
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _parse_env(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


@dataclass(frozen=True)
class ReplicationSettings:
    """The replication settings read once at start: validated, typed and frozen.

    Settings that change while the node runs (``replication.routes``,
    ``replication.databases``, ``logging.auditRetention``, ``replication.maxClockSkew``)
    are read from :class:`Config` where they are used.
    """

    node_name: str
    host: str
    port: int
    ping_interval: float  # seconds
    retention_interval: float  # seconds
    compression: str  # "auto", "zstd" or "none"
    conflict: str  # one of CONFLICT_POLICIES
    max_connections: int
    max_pending_per_address: int


class Config:
    """Plain settings values. ``get("replication.port")`` reads a dotted key."""

    def __init__(self, values: dict[str, Any], path: Path | None = None) -> None:
        self.values = values
        self.path = path

    @classmethod
    def load(cls, path: Path | None = None, env: Mapping[str, str] | None = None,
             root: str | None = None) -> Config:
        """Defaults, then the YAML file, then the environment, then ``validate()``.

        Raises:
            ConfigError: the file is unreadable or a value is invalid; names the key.
        """
        env = os.environ if env is None else env
        if path is None:
            # Where a node started without a config file persists routes and settings
            # (Node sets ``<rootPath>/config.yaml``): --root, else ROOTPATH, else the
            # default, so the next start with the same command line reads them back.
            where = root if root is not None else (env.get(env_name("rootPath"))
                                                   or DEFAULTS["rootPath"])
            saved = Path(where).expanduser() / "config.yaml"
            if saved.exists():
                path = saved
        values = copy.deepcopy(DEFAULTS)
        if path is not None and path.exists():
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read {path}: {exc}") from exc
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path} must hold a mapping of settings")
            _merge(values, loaded, "")
        for key in _flatten(DEFAULTS):
            raw = env.get(env_name(key))
            if raw is not None:
                if key in _TEXT_KEYS:
                    cls._set(values, key, raw or None)  # an empty variable means unset
                else:
                    cls._set(values, key, _parse_env(raw))
        if root is not None:
            values["rootPath"] = root
        config = cls(values, path)
        config.validate()
        return config

    @staticmethod
    def _set(values: dict[str, Any], key: str, value: Any) -> None:
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # an empty section (``replication:``) in a file
            node = node[part]
        node[parts[-1]] = value

    def get(self, key: str) -> Any:
        node: Any = self.values
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def set(self, key: str, value: Any) -> None:
        self._set(self.values, key, value)

    # -- validation --------------------------------------------------------------------
    def _port(self, key: str, optional: bool = False) -> None:
        value = self.get(key)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise ConfigError(f"{key} must be a port number from 0 to 65535, got {value!r}")

    def validate(self) -> None:
        """Check every value and fill derived ones; raise ``ConfigError`` naming the key."""
        if not isinstance(self.get("rootPath"), str) or not self.get("rootPath"):
            raise ConfigError("rootPath must be a non-empty path")
        self._port("operationsApi.network.port")
        self._port("operationsApi.network.securePort", optional=True)
        self._port("replication.port")
        for key in ("operationsApi.network.host", "replication.host"):
            if not isinstance(self.get(key), str) or not self.get(key):
                raise ConfigError(f"{key} must be a host name or address")
        size = self.get("operationsApi.network.maxBodySize")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1024:
            raise ConfigError("operationsApi.network.maxBodySize must be an integer >= 1024")
        hostname = self.get("replication.hostname")
        if hostname is None:
            hostname = socket.gethostname()
            self.set("replication.hostname", hostname)
        if not isinstance(hostname, str) or not re.match(r"^[A-Za-z0-9_.:-]{1,255}$", hostname):
            raise ConfigError(f"replication.hostname is not a valid node name: {hostname!r}")
        url = self.get("replication.url")
        if url is not None and (not isinstance(url, str)
                                or not re.match(r"^wss?://[^\s/]+(:\d+)?/?$", url)):
            raise ConfigError(f"replication.url must look like wss://host:port, got {url!r}")
        routes = self.get("replication.routes")
        if routes is None:
            self.set("replication.routes", [])
        elif not isinstance(routes, list):
            raise ConfigError("replication.routes must be a list")
        compression = self.get("replication.compression")
        if compression not in ("auto", "zstd", "none"):
            raise ConfigError("replication.compression must be 'auto', 'zstd' or 'none', "
                              f"got {compression!r}")
        conflict = self.get("replication.conflict")
        if conflict not in CONFLICT_POLICIES:
            raise ConfigError(f"replication.conflict must be one of {list(CONFLICT_POLICIES)}, "
                              f"got {conflict!r}")
        level = self.get("logging.level")
        if not isinstance(level, str) or level.lower() not in _LEVELS:
            raise ConfigError(f"logging.level must be one of {sorted(_LEVELS)}, got {level!r}")
        self.retention_ms()
        self.duration_ms("replication.maxClockSkew")
        # 0 would time every keepalive ping out at once (no link ever stays up) and
        # prune in a loop that never sleeps.
        for key in ("replication.pingInterval", "replication.retentionInterval",
                    "operationsApi.network.headersTimeout"):
            if self.duration_ms(key) <= 0:
                raise ConfigError(f"{key} must be a duration above 0, got "
                                  f"{self.get(key)!r}")
        self.duration_ms("storage.trimInterval")
        self.duration_ms("replication.verifyInterval")
        for key, low in (("operationsApi.rateLimit.requestsPerMinute", 0),
                         ("operationsApi.rateLimit.burst", 1),
                         ("replication.maxConnections", 1),
                         ("operationsApi.changes.maxQueue", 1),
                         ("operationsApi.changes.maxClients", 1),
                         ("replication.maxPendingPerAddress", 1),
                         ("operationsApi.network.maxConnectionsPerAddress", 0)):
            value = self.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        anonymous = self.get("operationsApi.metrics.allowAnonymous")
        if not isinstance(anonymous, bool):
            raise ConfigError("operationsApi.metrics.allowAnonymous must be true or false, "
                              f"got {anonymous!r}")
        map_size = self.get("storage.mapSize")
        if isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1 << 20:
            raise ConfigError("storage.mapSize must be an integer of at least 1 MiB")

    def duration_ms(self, key: str) -> int:
        """A duration setting in milliseconds (numbers are ms; ``3d``, ``5s``... work)."""
        value = self.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return int(value)
        match = _DURATION.match(str(value).strip()) if isinstance(value, str) else None
        if not match:
            raise ConfigError(f"{key} must be a duration such as 500ms, 30s or 3d, got {value!r}")
        return int(float(match.group(1)) * _UNITS[match.group(2)])

    def retention_ms(self) -> int:
        return self.duration_ms("logging.auditRetention")

    @property
    def root(self) -> Path:
        return Path(self.get("rootPath")).expanduser().resolve()

    @property
    def node_name(self) -> str:
        return str(self.get("replication.hostname"))

    def replication_settings(self) -> ReplicationSettings:
        """The replication settings as typed values (call after ``validate()``)."""
        return ReplicationSettings(
            node_name=self.node_name,
            host=str(self.get("replication.host")),
            port=int(self.get("replication.port")),
            ping_interval=self.duration_ms("replication.pingInterval") / 1000.0,
            retention_interval=self.duration_ms("replication.retentionInterval") / 1000.0,
            compression=str(self.get("replication.compression")),
            conflict=str(self.get("replication.conflict")),
            max_connections=int(self.get("replication.maxConnections")),
            max_pending_per_address=int(self.get("replication.maxPendingPerAddress")),
        )

    def replication_url(self, bound_port: int | None = None) -> str:
        """The URL peers dial; derived from hostname and port when not set."""
        url = self.get("replication.url")
        if url:
            return str(url).rstrip("/")
        port = bound_port if bound_port else self.get("replication.port")
        return f"wss://{self.node_name}:{port}"

    def save_routes(self, routes: list[Any]) -> None:
        """Persist ``replication.routes`` to the config file, keeping its other keys."""
        self.set("replication.routes", routes)
        if self.path is None:
            return
        # A private file, as set_configuration writes it (with the umask it was 0666
        # under umask 0, and an operator's 0600 file became 0644).
        write_settings(self.path, {"replication.routes": routes})


def write_settings(path: Path, updates: dict[str, Any]) -> None:
    """Set dotted ``updates`` in the YAML file at ``path``, keeping its other keys.

    Written to a temporary file, synced, renamed over the old one, and the directory
    synced, so a crash (power loss included) leaves the old file or the new one, never
    an empty or partial one. The file keeps its mode less any access for others (it
    holds secrets); a new one is private (0600). One write at a time: set_configuration
    (in a thread) and route changes (on the loop) each read, update and replace the
    file, and two at once lost one's keys, or wrote both into the one temporary file.
    """
    with _SETTINGS_LOCK:
        data: dict[str, Any] = {}
        mode = 0o600
        if path.exists():
            mode = stat.S_IMODE(path.stat().st_mode) & 0o770 | 0o600
            loaded = yaml.safe_load(path.read_text()) or {}
            if isinstance(loaded, Mapping):
                data = dict(loaded)
        for key, value in updates.items():
            Config._set(data, key, value)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, mode)  # a leftover temporary file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as out:
            out.write(yaml.safe_dump(data, sort_keys=False))
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        sync_directory(path.parent)


_SETTINGS_LOCK = threading.Lock()


def setting_keys(values: Mapping[str, Any]) -> list[str]:
    """Every settable dotted key: the defaults' leaves and any others in ``values``."""
    return list(dict.fromkeys([*_flatten(DEFAULTS), *_flatten(values)]))
