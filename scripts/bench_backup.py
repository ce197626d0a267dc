"""Benchmark bulk and incremental backups and restores against cp -r + sync, in the same run.

- bulk backup of N prefixes x 1 MiB with --jobs 1, 2, 4 / ``cp -r ROOT DEST && sync -f DEST``
  (alternated, medians of --rounds);
- incremental backup after changing 1 % of a repository / a full backup of it (time and bytes);
- restore of one of those backups with --jobs 1 and 2 / ``cp -r`` + sync of the backup
  directory (alternated, medians of --rounds);
- restore of a backup of one prefix of --big-mib MiB / ``cp -r`` + sync of that backup.

Each restore, and each ``cp -r`` it is measured against, reads the backup from the disk: its
pages are dropped from the cache before each run (``bench_copy.evict_from_cache``).

    python scripts/bench_backup.py [--prefixes 1000] [--big-mib 1024] [--rounds 2] [--quick]
                                   [--json FILE]
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
from typing import Any

from bench_copy import evict_from_cache
from hotcopy.storage import Repository
from hotcopy.workers import backup, restore

MIB = 1 << 20
RESTORE_JOBS = (1, 2)


def make_repo(root: Path, prefixes: int, mib_each: int) -> int:
    """``prefixes`` prefixes of ``mib_each`` MiB (values of 64 KiB), checkpointed; total bytes."""
    value = os.urandom(64 << 10)
    with Repository.init(root) as repo:
        for p in range(prefixes):
            with repo.open_prefix(f"p{p:05d}", "rw") as px:
                for i in range(mib_each * 16):
                    px[f"k{i:05d}"] = value
                px.commit()
                px.checkpoint()
    return sum(f.stat().st_size for f in root.glob("*.hc"))


def cp_sync(src: Path, dest: Path) -> float:
    began = time.monotonic()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)
    return time.monotonic() - began


def timed_backup(root: Path, dest: Path, **options: Any) -> tuple[float, dict[str, Any]]:
    began = time.monotonic()
    result = backup(root, dest, **options)
    if result.failed:
        raise RuntimeError(f"backup failed: {result.failed}")
    return time.monotonic() - began, result.to_json()


def bench_bulk(work: Path, prefixes: int, jobs_list: list[int], rounds: int) -> dict[str, Any]:
    """Alternate ``cp -r`` + sync and a backup per ``--jobs`` value, ``rounds`` times; medians.

    Nothing is deleted until every run is timed: on a file system mounted with ``discard``,
    freeing a GiB of extents slows the disk for seconds, and that would fall on whichever run
    came next.
    """
    root = work / "bulk"
    size = make_repo(root, prefixes, 1)
    out: dict[str, Any] = {"prefixes": prefixes, "bytes": size, "rounds": rounds}
    cp_times: list[float] = []
    times: dict[int, list[float]] = {jobs: [] for jobs in jobs_list}
    for n in range(rounds):
        cp_times.append(cp_sync(root, work / f"bulk-cp-{n}"))
        for jobs in jobs_list:
            times[jobs].append(timed_backup(root, work / f"bulk-bk-{jobs}-{n}", jobs=jobs)[0])
    out["cp_r_sync_s"] = statistics.median(cp_times)
    for jobs in jobs_list:
        out[f"jobs_{jobs}_s"] = statistics.median(times[jobs])
        out[f"jobs_{jobs}_ratio"] = out["cp_r_sync_s"] / out[f"jobs_{jobs}_s"]
    # Restores of one of those backups, alternated with cp -r + sync of it, the same way.
    catalog = work / f"bulk-bk-{jobs_list[-1]}-0"
    cp_backup: list[float] = []
    restores: dict[int, list[float]] = {jobs: [] for jobs in RESTORE_JOBS}
    for n in range(rounds):
        evict_from_cache(catalog)
        cp_backup.append(cp_sync(catalog, work / f"bulk-bk-cp-{n}"))
        for jobs in RESTORE_JOBS:
            evict_from_cache(catalog)
            began = time.monotonic()
            restore(catalog, work / f"bulk-restored-{jobs}-{n}", jobs=jobs)
            restores[jobs].append(time.monotonic() - began)
    out["cp_r_backup_s"] = statistics.median(cp_backup)
    for jobs in RESTORE_JOBS:
        out[f"restore_jobs_{jobs}_s"] = statistics.median(restores[jobs])
        out[f"restore_jobs_{jobs}_ratio"] = out["cp_r_backup_s"] / out[f"restore_jobs_{jobs}_s"]
    return out


def bench_big_restore(work: Path, big_mib: int, rounds: int) -> dict[str, Any]:
    """One prefix of ``big_mib`` MiB backed up once; its restore into a new root alternated
    with ``cp -r`` + sync of the backup, ``rounds`` times; medians (what an operator waits for
    when the one large prefix is lost)."""
    root = work / "one"
    size = make_repo(root, 1, big_mib)
    catalog = work / "one-bk"
    timed_backup(root, catalog)
    cp_times, restores = [], []
    for n in range(rounds):
        evict_from_cache(catalog)
        cp_times.append(cp_sync(catalog, work / f"one-bk-cp-{n}"))
        evict_from_cache(catalog)
        began = time.monotonic()
        restore(catalog, work / f"one-restored-{n}")
        restores.append(time.monotonic() - began)
    out = {
        "mib": big_mib,
        "bytes": size,
        "cp_r_backup_s": statistics.median(cp_times),
        "restore_s": statistics.median(restores),
    }
    out["ratio"] = out["cp_r_backup_s"] / out["restore_s"]
    return out


def bench_incremental(work: Path, big_mib: int) -> dict[str, Any]:
    root = work / "big"
    prefixes = 16
    make_repo(root, prefixes, big_mib // prefixes)
    dest = work / "big-bk"
    full_s, full = timed_backup(root, dest, jobs=2)
    # Change 1 % of the data: rewrite 1 % of the 64 KiB values, spread over the prefixes.
    value = os.urandom(64 << 10)
    to_change = max(big_mib * 16 // 100, 1)
    with Repository(root) as repo:
        for n in range(to_change):
            with repo.open_prefix(f"p{n % prefixes:05d}", "rw") as px:
                px[f"k{n // prefixes:05d}"] = value
                px.commit()
    inc_s, inc = timed_backup(root, dest, jobs=2, incremental=True)
    return {
        "mib": big_mib,
        "full_s": full_s,
        "full_bytes": full["bytes"],
        "incremental_s": inc_s,
        "incremental_bytes": inc["bytes"],
        "time_ratio": inc_s / full_s,
        "bytes_ratio": inc["bytes"] / full["bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--jobs", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=2, help="of each bulk run (medians)")
    parser.add_argument("--quick", action="store_true", help="200 prefixes, 128 MiB, 1 round")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    prefixes = 200 if args.quick else args.prefixes
    big = 128 if args.quick else args.big_mib
    jobs = [int(j) for j in args.jobs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hotcopy-bench-backup-", dir=args.dir))
    try:
        rounds = 1 if args.quick else args.rounds
        results = {"bulk": bench_bulk(work, prefixes, jobs, rounds)}
        shutil.rmtree(work)
        work.mkdir()
        results["incremental"] = bench_incremental(work, big)
        shutil.rmtree(work)
        work.mkdir()
        results["big_restore"] = bench_big_restore(work, big, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, jobs)
    if args.json:
        args.json.write_text(json.dumps(results))
    return 0


def print_table(results: dict[str, Any], jobs: list[int]) -> None:
    bulk, inc = results["bulk"], results["incremental"]
    print(
        f"bulk backup: {bulk['prefixes']} prefixes x 1 MiB ({bulk['bytes'] / MIB:.0f} MiB), "
        f"medians of {bulk['rounds']} round(s)"
    )
    print(f"  cp -r + sync                 {bulk['cp_r_sync_s']:7.2f} s")
    for j in jobs:
        ratio = bulk[f"jobs_{j}_ratio"]
        print(f"  hotcopy backup --jobs {j:<2}     {bulk[f'jobs_{j}_s']:7.2f} s  {ratio:5.2f}x")
    print(f"  cp -r + sync of the backup   {bulk['cp_r_backup_s']:7.2f} s")
    for j in RESTORE_JOBS:
        seconds, ratio = bulk[f"restore_jobs_{j}_s"], bulk[f"restore_jobs_{j}_ratio"]
        print(f"  hotcopy restore --jobs {j:<2}    {seconds:7.2f} s  {ratio:5.2f}x")
    print(f"incremental after 1 % change of {inc['mib']} MiB")
    print(f"  full        {inc['full_s']:7.2f} s  {inc['full_bytes'] / MIB:9.1f} MiB")
    print(f"  incremental {inc['incremental_s']:7.2f} s  {inc['incremental_bytes'] / MIB:9.1f} MiB")
    print(
        f"  ratios: time {inc['time_ratio']:.3f}, bytes {inc['bytes_ratio']:.4f} (target <= 0.05)"
    )
    one = results["big_restore"]
    print(f"restore of one prefix of {one['mib']} MiB from its backup, into a new root")
    print(f"  cp -r + sync of the backup   {one['cp_r_backup_s']:7.2f} s")
    print(f"  hotcopy restore              {one['restore_s']:7.2f} s  {one['ratio']:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
