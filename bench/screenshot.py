"""Screenshot of the dashboard: a 3-node mesh under write load, saved as docs/dashboard.png.

Starts three node processes on 127.0.0.1 (ports picked by the OS), joins them into a full
mesh, writes to two of them at a rate that rises and falls (so the throughput sparklines
have a shape), opens ``/dashboard`` on the first in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), waits ``--seconds``, and saves the page.

Run: ``.venv/bin/python -m bench.screenshot`` (``--out FILE``, ``--seconds N``,
``--pause`` to also pause one link so a paused line shows).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path

from tests.browser_util import chromium, ensure_chromium, link_states, sign_in
from tests.helpers import ADMIN, ProcessNode, wait_for

REPO = Path(__file__).resolve().parent.parent
NAMES = ("node-a", "node-b", "node-c")


def _load(node: ProcessNode, table: str, stop: threading.Event, phase: float) -> None:
    """Insert batches of 20 records at a rate that swings between about 20 and 200 a second."""
    started = time.monotonic()
    next_id = 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        per_second = 110 + 90 * math.sin(elapsed / 8 + phase)
        batch = [{"id": f"{node.name}-{next_id + i}", "value": i, "at": time.time()}
                 for i in range(20)]
        next_id += len(batch)
        try:
            node.post({"operation": "upsert", "database": "data", "table": table,
                       "records": batch})
        except Exception:  # the node may be busy; the picture only needs a load
            pass
        stop.wait(len(batch) / per_second)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=70.0,
                        help="load time before the screenshot (sparkline history)")
    parser.add_argument("--pause", action="store_true", help="pause node-c → node-b first")
    args = parser.parse_args(argv)
    reason = ensure_chromium()
    if reason is not None:
        print(f"cannot take the screenshot: {reason}")
        return 1
    with tempfile.TemporaryDirectory(prefix="harpsync-screenshot-") as tmp:
        # The tests' 200 ms keepalive is too eager for a loaded machine; use the default.
        nodes = [ProcessNode(name, Path(tmp) / name, {"REPLICATION_PINGINTERVAL": "1000"})
                 for name in NAMES]
        stop = threading.Event()
        writers: list[threading.Thread] = []
        try:
            threads = [threading.Thread(target=n.start) for n in nodes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            a = nodes[0]
            for table in ("orders", "events", "users"):
                a.call("create_table", database="data", table=table, primary_key="id")
            a.call("insert", database="data", table="users",
                   records=[{"id": i, "name": f"user-{i}"} for i in range(250)])
            for other in nodes[1:]:
                a.call("add_node", hostname=other.name, url=other.repl_url, verify_tls=False,
                       authorization={"username": ADMIN[0], "password": ADMIN[1]})
            writers = [threading.Thread(target=_load, args=(nodes[0], "orders", stop, 0.0)),
                       threading.Thread(target=_load, args=(nodes[1], "events", stop, 2.0))]
            for w in writers:
                w.start()
            if args.pause:
                wait_for(lambda: nodes[1].call("cluster_status", expect=None)
                         .get("connections"), timeout=30, message="node-b linked")
                nodes[1].call("pause_replication", hostname="node-c")
            with chromium(1440, 960) as driver:
                sign_in(driver, a.url, *ADMIN)
                wait_for(lambda: len(link_states(driver)) == 6, timeout=30,
                         message="six links drawn")
                stop.wait(args.seconds)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
        finally:
            stop.set()
            for w in writers:
                w.join()
            for node in nodes:
                node.close()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
