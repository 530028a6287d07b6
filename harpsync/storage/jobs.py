"""The node's job records (``hdb_job``): one small LMDB environment under ``<root>/jobs``.

Jobs belong to the node that runs them, so they live outside the replicated databases
and never travel to peers. A record is a plain dict keyed by its id. Finished records
are pruned by age and count (``prune``; the policy is :mod:`harpsync.jobs`'s).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from harpsync import codec

IN_PROGRESS = "IN_PROGRESS"
COMPLETE = "COMPLETE"
ERROR = "ERROR"


class JobStore:
    """Job records on disk.

    A ``put`` is in the file when it returns, so it survives the process dying; it is
    flushed to the disk (fsync, ~10 ms here) only when ``durable``: a job's start and
    end are, its progress (saved after every batch) is not, so a running job never
    stalls the event loop on an fsync. A power loss may take back the last progress.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        self.env = lmdb.Environment(str(path), map_size=1 << 30, max_dbs=1, subdir=True,
                                    sync=False, metasync=True, readahead=False, mode=0o600)

    def put(self, job: dict[str, Any], durable: bool = True) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(str(job["id"]).encode(), codec.pack(job))
        if durable:
            self.env.sync(True)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(job_id.encode())
        return codec.unpack(raw) if raw is not None else None

    def all(self) -> Iterator[dict[str, Any]]:
        with self.env.begin() as txn:
            rows = [codec.unpack(value) for _, value in txn.cursor()]
        yield from rows

    def interrupt_unfinished(self, message: str, now_ms: float) -> list[str]:
        """Mark every job still ``IN_PROGRESS`` (the node stopped under it) as failed."""
        changed = []
        with self.env.begin(write=True) as txn:
            for key, value in txn.cursor():
                job = codec.unpack(value)
                if job.get("status") == IN_PROGRESS:
                    job.update(status=ERROR, message=message, error=message,
                               end_datetime=now_ms, __updatedtime__=now_ms)
                    txn.put(key, codec.pack(job))
                    changed.append(str(job["id"]))
        self.env.sync(True)
        return changed

    def count(self) -> int:
        """How many records the store holds (running and finished)."""
        return int(self.env.stat()["entries"])

    def prune(self, ended_before_ms: float, keep: int) -> int:
        """Delete finished jobs that ended before ``ended_before_ms``, and the oldest
        finished ones beyond the newest ``keep``; a job in progress always stays.

        Returns:
            How many records were deleted.
        """
        with self.env.begin(write=True) as txn:
            finished: list[tuple[float, bytes]] = []
            for key, value in txn.cursor():
                job = codec.unpack(value)
                if job.get("status") == IN_PROGRESS:
                    continue
                ended = job.get("end_datetime") or job.get("start_datetime") or 0
                finished.append((float(ended), bytes(key)))
            finished.sort()
            excess = max(0, len(finished) - keep)
            doomed = [key for index, (ended, key) in enumerate(finished)
                      if index < excess or ended < ended_before_ms]
            for key in doomed:
                txn.delete(key)
        if doomed:
            self.env.sync(True)
        return len(doomed)

    @classmethod
    def open_or_reset(cls, path: Path) -> tuple[JobStore, Path | None]:
        """Open the store at ``path`` and read it whole; one that cannot be read (a power
        loss under an unflushed progress write) is set aside and a fresh one made: job
        history is not worth a node that will not start.

        Returns:
            The store, and where the unreadable one was moved (None if all was well).
        """
        try:
            store = cls(path)
        except lmdb.Error:
            pass
        else:
            try:
                for _ in store.all():
                    pass
                return store, None
            except Exception:
                store.close()
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        os.replace(path, aside)
        return cls(path), aside

    def close(self) -> None:
        self.env.close()
