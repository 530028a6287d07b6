"""Schema operations on one node: databases, tables, attributes and describe_*.

Expected success bodies are copied from the HarperDB 4.7.29 recordings in
``shared/harper-reference/transcripts.jsonl``; sizes and timestamps are ignored.
"""

from __future__ import annotations

from typing import Any

from tests.helpers import harper_error

# describe_table of a fresh table, as recorded (node B; sizes are compared by type only).
RECORDED_DESCRIBE_DOG: dict[str, Any] = {
    "schema": "dev", "name": "dog", "hash_attribute": "id", "audit": True,
    "schema_defined": False,
    "attributes": [{"attribute": "id", "indexed": True, "is_primary_key": True},
                   {"attribute": "__createdtime__", "indexed": True},
                   {"attribute": "__updatedtime__", "indexed": True}],
    "db_size": 49152, "sources": [], "record_count": 0, "table_size": 0,
    "db_audit_size": 4096,
}
SIZE_KEYS = ("db_size", "table_size", "db_audit_size")


def without_sizes(described: dict[str, Any]) -> dict[str, Any]:
    """A describe_table object with its byte sizes checked for type and removed."""
    for key in SIZE_KEYS:
        assert isinstance(described[key], int) and described[key] >= 0, key
    return {k: v for k, v in described.items() if k not in SIZE_KEYS}


def test_create_database_message(node):
    """create_database answers Harper's recorded message."""
    assert node.call("create_database", database="dev") == {
        "message": "database 'dev' successfully created"}


def test_create_database_twice_is_400(node):
    """Creating an existing database is a 400 naming it."""
    node.call("create_database", database="dev")
    body = node.call("create_database", expect=400, database="dev")
    assert harper_error(body) == {"error": "database 'dev' already exists"}


def test_create_schema_alias(node):
    """create_schema with ``schema`` creates a database like create_database."""
    assert node.call("create_schema", schema="legacy") == {
        "message": "database 'legacy' successfully created"}
    assert node.call("describe_database", database="legacy") == {}


def test_drop_database_removes_it(node):
    """drop_database removes the database and its tables."""
    node.call("create_table", database="gone", table="t", primary_key="id")
    node.call("drop_database", database="gone")
    assert "gone" not in node.call("describe_all")
    body = node.call("describe_database", expect=404, database="gone")
    assert harper_error(body) == {"error": "database 'gone' does not exist"}


def test_drop_schema_alias(node):
    """drop_schema with ``schema`` drops the database."""
    node.call("create_database", database="old")
    node.call("drop_schema", schema="old")
    assert "old" not in node.call("describe_all")


def test_drop_missing_database_is_404(node):
    """Dropping a database that does not exist names it in a 404."""
    assert harper_error(node.call("drop_database", expect=404, database="nodb")) == {
        "error": "database 'nodb' does not exist"}


def test_drop_system_database_refused(node):
    """The system database cannot be dropped."""
    body = node.call("drop_database", expect=400, database="system")
    assert "system" in body["error"]
    assert node.call("list_users")


def test_create_table_primary_key_message(node):
    """create_table with primary_key answers Harper's recorded message."""
    node.call("create_database", database="dev")
    assert node.call("create_table", database="dev", table="dog", primary_key="id") == {
        "message": "table 'dev.dog' successfully created."}


def test_create_table_hash_attribute_alias(node):
    """create_table accepts hash_attribute and schema as the old names."""
    node.call("create_database", database="dev")
    assert node.call("create_table", schema="dev", table="cat", hash_attribute="cid") == {
        "message": "table 'dev.cat' successfully created."}
    assert node.call("describe_table", database="dev", table="cat")["hash_attribute"] == "cid"


def test_create_table_creates_missing_database(node):
    """create_table in a database that does not exist yet creates the database."""
    node.call("create_table", database="fresh", table="t", primary_key="id")
    assert list(node.call("describe_database", database="fresh")) == ["t"]


