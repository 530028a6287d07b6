"""Review: a peer's entries applied with the bulk path (ingest._apply_fresh,
_copy_fresh) leave exactly what the op-by-op path leaves: rows, tombstones, hashes,
the log, attributes, origin maps, cursors and high-water versions."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync import codec
from harpsync.replication.linkstore import StorageLinkStore
from harpsync.storage import digest, digest_reads, ingest, writes
from harpsync.storage.database import OWN_SINCE_KEY
from harpsync.storage.keys import encode_id
from harpsync.storage.store import Storage

DB = "data"
TABLES = ("dog", "cat")


def _open(path: Path, name: str) -> Storage:
    storage = Storage(path, name, 1 << 27)
    storage.open()
    return storage


def _ship(src: Storage, dst: Storage, database: str) -> None:
    store = StorageLinkStore(dst)
    db = src.databases[database]
    _, entries = db.read_log(0, 100_000)

    async def apply() -> None:
        await store.apply_entries(database, src.node_name, entries, dict(db.origin_names),
                                  {"seq": entries[-1][0]}, 60_000, dst.node_name, 0, None)

    asyncio.run(apply())


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[Storage, Storage, Storage]]:
    a, fast, slow = (_open(tmp_path / n, "node-a" if n == "a" else "node-b")
                     for n in ("a", "fast", "slow"))
    try:
        for t in TABLES:
            asyncio.run(a.create_table(DB, t, "id"))
        for dst in (fast, slow):
            _ship(a, dst, "system")
            _ship(a, dst, DB)
        yield a, fast, slow
    finally:
        for s in (a, fast, slow):
            s.close()


def _dump(storage: Storage) -> dict[str, Any]:
    db = storage.databases[DB]
    out: dict[str, Any] = {}
    with db.env.begin() as txn:
        for t in TABLES:
            table = db.tables[t]
            out[t] = ([(bytes(k), bytes(v)) for k, v in txn.cursor(db=table.dbi)],
                      [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table.tomb_dbi)],
                      [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table.digest.dbi)],
                      list(table.attributes), dict(table.attribute_marks), table.version)
        # ``own_since`` is when each environment first held its node's name (a clock
        # reading of its own start), not something the applied entries wrote.
        out["meta"] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db.meta_dbi)
                       if bytes(k) != OWN_SINCE_KEY]
    out["log"] = db.read_log(0, 1_000_000)
    out["origins"] = dict(db.origin_names)
    out["hw"] = dict(db.origin_hw)
    for t in TABLES:
        table = db.tables[t]
        txn = db.env.begin(write=True)
        try:
            kept = digest_reads.buckets(txn, table)
            digest.rebuild(txn, table)
            assert kept == digest_reads.buckets(txn, table), f"{storage.node_name} {t}"
        finally:
            txn.abort()
    return out


def _entries(rng: random.Random, a: Storage, count: int) -> list[tuple[int, bytes]]:
    incarnation = {t: a.databases[DB].tables[t].version for t in TABLES}
    version = a.hlc.now()
    out = []
    next_id = 1000
    for seq in range(1, count + 1):
        version += rng.randrange(1, 5000)
        entry_version = version if rng.random() < 0.85 else version - rng.randrange(1, 50_000)
        table = rng.choice(TABLES)
        n = rng.randrange(1, 12)
        style = rng.random()
        ops: list[list[Any]] = []
        for i in range(n):
            if style < 0.4:
                rid: Any = next_id
                next_id += 1
            elif style < 0.5:
                rid = next_id + rng.randrange(-30, 30)
            elif style < 0.6:
                rid = rng.choice([1, 1.0, 2, 2.5, "x", "y", 3])
            elif style < 0.7:
                rid = f"s{rng.randrange(1000)}"
            else:
                rid = rng.randrange(next_id + 5)
            kind = rng.choice(["insert", "upsert", "update"]) if rng.random() < 0.93 \
                else "delete"
            value: Any = None if kind == "delete" else \
                {"id": rid, rng.choice("abcdefgh"): rng.random(), "n": i}
            name = table if rng.random() < 0.97 else rng.choice(TABLES)
            op = [name, kind, rid, value]
            shape = rng.random()
            if shape < 0.8:
                op.append(incarnation[name])
            elif shape < 0.9:
                op += [incarnation[name], entry_version - rng.randrange(0, 10_000)]
            ops.append(op)
        if rng.random() < 0.05:
            ops.append([table, "set_attribute", rng.choice("abcdefgh"), rng.random() < 0.5,
                        incarnation[table]])
        origin = 0 if rng.random() < 0.8 else 9
        out.append((seq, codec.pack([origin, entry_version, None, ops])))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_bulk_and_one_by_one_apply_leave_the_same(trio: Any, seed: int,
                                                   monkeypatch: Any) -> None:
    """Random entries (new ids, stored ids, deletes, relayed copy rows, mixed tables,
    attribute changes, another origin) leave the same bytes everywhere either way."""
    a, fast, slow = trio
    rng = random.Random(seed)
    origins = {**a.databases[DB].origin_names, 9: "node-c"}
    # Some rows and tombstones held here already, the same on both.
    asyncio.run(a.write(writes.write_records(a, DB, "dog",
                                             [{"id": i} for i in range(1000, 1010)],
                                             "insert", None)))
    asyncio.run(a.write(writes.delete_records(a, DB, "dog", [1003, 1005], None)))
    for dst in (fast, slow):
        _ship(a, dst, DB)
    entries = _entries(rng, a, 150)
    chunks = []
    i = 0
    while i < len(entries):
        k = rng.randrange(1, 6)
        chunks.append(entries[i:i + k])
        i += k

    def apply(dst: Storage) -> None:
        store = StorageLinkStore(dst)

        async def run() -> None:
            for part in chunks:
                await store.apply_entries(DB, "node-a", part, origins, {"seq": part[-1][0]},
                                          60_000, dst.node_name, 0, None)

        asyncio.run(run())

    real = ingest._apply_fresh
    bulk = [0, 0]

    def counted(*args: Any, **kw: Any) -> bool:
        done = real(*args, **kw)
        bulk[done] += 1
        return done

    with monkeypatch.context() as m:
        m.setattr(ingest, "_apply_fresh", counted)
        apply(fast)
    assert bulk[True], "no entry applied in bulk"
    with monkeypatch.context() as m:
        m.setattr(ingest, "_apply_fresh", lambda *args, **kw: False)
        apply(slow)
    got_fast, got_slow = _dump(fast), _dump(slow)
    for key in got_slow:
        assert got_fast[key] == got_slow[key], key


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_bulk_and_row_by_row_copy_leave_the_same(trio: Any, seed: int,
                                                 monkeypatch: Any) -> None:
    """Random copy chunks (new and stored keys, tombstones, origins unknown here, a
    floor) leave the same bytes everywhere either way."""
    a, fast, slow = trio
    rng = random.Random(seed)
    asyncio.run(a.write(writes.write_records(a, DB, "dog",
                                             [{"id": i} for i in range(0, 150, 7)],
                                             "insert", None)))
    asyncio.run(a.write(writes.delete_records(a, DB, "dog", list(range(0, 150, 21)), None)))
    for dst in (fast, slow):
        _ship(a, dst, DB)
    origins = {**a.databases[DB].origin_names, 9: "node-c", 11: "node-d"}
    names = [0, 9, 11] + ([12] if rng.random() < 0.3 else [])  # 12: unknown
    base = a.hlc.now()
    floor = base + 100 if rng.random() < 0.2 else 0
    incarnation = a.databases[DB].tables["dog"].version
    chunks = []
    start = 0
    while start < 600:
        size = rng.randrange(1, 40)
        ids = list(range(start, start + size)) if rng.random() < 0.6 else \
            [10_000 + rng.randrange(600) for _ in range(size)]
        start += size
        tombs = rng.random() < 0.2
        rows = []
        for rid in sorted(ids):
            version = base + rng.randrange(-5000, 5000)
            record = None if tombs else {"id": rid, rng.choice("abcdef"): rng.random()}
            origin = rng.choice(names) if rng.random() < 0.05 else 0
            rows.append((encode_id(rid), codec.pack([version, origin, record])))
        chunks.append(("dog" + ("\x00" if tombs else ""), rows))

    def copy(dst: Storage) -> None:
        store = StorageLinkStore(dst)

        async def run() -> None:
            for table, rows in chunks:
                await store.apply_rows(DB, "node-a", table.rstrip("\x00"), rows, origins,
                                       {"seq": 0}, floor, incarnation, None)

        asyncio.run(run())

    real = ingest._copy_fresh
    bulk = [0, 0]

    def counted(*args: Any, **kw: Any) -> Any:
        done = real(*args, **kw)
        bulk[done is not None] += 1
        return done

    with monkeypatch.context() as m:
        m.setattr(ingest, "_copy_fresh", counted)
        copy(fast)
    assert bulk[True], "no chunk stored in bulk"
    with monkeypatch.context() as m:
        m.setattr(ingest, "_copy_fresh", lambda *args, **kw: None)
        copy(slow)
    got_fast, got_slow = _dump(fast), _dump(slow)
    for key in got_slow:
        assert got_fast[key] == got_slow[key], key
