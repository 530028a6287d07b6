"""Shared fixtures: ``node_factory``, ``cluster``, ``wait_for`` and the validation
``registry``."""

from __future__ import annotations

import compileall
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync.storage.store import Storage
from harpsync.validation import SchemaRegistry
from tests.helpers import InProcessNode, ProcessNode, wait_for


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start real nodes: ``node_factory("a")`` in-process, ``process=True`` as a subprocess."""
    nodes: list[Any] = []

    def make(name: str = "node-a", process: bool = False, start: bool = True,
             env: dict[str, str] | None = None) -> Any:
        cls = ProcessNode if process else InProcessNode
        node = cls(name, tmp_path / name, env)
        nodes.append(node)
        return node.start() if start else node

    yield make
    for node in reversed(nodes):
        node.close()


@pytest.fixture
def node(node_factory: Callable[..., Any]) -> Any:
    """One running in-process node."""
    return node_factory("node-a")


@pytest.fixture
def cluster(node_factory: Callable[..., Any]) -> Callable[[int], list[Any]]:
    """``cluster(n)``: n nodes joined into a full mesh by add_node calls on the first."""

    def build(n: int) -> list[Any]:
        nodes = [node_factory(f"node-{chr(ord('a') + i)}") for i in range(n)]
        for other in nodes[1:]:
            nodes[0].call("add_node", hostname=other.name, url=other.repl_url, verify_tls=False,
                          authorization={"username": "admin", "password": "test-password"})
        for node in nodes:
            wait_for(lambda node=node: _all_connected(node, n - 1), timeout=20,
                     message=f"{node.name} connected to its peers")
        return nodes

    return build


def _all_connected(node: Any, peers: int) -> bool:
    status = node.call("cluster_status")
    conns = [c for c in status["connections"]]
    if len(conns) < peers:
        return False
    return all(s["connected"] for c in conns for s in c["database_sockets"]
               if s["database"] == "system")


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    """The registry loaded from the shipped schemas package (tests/test_validation*.py)."""
    return SchemaRegistry.load()


def pytest_configure(config: pytest.Config) -> None:
    """Compile the packages' bytecode once, before any node starts. Where
    PYTHONDONTWRITEBYTECODE is set (the development machines here set it), every subprocess
    node compiled each of its modules from source again: about 0.3 s of each start."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has done it
    root = Path(__file__).resolve().parent.parent
    for package in ("harpsync", "operations"):
        compileall.compile_dir(root / package, quiet=1)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harpsync")
    group.addoption("--lifecycle-seeds", type=int, default=None,
                    help="run the randomized lifecycle test with seeds 1..N (marked slow "
                         "beyond the default ones); env HARPSYNC_LIFECYCLE_SEEDS")
    group.addoption("--lifecycle-seed", type=int, default=None,
                    help="run the randomized lifecycle test with this one seed only; "
                         "env HARPSYNC_LIFECYCLE_SEED")
    group.addoption("--partition-seeds", type=int, default=None,
                    help="also run the partition suite with N random fault schedules "
                         "(seeds 1..N, marked slow); env HARPSYNC_PARTITION_SEEDS")
    group.addoption("--partition-seed", type=int, default=None,
                    help="run the partition suite with this one schedule seed only "
                         "(0: the fixed default schedule); env HARPSYNC_PARTITION_SEED")
    group.addoption("--conflict-seeds", type=int, default=None,
                    help="also run the conflict convergence test with seeds 1..N (marked "
                         "slow); env HARPSYNC_CONFLICT_SEEDS")
    group.addoption("--conflict-seed", type=int, default=None,
                    help="run the conflict convergence test with this one seed only; "
                         "env HARPSYNC_CONFLICT_SEED")
    group.addoption("--lifecycle-rounds", type=int, default=None,
                    help="disturbance rounds per lifecycle seed (default 2; 3 for the "
                         "extra, slow-marked seeds)")


__all__ = ["wait_for"]


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    """An open Storage (real LMDB in ``tmp_path``, 128 MiB map) with its writer thread
    running, closed after the test."""
    opened = Storage(tmp_path, "node-a", 1 << 27)
    opened.open()
    yield opened
    opened.close()
