#!/usr/bin/env python3
"""hotcopy beside its peers: Python's sqlite3 (WAL, synchronous=FULL) and lmdb, in one run.

On a data set of N keys with 100-byte values, built once per system (not timed) and reused
by every round, the figures of issue 18:

1. open + first get of a random existing key in a fresh process (page cache warm; the time
   from just before the open to just after the get, the import left out), that process's
   peak RSS, and the peak RSS of a process that only imports the store's module;
2. random gets/s of one reader process alone, and with one writer process committing to the
   same store all the while (the writer's commits/s meanwhile are reported too);
3. total commits/s of 4 writer processes on one prefix / database, each writer's count, and
   the smallest share over the mean share (fair: every writer at least half the mean share);
4. commits/s of one writer, one key of 100 bytes per commit, with a raw ``os.write`` +
   ``os.fdatasync`` loop on a file in the same directory as the baseline.

Writers overwrite random existing keys, so the data set stays the same from round to round.
Every figure is taken for hotcopy, sqlite3 and lmdb in turn, round after round, so that drift
on a shared machine falls on all alike; the ratios are the median of the per-round ratios.
hotcopy's coordinator is kept running all along (this process holds the repository open), as
it is where several application processes share a repository.

    python scripts/bench_peers.py [--keys N] [--rounds R] [--seconds S] [--dir DIR] [--quick]
                                  [--json]

lmdb comes with the test extra: ``pip install '.[test]'``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import lmdb
from _peer_stores import (
    LMDB_DIR,
    LMDB_MAP_SIZE,
    PREFIX,
    SQLITE_FILE,
    SQLITE_PUT,
    STORES,
    RawLog,
    key_text,
)
from bench_storage import VALUE, build_prefix, filesystem_of
from demo import stop_coordinator
from hotcopy.storage import Repository

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SCHEMA_VERSION = 1
SYSTEMS = ("hotcopy", "sqlite3", "lmdb")
BATCH = 100_000  # keys per transaction when loading
SAMPLE = 1 << 18  # random keys a worker draws up front (so drawing them is not timed)
CHECK_EVERY = 64  # gets between two looks at the stop event
WRITERS = 4
READY_TIMEOUT = 1800.0  # seconds for a worker to open its store (hotcopy at 10M keys: minutes)
RESULT_TIMEOUT = 600.0

# The figures every system has, as the JSON names them (pinned by tests/test_bench_peers.py).
FIGURES = (
    "open_first_get_ms",
    "open_peak_rss_mib",
    "import_peak_rss_mib",
    "gets_per_s",
    "gets_per_s_with_writer",
    "writer_commits_per_s_during_gets",
    "writers4_commits_per_s",
    "writers4_min_share",
    "commits_per_s",
)


# -- loading (not timed) ------------------------------------------------------------------


def build_hotcopy(directory: Path, keys: int) -> None:
    build_prefix(directory, PREFIX, keys, VALUE, per_commit=BATCH)  # ends in a checkpoint


def build_sqlite(directory: Path, keys: int) -> None:
    conn = sqlite3.connect(directory / SQLITE_FILE, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        for start in range(0, keys, BATCH):
            conn.execute("BEGIN")
            rows = ((key_text(i), VALUE) for i in range(start, min(keys, start + BATCH)))
            conn.executemany(SQLITE_PUT, rows)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the state in the main file
    finally:
        conn.close()


def build_lmdb(directory: Path, keys: int) -> None:
    env = lmdb.open(str(directory / LMDB_DIR), map_size=LMDB_MAP_SIZE)
    try:
        for start in range(0, keys, BATCH):
            with env.begin(write=True) as txn:
                for i in range(start, min(keys, start + BATCH)):
                    txn.put(key_text(i).encode(), VALUE, append=True)  # keys come sorted
    finally:
        env.close()


BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "hotcopy": build_hotcopy,
    "sqlite3": build_sqlite,
    "lmdb": build_lmdb,
}


def warm(directory: Path) -> None:
    """Read every file of a store once: the open is measured with a warm page cache."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(4 * MiB):
                    pass


# -- 1: open + first get in a fresh process -------------------------------------------------


