"""Issue 8, point 7: a wildcard search cannot stall the node."""

from __future__ import annotations

import random
import re

import pytest

from harpsync.query import wildcard_match


def _reference(pattern: str, value: str) -> bool:
    """What ``*`` means: any run of characters (the old regex, fine on tiny inputs)."""
    rx = re.escape(pattern).replace(r"\*", ".*")
    return re.fullmatch(rx, value, re.DOTALL) is not None


def test_wildcard_matching_agrees_with_the_definition():
    """On every small pattern over {a, b, *} and value over {a, b}, the linear matcher
    agrees with the regular-expression definition."""
    rng = random.Random(8)
    for _ in range(20_000):
        pattern = "".join(rng.choice("ab*") for _ in range(rng.randint(0, 7)))
        value = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        assert wildcard_match(pattern, value) == _reference(pattern, value), (pattern, value)
    assert wildcard_match("a*", "a\nb") and wildcard_match("*.*", "x.y")
    assert not wildcard_match("a.*", "abc")  # no regex syntax: '.' is a dot


@pytest.mark.timeout(120)
def test_redos_pattern_returns_at_once(node_factory):
    """``"*a"*10 + "*c"`` against 200 ``a``s: a backtracking regex would run far longer
    than the client waits (and hold the GIL all along); the linear matcher answers at
    once and correctly, and the node stays responsive."""
    node = node_factory("node-a", process=True)
    node.call("create_table", table="t", primary_key="id")
    node.call("insert", table="t", records=[{"id": 1, "s": "a" * 200},
                                             {"id": 2, "s": "a" * 200 + "c"}])
    res = node.post({"operation": "search_by_value", "table": "t", "attribute": "s",
                     "value": "*a" * 10 + "*c", "get_attributes": ["id"]}, timeout=20)
    assert res.status_code == 200 and res.json() == [{"id": 2}], res.text
    assert node.client.get(node.url + "health", timeout=20).status_code == 200
