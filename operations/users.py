"""Users and roles: add, alter, drop and list, stored in the replicated ``system`` tables."""

from __future__ import annotations

import asyncio
from typing import Any

from harpsync.auth import SUPER_ROLE
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, ConflictError, NotFoundError
from harpsync.passwords import hash_password
from harpsync.storage import reads, writes
from harpsync.storage.store import SYSTEM


def _records(ctx: OpContext, table: str) -> list[dict[str, Any]]:
    db, tbl = ctx.services.storage.table(SYSTEM, table)
    return list(reads.scan(db, tbl))


def _role(ctx: OpContext, role_id: str) -> dict[str, Any] | None:
    db, tbl = ctx.services.storage.table(SYSTEM, "hdb_role")
    found = reads.get_by_ids(db, tbl, [role_id])
    if found:
        return found[0]
    for record in reads.scan(db, tbl):  # a role may also be named by its "role" field
        if record.get("role") == role_id:
            return record
    return None


def _public_user(user: dict[str, Any], roles: dict[str, dict[str, Any]]) -> dict[str, Any]:
    shown = {k: v for k, v in user.items() if k != "password"}
    shown["role"] = roles.get(str(user.get("role")), user.get("role"))
    return shown


async def _system_write(ctx: OpContext, table: str, records: list[dict[str, Any]],
                        mode: str) -> dict[str, Any]:
    storage = ctx.services.storage
    job = writes.write_records(storage, SYSTEM, table, records, mode, ctx.user.username)
    result: dict[str, Any] = await storage.write(job)
    return result


async def add_user(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    username = body["username"]
    if ":" in username or username != username.strip():
        # Basic auth splits "user:password" at the first colon: such a user could
        # never log in.
        raise BadRequestError("'username' must not contain ':' or surrounding spaces")
    role = _role(ctx, body["role"])
    if role is None:
        raise BadRequestError(f"Role '{body['role']}' does not exist")
    password = await asyncio.to_thread(hash_password, body["password"])
    record = {"username": username, "password": password, "role": role["id"],
              "active": body.get("active", True)}
    result = await _system_write(ctx, "hdb_user", [record], "insert")
    if result["skipped_hashes"]:
        raise ConflictError(f"User {username} already exists")
    return {"message": f"{username} successfully added"}


async def alter_user(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    username = body["username"]
    record: dict[str, Any] = {"username": username}
    if "role" in body:
        role = _role(ctx, body["role"])
        if role is None:
            raise BadRequestError(f"Role '{body['role']}' does not exist")
        record["role"] = role["id"]
    if "active" in body:
        record["active"] = body["active"]
    if "password" in body:
        record["password"] = await asyncio.to_thread(hash_password, body["password"])
    result = await _system_write(ctx, "hdb_user", [record], "update")
    if result["skipped_hashes"]:
        raise NotFoundError(f"User {username} does not exist")
    return {"message": "updated 1 of 1 records", "new_attributes": [],
            "update_hashes": [username], "skipped_hashes": []}


async def drop_user(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    username = body["username"]
    if username == ctx.user.username:
        raise BadRequestError("You cannot drop yourself")
    storage = ctx.services.storage
    result = await storage.write(writes.delete_records(storage, SYSTEM, "hdb_user", [username],
                                                       ctx.user.username))
    if result["skipped_hashes"]:
        raise NotFoundError(f"User {username} does not exist")
    return {"message": f"{username} successfully deleted"}


async def list_users(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    roles = {str(r["id"]): r for r in _records(ctx, "hdb_role")}
    return [_public_user(u, roles) for u in _records(ctx, "hdb_user")]


async def user_info(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    db, tbl = ctx.services.storage.table(SYSTEM, "hdb_user")
    found = reads.get_by_ids(db, tbl, [ctx.user.username])
    if not found:
        raise NotFoundError(f"User {ctx.user.username} does not exist")
    roles = {str(r["id"]): r for r in _records(ctx, "hdb_role")}
    return _public_user(found[0], roles)


def _check_permission(permission: dict[str, Any]) -> None:
    for database, spec in permission.items():
        if database in ("super_user", "cluster_user", "structure_user"):
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("tables", {}), dict):
            raise BadRequestError(f"'permission.{database}' must be an object with 'tables'")
        for table, perms in spec.get("tables", {}).items():
            # Permissions are checked per table only: a role limiting attributes would
            # be stored and then read and write every attribute of the table.
            if isinstance(perms, dict) and perms.get("attribute_permissions"):
                raise BadRequestError(
                    f"'permission.{database}.tables.{table}.attribute_permissions' is not "
                    "supported: harpsync grants whole tables; leave it empty and grant "
                    "only the tables the role may use")


async def add_role(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    role_id = body.get("id") or body["role"]
    _check_permission(body["permission"])
    if _role(ctx, role_id) is not None:
        raise ConflictError(f"A role with name '{role_id}' already exists")
    record = {"id": role_id, "role": body["role"], "permission": body["permission"]}
    result = await _system_write(ctx, "hdb_role", [record], "insert")
    if result["skipped_hashes"]:
        raise ConflictError(f"A role with name '{role_id}' already exists")
    return _role(ctx, role_id) or record


async def alter_role(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    role_id = body.get("id") or body["role"]
    existing = _role(ctx, role_id)
    if existing is None:
        raise NotFoundError(f"Role '{role_id}' does not exist")
    _check_permission(body["permission"])
    record = {"id": existing["id"], "permission": body["permission"]}
    if "role" in body:
        record["role"] = body["role"]
    await _system_write(ctx, "hdb_role", [record], "update")
    return _role(ctx, existing["id"]) or record


async def drop_role(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    role_id = body["id"]
    existing = _role(ctx, role_id)
    if existing is None:
        raise NotFoundError(f"Role '{role_id}' does not exist")
    if existing["id"] == SUPER_ROLE:
        raise BadRequestError("The super_user role cannot be dropped")
    users = [u["username"] for u in _records(ctx, "hdb_user") if u.get("role") == existing["id"]]
    if users:
        raise BadRequestError(f"Cannot drop role '{role_id}': {len(users)} user(s) still use it")
    storage = ctx.services.storage
    await storage.write(writes.delete_records(storage, SYSTEM, "hdb_role", [existing["id"]],
                                              ctx.user.username))
    return {"message": f"{role_id} successfully deleted"}


async def list_roles(ctx: OpContext, body: dict[str, Any]) -> list[dict[str, Any]]:
    return _records(ctx, "hdb_role")


OPERATIONS = [
    Operation("add_user", add_user),
    Operation("alter_user", alter_user),
    Operation("drop_user", drop_user),
    Operation("list_users", list_users),
    Operation("user_info", user_info, "any"),
    Operation("add_role", add_role),
    Operation("alter_role", alter_role),
    Operation("drop_role", drop_role),
    Operation("list_roles", list_roles),
]
