"""Users, roles and role permissions on one node.

Expected bodies are copied from the HarperDB 4.7.29 recordings in
``shared/harper-reference/transcripts.jsonl``, with timestamps left out.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.helpers import ADMIN, harper_error, wait_for

READER_PERMISSION: dict[str, Any] = {
    "super_user": False,
    "dev": {"tables": {"dog": {"read": True, "insert": False, "update": False,
                               "delete": False, "attribute_permissions": []}}},
}
FORBIDDEN = ("This operation is not authorized due to role restrictions and/or invalid "
             "database items")
RECORDED_INSERT_FORBIDDEN = {
    "error": FORBIDDEN,
    "unauthorized_access": [{"schema": "dev", "table": "dog",
                             "required_table_permissions": ["insert"],
                             "required_attribute_permissions": []}],
    "invalid_schema_items": [],
}


def restricted(operation: str) -> dict[str, Any]:
    """Harper's 403 body for a super_user-only operation (camelCase name)."""
    return {"error": FORBIDDEN,
            "unauthorized_access": [f"Operation '{operation}' is restricted to 'super_user' "
                                    "roles"],
            "invalid_schema_items": []}


@pytest.fixture
def reader(node: Any) -> Any:
    """A node with dev.dog holding one record, a ``reader`` role and user bob in it."""
    node.call("create_table", database="dev", table="dog", primary_key="id")
    node.call("insert", database="dev", table="dog", records=[{"id": 1, "name": "Harper"}])
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    node.call("add_user", role="reader", username="bob", password="bobpw", active=True)
    return node


def as_bob(node: Any, operation: str, login: str = "bobpw", **body: Any) -> Any:
    return node.post({"operation": operation, **body}, auth=("bob", login))


# -- roles ------------------------------------------------------------------------------
def test_add_role_matches_recorded_response(node):
    """add_role returns the stored role: role, permission, id and float timestamps."""
    body = node.call("add_role", role="reader", permission=READER_PERMISSION)
    assert {k: v for k, v in body.items() if not k.startswith("__")} == {
        "role": "reader", "permission": READER_PERMISSION, "id": "reader"}
    assert isinstance(body["__createdtime__"], float)
    assert isinstance(body["__updatedtime__"], float)


@pytest.mark.parametrize("operation", ["add_role", "alter_role"])
def test_attribute_permissions_are_refused_not_ignored(reader, operation):
    """harpsync grants whole tables: a role that limits attributes is a 400 naming
    them, never stored as a role that reads and writes every attribute."""
    limited = {"super_user": False, "dev": {"tables": {"dog": {
        "read": True, "insert": False, "update": False, "delete": False,
        "attribute_permissions": [{"attribute_name": "name", "read": False,
                                   "insert": False, "update": False}]}}}}
    role = "limited" if operation == "add_role" else "reader"
    response = reader.post({"operation": operation, "role": role, "id": role,
                            "permission": limited})
    assert response.status_code == 400, response.text
    assert "attribute_permissions" in response.json()["error"]
    roles = {r["id"]: r["permission"] for r in reader.call("list_roles")}
    assert "limited" not in roles and roles["reader"] == READER_PERMISSION


@pytest.mark.parametrize("role_id", [123, "bad id!", ""])
def test_add_role_with_a_bad_id_is_400(node, role_id):
    """add_role refuses an ``id`` that is not a role name (a number made a role that no
    user could ever be given) and stores nothing."""
    response = node.post({"operation": "add_role", "role": "r1", "id": role_id,
                          "permission": {"super_user": False}})
    assert response.status_code == 400 and "'id'" in response.json()["error"], response.text
    assert [r["id"] for r in node.call("list_roles")] == ["super_user"]


def test_add_role_twice_is_409(node):
    """A second role with the same name is a 409 naming it."""
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    body = node.call("add_role", expect=409, role="reader", permission=READER_PERMISSION)
    assert "reader" in body["error"]


