"""A node unmaps the LMDB pages it touched (``storage.trimInterval``), and sooner while
its data files grow fast: the pages touched between trims grow with the write rate."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for


def test_fast_growth_trims_before_the_interval(node_factory: Any) -> None:
    node = node_factory("node-a", env={"STORAGE_TRIMINTERVAL": "1h"})
    node.call("create_table", table="big", primary_key="id")
    storage = node.node.storage
    assert storage.trims == 0
    pad = "x" * 10_000
    for first in range(0, 2_500, 100):  # about 25 MB of records, more in the files
        node.call("insert", table="big",
                  records=[{"id": i, "pad": pad} for i in range(first, first + 100)])
    wait_for(lambda: storage.trims >= 1, timeout=20,
             message="a trim after the data files grew by more than 16 MiB")


def test_a_trim_never_advises_memory_mapped_after_a_database_closed(tmp_path: Any,
                                                                    monkeypatch: Any) -> None:
    """A database is closed (dropped, or the node stopping) while a trim runs: the
    address range of its map may be mapped again at once (here anonymous memory, as
    malloc maps it), and the trim, which read the process's maps before, must not advise
    that range: ``MADV_DONTNEED`` empties anonymous memory."""
    import asyncio
    import ctypes
    import threading

    from harpsync.storage import mapped
    from harpsync.storage.store import Storage

    storage = Storage(tmp_path, "node-a", 1 << 24)
    storage.open()
    try:
        asyncio.run(storage.create_database("x"))
        db = storage.databases["x"]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        prot_rw, private_anon, fixed_noreplace = 0x3, 0x2 | 0x20, 0x100000
        page: dict[str, Any] = {}

        def drop_and_map(addr: int) -> None:
            db.close()  # the map goes; malloc (here: we) maps its range again
            got = libc.mmap(addr, 4096, prot_rw, private_anon | fixed_noreplace, -1, 0)
            if got == addr:
                ctypes.memset(got, 0x55, 4096)
                page["addr"] = got

        class RacingLibc:
            """libc, with the close landing between the read of the maps and madvise."""

            def madvise(self, addr: Any, length: Any, advice: int) -> int:
                if "thread" not in page:
                    thread = page["thread"] = threading.Thread(target=drop_and_map,
                                                               args=(addr.value,))
                    thread.start()
                    thread.join(timeout=0.5)
                return int(libc.madvise(addr, length, advice))

        monkeypatch.setattr(mapped.ctypes, "CDLL", lambda *a, **k: RacingLibc())
        mapped.release_mapped_pages({db.data_file})
        monkeypatch.undo()
        assert "thread" in page, "the database's map was not found"
        page["thread"].join()
        if "addr" not in page:
            pytest.skip("the freed range could not be mapped again")
        try:
            assert ctypes.string_at(page["addr"], 4096) == b"\x55" * 4096, \
                "the trim emptied memory mapped after the database closed"
        finally:
            libc.munmap(page["addr"], 4096)
    finally:
        storage.close()


def test_growth_after_a_drop_still_trims(node_factory: Any) -> None:
    """The growth that trims at once is counted per database: a database dropped since
    the last trim (its files gone) must not hide what another one grew."""
    node = node_factory("node-a", env={"STORAGE_TRIMINTERVAL": "1h"})
    storage = node.node.storage
    pad = "x" * 10_000

    def load(database: str) -> None:  # about 20 MB of records, more in the files
        node.call("create_database", database=database)
        node.call("create_table", database=database, table="big", primary_key="id")
        for first in range(0, 2_000, 100):
            node.call("insert", database=database, table="big",
                      records=[{"id": i, "pad": pad} for i in range(first, first + 100)])

    load("first")
    wait_for(lambda: storage.trims >= 1, timeout=20, message="a trim after the first load")
    node.call("drop_database", database="first")
    trims = storage.trims
    load("second")
    wait_for(lambda: storage.trims > trims, timeout=20,
             message="a trim after another database grew by more than 16 MiB")