def test_create_table_defaults_to_data(node):
    """create_table without a database puts the table in ``data``."""
    assert node.call("create_table", table="dog", primary_key="id") == {
        "message": "table 'data.dog' successfully created."}
    assert "dog" in node.call("describe_all")["data"]


def test_create_table_twice_is_400(node):
    """Creating an existing table is Harper's recorded 400."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    body = node.call("create_table", expect=400, database="dev", table="dog", primary_key="id")
    assert harper_error(body) == {"error": "Table 'dog' already exists in 'dev'"}


def test_create_table_with_attributes(node):
    """Attributes given to create_table are listed by describe_table."""
    node.call("create_table", table="dog", primary_key="id",
              attributes=[{"name": "id"}, {"name": "name", "type": "String"}])
    attrs = [a["attribute"] for a in node.call("describe_table", table="dog")["attributes"]]
    assert attrs == ["id", "__createdtime__", "__updatedtime__", "name"]


def test_create_system_table_refused(node):
    """Tables cannot be created in the system database through the API."""
    body = node.call("create_table", expect=400, database="system", table="mine",
                     primary_key="id")
    assert "system" in body["error"]


def test_drop_table(node):
    """drop_table removes the table; describing it afterwards is a 404."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("insert", database="dev", table="dog", records=[{"id": 1}])
    assert node.call("drop_table", database="dev", table="dog") == {
        "message": "successfully deleted table 'dev.dog'"}
    assert harper_error(node.call("describe_table", expect=404, database="dev", table="dog")) == {
        "error": "Table 'dev.dog' does not exist"}


def test_drop_table_then_recreate_is_empty(node):
    """A table dropped and created again under the same name starts empty."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("insert", table="dog", records=[{"id": 1}, {"id": 2}])
    node.call("drop_table", table="dog")
    node.call("create_table", table="dog", primary_key="id")
    assert node.count("dog") == 0
    assert node.call("search_by_id", table="dog", ids=[1, 2]) == []


def test_drop_missing_table_is_404(node):
    """Dropping a table that does not exist is a 404 naming it."""
    node.call("create_database", database="dev")
    assert harper_error(node.call("drop_table", expect=404, database="dev", table="nope")) == {
        "error": "Table 'dev.nope' does not exist"}


def test_drop_system_table_refused(node):
    """hdb_user cannot be dropped, so logins keep working."""
    body = node.call("drop_table", expect=400, database="system", table="hdb_user")
    assert "system" in body["error"]
    assert node.call("user_info")["username"] == "admin"


def test_describe_table_matches_recorded_shape(node):
    """describe_table of a fresh table has Harper's keys and attribute list."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    described = node.call("describe_table", database="dev", table="dog")
    assert without_sizes(described) == without_sizes(RECORDED_DESCRIBE_DOG)


def test_describe_table_record_count_is_exact(node):
    """record_count follows inserts, skipped duplicates, upserts and deletes exactly."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("insert", table="dog", records=[{"id": i} for i in range(25)])
    assert node.count("dog") == 25
    node.call("insert", table="dog", records=[{"id": 1}, {"id": 100}])
    assert node.count("dog") == 26
    node.call("upsert", table="dog", records=[{"id": 2, "x": 1}, {"id": 101}])
    assert node.count("dog") == 27
    node.call("delete", table="dog", ids=[0, 1, 2, 999])
    assert node.count("dog") == 24


def test_describe_table_lists_new_attributes(node):
    """Attributes first seen in inserted records appear in describe_table."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("insert", table="dog", records=[{"id": 1, "name": "a", "age": 2}])
    attrs = [a["attribute"] for a in node.call("describe_table", table="dog")["attributes"]]
    assert attrs == ["id", "__createdtime__", "__updatedtime__", "name", "age"]


def test_describe_table_missing_database_is_404(node):
    """describe_table in a missing database is Harper's recorded 404."""
    assert harper_error(node.call("describe_table", expect=404, database="nodb", table="nope")) == {
        "error": "database 'nodb' does not exist"}


