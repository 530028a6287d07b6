"""Cost of hash maintenance (storage/digest.py) on the insert path.

Storage level, in process (the default): the real insert jobs (``writes.write_records``,
batches of 500, 4 jobs in flight so they share group commits, as 4 HTTP clients do) on a
real LMDB, with maintenance on and off in alternating rounds, each round on a fresh
table. Alternating rounds and comparing the best of each side keeps the ratio robust on
a busy machine; the writer thread's CPU per row is printed too (what maintenance costs,
without the neighbours' share of the wall clock; the HTTP rows show the node process's).

``--http`` adds the end-to-end figure: a node process per round (``HARPSYNC_DIGEST``
on/off), 4 HTTP clients (``bench.verify.insert_rate``), alternating the same way.

Run: ``.venv/bin/python -m bench.digest`` (``--rows 100000 --rounds 5 --http``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import format_table
from harpsync.storage import digest, digest_reads, writes
from harpsync.storage.store import Storage

BATCH = 500
CLIENTS = 4


async def _insert(storage: Storage, table: str, rows: int) -> None:
    starts = list(range(0, rows, BATCH))

    async def client(mine: list[int]) -> None:
        for first in mine:
            records = [{"id": i, "name": f"rec-{i}", "n": i % 97}
                       for i in range(first, min(first + BATCH, rows))]
            await storage.write(writes.write_records(storage, "bench", table, records,
                                                     "insert", None))

    await asyncio.gather(*(client(starts[c::CLIENTS]) for c in range(CLIENTS)))


def count_writer_cpu(storage: Storage) -> list[float]:
    """Make the writer thread add the CPU seconds of every group it runs to the list."""
    spent = [0.0]
    run_group = storage.writer._run_group

    def timed(jobs: Any) -> None:
        began = time.thread_time()
        try:
            run_group(jobs)
        finally:
            spent[0] += time.thread_time() - began

    storage.writer._run_group = timed  # type: ignore[method-assign]
    return spent


def storage_round(storage: Storage, spent: list[float], table: str, rows: int,
                  maintained: bool) -> tuple[float, float]:
    """Rows/s and writer-thread CPU µs per row of one round on a fresh table."""
    digest.ENABLED = maintained

    async def run() -> tuple[float, float]:
        await storage.create_table("bench", table, "id")
        cpu = spent[0]
        began = time.perf_counter()
        await _insert(storage, table, rows)
        elapsed = time.perf_counter() - began
        return rows / elapsed, (spent[0] - cpu) / rows * 1e6

    try:
        return asyncio.run(run())
    finally:
        digest.ENABLED = True


def check(storage: Storage, table: str) -> bool:
    """Whether the maintained hashes of ``table`` equal a rebuild (rolled back)."""
    db, t = storage.table("bench", table)
    txn = db.env.begin(write=True)
    try:
        kept = digest_reads.buckets(txn, t)
        digest.rebuild(txn, t)
        return kept == digest_reads.buckets(txn, t)
    finally:
        txn.abort()


def storage_bench(rows: int, rounds: int) -> tuple[dict[bool, list[float]],
                                                   dict[bool, list[float]], bool]:
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="harpsync-digest-bench-") as tmp:
        storage = Storage(Path(tmp), "bench-node", 1 << 34)
        storage.open()
        try:
            spent = count_writer_cpu(storage)
            asyncio.run(storage.create_database("bench"))
            storage_round(storage, spent, "warm", min(rows, 20_000), True)
            for run in range(rounds):
                order = (False, True) if run % 2 == 0 else (True, False)
                for maintained in order:
                    rate, cpu = storage_round(storage, spent, f"t{run}{int(maintained)}", rows,
                                              maintained)
                    rates[maintained].append(rate)
                    cpus[maintained].append(cpu)
            same = check(storage, "t01")
        finally:
            storage.close()
    return rates, cpus, same


def http_bench(rows: int, rounds: int) -> tuple[dict[bool, list[float]],
                                                dict[bool, list[float]]]:
    from bench.verify import insert_rate

    rates: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="harpsync-digest-http-") as tmp:
        for run in range(rounds):
            order = (False, True) if run % 2 == 0 else (True, False)
            for maintained in order:
                rate, cpu = insert_rate(Path(tmp) / f"{run}-{int(maintained)}",
                                        f"ins-{run}-{int(maintained)}", maintained, rows)
                rates[maintained].append(rate)
                cpus[maintained].append(cpu)
    return rates, cpus


def summary(label: str, rates: dict[bool, list[float]], cpus: dict[bool, list[float]],
            ) -> list[list[str]]:
    """Best rate and least CPU of each side, and the median over the rounds of the cost
    measured within each round (an on and an off run back to back): on a busy machine
    the neighbours' load changes from round to round, much less within one."""
    on, off = max(rates[True]), max(rates[False])
    cpu_on, cpu_off = min(cpus[True]), min(cpus[False])
    paired = statistics.median(1 - a / b for a, b in zip(rates[True], rates[False], strict=True))
    paired_cpu = statistics.median(a / b - 1 for a, b in zip(cpus[True], cpus[False], strict=True))
    return [[f"{label}: maintenance on", f"{on:,.0f}", f"{cpu_on:.1f}",
             ", ".join(f"{r:,.0f}" for r in rates[True])],
            [f"{label}: maintenance off", f"{off:,.0f}", f"{cpu_off:.1f}",
             ", ".join(f"{r:,.0f}" for r in rates[False])],
            [f"{label}: cost of maintenance", f"{(1 - on / off) * 100:.1f}%",
             f"{(cpu_on / cpu_off - 1) * 100:.1f}%", "best rates / least CPU"],
            [f"{label}: cost, median of rounds", f"{paired * 100:.1f}%",
             f"{paired_cpu * 100:.1f}%", f"{len(rates[True])} rounds"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--http", action="store_true", help="also measure over HTTP")
    parser.add_argument("--http-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rates, cpus, same = storage_bench(args.rows, args.rounds)
    table = summary("storage, in process", rates, cpus)
    if args.http:
        table += summary("HTTP, 4 clients", *http_bench(args.rows, args.http_rounds))
    print(f"insert cost of hash maintenance ({args.rows:,} rows, batches of {BATCH}, "
          f"{CLIENTS} in flight); maintained == rebuilt: {same}")
    print(format_table(["measure", "rows/s (best)", "CPU µs/row (least)", "runs"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
