"""Benchmark hot copies: copy_prefix against cp + sync, and what a copy costs a live writer.

Figures are ratios against baselines measured in the same run (the machine is shared):

- copy throughput of a prefix (incl. fsync) / throughput of ``cp SRC DST && sync DST``;
- the same for a restore of that copy into a new repository (``restore_prefix``, which checks
  every byte of it), against ``cp`` + ``sync`` of the copy, each reading the copy from the disk;
- the same copy for a prefix of small records (100-byte values, where the copy's checks of
  every batch and index page cost more than its bytes);
- a writer's commit latency p99 while a copy runs / the same writer's p99 with no copy, and its
  longest stall during the copy (split into the wait for the write lease and the commit)
  next to the copy's checkpoint time;
- copy time by prefix size;
- with ``--rate-limits``, the curve of the writer's p99 against the copy's throughput.

    python scripts/bench_copy.py [--size-mib 1024] [--quick] [--json FILE] [--dir DIR]
                                 [--rate-limits 25,50,100,200]
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
import textwrap
import time
from pathlib import Path
from typing import Any

from hotcopy.storage import Repository

MIB = 1 << 20

WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from hotcopy.storage import Repository
    root, stop_file, out_file, ready_file = sys.argv[1:5]
    samples = []
    with Repository(root) as repo:
        px = repo.open_prefix("big", "rw")
        n = 0
        open(ready_file, "w").close()
        while not os.path.exists(stop_file):
            n += 1
            began = time.monotonic()
            px[f"w{n % 1000}"] = {"n": n, "pad": "x" * 100}  # takes the write lease
            leased = time.monotonic()
            px.commit()
            samples.append((began, time.monotonic() - began, leased - began))
    with open(out_file, "w") as f:
        json.dump(samples, f)
    """
)


def build_prefix(root: Path, size_mib: int) -> int:
    """A prefix named "big" of ``size_mib`` 1 MiB values, checkpointed; returns its file size."""
    with Repository.init(root) as repo, repo.open_prefix("big", "rw") as px:
        value = os.urandom(MIB)
        for i in range(size_mib):
            px[f"v{i:06d}"] = value[i % 997 :] + value[: i % 997]
            if i % 16 == 15:
                px.commit()
        px.commit()
        px.checkpoint()
    return (root / "big.hc").stat().st_size


def time_copy(
    root: Path, dest: Path, rate_limit: float | None = None, prefix: str = "big"
) -> tuple[float, float]:
    """Seconds for one copy_prefix (incl. fsync), and the seconds its cut took (the wait for
    the write lease and the checkpoint under it: what a writer may wait for the copy)."""
    with Repository(root) as repo:
        began = time.monotonic()
        result = repo.copy_prefix(dest, prefix, rate_limit=rate_limit)
        return time.monotonic() - began, result.cut_seconds


def build_small_prefix(root: Path, size_mib: int) -> int:
    """A prefix named "small" of 100-byte values in commits of 100 keys, checkpointed as its
    writer goes (a few keys rewritten), until its main file holds ``size_mib``; its size."""
    with Repository.init(root) as repo, repo.open_prefix("small", "rw") as px:
        n = 0
        while (root / "small.hc").stat().st_size < size_mib * MIB:
            for _ in range(100):
                px[f"k{n % (size_mib * 8000):09d}"] = os.urandom(50).hex()
                n += 1
            px.commit()
        px.checkpoint()
    return (root / "small.hc").stat().st_size


def evict_from_cache(path: Path) -> None:
    """Drop the cached pages of ``path`` (a file, or every file under a directory), so that the
    run timed next reads it from the disk, as a restore during an outage reads its backup.

    Without this, whichever of two alternated runs goes first pays the disk and the second reads
    memory: a copy written past the page cache (``O_DIRECT``) is not cached when it is made.
    """
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages stay cached: written back first, they can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_restore(copy: Path, root: Path) -> float:
    """Seconds to restore ``copy`` as prefix "big" of a new repository at ``root`` (every byte
    checked, fsynced)."""
    with Repository.init(root) as repo:
        began = time.monotonic()
        repo.restore_prefix(copy, "big")
        return time.monotonic() - began


def time_cp_sync(src: Path, dest: Path) -> float:
    began = time.monotonic()
    subprocess.run(["cp", str(src), str(dest)], check=True)
    subprocess.run(["sync", str(dest)], check=True)
    return time.monotonic() - began


def median_pair(root: Path, work: Path, rounds: int, prefix: str = "big") -> dict[str, float]:
    """Alternate copy_prefix and cp+sync ``rounds`` times; medians of each."""
    ours, theirs = [], []
    for i in range(rounds):
        ours.append(time_copy(root, work / f"{prefix}-copy-{i}.hc", prefix=prefix)[0])
        theirs.append(time_cp_sync(root / f"{prefix}.hc", work / f"{prefix}-cp-{i}.hc"))
    return {"copy_s": statistics.median(ours), "cp_sync_s": statistics.median(theirs)}


