"""Storage on real LMDB in tmp_path: HLC, key order, group commit, the log, tombstones."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from harpsync import codec
from harpsync.errors import BadRequestError
from harpsync.storage import reads, writes
from harpsync.storage.database import LOCAL_ORIGIN, Database
from harpsync.storage.hlc import COUNTER_BITS, HLC, first_version_at, version_to_ms, wall_ms_of
from harpsync.storage.keys import decode_id, encode_id, seq_key, seq_of
from harpsync.storage.records import get_stored
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import WriteContext

MAP_SIZE = 1 << 27




def log_entries(db: Database) -> list[tuple[int, list[Any]]]:
    """Every ``(seq, [origin, version, user, ops])`` in a database's transaction log."""
    return [(seq, codec.unpack(raw)) for seq, raw in db.log_after(0, 1_000_000)]


async def insert(storage: Storage, records: list[dict[str, Any]], table: str = "dog",
                 mode: str = "insert") -> dict[str, Any]:
    job = writes.write_records(storage, "data", table, records, mode, "tester")
    result: dict[str, Any] = await storage.write(job)
    return result


# -- HLC --------------------------------------------------------------------------------
def test_hlc_strictly_increasing():
    """Every now() is greater than the one before, even many within one millisecond."""
    clock = HLC()
    versions = [clock.now() for _ in range(10_000)]
    assert all(b > a for a, b in zip(versions, versions[1:], strict=False))


def test_hlc_packs_wall_milliseconds():
    """A version holds wall-clock milliseconds above a 16-bit counter."""
    import time

    before = int(time.time() * 1000)
    version = HLC().now()
    after = int(time.time() * 1000)
    assert before <= wall_ms_of(version) <= after
    assert version_to_ms(version) == pytest.approx(version / (1 << COUNTER_BITS))


def test_first_version_at_splits_at_the_fraction_of_a_millisecond():
    """Versions below ``first_version_at(ms)`` read as earlier than ``ms``; it itself does
    not (a cutoff of 1000.5 ms keeps the versions of the millisecond's second half)."""
    for ms in (1000.0, 1000.5, 1000.25 + 1 / (1 << COUNTER_BITS)):
        first = first_version_at(ms)
        assert version_to_ms(first - 1) < ms <= version_to_ms(first)
    assert wall_ms_of(first_version_at(1000.5)) == 1000


def test_hlc_observe_moves_forward():
    """After observing a version ahead within the skew bound, now() is past it."""
    clock = HLC(max_skew_ms=60_000)
    ahead = clock.now() + (30_000 << COUNTER_BITS)
    clock.observe(ahead)
    first = clock.now()
    assert first > ahead
    assert clock.now() > first


def test_hlc_ignores_versions_beyond_the_skew_bound():
    """A version an hour ahead neither moves the clock nor passes check()."""
    from harpsync.storage.hlc import ClockSkewError

    clock = HLC(max_skew_ms=60_000)
    ahead = clock.now() + (3_600_000 << COUNTER_BITS)
    clock.observe(ahead)
    assert clock.now() < ahead
    with pytest.raises(ClockSkewError, match="maxClockSkew"):
        clock.check(ahead)
    clock.check(clock.now() + (1000 << COUNTER_BITS))


def test_hlc_now_after_beats_a_future_floor_and_later_versions_follow_it():
    """A local write over a version past the skew bound gets floor + 1, and this node's
    later versions rank after it (its own versions only rise)."""
    clock = HLC(max_skew_ms=60_000)
    floor = clock.now() + (3_600_000 << COUNTER_BITS)
    assert clock.now_after(floor) == floor + 1
    assert clock.now() > floor + 1
    near = clock.now() + (1000 << COUNTER_BITS)
    assert clock.now_after(near) == near + 1
    assert clock.now() > near + 1


def test_hlc_offset_shifts_the_wall_clock():
    """The test offset moves versions by that many milliseconds."""
    import time

    clock = HLC(offset_ms=120_000)
    assert wall_ms_of(clock.now()) >= int(time.time() * 1000) + 119_000


def test_hlc_observe_older_version_is_ignored():
    """Observing an older version never moves the clock back."""
    clock = HLC()
    latest = clock.now()
    clock.observe(latest - 1000)
    assert clock.now() > latest


