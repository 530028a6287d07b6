"""The ``sql`` operation on two replicating nodes, and null attributes in every read.

Shapes follow Harper's SQL operations documentation (4.7) and the recorded
``sql`` exchanges in ``shared/harper-reference/transcripts.jsonl``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync.errors import BadRequestError
from harpsync.sql.expr import like_match
from harpsync.sql.parser import parse
from harpsync.sql.plan import key_lookup
from operations.sql import WRITE_CHUNK
from tests.helpers import ADMIN, InProcessNode, wait_for

DOGS: list[dict[str, Any]] = [
    {"id": 1, "dog_name": "Penny", "age": 7, "breed": "Mutt", "weight_lbs": 38},
    {"id": 2, "dog_name": "Harper", "age": 7, "breed": "Husky", "weight_lbs": 55},
    {"id": 3, "dog_name": "Alby", "age": 7, "breed": "Mutt", "weight_lbs": 84},
    {"id": 4, "dog_name": "Billy", "age": 6, "breed": "Lab"},
    {"id": 5, "dog_name": "Rose Merry", "age": 8, "breed": "Mutt", "weight_lbs": 15},
    {"id": 6, "dog_name": "Kato", "age": 6},
    {"id": 7, "dog_name": "penelope", "age": 3, "breed": "Lab", "weight_lbs": 35},
]
ATTRS = ["id", "dog_name", "age", "breed", "weight_lbs"]
TIMES = ("__createdtime__", "__updatedtime__")
READER = {"super_user": False,
          "dev": {"tables": {"dog": {"read": True, "insert": False, "update": False,
                                     "delete": False, "attribute_permissions": []}}}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """Nodes A and B replicating, with ``dev.dog`` = DOGS on both and a reader user."""
    root: Path = tmp_path_factory.mktemp("sql")
    a = InProcessNode("sql-a", root / "a").start()
    b = InProcessNode("sql-b", root / "b").start()
    try:
        a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
               authorization={"username": ADMIN[0], "password": ADMIN[1]})
        a.call("create_database", database="dev")
        a.call("create_table", database="dev", table="dog", primary_key="id")
        a.call("insert", database="dev", table="dog", records=DOGS)
        a.call("add_role", role="reader", permission=READER)
        a.call("add_user", role="reader", username="bob", password="bobpw", active=True)
        wait_for(lambda: _count(b, "dog") == len(DOGS), timeout=20, message="B has the dogs")
        yield a, b
    finally:
        b.close()
        a.close()


def _count(node: Any, table: str) -> int:
    response = node.post({"operation": "sql", "sql": f"SELECT COUNT(*) AS c FROM dev.{table}"})
    return int(response.json()[0]["c"]) if response.status_code == 200 else -1


def sql(node: Any, text: str, expect: int = 200, auth: Any = ADMIN) -> Any:
    response = node.post({"operation": "sql", "sql": text}, auth=auth)
    assert response.status_code == expect, (text, response.status_code, response.text)
    return response.json()


def ids(rows: list[dict[str, Any]]) -> list[Any]:
    return [row["id"] for row in rows]


def strip_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


# -- SELECT ----------------------------------------------------------------------------
def test_count_matches_recorded_response(mesh):
    """``SELECT count(*) AS c`` answers ``[{"c": n}]`` as Harper recorded, also on B."""
    a, b = mesh
    assert sql(a, "SELECT count(*) AS c FROM dev.dog") == [{"c": 7}]
    assert sql(b, "SELECT count(*) AS c FROM dev.dog WHERE id >= 5") == [{"c": 3}]


def test_select_star_by_id_matches_documented_shape(mesh):
    """``SELECT * ... WHERE id = 1`` returns the whole record with float timestamps."""
    a, _ = mesh
    (row,) = sql(a, "SELECT * FROM dev.dog WHERE id = 1")
    assert strip_times([row]) == [DOGS[0]]
    assert all(isinstance(row[t], float) for t in TIMES)


def test_select_star_fills_missing_attributes_with_null(mesh):
    """SELECT * shows every attribute the table knows, null where a record lacks it."""
    a, _ = mesh
    (row,) = sql(a, "SELECT * FROM dev.dog WHERE id = 6")
    assert strip_times([row]) == [{**dict.fromkeys(ATTRS), **DOGS[5]}]


@pytest.mark.parametrize(("where", "expected"), [
    ("age = 7", [1, 2, 3]),
    ("age <> 7", [4, 5, 6, 7]),
    ("age != 7", [4, 5, 6, 7]),
    ("age < 7", [4, 6, 7]),
    ("age <= 6", [4, 6, 7]),
    ("age > 7", [5]),
    ("age >= 7", [1, 2, 3, 5]),
    ("age = 7 AND breed = 'Mutt'", [1, 3]),
    ("age = 3 OR breed = 'Husky'", [2, 7]),
    ("NOT breed = 'Mutt'", [2, 4, 7]),
    ("breed IN ('Lab', 'Husky')", [2, 4, 7]),
    ("breed NOT IN ('Lab', 'Husky')", [1, 3, 5]),
    ("dog_name LIKE 'pen%'", [1, 7]),
    ("dog_name LIKE '_ato'", [6]),
    ("dog_name NOT LIKE '%e%'", [3, 4, 6]),
    ("weight_lbs BETWEEN 30 AND 60", [1, 2, 7]),
    ("weight_lbs NOT BETWEEN 30 AND 60", [3, 5]),
    ("breed IS NULL", [6]),
    ("weight_lbs IS NOT NULL AND (age < 7 OR breed = 'Husky')", [2, 7]),
    ("id IN (3, 1, 99)", [1, 3]),
    ("id = 2 AND age = 1", []),
])
def test_where_operators(mesh, where, expected):
    """Each WHERE operator of the subset selects the expected ids (null is unknown)."""
    a, _ = mesh
    assert sorted(ids(sql(a, f"SELECT id FROM dev.dog WHERE {where}"))) == expected


def test_columns_aliases_order_limit_offset(mesh):
    """Column lists, AS, ORDER BY (several keys, DESC), LIMIT and OFFSET."""
    a, _ = mesh
    rows = sql(a, "SELECT id, dog_name AS name FROM dev.dog ORDER BY age DESC, id "
                  "LIMIT 3 OFFSET 1")
    assert rows == [{"id": 1, "name": "Penny"}, {"id": 2, "name": "Harper"},
                    {"id": 3, "name": "Alby"}]
    rows = sql(a, "SELECT d.id, weight_lbs FROM dev.dog AS d WHERE d.age = 6 ORDER BY id")
    assert rows == [{"id": 4, "weight_lbs": None}, {"id": 6, "weight_lbs": None}]
    assert ids(sql(a, "SELECT id FROM dev.dog ORDER BY weight_lbs LIMIT 2, 2")) == [5, 7]



def test_unaliased_expressions_are_named_as_written(mesh):
    """A column without an alias is named by its expression as the client wrote it
    (it came back as ``age / NULLIF(2, 0)``)."""
    a, _ = mesh
    assert sql(a, "SELECT age / 2, age % 5, age != 1 FROM dev.dog WHERE id = 1") == [
        {"age / 2": 3.5, "age % 5": 2, "age <> 1": True}]


def test_limit_and_offset_beyond_any_size(mesh):
    """LIMIT and OFFSET past 2**63 page like any large number, not a 500 (``islice``
    refuses numbers past sys.maxsize), with or without ORDER BY, DISTINCT or GROUP BY."""
    a, _ = mesh
    huge = 10**20
    for tail in ("", " ORDER BY id"):
        assert ids(sql(a, f"SELECT id FROM dev.dog{tail} LIMIT {huge}")) == \
            ids(sql(a, f"SELECT id FROM dev.dog{tail}"))
        assert sql(a, f"SELECT id FROM dev.dog{tail} LIMIT 1 OFFSET {huge}") == []
    assert sql(a, f"SELECT DISTINCT id FROM dev.dog LIMIT {huge} OFFSET {huge}") == []
    assert sql(a, f"SELECT COUNT(*) AS c FROM dev.dog GROUP BY id LIMIT 1 OFFSET {huge}") == []


def test_aggregates_with_group_by(mesh):
    """COUNT(*), COUNT(col), MIN, MAX, SUM and AVG per GROUP BY group, ordered by alias."""
    a, _ = mesh
    rows = sql(a, "SELECT breed, COUNT(*) AS n, COUNT(weight_lbs) AS weighed, MIN(age) AS lo,"
                  " MAX(dog_name) AS last, SUM(weight_lbs) AS total, AVG(age) AS mean "
                  "FROM dev.dog GROUP BY breed ORDER BY n DESC, breed")
    assert rows == [
        {"breed": "Mutt", "n": 3, "weighed": 3, "lo": 7, "last": "Rose Merry",
         "total": 137, "mean": 22 / 3},
        {"breed": "Lab", "n": 2, "weighed": 1, "lo": 3, "last": "penelope", "total": 35,
         "mean": 4.5},
        {"breed": None, "n": 1, "weighed": 0, "lo": 6, "last": "Kato", "total": None,
         "mean": 6.0},
        {"breed": "Husky", "n": 1, "weighed": 1, "lo": 7, "last": "Harper", "total": 55,
         "mean": 7.0},
    ]
    assert sql(a, "SELECT COUNT(*), MAX(age) FROM dev.dog WHERE id > 100") == [
        {"COUNT(*)": 0, "MAX(age)": None}]
    assert sql(a, "SELECT DISTINCT breed FROM dev.dog WHERE breed IS NOT NULL "
                  "ORDER BY breed") == [{"breed": "Husky"}, {"breed": "Lab"},
                                        {"breed": "Mutt"}]


def test_primary_key_lookups_use_the_key():
    """``pk = v``, ``pk IN (...)`` (alone, in an AND, in an OR of them) plan key reads."""
    def plan(where: str) -> Any:
        return key_lookup(parse(f"SELECT * FROM dev.dog WHERE {where}").where, "id")

    assert plan("id = 5") == [5]
    assert plan("5 = id") == [5]
    assert plan("id IN (1, 2, 2)") == [1, 2]
    assert plan("age > 3 AND id IN ('a', 'b')") == ["a", "b"]
    assert plan("id = 1 OR id IN (2, 3)") == [1, 2, 3]
    assert plan("id = 1 OR age = 2") is None
    assert plan("age = 1") is None
    assert plan("NOT id = 1") is None


def test_one_and_one_point_zero_are_one_value(node):
    """1 and 1.0 are one number (one key, one group, one distinct value), as ``=`` says
    and as in Harper: a key lookup naming both finds the record once, and UPDATE writes it
    once; GROUP BY, DISTINCT and COUNT(DISTINCT) do not split them."""
    node.call("create_table", database="dev", table="nums", primary_key="id")
    node.call("insert", database="dev", table="nums",
              records=[{"id": 1, "n": 1}, {"id": 2, "n": 1.0}, {"id": 3, "n": 2}])
    assert sql(node, "SELECT id FROM dev.nums WHERE id IN (1, 1.0)") == [{"id": 1}]
    assert sql(node, "SELECT COUNT(*) AS c FROM dev.nums WHERE id = 1 OR id = 1.0") == [
        {"c": 1}]
    assert sql(node, "SELECT n, COUNT(*) AS c FROM dev.nums GROUP BY n ORDER BY c") == [
        {"n": 2, "c": 1}, {"n": 1, "c": 2}]
    assert len(sql(node, "SELECT DISTINCT n FROM dev.nums")) == 2
    assert sql(node, "SELECT COUNT(DISTINCT n) AS c FROM dev.nums") == [{"c": 2}]
    assert sql(node, "UPDATE dev.nums SET m = 5 WHERE id IN (1, 1.0)") == {
        "message": "updated 1 of 1 records", "update_hashes": [1], "skipped_hashes": []}


def test_key_lookups_never_scan_the_table(mesh, monkeypatch):
    """On the node, a statement whose WHERE names the keys reads them without a scan."""
    from operations import sql as sql_ops

    scans: list[str] = []
    real_scan = sql_ops.reads.scan

    def counting_scan(db: Any, table: Any) -> Any:
        scans.append(table.name)
        return real_scan(db, table)

    monkeypatch.setattr(sql_ops.reads, "scan", counting_scan)
    a, _ = mesh
    assert ids(sql(a, "SELECT id FROM dev.dog WHERE id IN (2, 1) AND age = 7")) == [2, 1]
    assert sql(a, "SELECT COUNT(*) AS c FROM dev.dog WHERE id = 3 OR id = 4") == [{"c": 2}]
    assert sql(a, "UPDATE dev.dog SET age = age WHERE id = 99")["update_hashes"] == []
    assert scans == []
    assert ids(sql(a, "SELECT id FROM dev.dog WHERE age = 8")) == [5]
    assert scans == ["dog"]


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "fragment"), [
    ("SELEC * FROM dev.dog", "SQL syntax error"),
    ("SELECT * FROM dev.dog WHERE", "SQL syntax error"),
    ("SELECT * FROM dev.dog JOIN dev.cat ON dog.id = cat.id", "JOIN"),
    ("SELECT * FROM dev.dog UNION SELECT * FROM dev.dog", "UNION"),
    ("SELECT * FROM (SELECT * FROM dev.dog) q", "sub-SELECT"),
    ("SELECT * FROM dev.dog WHERE id IN (SELECT id FROM dev.dog)", "sub-SELECT"),
    ("SELECT UPPER(dog_name) FROM dev.dog", "UPPER"),
    ("SELECT breed FROM dev.dog GROUP BY breed HAVING COUNT(*) > 1", "HAVING"),
    ("SELECT * FROM dev.dog WHERE COUNT(*) > 1", "aggregate COUNT"),
    ("SELECT * FROM dev.dog LIMIT 'x'", "LIMIT"),
    ("SELECT x.id FROM dev.dog", "'x'"),
    ("SELECT * FROM dev.dog; DELETE FROM dev.dog", "exactly one statement"),
    ("DROP TABLE dev.dog", "DROP"),
    ("CREATE TABLE dev.x (id INT)", "CREATE"),
    ("INSERT INTO dev.dog VALUES (1)", "column list"),
    ("INSERT INTO dev.dog (id, age) VALUES (1)", "row 1 has 1 values for 2 columns"),
    ("INSERT INTO dev.dog (id) SELECT id FROM dev.dog", "INSERT ... SELECT"),
    ("UPDATE dev.dog SET id = 9 WHERE id = 1", "primary key 'id'"),
    ("UPDATE system.hdb_user SET active = false", "'system' database"),
    ("INSERT INTO dev.nope (id) VALUES (1)", "Table 'dev.nope' does not exist"),
    ("SELECT * FROM nodb.dog", "database 'nodb' does not exist"),
    ("SELECT id FROM dev.dog ORDER BY 2", "ORDER BY 2 is not a position"),
    ("SELECT id FROM dev.dog ORDER BY 0", "ORDER BY 0 is not a position"),
    ("SELECT * FROM dev.dog ORDER BY 1", "ORDER BY 1 names '*'"),
    ("INSERT INTO dev.dog (id, `bad name!`) VALUES (90, 1)", "attribute name 'bad name!'"),
    ("INSERT INTO dev.dog (id, ``) VALUES (90, 1)", "attribute name must not be empty"),
    ("UPDATE dev.dog SET `a b` = 1 WHERE id = 1", "attribute name 'a b'"),
])
def test_bad_sql_is_4xx_naming_the_problem(mesh, text, fragment):
    """Invalid SQL or SQL outside the subset answers 400 (404 for a missing read target)."""
    a, _ = mesh
    response = a.post({"operation": "sql", "sql": text})
    assert response.status_code in (400, 404), response.text
    assert fragment in response.json()["error"]


BIG = "9" * 4000  # an integer literal Python still reads (its limit is 4300 digits)


@pytest.mark.parametrize("text", [
    f"SELECT {BIG} * {BIG} AS x FROM dev.dog",  # 8000 digits: no JSON encoder writes it
    f"SELECT {BIG} / 2 AS x FROM dev.dog",  # OverflowError converting to float
    f"SELECT {BIG} + 0.5 AS x FROM dev.dog",
    "SELECT 1e308 * 10 AS x FROM dev.dog",  # float infinity
    "SELECT 1e400 AS x FROM dev.dog",  # a literal beyond a double
    f"SELECT {BIG}{BIG} AS x FROM dev.dog",  # past Python's digit limit: read as infinity
    "SELECT SUM(age * 1e307) AS x FROM dev.dog",
    "INSERT INTO dev.dog (id, weight_lbs) VALUES (99, 1e400)",
    "UPDATE dev.dog SET weight_lbs = weight_lbs * 1e308 WHERE id = 1",
])
def test_numbers_out_of_range_are_400_and_change_nothing(mesh, text):
    """SQL arithmetic or literals beyond a double's range answer 400 naming the problem;
    none is answered 500, written as a JSON ``Infinity``, or stored."""
    a, _ = mesh
    response = a.post({"operation": "sql", "sql": text})
    assert response.status_code == 400, response.text
    assert "out of range" in response.json()["error"]
    assert a.call("search_by_id", database="dev", table="dog", ids=[99]) == []
    dog = a.call("search_by_id", database="dev", table="dog", ids=[1])[0]
    assert dog["weight_lbs"] == 38


def _like_reference(pattern: str, value: str) -> bool:
    """LIKE as a regular expression: % any run, _ one character, case-insensitive."""
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c)
                    for c in pattern.casefold())
    return re.fullmatch(regex, value.casefold(), re.DOTALL) is not None


def test_like_matches_as_the_reference():
    """LIKE agrees with a regular-expression reading on random patterns and values."""
    rng = random.Random(7)
    for _ in range(3000):
        value = "".join(rng.choice("abAB_%") for _ in range(rng.randint(0, 8)))
        pattern = "".join(rng.choice("abB%_") for _ in range(rng.randint(0, 6)))
        assert like_match(pattern, value) == _like_reference(pattern, value), (pattern, value)


@pytest.mark.timeout(30)
def test_like_takes_linear_time_on_long_values():
    """A long pattern against a long value that almost matches everywhere is answered at
    once (the backtracking matcher took len(pattern) * len(value) steps: minutes here,
    with the event loop blocked for a table under OFFLOAD_ROWS)."""
    value = "a" * 200_000
    assert not like_match("%" + "a" * 100_000 + "b", value)
    assert like_match("%" + "a" * 100_000 + "%", value)
    assert not like_match("%" + "a" * 100_000 + "%b%", value)


def test_sql_body_validation(mesh):
    """A missing or non-string ``sql`` is a 400 naming the field."""
    a, _ = mesh
    assert a.call("sql", expect=400)["error"] == "'sql' is required"
    assert "'sql'" in a.call("sql", expect=400, sql=5)["error"]


TOKENS = ["SELECT", "INSERT", "INTO", "UPDATE", "SET", "DELETE", "FROM", "WHERE", "VALUES",
          "dev.dog", "dog", "id", "age", "*", ",", "(", ")", "=", "<>", "<", ">=", "AND",
          "OR", "NOT", "IN", "LIKE", "BETWEEN", "IS", "NULL", "ORDER", "BY", "GROUP",
          "LIMIT", "OFFSET", "COUNT(*)", "MAX", "'x'", "'%a_'", "1", "-2.5", ";", "AS",
          "JOIN", "DESC", "`q`", "\"s\"", "?", "@", "/*", "--"]


def test_parser_never_fails_other_than_400():
    """Random token soup either parses or raises a 400 error; never another exception."""
    rng = random.Random(14)
    for _ in range(400):
        text = " ".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 14)))
        try:
            parse(text)
        except BadRequestError:
            pass


# -- writes ----------------------------------------------------------------------------
def test_insert_update_delete_answer_as_harper_and_replicate(mesh):
    """INSERT/UPDATE/DELETE answer Harper's documented bodies and reach the peer."""
    a, b = mesh
    a.call("create_table", database="dev", table="sqlw", primary_key="id")
    wait_for(lambda: _count(b, "sqlw") == 0, timeout=20, message="sqlw on B")
    assert sql(a, "INSERT INTO dev.sqlw (id, dog_name) VALUE (22, 'Simon')") == {
        "message": "inserted 1 of 1 records", "inserted_hashes": [22], "skipped_hashes": []}
    assert sql(a, "INSERT INTO dev.sqlw (id, dog_name, age) VALUES (1, 'Penny', 4), "
                  "(2, 'Kato', -1.5), (22, 'dup', NULL)") == {
        "message": "inserted 2 of 3 records", "inserted_hashes": [1, 2],
        "skipped_hashes": [22]}
    assert sql(a, "UPDATE dev.sqlw SET dog_name = 'penelope' WHERE id = 1") == {
        "message": "updated 1 of 1 records", "update_hashes": [1], "skipped_hashes": []}
    assert sql(a, "UPDATE dev.sqlw SET age = age * 2 + 1 WHERE age IS NOT NULL") == {
        "message": "updated 2 of 2 records", "update_hashes": [1, 2], "skipped_hashes": []}
    assert sql(a, "DELETE FROM dev.sqlw WHERE id = 22") == {
        "message": "1 of 1 record successfully deleted", "deleted_hashes": [22],
        "skipped_hashes": []}
    expected = [{"id": 1, "dog_name": "penelope", "age": 9},
                {"id": 2, "dog_name": "Kato", "age": -2.0}]
    query = "SELECT id, dog_name, age FROM dev.sqlw ORDER BY id"
    assert sql(a, query) == expected
    wait_for(lambda: sql(b, query) == expected, timeout=20, message="SQL writes on B")
    assert sql(a, "DELETE FROM dev.sqlw WHERE age < 100") == {
        "message": "2 of 2 records successfully deleted", "deleted_hashes": [1, 2],
        "skipped_hashes": []}
    wait_for(lambda: _count(b, "sqlw") == 0, timeout=20, message="SQL delete on B")


