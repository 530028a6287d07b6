"""Typing: ``mypy --strict`` (configured in pyproject.toml) is clean on the packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]')")
def test_mypy_strict_is_clean():
    """mypy --strict reports no error on harpsync/ and operations/."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(REPO / ".mypy_cache"), "harpsync", "operations"],
        cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
