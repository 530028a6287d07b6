"""Users and roles: add, alter, drop and list, stored in the replicated ``system`` tables."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from harpsync.auth import SUPER_ROLE, active_super_users
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, ConflictError, NotFoundError
from harpsync.passwords import hash_password
from harpsync.storage import reads, writes
from harpsync.storage.store import SYSTEM, Storage


def _records(ctx: OpContext, table: str) -> list[dict[str, Any]]:
    db, tbl = ctx.services.storage.table(SYSTEM, table)
    return list(reads.scan(db, tbl))


# Changes to users and roles on one node are checked and written one at a time, so two
# concurrent requests cannot each leave "the other" super user as the last one standing.
_LOCKS: weakref.WeakKeyDictionary[Storage, asyncio.Lock] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def _one_at_a_time(ctx: OpContext) -> AsyncIterator[None]:
    storage = ctx.services.storage
    lock = _LOCKS.get(storage)
    if lock is None:
        lock = _LOCKS[storage] = asyncio.Lock()
    async with lock:
        yield


def _keep_a_super_user(ctx: OpContext, users: dict[str, dict[str, Any] | None],
                       roles: dict[str, dict[str, Any]], what: str) -> None:
    """Refuse (400) a change after which no active user would hold a super_user role.

    ``users`` maps a username to its record as the change leaves it (None: dropped);
    ``roles`` maps a role id to its new permission. Without a super user nobody could
    manage users, roles, schema or the cluster again, short of editing the database.
    """
    role_rows = [{**r, "permission": roles[str(r.get("id"))]} if str(r.get("id")) in roles
                 else r for r in _records(ctx, "hdb_role")]
    after = []
    for record in _records(ctx, "hdb_user"):
        name = str(record.get("username"))
        if name in users:
            changed = users[name]
            if changed is None:
                continue
            record = {**record, **changed}
        after.append(record)
    if active_super_users(after, role_rows):
        return
    raise BadRequestError(f"Cannot {what}: no active super_user would be left to manage "
                          "this node; make another user a super_user first")


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
    async with _one_at_a_time(ctx):
        role = _role(ctx, body["role"])  # not dropped while the password was hashed
        if role is None:
            raise BadRequestError(f"Role '{body['role']}' does not exist")
        record = {"username": username, "password": password, "role": role["id"],
                  "active": body.get("active", True)}
        result = await _system_write(ctx, "hdb_user", [record], "insert")
    if result["skipped_hashes"]:
        raise ConflictError(f"User {username} already exists")
    return {"message": f"{username} successfully added"}


async def alter_user(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    username = body["username"]
    record: dict[str, Any] = {"username": username}
    if "password" in body:
        record["password"] = await asyncio.to_thread(hash_password, body["password"])
    async with _one_at_a_time(ctx):
        if "role" in body:
            role = _role(ctx, body["role"])
            if role is None:
                raise BadRequestError(f"Role '{body['role']}' does not exist")
            record["role"] = role["id"]
        if "active" in body:
            record["active"] = body["active"]
        if "role" in record or record.get("active") is False:
            _keep_a_super_user(ctx, {username: record}, {},
                               f"change the role or active flag of user '{username}'")
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
    async with _one_at_a_time(ctx):
        _keep_a_super_user(ctx, {username: None}, {}, f"drop user '{username}'")
        result = await storage.write(writes.delete_records(storage, SYSTEM, "hdb_user",
                                                           [username], ctx.user.username))
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
    async with _one_at_a_time(ctx):
        for name in dict.fromkeys([role_id, body["role"]]):
            if _role(ctx, name) is not None:
                raise ConflictError(f"A role with name '{name}' already exists")
        record = {"id": role_id, "role": body["role"], "permission": body["permission"]}
        result = await _system_write(ctx, "hdb_role", [record], "insert")
    if result["skipped_hashes"]:
        raise ConflictError(f"A role with name '{role_id}' already exists")
    return _role(ctx, role_id) or record


async def alter_role(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    role_id = body.get("id") or body["role"]
    _check_permission(body["permission"])
    async with _one_at_a_time(ctx):
        existing = _role(ctx, role_id)
        if existing is None:
            raise NotFoundError(f"Role '{role_id}' does not exist")
        record = {"id": existing["id"], "permission": body["permission"]}
        if "role" in body:
            # Roles are named by id or name (add_user, alter_user): a name another role
            # holds would make one of the two unreachable by it.
            other = _role(ctx, body["role"])
            if other is not None and other["id"] != existing["id"]:
                raise ConflictError(f"A role with name '{body['role']}' already exists")
            record["role"] = body["role"]
        if not body["permission"].get("super_user"):
            _keep_a_super_user(ctx, {}, {str(existing["id"]): body["permission"]},
                               f"take super_user away from role '{role_id}'")
        await _system_write(ctx, "hdb_role", [record], "update")
    return _role(ctx, existing["id"]) or record


async def drop_role(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    role_id = body["id"]
    async with _one_at_a_time(ctx):
        existing = _role(ctx, role_id)
        if existing is None:
            raise NotFoundError(f"Role '{role_id}' does not exist")
        if existing["id"] == SUPER_ROLE:
            raise BadRequestError("The super_user role cannot be dropped")
        users = [u["username"] for u in _records(ctx, "hdb_user")
                 if u.get("role") == existing["id"]]
        if users:
            raise BadRequestError(f"Cannot drop role '{role_id}': {len(users)} user(s) "
                                  "still use it")
        storage = ctx.services.storage
        await storage.write(writes.delete_records(storage, SYSTEM, "hdb_role",
                                                  [existing["id"]], ctx.user.username))
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
