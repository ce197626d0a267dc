"""hotcopy demo: several writer processes share one repository on a temporary directory.

Each writer commits transactions to a shared prefix (records plus its own "last" counter in the
same transaction) and to a prefix of its own; at the end the demo reads everything back from a
fresh process view, checks that no commit is lost or torn, and verifies every file.

    python scripts/demo.py [--writers N] [--commits N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hotcopy.storage import Repository, verify_file


def writer(
    root: str, writer_id: int, commits: int, start: multiprocessing.synchronize.Barrier
) -> None:
    with Repository(root) as repo:
        shared = repo.open_prefix("events", "rw")
        own = repo.open_prefix(f"writer-{writer_id}", "rw")
        start.wait()
        for i in range(1, commits + 1):
            shared[f"w{writer_id}/{i:06d}"] = {"writer": writer_id, "n": i, "at": time.time()}
            shared[f"w{writer_id}/last"] = i
            shared.commit()
            own["count"] = i
            own.commit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="create the repository here and keep it")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="hotcopy-demo-"))
    try:
        Repository.init(root).close()
        print(f"repository: {root}")
        print(f"{args.writers} writer processes x {args.commits} transactions ...")
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(args.writers + 1)
        procs = [
            ctx.Process(target=writer, args=(str(root), i, args.commits, start))
            for i in range(args.writers)
        ]
        for proc in procs:
            proc.start()
        try:
            start.wait(timeout=60)
            began = time.monotonic()
            for proc in procs:
                proc.join()
            elapsed = time.monotonic() - began
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
        if failed:
            print(f"writer exit codes: {failed}", file=sys.stderr)
            return 1
        total = args.writers * args.commits * 2
        print(
            f"{total} commits in {elapsed:.2f} s ({total / elapsed:,.0f} commits/s, each fsynced)"
        )

        problems = 0
        with Repository(root) as repo:
            events = repo.open_prefix("events")
            for i in range(args.writers):
                last = events.get(f"w{i}/last")
                missing = [n for n in range(1, args.commits + 1) if f"w{i}/{n:06d}" not in events]
                own = repo.open_prefix(f"writer-{i}").get("count")
                status = "ok" if last == args.commits and not missing and own == last else "LOST"
                problems += status != "ok"
                records = args.commits - len(missing)
                print(f"  writer {i}: last={last} records={records} own={own} {status}")
            print(f"prefixes: {', '.join(repo.prefixes())}; events at commit {events.seq}")
            for name in repo.prefixes():
                repo.open_prefix(name, "rw").checkpoint()
                report = verify_file(repo.prefix_path(name))
                problems += not report.ok
            print(f"verify: {len(repo.prefixes())} files checked, {problems} problem(s)")
        print("demo OK" if problems == 0 else "demo FAILED")
        return 0 if problems == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