def test_role_names_stay_unique(reader):
    """add_role and alter_role refuse a name or id another role already holds (409): a
    second role named "reader" could never be given to a user by that name."""
    response = reader.post({"operation": "add_role", "role": "reader", "id": "reader2",
                            "permission": {"super_user": False}})
    assert response.status_code == 409, response.text
    reader.call("add_role", role="writer", permission={"super_user": False})
    response = reader.post({"operation": "alter_role", "id": "writer", "role": "reader",
                            "permission": {"super_user": False}})
    assert response.status_code == 409, response.text
    assert sorted(r["role"] for r in reader.call("list_roles")) == [
        "reader", "super_user", "writer"]
    reader.call("alter_role", id="writer", role="writer", permission={"super_user": False})


def test_list_roles(node):
    """list_roles lists the built-in super_user role and added roles."""
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    roles = {r["id"]: r for r in node.call("list_roles")}
    assert sorted(roles) == ["reader", "super_user"]
    assert roles["super_user"]["permission"]["super_user"] is True
    assert roles["reader"]["permission"] == READER_PERMISSION


def test_alter_role(node):
    """alter_role replaces the permission and returns the stored role."""
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    writer = {"super_user": False, "dev": {"tables": {"dog": {"read": True, "insert": True}}}}
    body = node.call("alter_role", id="reader", permission=writer)
    assert body["id"] == "reader" and body["permission"] == writer
    assert {r["id"]: r["permission"] for r in node.call("list_roles")}["reader"] == writer


def test_alter_missing_role_is_404(node):
    """Altering a role that does not exist is a 404 naming it."""
    body = node.call("alter_role", expect=404, id="ghost", permission={"super_user": False})
    assert "ghost" in body["error"]


def test_drop_role(node):
    """drop_role removes an unused role."""
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    assert node.call("drop_role", id="reader") == {"message": "reader successfully deleted"}
    assert [r["id"] for r in node.call("list_roles")] == ["super_user"]


def test_drop_role_in_use_is_400(reader):
    """A role still given to a user cannot be dropped."""
    body = reader.call("drop_role", expect=400, id="reader")
    assert "reader" in body["error"]
    reader.call("drop_user", username="bob")
    reader.call("drop_role", id="reader")


def test_drop_super_user_role_refused(node):
    """The built-in super_user role cannot be dropped."""
    node.call("drop_role", expect=400, id="super_user")


def test_drop_missing_role_is_404(node):
    """Dropping a role that does not exist is a 404."""
    node.call("drop_role", expect=404, id="ghost")


# -- users ------------------------------------------------------------------------------
def test_add_user_matches_recorded_response(node):
    """add_user answers Harper's recorded message."""
    node.call("add_role", role="reader", permission=READER_PERMISSION)
    body = node.call("add_user", role="reader", username="bob", password="bobpw", active=True)
    assert body == {"message": "bob successfully added"}


def test_add_user_duplicate_is_409(reader):
    """Adding an existing user is Harper's recorded 409."""
    body = reader.call("add_user", expect=409, role="reader", username="bob",
                       password="other", active=True)
    assert harper_error(body) == {"error": "User bob already exists"}
    assert as_bob(reader, "user_info").status_code == 200  # the old password still works


def test_add_user_unknown_role_is_400(node):
    """add_user with a role that does not exist is a 400 naming the role."""
    body = node.call("add_user", expect=400, role="ghost", username="amy", password="pw")
    assert "ghost" in body["error"]


def test_list_users_has_no_password_hashes(reader):
    """list_users shows users with their role objects and never a password or its hash."""
    response = reader.post({"operation": "list_users"})
    assert response.status_code == 200
    assert "password" not in response.text and "scrypt" not in response.text
    users = {u["username"]: u for u in response.json()}
    assert sorted(users) == ["admin", "bob"]
    assert users["bob"]["active"] is True
    assert users["bob"]["role"]["role"] == "reader"
    assert users["bob"]["role"]["permission"] == READER_PERMISSION
    assert users["admin"]["role"]["permission"]["super_user"] is True


def test_user_info_of_caller(reader):
    """user_info describes the calling user, for a super user and a role user alike."""
    admin = reader.call("user_info")
    assert admin["username"] == "admin" and admin["role"]["permission"]["super_user"] is True
    response = as_bob(reader, "user_info")
    assert response.status_code == 200
    bob = response.json()
    assert bob["username"] == "bob" and bob["role"]["id"] == "reader"
    assert "password" not in json.dumps(bob)


