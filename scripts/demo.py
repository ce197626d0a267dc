"""hotcopy demo: hot backups of a repository that writer processes keep changing.

A temporary repository; several writer processes commit at full speed, each transaction
holding a record and its writer's counter; meanwhile a full backup, incremental backups and a
single-prefix copy are taken hot. Then every backup is restored and checked (for each writer,
exactly records 1..counter: no tear, no hole), the backup catalog and the live repository are
verified, and a summary is printed.

    python scripts/demo.py [--writers N] [--seconds S] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from hotcopy.coordinator import read_status
from hotcopy.storage import Repository, verify_file
from hotcopy.storage._verify import verify_prefix
from hotcopy.workers import Catalog, backup, restore
from hotcopy.workers._progress import Progress

PREFIXES = 3


def writer(root: str, index: int, start: Any, stop: Any, counts: Any) -> None:
    """Commit to prefix ``p<index % 3>`` until told to stop; count acknowledged commits."""
    with Repository(root) as repo:
        prefix = repo.open_prefix(f"p{index % PREFIXES}", "rw")
        start.wait()
        n = 0
        while not stop.is_set():
            n += 1
            prefix[f"w{index}/{n:07d}"] = {"writer": index, "n": n, "pad": "x" * 200}
            prefix[f"w{index}/last"] = n
            prefix.commit()
            counts[index] = n


def consistent(state: dict[str, Any], writers: int, name: str) -> tuple[bool, int]:
    """Whether every writer on prefix ``name`` has exactly records 1..last; total records."""
    ok = True
    total = 0
    for w in range(writers):
        if f"p{w % PREFIXES}" != name:
            continue
        last = state.get(f"w{w}/last", 0)
        records = sum(1 for key in state if key.startswith(f"w{w}/") and key != f"w{w}/last")
        ok &= records == last and (last == 0 or f"w{w}/{last:07d}" in state)
        total += records
    return ok, total


def stop_coordinator(root: Path) -> None:
    """Stop the coordinator that the demo's use of ``root`` started (terminate, a grace
    period, kill): it would otherwise wait out its idle timeout for a deleted directory."""
    pid = read_status(root).pid  # None when none runs
    if pid is None:
        return
    try:
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(5)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(5)
    except psutil.NoSuchProcess:
        pass


def take_backup(root: Path, dest: Path, incremental: bool) -> dict[str, Any]:
    label = "incremental backup" if incremental else "full backup"
    with Progress(label) as bar:
        result = backup(root, dest, jobs=2, incremental=incremental, progress=bar.update)
        bar.finish(len(result.prefixes), len(result.prefixes), result.bytes, result.seconds)
    kinds = [entry["kind"] for entry in result.prefixes.values()]
    print(
        f"  {label:<19} {result.id}: {result.bytes / 1024:8.1f} KiB "
        f"({kinds.count('full')} full, {kinds.count('delta')} delta) in {result.seconds:.2f} s"
    )
    return result.to_json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="how long writers run")
    parser.add_argument("--keep", type=Path, help="work here and keep everything")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="hotcopy-demo-"))
    root, backups = work / "repo", work / "backups"
    repositories = [root]  # each gets a coordinator when used; stopped at the end
    try:
        Repository.init(root).close()
        print(f"repository {root}: {args.writers} writer processes on {PREFIXES} prefixes")
        ctx = multiprocessing.get_context("spawn")
        start, stop = ctx.Barrier(args.writers + 1), ctx.Event()
        counts = ctx.Array("q", args.writers)
        procs = [
            ctx.Process(target=writer, args=(str(root), i, start, stop, counts))
            for i in range(args.writers)
        ]
        for proc in procs:
            proc.start()
        taken = []
        try:
            start.wait(timeout=60)
            began = time.monotonic()
            print("hot backups while the writers commit:")
            time.sleep(args.seconds / 4)
            taken.append(take_backup(root, backups, incremental=False))
            with Repository(root) as repo:
                copy = repo.copy_prefix(work / "p0-copy.hc", "p0")
            print(
                f"  {'copy of prefix p0':<19} at commit {copy.seq}: {copy.length / 1024:.1f} KiB"
                f" in {copy.seconds:.3f} s"
            )
            while time.monotonic() - began < args.seconds:
                time.sleep(args.seconds / 4)
                taken.append(take_backup(root, backups, incremental=True))
            stop.set()
            for proc in procs:
                proc.join(timeout=60)
            elapsed = time.monotonic() - began
        finally:
            stop.set()
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            print("a writer failed", file=sys.stderr)
            return 1
        commits = sum(counts)
        print(f"writers: {commits} commits in {elapsed:.1f} s ({commits / elapsed:,.0f}/s)")

        problems = 0
        print("restore and check every backup:")
        for entry in taken:
            target = work / "restored" / entry["id"]
            repositories.append(target)
            result = restore(backups, target, at=entry["id"])
            records = 0
            with Repository(target) as repo:
                for name in repo.prefixes():
                    px = repo.open_prefix(name, "r")
                    ok, total = consistent({k: px[k] for k in px}, args.writers, name)
                    problems += not ok
                    records += total
            status = "consistent" if problems == 0 else "INCONSISTENT"
            print(f"  {entry['id']}: {len(result.prefixes)} prefixes, {records} records, {status}")
        catalog_problems = Catalog(backups).verify()
        problems += len(catalog_problems)
        copy_report = verify_file(work / "p0-copy.hc")
        problems += not copy_report.ok
        with Repository(root) as repo:
            live = [verify_prefix(repo.root, n, repo.id_bytes) for n in repo.prefixes()]
        problems += sum(not report.ok for report in live)
        print(
            f"verify: catalog {len(catalog_problems)} problem(s); copy of p0 "
            f"{'ok' if copy_report.ok else 'DAMAGED'}; live repository "
            f"{sum(r.ok for r in live)}/{len(live)} prefixes ok"
        )
        print("demo OK" if problems == 0 else f"demo FAILED: {problems} problem(s)")
        return 0 if problems == 0 else 1
    finally:
        for repository in repositories:
            stop_coordinator(repository)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
