"""Data operations on one node: insert, update, upsert, delete and the three searches.

Expected bodies are copied from the HarperDB 4.7.29 recordings in
``shared/harper-reference/transcripts.jsonl``, with timestamps left out.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import InProcessNode

TIMES = ("__createdtime__", "__updatedtime__")
HARPER = {"id": 1, "name": "Harper", "breed": "Mutt", "age": 5}
PENNY = {"id": 2, "name": "Penny", "breed": "Poodle", "age": 3}

# The searchable table shared by the read-only tests below.
DOGS: list[dict[str, Any]] = [
    {"id": 1, "name": "Harper", "breed": "Mutt", "age": 5, "tags": ["good", "old"]},
    {"id": 2, "name": "Penny", "breed": "Poodle", "age": 3, "tags": ["small"]},
    {"id": 3, "name": "Rex", "breed": "Terrier", "age": 1},
    {"id": 4, "name": "Penelope", "breed": "Pug", "age": 8, "tags": ["good"]},
    {"id": 5, "name": "Bolt", "breed": "Shepherd"},
    {"id": 6, "name": "Max", "breed": "Mutt", "age": 3.5, "vaccinated": True},
    {"id": 7, "name": "Ace", "breed": "Beagle", "age": 1, "vaccinated": 1},
]


def strip_times(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their timestamps, after checking the timestamps are floats."""
    out = []
    for record in records:
        for key in TIMES:
            if key in record:
                assert isinstance(record[key], float), (key, record)
        out.append({k: v for k, v in record.items() if k not in TIMES})
    return out


