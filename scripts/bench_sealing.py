#!/usr/bin/env python3
"""Sealing benchmark: MiB/s of seal_file and open_file against a plain copy of the same bytes.

For random and for compressible data (rows of text, about 5:1 under zstd), it times, in the
same run: ``shutil.copyfile`` of the plaintext (the baseline), then seal and open for each
mode (encrypted; encrypted + zstd; zstd alone), printing MiB/s of plaintext, the ratio to
the copy's MiB/s and the sealed size as a share of the plaintext. Files live in the page
cache (a temp dir), so the figures are the CPU cost of sealing, not the disk's.

Usage: bench_sealing.py [--dir DIR] [--size-mib 256] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from hotcopy.workers._sealing import derive_keys, open_file, seal_file

MIB = 1 << 20
KEYS = derive_keys(os.urandom(32))
MODES = {"aes": (KEYS, False), "aes+zstd": (KEYS, True), "zstd": (None, True)}


def write_data(path: Path, size: int, kind: str) -> None:
    rng = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    pool = b"".join(
        b"row %010d user=%s amount=%d.%02d status=%s\n"
        % (i, rng.choice(words).encode(), rng.randrange(10**6), rng.randrange(100), b"ok")
        for i in range(4 * MIB // 48)
    )
    with open(path, "wb") as out:
        for _ in range(size // MIB):
            if kind == "random":
                out.write(os.urandom(MIB))
            else:
                start = rng.randrange(len(pool) - MIB)
                out.write(pool[start : start + MIB])


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to put the files (default: a temp dir)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    mib = args.size_mib
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain, sealed, opened = (Path(tmp, name) for name in ("plain", "sealed", "opened"))
        for kind in ("random", "compressible"):
            write_data(plain, mib * MIB, kind)
            for run in range(1, args.runs + 1):
                copy = mib / timed(lambda: shutil.copyfile(plain, opened))
                print(f"{kind}, run {run}: copy {copy:7.0f} MiB/s ({mib} MiB)")
                for mode, (keys, compress) in MODES.items():
                    rate = mib / timed(partial(seal_file, plain, sealed, keys, compress=compress))
                    share = sealed.stat().st_size / plain.stat().st_size
                    back = mib / timed(partial(open_file, sealed, opened, keys))
                    assert opened.stat().st_size == plain.stat().st_size
                    print(
                        f"  {mode:9} seal {rate:6.0f} MiB/s ({rate / copy:4.2f}x copy), "
                        f"open {back:6.0f} MiB/s ({back / copy:4.2f}x copy), "
                        f"sealed size {share:6.1%}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
