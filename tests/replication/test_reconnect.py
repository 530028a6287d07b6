"""harpsync/replication/reconnect.py: backoff, the per-peer gate and error causes."""

from __future__ import annotations

import asyncio

import pytest

from harpsync.replication.reconnect import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    PeerGate,
    backoff_delay,
    describe_error,
)
from harpsync.tasks import end_tasks


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 5, 10, 60])
def test_backoff_stays_between_half_the_step_and_the_cap(failures):
    """The delay doubles from MIN_BACKOFF, is jittered down to half, and never passes
    MAX_BACKOFF, even after many failures."""
    step = min(MIN_BACKOFF * 2.0 ** max(0, failures - 1), MAX_BACKOFF)
    for _ in range(50):
        delay = backoff_delay(failures)
        assert step / 2 <= delay <= step <= MAX_BACKOFF


def test_backoff_survives_a_peer_that_stays_down_for_hours():
    """The failure count of a link to a dead peer grows without bound (about one a
    second): past 1,025 failures ``2.0 ** n`` overflowed, the link's task died with
    OverflowError and the link never dialed again."""
    for failures in (1025, 1100, 10**6):
        assert MAX_BACKOFF / 2 <= backoff_delay(failures) <= MAX_BACKOFF


async def test_gate_waits_until_the_peer_is_up():
    """A marked-down peer holds waiters until it is marked up again."""
    gate = PeerGate()
    gate.mark_down()
    waiter = asyncio.ensure_future(gate.wait_up(5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.mark_up()
    assert await waiter is True


async def test_gate_wait_gives_up_after_its_timeout():
    """Waiting on a peer that stays down returns False once the timeout passes."""
    gate = PeerGate()
    gate.mark_down()
    assert await gate.wait_up(0.01) is False


def test_describe_error_is_short_and_names_the_cause():
    """Refusals and timeouts get a plain cause; other errors keep their (clipped) text."""
    assert describe_error(ConnectionRefusedError()) == "connection refused"
    assert describe_error(TimeoutError()) == "timed out"
    assert describe_error(ValueError("x" * 500)) == "x" * 200
    assert describe_error(RuntimeError()) == "RuntimeError"


@pytest.mark.timeout(20)
async def test_end_tasks_never_absorbs_the_callers_cancellation():
    """A caller cancelled while it waits for its cancelled child tasks to end is
    cancelled once they have ended (seed 2 of the lifecycle test: a link that swallowed
    its cancellation kept running, and ``retire()`` waited for it forever)."""
    ending = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ending.set()
            await asyncio.sleep(0.05)  # cleanup that takes a while, as a link's does

    async def session() -> str:
        children = [asyncio.ensure_future(slow_to_end())]
        await asyncio.sleep(0)
        try:
            raise ConnectionError("the peer closed the link")
        finally:
            await end_tasks(children)

    async def link() -> str:
        while True:  # retries its session as Subscriber._run does
            try:
                await session()
            except ConnectionError:
                await asyncio.sleep(0)

    task = asyncio.ensure_future(link())
    await ending.wait()  # inside end_tasks: the child is still cleaning up
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert task in done and task.cancelled(), "the link swallowed its cancellation"