def test_describe_database_maps_tables(node):
    """describe_database maps each table name to its describe_table object."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("create_table", database="dev", table="cat", hash_attribute="id")
    described = node.call("describe_database", database="dev")
    assert sorted(described) == ["cat", "dog"]
    assert without_sizes(described["dog"]) == without_sizes(RECORDED_DESCRIBE_DOG)
    assert described["cat"]["name"] == "cat"


def test_describe_schema_alias(node):
    """describe_schema with ``schema`` is describe_database."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    assert list(node.call("describe_schema", schema="dev")) == ["dog"]


def test_describe_all(node):
    """describe_all maps database to table to describe_table, without ``system``."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("create_table", database="other", table="t", primary_key="k")
    node.call("insert", database="other", table="t", records=[{"k": "a"}])
    described = node.call("describe_all")
    assert sorted(described) == ["dev", "other"]
    assert without_sizes(described["dev"]["dog"]) == without_sizes(RECORDED_DESCRIBE_DOG)
    assert described["other"]["t"]["record_count"] == 1
    assert described["other"]["t"]["hash_attribute"] == "k"


def test_create_attribute(node):
    """create_attribute adds the attribute to describe_table."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    body = node.call("create_attribute", database="dev", table="dog", attribute="color")
    assert body == {"message": "attribute 'dev.dog.color' successfully created."}
    attrs = node.call("describe_table", database="dev", table="dog")["attributes"]
    assert {"attribute": "color"} in attrs


def test_create_attribute_twice_is_400(node):
    """Creating an attribute that exists is a 400 naming it."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("create_attribute", table="dog", attribute="color")
    body = node.call("create_attribute", expect=400, table="dog", attribute="color")
    assert "color" in body["error"]


def test_drop_attribute(node):
    """drop_attribute removes the attribute from describe_table."""
    node.call("create_table", table="dog", primary_key="id")
    node.call("create_attribute", table="dog", attribute="color")
    assert node.call("drop_attribute", table="dog", attribute="color") == {
        "message": "successfully deleted attribute 'color'"}
    attrs = node.call("describe_table", table="dog")["attributes"]
    assert {"attribute": "color"} not in attrs


def test_drop_missing_attribute_is_404(node):
    """Dropping an attribute that does not exist is a 404 naming it."""
    node.call("create_table", table="dog", primary_key="id")
    body = node.call("drop_attribute", expect=404, table="dog", attribute="nope")
    assert harper_error(body) == {"error": "attribute 'nope' does not exist"}


def test_schema_survives_restart(node):
    """Databases, tables, attributes and counts are the same after a restart."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("create_attribute", database="dev", table="dog", attribute="color")
    node.call("insert", database="dev", table="dog", records=[{"id": 1}, {"id": 2}])
    before = node.call("describe_all")
    node.restart()
    after = node.call("describe_all")
    assert {db: {t: without_sizes(d) for t, d in tables.items()}
            for db, tables in after.items()} == {
        db: {t: without_sizes(d) for t, d in tables.items()} for db, tables in before.items()}


def test_system_information(node):
    """system_information reports node name, version, uptime, memory RSS and disk use."""
    from harpsync import __version__

    node.call("create_table", table="dog", primary_key="id")
    info = node.call("system_information")
    assert info["node_name"] == node.name
    assert info["version"] == __version__
    assert isinstance(info["uptime_seconds"], int | float) and info["uptime_seconds"] >= 0
    assert isinstance(info["memory"]["rss"], int) and info["memory"]["rss"] > 1024 * 1024
    assert isinstance(info["disk"]["used_by_root"], int) and info["disk"]["used_by_root"] > 0
    assert "data" in info["databases"]


def test_system_information_attributes_filter(node):
    """system_information with ``attributes`` returns only those sections."""
    info = node.call("system_information", attributes=["memory", "node_name"])
    assert sorted(info) == ["memory", "node_name"]
