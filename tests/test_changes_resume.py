"""Resuming the change feed with ``since`` after ``purge_stream`` removed part of the
log: the feed follows one real node's storage (real LMDB); its WebSocket is an
in-memory channel behind the feed's ``Channel`` seam."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync import codec
from harpsync.auth import User
from harpsync.changes import ChangeFeed, Follower, Subscription
from harpsync.errors import BadRequestError
from harpsync.metrics import Metrics
from harpsync.replication.linkstore import StorageLinkStore
from harpsync.storage import logscan, retention, writes
from harpsync.storage.keys import encode_id
from harpsync.storage.store import Storage

DB = "data"
ADMIN = User("admin", "super_user", {"super_user": True})


class Channel:
    """The client end: keeps what the feed sends; never sends after subscribing."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self._gone = asyncio.Event()

    async def receive_text(self) -> str | None:
        await self._gone.wait()
        return None

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Storage, Storage]]:
    a = Storage(tmp_path / "a", "node-a", 1 << 27)
    b = Storage(tmp_path / "b", "node-b", 1 << 27)
    a.open()
    b.open()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


async def _ship(src: Storage, dst: Storage, database: str, after: int) -> None:
    db = src.databases[database]
    _, entries = db.read_log(after, 100_000)
    await StorageLinkStore(dst).apply_entries(database, src.node_name, entries,
                                              dict(db.origin_names), {"seq": entries[-1][0]},
                                              60_000, dst.node_name, 0, None)


async def _insert(storage: Storage, table: str, record: dict[str, Any]) -> int:
    await storage.write(writes.write_records(storage, DB, table, [record], "insert", "t"))
    db = storage.databases[DB]
    return int(codec.unpack(db.read_log(db.head_seq - 1, 1)[1][0][1])[1])