def test_alter_user_password(reader):
    """After alter_user changes a password, only the new password logs in."""
    body = reader.call("alter_user", username="bob", password="newpw")
    assert body["update_hashes"] == ["bob"] and body["skipped_hashes"] == []
    assert as_bob(reader, "user_info", login="newpw").status_code == 200
    old = as_bob(reader, "user_info")
    assert (old.status_code, harper_error(old.json())) == (401, {"error": "Login failed"})


def test_alter_user_inactive_cannot_login(reader):
    """A user set inactive gets Login failed; set active again, they log in."""
    assert as_bob(reader, "user_info").status_code == 200
    reader.call("alter_user", username="bob", active=False)
    assert harper_error(as_bob(reader, "user_info").json()) == {"error": "Login failed"}
    reader.call("alter_user", username="bob", active=True)
    assert as_bob(reader, "user_info").status_code == 200


def test_alter_user_role(reader):
    """alter_user can move a user to another role, which takes effect at once."""
    reader.call("add_role", role="writer", permission={
        "super_user": False, "dev": {"tables": {"dog": {"read": True, "insert": True}}}})
    assert as_bob(reader, "insert", database="dev", table="dog",
                  records=[{"id": 2}]).status_code == 403
    reader.call("alter_user", username="bob", role="writer")
    assert as_bob(reader, "insert", database="dev", table="dog",
                  records=[{"id": 2}]).status_code == 200


def test_alter_missing_user_is_404(node):
    """Altering a user who does not exist is a 404 and creates nobody."""
    node.call("alter_user", expect=404, username="ghost", active=False)
    assert [u["username"] for u in node.call("list_users")] == ["admin"]


def test_drop_user(reader):
    """drop_user removes the user, who can no longer log in."""
    assert reader.call("drop_user", username="bob") == {"message": "bob successfully deleted"}
    assert [u["username"] for u in reader.call("list_users")] == ["admin"]
    assert harper_error(as_bob(reader, "user_info").json()) == {"error": "Login failed"}


def test_drop_missing_user_is_404(node):
    """Dropping a user who does not exist is a 404."""
    node.call("drop_user", expect=404, username="ghost")


def test_drop_self_refused(node):
    """A user cannot drop themselves (which would lock out the last admin)."""
    node.call("drop_user", expect=400, username="admin")
    assert node.call("user_info")["username"] == "admin"


NO_SUPER_LEFT = "no active super_user would be left"


@pytest.mark.parametrize("change", [{"active": False}, {"role": "reader"}])
def test_the_last_super_user_cannot_lock_itself_out(reader, change):
    """alter_user refuses to deactivate or demote the only active super user (400 naming
    why); with a second super user in place the same change goes through."""
    response = reader.post({"operation": "alter_user", "username": "admin", **change})
    assert response.status_code == 400 and NO_SUPER_LEFT in response.json()["error"]
    assert reader.call("user_info")["role"]["id"] == "super_user"
    reader.call("add_user", username="root2", password="pw2", role="super_user")
    reader.call("alter_user", username="admin", **change)
    as_root2 = reader.post({"operation": "list_users"}, auth=("root2", "pw2"))
    assert as_root2.status_code == 200


def test_the_super_user_role_cannot_be_emptied(reader):
    """alter_role refuses to take super_user away from the role every active super user
    holds; a change that keeps it, or leaves another super role in use, goes through."""
    response = reader.post({"operation": "alter_role", "id": "super_user",
                            "permission": {"super_user": False}})
    assert response.status_code == 400 and NO_SUPER_LEFT in response.json()["error"]
    assert reader.call("describe_all")  # admin is still a super user
    assert reader.call("alter_role", id="reader", permission={"super_user": False})
    reader.call("add_role", role="admins", permission={"super_user": True})
    reader.call("add_user", username="root2", password="pw2", role="admins")
    reader.call("alter_role", id="super_user", permission={"super_user": False})
    assert reader.post({"operation": "list_users"}, auth=("root2", "pw2")).status_code == 200


