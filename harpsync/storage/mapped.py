"""Releasing this process's mappings of LMDB pages (``MADV_DONTNEED``), and the lock that
keeps a release from advising a range an environment closed meanwhile."""

from __future__ import annotations

import ctypes
import threading

_MADV_DONTNEED = 4
# Held while a trim advises the ranges it read from /proc/self/maps, and while an
# environment closes: a map closed in between frees its range, which the next mmap
# (malloc's, Python's arenas) may take, and MADV_DONTNEED empties anonymous memory.
MAPS_LOCK = threading.Lock()


def release_mapped_pages(data_files: set[str]) -> int:
    """Drop this process's mapping of LMDB pages it has touched; returns bytes advised.

    With ``writemap`` off, LMDB maps its file read-only and shared, so those pages are
    page cache: ``MADV_DONTNEED`` only unmaps them from this process (a later read
    refaults them from the cache, no disk I/O). Without it a node's RSS grows with
    every page it ever read or copied, i.e. with the size of its tables. Linux only;
    elsewhere it does nothing.
    """
    with MAPS_LOCK:
        return _release(data_files)


def _release(data_files: set[str]) -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return 0
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1] != "r--s" or parts[5].strip() not in data_files:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                        _MADV_DONTNEED) == 0:
            advised += end - start
    return advised