def restore_pair(root: Path, work: Path, rounds: int) -> dict[str, float]:
    """Alternate a restore of a copy of "big" and cp+sync of that copy, each reading the copy
    from the disk; medians of each."""
    copy = work / "source-copy.hc"
    time_copy(root, copy)
    ours, theirs = [], []
    for i in range(rounds):
        evict_from_cache(copy)
        ours.append(time_restore(copy, work / f"restored-{i}"))
        evict_from_cache(copy)
        theirs.append(time_cp_sync(copy, work / f"source-copy-cp-{i}.hc"))
    return {"restore_s": statistics.median(ours), "cp_sync_s": statistics.median(theirs)}


class Writer:
    """The WRITER program in its own process, committing to prefix "big" of ``root`` from
    :meth:`start` to :meth:`stop`; its samples: (start, latency, lease wait) per commit."""

    def __init__(self, root: Path, work: Path) -> None:
        self._root = root
        self._stop, self._out, self._ready = work / "stop", work / "samples.json", work / "ready"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Writer:
        for path in (self._stop, self._out, self._ready):
            path.unlink(missing_ok=True)
        paths = (self._root, self._stop, self._out, self._ready)
        self._proc = subprocess.Popen([sys.executable, "-c", WRITER, *map(str, paths)])
        while not self._ready.exists():  # the writer has opened the prefix
            if self._proc.poll() is not None:
                raise RuntimeError("writer died before it started")
            time.sleep(0.01)
        return self

    def stop(self) -> list[tuple[float, float, float]]:
        assert self._proc is not None
        self._stop.touch()
        self._proc.wait(timeout=60)
        return [tuple(run) for run in json.loads(self._out.read_text())]

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def writer_latency(
    root: Path, work: Path, during: str, seconds: float, rate_limit: float | None = None
) -> dict[str, Any]:
    """Run the writer for ``seconds``, or ``during`` one "copy" (copy_prefix, at most
    ``rate_limit`` bytes/s) or "cp" (+ sync)."""
    dest = work / f"during-{during}-{rate_limit}.hc"
    with Writer(root, work) as writer:
        window: tuple[float, float] | None = None
        cut_s = 0.0
        if during in ("copy", "cp"):
            time.sleep(0.5)  # some commits before the copy starts, for the plot
            began = time.monotonic()
            if during == "copy":
                _, cut_s = time_copy(root, dest, rate_limit)
            else:
                time_cp_sync(root / "big.hc", dest)
            window = (began, time.monotonic())
            time.sleep(0.5)
        else:
            time.sleep(seconds)
        runs = writer.stop()
    samples = [(at, lat) for at, lat, _ in runs]
    picked = [run for run in runs if window is None or window[0] <= run[0] <= window[1]]
    inside = sorted(lat for _, lat, _ in picked)
    worst = max(picked, key=lambda run: run[1])
    return {
        "commits": len(inside),
        "p50_ms": 1000 * inside[len(inside) // 2],
        "p99_ms": 1000 * inside[int(len(inside) * 0.99)],
        "max_ms": 1000 * inside[-1],
        # The longest stall split: waiting for the write lease (what the copy's cut imposes)
        # and the commit itself (its fdatasync behind the copy's writes: the disk's part).
        "max_lease_wait_ms": 1000 * worst[2],
        "max_commit_ms": 1000 * (worst[1] - worst[2]),
        "longest_lease_wait_ms": 1000 * max(wait for _, _, wait in picked),
        "copy_window_s": None if window is None else window[1] - window[0],
        "cut_ms": 1000 * cut_s,
        "samples": samples,
        "window": window,
    }


def _figures(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("samples", "window")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="128 MiB, fewer rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scaling", action="store_true", help="also 64 MiB ... size")
    parser.add_argument(
        "--small-mib", type=int, default=256, help="size of the small-records prefix (0: none)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put data (a disk)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--rate-limits",
        default="",
        metavar="MIB/S,...",
        help="also a copy at each of these rate limits: its throughput and the writer's p99",
    )
    args = parser.parse_args(argv)
    size = 128 if args.quick else args.size_mib
    small_mib = min(args.small_mib, 16) if args.quick else args.small_mib
    rounds = 2 if args.quick else args.rounds
    # Nothing is deleted until every run is timed: on a file system mounted with ``discard``,
    # freeing a GiB of extents slows every write and fsync for seconds, and that would fall on
    # whichever run came next.
    work = Path(tempfile.mkdtemp(prefix="hotcopy-bench-copy-", dir=args.dir))
    results: dict[str, Any] = {"size_mib": size}
    try:
        root = work / "repo"
        file_size = build_prefix(root, size)
        pair = median_pair(root, work, rounds)
        results["copy"] = {
            **pair,
            "bytes": file_size,
            "copy_mib_s": file_size / MIB / pair["copy_s"],
            "cp_sync_mib_s": file_size / MIB / pair["cp_sync_s"],
            "ratio": pair["cp_sync_s"] / pair["copy_s"],
        }
        restore = restore_pair(root, work, rounds)
        results["restore"] = {**restore, "ratio": restore["cp_sync_s"] / restore["restore_s"]}
        if small_mib:
            small_root = work / "small-repo"
            small_size = build_small_prefix(small_root, small_mib)
            small = median_pair(small_root, work, rounds, prefix="small")
            results["small_records"] = {
                **small,
                "bytes": small_size,
                "copy_mib_s": small_size / MIB / small["copy_s"],
                "ratio": small["cp_sync_s"] / small["copy_s"],
            }
        quiet = writer_latency(root, work, "nothing", seconds=3.0)
        busy = writer_latency(root, work, "copy", seconds=0)
        plain = writer_latency(root, work, "cp", seconds=0)
        results["writer"] = {
            "without_copy": _figures(quiet),
            "during_copy": _figures(busy),
            "during_cp_sync": _figures(plain),
            "p99_ratio": busy["p99_ms"] / quiet["p99_ms"],
        }
        results["latency_trace"] = {"samples": busy["samples"], "window": busy["window"]}
        curve = []
        for mib_s in [float(rate) for rate in args.rate_limits.split(",") if rate]:
            paced = writer_latency(root, work, "copy", seconds=0, rate_limit=mib_s * MIB)
            curve.append(
                {
                    "rate_limit_mib_s": mib_s,
                    "copy_mib_s": file_size / MIB / paced["copy_window_s"],
                    "p99_ms": paced["p99_ms"],
                    "p99_ratio": paced["p99_ms"] / quiet["p99_ms"],
                    "max_ms": paced["max_ms"],
                }
            )
        results["rate_limits"] = curve
        if args.scaling:
            scaling = []
            mib = 64
            while mib <= size:
                sub = work / f"scale-{mib}"
                build_prefix(sub, mib)
                seconds, _ = time_copy(sub, work / f"scale-{mib}.hc")
                scaling.append({"mib": mib, "seconds": seconds, "mib_s": mib / seconds})
                shutil.rmtree(sub)
                (work / f"scale-{mib}.hc").unlink()
                mib *= 2
            results["scaling"] = scaling
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results))
    return 0


