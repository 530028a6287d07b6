"""What a link tells a peer comes from committed state, never a writer job's work in
progress: hellos (the schema) and subscribe floors (the origins' high-water versions).

A writer job changes the in-memory catalog as it runs. A job that applies a peer's drop
and re-create of a table (one batch, or a create carrying ``after_drop``) holds the new
incarnation in memory before the drop marker is committed. A hello built then named
the new incarnation without the drop it follows, and a peer still holding the old one
merged the two as concurrent creates (lifecycle seed 3 with 3 rounds, now and then:
marker attributes {2, 4} on two nodes, {4} on the third).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from harpsync.replication.linkstore import StorageLinkStore, table_definitions
from harpsync.storage import schema
from harpsync.storage.database import LOCAL_ORIGIN
from harpsync.storage.ingest import note_origin_versions
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import WriteContext


def _t1_as_described(storage: Storage) -> list[tuple[int, int]]:
    """(incarnation, drop marker) of t1 in the data hello and in the system hello."""
    data = table_definitions(storage, storage.databases["data"])
    system = table_definitions(storage, storage.databases[SYSTEM])
    listed = system[schema.DATABASES_KEY]["databases"]["data"]
    return [(data["t1"]["version"], data[schema.DROPPED_KEY].get("t1", 0)),
            (listed["tables"]["t1"]["version"], listed["dropped"].get("t1", 0))]


async def test_a_hello_built_during_a_drop_and_re_create_names_the_committed_incarnation(
        storage: Storage) -> None:
    await storage.create_table("data", "t1", "id", ["inc1"])
    db = storage.databases["data"]
    old = db.tables["t1"].version
    inside, release = threading.Event(), threading.Event()
    versions: dict[str, int] = {}

    def drop_and_create(ctx: WriteContext) -> None:
        versions["drop"] = storage.hlc.now()
        schema.apply_drop_table(storage, ctx, db, "t1", versions["drop"], LOCAL_ORIGIN,
                                log_it=False)
        versions["create"] = storage.hlc.now()
        definition: dict[str, Any] = {"primary_key": "id", "attributes": ["inc2"]}
        storage.create_table_in(ctx, db, "t1", definition, versions["create"], LOCAL_ORIGIN,
                                log_it=False)
        inside.set()
        release.wait(10)

    job = asyncio.ensure_future(storage.write(drop_and_create))
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        during = _t1_as_described(storage)
    finally:
        release.set()
        await job
    assert during == [(old, 0), (old, 0)]
    assert _t1_as_described(storage) == [(versions["create"], versions["drop"])] * 2


async def test_a_hello_built_during_a_create_database_does_not_offer_it(
        storage: Storage) -> None:
    """A database whose create is not committed (it may still roll back) is listed
    without a creation version, so no peer creates it from this hello."""
    inside, release = threading.Event(), threading.Event()

    def create(ctx: WriteContext) -> None:
        storage.create_database_in(ctx, "dbx", storage.hlc.now(), LOCAL_ORIGIN, log_it=False)
        inside.set()
        release.wait(10)

    job = asyncio.ensure_future(storage.write(create, lambda: storage.pending_env("dbx")))
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        during = table_definitions(storage, storage.databases[SYSTEM])
    finally:
        release.set()
        await job
    assert during[schema.DATABASES_KEY]["databases"]["dbx"]["created"] == 0
    after = table_definitions(storage, storage.databases[SYSTEM])
    assert after[schema.DATABASES_KEY]["databases"]["dbx"]["created"] \
        == storage.databases["dbx"].created > 0


async def test_subscribe_floors_are_the_committed_high_water_versions(
        storage: Storage) -> None:
    """A job raises an origin's high-water version in memory before it commits. A link
    subscribing meanwhile asked for that origin's entries above it only; had the job
    then failed (a group commit on a full disk), the entries it did not apply would
    never be asked for again on that link."""
    await storage.create_table("data", "t1", "id", [])
    db = storage.databases["data"]
    store = StorageLinkStore(storage)
    inside, release = threading.Event(), threading.Event()

    def raise_hw(ctx: WriteContext) -> None:
        note_origin_versions(ctx, db, {"node-x": 500})
        inside.set()
        release.wait(10)

    await storage.write(lambda ctx: note_origin_versions(ctx, db, {"node-x": 100}))
    job = asyncio.ensure_future(storage.write(raise_hw))
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        during = store.origin_floors("data", ["node-x", "node-y"])
    finally:
        release.set()
        await job
    assert during == {"node-x": 100, "node-y": None}
    assert store.origin_floors("data", ["node-x"]) == {"node-x": 500}