# -- permissions -----------------------------------------------------------------------
def test_update_failing_on_a_later_chunk_changes_nothing(node):
    """An UPDATE over more than one write chunk whose new value for some record cannot be
    stored (an integer past 64 bits) is a 400 that changes no record, not one that has
    already committed the chunks before it."""
    node.call("create_table", database="dev", table="many", primary_key="id")
    rows = WRITE_CHUNK + 1
    records = [{"id": i, "age": i} for i in range(rows - 1)] + [{"id": rows - 1, "age": 2**62}]
    node.call("insert", database="dev", table="many", records=records)
    response = node.post({"operation": "sql", "sql": "UPDATE dev.many SET age = age * 4"})
    assert response.status_code == 400, response.text
    assert "cannot be stored" in response.json()["error"]
    ages = node.post({"operation": "sql", "sql": "SELECT id, age FROM dev.many"}).json()
    assert sorted((r["id"], r["age"]) for r in ages) == [(r["id"], r["age"]) for r in records]


def test_role_permissions_apply_per_table_and_statement(mesh):
    """A read-only role may SELECT dev.dog, but not write it or read another table."""
    a, _ = mesh
    bob = ("bob", "bobpw")
    assert sql(a, "SELECT id FROM dev.dog WHERE id = 1", auth=bob) == [{"id": 1}]
    body = sql(a, "INSERT INTO dev.dog (id) VALUES (50)", expect=403, auth=bob)
    assert body["unauthorized_access"] == [{
        "schema": "dev", "table": "dog", "required_table_permissions": ["insert"],
        "required_attribute_permissions": []}]
    for text, needed in (("UPDATE dev.dog SET age = 1", "update"),
                         ("DELETE FROM dev.dog WHERE id = 1", "delete")):
        body = sql(a, text, expect=403, auth=bob)
        assert body["unauthorized_access"][0]["required_table_permissions"] == [needed]
    body = sql(a, "SELECT * FROM system.hdb_user", expect=403, auth=bob)
    assert body["unauthorized_access"][0]["table"] == "hdb_user"
    assert sql(a, "SELECT COUNT(*) AS c FROM dev.dog") == [{"c": 7}]  # nothing changed


