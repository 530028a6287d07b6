"""The registry of operations: aliases, validation, permission checks, then the handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harpsync.auth import User, require_super, require_table
from harpsync.errors import BadRequestError
from harpsync.validation import SchemaRegistry

if TYPE_CHECKING:
    from harpsync.services import Services

Handler = Callable[["OpContext", dict[str, Any]], Awaitable[Any]]

OPERATION_ALIASES = {
    "create_schema": "create_database",
    "drop_schema": "drop_database",
    "describe_schema": "describe_database",
    "search_by_hash": "search_by_id",
}
FIELD_ALIASES = {"schema": "database", "hash_attribute": "primary_key", "hash_values": "ids"}
NODE_NAME_ALIASES = ("node_name", "name")
CONDITION_ALIASES = {"search_attribute": "attribute", "search_type": "comparator",
                     "search_value": "value"}
NODE_OPERATIONS = {"add_node", "update_node", "set_node_replication", "remove_node",
                   "pause_replication", "resume_replication", "replay_replication"}


@dataclass(frozen=True)
class Operation:
    """One registered operation.

    ``access`` is ``"super_user"``, ``"any"`` (any logged-in user), or a list of table
    permissions (``["read"]``, ``["insert", "update"]``) checked on ``database.table``.
    """

    name: str
    handler: Handler
    access: str | list[str] = "super_user"


@dataclass(slots=True)
class OpContext:
    """What a handler sees: the node's services and the calling user."""

    services: Services
    user: User
    operation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _rename(mapping: dict[str, Any], aliases: dict[str, str]) -> None:
    for old, new in aliases.items():
        if old in mapping and new not in mapping:
            mapping[new] = mapping.pop(old)


# Top-level fields that ``normalize`` may rewrite (or rewrite inside).
_REWRITTEN = frozenset([*FIELD_ALIASES, "conditions", "subscriptions", "connections"])


def normalize(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Rewrite Harper's old field names to the canonical ones (a shallow copy)."""
    if body.keys().isdisjoint(_REWRITTEN) and name not in NODE_OPERATIONS \
            and name != "search_by_value":
        return dict(body)  # nothing to rename (the common case: a search or a write)
    body = dict(body)
    _rename(body, FIELD_ALIASES)
    if name in NODE_OPERATIONS:
        for alias in NODE_NAME_ALIASES:
            if alias in body and "hostname" not in body:
                body["hostname"] = body.pop(alias)
    if name == "search_by_value":
        _rename(body, CONDITION_ALIASES)
    conditions = body.get("conditions")
    if isinstance(conditions, list):
        fixed = []
        for cond in conditions:
            if isinstance(cond, dict):
                cond = dict(cond)
                _rename(cond, CONDITION_ALIASES)
            fixed.append(cond)
        body["conditions"] = fixed
    for key in ("subscriptions",):
        subs = body.get(key)
        if isinstance(subs, list):
            body[key] = [_sub(s) for s in subs]
    connections = body.get("connections")
    if name == "configure_cluster" and isinstance(connections, list):
        body["connections"] = [normalize("add_node", c) if isinstance(c, dict) else c
                               for c in connections]
    return body


def _sub(sub: Any) -> Any:
    if isinstance(sub, dict):
        sub = dict(sub)
        _rename(sub, {"schema": "database"})
    return sub


class Dispatcher:
    """Maps a request body to its operation and runs it."""

    def __init__(self, schemas: SchemaRegistry) -> None:
        self.schemas = schemas
        self.operations: dict[str, Operation] = {}

    def register(self, *ops: Operation) -> None:
        for op in ops:
            self.operations[op.name] = op

    def resolve(self, body: Any) -> tuple[Operation, dict[str, Any]]:
        """Find, normalize and validate; raises a 400 naming the problem."""
        if not isinstance(body, dict):
            raise BadRequestError("Request body must be a JSON object")
        name = body.get("operation")
        if name is None:
            raise BadRequestError("Request body must include an 'operation' property.")
        if not isinstance(name, str):
            raise BadRequestError("'operation' must be a string")
        canonical = OPERATION_ALIASES.get(name, name)
        op = self.operations.get(canonical)
        if op is None:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise BadRequestError(f"Operation '{shown}' not found")
        body = normalize(canonical, body)
        self.schemas.validate(canonical, body)
        return op, body

    def run(self, services: Services, user: User, body: Any) -> Awaitable[Any]:
        """Resolve and authorize now (raising a 4xx here), then return the handler's
        coroutine for the caller to await (no coroutine of its own: the hot path)."""
        op, body = self.resolve(body)
        self.authorize(op, user, body)
        return op.handler(OpContext(services, user, op.name), body)

    @staticmethod
    def authorize(op: Operation, user: User, body: dict[str, Any]) -> None:
        if op.access == "any" or user.super_user:  # a super user holds every permission
            return
        if op.access == "super_user":
            require_super(user, op.name)
            return
        require_table(user, body.get("database", "data"), str(body.get("table")),
                      list(op.access))
