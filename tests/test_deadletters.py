"""Dead letters (storage/deadletters.py) on a real Storage: recording and ids."""

from __future__ import annotations

from harpsync import codec
from harpsync.storage import deadletters
from harpsync.storage.store import Storage


async def test_two_entries_of_one_origin_and_version_are_two_dead_letters(
        storage: Storage) -> None:
    """A copy relayed in chunks logs one entry per chunk, all of one origin and (for
    rows of one bulk insert) one version: each unappliable entry keeps its own dead
    letter, instead of the second overwriting the first (its changes lost)."""
    await storage.create_table("data", "t", "id")
    chunks = [[["t", "upsert", i, {"id": i}, 1, 7] for i in range(start, start + 2)]
              for start in (0, 2)]
    entries = [(seq, codec.pack([1, 7, None, ops])) for seq, ops in enumerate(chunks, 1)]
    rows = deadletters.entry_letters("node-b", "data", entries, {1: "node-c"},
                                     "table 'data.t' is not known here yet")
    cursor = {"seq": 2}
    assert await storage.write(deadletters.record_job(storage, "data", "node-b", rows,
                                                      cursor)) == 2
    stored = deadletters.rows_of(storage, deadletters.DEAD_LETTERS)
    assert sorted(r["seq"] for r in stored) == [1, 2]
    # Recording the same entries again (a batch retried after a crash) adds nothing.
    await storage.write(deadletters.record_job(storage, "data", "node-b", rows, cursor))
    assert deadletters.count(storage, deadletters.DEAD_LETTERS) == 2
