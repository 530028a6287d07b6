"""A peer's entries of new records apply together (ingest._apply_fresh): one bulk store
and one run of hashes. Whatever mix of batches two nodes write and exchange, both must
end with the same rows, and their table hashes must equal a rebuild from those rows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync import codec
from harpsync.replication.linkstore import StorageLinkStore
from harpsync.storage import digest, digest_reads, rowhash, writes
from harpsync.storage.store import Storage

DB, TABLE = "data", "dog"
Pair = tuple[Storage, Storage]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Storages ``a`` and ``b``; b holds a's ``data.dog`` (shipped through a's log)."""
    a = Storage(tmp_path / "a", "node-a", 1 << 27)
    b = Storage(tmp_path / "b", "node-b", 1 << 27)
    a.open()
    b.open()
    try:
        asyncio.run(a.create_table(DB, TABLE, "id"))
        _ship(a, b, "system", 0)
        _ship(a, b, DB, 0)
        yield a, b
    finally:
        a.close()
        b.close()


def _ship(src: Storage, dst: Storage, database: str, after: int, chunk: int = 5) -> int:
    """Apply ``src``'s log entries of ``database`` after ``after`` on ``dst``, ``chunk``
    entries per job, as a subscriber would; returns the last seq shipped."""
    store = StorageLinkStore(dst)
    db = src.databases[database]
    _, entries = db.read_log(after, 100_000)

    async def apply() -> None:
        for i in range(0, len(entries), chunk):
            part = entries[i:i + chunk]
            await store.apply_entries(database, src.node_name, part, dict(db.origin_names),
                                      {"seq": part[-1][0]}, 60_000, dst.node_name, 0, None)

    asyncio.run(apply())
    return entries[-1][0] if entries else after


def _rows(storage: Storage) -> dict[bytes, Any]:
    db, table = storage.table(DB, TABLE)
    with db.env.begin() as txn:
        live = {bytes(k): codec.unpack(v) for k, v in txn.cursor(db=table.dbi)}
        tombs = {bytes(k): codec.unpack(v) for k, v in txn.cursor(db=table.tomb_dbi)}
    both = live.keys() & tombs.keys()
    assert not both, f"{storage.node_name} holds a row and a tombstone under {sorted(both)}"
    names = storage.databases[DB].origin_names
    # Origin ids are each node's own: compare by name.
    return {k: (v[0], names.get(v[1], storage.node_name), v[2])
            for k, v in (live | tombs).items()}


def _hashes_exact(storage: Storage) -> list[rowhash.Bucket]:
    db, table = storage.table(DB, TABLE)
    txn = db.env.begin(write=True)
    try:
        kept = digest_reads.buckets(txn, table)
        digest.rebuild(txn, table)
        assert kept == digest_reads.buckets(txn, table), f"{storage.node_name}'s hashes drifted"
        return kept
    finally:
        txn.abort()


def _batch(rng: random.Random, step: int) -> tuple[str, list[Any]]:
    kind = rng.random()
    if kind < 0.35:  # ids in ascending order: one range probe per DBI
        # Mostly new; else an earlier batch's range, whose ids may hold rows or tombstones.
        first = 100_000 + (step if rng.random() < 0.6 else rng.randrange(step + 1)) * 1000
        return "upsert", [{"id": first + i, "a": step} for i in range(rng.randrange(2, 40))]
    if kind < 0.55:  # ids out of order, some of them stored already (on either node)
        return "upsert", [{"id": rng.randrange(300), "b": rng.random()}
                          for _ in range(rng.randrange(2, 30))]
    if kind < 0.7:  # string ids, new and old
        return "upsert", [{"id": f"k{rng.randrange(60)}", "c": step}
                          for _ in range(rng.randrange(2, 12))]
    if kind < 0.85:
        if rng.random() < 0.5:  # in an ascending range: tombstones that a range must see
            first = 100_000 + rng.randrange(step + 1) * 1000
            return "delete", [first + rng.randrange(40) for _ in range(rng.randrange(1, 8))]
        return "delete", [rng.randrange(300) for _ in range(rng.randrange(1, 15))]
    return "insert", [{"id": rng.randrange(300), "d": step} for _ in range(rng.randrange(2, 20))]


