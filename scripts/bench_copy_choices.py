"""What sets a hot copy's speed, and what each way of writing costs a live writer.

Copies a prefix's 1 GiB main file several ways while the bench_copy writer commits to the same
repository, and reports each way's time against an unpaced copy of the same round (what
``cp`` + ``sync`` does), with the writer's p99 and longest commit against its p99 with no copy:

- ``unpaced``: ``copy_file_range`` in 4 MiB steps, one ``fdatasync`` at the end;
- ``wbDxP``: the same with hotcopy's bounded writeback (``sync_file_range``), at most D pieces
  of P KiB in flight (hotcopy copies with ``wb1x512``);
- ``direct``: ``O_DIRECT`` writes of 1 MiB from an aligned buffer, one at a time (as
  ``lmdb``'s ``env.copy`` writes);
- ``direct-pipe``: the same, with a thread reading the next buffers (and its CRC) meanwhile;
  ``direct-pipe-256k`` with buffers of 256 KiB;
- ``disk-only``: no copy, ``O_DIRECT`` writes of zeros at the disk's speed: what the disk alone
  does to the writer, the floor of every way of copying.

    python scripts/bench_copy_choices.py [--size-mib 1024] [--rounds 2] [--dir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_copy
from hotcopy.storage._writeback import Writeback

MIB = 1 << 20
STEP = 4 * MIB
DIRECT_BUFFER = MIB

Copy = Callable[[int, Path, int], None]  # (source fd, destination, size)


def unpaced(src: int, dest: Path, size: int) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        done = 0
        while done < size:
            done += os.copy_file_range(src, out, min(STEP, size - done), done, done)
        os.fdatasync(out)
    finally:
        os.close(out)


def written_back(depth: int, piece_kib: int) -> Copy:
    def copy(src: int, dest: Path, size: int) -> None:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            writeback = Writeback(out, depth=depth, piece=piece_kib << 10)
            done = 0
            while done < size:
                copied = os.copy_file_range(src, out, min(STEP, size - done), done, done)
                writeback.wrote(done, copied)
                done += copied
            os.fdatasync(out)
        finally:
            os.close(out)

    return copy


def _direct_tail(dest: Path, data: bytes, at: int) -> None:
    """The last, unaligned bytes: written through the page cache, then fsynced with the rest."""
    out = os.open(dest, os.O_WRONLY)
    try:
        os.pwrite(out, data, at)
        os.fdatasync(out)
    finally:
        os.close(out)


def direct(src: int, dest: Path, size: int) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    buffer = mmap.mmap(-1, DIRECT_BUFFER)  # page-aligned, as O_DIRECT wants
    crc, done = 0, 0
    try:
        while size - done >= DIRECT_BUFFER:
            os.preadv(src, [buffer], done)
            crc = zlib.crc32(buffer, crc)
            os.pwrite(out, buffer, done)
            done += DIRECT_BUFFER
        os.fdatasync(out)
    finally:
        os.close(out)
        buffer.close()
    _direct_tail(dest, os.pread(src, size - done, done), done)


def direct_pipe(src: int, dest: Path, size: int, buffer_size: int = DIRECT_BUFFER) -> None:
    whole = size - size % buffer_size
    free: queue.Queue[mmap.mmap] = queue.Queue()
    full: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
    for _ in range(3):
        free.put(mmap.mmap(-1, buffer_size))

    def read() -> None:
        crc = 0
        for at in range(0, whole, buffer_size):
            buffer = free.get()
            os.preadv(src, [buffer], at)
            crc = zlib.crc32(buffer, crc)
            full.put((buffer, at))
        full.put(None)

    reader = threading.Thread(target=read)
    reader.start()
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        while (item := full.get()) is not None:
            buffer, at = item
            os.pwrite(out, buffer, at)
            free.put(buffer)
        os.fdatasync(out)
    finally:
        os.close(out)
        reader.join()
    _direct_tail(dest, os.pread(src, size - whole, whole), whole)


def disk_only(src: int, dest: Path, size: int) -> None:
    """Not a copy: ``O_DIRECT`` writes of zeros, 1 MiB at a time, nothing read or checked. What
    the disk alone, written at its speed, does to the writer: the floor of every way above."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    buffer = mmap.mmap(-1, DIRECT_BUFFER)
    try:
        for at in range(0, size - size % DIRECT_BUFFER, DIRECT_BUFFER):
            os.pwrite(out, buffer, at)
        os.fdatasync(out)
    finally:
        os.close(out)
        buffer.close()


CHOICES: dict[str, Copy] = {
    "unpaced": unpaced,
    "wb1x512": written_back(1, 512),
    "wb2x512": written_back(2, 512),
    "wb4x512": written_back(4, 512),
    "wb2x1024": written_back(2, 1024),
    "direct": direct,
    "direct-pipe": direct_pipe,
    "direct-pipe-256k": lambda src, dest, size: direct_pipe(src, dest, size, 256 << 10),
    "disk-only": disk_only,
}


def during(root: Path, work: Path, choice: str) -> dict[str, Any]:
    """One copy by ``choice`` while the writer runs; its seconds and the writer's figures."""
    source = root / "big.hc"
    with bench_copy.Writer(root, work) as writer:
        time.sleep(0.5)
        src = os.open(source, os.O_RDONLY)
        try:
            size = os.fstat(src).st_size
            began = time.monotonic()
            if choice != "none":
                CHOICES[choice](src, work / "dest", size)
            else:
                time.sleep(1.0)
            window = (began, time.monotonic())
        finally:
            os.close(src)
        time.sleep(0.3)
        samples = writer.stop()
        (work / "dest").unlink(missing_ok=True)
    inside = sorted(lat for at, lat, _ in samples if window[0] <= at <= window[1])
    return {
        "seconds": window[1] - window[0],
        "mib_s": size / MIB / (window[1] - window[0]),
        "commits": len(inside),
        "p99_ms": 1000 * inside[int(len(inside) * 0.99)],
        "max_ms": 1000 * inside[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to put data (a disk)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hotcopy-bench-choices-", dir=args.dir))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ["none", *CHOICES]}
    try:
        root = work / "repo"
        bench_copy.build_prefix(root, args.size_mib)
        for _ in range(args.rounds):
            for name in rows:  # alternated: drift falls on every choice alike
                rows[name].append(during(root, work, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    quiet_p99 = statistics.median(run["p99_ms"] for run in rows.pop("none"))
    unpaced_s = statistics.median(run["seconds"] for run in rows["unpaced"])
    results = {"size_mib": args.size_mib, "quiet_p99_ms": quiet_p99, "choices": {}}
    print(f"{args.size_mib} MiB, {args.rounds} rounds (medians); writer p99 with no copy "
          f"{quiet_p99:.2f} ms")
    print(f"  {'choice':<12} {'seconds':>8} {'MiB/s':>7} {'x unpaced':>10} {'p99 ms':>7} "
          f"{'x quiet':>8} {'max ms':>7}")
    for name, runs in rows.items():
        figures = {
            key: statistics.median(run[key] for run in runs)
            for key in ("seconds", "mib_s", "p99_ms", "max_ms")
        }
        figures["speed_vs_unpaced"] = unpaced_s / figures["seconds"]
        figures["p99_vs_quiet"] = figures["p99_ms"] / quiet_p99
        results["choices"][name] = figures
        print(f"  {name:<12} {figures['seconds']:8.3f} {figures['mib_s']:7.0f} "
              f"{figures['speed_vs_unpaced']:9.2f}x {figures['p99_ms']:7.2f} "
              f"{figures['p99_vs_quiet']:7.2f}x {figures['max_ms']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
