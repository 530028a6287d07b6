"""Maintained table hashes (storage/digest.py) on real LMDB: they always equal a rebuild."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from harpsync import codec
from harpsync.errors import BadRequestError
from harpsync.storage import digest, digest_reads, retention, rowhash, writes
from harpsync.storage.keys import encode_id
from harpsync.storage.records import put_new_records, put_record, put_tombstone
from harpsync.storage.store import Storage
from harpsync.storage.writer import WriteContext

MAP_SIZE = 1 << 27




def buckets(storage: Storage, table: str = "dog") -> list[rowhash.Bucket]:
    db, t = storage.table("data", table)
    with db.env.begin() as txn:
        return digest_reads.buckets(txn, t)


def stored_top(storage: Storage, table: str = "dog") -> bytes:
    db, t = storage.table("data", table)
    with db.env.begin() as txn:
        return digest_reads.stored_top(txn, t)


def rebuilt(storage: Storage, table: str = "dog") -> list[rowhash.Bucket]:
    """The buckets a rebuild from the stored rows gives (computed, then rolled back)."""
    db, t = storage.table("data", table)
    txn = db.env.begin(write=True)
    try:
        digest.rebuild(txn, t)
        return digest_reads.buckets(txn, t)
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
    assert rowhash.top(current) != rowhash.ZERO
    assert stored_top(storage) == rowhash.top(current)


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
    assert buckets(storage) == [(b"", rowhash.ZERO)]


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


def test_hashes_exact_after_failed_and_multi_table_jobs(storage: Storage):
    """Bucket changes wait until the job commits: a job writing two tables of two
    databases leaves both exact, and the rows of a failed job leave no trace (its
    transaction is aborted and its pending rows are never hashed)."""
    async def run() -> None:
        await storage.create_table("data", "dog", "id")
        await storage.create_table("data", "cat", "id")
        await storage.create_table("other", "bird", "id")

        def both(ctx: WriteContext) -> None:
            for db_name, name in (("data", "dog"), ("data", "cat"), ("other", "bird")):
                db, table = storage.table(db_name, name)
                txn = ctx.txn(db)
                for i in range(400):
                    put_record(txn, table, encode_id(i), 1 + i, 0, {"id": i, "t": name})

        def failing(ctx: WriteContext) -> None:
            db, table = storage.table("data", "dog")
            txn = ctx.txn(db)
            for i in range(350, 900):
                put_record(txn, table, encode_id(i), 5000 + i, 0, {"id": i, "bad": True})
            raise BadRequestError("fails after writing")

        await storage.write(both)
        with pytest.raises(BadRequestError):
            await storage.write(failing)
        await storage.write(writes.write_records(storage, "data", "dog",
                                                 [{"id": i, "v": 2} for i in range(380, 420)],
                                                 "upsert", None))

    asyncio.run(run())
    dog = buckets(storage)
    assert len(dog) > 5 and dog == rebuilt(storage)
    assert buckets(storage, "cat") == rebuilt(storage, "cat")
    db, table = storage.table("data", "dog")
    with db.env.begin() as txn:  # the failed job ran alone, in the group's transaction
        assert txn.get(encode_id(899), db=table.dbi) is None
        assert codec.unpack(txn.get(encode_id(360), db=table.dbi))[2] == {"id": 360, "t": "dog"}
    db, bird = storage.table("other", "bird")
    with db.env.begin() as txn:
        kept = digest_reads.buckets(txn, bird)
    txn = db.env.begin(write=True)
    try:
        digest.rebuild(txn, bird)
        assert kept == digest_reads.buckets(txn, bird)
    finally:
        txn.abort()


def test_a_job_reading_its_own_buckets_sees_its_writes(storage: Storage):
    """Reading the buckets inside the writing transaction hashes its pending rows first."""
    async def run() -> tuple[list[rowhash.Bucket], list[rowhash.Bucket]]:
        await storage.create_table("data", "dog", "id")

        def job(ctx: WriteContext) -> tuple[list[rowhash.Bucket], list[rowhash.Bucket]]:
            db, table = storage.table("data", "dog")
            txn = ctx.txn(db)
            for i in range(300):
                put_record(txn, table, encode_id(i), 1 + i, 0, {"id": i})
            seen = digest_reads.buckets(txn, table)
            child = db.env.begin(write=True, parent=txn)
            try:
                digest.rebuild(child, table)
                return seen, digest_reads.buckets(child, table)
            finally:
                child.abort()

        return await storage.write(job)

    seen, expected = asyncio.run(run())
    assert len(seen) > 3 and seen == expected


def test_runs_of_new_keys_in_gaps_stay_exact(storage: Storage):
    """Batches of increasing new ids written into gaps between stored ids (out of order,
    as concurrent clients send them), appends, and jobs that mix such runs with
    overwrites, deletes and new tombstones of keys inside and after the run leave the
    same buckets as a rebuild after every job."""
    rng = random.Random(11)
    db_table = ("data", "dog")

    def mixed(ctx: WriteContext, lo: int, hi: int, step: int) -> None:
        db, table = storage.table(*db_table)
        txn = ctx.txn(db)
        for i in range(lo, hi, step):
            put_record(txn, table, encode_id(i), (1 << 40) + i, 0, {"id": i, "m": 1})
            if i % 7 == 0:  # an overwrite of a stored key just past the run
                j = hi + rng.randrange(0, 40)
                put_record(txn, table, encode_id(j), 20_000_000 + i, 0, {"id": j, "o": i})
            if i % 11 == 0:  # a new tombstone inside the gap, then the run goes on
                put_tombstone(txn, table, encode_id(i + step // 2 or i + 1),
                              30_000_000 + i, 0)

    async def run() -> None:
        await storage.create_table(*db_table, "id")
        # Sparse stored ids first, so that later batches land in gaps between them.
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": i * 1000} for i in range(40)], "insert", None))
        starts = list(range(0, 40_000, 500))
        rng.shuffle(starts)
        for n, first in enumerate(starts[:30]):
            if n % 5 == 4:
                lo = first + 1
                await storage.write(lambda ctx, lo=lo: mixed(ctx, lo, lo + 400, 3))
            else:
                records = [{"id": i} for i in range(first + 1, first + 1 + rng.randrange(2, 480))]
                await storage.write(writes.write_records(storage, *db_table, records,
                                                         "upsert", None))
            assert buckets(storage) == rebuilt(storage), f"after job {n}"
            assert stored_top(storage) == rowhash.top(buckets(storage)), f"after job {n}"
        # Appends past every stored id, a duplicate id inside one request, and a
        # decreasing batch.
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": 50_000 + i} for i in range(300)] + [{"id": 50_010}],
            "upsert", None))
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": 60_000 - i} for i in range(300)], "insert", None))
        # New ids in increasing order around stored ones and a tombstone: not one run.
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": 70_000 + 2 * i} for i in range(200)], "insert", None))
        await storage.write(writes.delete_records(storage, *db_table, [70_100], None))
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": 70_001 + 2 * i} for i in range(200)], "insert", None))
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": 70_099}, {"id": 70_101}], "insert", None))

    asyncio.run(run())
    current = buckets(storage)
    assert len(current) > 100
    assert current == rebuilt(storage)
    assert stored_top(storage) == rowhash.top(current)


def test_scattered_batches_of_new_keys_stay_exact(storage: Storage):
    """Batches of new ids in random order among stored ids (hashed together in key
    order, a boundary among them splitting its bucket while the batch's later rows are
    stored but not hashed yet), alone, after a run in the same transaction, and before
    overwrites and deletes of their own rows, leave the same buckets as a rebuild."""
    rng = random.Random(5)
    db_table = ("data", "dog")
    taken: set[int] = set()

    def fresh(count: int) -> list[int]:
        ids = rng.sample([i for i in range(60_000) if i not in taken], count)
        taken.update(ids)
        return ids

    def job(ctx: WriteContext, run: list[int], scattered: list[int], then: bool) -> None:
        db, table = storage.table(*db_table)
        txn = ctx.txn(db)
        for ids in (run, scattered):
            if ids:
                keys = [encode_id(i) for i in ids]
                raws = [codec.pack([(1 << 40) + i, 0, {"id": i}]) for i in ids]
                put_new_records(txn, table, keys, raws)
        if then:  # overwrite and delete rows of the batch just hashed
            for i in scattered[::5]:
                put_record(txn, table, encode_id(i), (1 << 41) + i, 0, {"id": i, "o": 1})
            for i in scattered[1::7]:
                put_tombstone(txn, table, encode_id(i), (1 << 41) + i, 0)

    async def run() -> None:
        await storage.create_table(*db_table, "id")
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": i} for i in fresh(3000)], "insert", None))
        for n in range(24):
            first = 100_000 + n * 1000
            run_ids = list(range(first, first + rng.randrange(0, 300))) if n % 3 else []
            scattered = fresh(rng.randrange(1, 400))
            await storage.write(lambda ctx, r=run_ids, s=scattered, t=n % 4 == 3:
                                job(ctx, r, s, t))
            assert buckets(storage) == rebuilt(storage), f"after job {n}"
            assert stored_top(storage) == rowhash.top(buckets(storage)), f"after job {n}"
        # Through the insert path too: records in random order (ids of one version).
        await storage.write(writes.write_records(
            storage, *db_table, [{"id": i} for i in fresh(450)], "insert", None))

    asyncio.run(run())
    current = buckets(storage)
    assert len(current) > 100
    assert current == rebuilt(storage)
    assert stored_top(storage) == rowhash.top(current)


def test_hashes_of_another_layout_are_rebuilt_on_open(tmp_path: Path):
    """Hashes marked with an older row-digest layout (a store from the previous release)
    are recomputed when the database opens, top hash included."""
    store = Storage(tmp_path, "node-a", MAP_SIZE)
    store.open()

    async def run() -> None:
        await store.create_table("data", "dog", "id")
        await store.write(writes.write_records(store, "data", "dog",
                                               [{"id": i} for i in range(300)], "insert", None))

    asyncio.run(run())
    expected = buckets(store)
    db, t = store.table("data", "dog")
    with db.env.begin(write=True) as txn:
        txn.put(digest.MARK, b"1", db=t.digest.dbi)
        txn.put(digest.BUCKET, rowhash.ZERO, db=t.digest.dbi)  # as layout 1 would differ
        txn.delete(digest.TOP, db=t.digest.dbi)
    store.close()
    store = Storage(tmp_path, "node-a", MAP_SIZE)
    store.open()
    try:
        assert buckets(store) == expected
        assert stored_top(store) == rowhash.top(expected)
        db, t = store.table("data", "dog")
        with db.env.begin() as txn:
            assert txn.get(digest.MARK, db=t.digest.dbi) == str(rowhash.FORMAT).encode()
    finally:
        store.close()


async def test_local_system_rows_deleted_outright_keep_hashes_exact(storage: Storage):
    """Dead letters and conflicts are deleted without a tombstone (never logged); the
    hashes of their table still equal a rebuild."""
    from harpsync.storage.conflicts import system_delete, system_put
    from harpsync.storage.deadletters import DEAD_LETTERS

    def put(ctx: WriteContext) -> None:
        for i in range(40):
            system_put(ctx, storage, DEAD_LETTERS, {"id": f"row-{i}", "n": i})

    await storage.write(put)
    await storage.write(lambda ctx: system_delete(ctx, storage, DEAD_LETTERS,
                                                  [f"row-{i}" for i in range(0, 40, 3)]))
    system = storage.databases["system"]
    table = system.tables[DEAD_LETTERS]
    txn = system.env.begin(write=True)
    try:
        kept = digest_reads.buckets(txn, table)
        digest.rebuild(txn, table)
        assert kept == digest_reads.buckets(txn, table)
    finally:
        txn.abort()