def test_two_super_users_dropping_each_other_leave_one(reader):
    """Two super users dropping each other at the same moment: one drop wins, the other is
    refused, and a super user is left to manage the node."""
    reader.call("add_user", username="root2", password="pw2", role="super_user")
    logins = {"admin": ADMIN, "root2": ("root2", "pw2")}
    for auth in logins.values():  # both logins cached: both requests pass login at once
        assert reader.post({"operation": "user_info"}, auth=auth).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(
            lambda pair: reader.post({"operation": "drop_user", "username": pair[1]},
                                     auth=logins[pair[0]]).status_code,
            [("admin", "root2"), ("root2", "admin")]))
    able = [name for name, auth in logins.items()
            if reader.post({"operation": "list_users"}, auth=auth).status_code == 200]
    assert statuses in ([200, 400], [200, 401]) and len(able) == 1, (statuses, able)


# -- permissions ------------------------------------------------------------------------
def test_role_read_allowed(reader):
    """A role with read on dev.dog can search it."""
    response = as_bob(reader, "search_by_id", database="dev", table="dog", ids=[1],
                      get_attributes=["id", "name"])
    assert response.status_code == 200
    assert response.json() == [{"id": 1, "name": "Harper"}]


def test_role_insert_forbidden_matches_recorded_response(reader):
    """A role without insert gets Harper's recorded 403 body, and nothing is written."""
    response = as_bob(reader, "insert", database="dev", table="dog", records=[{"id": 50}])
    assert response.status_code == 403
    assert harper_error(response.json()) == RECORDED_INSERT_FORBIDDEN
    assert reader.call("search_by_id", database="dev", table="dog", ids=[50]) == []


@pytest.mark.parametrize(("operation", "permission"), [
    ("update", "update"), ("delete", "delete"),
])
def test_role_write_forbidden(reader, operation, permission):
    """Each write needs its own table permission."""
    body = {"records": [{"id": 1, "name": "x"}]} if operation == "update" else {"ids": [1]}
    response = as_bob(reader, operation, database="dev", table="dog", **body)
    assert response.status_code == 403
    assert response.json()["unauthorized_access"][0]["required_table_permissions"] == [
        permission]


def test_role_upsert_needs_insert_and_update(reader):
    """upsert needs both insert and update, and the 403 lists both."""
    response = as_bob(reader, "upsert", database="dev", table="dog", records=[{"id": 1}])
    assert response.status_code == 403
    assert response.json()["unauthorized_access"][0]["required_table_permissions"] == [
        "insert", "update"]


def test_role_other_table_forbidden(reader):
    """A role cannot read a table it has no permission on."""
    reader.call("create_table", database="dev", table="cat", primary_key="id")
    response = as_bob(reader, "search_by_id", database="dev", table="cat", ids=[1])
    assert response.status_code == 403
    assert response.json()["unauthorized_access"] == [{
        "schema": "dev", "table": "cat", "required_table_permissions": ["read"],
        "required_attribute_permissions": []}]


@pytest.mark.parametrize(("operation", "body", "camel"), [
    ("create_database", {"database": "x"}, "createDatabase"),
    ("create_schema", {"schema": "x"}, "createDatabase"),
    ("create_table", {"table": "x", "primary_key": "id"}, "createTable"),
    ("drop_table", {"database": "dev", "table": "dog"}, "dropTable"),
    ("add_user", {"username": "eve", "password": "pw", "role": "reader"}, "addUser"),
    ("list_users", {}, "listUsers"),
    ("add_role", {"role": "r2", "permission": {"super_user": True}}, "addRole"),
    ("system_information", {}, "systemInformation"),
])
def test_super_user_only_operations(reader, operation, body, camel):
    """super_user operations answer a role user with Harper's exact 403 body."""
    response = as_bob(reader, operation, **body)
    assert response.status_code == 403
    assert harper_error(response.json()) == restricted(camel)


def test_permission_change_takes_effect_at_once(reader):
    """alter_role granting insert lets the role's users insert on their next request."""
    assert as_bob(reader, "insert", database="dev", table="dog",
                  records=[{"id": 2}]).status_code == 403
    granted = json.loads(json.dumps(READER_PERMISSION))
    granted["dev"]["tables"]["dog"]["insert"] = True
    reader.call("alter_role", id="reader", permission=granted)
    response = as_bob(reader, "insert", database="dev", table="dog", records=[{"id": 2}])
    assert response.status_code == 200 and response.json()["inserted_hashes"] == [2]


