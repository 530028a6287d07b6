"""Schema operations: databases, tables and attributes."""

from __future__ import annotations

from typing import Any

from harpsync.auth import User
from harpsync.dispatch import OpContext, Operation
from harpsync.errors import BadRequestError, ForbiddenError, NotFoundError
from harpsync.storage import writes
from harpsync.storage.database import Database, Table
from harpsync.storage.schema import RESERVED_KEYS
from harpsync.storage.store import SYSTEM


def _db_name(body: dict[str, Any]) -> str:
    return str(body.get("database", "data"))


def _not_system(db: str, table: str) -> None:
    # Users, roles and nodes live there; dropping hdb_user would lock everybody out.
    if db == SYSTEM:
        raise BadRequestError(f"Table '{db}.{table}' is a system table and cannot be "
                              "created or dropped")


def _not_reserved(table: str) -> None:
    # A schema hello keys table definitions by name beside its own entries
    # (``__dropped__``, ``__created__``, ``__databases__``): such a name would be ambiguous.
    if table in RESERVED_KEYS:
        raise BadRequestError(f"Table name '{table}' is reserved")


async def create_database(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    name = body["database"]
    await ctx.services.storage.create_database(name)
    return {"message": f"database '{name}' successfully created"}


async def drop_database(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    name = body["database"]
    await ctx.services.storage.drop_database(name)
    return {"message": f"successfully deleted '{name}'"}


def describe(db: Database, table: Table, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Harper's ``describe_table`` object."""
    sizes = sizes or db.sizes()
    count, table_size = db.table_size(table)
    attributes: list[dict[str, Any]] = [
        {"attribute": table.primary_key, "indexed": True, "is_primary_key": True},
        {"attribute": "__createdtime__", "indexed": True},
        {"attribute": "__updatedtime__", "indexed": True},
    ]
    attributes += [{"attribute": a} for a in table.attributes]
    return {
        "schema": db.name, "name": table.name, "hash_attribute": table.primary_key,
        "audit": True, "schema_defined": False, "attributes": attributes,
        "db_size": sizes["db_size"], "sources": [], "record_count": count,
        "table_size": table_size, "db_audit_size": sizes["db_audit_size"],
    }


def visible(user: User, database: str, table: str) -> bool:
    """Whether a role grants anything on ``database.table`` (as Harper filters describe_*)."""
    if user.super_user:
        return True
    spec = user.permission.get(database)
    tables = spec.get("tables") if isinstance(spec, dict) else None
    perms = tables.get(table) if isinstance(tables, dict) else None
    return isinstance(perms, dict) and any(perms.get(p) for p in
                                           ("read", "insert", "update", "delete"))


def _hidden(user: User, database: str, item: str) -> None:
    """Refuse a role the metadata of what it has no permission on, with Harper's 403,
    whether or not it exists: a 404 beside a 403 would tell which names exist."""
    if database == SYSTEM:
        raise ForbiddenError([f"Your role does not have permission to view database "
                              f"metadata for '{SYSTEM}'"])
    raise ForbiddenError([], [f"{item} does not exist"])


def _grants_in(user: User, database: str) -> bool:
    """Whether a role grants anything on some table of ``database`` (existing or not)."""
    spec = user.permission.get(database)
    tables = spec.get("tables") if isinstance(spec, dict) else None
    return isinstance(tables, dict) and any(visible(user, database, t) for t in tables)


def describe_db(db: Database, user: User | None = None) -> dict[str, Any]:
    # A snapshot: a concurrent drop_table must not change the catalog under us.
    tables = dict(db.tables)
    names = [n for n in sorted(tables) if user is None or visible(user, db.name, n)]
    sizes = db.sizes() if names else {}
    return {name: describe(db, tables[name], sizes) for name in names}


async def describe_all(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    storage = ctx.services.storage
    described: dict[str, Any] = {}
    for name, db in sorted(storage.databases.items()):
        if name == SYSTEM:
            continue
        try:
            described[name] = describe_db(db, ctx.user)
        except NotFoundError:
            continue  # dropped while we described it
    if ctx.user.super_user:
        return described
    return {name: tables for name, tables in described.items() if tables}


async def describe_database(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    name = body["database"]
    if not ctx.user.super_user and (name == SYSTEM or not _grants_in(ctx.user, name)):
        _hidden(ctx.user, name, f"database '{name}'")
    return describe_db(ctx.services.storage.database(name), ctx.user)


async def create_table(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    db, name = _db_name(body), body["table"]
    _not_system(db, name)
    _not_reserved(name)
    attrs = [a["name"] for a in body.get("attributes", []) if a.get("name") != body["primary_key"]]
    await ctx.services.storage.create_table(db, name, body["primary_key"], attrs)
    return {"message": f"table '{db}.{name}' successfully created."}


async def drop_table(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    db, name = _db_name(body), body["table"]
    _not_system(db, name)
    await ctx.services.storage.drop_table(db, name)
    return {"message": f"successfully deleted table '{db}.{name}'"}


async def describe_table(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    database, name = _db_name(body), body["table"]
    if not ctx.user.super_user and (database == SYSTEM or not visible(ctx.user, database, name)):
        _hidden(ctx.user, database, f"Table '{database}.{name}'")
    db, table = ctx.services.storage.table(database, name)
    return describe(db, table)


async def create_attribute(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    db, table, attr = _db_name(body), body["table"], body["attribute"]
    storage = ctx.services.storage
    await storage.write(writes.attribute_job(storage, db, table, attr, present=True))
    return {"message": f"attribute '{db}.{table}.{attr}' successfully created."}


async def drop_attribute(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    db, table, attr = _db_name(body), body["table"], body["attribute"]
    storage = ctx.services.storage
    await storage.write(writes.attribute_job(storage, db, table, attr, present=False))
    return {"message": f"successfully deleted attribute '{attr}'"}


OPERATIONS = [
    Operation("create_database", create_database),
    Operation("drop_database", drop_database),
    Operation("describe_all", describe_all, "any"),
    Operation("describe_database", describe_database, "any"),
    Operation("create_table", create_table),
    Operation("drop_table", drop_table),
    Operation("describe_table", describe_table, "any"),
    Operation("create_attribute", create_attribute),
    Operation("drop_attribute", drop_attribute),
]
