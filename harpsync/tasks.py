"""Ending background tasks without swallowing the caller's cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def end_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have ended.

    A cancellation of the caller that arrives meanwhile is raised once they have ended,
    never absorbed: awaiting a cancelled task under ``suppress(BaseException)`` would
    swallow it (the caller's cancel goes to the task it awaits, and the task's
    ``CancelledError`` is then suppressed), and a link whose cancellation was swallowed
    keeps running while ``retire()`` waits for it forever, holding the reconcile lock.
    Their exceptions count as retrieved (the caller raised the one that mattered).
    """
    for task in tasks:
        task.cancel()
    cancelled = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    for task in tasks:
        if not task.cancelled():
            task.exception()
    if cancelled:
        raise asyncio.CancelledError


async def settle(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, without cancelling it; its outcome is dropped.

    For a worker thread's call (``asyncio.to_thread``): cancelling it would not stop the
    thread, only stop waiting for it, and the caller could then close what the thread
    still reads. A cancellation of the caller meanwhile is raised once it is done.
    """
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()
    if cancelled:
        raise asyncio.CancelledError


__all__ = ["end_tasks", "settle"]