def run_child(*args: str) -> dict[str, Any]:
    """Run scripts/_peer_stores.py in a fresh process; its JSON line."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "_peer_stores.py"), *args],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,  # subprocess.run kills and reaps the child when it expires
    )
    if proc.returncode != 0:
        raise RuntimeError(f"_peer_stores.py {' '.join(args)} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def measure_open(system: str, directory: Path, keys: int, rng: random.Random) -> dict[str, float]:
    opened = run_child("open", system, str(directory), str(rng.randrange(keys)))
    if opened["value_bytes"] != len(VALUE):
        raise RuntimeError(f"{system}: the first get returned {opened['value_bytes']} bytes")
    imported = run_child("import", system)
    return {
        "open_first_get_ms": opened["seconds"] * 1000,
        "open_peak_rss_mib": opened["peak_rss_mib"],
        "import_peak_rss_mib": imported["peak_rss_mib"],
    }


# -- 2-4: reader and writer processes ------------------------------------------------------


def worker(
    system: str,
    directory: str,
    role: str,
    keys: int,
    seed: int,
    ready: Any,
    start: Any,
    stop: Any,
    results: Any,
) -> None:
    """A reader (random gets) or writer (one random key per commit) process: open, draw the
    keys, say ready, then work from ``start`` until ``stop``; put its count on ``results``."""
    try:
        store = STORES[system](directory, writer=role == "writer")
        try:
            rng = random.Random(seed)
            sample = [store.key(rng.randrange(keys)) for _ in range(min(keys, SAMPLE))]
            count = 0
            if role == "reader":
                if len(store.get(sample[0])) != len(VALUE):  # type: ignore[arg-type]
                    raise RuntimeError(f"{system}: a get returned a value of another size")
                get = store.get
                chunks = [sample[i : i + CHECK_EVERY] for i in range(0, len(sample), CHECK_EVERY)]
                ready.set()
                start.wait()
                began = time.perf_counter()
                for chunk in cycle(chunks):
                    if stop.is_set():
                        break
                    for key in chunk:
                        get(key)  # type: ignore[arg-type]
                    count += len(chunk)
            else:
                put = store.put
                ready.set()
                start.wait()
                began = time.perf_counter()
                for key in cycle(sample):
                    if stop.is_set():
                        break
                    put(key, VALUE)  # type: ignore[arg-type]
                    count += 1
            seconds = time.perf_counter() - began
        finally:
            store.close()
        results.put({"role": role, "seed": seed, "count": count, "seconds": seconds})
    except BaseException:
        results.put({"role": role, "seed": seed, "error": traceback.format_exc()})
        raise


def reap(procs: list[Any]) -> None:
    """Stop and wait for every worker: terminate, a grace period, then kill."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_workers(
    system: str, directory: Path, roles: list[str], keys: int, seconds: float
) -> tuple[list[dict[str, Any]], float]:
    """Run one process per role over a window of ``seconds``; their results (in role order)
    and the window as measured here."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process holding stores open
    start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs, readies = [], []
    try:
        for seed, role in enumerate(roles):
            ready = ctx.Event()
            proc = ctx.Process(
                target=worker,
                args=(system, str(directory), role, keys, seed, ready, start, stop, results),
                name=f"bench-peers-{system}-{role}-{seed}",
            )
            proc.start()
            procs.append(proc)
            readies.append(ready)
        deadline = time.monotonic() + READY_TIMEOUT
        for proc, ready in zip(procs, readies, strict=True):
            while not ready.wait(0.5):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} never got ready:\n{_errors(results)}")
        began = time.perf_counter()
        start.set()
        time.sleep(seconds)  # the measurement window itself, not a synchronisation
        stop.set()
        window = time.perf_counter() - began
        got = [results.get(timeout=RESULT_TIMEOUT) for _ in procs]
        failed = [entry["error"] for entry in got if "error" in entry]
        if failed:
            raise RuntimeError(f"a {system} worker failed:\n{failed[0]}")
        for proc in procs:
            proc.join(RESULT_TIMEOUT)
    finally:
        stop.set()
        start.set()
        reap(procs)
    return sorted(got, key=lambda entry: entry["seed"]), window


def _errors(results: Any) -> str:
    errors = []
    while not results.empty():
        entry = results.get()
        errors.append(entry.get("error", ""))
    return "\n".join(errors) or "(no traceback: the process died)"


def measure_gets(system: str, directory: Path, keys: int, seconds: float) -> dict[str, float]:
    (alone,), _ = run_workers(system, directory, ["reader"], keys, seconds)
    (reader, writer), _ = run_workers(system, directory, ["reader", "writer"], keys, seconds)
    return {
        "gets_per_s": alone["count"] / alone["seconds"],
        "gets_per_s_with_writer": reader["count"] / reader["seconds"],
        "writer_commits_per_s_during_gets": writer["count"] / writer["seconds"],
    }


def measure_writers(system: str, directory: Path, keys: int, seconds: float) -> dict[str, Any]:
    got, window = run_workers(system, directory, ["writer"] * WRITERS, keys, seconds)
    counts = [entry["count"] for entry in got]
    mean = statistics.fmean(counts)
    return {
        "writers4_commits_per_s": sum(counts) / window,
        "writers4_counts": counts,
        "writers4_min_share": min(counts) / mean if mean else 0.0,
    }


def measure_commits(system: str, directory: Path, keys: int, seconds: float) -> dict[str, float]:
    (writer,), _ = run_workers(system, directory, ["writer"], keys, seconds)
    return {"commits_per_s": writer["count"] / writer["seconds"]}


# -- the run ----------------------------------------------------------------------------------


def run_rounds(
    work: Path, keys: int, rounds: int, seconds: float, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Every figure for every system, alternated, ``rounds`` times; per system, one dict of
    figures per round (the raw baseline under its own name)."""
    dirs = {system: work / system for system in SYSTEMS}
    rng = random.Random(seed)
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in (*SYSTEMS, RawLog.name)}
    for _ in range(rounds):
        figures: dict[str, dict[str, Any]] = {name: {} for name in per_round}
        for system in SYSTEMS:
            figures[system] |= measure_open(system, dirs[system], keys, rng)
        for system in SYSTEMS:
            figures[system] |= measure_gets(system, dirs[system], keys, seconds)
        for system in SYSTEMS:
            figures[system] |= measure_writers(system, dirs[system], keys, seconds)
        for system in (*SYSTEMS, RawLog.name):
            directory = dirs.get(system, work)  # the raw log: beside the stores
            figures[system] |= measure_commits(system, directory, keys, seconds)
        for name, entry in figures.items():
            per_round[name].append(entry)
    return per_round