def with_nulls(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as ``get_attributes: ["*"]`` returns it: every attribute DOGS holds,
    null where this record lacks it (Harper's shape)."""
    return {**{k: None for dog in DOGS for k in dog}, **record}


def ids_of(records: list[dict[str, Any]]) -> list[Any]:
    return [r["id"] for r in records]


@pytest.fixture
def dev(node: Any) -> Any:
    """A node with an empty ``dev.dog`` table."""
    node.call("create_database", database="dev")
    node.call("create_table", database="dev", table="dog", primary_key="id")
    return node


@pytest.fixture(scope="module")
def dogs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One node, shared by the read-only search tests, holding ``dev.dog`` = DOGS."""
    root: Path = tmp_path_factory.mktemp("dogs") / "dogs"
    seeded = InProcessNode("dogs", root).start()
    seeded.call("create_table", database="dev", table="dog", primary_key="id")
    seeded.call("insert", database="dev", table="dog", records=DOGS)
    yield seeded
    seeded.close()


def search(node: Any, *conditions: dict[str, Any], **body: Any) -> list[Any]:
    """ids matched by search_by_conditions on dev.dog."""
    body.setdefault("get_attributes", ["id"])
    found = node.call("search_by_conditions", database="dev", table="dog",
                      conditions=list(conditions), **body)
    return ids_of(found)


# -- insert ---------------------------------------------------------------------------
def test_insert_matches_recorded_response(dev):
    """insert answers Harper's recorded message and hashes."""
    body = dev.call("insert", database="dev", table="dog", records=[HARPER, PENNY])
    assert body == {"message": "inserted 2 of 2 records", "inserted_hashes": [1, 2],
                    "skipped_hashes": []}


def test_insert_skips_existing_ids(dev):
    """An id that exists is skipped, not overwritten, as Harper records."""
    dev.call("insert", database="dev", table="dog", records=[HARPER])
    body = dev.call("insert", database="dev", table="dog", records=[{"id": 1, "name": "dup"}])
    assert body == {"message": "inserted 0 of 1 records", "inserted_hashes": [],
                    "skipped_hashes": [1]}
    found = dev.call("search_by_id", database="dev", table="dog", ids=[1])
    assert strip_times(found) == [HARPER]


def test_insert_skips_repeated_id_in_one_request(dev):
    """The second record with the same id in one insert is skipped."""
    body = dev.call("insert", database="dev", table="dog",
                    records=[{"id": 9, "name": "first"}, {"id": 9, "name": "second"}])
    assert body["inserted_hashes"] == [9] and body["skipped_hashes"] == [9]
    assert dev.call("search_by_id", database="dev", table="dog", ids=[9])[0]["name"] == "first"


def test_insert_generates_uuid_when_primary_key_missing(dev):
    """A record without a primary key gets a UUID string id, returned in inserted_hashes."""
    body = dev.call("insert", database="dev", table="dog", records=[{"name": "auto-id"}])
    assert body["message"] == "inserted 1 of 1 records"
    (generated,) = body["inserted_hashes"]
    assert isinstance(generated, str) and str(uuid.UUID(generated)) == generated
    found = dev.call("search_by_id", database="dev", table="dog", ids=[generated])
    assert strip_times(found) == [{"id": generated, "name": "auto-id"}]


def test_insert_string_and_float_ids(dev):
    """String ids and float ids are stored and found by value."""
    dev.call("insert", database="dev", table="dog",
             records=[{"id": "rex", "n": 1}, {"id": 2.5, "n": 2}, {"id": -7, "n": 3}])
    found = dev.call("search_by_id", database="dev", table="dog", ids=[2.5, "rex", -7])
    assert [r["n"] for r in found] == [2, 1, 3]


def test_insert_sets_timestamps(dev):
    """Inserted records carry equal float __createdtime__ and __updatedtime__."""
    dev.call("insert", database="dev", table="dog", records=[HARPER])
    (record,) = dev.call("search_by_id", database="dev", table="dog", ids=[1])
    assert isinstance(record["__createdtime__"], float)
    assert record["__createdtime__"] == record["__updatedtime__"]
    assert record["__createdtime__"] > 1.6e12  # milliseconds since 1970


def test_insert_durable_across_restart(dev):
    """Acknowledged inserts are readable after the node restarts."""
    dev.call("insert", database="dev", table="dog", records=[HARPER, PENNY])
    dev.restart()
    found = dev.call("search_by_id", database="dev", table="dog", ids=[1, 2])
    assert strip_times(found) == [HARPER, PENNY]


# -- update / upsert --------------------------------------------------------------------
@pytest.mark.parametrize(("op", "name"), [("insert", "bad name!"), ("upsert", ""),
                                          ("update", "a/b")])
def test_write_with_an_invalid_attribute_name_is_400(dev, op, name):
    """insert, upsert and update refuse a record key that is no valid attribute name,
    naming it, and write nothing."""
    dev.call("insert", database="dev", table="dog", records=[{"id": 1}])
    error = dev.call(op, expect=400, database="dev", table="dog",
                     records=[{"id": 1, "ok": 1}, {"id": 2, name: "x"}])["error"]
    assert f"attribute name '{name}'" in error or (not name and "empty" in error), error
    assert strip_times(dev.call("search_by_id", database="dev", table="dog",
                                ids=[1, 2])) == [{"id": 1}]
    described = dev.call("describe_table", database="dev", table="dog")["attributes"]
    assert "ok" not in [a["attribute"] for a in described]


def test_update_matches_recorded_response(dev):
    """update merges, skips unknown ids and answers Harper's ``update_hashes`` body."""
    dev.call("insert", database="dev", table="dog", records=[HARPER])
    body = dev.call("update", database="dev", table="dog",
                    records=[{"id": 1, "age": 6}, {"id": 99, "age": 1}])
    assert body == {"message": "updated 1 of 2 records", "update_hashes": [1],
                    "skipped_hashes": [99]}


def test_update_is_a_partial_merge(dev):
    """update keeps unmentioned attributes and __createdtime__, and moves __updatedtime__."""
    dev.call("insert", database="dev", table="dog", records=[HARPER])
    (before,) = dev.call("search_by_id", database="dev", table="dog", ids=[1])
    dev.call("update", database="dev", table="dog", records=[{"id": 1, "age": 6}])
    (after,) = dev.call("search_by_id", database="dev", table="dog", ids=[1])
    assert strip_times([after]) == [{**HARPER, "age": 6}]
    assert after["__createdtime__"] == before["__createdtime__"]
    assert after["__updatedtime__"] > before["__updatedtime__"]


def test_update_does_not_create_unknown_ids(dev):
    """An update of an unknown id creates nothing."""
    dev.call("update", database="dev", table="dog", records=[{"id": 99, "age": 1}])
    assert dev.call("search_by_id", database="dev", table="dog", ids=[99]) == []
    assert dev.count("dog", "dev") == 0


def test_update_without_primary_key_is_400(dev):
    """An update record without its primary key is a 400 naming the record."""
    body = dev.call("update", expect=400, database="dev", table="dog", records=[{"age": 1}])
    assert "records[0]" in body["error"] and "id" in body["error"]


def test_upsert_matches_recorded_response(dev):
    """upsert answers Harper's recorded body and merges into an existing record."""
    dev.call("insert", database="dev", table="dog", records=[HARPER, PENNY])
    body = dev.call("upsert", database="dev", table="dog",
                    records=[{"id": 2, "name": "Penny", "age": 4}, {"id": 3, "name": "Rex",
                                                                     "age": 1}])
    assert body == {"message": "upserted 2 of 2 records", "upserted_hashes": [2, 3]}
    found = dev.call("search_by_id", database="dev", table="dog", ids=[2, 3])
    assert strip_times(found) == [{**PENNY, "age": 4},
                                  {"id": 3, "name": "Rex", "age": 1, "breed": None}]


def test_upsert_generates_uuid_when_primary_key_missing(dev):
    """upsert of a record without a primary key creates it under a UUID string."""
    body = dev.call("upsert", database="dev", table="dog", records=[{"name": "anon"}])
    (generated,) = body["upserted_hashes"]
    assert str(uuid.UUID(generated)) == generated
    assert dev.count("dog", "dev") == 1


# -- delete -----------------------------------------------------------------------------
def test_delete_plural_message(dev):
    """Deleting two records answers Harper's recorded plural message."""
    dev.call("insert", database="dev", table="dog", records=[HARPER, PENNY])
    body = dev.call("delete", database="dev", table="dog", ids=[1, 2])
    assert body == {"message": "2 of 2 records successfully deleted",
                    "deleted_hashes": [1, 2], "skipped_hashes": []}
    assert dev.count("dog", "dev") == 0


def test_delete_hash_values_singular_message(dev):
    """delete with hash_values of one record answers "1 of 1 record"."""
    dev.call("insert", database="dev", table="dog", records=[{"id": 97}])
    body = dev.call("delete", database="dev", table="dog", hash_values=[97])
    assert body == {"message": "1 of 1 record successfully deleted",
                    "deleted_hashes": [97], "skipped_hashes": []}


def test_delete_missing_ids_are_skipped(dev):
    """Ids that do not exist go to skipped_hashes (Harper wrongly lists them as deleted)."""
    dev.call("insert", database="dev", table="dog", records=[{"id": 3}])
    body = dev.call("delete", database="dev", table="dog", ids=[3, 98])
    assert body == {"message": "1 of 2 records successfully deleted",
                    "deleted_hashes": [3], "skipped_hashes": [98]}


def test_delete_then_insert_same_id(dev):
    """A deleted id can be inserted again."""
    dev.call("insert", database="dev", table="dog", records=[HARPER])
    dev.call("delete", database="dev", table="dog", ids=[1])
    body = dev.call("insert", database="dev", table="dog", records=[{"id": 1, "name": "new"}])
    assert body["inserted_hashes"] == [1]
    found = dev.call("search_by_id", database="dev", table="dog", ids=[1])
    assert strip_times(found) == [{**dict.fromkeys(HARPER), "id": 1, "name": "new"}]


# -- search_by_id -----------------------------------------------------------------------
def test_search_by_id_matches_recorded_response(dogs):
    """search_by_id with get_attributes returns those attributes, missing ids left out."""
    found = dogs.call("search_by_id", database="dev", table="dog", ids=[1, 2, 99],
                      get_attributes=["id", "name", "age"])
    assert found == [{"id": 1, "name": "Harper", "age": 5}, {"id": 2, "name": "Penny", "age": 3}]


def test_search_by_id_default_attributes_include_timestamps(dogs):
    """Without get_attributes every attribute comes back, with float timestamps."""
    (record,) = dogs.call("search_by_id", database="dev", table="dog", ids=[3])
    assert set(record) == {"id", "name", "breed", "age", "tags", "vaccinated", *TIMES}
    assert record["tags"] is None and record["vaccinated"] is None
    assert all(isinstance(record[key], float) for key in TIMES)


def test_search_by_id_nulls_follow_schema_changes(dev):
    """The attributes a search_by_id fills with null follow every schema change."""
    def shown(database: str = "dev", ids: Any = (1,)) -> set[str]:
        (record,) = dev.call("search_by_id", database=database, table="dog", ids=list(ids))
        return set(record) - set(TIMES)

    dev.call("insert", database="dev", table="dog", records=[{"id": 1, "name": "Rex"}])
    assert shown() == {"id", "name"}
    dev.call("insert", database="dev", table="dog", records=[{"id": 2, "age": 3}])
    assert shown() == {"id", "name", "age"}
    dev.call("create_attribute", database="dev", table="dog", attribute="color")
    assert shown() == {"id", "name", "age", "color"}
    dev.call("drop_attribute", database="dev", table="dog", attribute="color")
    assert shown() == {"id", "name", "age"}
    dev.call("drop_table", database="dev", table="dog")
    dev.call("create_table", database="dev", table="dog", primary_key="key")
    dev.call("insert", database="dev", table="dog", records=[{"key": "a"}])
    assert shown(ids=["a"]) == {"key"}
    dev.call("create_database", database="other")
    dev.call("create_table", database="other", table="dog", primary_key="id")
    dev.call("insert", database="other", table="dog", records=[{"id": 1, "size": 2}])
    assert shown("other") == {"id", "size"}


def test_search_by_id_star_includes_timestamps(dogs):
    """get_attributes ["*"] includes __createdtime__ and __updatedtime__ as floats."""
    (record,) = dogs.call("search_by_id", database="dev", table="dog", ids=[3],
                          get_attributes=["*"])
    assert strip_times([record]) == [with_nulls(DOGS[2])]
    assert set(TIMES) <= set(record)


def test_search_by_hash_alias(dogs):
    """search_by_hash with hash_values is search_by_id."""
    found = dogs.call("search_by_hash", database="dev", table="dog", hash_values=[4, 1],
                      get_attributes=["id"])
    assert found == [{"id": 4}, {"id": 1}]


# -- search_by_value --------------------------------------------------------------------
def test_search_by_value_wildcard_suffix(dogs):
    """search_by_value "Pen*" matches names starting with Pen (recorded shape)."""
    found = dogs.call("search_by_value", database="dev", table="dog",
                      search_attribute="name", search_value="Pen*", get_attributes=["*"])
    assert strip_times(found) == [with_nulls(DOGS[1]), with_nulls(DOGS[3])]


def test_search_by_value_wildcard_prefix_and_infix(dogs):
    """Leading and inner wildcards match anywhere in the string."""
    def names(value: str) -> list[str]:
        found = dogs.call("search_by_value", database="dev", table="dog",
                          attribute="name", value=value, get_attributes=["name"])
        return [r["name"] for r in found]

    assert names("*ny") == ["Penny"]
    assert names("*el*") == ["Penelope"]
    assert names("P*y") == ["Penny"]
    assert names("Rex") == ["Rex"]
    assert names("rex") == []


def test_search_by_value_star_matches_records_with_attribute(dogs):
    """search_value "*" matches every record that has the attribute."""
    found = dogs.call("search_by_value", database="dev", table="dog",
                      search_attribute="age", search_value="*", get_attributes=["id"])
    assert ids_of(found) == [1, 2, 3, 4, 6, 7]


def test_search_by_value_number(dogs):
    """A numeric search_value matches equal numbers, not strings or booleans."""
    found = dogs.call("search_by_value", database="dev", table="dog",
                      search_attribute="age", search_value=1, get_attributes=["id", "age"])
    assert found == [{"id": 3, "age": 1}, {"id": 7, "age": 1}]
    found = dogs.call("search_by_value", database="dev", table="dog",
                      search_attribute="vaccinated", search_value=1, get_attributes=["id"])
    assert ids_of(found) == [7]
    found = dogs.call("search_by_value", database="dev", table="dog",
                      search_attribute="vaccinated", search_value=True, get_attributes=["id"])
    assert ids_of(found) == [6]


def test_search_by_value_limit_offset(dogs):
    """search_by_value honours limit and offset."""
    found = dogs.call("search_by_value", database="dev", table="dog", attribute="name",
                      value="*", get_attributes=["id"], offset=2, limit=3)
    assert ids_of(found) == [3, 4, 5]


# -- search_by_conditions ---------------------------------------------------------------
def test_search_by_conditions_matches_recorded_response(dogs):
    """The recorded and-search with legacy field names finds the same record."""
    found = dogs.call("search_by_conditions", database="dev", table="dog", operator="and",
                      get_attributes=["*"], conditions=[
                          {"search_attribute": "age", "search_type": "greater_than",
                           "search_value": 4},
                          {"search_attribute": "name", "search_type": "starts_with",
                           "search_value": "P"}])
    assert strip_times(found) == [with_nulls(DOGS[3])]


def test_search_by_conditions_between_sorted_descending(dogs):
    """The recorded between-search with sort descending and limit returns ids high to low."""
    found = dogs.call("search_by_conditions", database="dev", table="dog", operator="and",
                      get_attributes=["id"], sort={"attribute": "id", "descending": True},
                      limit=10, conditions=[{"attribute": "age", "comparator": "between",
                                             "value": [1, 5]}])
    assert found == [{"id": 7}, {"id": 6}, {"id": 3}, {"id": 2}, {"id": 1}]


@pytest.mark.parametrize(("comparator", "attribute", "value", "expected"), [
    ("equals", "breed", "Mutt", [1, 6]),
    ("equals", "age", 3.5, [6]),
    ("not_equal", "breed", "Mutt", [2, 3, 4, 5, 7]),
    ("contains", "name", "en", [2, 4]),
    ("contains", "tags", "good", [1, 4]),
    ("starts_with", "breed", "P", [2, 4]),
    ("ends_with", "name", "y", [2]),
    ("greater_than", "age", 3, [1, 4, 6]),
    ("greater_than_equal", "age", 3, [1, 2, 4, 6]),
    ("less_than", "age", 3, [3, 7]),
    ("less_than_equal", "age", 3, [2, 3, 7]),
    ("between", "age", [3, 5], [1, 2, 6]),
    ("between", "name", ["B", "I"], [1, 5]),
    ("greater_than", "name", "Penny", [3]),
])
def test_search_by_conditions_comparator(dogs, comparator, attribute, value, expected):
    """Each comparator selects exactly the records it describes."""
    condition = {"attribute": attribute, "comparator": comparator, "value": value}
    assert search(dogs, condition) == expected


def test_search_by_conditions_comparators_skip_other_types(dogs):
    """Ordering comparators never match a value of another type (or a missing attribute)."""
    assert search(dogs, {"attribute": "age", "comparator": "greater_than", "value": "0"}) == []
    assert search(dogs, {"attribute": "name", "comparator": "less_than", "value": 100}) == []


def test_search_by_conditions_and(dogs):
    """``and`` keeps records matching every condition (the default operator)."""
    assert search(dogs, {"attribute": "breed", "comparator": "equals", "value": "Mutt"},
                  {"attribute": "age", "comparator": "less_than", "value": 5}) == [6]


def test_search_by_conditions_or(dogs):
    """``or`` keeps records matching any condition."""
    assert search(dogs, {"attribute": "breed", "comparator": "equals", "value": "Pug"},
                  {"attribute": "age", "comparator": "equals", "value": 1},
                  operator="or") == [3, 4, 7]


def test_search_by_conditions_grouped_conditions(dogs):
    """A condition holding ``conditions`` is a group with its own operator, nested as
    in Harper's documented example (legacy names inside groups too); a bad condition
    inside a group is a 400 naming it."""
    mutt_or_pug = {"operator": "or", "conditions": [
        {"search_attribute": "breed", "search_type": "equals", "search_value": "Mutt"},
        {"attribute": "breed", "comparator": "equals", "value": "Pug"}]}
    assert search(dogs, {"attribute": "age", "comparator": "greater_than", "value": 3},
                  mutt_or_pug) == [1, 4, 6]
    young = {"conditions": [{"attribute": "age", "comparator": "less_than", "value": 2},
                            {"attribute": "vaccinated", "comparator": "equals", "value": 1}]}
    assert search(dogs, mutt_or_pug, young, operator="or") == [1, 4, 6, 7]
    assert search(dogs, {"conditions": [young]}) == [7]
    deep: dict[str, Any] = {"attribute": "id", "comparator": "equals", "value": 1}
    for _ in range(100):
        deep = {"conditions": [deep]}
    for bad, message in (
            ({"operator": "or", "conditions": [young]},
             'An "or" operator requires at least two conditions'),
            ({"conditions": [{"attribute": "age", "comparator": "bogus", "value": 1}]},
             'Unknown query comparator "bogus"'),
            ({"conditions": [{"attribute": "age", "comparator": "between", "value": 1}]},
             "'conditions[0].conditions[0].value' must be an array of two values"),
            ({"conditions": [young, {"comparator": "equals", "value": 1}]},
             "'conditions[0].conditions[1].attribute' is required"),
            ({"conditions": [{"conditions": []}]},
             "'conditions[0].conditions[0].conditions' must be a non-empty array"),
            ({"comparator": "equals", "value": 1}, "'conditions[0].attribute' is required"),
            (deep, "nests groups deeper than 8")):
        error = dogs.call("search_by_conditions", expect=400, database="dev", table="dog",
                          get_attributes=["id"], conditions=[bad])["error"]
        assert message in error, (bad, error)


def test_search_by_conditions_sort_next_breaks_ties(dogs):
    """``sort.next`` orders the records the level above finds equal (Harper's docs)."""
    every = {"attribute": "id", "comparator": "greater_than", "value": 0}
    sort = {"attribute": "breed", "next": {"attribute": "age"}}
    assert search(dogs, every, sort=sort) == [7, 6, 1, 2, 4, 5, 3]
    sort = {"attribute": "vaccinated", "descending": True,
            "next": {"attribute": "breed", "descending": True, "next": {"attribute": "name"}}}
    assert search(dogs, every, sort=sort, limit=4) == [7, 6, 3, 5]
    for sort, message in (({"attribute": "id", "next": {"descending": True}},
                           "'sort.next.attribute' is required"),
                          ({"attribute": "id", "next": {"attribute": "age", "next": {
                              "attribute": "name", "descending": "yes"}}},
                           "'sort.next.next.descending' must be a boolean")):
        error = dogs.call("search_by_conditions", expect=400, database="dev", table="dog",
                          get_attributes=["id"], conditions=[every], sort=sort)["error"]
        assert error == message


def test_search_by_conditions_limit_offset(dogs):
    """limit and offset page through the matches in primary-key order."""
    every = {"attribute": "id", "comparator": "greater_than_equal", "value": 0}
    assert search(dogs, every, limit=2) == [1, 2]
    assert search(dogs, every, offset=2, limit=2) == [3, 4]
    assert search(dogs, every, offset=6) == [7]
    assert search(dogs, every, offset=10) == []
    assert search(dogs, every, limit=0) == []


def test_search_limit_and_offset_beyond_any_size(dogs):
    """A limit or offset past 2**63 pages like any large one (everything, or nothing),
    not a 500: it used to reach ``islice``, which refuses numbers past sys.maxsize."""
    every = {"attribute": "id", "comparator": "greater_than_equal", "value": 0}
    huge = 10**20
    for sort in (None, {"attribute": "id"}):
        extra = {"sort": sort} if sort else {}
        assert search(dogs, every, limit=huge, **extra) == [1, 2, 3, 4, 5, 6, 7]
        assert search(dogs, every, offset=huge, **extra) == []
        assert search(dogs, every, offset=huge, limit=huge, **extra) == []


def test_search_by_conditions_sort(dogs):
    """sort orders by an attribute ascending or descending before paging."""
    every = {"attribute": "id", "comparator": "greater_than", "value": 0}
    ascending = search(dogs, every, sort={"attribute": "name"})
    assert ascending == [7, 5, 1, 6, 4, 2, 3]
    descending = search(dogs, every, sort={"attribute": "name", "descending": True})
    assert descending == list(reversed(ascending))
    assert search(dogs, every, sort={"attribute": "age", "descending": True}, limit=3) == [4, 1, 6]


def test_search_by_conditions_get_attributes(dogs):
    """get_attributes projects each result; unknown attributes are left out."""
    found = dogs.call("search_by_conditions", database="dev", table="dog",
                      get_attributes=["name", "nope"],
                      conditions=[{"attribute": "id", "comparator": "equals", "value": 5}])
    assert found == [{"name": "Bolt"}]


def test_search_system_users_hides_password_hashes(node):
    """Searching system.hdb_user never returns the password hashes."""
    found = node.call("search_by_value", database="system", table="hdb_user",
                      search_attribute="username", search_value="*", get_attributes=["*"])
    assert [r["username"] for r in found] == ["admin"]
    assert "password" not in found[0]
    found = node.call("search_by_id", database="system", table="hdb_user", ids=["admin"],
                      get_attributes=["username", "password"])
    assert found == [{"username": "admin"}]


def test_system_tables_refuse_generic_writes(node):
    """insert/update/upsert/delete on system tables answer 400 and change nothing."""
    before = node.call("list_users")
    for op, extra in (("insert", {"records": [{"username": "eve", "password": "x"}]}),
                      ("upsert", {"records": [{"username": "admin", "active": False}]}),
                      ("update", {"records": [{"username": "admin", "role": "nobody"}]}),
                      ("delete", {"ids": ["admin"]})):
        res = node.post({"operation": op, "database": "system", "table": "hdb_user", **extra})
        assert res.status_code == 400, (op, res.text)
        assert "system" in res.json()["error"]
    assert node.call("list_users") == before


def test_password_hashes_cannot_be_probed_by_conditions(node):
    """A condition on hdb_user.password matches nothing: secrets are removed before filtering."""
    res = node.call("search_by_conditions", database="system", table="hdb_user",
                    conditions=[{"attribute": "password", "comparator": "starts_with",
                                 "value": "scrypt$"}])
    assert res == []
    everyone = node.call("search_by_value", database="system", table="hdb_user",
                         attribute="username", value="*")
    assert everyone and all("password" not in u for u in everyone)
