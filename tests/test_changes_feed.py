"""The ``/changes`` WebSocket: local and replicated changes live, resume with ``since``,
read permission per table, login on the upgrade, and a slow client dropped with a
close reason (bounded queue). Two real nodes joined over mutual TLS.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.helpers import ADMIN, InProcessNode, harper_error, wait_for
from tests.repl_util import has_table, join, wait_linked

MAX_QUEUE = 50  # node-a's operationsApi.changes.maxQueue
MAX_CLIENTS = 3  # and maxClients


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    root = tmp_path_factory.mktemp("changes")
    a = InProcessNode("node-a", root / "node-a",
                      {"OPERATIONSAPI_CHANGES_MAXQUEUE": str(MAX_QUEUE),
                       "OPERATIONSAPI_CHANGES_MAXCLIENTS": str(MAX_CLIENTS)}).start()
    b = InProcessNode("node-b", root / "node-b").start()
    try:
        join(a, b)
        a.call("create_table", database="dev", table="dog", primary_key="id")
        a.call("create_table", database="dev", table="cat", primary_key="id")
        wait_for(lambda: has_table(b, "cat", "dev"), timeout=20, message="dev.cat on b")
        wait_linked([(a, b), (b, a)], ("system", "dev"))
        a.call("add_role", role="dog_reader", permission={
            "super_user": False,
            "dev": {"tables": {"dog": {"read": True, "insert": False, "update": False,
                                       "delete": False, "attribute_permissions": []}}}})
        a.call("add_user", role="dog_reader", username="rita", password="ritapw", active=True)
        yield a, b
    finally:
        b.close()
        a.close()


def feed(node: Any, auth: tuple[str, str] | None = ADMIN, rcvbuf: int | None = None,
         **kw: Any) -> ClientConnection:
    headers = {"Authorization": basic(*auth)} if auth else {}
    sock = None
    if rcvbuf is not None:  # a small receive buffer: a client that stops reading stalls soon
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", node.ops_port))
    return connect(f"ws://127.0.0.1:{node.ops_port}/changes", additional_headers=headers,
                   compression=None, proxy=None, sock=sock, open_timeout=30, **kw)


def subscribe(ws: ClientConnection, **body: Any) -> dict[str, Any]:
    ws.send(json.dumps({"action": "subscribe", **body}))
    return json.loads(ws.recv(timeout=30))


def changes(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(ws.recv(timeout=30)) for _ in range(count)]


def write(node: Any, op: str, table: str = "dog", **body: Any) -> int:
    response = node.post({"operation": op, "database": "dev", "table": table, **body})
    assert response.status_code == 200, response.text
    return int(response.headers["x-harpsync-version"])


def test_local_and_replicated_changes_arrive_live(pair):
    """Inserts, updates and deletes made here and on the peer arrive with their database,
    table, operation, id, record (none for deletes), version, origin and timestamp."""
    a, b = pair
    with feed(a) as ws:
        assert subscribe(ws, database="dev", table="dog") == {
            "action": "subscribed", "database": "dev", "table": "dog", "since": None}
        v1 = write(a, "insert", records=[{"id": 1, "name": "Penny"}])
        write(a, "insert", table="cat", records=[{"id": 1}])  # another table: not sent
        v2 = write(a, "update", records=[{"id": 1, "name": "Kato"}])
        v3 = write(b, "upsert", records=[{"id": 2, "name": "Rex"}])
        # Replicated into a before a's next write, so a's log has them in this order.
        assert b.post({"operation": "wait_for_replication", "version": v3, "database": "dev",
                       "timeout": 20000}).status_code == 200
        v4 = write(a, "delete", ids=[1])
        got = changes(ws, 4)
    assert [(c["operation"], c["id"], c["version"], c["origin"]) for c in got] == [
        ("insert", 1, v1, "node-a"), ("update", 1, v2, "node-a"),
        ("upsert", 2, v3, "node-b"), ("delete", 1, v4, "node-a")]
    assert got[1]["record"]["name"] == "Kato" and got[1]["record"]["id"] == 1
    assert "record" not in got[3]
    assert all(c["database"] == "dev" and c["table"] == "dog" for c in got)
    assert all(c["timestamp"] == c["version"] / 65536 for c in got)


def test_resume_with_since(pair):
    """since = the version of a change received earlier sends that change again and
    everything after it; a version between entries sends those above it."""
    a, _ = pair
    versions = [write(a, "upsert", records=[{"id": 100 + i}]) for i in range(3)]
    with feed(a) as ws:
        subscribe(ws, database="dev", table="dog", since=str(versions[0]))
        replayed = changes(ws, 3)
        assert [c["id"] for c in replayed] == [100, 101, 102]
        live = write(a, "upsert", records=[{"id": 103}])
        assert changes(ws, 1)[0]["version"] == live
    with feed(a) as ws:
        subscribe(ws, database="dev", since=versions[0] + 1)  # not a stored version
        assert [c["id"] for c in changes(ws, 3)] == [101, 102, 103]


def test_a_table_without_read_permission_is_refused(pair):
    """A role without read on a table gets a FORBIDDEN error message and close 1008, for
    that table and for its whole database; the table it may read streams."""
    a, _ = pair
    for body in ({"database": "dev", "table": "cat"}, {"database": "dev"}):
        with feed(a, auth=("rita", "ritapw")) as ws:
            answer = subscribe(ws, **body)
            assert answer["code"] == "FORBIDDEN" and answer["request_id"]
            assert harper_error(answer)["unauthorized_access"][0]["table"] == "cat"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with feed(a, auth=("rita", "ritapw")) as ws:
        assert subscribe(ws, database="dev", table="dog")["action"] == "subscribed"
        version = write(a, "upsert", records=[{"id": 200}])
        assert changes(ws, 1)[0]["version"] == version


def test_a_role_cannot_tell_a_missing_table_from_a_forbidden_one(pair):
    """A role subscribing to a table or database it may not read gets FORBIDDEN whether
    it exists or not (a NOT_FOUND for missing ones told which names exist)."""
    a, _ = pair
    for body in ({"database": "dev", "table": "cat"}, {"database": "dev", "table": "nope"},
                 {"database": "nodb", "table": "dog"}, {"database": "nodb"}):
        with feed(a, auth=("rita", "ritapw")) as ws:
            answer = subscribe(ws, **body)
            assert answer["code"] == "FORBIDDEN", (body, answer)
            assert harper_error(answer)["unauthorized_access"][0]["schema"] == body["database"]


def test_a_feed_ends_when_its_user_loses_read_permission(pair):
    """A running feed follows the user's current permissions: once its role no longer
    grants read on the table, or the user is dropped, the next change is not sent and
    the feed closes with 1008 naming why."""
    a, _ = pair
    a.call("add_role", role="cat_reader", permission={
        "super_user": False, "dev": {"tables": {"cat": {"read": True}}}})
    a.call("add_user", role="cat_reader", username="carl", password="carlpw", active=True)
    a.call("add_user", role="cat_reader", username="cora", password="corapw", active=True)
    revoke = ({"operation": "alter_role", "id": "cat_reader", "permission": {
                  "super_user": False, "dev": {"tables": {"cat": {"read": False}}}}},
              {"operation": "drop_user", "username": "cora"})
    for user, change in ((("cora", "corapw"), revoke[1]), (("carl", "carlpw"), revoke[0])):
        with feed(a, auth=user) as ws:
            assert subscribe(ws, database="dev", table="cat")["action"] == "subscribed"
            version = write(a, "upsert", table="cat", records=[{"id": 300}])
            assert changes(ws, 1)[0]["version"] == version
            assert a.post(change).status_code == 200
            write(a, "upsert", table="cat", records=[{"id": 301, "secret": "after"}])
            with pytest.raises(ConnectionClosed) as closed:
                got = ws.recv(timeout=30)
                raise AssertionError(f"sent after the permission was gone: {got}")
            frame = closed.value.rcvd
            assert frame is not None and frame.code == 1008, frame


def test_login_and_subscribe_are_checked(pair):
    """No login is a 401 on the upgrade; a bad subscribe message or unknown table is an
    error with its code, then close 1008."""
    a, _ = pair
    with pytest.raises(InvalidStatus) as refused:
        feed(a, auth=None)
    assert refused.value.response.status_code == 401
    body = json.loads(refused.value.response.body)
    assert harper_error(body) == {"error": "Must login"} and body["code"] == "UNAUTHORIZED"
    for message, code in (({"action": "listen"}, "VALIDATION_ERROR"),
                          ({"action": "subscribe", "database": "dev", "since": "soon"},
                           "VALIDATION_ERROR"),
                          ({"action": "subscribe", "database": "dev", "table": "nope"},
                           "NOT_FOUND"),
                          ({"action": "subscribe", "database": "system"}, "VALIDATION_ERROR")):
        with feed(a) as ws:
            ws.send(json.dumps(message))
            answer = json.loads(ws.recv(timeout=30))
            assert answer["code"] == code, answer
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_dropping_the_database_closes_the_feed(pair):
    """A feed of a database that is dropped closes with 1001 and a reason saying so."""
    a, _ = pair
    a.call("create_table", database="scratch", table="t", primary_key="id")
    with feed(a) as ws:
        subscribe(ws, database="scratch")
        a.call("insert", database="scratch", table="t", records=[{"id": 1}])
        assert changes(ws, 1)[0]["operation"] == "insert"
        a.call("drop_database", database="scratch")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
    frame = closed.value.rcvd
    assert frame is not None and frame.code == 1001 and "scratch" in frame.reason


def test_clients_beyond_max_clients_are_refused(pair):
    """With maxClients feeds open, one more gets SERVICE_UNAVAILABLE and close 1013; a
    slot frees when a client leaves."""
    a, _ = pair
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_CLIENTS):
            ws = stack.enter_context(feed(a))
            assert subscribe(ws, database="dev")["action"] == "subscribed"
        with feed(a) as extra:
            answer = json.loads(extra.recv(timeout=30))
            assert answer["code"] == "SERVICE_UNAVAILABLE", answer
            with pytest.raises(ConnectionClosed) as closed:
                extra.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

    def admitted() -> bool:
        with feed(a) as ws:
            return subscribe(ws, database="dev").get("action") == "subscribed"

    wait_for(admitted, timeout=30, message="a feed admitted once the others left")


def test_a_slow_client_is_dropped_and_can_resume(pair):
    """A client that stops reading is dropped (close 1013, reason naming where to resume)
    once more than maxQueue changes wait; resuming there loses nothing."""
    a, _ = pair

    def dropped() -> float:
        text = a.client.get(a.url + "metrics", auth=ADMIN).text
        line = next(x for x in text.splitlines() if x.startswith("harpsync_changes_dropped_total"))
        return float(line.split()[-1])

    before = dropped()
    pad = "y" * 4000
    written: list[int] = []
    with feed(a, rcvbuf=4096, max_queue=2) as ws:
        subscribe(ws, database="dev", table="cat")
        batch = 0
        while dropped() == before:  # write until the node gives up on this client
            assert batch < 500, "the slow client was never dropped"
            ids = list(range(10_000 + batch * 50, 10_000 + (batch + 1) * 50))
            write(a, "insert", table="cat", records=[{"id": i, "pad": pad} for i in ids])
            written.extend(ids)
            batch += 1
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(json.loads(ws.recv(timeout=60)))
    frame = closed.value.rcvd
    assert frame is not None and frame.code == 1013, closed.value
    assert "client too slow" in frame.reason and "since=" in frame.reason
    since = int(frame.reason.rsplit("since=", 1)[1])
    assert received and received[-1]["version"] == since
    with feed(a) as ws:
        subscribe(ws, database="dev", table="cat", since=since)
        got = {c["id"] for c in received}
        while not set(written) <= got:
            got.add(json.loads(ws.recv(timeout=30))["id"])


def test_an_idle_feed_ends_when_its_user_is_dropped_or_deactivated(pair):
    """A feed with nothing to send closes with 1008 once its user is deactivated or
    dropped, without waiting for the next change of its database."""
    a, _ = pair
    a.call("add_user", role="dog_reader", username="ida", password="idapw", active=True)
    a.call("add_user", role="dog_reader", username="dan", password="danpw", active=True)
    for user, change in ((("ida", "idapw"), {"operation": "alter_user", "username": "ida",
                                              "active": False}),
                         (("dan", "danpw"), {"operation": "drop_user", "username": "dan"})):
        with feed(a, auth=user) as ws:
            assert subscribe(ws, database="dev", table="dog")["action"] == "subscribed"
            assert a.post(change).status_code == 200
            with pytest.raises(ConnectionClosed) as closed:
                got = ws.recv(timeout=10)
                raise AssertionError(f"sent after the user was gone: {got}")
            frame = closed.value.rcvd
            assert frame is not None and frame.code == 1008 and user[0] in frame.reason, frame


def test_a_deeply_nested_subscribe_message_is_a_validation_error(pair):
    """A first message nested past the JSON parser's recursion limit is answered like
    any other bad subscribe (VALIDATION_ERROR, close 1008), not with a server error."""
    a, _ = pair
    with feed(a) as ws:
        ws.send("[" * 100_000)
        answer = json.loads(ws.recv(timeout=30))
        assert answer["code"] == "VALIDATION_ERROR", answer
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_a_websocket_to_another_path_is_a_not_found_error(pair):
    """An upgrade to any path but ``/changes`` is refused with 404 and the usual error
    body (code NOT_FOUND), not an empty 403 that reads like a permission problem."""
    a, _ = pair
    for path in ("/change", "/changes/", "/"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{a.ops_port}{path}", proxy=None, open_timeout=30,
                    additional_headers={"Authorization": basic(*ADMIN)})
        response = refused.value.response
        assert response.status_code == 404, (path, response)
        body = json.loads(response.body)
        assert body["code"] == "NOT_FOUND" and body["request_id"], body


def test_since_with_digits_int_cannot_read_is_a_validation_error(pair):
    """``since`` such as "²" (a digit to ``str.isdigit``, not to ``int``) is refused like
    any other bad version, not with a server error."""
    a, _ = pair
    with feed(a) as ws:
        answer = subscribe(ws, database="dev", since="\u00b2")
        assert answer["code"] == "VALIDATION_ERROR", answer


def test_a_user_changed_between_upgrade_and_subscribe_is_checked_as_it_is_now(pair):
    """The login is on the upgrade, the subscribe may come up to 30 s later: a user
    dropped, or whose role lost read, in between is refused (UNAUTHORIZED or
    FORBIDDEN, close 1008), not streamed to with what the login saw."""
    a, _ = pair
    a.call("add_role", role="bird_reader", permission={
        "super_user": False, "dev": {"tables": {"dog": {"read": True}}}})
    a.call("add_user", role="bird_reader", username="bea", password="beapw", active=True)
    a.call("add_user", role="bird_reader", username="ben", password="benpw", active=True)
    cases = ((("bea", "beapw"), {"operation": "drop_user", "username": "bea"}, "UNAUTHORIZED"),
             (("ben", "benpw"), {"operation": "alter_role", "id": "bird_reader", "permission": {
                 "super_user": False, "dev": {"tables": {"dog": {"read": False}}}}},
              "FORBIDDEN"))
    for user, change, code in cases:
        with feed(a, auth=user) as ws:
            assert a.post(change).status_code == 200
            answer = subscribe(ws, database="dev", table="dog")
            assert answer.get("code") == code, answer
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
