"""CSV bulk-load benchmark: ``csv_file_load`` of a 1,000,000-row file into a real node.

It writes the CSV (id, name, breed, age, weight, vaccinated: about 50 MB) to a temporary
directory, starts one node process, runs the load as a job and polls ``get_job`` (and the
node's RSS, every 50 ms) until it completes. It prints records/s from the job's own start
and end times, the node's RSS before and at its peak during the load, and its CPU
seconds. With ``--peer`` a second node replicates the table and the time until it holds
every record is printed as well.

Run: ``.venv/bin/python -m bench.csv_load`` (``--rows 100000`` for a quick run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import ADMIN, NodeProcess, cpu_seconds, fmt_num, format_table

BREEDS = ["Mutt", "Poodle", "Husky", "Lab", "Beagle", "Pug", "Terrier"]


def write_csv(path: Path, rows: int) -> int:
    """Write ``rows`` records; returns the file size in bytes."""
    with path.open("w") as out:
        out.write("id,name,breed,age,weight,vaccinated\n")
        for i in range(rows):
            out.write(f"{i},dog-{i},{BREEDS[i % 7]},{i % 17},{(i % 90) + 0.5},"
                      f"{'true' if i % 3 else 'false'}\n")
    return path.stat().st_size


def run(rows: int, peer: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="harpsync-csv-bench-") as tmp:
        work = Path(tmp)
        csv_path = work / "dogs.csv"
        size = write_csv(csv_path, rows)
        node = NodeProcess(work / "a", "csv-a")
        other = NodeProcess(work / "b", "csv-b") if peer else None
        for each in (node, other):
            if each is not None:  # peers dial each other on loopback
                each.extra_env["REPLICATION_URL"] = f"wss://127.0.0.1:{each.repl_port}"
        node.start()
        try:
            if other is not None:
                other.start()
                status, body = node.call(
                    "add_node", hostname=other.name, url=f"wss://127.0.0.1:{other.repl_port}",
                    verify_tls=False, authorization={"username": ADMIN[0],
                                                     "password": ADMIN[1]})
                assert status == 200, body
            status, body = node.call("create_table", database="bench", table="dog",
                                     primary_key="id")
            assert status == 200, body
            rss_before = node.rss_mib() or 0.0
            cpu_before = cpu_seconds(node.pid)
            status, body = node.call("csv_file_load", database="bench", table="dog",
                                     file_path=str(csv_path))
            assert status == 200, body
            job_id = body["job_id"]
            peak = rss_before
            started = time.monotonic()
            while True:
                peak = max(peak, node.rss_mib() or 0.0)
                status, found = node.call("get_job", id=job_id)
                assert status == 200, found
                record = found[0]
                if record["status"] != "IN_PROGRESS":
                    break
                time.sleep(0.05)
            wall = time.monotonic() - started
            assert record["status"] == "COMPLETE", record
            seconds = (record["end_datetime"] - record["start_datetime"]) / 1000.0
            cpu = cpu_seconds(node.pid) - cpu_before
            table = [
                ["rows", fmt_num(rows)],
                ["file size (MiB)", fmt_num(size / 2**20, 1)],
                ["job time (s)", fmt_num(seconds, 2)],
                ["records/s", fmt_num(rows / seconds)],
                ["wall time incl. polling (s)", fmt_num(wall, 2)],
                ["node RSS before (MiB)", fmt_num(rss_before, 1)],
                ["node RSS peak during load (MiB)", fmt_num(peak, 1)],
                ["node CPU (s)", fmt_num(cpu, 1)],
                ["job message", record["message"]],
            ]
            if other is not None:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    status, counted = other.call("sql", sql="SELECT COUNT(*) AS c FROM bench.dog")
                    if status == 200 and counted[0]["c"] == rows:
                        break
                    time.sleep(0.2)
                else:
                    raise SystemExit(f"the peer did not get every record: {counted}")
                table.append(["peer holds all (s after start)",
                              fmt_num(time.monotonic() - started, 2)])
                table.append(["peer RSS (MiB)", fmt_num(other.rss_mib(), 1)])
            print(format_table(["csv_file_load", "value"], table))
        finally:
            node.stop()
            if other is not None:
                other.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--peer", action="store_true", help="also replicate to a second node")
    args = parser.parse_args()
    run(args.rows, args.peer)


if __name__ == "__main__":
    main()
