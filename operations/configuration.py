"""Configuration and restarts: get_configuration, set_configuration, restart,
restart_service.

``set_configuration`` takes keys as Harper writes them (``logging_level``), as dotted
paths (``logging.level``) or nested (``{"logging": {"level": ...}}``). It checks every
key and value with the same validation a start-up runs (a 400 names the bad one),
writes them to the node's ``config.yaml``, applies at once the ones that can change
live, and lists the ones that need a restart. ``restart`` stops the node cleanly and
starts the same command line again; the listening sockets stay open across it, so the
node keeps its addresses and clients queue instead of being refused (except a listener
whose address was changed: the next run binds the new one).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harpsync.config import Config, env_name, setting_keys, write_settings
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, ConfigError
from harpsync.security import server_context

# Settings the node reads each time it uses them, or that are pushed to their user here.
LIVE_KEYS = {"logging.level", "logging.auditRetention", "replication.maxClockSkew"}
_SECRET_WORDS = ("password", "secret", "token", "authorization", "credential")
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
           "fatal": logging.CRITICAL, "notify": logging.INFO}
SERVICES = ("http_workers", "clustering_config", "clustering")


def _public(value: Any) -> Any:
    """``value`` without any key that names a secret, at any depth."""
    if isinstance(value, Mapping):
        return {k: _public(v) for k, v in value.items()
                if not any(word in str(k).lower() for word in _SECRET_WORDS)}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


async def get_configuration(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    return dict(_public(copy.deepcopy(ctx.services.config.values)))


def _flat(body: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in body.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def _resolve(name: str, known: list[str]) -> str:
    """The dotted key ``name`` means (``logging_level`` -> ``logging.level``)."""
    if name in known:
        return name
    wanted = name.replace(".", "_").lower()
    for key in known:
        if key.replace(".", "_").lower() == wanted:
            return key
    raise BadRequestError(f"unknown configuration key '{name[:100]}'")


async def set_configuration(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    config: Config = ctx.services.config
    given = {k: v for k, v in body.items() if k != "operation"}
    if not given:
        raise BadRequestError("set_configuration needs at least one setting, such as "
                              "'logging_level'")
    known = setting_keys(config.values)
    updates: dict[str, Any] = {}
    for name, value in _flat(given).items():
        key = _resolve(name, known)
        if any(word in key.lower() for word in _SECRET_WORDS):
            raise BadRequestError(f"'{name}' cannot be set through the API")
        updates[key] = value
    candidate = Config(copy.deepcopy(config.values), config.path)
    for key, value in updates.items():
        candidate.set(key, value)
    try:
        candidate.validate()
    except ConfigError as exc:
        raise BadRequestError(f"invalid configuration: {exc}") from None
    if _TLS_KEYS & set(updates):
        await asyncio.to_thread(_check_tls_files, candidate)
    if config.path is None:
        raise BadRequestError("this node has no configuration file to write")
    await asyncio.to_thread(write_settings, config.path, updates)
    applied = []
    for key in updates:
        if key in LIVE_KEYS:
            config.set(key, candidate.get(key))
            _apply(ctx.services, key)
            applied.append(key)
    restart = [key for key in updates if key not in LIVE_KEYS]
    env = getattr(ctx.services, "env", {}) or {}
    overridden = [key for key in updates if env_name(key) in env]
    message = "Configuration successfully set."
    if restart:
        message += " You must restart harpsync for new config settings to take effect."
    return {"message": message, "applied": applied, "restart_required": restart,
            "overridden_by_environment": overridden}


_TLS_KEYS = {"operationsApi.tls.certificate", "operationsApi.tls.privateKey"}


def _check_tls_files(candidate: Config) -> None:
    """A 400 for HTTPS files the start would refuse: saved, they kept the node from
    starting again after the restart they ask for."""
    cert = candidate.get("operationsApi.tls.certificate")
    key = candidate.get("operationsApi.tls.privateKey")
    if not (cert and key):
        return  # the node certificate serves HTTPS, as at start
    try:
        server_context(Path(str(cert)), Path(str(key)))
    except OSError as exc:  # ssl.SSLError included
        raise BadRequestError(f"operationsApi.tls.certificate {str(cert)!r} / privateKey "
                              f"{str(key)!r} cannot be used: {exc}") from None


def _apply(node: Any, key: str) -> None:
    config: Config = node.config
    if key == "logging.level":
        level = _LEVELS.get(str(config.get(key)).lower(), logging.INFO)
        logging.getLogger().setLevel(level)
        logging.getLogger("harpsync").setLevel(level)
    elif key == "replication.maxClockSkew":
        skew = config.duration_ms(key)
        node.storage.hlc.max_skew_ms = skew
        if node.cluster is not None:
            node.cluster.max_skew_ms = skew
    # logging.auditRetention is read by each prune cycle: setting it is enough.


def _restart(ctx: OpContext, what: str) -> None:
    node = ctx.services
    hook = getattr(node, "restart_hook", None)
    if hook is None:
        raise BadRequestError("restart is not available: this node was not started by "
                              "'harpsync run'")
    node.restart_requested = what
    # After this response is on its way: the stop waits for requests in flight.
    asyncio.get_running_loop().call_soon(hook)


async def restart(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    _restart(ctx, "restart")
    return {"message": "Restarting HarperDB. This may take up to 60 seconds."}


async def restart_service(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    service = str(body["service"])
    _restart(ctx, service)
    return {"message": f"Restarting {service}"}


OPERATIONS = [
    Operation("get_configuration", get_configuration),
    Operation("set_configuration", set_configuration),
    Operation("restart", restart),
    Operation("restart_service", restart_service),
]
