"""Operations API benchmark: one real node against a bare Starlette echo ceiling.

Run from the repository root::

    .venv/bin/python -m bench.ops_api            # 1 s warm-up + 5 s per scenario
    .venv/bin/python -m bench.ops_api --quick    # 0.5 s + 2 s per scenario

It starts ``harpsync run`` as a subprocess on free ports with a fresh root, times the
start (spawn until ``describe_all`` answers 200), then loads it from a separate client
process with single-record inserts (1 and 16 clients), 100-record inserts (16 clients)
and ``search_by_id`` (16 clients). The same client loads an echo endpoint on uvicorn with
the node's settings at 1 and 16 clients; that is the ceiling each node figure is compared
with.

The ``peer`` section starts three more nodes (see ``bench/pair.py``): one alone and a pair
(origin with one live peer). Rounds of single-record inserts on the lone node and on the
origin alternate (1 and 16 clients) in three placements: unpinned; origin and lone node on
core 0 and the peer on core 1 with the load client free to use both; and the same with the
client on core 0 too, so that the peer has a core of its own (the pinned target applies to
that one: elsewhere the client competes with the peer only in the with-peer rounds). The
table shows each median and the with-peer fraction. Raw py-lmdb
synced single-record commits on the same disk, measured before and after those rounds,
are the second ceiling. The ``latency`` section times an insert on the origin until a
``search_by_id`` on the peer returns it. ``--code-root DIR`` runs the nodes from another
checkout (for before/after figures). It ends with a ``targets`` section of PASS/FAIL lines
and always exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/ops_api.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pair as pairs  # noqa: E402
from bench.common import (  # noqa: E402
    ADMIN,
    EchoProcess,
    LoadResult,
    NodeProcess,
    Scenario,
    cpu_seconds,
    fmt_num,
    format_table,
    rss_breakdown_mib,
    run_load,
    workdir,
)

DATABASE, TABLE = "bench", "dog"
SEARCH_ROWS = 10_000

# Targets for harpsync, and HarperDB 4.7.29's records/s on the same machine for reference.
TARGET_1 = 670
TARGET_16 = 3_000
TARGET_BATCH = 27_000
TARGET_ECHO_FRACTION = 0.60
TARGET_START_S = 1.5
TARGET_RSS_MIB = 120
REFERENCE = {"insert x1": 67, "insert x1 c16": 298, "insert x100": 2_674}
TARGET_SEARCH_ECHO = 0.60
TARGET_PEER = {1: 0.75, 16: 0.85}
TARGET_PEER_PINNED = 0.95
# Where the origin (or the lone node), its load client and the peer run in the ``peer``
# rounds. Only in the last does the peer have a core of its own: elsewhere the client
# shares the peer's core or moves between both.
UNPINNED = "unpinned"
CLIENT_FLOATS = "origin 0, peer 1, client both"
CLIENT_WITH_ORIGIN = "origin + client 0, peer 1"
MODES = (UNPINNED, CLIENT_FLOATS, CLIENT_WITH_ORIGIN)
TARGET_LMDB_FRACTION = 0.5
TARGET_LATENCY_P50_MS = 2.0
TARGET_LATENCY_P99_MS = 8.0


def _scenarios(clients: int) -> list[Scenario]:
    return [
        Scenario("insert 1 rec/POST", "insert", 1, 1, DATABASE, TABLE, id_base=10_000_000),
        Scenario("insert 1 rec/POST", "insert", clients, 1, DATABASE, TABLE,
                 id_base=100_000_000),
        Scenario("insert 100 rec/POST", "insert", clients, 100, DATABASE, TABLE,
                 id_base=1_000_000_000),
        Scenario("search_by_id 1 id", "search_by_id", clients, 1, DATABASE, TABLE,
                 search_ids=(0, SEARCH_ROWS)),
    ]


def _echo_scenarios(clients: int) -> list[Scenario]:
    # The echo endpoint receives the same single-record insert bodies as the node.
    return [Scenario("echo (ceiling)", "insert", n, 1, DATABASE, TABLE) for n in (1, clients)]


def _preload(node: NodeProcess) -> None:
    """Create the table and the rows that ``search_by_id`` reads."""
    status, body = node.call("create_database", database=DATABASE)
    if status != 200:
        print(f"note: create_database answered {status}: {body}")
    status, body = node.call("create_table", database=DATABASE, table=TABLE, primary_key="id")
    if status != 200:
        raise RuntimeError(f"create_table answered {status}: {body}")


def _preload_search_rows(node: NodeProcess) -> None:
    for start in range(0, SEARCH_ROWS, 1000):
        records = [{"id": i, "name": f"dog-{i}", "breed": "labrador", "age": i % 15,
                    "weight": 31.5} for i in range(start, start + 1000)]
        status, body = node.call("insert", database=DATABASE, table=TABLE, records=records)
        if status != 200:
            raise RuntimeError(f"preload insert answered {status}: {body}")


def _row(result: LoadResult, echo: dict[int, LoadResult]) -> list[str]:
    ceiling = echo.get(result.clients)
    fraction = (f"{100 * result.req_per_s / ceiling.req_per_s:.0f}%"
                if ceiling is not None and ceiling.req_per_s and result.label[:4] != "echo"
                else "-")
    cpu_share = (f"{100 * _cpu_per_req(ceiling) / _cpu_per_req(result):.0f}%"
                 if ceiling is not None and _cpu_per_req(ceiling) and _cpu_per_req(result)
                 and result.label[:4] != "echo" else "-")
    return [result.label, str(result.clients), fmt_num(result.req_per_s),
            fmt_num(result.rec_per_s), fmt_num(result.p50_ms, 2), fmt_num(result.p99_ms, 2),
            fraction, fmt_num(1e6 * _cpu_per_req(result), 0), cpu_share,
            fmt_num(result.server_cpu_pct), fmt_num(result.client_cpu_pct),
            fmt_num(result.rss_end_mib, 1), fmt_num(result.rss_peak_mib, 1), str(result.errors)]


HEADERS = ["scenario", "clients", "req/s", "records/s", "p50 ms", "p99 ms", "vs echo",
           "CPU us/req", "CPU vs echo", "srv CPU%", "cli CPU%", "RSS MiB", "peak MiB",
           "errors"]


def _cpu_per_req(result: LoadResult) -> float:
    """Server CPU seconds per request (steadier than req/s on a shared machine)."""
    if not result.server_cpu_s or not result.requests:
        return 0.0
    return result.server_cpu_s / result.requests


def _check(ok: bool, name: str, measured: str, reference: str = "") -> list[str]:
    return ["PASS" if ok else "FAIL", name, measured, reference]


def _peer_section(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternating node-alone and with-peer rounds, then the replication latency."""
    out: dict[str, Any] = {"rounds": {}, "lmdb": [], "latency": [], "counts": {}}
    lmdb_dir = tmp / "lmdb-ceiling"
    out["lmdb"].append(pairs.lmdb_synced_commits(lmdb_dir / "before", args.lmdb_seconds))
    pair = pairs.Pair(tmp / "pair", args.code_root)
    pair.start()
    out["counts"] = {"alone": pairs.count(pair.alone), "peer": pairs.count(pair.origin)}
    try:
        base = 2_000_000_000
        for mode in MODES if "peer" in args.sections else ():
            pair.pin(mode != UNPINNED)
            client_cores = {0} if mode == CLIENT_WITH_ORIGIN else None
            for clients in (1, args.clients):
                for _ in range(args.peer_rounds):
                    for which, node in (("alone", pair.alone), ("peer", pair.origin)):
                        base += 10_000_000
                        scenario = Scenario("insert 1 rec/POST", "insert", clients, 1,
                                            DATABASE, TABLE, id_base=base)
                        peer_cpu = cpu_seconds(pair.peer.pid)
                        commits = [pairs.writer_commits(n) for n in (node, pair.peer)]
                        result = run_load(scenario, node.port, ADMIN, args.warmup,
                                          args.duration, node.pid, client_cores)
                        if which == "peer":
                            pair.wait_synced()
                        # Commits over the whole round (warm-up, catch-up) per record
                        # written in it: the figure is about the ratio, not the rate.
                        records = max(1, pairs.count(node) - out["counts"][which])
                        out["counts"][which] = pairs.count(node)
                        after = [pairs.writer_commits(n) for n in (node, pair.peer)]
                        result.extra = {
                            "commits_per_rec": (after[0] - commits[0]) / records,
                            "peer_commits_per_rec": (after[1] - commits[1]) / records,
                            "peer_cpu": (cpu_seconds(pair.peer.pid) - peer_cpu)
                            / result.duration,
                            "cpu_ms_per_rec": 1000 * (result.server_cpu_s or 0.0)
                            / max(1, result.records)}
                        key = (mode, clients, which)
                        out["rounds"].setdefault(key, []).append(result)
        pair.pin(False)
        if "latency" in args.sections:
            out["latency"] = pairs.replication_latency(pair.origin, pair.peer,
                                                       args.latency_samples, 3_900_000_000)
    finally:
        pair.stop()
    out["lmdb"].append(pairs.lmdb_synced_commits(lmdb_dir / "after", args.lmdb_seconds))
    return out


