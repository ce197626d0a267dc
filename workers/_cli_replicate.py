"""``hotcopy replicate``: ship every commit of a repository to a replica (a backup directory
or ``s3://`` URL) within an interval, until stopped; ``hotcopy restore`` reads it back."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from ._catalog import parse_duration
from ._cli_base import (
    EXIT_OK,
    Console,
    add_endpoint_url,
    add_json,
    add_key_file,
    catalog_location,
    command_parser,
    positive_int,
    print_json,
)
from ._replicate import Replicator


def interval(text: str) -> float:
    """Seconds: a number (``0.5``) or a duration (``1s``, ``15m``, ``24h``)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def register(sub: Any) -> None:
    cmd = command_parser(
        sub,
        "replicate",
        "ship every commit to a replica within an interval, until stopped",
        """\
  hotcopy replicate /data/repo s3://backups/host-a/repo --interval 1s
  hotcopy replicate /data/repo /mnt/replica --snapshot-interval 1h --retention 24h
  hotcopy restore s3://backups/host-a/repo /data/new                  every commit shipped
  hotcopy restore s3://backups/host-a/repo /data/new --at 2026-12-06T07:30:00
  hotcopy restore /mnt/replica /data/new --prefix users --at-seq 1234""",
        description="Follow every prefix of ROOT and ship each commit to TARGET (a backup "
        "directory or s3:// URL) within --interval of its acknowledgement, with a snapshot "
        "(a backup) every --snapshot-interval; keep every commit of the last --retention "
        "restorable. Runs until SIGINT or SIGTERM, then ships what is left and exits 0. "
        "Writers never wait for it: it reads what their log made durable.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("target", type=catalog_location, help="a backup directory or s3:// URL")
    cmd.add_argument(
        "--interval",
        type=interval,
        default=1.0,
        metavar="T",
        help="ship each commit at most T after it (default 1s)",
    )
    cmd.add_argument(
        "--snapshot-interval",
        type=interval,
        default=3600.0,
        metavar="T",
        help="take a snapshot every T (default 1h): a restore reads at most T of commits",
    )
    cmd.add_argument(
        "--retention",
        type=interval,
        default=86400.0,
        metavar="T",
        help="keep every commit of the last T restorable (default 24h)",
    )
    cmd.add_argument(
        "--jobs",
        type=positive_int,
        default=2,
        metavar="N",
        help="copy-worker processes of each snapshot (default 2)",
    )
    cmd.add_argument("--compress", choices=["zstd"], help="store compressed (s3:// only)")
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_replicate)


def run_replicate(args: argparse.Namespace, console: Console) -> int:
    stop = threading.Event()

    def stopping(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Replicator(
            args.root,
            args.target,
            interval=args.interval,
            snapshot_interval=args.snapshot_interval,
            retention=args.retention,
            key_file=args.key_file,
            compress=args.compress == "zstd",
            jobs=args.jobs,
        ) as replicator:
            replicator.snapshot()
            if not args.json:
                console.notice(
                    f"replicating {args.root} into {replicator.catalog.where} every "
                    f"{args.interval:g} s from snapshot {replicator.status.generation}"
                )
            replicator.run(stop, started=True)
            status = replicator.status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print_json(status.to_json())
    else:
        print(
            f"stopped: shipped {status.shipped_commits} commit(s) in {status.shipped_objects} "
            f"object(s), {status.snapshots} snapshot(s); last generation {status.generation}"
        )
    return EXIT_OK