async def _feed(storage: Storage, since: int, count: int) -> list[dict[str, Any]]:
    """The changes a subscription to all of ``DB`` from ``since`` sends, once it has sent
    ``count`` of them or shows no more progress."""
    feed = ChangeFeed(storage, Metrics(), 100, 10)
    channel = Channel()
    follower = Follower(feed, channel, ADMIN, Subscription(DB, None, since),
                        storage.databases[DB])
    await follower.start()
    task = asyncio.create_task(follower.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(channel.sent) < 1 + count and loop.time() < deadline and not task.done():
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert channel.sent[0]["action"] == "subscribed"
    return channel.sent[1:]


@pytest.mark.timeout(30)
async def test_since_below_a_purge_keeps_other_tables_entries(pair):
    """A ``purge_stream`` of one table removes the entry of ``since``; a kept entry of
    another table logged after it (but before a late replicated entry of the purged
    table) is still sent."""
    a, b = pair
    await a.create_table(DB, "dog", "id")
    await a.create_table(DB, "cat", "id")
    await _ship(a, b, "system", 0)
    await _ship(a, b, DB, 0)
    b_after = b.databases[DB].head_seq
    late = await _insert(b, "dog", {"id": 1})  # written on b first, reaches a late
    a.hlc.observe(late)  # as clocks do that met before: a's next versions are newer
    since = await _insert(a, "dog", {"id": 2})  # the last change the client saw
    assert late < since
    cat = await _insert(a, "cat", {"id": 3})
    await _ship(b, a, DB, b_after)  # b's older dog insert, logged after the cat insert
    db = a.databases[DB]
    await a.write(retention.purge_table_job(db, "dog", None, None))
    assert db.pruned_through() == db.head_seq  # the late dog entry was the newest
    sent = await _feed(a, since, 1)
    assert [(c["table"], c["version"]) for c in sent] == [("cat", cat)]


@pytest.mark.timeout(30)
async def test_since_before_a_purged_entry_is_refused_not_closed_again_and_again(pair):
    """``since`` is still in the log but entries after it were purged (another table):
    the subscription is refused, naming the loss, rather than accepted and then closed
    with "subscribe again", which a client resuming from the same version repeats
    forever."""
    a, _b = pair
    await a.create_table(DB, "dog", "id")
    await a.create_table(DB, "cat", "id")
    since = await _insert(a, "cat", {"id": 1})
    await _insert(a, "dog", {"id": 2})
    db = a.databases[DB]
    await a.write(retention.purge_table_job(db, "dog", None, None))
    follower = Follower(ChangeFeed(a, Metrics(), 100, 10), Channel(), ADMIN,
                        Subscription(DB, None, since), db)
    with pytest.raises(BadRequestError, match="no longer in the log"):
        await follower.start()
    follower.stop()


@pytest.mark.timeout(30)
async def test_since_inside_a_copied_chunk_loses_no_later_row(pair):
    """Rows a full copy lands keep their own versions, one log entry per chunk stamped
    with the newest: resuming from a row in the middle of a chunk (where a slow client
    was dropped) still sends the rows of later chunks, whatever their versions."""
    a, b = pair
    await a.create_table(DB, "dog", "id")
    await _ship(a, b, "system", 0)
    await _ship(a, b, DB, 0)
    v3 = await _insert(a, "dog", {"id": 3})
    v1 = await _insert(a, "dog", {"id": 1})
    v2 = await _insert(a, "dog", {"id": 2})
    store = StorageLinkStore(b)
    origins = {0: a.node_name}
    for chunk in (((1, v1), (2, v2)), ((3, v3),)):  # a copy goes in key order
        rows = [(encode_id(i), codec.pack([v, 0, {"id": i}])) for i, v in chunk]
        await store.apply_rows(DB, a.node_name, "dog", rows, origins, {"seq": 0}, 0, None,
                               None)
    sent = await _feed(b, v1, 3)  # the client had row 1 of the first chunk
    assert {c["id"] for c in sent} >= {2, 3}, sent


@pytest.mark.timeout(30)
async def test_since_far_back_in_a_long_log_still_sends_a_late_entry(pair, monkeypatch):
    """The entry of ``since`` is found however far back it is: a replicated entry with
    an older version, logged after it, is sent (a lookup that gave up after a number of
    entries fell back to "versions above since" and skipped it)."""
    monkeypatch.setattr(logscan, "SCAN_LIMIT", 3)  # instead of 200,000 entries
    a, b = pair
    await a.create_table(DB, "dog", "id")
    await _ship(a, b, "system", 0)
    await _ship(a, b, DB, 0)
    b_after = b.databases[DB].head_seq
    late = await _insert(b, "dog", {"id": 1})  # written on b first, reaches a late
    a.hlc.observe(late)
    since = await _insert(a, "dog", {"id": 2})
    for i in range(3, 8):
        await _insert(a, "dog", {"id": i})
    await _ship(b, a, DB, b_after)
    sent = await _feed(a, since, 7)
    assert 1 in {c["id"] for c in sent}, sent


@pytest.mark.timeout(30)
async def test_since_pruned_by_retention_still_sends_a_late_entry_logged_after_it(pair):
    """Retention removed the entry of ``since`` (the newest it removed): every entry
    kept after the pruned part was logged after it, so a late replicated entry stamped
    below ``since`` is sent too, not filtered out by its version."""
    a, b = pair
    await a.create_table(DB, "dog", "id")
    await _ship(a, b, "system", 0)
    await _ship(a, b, DB, 0)
    b_after = b.databases[DB].head_seq
    late = await _insert(b, "dog", {"id": 1})  # written on b first, reaches a late
    a.hlc.observe(late)
    since = await _insert(a, "dog", {"id": 2})  # the last change the client saw
    db = a.databases[DB]
    through = db.head_seq
    await _ship(b, a, DB, b_after)
    after = await _insert(a, "dog", {"id": 3})
    await a.write(retention.prune_log_job(db, through, None))
    assert db.pruned_through() == through and max(db.pruned_max().values()) == since
    sent = await _feed(a, since, 2)
    assert [(c["id"], c["version"]) for c in sent] == [(1, late), (3, after)]


@pytest.mark.timeout(30)
async def test_a_version_never_logged_here_replays_only_greater_versions(pair):
    """A ``since`` this log never held (taken from another node) still means "versions
    above it" after a prune: older entries kept after the pruned part are not sent."""
    a, b = pair
    await a.create_table(DB, "dog", "id")
    await _ship(a, b, "system", 0)
    await _ship(a, b, DB, 0)
    first = await _insert(a, "dog", {"id": 1})
    db = a.databases[DB]
    await a.write(retention.prune_log_job(db, db.head_seq, None))
    second = await _insert(a, "dog", {"id": 2})
    b.hlc.observe(second)
    since = await _insert(b, "dog", {"id": 9})  # b's, never sent to a
    a.hlc.observe(since)
    third = await _insert(a, "dog", {"id": 3})
    assert first < second < since < third
    sent = await _feed(a, since, 1)
    assert [(c["id"], c["version"]) for c in sent] == [(3, third)]


class DroppingUsers:
    """The feed's ``Users`` seam: ``admin`` until :meth:`drop`."""

    def __init__(self) -> None:
        self.generation = 0
        self.listeners: list[Any] = []
        self.dropped = False

    def current(self, username: str) -> User | None:
        return None if self.dropped else ADMIN

    def drop(self) -> None:
        self.dropped = True
        self.generation += 1
        for listener in list(self.listeners):
            listener()


@pytest.mark.timeout(30)
async def test_no_change_is_sent_after_the_user_is_dropped_mid_replay(pair):
    """A replay of a many-record entry stops at the next change once the user is
    dropped: neither the rest of the entry nor the changes already waiting in the
    queue are sent, and the feed closes with 1008."""
    a, _b = pair
    await a.create_table(DB, "dog", "id")
    since = await _insert(a, "dog", {"id": 0})
    await a.write(writes.write_records(a, DB, "dog", [{"id": i} for i in range(1, 121)],
                                       "insert", "t"))
    users = DroppingUsers()

    class Dropping(Channel):
        async def send_text(self, text: str) -> None:
            await super().send_text(text)
            if len(self.sent) == 6:  # "subscribed" and 5 changes: then the user goes
                users.drop()
            await asyncio.sleep(0)  # a client reading slower than the node reads

    channel = Dropping()
    follower = Follower(ChangeFeed(a, Metrics(), 10, 10, users), channel, ADMIN,
                        Subscription(DB, "dog", since), a.databases[DB])
    await follower.start()
    await asyncio.wait_for(follower.run(), 10)
    assert len(channel.sent) == 6, len(channel.sent)
    assert channel.closed is not None and channel.closed[0] == 1008, channel.closed


@pytest.mark.timeout(30)
async def test_a_client_dropped_before_its_first_change_is_told_where_to_resume(pair):
    """A client too slow to take even its first change is dropped with a ``since`` too
    (the first change it did not get), and resuming there sends every change."""
    a, _b = pair
    await a.create_table(DB, "dog", "id")

    class Stalled(Channel):
        async def send_text(self, text: str) -> None:
            if self.sent:  # "subscribed" goes; the first change never does
                await asyncio.Event().wait()
            await super().send_text(text)

    channel = Stalled()
    follower = Follower(ChangeFeed(a, Metrics(), 2, 10), channel, ADMIN,
                        Subscription(DB, "dog", None), a.databases[DB])
    await follower.start()
    task = asyncio.create_task(follower.run())
    versions = [await _insert(a, "dog", {"id": i}) for i in range(6)]
    await asyncio.wait_for(task, 10)
    assert channel.closed is not None and channel.closed[0] == 1013, channel.closed
    assert "since=" in channel.closed[1], channel.closed
    since = int(channel.closed[1].rsplit("since=", 1)[1])
    assert since == versions[0]
    assert [c["version"] for c in await _feed(a, since, 6)] == versions
