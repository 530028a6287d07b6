"""harpsync: a replicated database node with a HarperDB-style operations API."""

from __future__ import annotations

__version__ = "0.1.0"
