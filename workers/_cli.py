"""The ``hotcopy`` command line: parsing, dispatch, and the one place errors become exit codes.

Exit status: 0 ok; 1 error, reported as one line ``hotcopy: error: ...`` on stderr without a
traceback; 2 usage (argparse's own convention). Each subcommand is a function taking the parsed
arguments and returning its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hotcopy.coordinator import format_status, read_status, status_to_json
from hotcopy.coordinator import main as coordinator_main
from hotcopy.coordinator._errors import HotcopyError
from hotcopy.storage import (
    CorruptFileError,
    NotRegularFile,
    Repository,
    StorageError,
    verify_file,
)
from hotcopy.storage._codec import too_deep
from hotcopy.storage._verify import verify_prefix

from ._backup import backup, restore
from ._catalog import CATALOG_MARKER, KEY_ENV, Catalog, list_backups, parse_duration
from ._progress import ProgressBar
from ._retention import prune

Command = Callable[[argparse.Namespace], int]


class CommandError(HotcopyError):
    """A command could not do what was asked; the message is shown to the user as is."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hotcopy`` command line; return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except KeyboardInterrupt:
        print("hotcopy: interrupted", file=sys.stderr)
        return 130
    except (HotcopyError, OSError, ValueError, TypeError) as err:
        print(f"hotcopy: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotcopy", description="Embedded multi-process prefix store with hot backups."
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    cmd = sub.add_parser("init", help="create a repository (or open the one there)")
    cmd.add_argument("root", type=Path)
    cmd.add_argument(
        "--group",
        metavar="NAME",
        help="share the repository with this group: its members read and write it "
        "(directories 2770, files 0660); without it the repository is private (0700/0600)",
    )
    cmd.set_defaults(command=_init)

    cmd = sub.add_parser("put", help="commit one key")
    cmd.add_argument("root", type=Path)
    cmd.add_argument("prefix")
    cmd.add_argument("key")
    cmd.add_argument("value")
    cmd.add_argument("--json", action="store_true", help="parse VALUE as JSON")
    cmd.set_defaults(command=_put)

    cmd = sub.add_parser("get", help="print one value (JSON unless it is a string)")
    cmd.add_argument("root", type=Path)
    cmd.add_argument("prefix")
    cmd.add_argument("key")
    cmd.set_defaults(command=_get)

    cmd = sub.add_parser(
        "ls",
        help="list prefixes with size and commit sequence; exit 1 if any is damaged",
        description="List every prefix with its size, commit sequence and number of keys. A "
        "prefix that cannot be read is listed as damaged, with the file and offset of the "
        "damage, and the exit status is 1.",
    )
    cmd.add_argument("root", type=Path)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_ls)

    cmd = sub.add_parser("copy", help="one consistent copy of a prefix, taken hot")
    cmd.add_argument("root", type=Path)
    cmd.add_argument("prefix")
    cmd.add_argument("dest", type=Path)
    cmd.add_argument(
        "--step-size",
        type=_positive_int,
        default=4 << 20,
        metavar="N",
        help="bytes copied per step (default 4 MiB)",
    )
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_copy)

    cmd = sub.add_parser("backup", help="back up prefixes into a backup directory")
    cmd.add_argument("root", type=Path)
    cmd.add_argument("dest_dir", type=Path)
    cmd.add_argument(
        "--prefix",
        action="append",
        dest="prefixes",
        metavar="P",
        help="back up this prefix (repeatable; default all)",
    )
    cmd.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        metavar="N",
        help="copy-worker processes (default 2)",
    )
    cmd.add_argument(
        "--incremental",
        action="store_true",
        help="deltas for prefixes unchanged in identity since their last backup",
    )
    cmd.add_argument(
        "--consistent", action="store_true", help="cut every prefix at the same instant"
    )
    cmd.add_argument(
        "--max-deltas",
        type=_positive_int,
        default=10,
        metavar="N",
        help="longest chain of deltas before a full copy (default 10)",
    )
    cmd.add_argument(
        "--verify-chain",
        action="store_true",
        help="read every byte of each chain before adding a delta to it",
    )
    _key_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_backup)

    cmd = sub.add_parser("restore", help="restore a backup directory (or one .hc copy)")
    cmd.add_argument("source", type=Path, help="a backup directory, or a .hc file")
    cmd.add_argument("root", type=Path)
    cmd.add_argument(
        "--prefix",
        action="append",
        dest="prefixes",
        metavar="P",
        help="restore this prefix (repeatable; default all)",
    )
    cmd.add_argument(
        "--at",
        metavar="WHEN",
        help="a backup id, 'latest', a duration ago (2h, 7d) or an ISO time (local time "
        "unless it has a zone): the newest complete, restorable backup at or before it",
    )
    cmd.add_argument(
        "--allow-partial",
        action="store_true",
        help="restore what a partial backup (named by --at) holds",
    )
    cmd.add_argument(
        "--force",
        action="store_true",
        help="replace prefixes of a non-empty ROOT (under their exclusive lease)",
    )
    _key_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_restore)

    cmd = sub.add_parser("prune", help="apply retention rules; never breaks a chain")
    cmd.add_argument("dest_dir", type=Path)
    cmd.add_argument(
        "--keep-last", "--keep", type=_positive_int, metavar="N", help="the N newest backups"
    )
    for period in ("hourly", "daily", "weekly", "monthly"):
        cmd.add_argument(
            f"--keep-{period}",
            type=_positive_int,
            metavar="N",
            help=f"the newest backup of each of the last N {period} periods (UTC) with one",
        )
    cmd.add_argument(
        "--keep-within",
        type=_duration,
        metavar="DURATION",
        help="every backup younger than DURATION (36h, 7d, 2w)",
    )
    cmd.add_argument(
        "--dry-run", action="store_true", help="say what would be kept and removed; change nothing"
    )
    _key_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_prune)

    cmd = sub.add_parser("backups", help="list the backups of a backup directory")
    cmd.add_argument("dest_dir", type=Path)
    cmd.add_argument(
        "--verify", action="store_true", help="judge restorability from every byte, not sizes"
    )
    _key_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print one JSON object (schema 1)")
    cmd.set_defaults(command=_backups)

    cmd = sub.add_parser("status", help="coordinator, leases and waiters (from shared memory)")
    cmd.add_argument("root", type=Path)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_status)

    cmd = sub.add_parser("coordinator", help="run the repository's coordinator in the foreground")
    cmd.add_argument("root", type=Path)
    cmd.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="exit after S seconds with no clients (default: never in the foreground)",
    )
    cmd.set_defaults(command=_coordinator)

    cmd = sub.add_parser(
        "salvage",
        help="keep what is provable of a damaged prefix",
        description=(
            "Keep what is provable of a damaged prefix: its main file up to any damage in it and "
            "the WAL's commits before any damage in that; the commits lost are printed and stay "
            "taken (as empty commits), and the damaged files are moved aside under new names, "
            "never deleted. A sound prefix is left as it is."
        ),
    )
    cmd.add_argument("root", type=Path)
    cmd.add_argument("prefix")
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_salvage)

    cmd = sub.add_parser("verify", help="check every checksum of a .hc file or a repository")
    cmd.add_argument("path", type=Path)
    _key_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(command=_verify)
    return parser


