#!/usr/bin/env python3
"""Object-layer benchmark: does the cost of one operation grow with the collection?

Builds, in one repository, an ``hc.list`` by appends, an ``hc.index`` by adds (random float
keys) and a tag's members by creating tagged ``@memo`` objects, committing every
``--commit-every`` operations (the commits are part of the cost). For each it prints the time
per operation, CPU (``time.process_time``) and wall, over the last ``--window`` operations
before the collection reaches 1,000, half of ``--items`` and ``--items`` entries. Flat figures
mean an operation costs the same at any size; figures that grow with size mean building n
entries costs O(n^2).

Usage: bench_objects.py [--dir DIR] [--items 20000] [--commit-every 100] [--window 1000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hotcopy.storage as hc


@hc.memo(type_id="bench_objects.Item")
class Item:
    def __init__(self, number: int) -> None:
        self.number = number


def measure(
    name: str, operation: Callable[[int], None], items: int, commit_every: int, window: int
) -> list[tuple[int, float, float]]:
    """Run ``operation(i)`` for i in range(items), committing every ``commit_every``; return
    (size, CPU µs/op, wall µs/op) over the ``window`` operations before each mark."""
    marks = sorted({min(1000, items), items // 2, items})
    starts = {max(0, mark - window) for mark in marks}  # operations done when a window opens
    rows = []
    start_cpu = start_wall = 0.0
    for i in range(items):
        if i in starts:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
        size = i + 1
        operation(i)
        if size % commit_every == 0:
            hc.commit()
        if size in marks:
            n = min(window, size)
            cpu = (time.process_time() - start_cpu) / n * 1e6
            wall = (time.perf_counter() - start_wall) / n * 1e6
            rows.append((size, cpu, wall))
            print(f"{name:6} {size:>7,} entries: {cpu:8.1f} µs/op CPU {wall:8.1f} µs/op wall")
    hc.commit()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, help="where to make the repository (default: a temp dir)"
    )
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--commit-every", type=int, default=100)
    parser.add_argument("--window", type=int, default=1000, help="operations timed per mark")
    args = parser.parse_args(argv)
    window = min(args.window, max(1, args.items // 4))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        hc.init(Path(tmp) / "repo")
        try:
            hc.open("bench", "rw")
            print(
                f"{args.items:,} operations, a commit every {args.commit_every}, "
                f"timed over {window} operations before each mark"
            )
            items = hc.list()
            index = hc.index()
            keys = random.Random(1)
            results = {
                "list": measure(
                    "list",
                    lambda i: items.append(f"item-{i}"),
                    args.items,
                    args.commit_every,
                    window,
                ),
                "index": measure(
                    "index",
                    lambda i: index.add(keys.random(), f"value-{i}"),
                    args.items,
                    args.commit_every,
                    window,
                ),
                "tags": measure(
                    "tags",
                    lambda i: hc.tags(Item(i)).add("bench"),
                    args.items,
                    args.commit_every,
                    window,
                ),
            }
            assert len(items) == len(index) == len(hc.find(Item, "bench")) == args.items
        finally:
            hc.close()
    for name, rows in results.items():
        first, last = rows[0], rows[-1]
        print(f"{name:6} CPU per op at {last[0]:,} / at {first[0]:,}: {last[1] / first[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
