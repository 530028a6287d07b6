"""Users, roles and permission checks for the operations API.

Users live in ``system.hdb_user`` and roles in ``system.hdb_role``; both replicate like
any other table. Passwords are stored only as salted scrypt hashes. A successful login
is cached by its exact ``Authorization`` header until the next write to ``system``;
concurrent checks of one set of credentials share one password hash (single-flight).
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from harpsync.errors import ForbiddenError, TooManyRequestsError, UnauthorizedError
from harpsync.passwords import hash_password, parse_authorization, verify_password
from harpsync.storage.hlc import ms_to_version
from harpsync.storage.reads import get_by_ids
from harpsync.storage.store import SYSTEM, Storage

SUPER_ROLE = "super_user"
# 2020-01-01T00:00:00Z: every first-start version lies before it (see below).
FIRST_START_EPOCH_MS = 1_577_836_800_000


def first_start_version(now_ms: int) -> int:
    """The version of the rows a node writes on its first start (the ``super_user`` role
    and the first admin user): older than any deliberate write, and older the later
    the node first started.

    Users and roles replicate under last-writer-wins. Written at the clock's version, a
    fresh node's bootstrap admin (with its own password) was the newest row and
    replaced the cluster's admin everywhere as soon as the node was added: the
    existing nodes no longer accepted their admin password. Dated like this, the
    cluster's admin wins over a newcomer's, and any ``alter_user`` or ``alter_role``
    beats every first-start row. Mirrored around 2020-01-01, so positive until 2069.
    """
    return ms_to_version(max(1, 2 * FIRST_START_EPOCH_MS - now_ms))


def active_super_users(users: Iterable[dict[str, Any]],
                       roles: Iterable[dict[str, Any]]) -> list[str]:
    """The usernames of ``users`` (``hdb_user`` rows) that are active and hold a role of
    ``roles`` (``hdb_role`` rows) with the ``super_user`` permission."""
    permissions = {str(r.get("id")): r.get("permission") for r in roles}
    out = []
    for user in users:
        permission = permissions.get(str(user.get("role")))
        if (user.get("active", True) and isinstance(permission, dict)
                and permission.get("super_user")):
            out.append(str(user.get("username")))
    return out


@dataclass(frozen=True)
class User:
    """An authenticated user and the permission map of their role."""

    username: str
    role: str
    permission: dict[str, Any]
    # The user row's ``__createdtime__``: a user dropped and added again under the
    # same name is another user (their jobs are not this one's).
    since: int = 0

    @property
    def super_user(self) -> bool:
        return bool(self.permission.get("super_user"))


def camel(name: str) -> str:
    """``cluster_status`` -> ``clusterStatus``, as Harper names operations in errors."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class LoginThrottle:
    """Failed logins per client address in a sliding window.

    After ``limit`` failures within ``window`` seconds from one address, every password
    check from it is refused with 429 until the oldest of those failures leaves the
    window. Refused attempts are not counted, so the block ends on time. Other
    addresses are never affected.
    """

    def __init__(self, limit: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def check(self, address: str) -> None:
        """Raise ``TooManyRequestsError`` if ``address`` must wait."""
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if times is not None and len(times) >= self.limit:
                wait = math.ceil(times[0] + self.window - now)
                raise TooManyRequestsError(
                    f"Too many failed logins from this address; retry in {max(1, wait)} "
                    "seconds", max(1, wait))

    def blocked(self, address: str) -> bool:
        """Whether ``address`` must wait (``check`` would raise); cheap when no address
        has failed lately (the login cache's hot path asks it on every request)."""
        if self.limit <= 0 or not self._failures:
            return False
        with self._lock:
            times = self._recent(address, self.clock())
            return times is not None and len(times) >= self.limit

    def failed(self, address: str) -> None:
        """Count one failed login from ``address``."""
        with self._lock:
            now = self.clock()
            if len(self._failures) > 10_000:  # forget the oldest addresses first
                for key in list(self._failures)[:1000]:
                    self._recent(key, now)
            times = self._recent(address, now) or self._failures.setdefault(address, deque())
            times.append(now)
            while len(times) > self.limit:
                times.popleft()


class _Flight:
    """One password check that concurrent logins with the same credentials wait for."""

    __slots__ = ("done", "user", "finished")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.user: User | None = None
        self.finished = False  # False once done: the check raised; each waiter checks alone


class Authenticator:
    """Checks Basic credentials against ``hdb_user`` and caches successful logins."""

    def __init__(self, storage: Storage, throttle: LoginThrottle | None = None) -> None:
        self.storage = storage
        self.throttle = throttle or LoginThrottle()
        # An unknown or inactive user is checked against this hash, so a wrong
        # username costs the same scrypt time as a wrong password (no enumeration).
        self._dummy_hash = hash_password("harpsync-no-such-user")
        self._cache: dict[str, User] = {}
        # Bumped whenever the ``system`` log grows: a login verified across a change to
        # the users or roles must not be cached with what it read before the change.
        # Commits that only move replication cursors add no log entry and keep the cache.
        self._generation = 0
        # Held while the generation moves with the cache cleared, and while a login is
        # cached against it: a change committing on the writer thread between the check
        # and the store could otherwise leave a revoked login cached.
        self._cache_lock = threading.Lock()
        # Called (from any thread) after ``generation`` grows: sessions that outlive a
        # request, such as a change feed, check their user again at once.
        self.listeners: list[Callable[[], None]] = []
        # Password checks running now, by canonical header and the generation read
        # before each began (see ``_verify_shared``).
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._flights_lock = threading.Lock()
        self._verifications = 0
        self._system_head = storage.database(SYSTEM).head_seq
        storage.database(SYSTEM).commit_listeners.append(self._invalidate)

    def _invalidate(self, head: int) -> None:
        # Any growth of the system log clears, not only entries naming hdb_user or
        # hdb_role. Narrowing it would save little: that log grows only with users,
        # roles, hdb_nodes (membership changes) and database create/drop (dead letters,
        # conflicts and cursors are not logged), replicated system changes clear anyway
        # (``Replicator.logins_changed``), and since checks are shared a clear costs one
        # hash per set of credentials in use, not one per request. And it would tie
        # revocation to every writer of those tables logging ``[table, ...]`` ops, with
        # the entries read here on the writer thread from the in-memory tail (an LMDB
        # read there, or a missed writer, would leave a revoked login cached).
        if head != self._system_head:
            self._system_head = head
            self.forget_logins()

    def forget_logins(self) -> None:
        """Drop every cached login (users or roles may have changed)."""
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()
        for listener in list(self.listeners):
            listener()

    @property
    def generation(self) -> int:
        """Grows with every change to ``system`` that may touch users or roles."""
        return self._generation

    def current(self, username: str) -> User | None:
        """``username`` as it stands now (role and permissions read again), or None if
        the user was dropped or deactivated. For sessions that outlive one request."""
        db, users = self.storage.table(SYSTEM, "hdb_user")
        found = get_by_ids(db, users, [username])
        record = found[0] if found else None
        if record is None or not record.get("active", True):
            return None
        return self._user(username, record)

    def cached(self, header: str | None, address: str = "") -> User | None:
        """The user of a recently verified ``Authorization`` header, without hashing;
        None while ``address`` is throttled (``authenticate`` then answers 429)."""
        if not header:
            return None
        user = self._cache.get(header)
        if user is not None and self.throttle.blocked(address):
            return None
        return user

    def authenticate(self, header: str | None, address: str = "") -> User:
        """Resolve an ``Authorization`` header to a user.

        Args:
            header: The ``Authorization`` header value.
            address: The client's address, for the failed-login throttle.

        Raises:
            UnauthorizedError: ``Must login`` without a header, ``Login failed`` otherwise.
            TooManyRequestsError: ``address`` failed too many logins recently.
        """
        if not header:
            raise UnauthorizedError("Must login")
        # A throttled address is refused before the cache too: else, while every wrong
        # guess from it got a cheap 429, a guess equal to a recently used password was
        # answered from the cache, so guessing went on at full speed, with no hash.
        self.throttle.check(address)
        cached = self._cache.get(header)
        if cached is not None:
            return cached
        try:
            creds = parse_authorization(header)
        except ValueError as exc:
            raise UnauthorizedError(str(exc) or "Invalid character") from None
        if creds is None:
            raise UnauthorizedError("Must login")
        # The same credentials spelled another way ("basic", two spaces) were verified:
        # no password hash, or every request of a user could cost one, 429 or not.
        canonical = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        generation = self._generation  # read before the cache: a change after it wins
        cached = self._cache.get(canonical)
        if cached is not None:
            self._remember(header, cached, generation)
            return cached
        generation = self._generation
        user = self._verify_shared(canonical, creds, generation)
        if user is None:
            self.throttle.failed(address)
            raise UnauthorizedError("Login failed")
        self._remember(header, user, generation)
        return user

    def _verify_shared(self, canonical: str, creds: tuple[str, str],
                       generation: int) -> User | None:
        """``check_password(*creds)``, run once for all concurrent callers that read the
        same ``generation``.

        After the cache is cleared, N clients logging in with the same header at once
        each ran scrypt (16 clients: 16 hashes at once, about a second of CPU on two
        cores, stalling every request). A caller joins a check only if it began at the
        generation the caller read: a change to users or roles after the check began
        bumped the generation, so a caller that could know of the change runs a check of
        its own (a stale result is never handed to it). Each caller still counts its own
        failure with the throttle; an unknown user's check costs the leader the same
        dummy hash as before, and its waiters as long.
        """
        key = (canonical, generation)
        with self._flights_lock:
            # Again under the lock: a check that just ended cached its login before it
            # left ``_flights``, so a caller arriving then hashes nothing.
            cached = self._cache.get(canonical)
            if cached is not None:
                return cached
            flight = self._flights.get(key)
            leading = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leading:
            flight.done.wait()
            if flight.finished:
                return flight.user
            return self.check_password(*creds)  # the leader's check raised
        try:
            flight.user = self.check_password(*creds)
            flight.finished = True
            if flight.user is not None:
                self._remember(canonical, flight.user, generation)
            return flight.user
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.done.set()

    @property
    def verifications(self) -> int:
        """Password checks (one scrypt each) run so far: logins that missed the cache."""
        return self._verifications

    def _remember(self, header: str, user: User, generation: int) -> None:
        """Cache a login verified at ``generation`` unless users changed since."""
        with self._cache_lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            if generation == self._generation:
                self._cache[header] = user

    def check_password(self, username: str, password: str) -> User | None:
        """The user for a username and password, or None (also for inactive users)."""
        with self._flights_lock:
            self._verifications += 1
        db, users = self.storage.table(SYSTEM, "hdb_user")
        found = get_by_ids(db, users, [username])
        record = found[0] if found else None
        if record is None or not record.get("active", True):
            verify_password(password, self._dummy_hash)  # same cost as a wrong password
            return None
        if not verify_password(password, str(record.get("password", ""))):
            return None
        return self._user(username, record)

    def _user(self, username: str, record: dict[str, Any]) -> User:
        since = record.get("__createdtime__")
        return User(username, str(record.get("role")), self.role_permission(record.get("role")),
                    int(since) if isinstance(since, int | float) else 0)

    def role_permission(self, role_id: Any) -> dict[str, Any]:
        db, roles = self.storage.table(SYSTEM, "hdb_role")
        found = get_by_ids(db, roles, [role_id]) if isinstance(role_id, str) else []
        if not found:
            return {}
        permission = found[0].get("permission")
        return permission if isinstance(permission, dict) else {}


def require_super(user: User, operation: str) -> None:
    """Raise Harper's 403 unless ``user`` is a super user."""
    if not user.super_user:
        raise ForbiddenError(
            [f"Operation '{camel(operation)}' is restricted to 'super_user' roles"])


def require_table(user: User, database: str, table: str, needed: list[str]) -> None:
    """Raise Harper's 403 unless the role grants ``needed`` on ``database.table``."""
    if user.super_user:
        return
    perms = user.permission.get(database, {})
    tables = perms.get("tables", {}) if isinstance(perms, dict) else {}
    table_perms = tables.get(table, {}) if isinstance(tables, dict) else {}
    missing = [p for p in needed if not (isinstance(table_perms, dict) and table_perms.get(p))]
    if missing:
        raise ForbiddenError([{
            "schema": database, "table": table,
            "required_table_permissions": missing, "required_attribute_permissions": [],
        }])

