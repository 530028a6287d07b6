"""Process facts for ``system_information`` and ``/health``: RSS and disk use."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_used(root: Path) -> int:
    """Bytes actually allocated on disk under ``root`` (sparse LMDB maps count as used)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total
