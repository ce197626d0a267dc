#!/usr/bin/env python3
"""Storage benchmarks: small-commit rate and latency against raw append+fsync, and prefix open cost.

Everything is measured in one run so the ratios are meaningful on a noisy shared machine:

1. Commit rate of one writer, one ~100-byte key per commit, default checkpoint threshold (each
   round holds exactly one checkpoint per ``checkpoint_bytes`` of WAL), against a raw loop of
   ``os.write`` of a record of the same size as the WAL frame + ``os.fdatasync`` (and ``os.fsync``)
   appending to a file in the same directory, and (stricter, as hotcopy reserves its WAL ahead)
   the same records + ``fdatasync`` into preallocated space. The variants run in interleaved
   blocks of 500
   commits; three rounds, medians reported, plus CPU time per commit (robust to disk noise).
2. Commit latency p50/p99/max of those loops.
3. Open time of a prefix of 1 GiB of 1 MiB values and of one with 1,000,000 small keys, in a
   fresh process, warm and (as root) cold, with peak RSS and bytes read.

Usage: bench_storage.py [--dir DIR] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotcopy.storage import Prefix, Repository
from hotcopy.storage._prefix import DEFAULT_CHECKPOINT_BYTES

MiB = 1 << 20
VALUE = b"v" * 100  # the ~100-byte value of each small commit
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# -- helpers ------------------------------------------------------------------------------


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, type and source of the filesystem holding ``path`` (from mountinfo)."""
    real = str(path.resolve())
    best = {"mount": "", "fstype": "?", "source": "?"}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        mount = left.split()[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best["mount"]):  # the last, deepest mount wins
            fstype, source = right.split()[:2]
            best = {"mount": mount, "fstype": fstype, "source": source}
    return best


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_us": percentile(ordered, 0.50) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "max_us": ordered[-1] * 1e6,
    }


