"""Schema changes across process lifetimes: restarts with the clock set back, SIGKILL
in the middle of lifecycle operations, real subprocess nodes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.repl_util import by_id, has_table, join, stays, wait_linked

BACK = {"HARPSYNC_CLOCK_OFFSET_MS": "-300000"}  # 5 minutes, past the 60 s skew bound


def _pair(node_factory: Any) -> tuple[Any, Any]:
    a = node_factory("node-a", process=True)
    b = node_factory("node-b", process=True)
    a.call("create_database", database="data")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system", "data"))
    return a, b


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["table", "database"])
def test_a_drop_made_with_the_clock_set_back_drops_it_on_the_peer(node_factory, what):
    """node-b creates t (or database d2 with t); node-a restarts with its clock 5
    minutes back (its own versions keep rising, but the create is node-b's) and drops
    it: the drop must be newer than the incarnation it drops. Before, it took the
    clock's version, older than the create: node-b kept it and its rows (a drop older
    than the incarnation), and node-a took it back from node-b's next hello, empty."""
    a, b = _pair(node_factory)
    database = "data" if what == "table" else "d2"
    b.call("create_table", database=database, table="t", primary_key="id")
    b.call("insert", database=database, table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t", 1, database) is not None, timeout=20,
             message="t on node-a")
    a.stop()
    a.extra_env.update(BACK)
    a.start()
    wait_linked([(a, b), (b, a)], ("system", database))
    if what == "table":
        a.call("drop_table", database=database, table="t")
    else:
        a.call("drop_database", database=database)
    wait_for(lambda: not has_table(b, "t", database), timeout=20,
             message="t dropped on node-b")
    b.stop()  # node-a's links reconnect: node-b's hellos must not bring t back
    b.start()
    wait_linked([(a, b), (b, a)], ("system",))
    stays(lambda: not has_table(a, "t", database) and not has_table(b, "t", database),
          duration=1.0)


@pytest.mark.timeout(120)
def test_a_re_create_made_with_the_clock_set_back_survives_the_peer(node_factory):
    """node-b drops t; node-a, restarted with its clock 5 minutes back, creates t again
    and writes a row: the new incarnation must be newer than the drop. Before, it was
    older: node-b ignored the create (and held the row back as a write to a table it
    had not learned), and node-b's next hello carried the drop marker, which dropped
    node-a's new table with its row."""
    a, b = _pair(node_factory)
    b.call("create_table", table="t", primary_key="id")
    wait_for(lambda: has_table(a, "t"), timeout=20, message="t on node-a")
    b.call("drop_table", table="t")
    wait_for(lambda: not has_table(a, "t"), timeout=20, message="t dropped on node-a")
    a.stop()
    a.extra_env.update(BACK)
    a.start()
    wait_linked([(a, b), (b, a)], ("system", "data"))
    a.call("create_table", table="t", primary_key="id")
    a.call("insert", table="t", records=[{"id": 7}])
    wait_for(lambda: by_id(b, "t", 7) is not None, timeout=20, message="the row on node-b")
    b.stop()
    b.start()
    wait_linked([(a, b), (b, a)], ("system", "data"))
    stays(lambda: by_id(a, "t", 7) is not None and by_id(b, "t", 7) is not None,
          duration=1.0)