def _peer_rows(peer: dict[str, Any], clients: int) -> tuple[list[list[str]], dict[Any, float]]:
    rows: list[list[str]] = []
    fractions: dict[Any, float] = {}
    for mode in MODES:
        for n in (1, clients):
            alone = peer["rounds"].get((mode, n, "alone"), [])
            withp = peer["rounds"].get((mode, n, "peer"), [])
            if not alone or not withp:
                continue
            a = pairs.median([r.rec_per_s for r in alone])
            w = pairs.median([r.rec_per_s for r in withp])
            fractions[(mode, n)] = w / a if a else 0.0
            cpu = pairs.median([r.extra["peer_cpu"] for r in withp])

            def med(runs: list[LoadResult], key: str) -> float:
                return pairs.median([r.extra[key] for r in runs])
            rows.append([
                mode, str(n),
                " / ".join(f"{r.rec_per_s:,.0f}" for r in alone), f"{a:,.0f}",
                " / ".join(f"{r.rec_per_s:,.0f}" for r in withp), f"{w:,.0f}",
                f"{100 * w / a:.0f}%" if a else "-",
                fmt_num(pairs.median([r.p50_ms for r in withp]), 2),
                f"{med(alone, 'cpu_ms_per_rec'):.2f} / {med(withp, 'cpu_ms_per_rec'):.2f}",
                f"{med(alone, 'commits_per_rec'):.2f} / {med(withp, 'commits_per_rec'):.2f}"
                f" / {med(withp, 'peer_commits_per_rec'):.2f}",
                f"{100 * cpu:.0f}",
            ])
    return rows, fractions