def test_role_describes_only_permitted_tables(reader):
    """describe_all and describe_database show a role only tables it has permissions on."""
    reader.call("create_table", database="dev", table="cat", primary_key="id")
    reader.call("create_table", database="secret", table="plans", primary_key="id")
    described = as_bob(reader, "describe_all").json()
    assert list(described) == ["dev"] and list(described["dev"]) == ["dog"]
    assert list(as_bob(reader, "describe_database", database="dev").json()) == ["dog"]
    assert as_bob(reader, "describe_table", database="dev", table="dog").status_code == 200
    assert sorted(reader.call("describe_all")) == ["dev", "secret"]  # a super user sees all


HIDDEN = [
    ("describe_database", {"database": "secret"}, "database 'secret'"),
    ("describe_database", {"database": "nodb"}, "database 'nodb'"),
    ("describe_table", {"database": "secret", "table": "plans"}, "Table 'secret.plans'"),
    ("describe_table", {"database": "dev", "table": "cat"}, "Table 'dev.cat'"),
    ("describe_table", {"database": "dev", "table": "nope"}, "Table 'dev.nope'"),
]


def test_role_cannot_tell_hidden_metadata_from_missing(reader):
    """A role asking for the metadata of a database or table it has no permission on gets
    Harper's 403 with "... does not exist" whether it exists or not, so it cannot
    probe which names exist (a 404 for missing beside a 403 or {} for hidden did)."""
    reader.call("create_table", database="dev", table="cat", primary_key="id")
    reader.call("create_table", database="secret", table="plans", primary_key="id")
    for operation, body, item in HIDDEN:
        response = as_bob(reader, operation, **body)
        assert response.status_code == 403, (operation, body, response.text)
        assert harper_error(response.json()) == {
            "error": FORBIDDEN, "unauthorized_access": [],
            "invalid_schema_items": [f"{item} does not exist"]}, (operation, body)


def test_role_gets_no_system_metadata(reader):
    """describe_database and describe_table of ``system`` are refused to a role with
    Harper's message."""
    for body in ({"operation": "describe_database", "database": "system"},
                 {"operation": "describe_table", "database": "system", "table": "hdb_user"}):
        response = reader.post(body, auth=("bob", "bobpw"))
        assert response.status_code == 403
        assert response.json()["unauthorized_access"] == [
            "Your role does not have permission to view database metadata for 'system'"]


def test_login_cache_follows_user_changes(reader):
    """A cached login stops working as soon as the user is dropped."""
    for _ in range(3):
        assert as_bob(reader, "user_info").status_code == 200
    reader.call("drop_user", username="bob")
    response = as_bob(reader, "user_info")
    assert (response.status_code, harper_error(response.json())) == (401, {"error": "Login failed"})


# -- users across a cluster -------------------------------------------------------------
def test_adding_a_fresh_node_keeps_the_clusters_admin(node_factory):
    """A fresh node started with its own admin password, added to a running node: both
    nodes keep accepting the cluster's admin password and the cluster's roles, and the
    newcomer adopts them (its first-start admin row no longer wins as the newest)."""
    a = node_factory("node-a")
    a.call("alter_role", id="super_user", permission={"super_user": True, "cluster_user": True})
    b = node_factory("node-b", env={"HDB_ADMIN_PASSWORD": "node-b-first-start"})
    a.call("add_node", hostname="node-b", url=b.repl_url, verify_tls=False,
           authorization={"username": "admin", "password": "node-b-first-start"})
    a.call("add_user", username="marker", password="pw", role="super_user")
    wait_for(lambda: b.post({"operation": "user_info"},
                            auth=("marker", "pw")).status_code == 200, timeout=15)
    for node in (a, b):
        assert node.post({"operation": "user_info"}, auth=ADMIN).status_code == 200, node.name
        refused = node.post({"operation": "user_info"}, auth=("admin", "node-b-first-start"))
        assert refused.status_code == 401, node.name
        role = next(r for r in node.call("list_roles") if r["id"] == "super_user")
        assert role["permission"] == {"super_user": True, "cluster_user": True}, node.name