def drop_caches() -> bool:
    """Flush and drop the page cache (root only); False when not permitted."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


# -- 1 + 3: small commits -----------------------------------------------------------------


class RawWriter:
    """Baseline: append a record of the WAL frame's size, then ``sync`` it.

    With ``preallocate``, the file's first ``preallocate`` bytes are reserved up front and the
    records overwrite them (no size change per record, as hotcopy's WAL does): the strictest
    baseline, every sync only the data.
    """

    def __init__(
        self, path: Path, record: bytes, sync: Callable[[int], None], preallocate: int = 0
    ) -> None:
        self.path = path
        self.record = record
        self.sync = sync
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.pos = 0
        if preallocate:
            os.posix_fallocate(self.fd, 0, preallocate)
            os.fsync(self.fd)

    def loop(self, n: int) -> list[float]:
        latencies = []
        clock = time.perf_counter
        fd, record, sync = self.fd, self.record, self.sync
        pos = self.pos
        for _ in range(n):
            start = clock()
            os.pwrite(fd, record, pos)
            pos += len(record)
            sync(fd)
            latencies.append(clock() - start)
        self.pos = pos
        return latencies

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()


class HotcopyWriter:
    """One long-lived writer committing one small key per commit."""

    def __init__(self, root: Path) -> None:
        self.repo = Repository.init(root)
        self.prefix: Prefix = self.repo.open_prefix("small", "rw")
        self.main = root / "small.hc"
        self.wal = root / "small.hc-wal"
        self.i = 0
        self.checkpoints = 0

    def commit_one(self) -> None:
        self.prefix[f"k{self.i:011d}"] = VALUE
        self.prefix.commit()
        self.i += 1

    def frame_size(self) -> int:
        """Bytes one small commit appends to the WAL (measured, not assumed)."""
        before = self._wal_used()
        self.commit_one()
        return self._wal_used() - before

    def _wal_used(self) -> int:
        # Not the file's size: that includes space reserved ahead, which reads as zeros.
        return len(self.wal.read_bytes().rstrip(b"\0"))

    def loop(self, n: int) -> list[float]:
        latencies = []
        clock = time.perf_counter
        main_before = self.main.stat().st_size
        for _ in range(n):
            start = clock()
            self.commit_one()
            latencies.append(clock() - start)
        # A checkpoint moves >= checkpoint_bytes (and < twice that) into the main file.
        self.checkpoints += (self.main.stat().st_size - main_before) // DEFAULT_CHECKPOINT_BYTES
        return latencies

    def close(self) -> None:
        self.repo.close()


def bench_commits(
    work: Path, rounds: int, checkpoints_per_round: int, block: int = 500
) -> dict[str, Any]:
    """Rounds of ``n`` commits per variant, run in interleaved blocks of ``block`` commits.

    Fine interleaving makes disk and CPU interference from other users of the machine fall on
    every variant alike; a round's rate is its commits over the summed time of its blocks, so
    the hotcopy figure includes the checkpoint(s) of each round.
    """
    hot = HotcopyWriter(work / "commit-repo")
    for _ in range(100):  # warm up: files, lock files, code paths
        hot.commit_one()
    frame = hot.frame_size()
    n = -(-DEFAULT_CHECKPOINT_BYTES // frame) * checkpoints_per_round
    n -= n % -block  # whole blocks
    record = b"r" * frame
    writers: dict[str, RawWriter | HotcopyWriter] = {
        "raw write+fdatasync": RawWriter(work / "raw-fdatasync.log", record, os.fdatasync),
        "raw write+fsync": RawWriter(work / "raw-fsync.log", record, os.fsync),
        "raw prealloc+fdatasync": RawWriter(
            work / "raw-prealloc.log", record, os.fdatasync, preallocate=n * rounds * frame
        ),
        "hotcopy commit": hot,
    }
    names = list(writers)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(rounds):
            wall = dict.fromkeys(names, 0.0)
            busy = dict.fromkeys(names, 0.0)
            for b in range(n // block):
                turn = b % len(names)
                for name in names[turn:] + names[:turn]:  # rotate the order
                    cpu_start, start = time.process_time(), time.perf_counter()
                    latencies[name] += writers[name].loop(block)
                    wall[name] += time.perf_counter() - start
                    busy[name] += time.process_time() - cpu_start
            for name in names:
                rates[name].append(n / wall[name])
                cpu[name].append(busy[name] / n)
    finally:
        for writer in writers.values():
            writer.close()
    result: dict[str, Any] = {
        "record_bytes": frame,
        "commits_per_round": n,
        "block": block,
        "rounds": rounds,
        "checkpoint_bytes": DEFAULT_CHECKPOINT_BYTES,
        "hotcopy_checkpoints": hot.checkpoints,
        "variants": {},
    }
    for name in names:
        result["variants"][name] = {
            "rate_per_round": rates[name],
            "median_per_s": statistics.median(rates[name]),
            "cpu_us": statistics.median(cpu[name]) * 1e6,  # user+sys CPU per commit: less noisy
            **latency_stats(latencies[name]),
        }
    bases = {
        "ratio_fdatasync": "raw write+fdatasync",
        "ratio_fsync": "raw write+fsync",
        "ratio_prealloc": "raw prealloc+fdatasync",
    }
    for key, base in bases.items():
        # Ratio per round (same moments, same noise), then the median of those.
        pairs = zip(rates["hotcopy commit"], rates[base], strict=True)
        result[key] = statistics.median(h / b for h, b in pairs)
    return result


# -- 2: open cost ---------------------------------------------------------------------------


def build_prefix(root: Path, name: str, keys: int, value: bytes, per_commit: int) -> int:
    """Fill prefix ``name`` with large commits and a final checkpoint; return its file size."""
    with Repository.init(root) as repo:
        px = repo.open_prefix(name, "rw")
        for start in range(0, keys, per_commit):
            for i in range(start, min(keys, start + per_commit)):
                px[f"key-{i:08d}"] = value
            px.commit()
        px.checkpoint()
    return (root / f"{name}.hc").stat().st_size


def read_io() -> dict[str, int]:
    fields = (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {key: int(value) for key, value in fields}


def peak_rss_mib() -> float:
    """Peak RSS of this process's own memory (``VmHWM``).

    ``ru_maxrss`` would be wrong here: Linux carries it over fork and exec, so a child started by
    a large parent reports the parent's peak. ``VmHWM`` belongs to the address space exec made.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_child(root: str, name: str) -> None:
    """Run in a fresh process: open the prefix once, print JSON measurements."""
    rss_before = peak_rss_mib()
    io_before = read_io()
    start = time.perf_counter()
    repo = Repository(root)
    px = repo.open_prefix(name, "r")
    elapsed = time.perf_counter() - start
    io_after = read_io()
    rss_after = peak_rss_mib()
    keys = len(px)
    repo.close()
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "keys": keys,
                "rss_before_mib": rss_before,
                "peak_rss_mib": rss_after,
                "rchar_mib": (io_after["rchar"] - io_before["rchar"]) / MiB,
                "read_bytes_mib": (io_after["read_bytes"] - io_before["read_bytes"]) / MiB,
            }
        )
    )