PEER_HEADERS = ["cores", "clients", "alone rec/s (rounds)", "median", "with peer (rounds)",
                "median", "with/alone", "p50 ms", "CPU ms/rec a/o", "commits/rec a/o/p",
                "peer CPU%"]


def _base_section(tmp: Path, args: argparse.Namespace, echo: dict[int, LoadResult],
                  results: list[LoadResult], starts: dict[str, float],
                  rss: dict[str, float | None],
                  parts: dict[str, dict[str, float]]) -> None:
    """The echo ceiling, then one fresh node: each scenario, start, stop, restart."""
    server = EchoProcess(tmp / "echo")
    starts["echo"] = server.start()
    try:
        for scenario in _echo_scenarios(args.clients):
            result = run_load(scenario, server.port, None, args.warmup, args.duration,
                              server.pid)
            echo[scenario.clients] = result
            results.append(result)
    finally:
        server.stop()

    node = NodeProcess(tmp / "node",
                       extra_env={"PYTHONPATH": args.code_root} if args.code_root else None)
    starts["fresh"] = node.start()
    try:
        rss["idle"] = node.rss_mib()
        parts["idle after start"] = rss_breakdown_mib(node.pid)
        _preload(node)
        for scenario in _scenarios(args.clients):
            if scenario.kind == "search_by_id":
                _preload_search_rows(node)
            results.append(run_load(scenario, node.port, ADMIN, args.warmup,
                                    args.duration, node.pid))
        time.sleep(0.5)  # let in-flight work settle before the final sample
        rss["after"] = node.rss_mib()
        parts["after the run"] = rss_breakdown_mib(node.pid)
    finally:
        starts["stop"] = node.stop()
    starts["restart"] = node.start()
    try:
        rss["restart"] = node.rss_mib()
        parts["after restart"] = rss_breakdown_mib(node.pid)
    finally:
        node.stop()


