"""Durability: a 200 means durable, even when the process is SIGKILLed mid-stream.

A subprocess node takes single-record inserts from 16 concurrent clients and is killed
with SIGKILL while writes are still in flight. After a restart every acknowledged id
must be there, and the transaction log must hold exactly one entry per acknowledged
transaction (in-flight ones may or may not have landed, but none twice).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import lmdb
import pytest

from harpsync import codec
from harpsync.errors import ServiceUnavailableError
from harpsync.storage import deadletters, writes
from harpsync.storage.reads import get_by_ids
from harpsync.storage.store import Storage
from tests.helpers import ADMIN, wait_for

CLIENTS = 16
PER_CLIENT = 125  # 2,000 inserts in all
KILL_AFTER = 1500
TABLE = "dog"

pytestmark = pytest.mark.timeout(300)


class Load:
    """Bookkeeping shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted: set[int] = set()
        self.acked: set[int] = set()
        self.stop = threading.Event()
        self.errors: list[str] = []

    def client(self, url: str, worker: int) -> None:
        """Insert this worker's ids one per request until done or told to stop."""
        with httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0), auth=ADMIN) as http:
            for n in range(PER_CLIENT):
                if self.stop.is_set():
                    return
                rid = worker * 10_000 + n
                with self.lock:
                    self.attempted.add(rid)
                try:
                    response = http.post(url, json={"operation": "insert", "table": TABLE,
                                                    "records": [{"id": rid, "w": worker}]})
                except httpx.HTTPError:
                    return  # the node died under this request
                if response.status_code != 200:
                    with self.lock:
                        self.errors.append(f"{rid}: {response.status_code} {response.text}")
                    return
                assert response.json()["inserted_hashes"] == [rid]
                with self.lock:
                    self.acked.add(rid)


def read_log(db_path: Path) -> list[list[Any]]:
    """Every ``[origin, version, user, ops]`` in a stopped database's ``__txns__``."""
    env = lmdb.open(str(db_path), readonly=True, max_dbs=4096, lock=False)
    try:
        txns = env.open_db(b"__txns__", create=False)
        with env.begin(db=txns) as txn:
            return [codec.unpack(value) for _, value in txn.cursor()]
    finally:
        env.close()


def test_acknowledged_inserts_survive_sigkill(node_factory):
    """Every acknowledged insert survives SIGKILL, logged exactly once; none is logged twice."""
    node = node_factory("durable", process=True)
    node.call("create_table", table=TABLE, primary_key="id")
    load = Load()
    workers = [threading.Thread(target=load.client, args=(node.url, w), daemon=True)
               for w in range(CLIENTS)]
    for worker in workers:
        worker.start()

    wait_for(lambda: len(load.acked) >= KILL_AFTER or not any(w.is_alive() for w in workers),
             timeout=120, message=f"{KILL_AFTER} acknowledged inserts")
    load.stop.set()
    node.kill()
    for worker in workers:
        worker.join(30)
        assert not worker.is_alive()
    assert not load.errors, load.errors[:5]
    acked, attempted = set(load.acked), set(load.attempted)
    assert len(acked) >= KILL_AFTER
    assert len(attempted) > len(acked), "the kill came after every write had finished"

    node.start()
    found: set[int] = set()
    ordered = sorted(acked)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start:start + 500]
        records = node.call("search_by_id", table=TABLE, ids=chunk, get_attributes=["id"])
        found.update(r["id"] for r in records)
    assert found == acked, f"{len(acked - found)} acknowledged ids are missing"
    stored = node.count(TABLE)
    assert len(acked) <= stored <= len(attempted)
    node.stop()

    entries = read_log(node.root / "database" / "data")
    inserted_per_entry = [
        [op[2] for op in ops if op[0] == TABLE and op[1] == "insert"]
        for _origin, _version, _user, ops in entries
    ]
    inserted_per_entry = [ids for ids in inserted_per_entry if ids]
    assert all(len(ids) == 1 for ids in inserted_per_entry)  # one record per request
    times_logged = Counter(rid for ids in inserted_per_entry for rid in ids)
    assert max(times_logged.values()) == 1, "an id was logged twice"
    assert acked <= set(times_logged)
    assert set(times_logged) <= attempted
    assert len(acked) <= len(inserted_per_entry) <= len(attempted)
    assert len(inserted_per_entry) == stored


# -- a group whose commit fails ---------------------------------------------------------

# A child process (RLIMIT_FSIZE is process-wide) whose next group's commit fails for real:
# the database file may not grow, so LMDB's write of the new pages fails (EFBIG).
_FAILING_COMMIT = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from harpsync.storage import writes
from harpsync.storage.store import Storage