def measure_open(root: Path, name: str, cold: bool) -> dict[str, Any] | None:
    if cold and not drop_caches():
        return None
    out = subprocess.run(
        [sys.executable, __file__, "--open-child", str(root), name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def bench_open(work: Path, quick: bool, reps: int) -> dict[str, Any]:
    root = work / "open-repo"
    big_keys = 128 if quick else 1024
    small_keys = 100_000 if quick else 1_000_000
    cases = {
        f"{big_keys} x 1 MiB": ("big", big_keys, os.urandom(MiB), 64),
        f"{small_keys:,} x 16 B": ("many", small_keys, b"s" * 16, 100_000),
    }
    results: dict[str, Any] = {}
    for label, (name, keys, value, per_commit) in cases.items():
        start = time.perf_counter()
        size = build_prefix(root, name, keys, value, per_commit)
        built = time.perf_counter() - start
        measure_open(root, name, cold=False)  # warm the page cache
        runs: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
        for _ in range(reps):
            for mode in ("cold", "warm"):
                run = measure_open(root, name, cold=mode == "cold")
                if run is not None:
                    runs[mode].append(run)
        entry: dict[str, Any] = {"keys": keys, "file_mib": size / MiB, "build_s": built}
        for mode, mode_runs in runs.items():
            if not mode_runs:
                entry[mode] = None
                continue
            median = statistics.median_low(r["seconds"] for r in mode_runs)
            best = next(r for r in mode_runs if r["seconds"] == median)
            assert best["keys"] == keys, best
            entry[mode] = {**best, "runs_s": [r["seconds"] for r in mode_runs]}
        results[label] = entry
    return results


# -- report -----------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    fs = report["filesystem"]
    print(f"data dir: {report['dir']}  ({fs['fstype']} on {fs['source']}, mount {fs['mount']})")
    c = report["commits"]
    print(
        f"\nSmall commits: {c['record_bytes']} B/commit, {c['rounds']} rounds of "
        f"{c['commits_per_round']:,} commits per variant in interleaved blocks of {c['block']}; "
        f"hotcopy checkpoints: {c['hotcopy_checkpoints']} (every {c['checkpoint_bytes'] // MiB} "
        "MiB of WAL)"
    )
    print(
        f"{'variant':<22}{'median/s':>10}{'CPU us':>8}{'p50 us':>8}{'p99 us':>8}{'max us':>9}"
        "  per round /s"
    )
    for name, v in c["variants"].items():
        rounds = " ".join(f"{r:.0f}" for r in v["rate_per_round"])
        print(
            f"{name:<22}{v['median_per_s']:>10.0f}{v['cpu_us']:>8.0f}{v['p50_us']:>8.0f}"
            f"{v['p99_us']:>8.0f}{v['max_us']:>9.0f}  {rounds}"
        )
    print(
        f"ratio hotcopy/raw: {c['ratio_fdatasync']:.2f} vs fdatasync, "
        f"{c['ratio_fsync']:.2f} vs fsync (median of per-round ratios; target >= 0.8); "
        f"{c['ratio_prealloc']:.2f} vs fdatasync into preallocated space"
    )
    print("\nOpen of a prefix in a fresh process (Repository(root).open_prefix(name, 'r')):")
    print(
        f"{'prefix':<22}{'file MiB':>9}{'mode':>6}{'open s':>9}{'peak MiB':>10}"
        f"{'base MiB':>10}{'rchar MiB':>11}{'disk MiB':>10}"
    )
    for label, entry in report["open"].items():
        for mode in ("warm", "cold"):
            run = entry[mode]
            if run is None:
                print(f"{label:<22}{entry['file_mib']:>9.0f}{mode:>6}  (not permitted)")
                continue
            print(
                f"{label:<22}{entry['file_mib']:>9.0f}{mode:>6}{run['seconds']:>9.3f}"
                f"{run['peak_rss_mib']:>10.0f}{run['rss_before_mib']:>10.0f}"
                f"{run['rchar_mib']:>11.1f}{run['read_bytes_mib']:>10.1f}"
            )
    load = " -> ".join(f"{a:.1f}" for a in (report["load_start"], report["load_end"]))
    print(f"\ntotal {report['seconds']:.0f} s; load average {load} on {report['cpus']} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to put data (default: a temp dir in .)")
    parser.add_argument("--quick", action="store_true", help="smaller run, under ~60 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    parser.add_argument("--open-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.open_child:
        open_child(*args.open_child)
        return

    parent = (args.dir or Path.cwd()).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    need = (128 if args.quick else 1024) * MiB * 11 // 10 + 200 * MiB
    free = shutil.disk_usage(parent).free
    if free < need:
        parser.error(f"{parent} has {free // MiB} MiB free; need about {need // MiB} MiB")
    work = Path(tempfile.mkdtemp(prefix="hotcopy-bench-", dir=parent))
    started = time.perf_counter()
    try:
        report: dict[str, Any] = {
            "dir": str(work),
            "filesystem": filesystem_of(work),
            "quick": args.quick,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_start": os.getloadavg()[0],
        }
        per_round = 1 if args.quick else 2
        report["commits"] = bench_commits(work, rounds=3, checkpoints_per_round=per_round)
        report["open"] = bench_open(work, args.quick, reps=1 if args.quick else 3)
        report["seconds"] = time.perf_counter() - started
        report["load_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
