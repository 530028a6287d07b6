"""Node information: ``system_information``."""

from __future__ import annotations

import os
import platform
import shutil
import time
from typing import Any

from harpsync import __version__, procinfo
from harpsync.dispatch import OpContext, Operation


async def system_information(ctx: OpContext, body: dict[str, Any]) -> dict[str, Any]:
    services = ctx.services
    root = services.config.root
    disk = shutil.disk_usage(root)
    info: dict[str, Any] = {
        "system": {
            "platform": platform.system().lower(), "hostname": platform.node(),
            "node_name": services.node_name, "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "node_name": services.node_name,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - services.started_at, 3),
        "memory": {"rss": procinfo.rss_bytes()},
        "disk": {"root": str(root), "used_by_root": procinfo.disk_used(root),
                 "size": disk.total, "free": disk.free},
        "databases": sorted(services.storage.databases),
    }
    wanted = body.get("attributes")
    if wanted:
        return {k: v for k, v in info.items() if k in wanted}
    return info


OPERATIONS = [Operation("system_information", system_information)]
