"""Layering: who may import which library, and every operation has exactly one schema.

Imports are read with ``ast`` from the source of every module under ``harpsync/`` and
``operations/``, including imports inside functions.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import operations
from harpsync.dispatch import OPERATION_ALIASES, Operation
from harpsync.validation import SchemaRegistry

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harpsync", "operations")
FIRST_PARTY = {"harpsync", "operations", "schemas"}

# Third-party (and ssl) imports and the only modules allowed to make them. A path ending
# in "/" owns the library for every module below it.
OWNERS: dict[str, tuple[str, ...]] = {
    "msgpack": ("harpsync/codec.py",),
    "lmdb": ("harpsync/storage/",),
    "xxhash": ("harpsync/storage/rowhash.py",),
    "cryptography": ("harpsync/security/",),
    "ssl": ("harpsync/security/",),
    "jsonschema": ("harpsync/validation.py",),
    "fastjsonschema": ("harpsync/validation.py",),  # the compiled fast path of validation
    "websockets": ("harpsync/replication/transport.py",),
    "starlette": ("harpsync/app.py",),
    "uvicorn": ("harpsync/node.py", "harpsync/http_protocol.py"),  # limits on a request head
    "uvloop": ("harpsync/node.py",),  # uvicorn[standard]'s event loop, chosen by the root
    "yaml": ("harpsync/config.py",),
    "prometheus_client": ("harpsync/metrics.py",),
    "httpx": ("harpsync/cli.py", "harpsync/csvsource.py"),  # csv_url_load downloads
    "zstandard": ("harpsync/compression.py",),
    "orjson": ("harpsync/jsonio.py",),  # fast JSON, falling back to the stdlib's answer
    "sqlglot": ("harpsync/sql/parser.py",),
}
SANS_IO = ("harpsync/replication/protocol.py", "harpsync/replication/messages.py",
           "harpsync/replication/steps.py", "harpsync/replication/session.py",
           "harpsync/replication/subscriber_session.py",
           "harpsync/replication/publisher_session.py")
SANS_IO_FORBIDDEN = {"asyncio", "websockets", "lmdb"}
# What storage may import from the project: it is layer 2 and never reaches upward.
STORAGE_MAY_IMPORT = ("harpsync.errors", "harpsync.codec", "harpsync.types", "harpsync.storage",
                      "harpsync.durable")

CLUSTER_OPERATIONS = {
    "add_node", "update_node", "set_node_replication", "remove_node", "cluster_status",
    "cluster_network", "configure_cluster", "cluster_set_routes", "cluster_get_routes",
    "cluster_delete_routes", "purge_stream", "pause_replication", "resume_replication",
    "replay_replication",
}
CLUSTER_MODULE = REPO / "operations" / "cluster.py"
TABLE_PERMISSIONS = {"read", "insert", "update", "delete"}


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every absolute module name ``path`` imports, with its line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # "from harpsync import node" imports harpsync.node
                yield f"{name}.{alias.name}", node.lineno


def owned_by(path: str, owners: tuple[str, ...]) -> bool:
    return any(path.startswith(o) if o.endswith("/") else path == o for o in owners)


def test_modules_found():
    """The walk sees the package modules it is meant to check."""
    found = {relative(p) for p in modules()}
    assert {"harpsync/app.py", "harpsync/storage/writer.py", "operations/data.py"} <= found


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_third_party_imports_only_in_owner(path):
    """A third-party library (or ssl) is imported only by the module that owns it."""
    where = relative(path)
    problems = []
    for name, line in imports(path):
        top = name.split(".")[0]
        if top in FIRST_PARTY or top == "__future__":
            continue
        if top in OWNERS:
            if not owned_by(where, OWNERS[top]):
                problems.append(f"{where}:{line} imports {top}, owned by {OWNERS[top]}")
        elif top not in sys.stdlib_module_names:
            problems.append(f"{where}:{line} imports {top}, which has no owner module")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted((REPO / "operations").rglob("*.py")), ids=relative)
def test_operations_never_import_starlette(path):
    """Operation handlers know nothing of HTTP: no starlette import."""
    names = [name for name, _ in imports(path)]
    assert not [n for n in names if n.split(".")[0] == "starlette"]


@pytest.mark.parametrize("where", SANS_IO)
def test_protocol_is_sans_io(where):
    """The replication protocol and messages import no asyncio, websockets or lmdb."""
    path = REPO / where
    if not path.exists():
        pytest.skip(f"{where} does not exist")
    bad = [(n, line) for n, line in imports(path) if n.split(".")[0] in SANS_IO_FORBIDDEN]
    assert not bad, f"{where} imports {bad}"


@pytest.mark.parametrize("path", sorted((REPO / "harpsync" / "storage").rglob("*.py")),
                         ids=relative)
def test_storage_never_imports_upward(path):
    """Storage imports only errors, codec, types and storage itself from the project."""
    bad = [(n, line) for n, line in imports(path)
           if n.split(".")[0] in FIRST_PARTY and n != "harpsync"
           and not n.startswith(STORAGE_MAY_IMPORT)]
    assert not bad, f"{relative(path)} imports {bad}"


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_only_the_root_imports_operations(path):
    """Only the composition root (harpsync/node.py) imports the operations package."""
    where = relative(path)
    if where.startswith("operations/") or where == "harpsync/node.py":
        return
    bad = [n for n, _ in imports(path) if n.split(".")[0] == "operations"]
    assert not bad, f"{where} imports {bad}"


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_future_annotations(path):
    """Every module with code starts with ``from __future__ import annotations``."""
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
    if not body:
        return  # docstring only
    first = body[0]
    assert isinstance(first, ast.ImportFrom) and first.module == "__future__", relative(path)


# -- operations and schemas ------------------------------------------------------------------
def operation_modules() -> list[object]:
    found = []
    for info in pkgutil.iter_modules(operations.__path__):
        module = importlib.import_module(f"operations.{info.name}")
        if hasattr(module, "OPERATIONS"):
            found.append(module)
    return found


def registered() -> dict[str, Operation]:
    ops: dict[str, Operation] = {}
    for module in operation_modules():
        for op in module.OPERATIONS:  # type: ignore[attr-defined]
            assert isinstance(op, Operation), op
            assert op.name not in ops, f"{op.name} is registered twice"
            ops[op.name] = op
    return ops


def test_every_operation_has_a_schema_and_every_schema_an_operation():
    """The operations and the schemas/ files are the same set of names."""
    schemas = SchemaRegistry.load().operations()
    if not CLUSTER_MODULE.exists():
        schemas -= CLUSTER_OPERATIONS  # operations/cluster.py is not written yet
    operations_ = set(registered())
    assert sorted(operations_ - schemas) == [], "operations without a schema"
    assert sorted(schemas - operations_) == [], "schemas without an operation"


def test_every_operations_module_is_wired_into_the_node():
    """Each operations module with OPERATIONS is in node.OPERATION_MODULES."""
    from harpsync.node import OPERATION_MODULES

    wired = {m.__name__ for m in OPERATION_MODULES}
    assert {m.__name__ for m in operation_modules()} <= wired  # type: ignore[attr-defined]


def test_aliases_point_at_registered_operations():
    """Every old operation name maps to a registered operation."""
    ops = registered()
    assert all(target in ops for target in OPERATION_ALIASES.values())
    assert not set(OPERATION_ALIASES) & set(ops)


def test_operation_access_is_well_formed():
    """Access is super_user, any, or a list of table permissions; cluster ops are super_user."""
    for name, op in registered().items():
        if isinstance(op.access, list):
            assert op.access and set(op.access) <= TABLE_PERMISSIONS, name
        else:
            assert op.access in ("super_user", "any"), name
        if name in CLUSTER_OPERATIONS:
            assert op.access == "super_user", name


def test_handlers_are_coroutines():
    """Every handler is ``async def handler(ctx, body)``."""
    import inspect

    for name, op in registered().items():
        assert inspect.iscoroutinefunction(op.handler), name
        assert len(inspect.signature(op.handler).parameters) == 2, name