def summarize(per_round: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per figure and system: the rounds' values and their median; the median per-round
    ratios of hotcopy to the others."""
    figures: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for figure in FIGURES:
        values = {system: [r[figure] for r in per_round[system]] for system in SYSTEMS}
        figures[figure] = {
            system: {"rounds": v, "median": statistics.median(v)} for system, v in values.items()
        }
        if figure != "writers4_min_share":  # a fairness, not an amount: no ratio
            ratios[figure] = {
                f"hotcopy/{other}": _median_ratio(values["hotcopy"], values[other])
                for other in SYSTEMS[1:]
            }
    raw = [r["commits_per_s"] for r in per_round[RawLog.name]]
    figures["commits_per_s"][RawLog.name] = {"rounds": raw, "median": statistics.median(raw)}
    ratios["commits_per_s"][f"hotcopy/{RawLog.name}"] = _median_ratio(
        figures["commits_per_s"]["hotcopy"]["rounds"], raw
    )
    figures["writers4_counts"] = {
        system: [r["writers4_counts"] for r in per_round[system]] for system in SYSTEMS
    }
    return {"figures": figures, "ratios": ratios}


def _median_ratio(ours: list[float], theirs: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    return statistics.median(pairs) if pairs else None


# -- report -----------------------------------------------------------------------------------


def _span(values: list[float], digits: int | None) -> str:
    """``low-high`` (one value when they print alike); ``digits=None``: 3 significant."""

    def text(value: float) -> str:
        places = digits if digits is not None else 0 if value >= 100 else 2 - (value >= 10)
        return f"{value:,.{places}f}"

    low, high = text(min(values)), text(max(values))
    return low if low == high else f"{low}-{high}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


def print_table(report: dict[str, Any]) -> None:
    fs = report["filesystem"]
    print(
        f"{report['keys']:,} keys of {report['value_bytes']} B, {report['rounds']} round(s), "
        f"windows of {report['seconds']} s; {report['dir']} ({fs['fstype']} on {fs['source']})"
    )
    print(
        f"sqlite {report['sqlite_version']} (WAL, synchronous=FULL), lmdb {report['lmdb_version']}"
        f", Python {report['python']}, {report['cpus']} CPUs; values over rounds (min-max), "
        "ratios the median of per-round ratios"
    )
    keys = f"{report['keys']:,} keys"
    rows = [
        (f"open + first get, {keys} (ms)", "open_first_get_ms", None),
        ("peak RSS of that process (MiB)", "open_peak_rss_mib", 0),
        ("  a process that only imports (MiB)", "import_peak_rss_mib", 0),
        ("random gets/s, one reader", "gets_per_s", 0),
        ("  the same, one writer running", "gets_per_s_with_writer", 0),
        ("  that writer's commits/s", "writer_commits_per_s_during_gets", 0),
        (f"{WRITERS} writers, total commits/s", "writers4_commits_per_s", 0),
        ("  min share / mean share (>= 0.5)", "writers4_min_share", 2),
        ("one writer, small commits/s", "commits_per_s", 0),
    ]
    figures, ratios = report["figures"], report["ratios"]
    header = f"{'figure':<40}" + "".join(f" {s:>17}" for s in SYSTEMS)
    print(header + f"{'/sqlite3':>10}{'/lmdb':>10}")
    for label, figure, digits in rows:
        cells = "".join(f" {_span(figures[figure][s]['rounds'], digits):>17}" for s in SYSTEMS)
        r = ratios.get(figure, {})
        to_sqlite, to_lmdb = _ratio(r.get("hotcopy/sqlite3")), _ratio(r.get("hotcopy/lmdb"))
        print(f"{label:<40}{cells}{to_sqlite:>10}{to_lmdb:>10}")
    raw = figures["commits_per_s"][RawLog.name]["rounds"]
    print(
        f"{'  raw write+fdatasync, same dir':<40} {_span(raw, 0):>17}   hotcopy/raw "
        f"{_ratio(ratios['commits_per_s'][f'hotcopy/{RawLog.name}'])}"
    )
    print(
        f"{WRITERS} writers' commits per round: "
        + "; ".join(f"{s} {figures['writers4_counts'][s]}" for s in SYSTEMS)
    )
    for system in SYSTEMS:
        shares = figures["writers4_min_share"][system]["rounds"]
        verdict = "fair" if min(shares) >= 0.5 else "NOT fair (a writer got < half the mean)"
        print(f"  {system}: {verdict}")
    print(f"total {report['total_seconds']:.0f} s (loading {report['load_seconds']:.0f} s)")


# -- main -------------------------------------------------------------------------------------


def _stores_built(work: Path, keys: int) -> Iterator[str]:
    for system in SYSTEMS:
        directory = work / system
        directory.mkdir()
        print(f"loading {keys:,} keys into {system} ...", file=sys.stderr, flush=True)
        BUILDERS[system](directory, keys)
        warm(directory)
        yield system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, help="keys in each store (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every figure")
    parser.add_argument("--seconds", type=float, help="each measurement window (default 3)")
    parser.add_argument(
        "--dir", type=Path, help="where to put the data: a disk, not tmpfs (default: .)"
    )
    parser.add_argument("--quick", action="store_true", help="2,000 keys, 0.3 s windows (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    keys = args.keys or (2_000 if args.quick else 1_000_000)
    seconds = args.seconds or (0.3 if args.quick else 3.0)
    if keys < 1 or args.rounds < 1 or seconds <= 0:
        parser.error("--keys and --rounds must be at least 1, --seconds above 0")

    parent = (args.dir or Path.cwd()).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    fs = filesystem_of(parent)
    if fs["fstype"] in ("tmpfs", "ramfs"):
        parser.error(f"{parent} is on {fs['fstype']}: the stores must be on a disk (--dir)")
    need = keys * 1000 + 100 * MiB  # three stores, their WALs and the writers' growth
    if shutil.disk_usage(parent).free < need:
        parser.error(f"{parent} has less than the {need // MiB} MiB free this needs")
    work = Path(tempfile.mkdtemp(prefix="hotcopy-peers-", dir=parent))
    began = time.perf_counter()
    repo: Repository | None = None
    try:
        for system in _stores_built(work, keys):
            if system == "hotcopy":
                # Keep the coordinator up: every process opens a running repository.
                repo = Repository(work / "hotcopy")
        load_seconds = time.perf_counter() - began
        print(f"measuring, {args.rounds} round(s) ...", file=sys.stderr, flush=True)
        per_round = run_rounds(work, keys, args.rounds, seconds, args.seed)
    finally:
        if repo is not None:
            repo.close()
        if (work / "hotcopy").exists():
            stop_coordinator(work / "hotcopy")
        shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "keys": keys,
        "value_bytes": len(VALUE),
        "rounds": args.rounds,
        "seconds": seconds,
        "writers": WRITERS,
        "dir": str(work),
        "filesystem": fs,
        "python": sys.version.split()[0],
        "sqlite_version": sqlite3.sqlite_version,
        "lmdb_version": lmdb.__version__,
        "cpus": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **summarize(per_round),
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - began,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