def test_exchanged_batches_converge_with_exact_hashes(pair: Pair) -> None:
    a, b = pair
    shipped = {"a": _ship(a, b, DB, 0), "b": 0}
    rng = random.Random(11)
    for step in range(120):
        node = a if rng.random() < 0.5 else b
        kind, items = _batch(rng, step)
        if kind == "delete":
            job = writes.delete_records(node, DB, TABLE, items, None)
        else:
            job = writes.write_records(node, DB, TABLE, items, kind, None)
        asyncio.run(node.write(job))
        if rng.random() < 0.3:  # exchange now and then, so versions interleave
            shipped["a"] = _ship(a, b, DB, shipped["a"], rng.randrange(1, 6))
            shipped["b"] = _ship(b, a, DB, shipped["b"], rng.randrange(1, 6))
    # Entries a node took from its peer come back in the peer's log: they are skipped.
    shipped["a"] = _ship(a, b, DB, shipped["a"])
    shipped["b"] = _ship(b, a, DB, shipped["b"])
    _ship(a, b, DB, shipped["a"])

    rows_a, rows_b = _rows(a), _rows(b)
    assert len(rows_a) > 300
    assert rows_a == rows_b
    assert _hashes_exact(a) == _hashes_exact(b)


def test_ascending_ids_over_tombstones_only(pair: Pair) -> None:
    """Ids in ascending order whose only rows here are tombstones: an older tombstone is
    replaced, a newer one (a delete made here after the peer's write) stays."""
    a, b = pair
    seq = a.databases[DB].head_seq
    asyncio.run(a.write(writes.write_records(a, DB, TABLE, [{"id": i} for i in range(1, 6)],
                                             "insert", None)))
    asyncio.run(a.write(writes.delete_records(a, DB, TABLE, [1, 2, 3, 4, 5], None)))
    seq = _ship(a, b, DB, seq)
    asyncio.run(a.write(writes.write_records(a, DB, TABLE, [{"id": i, "v": 2}
                                                            for i in range(1, 6)],
                                             "upsert", None)))
    asyncio.run(a.write(writes.write_records(a, DB, TABLE, [{"id": 8}, {"id": 9}],
                                             "insert", None)))
    asyncio.run(b.write(writes.write_records(b, DB, TABLE, [{"id": 9}], "insert", None)))
    asyncio.run(b.write(writes.delete_records(b, DB, TABLE, [9], None)))
    _ship(a, b, DB, seq)
    rows = _rows(b)
    assert sorted(r[2]["v"] for r in rows.values() if r[2] and "v" in r[2]) == [2] * 5
    nine = rows[next(k for k, r in rows.items() if r[2] is None)]
    assert nine[1] == "node-b", "a delete made here after the peer's insert was lost"
    _hashes_exact(b)


def test_an_entry_with_one_id_twice_applies_like_one_by_one(pair: Pair) -> None:
    """Peers log an id once per entry, but an entry naming it twice must not be stored
    as two rows: it applies op by op (the first value, as equal versions do not win)."""
    a, b = pair
    table = a.databases[DB].tables[TABLE]
    version = a.hlc.now()
    entry = codec.pack([0, version, None, [[TABLE, "insert", 7, {"id": 7, "v": 1},
                                            table.version],
                                           [TABLE, "insert", 8, {"id": 8, "v": 1},
                                            table.version],
                                           [TABLE, "insert", 7, {"id": 7, "v": 2},
                                            table.version]]])
    store = StorageLinkStore(b)
    asyncio.run(store.apply_entries(DB, "node-a", [(10_000, entry)],
                                    dict(a.databases[DB].origin_names), {"seq": 10_000},
                                    60_000, "node-b", 0, None))
    rows = _rows(b)
    assert len(rows) == 2
    assert [r[2]["v"] for r in rows.values()] == [1, 1]
    _hashes_exact(b)


