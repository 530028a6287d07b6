"""The last super user across a cluster: two nodes each dropping a different super user
at once both pass their own check, and once both drops replicate none is left. A node
that starts with no active super user recreates its configured admin."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import httpx
import pytest

from tests.helpers import ADMIN, wait_for
from tests.repl_util import join, wait_linked

SECOND = ("second", "second-password")


def _users(node: Any) -> set[str]:
    return {u["username"] for u in node.call("list_users")}


def _status(node: Any, auth: tuple[str, str]) -> int:
    return node.post({"operation": "list_users"}, auth=auth).status_code


@pytest.mark.timeout(120)
@pytest.mark.parametrize("others", [True, False], ids=["other-users", "no-user-left"])
def test_a_node_starting_with_no_super_user_recreates_its_configured_admin(
        node_factory: Any, caplog: pytest.LogCaptureFixture, others: bool) -> None:
    """With other users left, the node used to start without a super user (401 for
    all); with none left, it wrote its first-start admin at the first-start version,
    older than the drop: only on itself, as every peer kept the newer drop."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(a, b), (b, a)], ("system",))
    kept = {"reader"} if others else set()
    if others:
        a.call("add_role", role="reader", permission={"super_user": False})
        a.call("add_user", username="reader", password="reader-password", role="reader")
    a.call("add_user", username=SECOND[0], password=SECOND[1], role="super_user")
    wait_for(lambda: {SECOND[0], *kept} <= _users(b), message="the users on node-b")
    # A partition: neither node hears the other's user changes.
    a.call("pause_replication", hostname=b.name, database="system")
    b.call("pause_replication", hostname=a.name, database="system")
    # Each node still sees two super users, so each drop passes its check.
    assert a.post({"operation": "drop_user", "username": ADMIN[0]},
                  auth=SECOND).status_code == 200
    assert b.post({"operation": "drop_user", "username": SECOND[0]},
                  auth=ADMIN).status_code == 200
    a.post({"operation": "resume_replication", "hostname": b.name, "database": "system"},
           auth=SECOND)
    b.post({"operation": "resume_replication", "hostname": a.name, "database": "system"},
           auth=ADMIN)
    # Both drops replicate: no super user is left anywhere.
    for node in (a, b):
        wait_for(lambda node=node: _status(node, ADMIN) == 401
                 and _status(node, SECOND) == 401, timeout=30,
                 message=f"both drops on {node.name}")
    # The recovery: restart one node with HDB_ADMIN_USERNAME/HDB_ADMIN_PASSWORD set (the
    # test nodes always have them). It recreates that admin, which replicates.
    caplog.set_level(logging.WARNING, logger="harpsync")
    a.restart()
    assert _status(a, ADMIN) == 200
    recreated = [r.getMessage() for r in caplog.records
                 if "no active super_user" in r.getMessage()]
    assert len(recreated) == 1 and f"'{ADMIN[0]}'" in recreated[0], recreated
    assert "test-password" not in recreated[0]
    wait_for(lambda: _status(b, ADMIN) == 200, timeout=30,
             message="the recreated admin on node-b")
    # A restart with a super user in place changes nothing.
    a.call("alter_user", username=ADMIN[0], password="changed-password")
    a.restart()
    assert _status(a, ADMIN) == 401 and _status(a, (ADMIN[0], "changed-password")) == 200
    users = a.post({"operation": "list_users"}, auth=(ADMIN[0], "changed-password")).json()
    assert {u["username"] for u in users} == {ADMIN[0], *kept}


OPS = ("ops", "ops-password")


def _super_role(node: Any, auth: tuple[str, str]) -> bool:
    roles = node.post({"operation": "list_roles"}, auth=auth).json()
    return bool(next(r for r in roles if r["id"] == "super_user")["permission"]
                .get("super_user"))


@pytest.mark.timeout(150)
def _killed_mid_copy(node_factory: Any) -> tuple[Any, Any]:
    """node-a with its super users moved to role ``root`` (role ``super_user`` has no
    super_user any more), and node-b killed while its copy of system from node-a ran."""
    a = node_factory("node-a")
    a.call("add_role", role="root", permission={"super_user": True})
    a.call("add_user", username=OPS[0], password=OPS[1], role="root")
    assert a.post({"operation": "alter_role", "id": "super_user",
                   "permission": {"super_user": False}}, auth=OPS).status_code == 200
    b = node_factory("node-b", process=True, env={"HARPSYNC_CRASH_AT": "copy_chunk"})
    with contextlib.suppress(httpx.HTTPError):  # it may die before it answers
        b.post({"operation": "add_node", "hostname": a.name, "url": a.repl_url,
                "verify_tls": False, "authorization": {"username": OPS[0],
                                                       "password": OPS[1]}})
    assert b.proc is not None and b.proc.wait(30) == 137
    del b.extra_env["HARPSYNC_CRASH_AT"]
    return a, b


def test_a_node_removed_while_down_mid_copy_can_have_its_admin_recreated(
        node_factory: Any) -> None:
    """node-b, killed mid-copy of system, is removed by node-a while it is down: its copy
    never resumes and no one can log in to it. Restarted with HARPSYNC_RECREATE_ADMIN=1,
    it recreates its configured admin (before, wiping it was the only way back)."""
    a, b = _killed_mid_copy(node_factory)
    assert a.post({"operation": "remove_node", "hostname": "node-b"},
                  auth=OPS).status_code == 200
    b.start()
    wait_for(lambda: "HARPSYNC_RECREATE_ADMIN=1" in b.log_path.read_text(), timeout=30,
             message="node-b's warning naming the override")
    assert _status(b, ADMIN) != 200 and _status(b, OPS) != 200
    b.stop()
    b.extra_env["HARPSYNC_RECREATE_ADMIN"] = "1"
    b.start()
    wait_for(lambda: _status(b, ADMIN) == 200, timeout=30,
             message="node-b's configured admin recreated")


def test_a_node_restarted_mid_copy_of_system_does_not_recreate_its_admin(
        node_factory: Any) -> None:
    """node-a's operator moved the super users to role ``root`` and took super_user away
    from role ``super_user`` (the first admin's). A new node-b joins and is killed once
    the first chunk of its copy of ``system`` (the roles) landed: its own first admin
    is no super user any more, and the cluster's (``ops``) has not arrived. Restarted,
    it must wait for the copy, not recreate its configured admin: written at the
    clock's version, the role's super_user came back and replicated, undoing node-a's
    change on the whole cluster."""
    a, b = _killed_mid_copy(node_factory)
    b.start()
    wait_for(lambda: _status(b, OPS) == 200, timeout=30,
             message="node-a's super user on node-b (its copy of system done)")
    assert not _super_role(b, OPS)
    assert "interrupted" in b.log_path.read_text()
    # node-b's own later user reaches node-a: anything node-b wrote before it did too.
    assert b.post({"operation": "add_user", "username": "late", "password": "late-password",
                   "role": "root"}, auth=OPS).status_code == 200
    wait_for(lambda: "late" in {u["username"] for u in a.post(
        {"operation": "list_users"}, auth=OPS).json()}, timeout=30,
        message="node-b's user on node-a")
    assert not _super_role(a, OPS)