def test_writes_that_read_values_need_read_permission(mesh):
    """A role that may update and delete but not read dev.dog cannot use a WHERE or SET
    expression on other attributes as a read (the matched ids, or a 400 for an
    out-of-range value, would tell what records hold): those need ``read`` too, while
    writes naming only the primary key work as ``update``/``delete`` by id do."""
    a, _ = mesh
    a.call("add_role", role="writer", permission={
        "super_user": False, "dev": {"tables": {"dog": {
            "read": False, "insert": False, "update": True, "delete": True,
            "attribute_permissions": []}}}})
    a.call("add_user", role="writer", username="wes", password="wespw", active=True)
    try:
        _writes_need_read(a, ("wes", "wespw"))
    finally:
        a.call("drop_user", username="wes")
        a.call("drop_role", id="writer")


def _writes_need_read(a: Any, wes: tuple[str, str]) -> None:
    for text in ("UPDATE dev.dog SET age = 1 WHERE breed = 'Mutt'",
                 "DELETE FROM dev.dog WHERE dog_name LIKE 'P%'",
                 "UPDATE dev.dog SET age = weight_lbs * 1e308 WHERE id = 1",
                 "DELETE FROM dev.dog WHERE age > 7"):
        body = sql(a, text, expect=403, auth=wes)
        assert body["unauthorized_access"] == [{
            "schema": "dev", "table": "dog", "required_table_permissions": ["read"],
            "required_attribute_permissions": []}], text
    assert sql(a, "UPDATE dev.dog SET age = 7 WHERE id = 1", auth=wes)["update_hashes"] == [1]
    assert sql(a, "DELETE FROM dev.dog WHERE id IN (998, 999)", auth=wes)[
        "deleted_hashes"] == []
    assert strip_times(sql(a, "SELECT * FROM dev.dog ORDER BY id")) == [
        {name: dog.get(name) for name in ATTRS} for dog in DOGS]


