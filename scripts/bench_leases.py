#!/usr/bin/env python3
"""Benchmark hotcopy leases against filelock and fasteners, side by side in one run.

Figures:

* uncontended acquire+release latency (p50, p99, mean) of a hotcopy ``write`` lease,
  ``filelock.FileLock`` and ``fasteners.InterProcessReaderWriterLock`` (write lock), measured
  in interleaved rounds so that machine noise hits all three alike; printed as ratios;
* throughput of N client processes (default 8), each on its own prefix and all on one
  shared prefix;
* time from a holder's SIGKILL to a waiter's grant.

Run: ``.venv/bin/python scripts/bench_leases.py [--json]``. Not a test: no assertions
beyond sanity, and it takes ~20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fasteners
import filelock
from hotcopy.coordinator import Client, ProcessIdentity, connect, is_alive, read_status

CTX = multiprocessing.get_context("fork")


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


def _time_ops(op: Callable[[], None], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        op()
        out.append((clock() - start) / 1000.0)
    return out


def bench_latency(root: Path, lockdir: Path, iterations: int, rounds: int) -> dict[str, Any]:
    """Uncontended acquire+release, hotcopy vs filelock vs fasteners, interleaved rounds."""
    samples: dict[str, list[float]] = {"hotcopy": [], "filelock": [], "fasteners": []}
    file_lock = filelock.FileLock(str(lockdir / "filelock.lock"))
    rw_lock = fasteners.InterProcessReaderWriterLock(str(lockdir / "fasteners.lock"))
    with connect(root) as client:

        def hotcopy_op() -> None:
            client.lease("bench", "write").release()

        def filelock_op() -> None:
            file_lock.acquire()
            file_lock.release()

        def fasteners_op() -> None:
            rw_lock.acquire_write_lock()
            rw_lock.release_write_lock()

        ops = {"hotcopy": hotcopy_op, "filelock": filelock_op, "fasteners": fasteners_op}
        for op in ops.values():  # warm up caches, connections, files
            _time_ops(op, 500)
        per_round = max(1, iterations // rounds)
        for _ in range(rounds):
            for name, op in ops.items():
                samples[name].extend(_time_ops(op, per_round))
    result: dict[str, Any] = {}
    for name, values in samples.items():
        values.sort()
        result[name] = {
            "p50_us": round(_percentile(values, 0.50), 2),
            "p99_us": round(_percentile(values, 0.99), 2),
            "mean_us": round(statistics.fmean(values), 2),
            "n": len(values),
        }
    hot = result["hotcopy"]
    result["ratios"] = {
        f"hotcopy/{base}_{stat}": round(hot[stat] / result[base][stat], 3)
        for base in ("filelock", "fasteners")
        for stat in ("p50_us", "mean_us")
    }
    return result


def _throughput_child(
    root: Path, prefix: str, mode: str, barrier: Any, stop_at: Any, counts: Any, index: int
) -> None:
    with connect(root) as client:
        barrier.wait(30.0)
        deadline = stop_at.value
        done = 0
        clock = time.monotonic
        while True:
            for _ in range(50):
                client.lease(prefix, mode).release()
            done += 50
            if clock() >= deadline:
                break
        counts[index] = done


def bench_throughput(
    root: Path, processes: int, seconds: float, shared: bool, mode: str
) -> dict[str, Any]:
    """Total acquire+release per second of ``processes`` client processes."""
    barrier = CTX.Barrier(processes + 1)
    stop_at = CTX.RawValue("d", 0.0)
    counts = CTX.RawArray("q", processes)
    procs = [
        CTX.Process(
            target=_throughput_child,
            args=(
                root,
                "shared" if shared else f"own-{i}",
                mode,
                barrier,
                stop_at,
                counts,
                i,
            ),
        )
        for i in range(processes)
    ]
    try:
        for proc in procs:
            proc.start()
        stop_at.value = time.monotonic() + 1.0 + seconds  # set before anyone passes the barrier
        barrier.wait(30.0)
        started = time.monotonic()
        for proc in procs:
            proc.join(seconds + 60.0)
        elapsed = time.monotonic() - started
    finally:
        _reap(procs)
    total = sum(counts)
    return {
        "processes": processes,
        "prefix": "shared" if shared else "one per process",
        "mode": mode,
        "ops": total,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(total / elapsed),
    }


def _holder(root: Path, ready: Any) -> None:
    with connect(root) as client:
        client.lease("victim", "write")
        ready.set()
        threading.Event().wait()  # hold until killed


def _wait_for_grant(client: Client, granted: list[float]) -> None:
    with client.lease("victim", "write", timeout=30.0):
        granted.append(time.monotonic())


def bench_kill_to_grant(root: Path, trials: int) -> dict[str, Any]:
    """Time from SIGKILL of a holder to the grant of the queued waiter."""
    delays = []
    with connect(root) as client:
        for _ in range(trials):
            ready = CTX.Event()
            proc = CTX.Process(target=_holder, args=(root, ready))
            try:
                proc.start()
                if not ready.wait(30.0):
                    raise RuntimeError("holder did not start")
                granted: list[float] = []
                thread = threading.Thread(target=_wait_for_grant, args=(client, granted))
                thread.start()
                _wait_until(lambda: read_status(str(root)).waiters.get("victim") == 1)
                killed = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
                thread.join(30.0)
                delays.append((granted[0] - killed) * 1000.0)
            finally:
                _reap([proc])
    delays.sort()
    return {
        "trials": trials,
        "median_ms": round(statistics.median(delays), 2),
        "max_ms": round(delays[-1], 2),
    }


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def _reap(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextlib.contextmanager
def _repository(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="hotcopy-bench-") as tmp:
        root = Path(tmp)
        try:
            yield root
        finally:
            status = read_status(str(root))
            if status.pid is not None:
                identity = ProcessIdentity.of(status.pid)
                os.kill(status.pid, signal.SIGTERM)
                if identity is not None:
                    _wait_until(lambda: not is_alive(identity), 10.0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the figures (or one JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20000, help="latency samples each")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    parser.add_argument("--processes", type=int, default=8, help="throughput clients")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput duration")
    parser.add_argument("--kill-trials", type=int, default=5, help="SIGKILL-to-grant trials")
    parser.add_argument("--root", help="repository root to use (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    with _repository(args.root) as root, tempfile.TemporaryDirectory() as lockdir:
        report: dict[str, Any] = {
            "latency": bench_latency(root, Path(lockdir), args.iterations, args.rounds),
            "throughput": [
                bench_throughput(root, args.processes, args.seconds, False, "write"),
                bench_throughput(root, args.processes, args.seconds, True, "read"),
                bench_throughput(root, args.processes, args.seconds, True, "write"),
            ],
            "kill_to_grant": bench_kill_to_grant(root, args.kill_trials),
            "cpus": os.cpu_count(),
        }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    lat = report["latency"]
    print("uncontended acquire+release (µs)      p50      p99     mean")
    for name in ("hotcopy", "filelock", "fasteners"):
        row = lat[name]
        print(f"  {name:<34} {row['p50_us']:>7} {row['p99_us']:>8} {row['mean_us']:>8}")
    for key, value in lat["ratios"].items():
        print(f"  ratio {key:<30} {value:>7}")
    print("throughput")
    for row in report["throughput"]:
        print(
            f"  {row['processes']} processes, {row['prefix']:<15} {row['mode']:<6}"
            f" {row['ops_per_s']:>8} acquire+release/s"
        )
    kill = report["kill_to_grant"]
    print(
        f"holder SIGKILL -> waiter grant: median {kill['median_ms']} ms, "
        f"max {kill['max_ms']} ms over {kill['trials']} trials"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
