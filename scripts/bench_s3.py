"""Benchmark a backup into an S3-compatible bucket against the same backup into a directory.

A repository of --mib MiB (in --prefixes prefixes, default one) is backed up, alternately,
into a local directory and into ``s3://BUCKET/PATH`` on a local S3 API server (moto's, started
here on 127.0.0.1; or the server ``HOTCOPY_TEST_S3_ENDPOINT`` names), then restored from each;
medians of --rounds.
The ratio is the directory's time over the bucket's (issue 20's target: >= 0.5x).

    python scripts/bench_s3.py [--mib 1024] [--prefixes 1] [--rounds 2] [--dir DIR] [--json FILE]

The bucket is timed plain, and sealed with a key and zstd. The values repeat one random 64 KiB
block, so zstd shrinks each 1 MiB chunk about 16x: the sealed row shows what compression gains
on repetitive data, not what sealing costs on data that does not compress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hotcopy.workers import backup, restore
from hotcopy.workers._s3 import ObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _s3server import S3Server
from bench_backup import make_repo


def timed(action: Any, *args: Any, **options: Any) -> float:
    began = time.monotonic()
    action(*args, **options)
    return time.monotonic() - began


def _upload_all(url: str, root: Path) -> None:
    store = ObjectStore(url)
    for path in sorted(root.glob("*.hc")):
        store.upload_file(path.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--prefixes", type=int, default=1, help="the --mib split among them")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    server = S3Server(work / "moto.log")
    server.start()
    try:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint_url
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        root = work / "repo"
        size = make_repo(root, args.prefixes, max(args.mib // args.prefixes, 1))
        key = work / "key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        kinds = (
            "upload",
            "dir",
            "s3",
            "s3_sealed",
            "restore_dir",
            "restore_s3",
            "restore_s3_sealed",
        )
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for n in range(args.rounds):
            # Alternated, so drift falls on all alike; nothing deleted until all are timed.
            directory, url = work / f"backups-{n}", f"s3://{bucket}/round-{n}"
            sealed = f"s3://{bucket}/sealed-{n}"
            # The server alone: one upload of those bytes.
            times["upload"].append(timed(_upload_all, f"s3://{bucket}/raw-{n}", root))
            times["dir"].append(timed(backup, root, directory))
            times["s3"].append(timed(backup, root, url))
            times["s3_sealed"].append(timed(backup, root, sealed, key_file=key, compress=True))
            times["restore_dir"].append(timed(restore, directory, work / f"from-dir-{n}"))
            times["restore_s3"].append(timed(restore, url, work / f"from-s3-{n}"))
            times["restore_s3_sealed"].append(
                timed(restore, sealed, work / f"from-sealed-{n}", key_file=key)
            )
        medians = {key: statistics.median(values) for key, values in times.items()}
        results = {
            "bytes": size,
        "prefixes": args.prefixes,
            "rounds": args.rounds,
            "seconds": times,
            "backup_ratio": medians["dir"] / medians["s3"],
            "upload_ratio": medians["dir"] / medians["upload"],
            "restore_ratio": medians["restore_dir"] / medians["restore_s3"],
            "sealed_backup_ratio": medians["dir"] / medians["s3_sealed"],
            "sealed_restore_ratio": medians["restore_dir"] / medians["restore_s3_sealed"],
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mib = size / (1 << 20)
    print(
        f"{args.prefixes} prefix(es), {mib:.0f} MiB, {args.rounds} rounds, medians "
        f"(server {server.endpoint_url})"
    )
    labels = {
        "upload": "upload of the files alone",
        "dir": "backup into a directory",
        "s3": "backup into the bucket",
        "s3_sealed": "the same, key + zstd",
        "restore_dir": "restore from the directory",
        "restore_s3": "restore from the bucket",
        "restore_s3_sealed": "the same, key + zstd",
    }
    for kind, label in labels.items():
        seconds = statistics.median(times[kind])
        print(f"  {label:<28} {seconds:7.2f} s  {mib / seconds:7.0f} MiB/s")
    print(f"  the server's own bound: an upload alone is {results['upload_ratio']:.2f}x "
          "of the directory backup's speed")  # fmt: skip
    print(f"  bucket / directory: backup {results['backup_ratio']:.2f}x, "
          f"restore {results['restore_ratio']:.2f}x; sealed: backup "
          f"{results['sealed_backup_ratio']:.2f}x, restore "
          f"{results['sealed_restore_ratio']:.2f}x (of the directory's speed)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
