"""The reference model of the lifecycle and partition suites (pure, no nodes)."""

from __future__ import annotations

from typing import Any

from tests.lifecycle_model import INF, Model, Op, SchemaEvent, markers_of


def put(v: str, lo: float, hi: float | None = None, acked: bool = True) -> Op:
    exact = hi is None
    return Op("put", {"id": 1, "v": v}, lo, lo if hi is None else hi, acked, exact=exact,
              label=v)


def row(v: str, version: float) -> dict[str, Any]:
    return {"id": 1, "v": v, "__updatedtime__": version, "__createdtime__": 1.0}


def model_with(*ops: Op) -> tuple[Model, int]:
    model = Model()
    inc = model.new_incarnation("data", "t")
    for op in ops:
        model.add(inc, 1, op)
    return model, inc


def test_newest_acknowledged_write_is_the_only_allowed_value():
    """With exact versions, only the newest acknowledged put may be the final row."""
    model, inc = model_with(put("a", 10.0), put("b", 20.0), put("c", 15.0))
    assert model.check_rows(inc, [row("b", 20.0)]) == []
    assert model.check_rows(inc, [row("c", 15.0)])
    assert model.check_rows(inc, [row("b", 21.0)])  # right value, wrong version
    assert model.check_rows(inc, [])  # an acknowledged write lost


def test_equal_float_versions_allow_either_side():
    """Equal __updatedtime__ floats are a tie: either write may win."""
    model, inc = model_with(put("a", 10.0), put("b", 10.0))
    assert model.check_rows(inc, [row("a", 10.0)]) == []
    assert model.check_rows(inc, [row("b", 10.0)]) == []


def test_delete_interval_decides_only_when_it_does_not_overlap():
    """A delete surely newer than every put leaves nothing; an overlapping one allows both."""
    sure, inc = model_with(put("a", 10.0), Op("delete", None, 10.5, 12.0, True))
    assert sure.check_rows(inc, []) == []
    assert sure.check_rows(inc, [row("a", 10.0)])
    # It removed "a" itself: newer even with an equal float.
    read, inc = model_with(put("a", 10.0), Op("delete", None, 10.0, 12.0, True,
                                               supersedes="a"))
    assert read.check_rows(inc, [row("a", 10.0)])
    racing, inc = model_with(put("a", 10.0), Op("delete", None, 5.0, 12.0, True),
                             put("b", 11.0))
    assert racing.check_rows(inc, []) == []
    assert racing.check_rows(inc, [row("b", 11.0)]) == []
    assert racing.check_rows(inc, [row("a", 10.0)])


def test_unacknowledged_writes_may_be_absent_or_present_but_not_altered():
    """A write whose outcome is unknown may be missing, or present exactly as written."""
    model, inc = model_with(put("a", 0.0, INF, acked=False))
    assert model.check_rows(inc, []) == []
    assert model.check_rows(inc, [row("a", 99.0)]) == []
    assert model.check_rows(inc, [{"id": 1, "v": "other", "__updatedtime__": 1.0}])


def test_rows_nobody_wrote_are_reported():
    """A row the model never saw written is a problem."""
    model, inc = model_with()
    assert model.check_rows(inc, [{"id": 7, "v": "x", "__updatedtime__": 1.0}])


def test_schema_outcome_follows_the_newest_create_or_drop():
    """The newest event decides: a later drop removes the table, a later create wins,
    overlapping intervals allow either outcome."""
    model = Model()
    one = model.new_incarnation("data", "t")
    two = model.new_incarnation("data", "t")
    model.add_event("data", "t", SchemaEvent("create", 1.0, 2.0, True, one))
    model.add_event("data", "t", SchemaEvent("drop", 3.0, 4.0, True))
    assert model.check_schema({}) == []
    assert model.check_schema({("data", "t"): {one}})
    model.add_event("data", "t", SchemaEvent("create", 5.0, 6.0, True, two))
    assert model.check_schema({("data", "t"): {two}}) == []
    assert model.check_schema({("data", "t"): {one}})
    assert model.check_schema({})
    model.add_event("data", "t", SchemaEvent("drop", 5.5, 7.0, True))
    assert model.check_schema({}) == []
    assert model.check_schema({("data", "t"): {two}}) == []
    assert model.check_schema({("data", "t"): {one, two}})  # one table, two definitions


def test_concurrent_creates_after_the_last_drop_merge_into_one_table():
    """Creates with no drop between them may be one table with both markers (lifecycle
    seed 57); its rows merge the writes to both, and a create that surely followed
    every drop cannot be left out of such a table."""
    model = Model()
    one = model.new_incarnation("data", "t")
    two = model.new_incarnation("data", "t")
    three = model.new_incarnation("data", "t")
    model.add_event("data", "t", SchemaEvent("create", 1.0, 2.0, True, one))
    model.add_event("data", "t", SchemaEvent("drop", 3.0, 3.0, True))
    model.add_event("data", "t", SchemaEvent("create", 3.0, 3.5, True, two))
    model.add_event("data", "t", SchemaEvent("create", 8.0, 9.0, True, three))
    assert model.check_schema({("data", "t"): {three}}) == []
    assert model.check_schema({("data", "t"): {two, three}}) == []
    assert model.check_schema({("data", "t"): {two}})  # three surely followed the drop
    assert model.check_schema({("data", "t"): {one, three}})  # one was dropped
    model.add(two, 1, put("a", 4.0))
    model.add(three, 1, put("b", 10.0))
    assert model.check_rows({two, three}, [row("b", 10.0)]) == []
    assert model.check_rows({two, three}, [row("a", 4.0)])


def test_markers_are_read_from_describe_attributes():
    """Only attributes named inc<number> are incarnation markers."""
    attrs = [{"attribute": "id"}, {"attribute": "inc12"}, {"attribute": "incx"},
             {"attribute": "v"}]
    assert markers_of(attrs) == {12}
