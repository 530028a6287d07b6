"""The two-node pair the verify_cluster and repair_cluster tests share per module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import InProcessNode, wait_for
from tests.repl_util import join
from tests.verify.util import _linked


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """Two nodes replicating everything, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("verify")
    env = {"REPLICATION_VERIFYINTERVAL": "0"}
    a = InProcessNode("node-a", root / "node-a", env).start()
    b = InProcessNode("node-b", root / "node-b", env).start()
    join(a, b)
    wait_for(lambda: _linked(a, b.name) and _linked(b, a.name), timeout=20,
             message="both nodes linked")
    yield a, b
    for node in (b, a):
        node.close()
