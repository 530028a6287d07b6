"""Maintained table hashes (storage/digest.py) on real LMDB: they always equal a rebuild."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpsync.storage import digest, retention, writes
from harpsync.storage.store import Storage

MAP_SIZE = 1 << 27


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    opened = Storage(tmp_path, "node-a", MAP_SIZE)
    opened.open()
    yield opened
    opened.close()


def buckets(storage: Storage, table: str = "dog") -> list[digest.Bucket]:
    db, t = storage.table("data", table)
    with db.env.begin() as txn:
        return digest.buckets(txn, t)


def rebuilt(storage: Storage, table: str = "dog") -> list[digest.Bucket]:
    """The buckets a rebuild from the stored rows gives (computed, then rolled back)."""
    db, t = storage.table("data", table)
    txn = db.env.begin(write=True)
    try:
        digest.rebuild(txn, t)
        return digest.buckets(txn, t)
    finally:
        txn.abort()


def test_maintained_hashes_equal_a_rebuild_under_random_writes(storage: Storage):
    """Random inserts, updates, deletes, re-inserts and tombstone pruning leave the same
    buckets (splits and merges included) as hashing the stored rows from scratch."""
    rng = random.Random(7)

    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        for _ in range(60):
            ids = [rng.randrange(3000) for _ in range(rng.randrange(1, 80))]
            kind = rng.random()
            if kind < 0.6:
                job = writes.write_records(storage, "data", "dog",
                                           [{"id": i, "v": rng.random()} for i in ids],
                                           "upsert", None)
            else:
                job = writes.delete_records(storage, "data", "dog", ids, None)
            await storage.write(job)
        db, _ = storage.table("data", "dog")
        # Prune about half of the tombstones (those older than a version in the middle).
        cut = storage.hlc.now()
        await storage.write(writes.write_records(storage, "data", "dog",
                                                 [{"id": 5000 + i} for i in range(50)],
                                                 "insert", None))
        await storage.write(writes.delete_records(storage, "data", "dog",
                                                  list(range(5000, 5050)), None))
        await storage.write(retention.prune_log_job(db, 0, cut))

    asyncio.run(run())
    current = buckets(storage)
    assert len(current) > 10  # several buckets, so splits happened
    assert current == rebuilt(storage)
    assert digest.top(current) != digest.ZERO


def test_same_rows_same_top_hash_whatever_the_order(tmp_path: Path):
    """Two stores given the same final rows in a different write order agree on every
    bucket (the hash depends on what is stored, not on how it got there)."""
    rows = [{"id": f"k{i}", "n": i} for i in range(500)]
    tops = []
    for index, order in enumerate((rows, list(reversed(rows)))):
        store = Storage(tmp_path / str(index), "node-a", MAP_SIZE)
        store.open()

        async def run(s: Storage = store, o: list = order) -> None:
            await s.create_table("data", "dog", "id")
            for i in range(0, len(o), 50):
                await s.write(writes.write_records(s, "data", "dog", o[i:i + 50], "insert",
                                                   None))

        asyncio.run(run())
        tops.append(buckets(store))
        store.close()
    # Versions differ between the two stores, so compare the bucket boundaries only.
    assert [start for start, _ in tops[0]] == [start for start, _ in tops[1]]


def test_drop_and_recreate_starts_empty(storage: Storage):
    """Dropping a table forgets its hashes; the new incarnation starts from zero."""
    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        await storage.write(writes.write_records(storage, "data", "dog",
                                                 [{"id": i} for i in range(300)], "insert",
                                                 None))
        await storage.drop_table("data", "dog")
        await storage.create_table("data", "dog", "id")

    asyncio.run(run())
    assert buckets(storage) == [(b"", digest.ZERO)]


def test_reopen_rebuilds_tables_without_hashes(tmp_path: Path):
    """A table whose hashes are missing (written before maintenance existed) is hashed
    when its database opens."""
    store = Storage(tmp_path, "node-a", MAP_SIZE)
    store.open()

    async def run() -> None:
        await store.create_table("data", "dog", "id")
        await store.write(writes.write_records(store, "data", "dog",
                                               [{"id": i} for i in range(200)], "insert", None))

    asyncio.run(run())
    expected = buckets(store)
    db, t = store.table("data", "dog")
    with db.env.begin(write=True) as txn:
        digest.clear(txn, t)
    store.close()
    store = Storage(tmp_path, "node-a", MAP_SIZE)
    store.open()
    try:
        assert buckets(store) == expected
    finally:
        store.close()