def _key_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help=f"the key of an authenticated backup catalog (default: ${KEY_ENV})",
    )


def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _init(args: argparse.Namespace) -> int:
    with Repository.init(args.root, group=args.group) as repo:
        print(f"repository {repo.root} (id {repo.id})")
    return 0


def _put(args: argparse.Namespace) -> int:
    value: Any = args.value
    if args.json:
        try:
            value = json.loads(args.value)
        except json.JSONDecodeError as err:
            raise CommandError(f"VALUE is not valid JSON: {err}") from err
        except RecursionError:  # json's C parser stops there, cleanly; the store refuses less
            raise too_deep("VALUE") from None
    with Repository(args.root) as repo, repo.open_prefix(args.prefix, "rw") as prefix:
        prefix[args.key] = value
        print(prefix.commit())
    return 0


def _get(args: argparse.Namespace) -> int:
    with Repository(args.root) as repo, repo.open_prefix(args.prefix, "r") as prefix:
        try:
            value = prefix[args.key]
        except KeyError:
            raise CommandError(f"key {args.key!r} not found in prefix {args.prefix!r}") from None
    if isinstance(value, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    elif isinstance(value, str):
        print(value)
    else:
        print(json.dumps(value))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _copy(args: argparse.Namespace) -> int:
    with Repository(args.root) as repo:
        bar = ProgressBar(f"copy {args.prefix}")
        try:
            result = repo.copy_prefix(
                args.dest,
                args.prefix,
                args.step_size,
                progress=lambda done, total: bar.update(
                    1, done, total_bytes=total, force=done == total
                ),
            )
        finally:
            bar.close()
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        rate = result.length / max(result.seconds, 1e-9) / (1 << 20)
        print(
            f"copied prefix {result.prefix!r} at commit {result.seq}: {result.length} bytes "
            f"to {result.path} in {result.seconds:.2f} s ({rate:.0f} MiB/s)"
        )
    return 0


def _backup(args: argparse.Namespace) -> int:
    bar = ProgressBar("backup")
    try:
        result = backup(
            args.root,
            args.dest_dir,
            args.prefixes,
            jobs=args.jobs,
            incremental=args.incremental,
            consistent=args.consistent,
            max_deltas_before_full=args.max_deltas,
            verify_chain=args.verify_chain,
            key_file=args.key_file,
            progress=lambda done, total, done_bytes, total_bytes: bar.update(
                done, done_bytes, total_bytes=total_bytes, total_items=total
            ),
        )
    except KeyboardInterrupt:
        bar.close()
        print("hotcopy: interrupted; the backup is recorded as partial", file=sys.stderr)
        return 130
    bar.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if result.took_over:
            print(result.took_over)
        for name, why in sorted(result.chain_restarts.items()):
            print(f"prefix {name!r}: {why}; full copy taken, a new chain starts")
        kinds = [entry["kind"] for entry in result.prefixes.values()]
        print(
            f"backup {result.id} ({'complete' if result.complete else 'PARTIAL'}): "
            f"{len(result.prefixes)} prefixes ({kinds.count('full')} full, "
            f"{kinds.count('delta')} delta), {result.bytes} bytes in {result.seconds:.2f} s "
            f"-> {result.path}"
        )
    if result.failed:
        failures = "; ".join(f"{name!r}: {error}" for name, error in sorted(result.failed.items()))
        print(
            f"hotcopy: error: backup {result.id} is partial (never restored by default nor "
            f"kept by retention): {len(result.failed)} prefix(es) not backed up: {failures}",
            file=sys.stderr,
        )
        return 1
    return 0


def _restore(args: argparse.Namespace) -> int:
    source: Path = args.source
    if source.is_file():
        prefixes = args.prefixes or [source.name.removesuffix(".hc")]
        if len(prefixes) != 1 or args.at:
            raise CommandError("restoring one .hc file takes at most one --prefix and no --at")
        with Repository.init(args.root) as repo:
            seq = repo.restore_prefix(source, prefixes[0], force=args.force)
        payload: dict[str, Any] = {
            "id": None,
            "root": str(args.root),
            "prefixes": {prefixes[0]: seq},
        }
    else:
        bar = ProgressBar("restore")
        try:
            result = restore(
                source,
                args.root,
                args.prefixes,
                at=args.at,
                force=args.force,
                allow_partial=args.allow_partial,
                key_file=args.key_file,
                progress=lambda done, total, done_bytes, total_bytes: bar.update(
                    done, done_bytes, total_bytes=total_bytes, total_items=total
                ),
            )
        finally:
            bar.close()
        payload = result.to_json()
        if not args.json:
            if args.at in (None, "latest"):
                print(f"took backup {result.id}, the newest complete and restorable one")
            for why in result.passed_over:
                print(f"passed over {why}")
            for name, why in sorted(result.missing.items()):
                print(f"not in this partial backup: {name} ({why})")
    if args.json:
        print(json.dumps(payload))
    else:
        restored = ", ".join(f"{name}@{seq}" for name, seq in sorted(payload["prefixes"].items()))
        origin = f"backup {payload['id']}" if payload["id"] else str(source)
        print(f"restored from {origin} into {args.root}: {restored}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    rules = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")
    if all(getattr(args, rule) is None for rule in rules) and args.keep_within is None:
        raise CommandError(
            "prune needs a rule: --keep-last N (or --keep N), --keep-hourly, --keep-daily, "
            "--keep-weekly, --keep-monthly N, or --keep-within DURATION"
        )
    report = prune(
        args.dest_dir,
        args.keep_last,
        keep_hourly=args.keep_hourly,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        keep_monthly=args.keep_monthly,
        keep_within=args.keep_within,
        dry_run=args.dry_run,
        key_file=args.key_file,
    )
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    width = max([len("BACKUP"), *(len(d.id) for d in report.decisions)])
    print(f"{'BACKUP':<{width}}  ACTION  WHY")
    for decision in report.decisions:
        print(f"{decision.id:<{width}}  {decision.action:<6}  {'; '.join(decision.reasons)}")
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb} {len(report.removed)} backup(s), trimmed {len(report.trimmed)} to the links "
        f"kept backups need, kept {len(report.kept)}"
        + (" (dry run: nothing changed)" if report.dry_run else "")
    )
    return 0