async def main(root):
    storage = Storage(root, "node-a", 1 << 27)
    storage.open()
    await storage.create_table("d", "x", "id")
    await storage.create_table("d", "y", "id")
    db = storage.databases["d"]
    old = db.tables["x"]
    size = (root / "database" / "d" / "data.mdb").stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    big = [{"id": i, "blob": "z" * 100_000} for i in range(8)]
    # One group: a drop of x, its re-create, and a write that needs the file to grow.
    results = await asyncio.gather(
        storage.drop_table("d", "x"), storage.create_table("d", "x", "id"),
        storage.write(writes.write_records(storage, "d", "y", big, "insert", None)),
        return_exceptions=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    print(json.dumps({"errors": [type(r).__name__ for r in results],
                      "x_is_old": db.tables.get("x") is old, "tables": sorted(db.tables)}))
    storage.close()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_failed_group_commit_undoes_its_jobs_catalog_changes_in_reverse(tmp_path: Path):
    """When a group's commit fails, its jobs' catalog changes are undone last job first:
    a drop and a re-create of one table leave the old table in the catalog."""
    done = subprocess.run([sys.executable, "-c", _FAILING_COMMIT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    outcome = json.loads(done.stdout)
    assert outcome["errors"] == ["StorageError"] * 3  # the commit did fail, for all three
    assert outcome["tables"] == ["x", "y"]
    assert outcome["x_is_old"]


# -- a job writing a database and system, killed between the two commits ------------------

# The child stores a dead letter and moves a link's cursor past the change in one job
# (``order`` says which of the two the job writes first: a batch dead-lettered whole
# writes the row first, a refused op writes the data first), and dies between the
# commits of the two environments (``HARPSYNC_CRASH_AT``, armed for that job only).
_CRASH_BETWEEN = """
import asyncio, os, sys
from pathlib import Path
from harpsync.storage import deadletters, ingest
from harpsync.storage.store import Storage

async def main(root, order):
    storage = Storage(root, "node-a", 1 << 27)
    storage.open()
    await storage.create_table("d", "t", "id")
    db = storage.databases["d"]
    op = ["t", "upsert", 7, {"id": 7}, db.tables["t"].version]
    row = deadletters.dead_letter("node-b", "d", "node-b", 5, None, [op], "refused", op)
    refuse = deadletters.refuser(storage, "node-b")

    def job(ctx):
        if order == "row-first":
            deadletters.record_job(storage, "d", "node-b", [row], {"seq": 9})(ctx)
        else:
            ingest.write_cursor(ctx, db, "node-b", {"seq": 9})
            refuse(ctx, db, op, 5, "node-b", "refused")

    os.environ["HARPSYNC_CRASH_AT"] = "between_commits"
    await storage.write(job)
    print("not killed")

asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
"""


@pytest.mark.parametrize("order", ["row-first", "data-first"])
def test_a_crash_between_a_jobs_two_commits_keeps_dead_letter_and_cursor_together(
        tmp_path: Path, order: str):
    """A dead letter and the cursor moved past its change survive a crash between the
    commits of their two environments together: the change is never lost (cursor moved,
    no row) and never dead-lettered without its cursor."""
    done = subprocess.run([sys.executable, "-c", _CRASH_BETWEEN, str(tmp_path), order],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 137, done.stdout + done.stderr  # killed between the commits
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    try:
        rows = deadletters.rows_of(storage, deadletters.DEAD_LETTERS)
        cursor = storage.databases["d"].cursor("node-b")
    finally:
        storage.close()
    assert (len(rows), cursor) == (1, {"seq": 9})


# -- stopping the writer -----------------------------------------------------------------


async def test_writes_racing_or_following_the_writers_stop_fail_instead_of_hanging(
        tmp_path: Path):
    """A write submitted while the writer stops, or after, is answered (done, or a 503
    saying the node is shutting down); before, its caller waited forever."""
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    await storage.create_table("d", "t", "id")
    racing = asyncio.ensure_future(storage.write(
        writes.write_records(storage, "d", "t", [{"id": 1}], "insert", None)))
    await asyncio.to_thread(storage.close)
    try:
        await asyncio.wait_for(racing, 10)
    except ServiceUnavailableError:
        pass
    with pytest.raises(ServiceUnavailableError, match="shutting down"):
        await asyncio.wait_for(storage.write(lambda ctx: 1), 10)


async def test_a_small_write_waiting_to_go_inline_when_the_writer_stops_is_refused(
        tmp_path: Path):
    """A lone client's small write (one that would commit on the event loop) still
    waiting to be handed over when the writer stops is refused, not committed after the
    stop (when the environments may be closing under it)."""
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    try:
        await storage.create_table("d", "t", "id")
        for n in range(6):  # enough single-job groups for the next one to go inline
            await storage.write(writes.write_records(storage, "d", "t", [{"id": n}],
                                                     "insert", None), small=True)
        late = storage.writer.submit(writes.write_records(storage, "d", "t", [{"id": 99}],
                                                          "insert", None), small=True)
        storage.writer.stop()  # before the loop hands ``late`` over
        with pytest.raises(ServiceUnavailableError):
            await asyncio.wait_for(late, 10)
    finally:
        storage.close()


# A child whose job logs a change in d and dead-letters one in system, and whose system
# commit fails (the system file may not grow: RLIMIT_FSIZE) while d's commit succeeds.
_SYSTEM_COMMIT_FAILS = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from harpsync.storage import deadletters, writes
from harpsync.storage.store import Storage

async def main(root):
    storage = Storage(root, "node-a", 1 << 27)
    storage.open()
    await storage.create_table("d", "t", "id")
    db = storage.databases["d"]
    op = ["t", "upsert", 7, {"id": 7}, db.tables["t"].version]
    refuse = deadletters.refuser(storage, "node-b")

    def job(ctx):
        storage.append_log(ctx, db, [op], 5, 0)
        refuse(ctx, db, op, 5, "node-b", "refused " + "x" * 200_000)

    limit = (root / "database" / "system" / "data.mdb").stat().st_size
    assert (root / "database" / "d" / "data.mdb").stat().st_size < limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    failed = await asyncio.gather(storage.write(job), return_exceptions=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    await storage.write(writes.write_records(storage, "d", "t", [{"id": 1}], "insert", None))
    print(json.dumps({"failed": type(failed[0]).__name__}))
    storage.close()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_failed_system_commit_neither_loses_the_next_log_entry_nor_the_dead_letter(
        tmp_path: Path):
    """When a job's data commits and its system commit fails, the next write to the
    database is logged (the job's undo had lowered the log sequence under its committed
    entry, and the next entry silently went nowhere: the write never replicated), and
    the job's dead letter lands at the next start (its redo)."""
    done = subprocess.run([sys.executable, "-c", _SYSTEM_COMMIT_FAILS, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == {"failed": "StorageError"}
    logged = [[op[:3] for op in ops] for _o, _v, _u, ops in
              read_log(tmp_path / "database" / "d")]
    assert logged[1:] == [[["t", "upsert", 7]], [["t", "insert", 1]]]
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    try:
        rows = deadletters.rows_of(storage, deadletters.DEAD_LETTERS)
    finally:
        storage.close()
    assert [row["record_id"] for row in rows] == [7]


async def test_a_new_databases_directory_is_synced_before_its_create_is_acknowledged(
        storage: Storage, monkeypatch: pytest.MonkeyPatch):
    """create_database syncs the new directory and its parent (the entries of its files
    and of the directory itself): the data file's own syncs do not make a new file's name
    durable, and a power loss could take an acknowledged database away."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await storage.create_database("dx")
    base = storage.root / "database"
    assert {str(base), str(base / "dx")} <= set(synced)


# A child reprocessing a dead letter whose database's commit fails (its file may not
# grow) while system's (deleting the row) would succeed.
_DATA_COMMIT_FAILS = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from harpsync.storage import deadletters, writes
from harpsync.storage.store import Storage

async def main(root):
    storage = Storage(root, "node-a", 1 << 27)
    storage.open()
    await storage.create_table("d", "t", "id")
    padding = [{"id": -n, "pad": "p" * 100_000} for n in range(1, 11)]
    await storage.write(writes.write_records(storage, "d", "t", padding, "insert", None))
    db = storage.databases["d"]
    op = ["t", "upsert", 7, {"id": 7, "big": "b" * 300_000}, db.tables["t"].version]
    row = deadletters.dead_letter("node-b", "d", "node-b", 5, None, [op], "refused", op)
    await storage.write(deadletters.record_job(storage, "d", "node-b", [row], {"seq": 3}))
    limit = (root / "database" / "d" / "data.mdb").stat().st_size
    assert (root / "database" / "system" / "data.mdb").stat().st_size < limit // 2
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    failed = await asyncio.gather(deadletters.reprocess(storage, row, None),
                                  return_exceptions=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    print(json.dumps({"failed": type(failed[0]).__name__}))
    storage.close()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_reprocess_whose_data_commit_fails_keeps_its_dead_letter(tmp_path: Path):
    """A reprocess (or a conflict resolution) whose database commit fails keeps the row
    it would have deleted in system: before, system committed the delete alone and the
    change was gone (not applied, no dead letter left to reprocess)."""
    done = subprocess.run([sys.executable, "-c", _DATA_COMMIT_FAILS, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == {"failed": "StorageError"}
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    try:
        rows = deadletters.rows_of(storage, deadletters.DEAD_LETTERS)
        d = storage.databases["d"]
        stored = get_by_ids(d, d.tables["t"], [7])
    finally:
        storage.close()
    assert [row["record_id"] for row in rows] == [7]
    assert stored == []
