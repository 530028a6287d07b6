"""A node unmaps the LMDB pages it touched (``storage.trimInterval``), and sooner while
its data files grow fast: the pages touched between trims grow with the write rate."""

from __future__ import annotations

from typing import Any

from tests.helpers import wait_for


def test_fast_growth_trims_before_the_interval(node_factory: Any) -> None:
    node = node_factory("node-a", env={"STORAGE_TRIMINTERVAL": "1h"})
    node.call("create_table", table="big", primary_key="id")
    storage = node.node.storage
    assert storage.trims == 0
    pad = "x" * 10_000
    for first in range(0, 2_500, 100):  # about 25 MB of records, more in the files
        node.call("insert", table="big",
                  records=[{"id": i, "pad": pad} for i in range(first, first + 100)])
    wait_for(lambda: storage.trims >= 1, timeout=20,
             message="a trim after the data files grew by more than 16 MiB")
