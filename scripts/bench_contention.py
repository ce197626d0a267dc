"""Writers that contend for one prefix: commits/s in all, each writer's share, commit latency.

Each writer is a process of its own that commits small changes to the same prefix for the
window; every quantum given (``HOTCOPY_LEASE_QUANTUM_MS``, how long a writer keeps the write
lease that others queue for) is measured in turn, round after round, so drift falls on all.

    python scripts/bench_contention.py --dir /work/tmp/contention --quanta 0,1,2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITER = r"""
import json, sys, time
from hotcopy.storage import Repository

root, start, seconds, name = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with Repository(root) as repo:
    prefix = repo.open_prefix("p", "rw")
    while time.time() < start:  # all writers begin together
        time.sleep(0.001)
    latencies = []
    while time.time() < start + seconds:
        began = time.perf_counter()
        prefix[f"{name}-{len(latencies) % 100}"] = b"v" * 100
        prefix.commit()
        latencies.append(time.perf_counter() - began)
print(json.dumps(latencies))
"""


def measure(directory: Path, writers: int, seconds: float, quantum_ms: float) -> dict[str, float]:
    from hotcopy.storage import Repository

    root = Path(tempfile.mkdtemp(dir=directory))
    try:
        with Repository.init(root) as repo:
            prefix = repo.open_prefix("p", "rw")
            prefix["start"] = 1
            prefix.commit()
        env = {**os.environ, "HOTCOPY_LEASE_QUANTUM_MS": str(quantum_ms)}
        start = time.time() + 1.0
        children = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(root), str(start), str(seconds), str(n)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for n in range(writers)
        ]
        try:
            each = [json.loads(child.communicate(timeout=seconds + 60)[0]) for child in children]
        finally:
            for child in children:
                child.kill()
                child.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts = [len(latencies) for latencies in each]
    every = sorted(latency for latencies in each for latency in latencies)
    return {
        "commits_per_s": sum(counts) / seconds,
        "min_share": min(counts) / (sum(counts) / writers),
        "p50_ms": statistics.median(every) * 1e3,
        "p99_ms": every[int(len(every) * 0.99)] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="where to put the data (a disk, not tmpfs)")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quanta", default="0,1,2", help="quanta in ms, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    quanta = [float(q) for q in args.quanta.split(",")]
    results: dict[float, list[dict[str, float]]] = {q: [] for q in quanta}
    for _ in range(args.rounds):
        for quantum in quanta:
            results[quantum].append(measure(directory, args.writers, args.seconds, quantum))
    if args.json:
        print(json.dumps({"schema": 1, "writers": args.writers, "results": results}))
        return
    print(f"{args.writers} writers on one prefix, {args.seconds:g} s windows, {args.rounds} rounds")
    print(f"{'quantum':>8} {'commits/s':>18} {'min share':>10} {'p50 ms':>12} {'p99 ms':>12}")
    for quantum, runs in results.items():

        def span(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            values = [run[key] for run in runs]
            return f"{format(min(values), fmt)}-{format(max(values), fmt)}"

        print(
            f"{quantum:>6g}ms {span('commits_per_s', ',.0f'):>18} {span('min_share', '.2f'):>10}"
            f" {span('p50_ms', '.2f'):>12} {span('p99_ms', '.1f'):>12}"
        )


if __name__ == "__main__":
    main()
