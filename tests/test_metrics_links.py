"""``/metrics`` per-link gauges follow the links that exist."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


def _link_series(node: Any, peer: str) -> list[str]:
    text = node.client.get(node.url + "metrics").text
    return [line for line in text.splitlines()
            if not line.startswith("#") and f'peer="{peer}"' in line
            and line.startswith(("harpsync_replication_connected", "harpsync_divergent_keys",
                                 "harpsync_replication_lag_txns",
                                 "harpsync_replication_compression_ratio",
                                 "harpsync_replication_copy"))]


def test_gauges_of_a_removed_link_are_gone(cluster: Any) -> None:
    """After remove_node, ``/metrics`` shows no gauge (connected, lag, copy, divergent
    keys) of its links."""
    a, _b = cluster(2)
    a.call("create_table", table="dog", primary_key="id")
    wait_for(lambda: a.call("verify_cluster", database="data", table="dog")["checked"],
             message="a verification of data.dog")
    series = _link_series(a, "node-b")
    assert any("connected" in line and line.endswith(" 1.0") for line in series)
    assert any(line.startswith("harpsync_divergent_keys") for line in series)
    a.call("remove_node", hostname="node-b")
    wait_for(lambda: not a.call("cluster_status")["connections"], message="link removed")
    assert _link_series(a, "node-b") == []
