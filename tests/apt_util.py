"""``apt_get``: apt-get, one process at a time across the test workers.

The suite runs in several worker processes (pytest-xdist); two of them installing their
Debian packages at once (Chromium for the dashboard tests, iproute2 for the partition
tests) would fail on apt's locks. A file lock held around each call serializes them, and
apt waits for a dpkg lock some other program holds.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "harpsync-tests-apt.lock"


def apt_get(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``apt-get -o DPkg::Lock::Timeout=… args`` non-interactively, under the lock."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={int(timeout)}",
                                   *args], env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