def test_system_tables_hide_secrets(mesh):
    """SELECT * from system.hdb_user never shows password hashes, not even as null."""
    a, _ = mesh
    rows = sql(a, "SELECT * FROM system.hdb_user")
    assert {r["username"] for r in rows} == {"admin", "bob"}
    assert all("password" not in r for r in rows)
    assert sql(a, "SELECT username FROM system.hdb_user WHERE password LIKE '%'") == []


# -- null attributes in every read -----------------------------------------------------
def test_reads_show_missing_attributes_as_null_on_the_peer(mesh):
    """As recorded on B: a record inserted without breed/age reads them as null."""
    a, b = mesh
    a.call("create_table", database="dev", table="nulls", primary_key="id")
    a.call("insert", database="dev", table="nulls",
           records=[{"id": 1, "name": "Harper", "breed": "Mutt", "age": 6},
                    {"id": 2, "name": "auto-id"}])
    wait_for(lambda: _count(b, "nulls") == 2, timeout=20, message="nulls on B")
    full = [{"id": 1, "name": "Harper", "breed": "Mutt", "age": 6},
            {"id": 2, "name": "auto-id", "breed": None, "age": None}]
    found = b.call("search_by_conditions", database="dev", table="nulls",
                   get_attributes=["*"], conditions=[{"search_attribute": "id",
                                                      "search_type": "greater_than_equal",
                                                      "search_value": 0}])
    assert strip_times(found) == full
    assert all(isinstance(r[t], float) for r in found for t in TIMES)
    found = b.call("search_by_id", database="dev", table="nulls", ids=[2],
                   get_attributes=["*"])
    assert strip_times(found) == full[1:]
    found = b.call("search_by_value", database="dev", table="nulls",
                   search_attribute="name", search_value="auto*", get_attributes=["*"])
    assert strip_times(found) == full[1:]
    assert strip_times(sql(b, "SELECT * FROM dev.nulls ORDER BY id")) == full
    # Listed attributes stay as they are: no null for what a record lacks.
    found = b.call("search_by_id", database="dev", table="nulls", ids=[2],
                   get_attributes=["id", "age"])
    assert found == [{"id": 2}]