def print_table(results: dict[str, Any]) -> None:
    copy = results["copy"]
    writer = results["writer"]
    quiet_p99 = writer["without_copy"]["p99_ms"]
    print(f"prefix of {results['size_mib']} MiB ({copy['bytes']} bytes)")
    for label, key in (("copy_prefix incl. fsync", "copy"), ("cp + sync FILE", "cp_sync")):
        print(f"  {label:<24}  {copy[key + '_s']:7.3f} s  {copy[key + '_mib_s']:8.0f} MiB/s")
    print(f"  ratio (target >= 1.0)     {copy['ratio']:7.2f}x")
    restore = results["restore"]
    print(
        f"  restore of the copy       {restore['restore_s']:7.3f} s, cp + sync of it "
        f"{restore['cp_sync_s']:.3f} s: {restore['ratio']:.2f}x (target >= 0.9)"
    )
    small = results.get("small_records")
    if small:
        print(
            f"  small records, {small['bytes'] / MIB:.0f} MiB: copy {small['copy_s']:.3f} s "
            f"({small['copy_mib_s']:.0f} MiB/s), cp + sync {small['cp_sync_s']:.3f} s: "
            f"{small['ratio']:.2f}x"
        )
    for label, key in (
        ("writer, no copy", "without_copy"),
        ("writer, during copy", "during_copy"),
        ("writer, during cp+sync", "during_cp_sync"),
    ):
        w = writer[key]
        print(
            f"  {label:<24}  {w['commits']:6d} commits  p50 {w['p50_ms']:6.2f} ms  "
            f"p99 {w['p99_ms']:6.2f} ms  max {w['max_ms']:7.2f} ms"
        )
    print(f"  p99 ratio (target <= 2)   {writer['p99_ratio']:7.2f}x")
    during = writer["during_copy"]
    print(
        f"  longest writer stall during the copy {during['max_ms']:.1f} ms (waiting for the "
        f"write lease {during['max_lease_wait_ms']:.1f} ms, then its commit "
        f"{during['max_commit_ms']:.1f} ms)"
    )
    print(
        f"  longest wait for the write lease during the copy "
        f"{during['longest_lease_wait_ms']:.1f} ms; the copy's cut (lease wait + checkpoint) "
        f"{during['cut_ms']:.1f} ms"
    )
    for row in results.get("scaling", []):
        print(f"  {row['mib']:5d} MiB  {row['seconds']:7.3f} s  {row['mib_s']:7.0f} MiB/s")
    if results.get("rate_limits"):
        print(f"  rate limit   copy MiB/s   writer p99 (x no copy: {quiet_p99:.2f} ms)   max")
        unlimited = copy["copy_mib_s"]
        print(
            f"  none         {unlimited:10.0f}   {during['p99_ms']:7.2f} ms "
            f"{writer['p99_ratio']:5.2f}x   {during['max_ms']:7.1f} ms"
        )
    for row in results.get("rate_limits", []):
        print(
            f"  {row['rate_limit_mib_s']:5.0f} MiB/s  {row['copy_mib_s']:10.0f}   "
            f"{row['p99_ms']:7.2f} ms {row['p99_ratio']:5.2f}x   {row['max_ms']:7.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