def test_hlc_ahead_of_wall_clock_counts_up():
    """A clock whose last version is ahead of the wall clock keeps counting from it."""
    ahead = (HLC().now() >> COUNTER_BITS) + 10_000 << COUNTER_BITS
    clock = HLC(last=ahead)
    assert [clock.now() for _ in range(3)] == [ahead + 1, ahead + 2, ahead + 3]


def test_hlc_thread_safe():
    """Versions taken from many threads at once are all distinct."""
    clock = HLC()
    seen: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [clock.now() for _ in range(2000)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == len(seen) == 16_000


# -- keys -------------------------------------------------------------------------------
INTS = [0, 1, -1, 2, -2, 255, 256, -255, -256, 10**6, -(10**6), 2**31, -(2**31), 2**32 + 1,
        2**53, -(2**53), 2**63 - 1, -(2**63), 2**63, 2**64 - 1]


def test_int_keys_sort_numerically():
    """Encoded integers, negative and large, sort in numeric order as bytes."""
    assert sorted(INTS, key=encode_id) == sorted(INTS)


def test_string_keys_sort_by_code_point():
    """Encoded strings sort as their UTF-8 bytes (code point order)."""
    strings = ["", "a", "B", "ab", "b", "é", "z", "Z0", "10", "9", "a\x00", "日本"]
    assert sorted(strings, key=encode_id) == sorted(strings, key=lambda s: s.encode())


def test_keys_round_trip():
    """decode_id inverts encode_id for ints, floats and strings."""
    for value in [*INTS, 1.5, -0.25, 1e300, "rex", "", "日本"]:
        assert decode_id(encode_id(value)) == value


def test_integral_float_is_the_same_key_as_int():
    """1.0 and 1 are the same primary key, as in JSON."""
    assert encode_id(1.0) == encode_id(1)
    assert encode_id(-3.0) == encode_id(-3)


@pytest.mark.parametrize("value", [True, None, [1], {"a": 1}, 2**64, -(2**63) - 1, "x" * 501])
def test_unstorable_keys_rejected(value):
    """Booleans, null, containers, integers beyond 64 bits and long strings are refused."""
    with pytest.raises(BadRequestError):
        encode_id(value)


def test_seq_keys_sort_numerically():
    """Log sequence keys are big-endian, so byte order is sequence order."""
    seqs = [1, 2, 255, 256, 65_536, 2**40]
    assert sorted(seqs, key=seq_key) == seqs
    assert [seq_of(seq_key(s)) for s in seqs] == seqs


async def test_scan_returns_primary_key_order(storage):
    """A table scan on real LMDB returns records in numeric primary-key order."""
    await storage.create_table("data", "dog", "id")
    ids = [5, -3, 2**40, -(2**40), 0, 12, 2**63 - 1, -(2**63)]
    await insert(storage, [{"id": i} for i in ids])
    db, table = storage.table("data", "dog")
    assert [r["id"] for r in reads.scan(db, table)] == sorted(ids)


async def test_scan_streams_past_one_chunk(storage):
    """A scan larger than one read chunk returns every record once, in order."""
    await storage.create_table("data", "dog", "id")
    count = reads.SCAN_CHUNK * 2 + 17
    await insert(storage, [{"id": i} for i in range(count)])
    db, table = storage.table("data", "dog")
    assert [r["id"] for r in reads.scan(db, table)] == list(range(count))


# -- the writer ----------------------------------------------------------------------------
async def test_group_commit_shares_commits(storage):
    """200 concurrent single-record inserts are committed in fewer commits than jobs."""
    await storage.create_table("data", "dog", "id")
    commits, jobs = storage.writer.commits, storage.writer.jobs
    results = await asyncio.gather(*(insert(storage, [{"id": i}]) for i in range(200)))
    assert all(r["inserted_hashes"] == [i] for i, r in enumerate(results))
    new_commits, new_jobs = storage.writer.commits - commits, storage.writer.jobs - jobs
    assert new_jobs == 200
    assert new_commits < new_jobs
    db, table = storage.table("data", "dog")
    assert db.table_size(table)[0] == 200


def _thread_of(storage: Storage, rid: int, threads: list[str]) -> Any:
    """An insert job of ``[{"id": rid}]`` that notes which thread ran it."""
    inner = writes.write_records(storage, "data", "dog", [{"id": rid}], "insert", None)

    def job(ctx: WriteContext) -> Any:
        threads.append(threading.current_thread().name)
        return inner(ctx)

    return job


async def _lone_small_writes(storage: Storage, ids: range, threads: list[str]) -> None:
    for rid in ids:
        await storage.write(_thread_of(storage, rid, threads), small=True)


async def test_lone_small_writes_commit_on_the_event_loop(tmp_path):
    """Once single-job groups follow each other, a small write commits on the event loop
    (no hand-over to the writer thread and back), durably, and a big one never does."""
    storage = Storage(tmp_path, "node-a", MAP_SIZE)
    storage.open()
    try:
        await storage.create_table("data", "dog", "id")
        threads: list[str] = []
        await _lone_small_writes(storage, range(10), threads)
        assert threads[-1] == threading.current_thread().name  # the event loop's
        assert storage.writer.inline_groups > 0
        big: list[str] = []
        await storage.write(_thread_of(storage, 100, big))  # not vouched small
        assert big == ["harpsync-writer"]
    finally:
        storage.close()
    reopened = Storage(tmp_path, "node-a", MAP_SIZE)
    reopened.open()
    try:
        db, table = reopened.table("data", "dog")
        assert [r["id"] for r in reads.scan(db, table)] == [*range(10), 100]
        assert len(log_entries(db)) >= 11
    finally:
        reopened.close()


async def test_small_write_waits_for_queued_jobs(storage):
    """A small write never overtakes jobs already handed to the writer thread: it
    queues behind them and runs there, in order."""
    await storage.create_table("data", "dog", "id")
    await _lone_small_writes(storage, range(10), [])
    order: list[str] = []
    gate = threading.Event()

    def hold(ctx: WriteContext) -> str:
        gate.wait(30)
        order.append("hold")
        return "held"

    held = storage.writer.submit(hold)
    await asyncio.sleep(0)  # the hold is handed over (and running) before the next write
    threads: list[str] = []
    small = asyncio.ensure_future(storage.write(_thread_of(storage, 50, threads), small=True))
    await asyncio.sleep(0.05)
    assert not small.done()
    gate.set()
    assert await held == "held"
    assert (await small)["inserted_hashes"] == [50]
    assert order == ["hold"] and threads == ["harpsync-writer"]


async def test_small_writes_stay_in_the_thread_while_other_requests_come(storage):
    """While other requests begin between writes (readers served while a lone client
    writes), small writes commit in the writer thread: the loop keeps serving them."""
    await storage.create_table("data", "dog", "id")
    begun = [0]

    def activity() -> int:
        return begun[0]

    storage.writer.activity = activity
    threads: list[str] = []
    for rid in range(10):
        begun[0] += 2  # this write's request, and a reader's
        await storage.write(_thread_of(storage, rid, threads), small=True)
    assert set(threads) == {"harpsync-writer"}
    quiet: list[str] = []
    for rid in range(10, 20):
        begun[0] += 1  # only the write's own request
        await storage.write(_thread_of(storage, rid, quiet), small=True)
    assert quiet[-1] == threading.current_thread().name


async def test_concurrent_small_writes_share_group_commits(storage):
    """Many small writes at once still go to the writer thread and share commits."""
    await storage.create_table("data", "dog", "id")
    await _lone_small_writes(storage, range(10), [])
    commits, jobs = storage.writer.commits, storage.writer.jobs
    threads: list[str] = []
    await asyncio.gather(*(storage.write(_thread_of(storage, 100 + i, threads), small=True)
                           for i in range(100)))
    assert storage.writer.jobs - jobs == 100
    assert storage.writer.commits - commits < 100
    assert set(threads) == {"harpsync-writer"}


async def test_failing_job_aborts_alone(storage):
    """In one group, a job that fails half-way leaves no trace; the others commit."""
    await storage.create_table("data", "dog", "id")
    db, table = storage.table("data", "dog")
    head = db.head_seq
    gate = threading.Event()

    def hold(ctx: WriteContext) -> str:
        gate.wait(30)  # keeps the writer busy so the next jobs queue into one group
        return "held"

    held = storage.writer.submit(hold)
    commits = storage.writer.commits
    good_before = storage.writer.submit(
        writes.write_records(storage, "data", "dog", [{"id": 1}], "insert", None))
    # Writes id 2, then fails on a boolean primary key: the whole job must roll back.
    bad = storage.writer.submit(
        writes.write_records(storage, "data", "dog", [{"id": 2, "new_attr": 1}, {"id": True}],
                             "insert", None))
    good_after = storage.writer.submit(
        writes.write_records(storage, "data", "dog", [{"id": 3}], "insert", None))
    gate.set()
    assert await held == "held"
    assert (await good_before)["inserted_hashes"] == [1]
    with pytest.raises(BadRequestError):
        await bad
    assert (await good_after)["inserted_hashes"] == [3]
    assert storage.writer.commits - commits <= 2  # the hold's group, then one for the rest
    assert [r["id"] for r in reads.scan(db, table)] == [1, 3]
    assert "new_attr" not in table.attributes
    entries = log_entries(db)
    assert [seq for seq, _ in entries if seq > head] == [head + 1, head + 2]
    assert [entry[3][0][2] for seq, entry in entries if seq > head] == [1, 3]


async def test_failing_schema_job_rolls_back_catalog(storage):
    """A create_table that fails leaves the catalog as it was."""
    await storage.create_table("data", "dog", "id")
    with pytest.raises(BadRequestError):
        await storage.create_table("data", "dog", "id")
    assert list(storage.database("data").tables) == ["dog"]


# -- the transaction log ------------------------------------------------------------------
async def test_each_write_appends_one_log_entry(storage):
    """insert, update, upsert and delete each append exactly one entry with their ops."""
    await storage.create_table("data", "dog", "id")
    db = storage.database("data")
    head = db.head_seq

    await insert(storage, [{"id": 1, "a": 1}, {"id": 2}, {"id": 3}])
    await insert(storage, [{"id": 1, "a": 2}, {"id": 4}], mode="update")
    await insert(storage, [{"id": 2, "b": 1}, {"id": 5}], mode="upsert")
    await storage.write(writes.delete_records(storage, "data", "dog", [3, 99], "tester"))

    entries = [entry for seq, entry in log_entries(db) if seq > head]
    assert len(entries) == 4
    assert db.head_seq == head + 4
    kinds = [[(op[0], op[1], op[2]) for op in entry[3]] for entry in entries]
    assert kinds == [
        [("dog", "insert", 1), ("dog", "insert", 2), ("dog", "insert", 3)],
        [("dog", "update", 1)],
        [("dog", "upsert", 2), ("dog", "upsert", 5)],
        [("dog", "delete", 3)],
    ]
    for origin, version, user, _ops in entries:
        assert origin == LOCAL_ORIGIN and user == "tester" and isinstance(version, int)
    versions = [entry[1] for entry in entries]
    assert versions == sorted(versions) and len(set(versions)) == 4
    assert entries[1][3][0][3]["a"] == 2  # the op carries the merged record
    assert entries[3][3][0][3] is None


async def test_write_that_changes_nothing_appends_nothing(storage):
    """An insert whose ids all exist, or a delete of missing ids, appends no entry."""
    await storage.create_table("data", "dog", "id")
    await insert(storage, [{"id": 1}])
    db = storage.database("data")
    head = db.head_seq
    assert (await insert(storage, [{"id": 1}]))["skipped_hashes"] == [1]
    await storage.write(writes.delete_records(storage, "data", "dog", [42], None))
    await insert(storage, [{"id": 42}], mode="update")
    assert db.head_seq == head


async def test_schema_changes_are_logged(storage):
    """create_database and create_table are log entries (in system and the database)."""
    system = storage.database(SYSTEM)
    system_head = system.head_seq
    await storage.create_database("dev")
    await storage.create_table("dev", "dog", "id")
    sys_ops = [entry[3] for seq, entry in log_entries(system) if seq > system_head]
    assert sys_ops == [[[None, "create_database", "dev", None]]]
    dev_ops = [entry[3] for _, entry in log_entries(storage.database("dev"))]
    assert [(op[0], op[1]) for ops in dev_ops for op in ops] == [("dog", "create_table")]


async def test_log_sequence_survives_reopen(tmp_path):
    """After a reopen, the log continues with the next sequence and versions keep rising."""
    first = Storage(tmp_path, "node-a", MAP_SIZE)
    first.open()
    await first.create_table("data", "dog", "id")
    await insert(first, [{"id": 1}])
    db = first.database("data")
    head, last_version = db.head_seq, log_entries(db)[-1][1][1]
    first.close()

    second = Storage(tmp_path, "node-a", MAP_SIZE)
    second.open()
    try:
        await insert(second, [{"id": 2}])
        entries = log_entries(second.database("data"))
        assert entries[-1][0] == head + 1
        assert entries[-1][1][1] > last_version
        db2, table = second.table("data", "dog")
        assert [r["id"] for r in reads.scan(db2, table)] == [1, 2]
    finally:
        second.close()


def lmdb_log(db: Database, after: int) -> tuple[int, list[tuple[int, bytes]]]:
    """What ``read_log`` must answer, read from LMDB itself."""
    return db.pruned_through(), db.log_after(after, 1_000_000)


async def test_read_log_tail_answers_as_the_log(storage):
    """While a publisher listens, ``read_log`` answers from the committed entries kept
    in memory exactly as from LMDB, from any position, also past a failed job."""
    await storage.create_table("data", "dog", "id")
    db = storage.database("data")
    db.commit_listeners.append(lambda head: None)
    start = db.head_seq
    await insert(storage, [{"id": 1}])
    db.read_log(start, 1000)  # learns pruned_through
    for i in range(2, 6):
        await insert(storage, [{"id": i}])
    with pytest.raises(BadRequestError):
        await insert(storage, [{"id": 90}, {"id": True}])
    await insert(storage, [{"id": 6}])
    assert db._tail and db._tail[0][0] <= start + 2  # served from memory
    for after in range(start, db.head_seq + 1):
        for limit in (1, 2, 1000):
            pruned, entries = db.read_log(after, limit)
            want_pruned, want = lmdb_log(db, after)
            assert (pruned, [(s, bytes(v)) for s, v in entries]) == \
                (want_pruned, [(s, bytes(v)) for s, v in want[:limit]])


async def test_read_log_tail_trims_to_its_bounds(storage, monkeypatch):
    """The in-memory tail keeps the newest entries within its bounds; reads from before
    it go to LMDB and answer the same."""
    from harpsync.storage import database

    monkeypatch.setattr(database, "TAIL_ENTRIES", 3)
    await storage.create_table("data", "dog", "id")
    db = storage.database("data")
    db.commit_listeners.append(lambda head: None)
    start = db.head_seq
    for i in range(1, 12):
        await insert(storage, [{"id": i, "pad": "x" * (i * 10)}])
        assert len(db._tail) <= 6
        for after in range(start, db.head_seq + 1):
            assert db.read_log(after, 1000) == lmdb_log(db, after)
    monkeypatch.setattr(database, "TAIL_BYTES", 200)
    await insert(storage, [{"id": 99, "pad": "y" * 40}])
    assert 0 < db._tail_size <= 200 and db._tail[-1][0] == db.head_seq
    assert db.read_log(start, 1000) == lmdb_log(db, start)
    await insert(storage, [{"id": 100, "pad": "z" * 400}])  # alone above the bound
    assert db._tail == [] and db.read_log(start, 1000) == lmdb_log(db, start)


async def test_read_log_after_purge_and_prune_sees_them(storage):
    """Entries rewritten by ``purge_stream`` and removed by pruning are read as LMDB holds
    them, never from the in-memory tail the publisher was reading."""
    from harpsync.storage import retention

    await storage.create_table("data", "dog", "id")
    await storage.create_table("data", "cat", "id")
    db = storage.database("data")
    db.commit_listeners.append(lambda head: None)
    start = db.head_seq
    for i in range(1, 5):
        await insert(storage, [{"id": i}])
        await insert(storage, [{"id": i}], table="cat")
    assert db.read_log(start, 1000)[1]  # the tail is in use
    await storage.write(retention.purge_table_job(db, "dog", 1, None))
    pruned, entries = db.read_log(start, 1000)
    assert (pruned, entries) == lmdb_log(db, start)
    assert sum(1 for _, v in entries if codec.unpack(v)[3][0][0] == "dog") == 1
    await insert(storage, [{"id": 9}], table="cat")
    db.read_log(start, 1000)
    through = db.head_seq - 2
    await storage.write(retention.prune_log_job(db, through, None))
    assert db.read_log(start, 1000) == lmdb_log(db, start)
    assert db.read_log(start, 1000)[0] == through


# -- tombstones -----------------------------------------------------------------------------
async def test_delete_leaves_tombstone(storage):
    """A delete removes the live record and stores [version, origin, None] as a tombstone."""
    await storage.create_table("data", "dog", "id")
    await insert(storage, [{"id": 1, "name": "a"}])
    await storage.write(writes.delete_records(storage, "data", "dog", [1], None))
    db, table = storage.table("data", "dog")
    key = encode_id(1)
    with db.env.begin() as txn:
        assert txn.get(key, db=table.dbi) is None
        stored = get_stored(txn, table, key)
    assert stored is not None
    version, origin, record = stored
    assert record is None and origin == LOCAL_ORIGIN
    assert version == log_entries(db)[-1][1][1]  # the delete's version
    assert reads.get_by_ids(db, table, [1]) == []
    assert db.table_size(table)[0] == 0


async def test_insert_after_delete_clears_tombstone(storage):
    """Inserting a deleted id again stores it live and removes its tombstone."""
    await storage.create_table("data", "dog", "id")
    await insert(storage, [{"id": 1}])
    await storage.write(writes.delete_records(storage, "data", "dog", [1], None))
    await insert(storage, [{"id": 1, "again": True}])
    db, table = storage.table("data", "dog")
    with db.env.begin() as txn:
        assert txn.get(encode_id(1), db=table.tomb_dbi) is None
        stored = get_stored(txn, table, encode_id(1))
    assert stored is not None and stored[2] is not None and stored[2]["again"] is True


async def test_stored_record_layout(storage):
    """A record is stored as msgpack [version, origin, record] with float timestamps."""
    await storage.create_table("data", "dog", "id")
    await insert(storage, [{"id": 7, "name": "rex"}])
    db, table = storage.table("data", "dog")
    with db.env.begin() as txn:
        version, origin, record = codec.unpack(txn.get(encode_id(7), db=table.dbi))
    assert origin == LOCAL_ORIGIN
    assert record["name"] == "rex" and record["id"] == 7
    assert record["__createdtime__"] == record["__updatedtime__"] == version_to_ms(version)


def test_lookups_raise_domain_errors_that_pick_no_status(storage: Storage) -> None:
    """A missing database or table is a storage error named in storage's terms (404 by
    default); the operations edge turns it into a 400 with the same message."""
    from harpsync.errors import missing_is_bad_request
    from harpsync.storage.errors import NoSuchDatabaseError, NoSuchTableError

    with pytest.raises(NoSuchDatabaseError) as missing_db:
        storage.database("nope")
    assert (missing_db.value.status, missing_db.value.body()) == (
        404, {"error": "database 'nope' does not exist", "code": "NOT_FOUND"})
    with pytest.raises(NoSuchTableError) as missing_table:
        storage.table(SYSTEM, "nope")
    assert missing_table.value.message == "Table 'system.nope' does not exist"
    with pytest.raises(BadRequestError) as bad, missing_is_bad_request():
        storage.table(SYSTEM, "nope")
    assert (bad.value.status, bad.value.body()) == (
        400, {"error": "Table 'system.nope' does not exist", "code": "VALIDATION_ERROR"})


async def test_a_write_job_for_a_missing_table_raises_no_such_table(storage: Storage) -> None:
    """Storage's write jobs report a missing table in storage's terms, not as HTTP."""
    from harpsync.storage.errors import NoSuchTableError

    with pytest.raises(NoSuchTableError):
        await storage.write(writes.write_records(storage, SYSTEM, "nope", [{"id": 1}],
                                                 "insert", None))
