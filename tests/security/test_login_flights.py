"""Concurrent logins with the same credentials share one password check (single-flight),
without giving up what the login cache guarantees: a change to users or roles takes
effect at once, and every failed login counts against its address."""

from __future__ import annotations

import base64
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from harpsync.errors import UnauthorizedError
from tests.helpers import ADMIN, wait_for

CLIENTS = 16


def _header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _all_at_once(node: Any, auth: tuple[str, str], clients: int = CLIENTS,
                 operation: str = "user_info") -> list[int]:
    """``clients`` requests with the same login, released together; their statuses."""
    barrier = threading.Barrier(clients)

    def one(_: int) -> int:
        with httpx.Client(timeout=60) as client:
            client.get(node.url + "health")  # connected before the barrier
            barrier.wait()
            return client.post(node.url, json={"operation": operation},
                               auth=auth).status_code

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def _scraped(node: Any, name: str) -> float:
    text = node.client.get(node.url + "metrics", auth=ADMIN).text
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.timeout(120)
def test_concurrent_cold_logins_run_one_password_check(node_factory):
    """16 clients logging in at once with the same header right after the login cache
    was cleared (a write to ``system``) cost one scrypt, not 16; the count is exported
    as ``harpsync_login_verifications_total``."""
    a = node_factory("node-a")
    a.call("add_user", username="bob", password="bob-pw", role="super_user", active=True)
    auth = a.node.auth
    assert _scraped(a, "harpsync_login_verifications_total") == auth.verifications
    for _ in range(3):
        a.call("add_role", role=f"clears-the-cache-{_}", permission={})
        before = auth.verifications
        assert _all_at_once(a, ("bob", "bob-pw")) == [200] * CLIENTS
        assert auth.verifications - before == 1
    assert _scraped(a, "harpsync_login_verifications_total") == auth.verifications


@pytest.mark.timeout(120)
def test_concurrent_failed_logins_each_count_against_the_address(node_factory):
    """Ten wrong passwords sent at once share password checks but are ten failures:
    the address is throttled after them as after ten sent one by one."""
    a = node_factory("node-a")
    assert _all_at_once(a, ("admin", "guess"), clients=10) == [401] * 10
    blocked = a.post({"operation": "user_info"}, auth=ADMIN)
    assert blocked.status_code == 429, blocked.text


@pytest.mark.timeout(120)
def test_a_change_during_a_check_is_not_missed_by_later_logins(node_factory, monkeypatch):
    """A password check is under way when bob's password changes: a login with the old
    password that arrives after the change runs its own check (refused), rather than
    sharing the one that read bob's old hash; and nothing stale is cached."""
    a = node_factory("node-a")
    a.call("add_user", username="bob", password="old-pw", role="super_user", active=True)
    auth = a.node.auth
    a.call("user_info")  # admin's login cached: no scrypt for the alter_user below
    entered, release = threading.Event(), threading.Event()
    real = hashlib.scrypt
    hold = [True]

    def held(*args: Any, **kwargs: Any) -> bytes:
        if hold[0]:
            hold[0] = False
            entered.set()
            release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", held)
    old = _header("bob", "old-pw")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(auth.authenticate, old, "127.0.0.1")
        assert entered.wait(30)
        a.call("alter_user", username="bob", password="new-pw")
        later = pool.submit(auth.authenticate, old, "127.0.0.1")
        wait_for(lambda: auth.verifications >= 2, timeout=30,
                 message="the later login runs a check of its own")
        release.set()
        with pytest.raises(UnauthorizedError):
            later.result(30)
        first.result(30)  # began before the change: either answer is a valid order
    with pytest.raises(UnauthorizedError):
        auth.authenticate(old, "127.0.0.1")
    assert auth.authenticate(_header("bob", "new-pw"), "127.0.0.1").username == "bob"


@pytest.mark.timeout(120)
def test_password_and_role_changes_take_effect_at_once_after_shared_checks(node_factory):
    """Logins verified by a shared check are cached, and still dropped at once by a
    password change (old one refused, new one accepted) and a role change (403)."""
    a = node_factory("node-a")
    a.call("add_role", role="reader", permission={"super_user": False})
    a.call("add_user", username="bob", password="old-pw", role="super_user", active=True)
    assert _all_at_once(a, ("bob", "old-pw")) == [200] * CLIENTS
    a.call("alter_user", username="bob", password="new-pw")
    assert _all_at_once(a, ("bob", "old-pw"), clients=8) == [401] * 8  # 10 are throttled
    assert _all_at_once(a, ("bob", "new-pw")) == [200] * CLIENTS
    assert _all_at_once(a, ("bob", "new-pw"), operation="list_users") == [200] * CLIENTS
    a.call("alter_user", username="bob", role="reader")
    assert _all_at_once(a, ("bob", "new-pw"), operation="list_users") == [403] * CLIENTS