def _print_base(results: list[LoadResult], echo: dict[int, LoadResult],
                starts: dict[str, float], rss: dict[str, float | None],
                parts: dict[str, dict[str, float]]) -> None:
    rows = [_row(r, echo) for r in results]
    print(format_table(HEADERS, rows))
    print("\nvs echo: node requests/s as a fraction of the echo endpoint's at the same client"
          " count (echo bodies are single-record inserts); CPU vs echo: the echo's server CPU"
          " per request over the node's, the same fraction where the server is CPU-bound")
    print(f"start (fresh root, spawn to describe_all 200): {fmt_num(starts.get('fresh'), 3)} s;"
          f" restart with data: {fmt_num(starts.get('restart'), 3)} s;"
          f" stop (SIGTERM to exit): {fmt_num(starts.get('stop'), 3)} s;"
          f" echo server start: {fmt_num(starts.get('echo'), 3)} s")
    print(f"node RSS: idle after start {fmt_num(rss.get('idle'), 1)} MiB, after the run "
          f"{fmt_num(rss.get('after'), 1)} MiB, after restart {fmt_num(rss.get('restart'), 1)} MiB")
    for phase, split in parts.items():
        print(f"  {phase}: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()) + " MiB")
    if parts:
        print("  (RssAnon is the Python heap; RssFile counts mapped LMDB pages and libraries)")
    for result in results:
        if result.error_sample:
            print(f"errors in {result.label} x{result.clients}: {result.error_sample}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds before each scenario (default 1)")
    parser.add_argument("--quick", action="store_true", help="0.5 s warm-up, 2 s per scenario")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--sections", default="base,peer,latency",
                        help="comma-separated: base (echo and one node), peer (alone vs one "
                             "live peer, with the raw lmdb ceiling), latency (A to B)")
    parser.add_argument("--peer-rounds", type=int, default=2,
                        help="rounds of each alone / with-peer pair (default 2)")
    parser.add_argument("--lmdb-seconds", type=float, default=3.0,
                        help="seconds of raw lmdb synced commits, before and after (3)")
    parser.add_argument("--latency-samples", type=int, default=500,
                        help="inserts timed from origin to peer (500)")
    parser.add_argument("--code-root", default=None,
                        help="run the nodes from this checkout instead (before/after runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5
        args.lmdb_seconds, args.latency_samples = 2.0, 200
    args.sections = set(args.sections.split(","))

    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop_impl = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    print(f"harpsync operations API benchmark: {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, uvicorn http={http_impl} loop={loop_impl}, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per scenario")
    print("client: one separate process, one keep-alive HTTP/1.1 connection per client\n")

    echo: dict[int, LoadResult] = {}
    results: list[LoadResult] = []
    starts: dict[str, float] = {}
    rss: dict[str, float | None] = {}
    parts: dict[str, dict[str, float]] = {}
    failure: str | None = None
    peer: dict[str, Any] = {}
    with workdir("harpsync-bench-", keep=args.keep) as tmp:
        try:
            if "base" in args.sections:
                _base_section(tmp, args, echo, results, starts, rss, parts)
            if args.sections & {"peer", "latency"}:
                peer = _peer_section(tmp, args)
            if args.keep:
                print(f"kept {tmp}")
        except Exception as exc:  # a report, not a crash: show what failed and go on
            failure = f"{type(exc).__name__}: {exc}"

    if results:
        _print_base(results, echo, starts, rss, parts)
    peer_rows, fractions = _peer_rows(peer, args.clients) if peer else ([], {})
    lmdb_rate = pairs.median(peer.get("lmdb", []))
    latency = peer.get("latency", [])
    if peer_rows:
        print("\nsingle-record inserts, node alone against origin with one live peer "
              "(alternating rounds, medians)")
        print(format_table(PEER_HEADERS, peer_rows, left=1))
        print("p50 ms: request latency with the peer; CPU ms/rec: server CPU per record, "
              "alone / origin; commits/rec: synced group commits per record, alone / "
              "origin / peer; peer CPU%: the peer's CPU while the origin was loaded")
    if peer.get("lmdb"):
        print("raw py-lmdb synced single-record commits on the same disk: "
              + " / ".join(f"{x:,.0f}" for x in peer["lmdb"])
              + f" per s (median {lmdb_rate:,.0f})")
    if latency:
        print(f"insert on origin until visible on peer ({len(latency)} samples): "
              f"p50 {pairs.percentile(latency, 0.5):.2f} ms, "
              f"p99 {pairs.percentile(latency, 0.99):.2f} ms, "
              f"max {max(latency):.2f} ms")
    if failure:
        print(f"\nERROR: the benchmark did not complete: {failure}")

    by_key = {(r.label, r.clients): r for r in results}
    single_1 = by_key.get(("insert 1 rec/POST", 1))
    single_n = by_key.get(("insert 1 rec/POST", args.clients))
    batch_n = by_key.get(("insert 100 rec/POST", args.clients))
    ceiling = echo.get(args.clients)

    def rate(result: LoadResult | None) -> float:
        return result.rec_per_s if result else 0.0

    fraction = (single_n.req_per_s / ceiling.req_per_s
                if single_n and ceiling and ceiling.req_per_s else 0.0)
    measured_starts = [starts[k] for k in ("fresh", "restart") if k in starts]
    start_s = max(measured_starts) if measured_starts else float("inf")
    after = rss.get("after")
    errors = sum(r.errors for r in results)
    lines = [] if "base" not in args.sections else [
        _check(rate(single_1) >= TARGET_1, f"insert 1 rec/POST, 1 client >= {TARGET_1:,} rec/s",
               f"{rate(single_1):,.0f} rec/s", f"{REFERENCE['insert x1']} rec/s"),
        _check(rate(single_n) >= TARGET_16,
               f"insert 1 rec/POST, {args.clients} clients >= {TARGET_16:,} rec/s",
               f"{rate(single_n):,.0f} rec/s", f"{REFERENCE['insert x1 c16']} rec/s"),
        _check(rate(batch_n) >= TARGET_BATCH,
               f"insert 100 rec/POST, {args.clients} clients >= {TARGET_BATCH:,} rec/s",
               f"{rate(batch_n):,.0f} rec/s", f"{REFERENCE['insert x100']:,} rec/s"),
        _check(fraction >= TARGET_ECHO_FRACTION,
               f"insert 1 rec/POST, {args.clients} clients >= "
               f"{TARGET_ECHO_FRACTION:.0%} of echo", f"{fraction:.0%}"),
        _check(start_s < TARGET_START_S, f"start < {TARGET_START_S} s (fresh and restart)",
               f"{start_s:.3f} s" if start_s != float("inf") else "not started"),
        _check(after is not None and after < TARGET_RSS_MIB,
               f"RSS after the run < {TARGET_RSS_MIB} MiB",
               f"{after:.1f} MiB" if after is not None else "not measured"),
    ]
    peer_errors = sum(r.errors for runs in peer.get("rounds", {}).values() for r in runs)
    lines.append(_check(errors + peer_errors == 0 and failure is None,
                        "no request errors, run completed",
                        f"{errors + peer_errors} errors" + ("; incomplete" if failure else "")))
    search = by_key.get(("search_by_id 1 id", args.clients))
    if search and ceiling and ceiling.req_per_s:
        share = search.req_per_s / ceiling.req_per_s
        cpu = (_cpu_per_req(ceiling) / _cpu_per_req(search)
               if _cpu_per_req(search) else 0.0)
        lines.append(_check(share >= TARGET_SEARCH_ECHO,
                            f"search_by_id, {args.clients} clients >= "
                            f"{TARGET_SEARCH_ECHO:.0%} of echo",
                            f"{share:.0%} (CPU per request: {cpu:.0%})"))
    for (mode, n), share in sorted(fractions.items(), key=lambda kv: (MODES.index(kv[0][0]),
                                                                        kv[0][1])):
        if mode == CLIENT_FLOATS:
            continue  # shown in the table; the peer shares its core with the client there
        pinned = mode == CLIENT_WITH_ORIGIN
        want = TARGET_PEER_PINNED if pinned else TARGET_PEER.get(n, TARGET_PEER[16])
        lines.append(_check(share >= want, f"with one live peer"
                            f"{' on its own core' if pinned else ''}"
                            f", {n} client{'s' if n > 1 else ''} >= {want:.0%} of alone",
                            f"{share:.0%}"))
    alone_1 = peer.get("rounds", {}).get((UNPINNED, 1, "alone"), []) if peer else []
    if lmdb_rate and (alone_1 or single_1):
        lone = pairs.median([r.rec_per_s for r in alone_1]) if alone_1 else rate(single_1)
        measured = f"{lone:,.0f} of {lmdb_rate:,.0f} rec/s ({lone / lmdb_rate:.0%})"
        echo_1 = echo.get(1)
        if echo_1 and echo_1.req_per_s:
            # One client waits for each answer: an insert takes at least an echo round
            # trip plus one synced commit, one after the other, whatever the node does.
            bound = 1 / (1 / echo_1.req_per_s + 1 / lmdb_rate)
            measured += (f"; echo + commit bound {bound:,.0f} rec/s "
                         f"({bound / lmdb_rate:.0%} of raw), node at {lone / bound:.0%} of it")
        lines.append(_check(lone >= TARGET_LMDB_FRACTION * lmdb_rate,
                            f"lone node, 1 client >= {TARGET_LMDB_FRACTION:.0%} of raw lmdb "
                            "synced commits", measured))
    if latency:
        p50, p99 = pairs.percentile(latency, 0.5), pairs.percentile(latency, 0.99)
        lines.append(_check(p50 <= TARGET_LATENCY_P50_MS and p99 <= TARGET_LATENCY_P99_MS,
                            f"insert on A until visible on B: p50 <= {TARGET_LATENCY_P50_MS:g}"
                            f" ms, p99 <= {TARGET_LATENCY_P99_MS:g} ms",
                            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"))
    print("\ntargets")
    print(format_table(["", "target", "measured", "HarperDB 4.7.29"], lines, left=2))
    failed = sum(line[0] == "FAIL" for line in lines)
    print(f"\n{len(lines) - failed} of {len(lines)} targets met"
          + (f"; {failed} FAIL" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