def test_copied_chunks_merge_by_last_writer_wins_with_exact_hashes(pair: Pair) -> None:
    """A full copy's chunks: those of new keys only are stored together, the rest row by
    row (a key held here, a tombstone, an older row); the result is the merge by
    last-writer-wins either way, and the table hashes equal a rebuild."""
    a, b = pair
    asyncio.run(b.write(writes.write_records(b, DB, TABLE, [{"id": i, "b": 1}
                                                            for i in (40, 41, 260)],
                                             "insert", None)))
    asyncio.run(a.write(writes.write_records(a, DB, TABLE, [{"id": i, "a": 1}
                                                            for i in range(1, 301)],
                                             "insert", None)))
    asyncio.run(a.write(writes.delete_records(a, DB, TABLE, [5, 120, 121], None)))
    asyncio.run(b.write(writes.write_records(b, DB, TABLE, [{"id": i, "b": 2}
                                                            for i in (120, 150, 151)],
                                             "upsert", None)))
    asyncio.run(b.write(writes.delete_records(b, DB, TABLE, [151], None)))
    before_a, before_b = _rows(a), _rows(b)
    db, table = a.table(DB, TABLE)
    with db.env.begin() as txn:
        live = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table.dbi)]
        tombs = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table.tomb_dbi)]
    store = StorageLinkStore(b)

    async def copy() -> None:
        for rows in (live, tombs):
            for i in range(0, len(rows), 50):
                await store.apply_rows(DB, "node-a", TABLE, rows[i:i + 50],
                                       dict(db.origin_names), {"seq": 0}, 0,
                                       table.version, None)

    asyncio.run(copy())
    expected = {key: max((row for row in (before_a.get(key), before_b.get(key)) if row),
                         key=lambda row: (row[0], row[1]))
                for key in before_a.keys() | before_b.keys()}
    assert _rows(b) == expected
    _hashes_exact(b)


def test_a_relayed_copy_entry_keeps_each_row_version(pair: Pair) -> None:
    """A node that took rows in a full copy logs them for the nodes behind it, one entry
    per origin whose ops each carry the row's own version (``op[5]``); the entry's
    version is their maximum. Applied, each row keeps its own version."""
    a, b = pair
    table = a.databases[DB].tables[TABLE]
    first, second = a.hlc.now(), a.hlc.now()
    entry = codec.pack([0, second, None, [
        [TABLE, "upsert", 1, {"id": 1, "v": "older"}, table.version, first],
        [TABLE, "upsert", 2, {"id": 2, "v": "newer"}, table.version, second]]])
    asyncio.run(StorageLinkStore(b).apply_entries(
        DB, "node-a", [(10_000, entry)], dict(a.databases[DB].origin_names),
        {"seq": 10_000}, 60_000, "node-b", 0, None))
    versions = sorted(row[0] for row in _rows(b).values())
    assert versions == [first, second]
    _hashes_exact(b)


def test_an_entry_with_an_odd_op_kind_applies_like_one_by_one(pair: Pair) -> None:
    """An op whose kind is not a string (nothing this code logs) is a write to the
    op-by-op path: the bulk check must not fail on it where that path applies it."""
    a, b = pair
    table = a.databases[DB].tables[TABLE]
    entry = codec.pack([0, a.hlc.now(), None, [
        [TABLE, "insert", 7, {"id": 7}, table.version],
        [TABLE, ["upsert"], 8, {"id": 8}, table.version]]])
    asyncio.run(StorageLinkStore(b).apply_entries(
        DB, "node-a", [(10_000, entry)], dict(a.databases[DB].origin_names),
        {"seq": 10_000}, 60_000, "node-b", 0, None))
    assert len(_rows(b)) == 2