def _backups(args: argparse.Namespace) -> int:
    listing = list_backups(args.dest_dir, verify=args.verify, key_file=args.key_file)
    if args.json:
        print(json.dumps(listing))
        return 0
    origin = "".join(
        f"; before it {s['repository_id']} (until restored from its backup "
        f"{s['restored_from']} on {s['time']})"
        for s in reversed(listing["lineage"])
    )
    print(f"catalog {listing['catalog']} of repository {listing['repository_id']}{origin}")
    rows = listing["backups"]
    width = max([len("BACKUP"), *(len(row["id"]) for row in rows)])
    print(
        f"{'BACKUP':<{width}}  {'TIME (UTC)':<32}  {'STATUS':<10}  FULL  DELTA  {'BYTES':>12}  "
        "RESTORABLE  DEPENDS ON"
    )
    for row in rows:
        restorable = "yes" if row["restorable"] else f"no: {row['problem']}"
        print(
            f"{row['id']:<{width}}  {row['time']:<32}  {row['status']:<10}  {row['full']:>4}  "
            f"{row['delta']:>5}  {row['bytes']:>12}  {restorable}  "
            f"{', '.join(row['depends_on']) or '-'}"
            + (f"  (without {', '.join(row['missing'])})" if row["missing"] else "")
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    if not (args.root / "hotcopy.json").exists():
        raise CommandError(f"{args.root} is not a hotcopy repository (no hotcopy.json)")
    status = read_status(args.root)  # shared memory only: no round trip, starts nothing
    if args.json:
        print(json.dumps(status_to_json(status)))
    else:
        print(format_status(status))
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    if not (args.root / "hotcopy.json").exists():
        raise CommandError(f"{args.root} is not a hotcopy repository (no hotcopy.json)")
    # In the foreground a coordinator runs until stopped, unless told otherwise.
    idle = args.idle_timeout if args.idle_timeout is not None else 10.0 * 365 * 86400
    return coordinator_main([str(args.root), "--idle-timeout", str(idle)])


def _ls(args: argparse.Namespace) -> int:
    if os.path.lexists(args.root / CATALOG_MARKER):
        raise CommandError(f"{args.root} is a backup directory; list it with `hotcopy backups`")
    rows: list[dict[str, Any]] = []
    with Repository(args.root) as repo:
        for name in repo.prefixes():
            main = repo.prefix_path(name)
            size = _file_size(main) + _file_size(main.with_suffix(".hc-wal"))
            row: dict[str, Any] = {"prefix": name, "bytes": size, "seq": None, "keys": None}
            row.update(damaged=False, error=None)
            try:
                with repo.open_prefix(name, "r") as prefix:
                    row.update(seq=prefix.seq, keys=len(prefix))
            except (CorruptFileError, NotRegularFile) as err:
                row.update(damaged=True, error=_damage(main, err))
            rows.append(row)
    damaged = [row["prefix"] for row in rows if row["damaged"]]
    if args.json:
        print(json.dumps({"prefixes": rows}))
    elif not rows:
        print("no prefixes")
    else:
        width = max(len("PREFIX"), *(len(row["prefix"]) for row in rows))
        print(f"{'PREFIX':<{width}}  {'BYTES':>12}  {'SEQ':>8}  {'KEYS':>8}")
        for row in rows:
            seq, keys = ("-", "-") if row["damaged"] else (row["seq"], row["keys"])
            line = f"{row['prefix']:<{width}}  {row['bytes']:>12}  {seq:>8}  {keys:>8}"
            print(f"{line}  {row['error']}" if row["damaged"] else line)
    if damaged:
        print(
            f"hotcopy: error: {len(damaged)} of {len(rows)} prefixes are damaged: "
            f"{', '.join(map(repr, damaged))}; `hotcopy verify {args.root}` checks every file",
            file=sys.stderr,
        )
        return 1
    return 0


def _damage(main: Path, err: StorageError) -> str:
    """What kept a prefix from opening, with the file and offset as ``verify`` reports them."""
    if isinstance(err, CorruptFileError):
        report = verify_file(main)  # the main file: where all that opening refuses lies today
        if not report.ok:
            return report.summary()
    return _one_line(err)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir() and os.path.lexists(path / CATALOG_MARKER):
        return _verify_catalog(path, args.key_file, args.json)
    if path.is_dir():
        with Repository(path) as repo:
            reports = [verify_prefix(repo.root, name, repo.id_bytes) for name in repo.prefixes()]
    elif path.exists():
        reports = [verify_file(path)]
    else:
        raise StorageError(f"nothing to verify at {path}: no such file or directory")
    damaged = [report for report in reports if not report.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not damaged,
                    "files": [report.to_json() for report in reports],
                }
            )
        )
    else:
        for report in reports:
            print(report.summary())
        print(f"{len(reports)} file(s) checked, {len(damaged)} damaged")
    if damaged:
        first = damaged[0]
        print(
            f"hotcopy: error: {first.path} is damaged at offset {first.offset}: {first.error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _salvage(args: argparse.Namespace) -> int:
    with Repository(args.root) as repo:
        result = repo.salvage_prefix(args.prefix)
    lost = f"{result.lost[0]}-{result.lost[1]}" if result.lost else None
    if args.json:
        payload = {
            "prefix": args.prefix,
            "damaged": result.damage is not None,
            "kept": result.kept,
            "lost": list(result.lost) if result.lost else None,
            "moved_aside": [str(path) for path in result.moved_aside],
        }
        print(json.dumps(payload))
        return 0
    if result.damage is None:
        print(f"prefix {args.prefix!r}: nothing to salvage (no damage found); nothing changed")
        return 0
    damage = result.damage
    print(
        f"prefix {args.prefix!r}: {damage.path} was damaged at offset {damage.offset}: "
        f"{damage.reason}"
    )
    kept = f"kept commits 1-{result.kept}" if result.kept else "kept no commits"
    print(
        f"{kept}; "
        + (
            f"lost commits {lost} (their numbers stay taken, as empty commits)"
            if lost
            else "lost no commit found in the damaged part"
        )
    )
    for path in result.moved_aside:
        print(f"moved aside: {path}")
    return 0


def _verify_catalog(path: Path, key_file: Path | None, as_json: bool) -> int:
    catalog = Catalog(path, key_file=key_file)
    bar = ProgressBar("verify")
    try:
        check = catalog.scan().check(checksums=True)
    finally:
        bar.close()
    found = ", ".join(f"{n} {status}" for status, n in check.counts.items())
    if as_json:
        print(
            json.dumps(
                {
                    "ok": not check.problems and check.restorable > 0,
                    "backups": sum(check.counts.values()),
                    "found": check.counts,
                    "restorable": check.restorable,
                    "problems": check.problems,
                    "notes": check.notes,
                }
            )
        )
    else:
        for line in (*check.problems, *check.notes):
            print(line)
        print(
            f"{sum(check.counts.values())} backup(s) checked ({found}): {check.restorable} "
            f"complete and restorable, {len(check.problems)} problem(s)"
        )
    if check.restorable == 0:
        first = f"; {check.problems[0]}" if check.problems else ""
        print(
            f"hotcopy: error: {path}: no complete, restorable backup (found {found}){first}",
            file=sys.stderr,
        )
        return 1
    if check.problems:
        print(f"hotcopy: error: {path}: {check.problems[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
