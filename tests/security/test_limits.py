"""The login throttle and the rate limiter over time (a clock the test moves)."""

from __future__ import annotations

import base64
import json

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from harpsync.app import RateLimiter
from harpsync.auth import LoginThrottle
from harpsync.errors import TooManyRequestsError
from tests.helpers import ADMIN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_throttle_blocks_until_the_window_passes():
    clock = Clock()
    throttle = LoginThrottle(limit=10, window=60, clock=clock)
    for _ in range(10):
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
        clock.now += 1
    with pytest.raises(TooManyRequestsError) as err:
        throttle.check("10.0.0.1")
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "50"
    # Every 429 has the same body: code and retry_after_seconds (seed 000 section 7.3).
    body = err.value.body()
    assert body["code"] == "RATE_LIMIT_EXCEEDED" and body["retry_after_seconds"] == 50
    throttle.check("10.0.0.2")  # another address is not affected
    clock.now += 49
    with pytest.raises(TooManyRequestsError):
        throttle.check("10.0.0.1")
    clock.now += 1  # the first failure leaves the window
    throttle.check("10.0.0.1")
    throttle.failed("10.0.0.1")  # one more failure fills the window again
    with pytest.raises(TooManyRequestsError):
        throttle.check("10.0.0.1")


def test_rate_limiter_refills_at_the_configured_rate():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    assert limiter.take("ann")["X-RateLimit-Remaining"] == "1"
    assert limiter.take("ann")["X-RateLimit-Remaining"] == "0"
    with pytest.raises(TooManyRequestsError) as err:
        limiter.take("ann")
    body = err.value.body()
    assert body["code"] == "RATE_LIMIT_EXCEEDED" and body["retry_after_seconds"] == 1
    assert err.value.headers["X-RateLimit-Limit"] == "60"
    assert limiter.take("bob")["X-RateLimit-Remaining"] == "1"  # per user
    clock.now += 1  # one token back
    assert limiter.take("ann")["X-RateLimit-Remaining"] == "0"
    assert not RateLimiter(per_minute=0, burst=10).enabled  # off by default


@pytest.mark.timeout(60)
def test_the_change_feed_takes_from_the_same_rate_budget(node_factory):
    """Opening ``/changes`` is a request of its user: over the limit the upgrade is
    refused with 429, RATE_LIMIT_EXCEEDED and Retry-After, like ``POST /``."""
    a = node_factory("node-a", env={"OPERATIONSAPI_RATELIMIT_REQUESTSPERMINUTE": "1",
                                    "OPERATIONSAPI_RATELIMIT_BURST": "2"})
    a.call("create_table", table="dog", primary_key="id")  # the first token
    login = base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
    headers = {"Authorization": f"Basic {login}"}
    url = f"ws://127.0.0.1:{a.ops_port}/changes"
    with connect(url, additional_headers=headers, proxy=None, open_timeout=30) as ws:
        ws.send(json.dumps({"action": "subscribe", "database": "data"}))
        assert json.loads(ws.recv(timeout=30))["action"] == "subscribed"  # the second
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=headers, proxy=None, open_timeout=30)
    response = refused.value.response
    assert response.status_code == 429
    body = json.loads(response.body)
    assert body["code"] == "RATE_LIMIT_EXCEEDED" and body["retry_after_seconds"] >= 1
    assert int(response.headers["Retry-After"]) == body["retry_after_seconds"]
    assert a.post({"operation": "describe_all"}).status_code == 429  # one budget
