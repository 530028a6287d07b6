"""The live change feed behind the ``/changes`` WebSocket (the HTTP layer adapts it).

A client subscribes to a database (optionally one table) and receives every change
committed here, local or replicated, as JSON. Each subscription reads this node's
transaction log after a position and wakes on the writer's commit notification, as a
replication publisher does; nothing is copied per write for clients that are not
listening.

Memory stays bounded: changes wait for the socket in a queue of at most
``operationsApi.changes.maxQueue``. While replaying the log (``since``), the reader
waits for room (the data is on disk); once live, a full queue means the client reads
slower than this node commits, and it is dropped with close code 1013 and a reason
naming the version to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from harpsync import codec
from harpsync.auth import User, require_table
from harpsync.errors import (
    BadRequestError,
    ForbiddenError,
    HarpsyncError,
    ServiceUnavailableError,
    UnauthorizedError,
)
from harpsync.storage.database import Database
from harpsync.storage.hlc import version_to_ms
from harpsync.storage.logscan import entry_seq_of_version
from harpsync.storage.store import SYSTEM
from harpsync.tasks import end_tasks

log = logging.getLogger(__name__)

READ_BATCH = 500
DATA_KINDS = {"insert", "update", "upsert", "delete"}
TABLE_KINDS = {"create_table", "drop_table"}
SUBSCRIBE_TIMEOUT = 30.0
# A dropped client gets its close frame once it reads what is already buffered.
CLOSE_TIMEOUT = 30.0

# WebSocket close codes (RFC 6455).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_ERROR = 1011
CLOSE_TRY_LATER = 1013


class Users(Protocol):
    """What the feed needs of the authenticator: a feed outlives the login it began
    with, so it follows changes to its user and role."""

    @property
    def generation(self) -> int:
        """Grows whenever users or roles may have changed."""

    @property
    def listeners(self) -> list[Callable[[], None]]:
        """Called, from any thread, after ``generation`` grew."""

    def current(self, username: str) -> User | None:
        """The user as it stands now; None once dropped or deactivated."""


class Channel(Protocol):
    """What the feed needs of a WebSocket (the HTTP layer adapts Starlette's)."""

    async def receive_text(self) -> str | None:
        """The next text message, or ``None`` once the client has gone."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class Subscription:
    database: str
    table: str | None
    since: int | None


def parse_subscribe(text: str | None) -> Subscription:
    """The client's first message: ``{"action": "subscribe", "database": ...,
    "table": ... (optional), "since": version (optional)}``.

    Raises:
        BadRequestError: the message is not such an object; the message says why.
    """
    try:
        message = json.loads(text or "")
    except (ValueError, RecursionError):  # nested past the parser's limit: bad input too
        raise BadRequestError("the first message must be a JSON object such as "
                              '{"action": "subscribe", "database": "dev"}') from None
    if not isinstance(message, dict) or message.get("action") != "subscribe":
        raise BadRequestError("the first message must have \"action\": \"subscribe\"")
    unknown = sorted(set(message) - {"action", "database", "table", "since"})
    if unknown:
        raise BadRequestError(f"unknown field '{unknown[0]}' in subscribe")
    database = message.get("database")
    if not isinstance(database, str) or not database:
        raise BadRequestError("'database' is required and must be a string")
    table = message.get("table")
    if table is not None and (not isinstance(table, str) or not table):
        raise BadRequestError("'table' must be a non-empty string")
    since = message.get("since")
    # isascii(): str.isdigit() also holds for "²" and other scripts' digits
    if isinstance(since, str) and since.isascii() and since.isdigit() and len(since) <= 20:
        since = int(since)
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                              or not 0 <= since < 1 << 64):
        raise BadRequestError("'since' must be a version: an integer or a string of digits")
    return Subscription(database, table, since)


def check_access(storage: Any, user: User, sub: Subscription) -> Database:
    """The database to follow, once ``user`` may read every table it covers.

    Raises:
        BadRequestError: the ``system`` database (users, roles and nodes have no feed).
        NotFoundError: no such database or table.
        ForbiddenError: a table the user may not read (Harper's 403 body).
    """
    if sub.database == SYSTEM:
        raise BadRequestError("the 'system' database has no change feed")
    # Permissions first: a role must not tell a missing table (404) from one it may not
    # read (403), nor a missing database from one it has no permission in.
    if sub.table is not None:
        require_table(user, sub.database, sub.table, ["read"])
    elif not user.super_user and not _reads_any(user, sub.database):
        raise ForbiddenError([{"schema": sub.database, "table": None,
                               "required_table_permissions": ["read"],
                               "required_attribute_permissions": []}])
    db: Database = storage.database(sub.database)
    if sub.table is not None:
        storage.table(sub.database, sub.table)
    else:
        for name in sorted(db.tables):
            require_table(user, sub.database, name, ["read"])
    return db


def _reads_any(user: User, database: str) -> bool:
    """Whether the role grants read on some table of ``database`` (existing or not)."""
    spec = user.permission.get(database)
    tables = spec.get("tables") if isinstance(spec, dict) else None
    return isinstance(tables, dict) and any(_can_read(user, database, t) for t in tables)


def _can_read(user: User, database: str, table: str) -> bool:
    try:
        require_table(user, database, table, ["read"])
    except ForbiddenError:
        return False
    return True


def entry_changes(database: str, raw: bytes, names: dict[int, str], table: str | None,
                  readable: Callable[[str], bool], above: int | None = None,
                  ) -> list[dict[str, Any]]:
    """The changes one log entry holds that this subscription may see, as JSON objects.

    ``above``: only changes with a version greater than this (a replay by version).
    """
    origin, version, _user, ops = codec.unpack(raw)
    out = []
    for op in ops:
        name, kind = op[0], op[1]
        if not isinstance(name, str) or (table is not None and name != table):
            continue
        if kind not in DATA_KINDS and kind not in TABLE_KINDS:
            continue
        if not readable(name):
            continue
        op_version = op[5] if len(op) > 5 and op[5] else version
        if above is not None and op_version <= above:
            continue
        change: dict[str, Any] = {"database": database, "table": name, "operation": kind}
        if kind in DATA_KINDS:
            change["id"] = op[2]
            if kind != "delete" and op[3] is not None:
                change["record"] = op[3]
        change.update(version=op_version, origin=names.get(origin, str(origin)),
                      timestamp=version_to_ms(op_version))
        out.append(change)
    return out


class ChangeFeed:
    """The node's change feed: limits, and one :class:`Follower` per client."""

    def __init__(self, storage: Any, metrics: Any, max_queue: int, max_clients: int,
                 users: Users | None = None) -> None:
        """``users``: where a running feed reads its user's current permissions."""
        self.storage = storage
        self.metrics = metrics
        self.users = users
        self.max_queue = max_queue
        self.max_clients = max_clients
        self.clients = 0

    async def serve(self, channel: Channel, user: User, request_id: str | None) -> None:
        """Run one accepted WebSocket until the client leaves or is dropped."""
        if self.clients >= self.max_clients:
            error = ServiceUnavailableError(
                f"too many change feed clients (operationsApi.changes.maxClients is "
                f"{self.max_clients}); retry later")
            await _refuse(channel, {**error.body(), "request_id": request_id}, CLOSE_TRY_LATER)
            return
        self.clients += 1
        self.metrics.changes_clients.set(self.clients)
        try:
            follower = await self._subscribe(channel, user)
        except HarpsyncError as exc:
            self._left()
            await _refuse(channel, {**exc.body(), "request_id": request_id}, CLOSE_POLICY)
            return
        except BaseException:
            self._left()
            raise
        try:
            if follower is not None:
                await follower.run()
        finally:
            self._left()

    def _left(self) -> None:
        self.clients -= 1
        self.metrics.changes_clients.set(self.clients)

    async def _subscribe(self, channel: Channel, user: User) -> Follower | None:
        try:
            text = await asyncio.wait_for(channel.receive_text(), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise BadRequestError("no subscribe message within 30 seconds") from None
        if text is None:
            return None  # the client left first
        sub = parse_subscribe(text)
        # The login was checked on the upgrade, maybe 30 s ago: the user as it is now,
        # read after noting the generation, so a change after this read is seen later.
        generation = self.users.generation if self.users is not None else 0
        if self.users is not None:
            current = self.users.current(user.username)
            if current is None:
                raise UnauthorizedError("Login failed")
            user = current
        db = check_access(self.storage, user, sub)
        follower = Follower(self, channel, user, sub, db, generation)
        try:
            await follower.start()
        except BaseException:
            follower.stop()
            raise
        return follower


async def _refuse(channel: Channel, body: dict[str, Any], code: int) -> None:
    with contextlib.suppress(Exception):
        await channel.send_text(json.dumps(body, default=str))
        await asyncio.wait_for(channel.close(code, _reason(body["error"])), CLOSE_TIMEOUT)


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class Follower:
    """One subscription: reads the log into a bounded queue, sends from it."""

    def __init__(self, feed: ChangeFeed, channel: Channel, user: User, sub: Subscription,
                 db: Database, generation: int | None = None) -> None:
        """``generation``: the users' generation ``user`` was read at (default: now)."""
        self.feed = feed
        self.channel = channel
        self.sub = sub
        self.db = db
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(feed.max_queue)
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.last_sent: int | None = None
        # Where a client dropped before anything was sent resumes: its first change.
        self.first_queued: int | None = None
        self.closing: tuple[int, str] | None = None
        self.user = user
        if generation is None:
            generation = feed.users.generation if feed.users is not None else 0
        self._generation = generation
        database = sub.database
        self.readable: Callable[[str], bool] = lambda t: _can_read(self.user, database, t)
        self.position = 0
        self.replay_through = 0
        self.replay_above: int | None = None
        self.above_through = 0  # entries up to this sequence: only versions above that
        # ``pruned_through`` when the replay started below it: entries kept there are
        # read; only a prune after the subscription ends the feed.
        self.pruned_seen = 0

    def _notify(self, _head: int = 0) -> None:  # called in the writer thread
        # A loop already closed (the node stopping) must not fail the other listeners.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def start(self) -> None:
        """Find where to start (``since``) and tell the client it is subscribed."""
        db, since = self.db, self.sub.since
        db.commit_listeners.append(self._notify)
        if self.feed.users is not None:
            # A user dropped or deactivated while nothing is written here: the feed
            # ends now, not at the next change of its database.
            self.feed.users.listeners.append(self._notify)
        head = db.head_seq
        self.position = self.replay_through = head
        if since is not None:
            seq = await asyncio.to_thread(entry_seq_of_version, db, since)
            pruned = self.pruned_seen = db.pruned_through()
            start = 0 if seq is None else seq - 1  # that entry again: a client may have had part
            lost = None
            if pruned > start:
                # Entries after the start were removed (retention, or ``purge_stream`` of
                # one table, which keeps the other tables' entries below ``pruned``).
                lost = max(db.pruned_max().values(), default=None)
                if lost is None or lost > since:
                    raise BadRequestError(
                        f"changes after version {since} are no longer in the log (it keeps "
                        "logging.auditRetention); subscribe without 'since' and reload")
            self.position = start
            if seq is None:  # every kept entry newer than since, wherever it is logged
                self.replay_above = since
                # ... and, when the entry of since is among those removed (the newest
                # version removed is since), every entry logged after the removed part:
                # a late entry there, stamped at or below since, came after it.
                self.above_through = pruned if lost == since else head
        await self.channel.send_text(json.dumps({
            "action": "subscribed", "database": self.sub.database, "table": self.sub.table,
            "since": since}))

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.db.commit_listeners.remove(self._notify)
        if self.feed.users is not None:
            with contextlib.suppress(ValueError):
                self.feed.users.listeners.remove(self._notify)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._send()),
                 asyncio.create_task(self._watch_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stop()
            await end_tasks(tasks)
        if self.closing is not None:
            code, reason = self.closing
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.channel.close(code, _reason(reason)),
                                       CLOSE_TIMEOUT)

    async def _watch_client(self) -> None:
        """Ends when the client goes; messages after the subscribe are ignored."""
        while await self.channel.receive_text() is not None:
            pass

    async def _read(self) -> None:
        db = self.db
        try:
            while True:
                self._wakeup.clear()
                if db.dropped:
                    self.closing = (CLOSE_GOING_AWAY,
                                    f"database '{self.sub.database}' was dropped")
                    return
                pruned, entries = db.read_log(self.position, READ_BATCH)
                if pruned > max(self.position, self.pruned_seen):
                    self.closing = (CLOSE_TRY_LATER, "the log was pruned past this feed; "
                                    "subscribe again")
                    return
                refused = self._recheck_user()
                if refused is not None:
                    self.closing = (CLOSE_POLICY, refused)
                    return
                if not entries:
                    await self._wakeup.wait()
                    continue
                names = db.origin_names
                for seq, raw in entries:
                    replaying = seq <= self.replay_through
                    above = self.replay_above if seq <= self.above_through else None
                    for change in entry_changes(self.sub.database, raw, names, self.sub.table,
                                                self.readable, above):
                        if self.first_queued is None:
                            self.first_queued = change["version"]
                        if replaying:
                            await self.queue.put(change)
                        elif not self._offer(change):
                            return
                    self.position = seq
                await asyncio.sleep(0)  # a long replay must not hold the event loop
        except Exception:
            if db.dropped:  # closed under the reader
                self.closing = (CLOSE_GOING_AWAY, f"database '{self.sub.database}' was dropped")
                return
            log.exception("change feed reader failed")
            self.closing = (CLOSE_ERROR, "internal error; see the node log")

    def _recheck_user(self) -> str | None:
        """Why the feed must end now that users or roles changed (None: it goes on,
        with the user's current permissions). The reader runs it after reading entries
        (a revocation committed before any of them has bumped the generation by then)
        and when woken by a change of users; the sender before each change it sends."""
        users = self.feed.users
        if users is None or users.generation == self._generation:
            return None
        self._generation = users.generation
        user = users.current(self.user.username)
        if user is None:
            return f"user '{self.user.username}' was dropped or deactivated"
        self.user = user
        if self.sub.table is not None and not self.readable(self.sub.table):
            return f"user '{user.username}' may no longer read '{self.sub.table}'"
        return None

    def _offer(self, change: dict[str, Any]) -> bool:
        try:
            self.queue.put_nowait(change)
            return True
        except asyncio.QueueFull:
            since = self.first_queued if self.last_sent is None else self.last_sent
            resume = "" if since is None else f"; resume with since={since}"
            self.closing = (CLOSE_TRY_LATER, f"client too slow: {self.feed.max_queue} changes "
                                             f"waiting{resume}")
            self.feed.metrics.changes_dropped.inc()
            log.warning("dropped a /changes client of %s: more than %d changes waiting",
                        self.sub.database, self.feed.max_queue)
            return False

    async def _send(self) -> None:
        sent = self.feed.metrics.changes_sent
        while True:
            change = await self.queue.get()
            # Users or roles changed while this change waited (a replay reads ahead of a
            # slow client): it goes only if the user may still read its table.
            refused = self._recheck_user()
            if refused is not None:
                self.closing = (CLOSE_POLICY, refused)
                return
            if not self.readable(change["table"]):
                continue
            await self.channel.send_text(json.dumps(change, separators=(",", ":"),
                                                    default=str))
            self.last_sent = change["version"]
            sent.inc()
