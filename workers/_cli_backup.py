"""``hotcopy`` subcommands on backup directories (catalogs) and checks: backup, restore, prune,
backups, verify. Each ``run_*`` takes the parsed arguments and the console and returns the exit
status."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hotcopy.coordinator import LeaseTimeout
from hotcopy.storage import Repository, StorageError, verify_file
from hotcopy.storage._files import open_regular
from hotcopy.storage._format import HEADER_SIZE, MAIN_MAGIC, magic_damaged
from hotcopy.storage._verify import VerifyReport, verify_prefix

from ._backup import BackupResult, backup, older_formats, restore, restore_copy
from ._catalog import CATALOG_MARKER, Catalog, Check, list_backups
from ._cli_base import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    CommandError,
    Console,
    add_endpoint_url,
    add_json,
    add_key_file,
    add_prefixes,
    add_rate_limit,
    add_timeout,
    catalog_location,
    command_parser,
    duration,
    positive_int,
    print_json,
)
from ._cli_repository import file_size, waited_text
from ._cli_waits import WaitTimeout, lease_holders, open_repository
from ._progress import human_bytes
from ._retention import prune

CATALOG_HELP = "the backup directory, or s3://BUCKET/PATH"


def register(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (argparse subparsers)."""
    cmd = command_parser(
        sub,
        "backup",
        "back up prefixes into a backup directory",
        """\
  hotcopy backup /data/repo /backups                   every prefix, full copies
  hotcopy backup /data/repo /backups --incremental     deltas where the chain allows
  hotcopy backup /data/repo /backups --prefix users --prefix orders --jobs 4
  hotcopy backup /data/repo /backups --consistent --timeout 60 --json""",
        description="Back up prefixes of ROOT into the backup directory DEST_DIR (created if "
        "absent), hot. A prefix that cannot be copied makes the backup partial (exit 3): the "
        "others are in it. The time reported leaves out the wait for the backup directory's "
        "lock (another backup or prune), which is reported apart.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("dest_dir", type=catalog_location, help=CATALOG_HELP)
    add_prefixes(cmd, "back up")
    cmd.add_argument(
        "--jobs",
        type=positive_int,
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
    add_rate_limit(cmd)
    cmd.add_argument(
        "--compress",
        choices=["zstd"],
        help="store the backup compressed (s3:// catalogs; restore finds out by itself)",
    )
    cmd.add_argument(
        "--max-deltas",
        type=positive_int,
        default=10,
        metavar="N",
        help="longest chain of deltas before a full copy (default 10)",
    )
    cmd.add_argument(
        "--verify-chain",
        action="store_true",
        help="read every byte of each chain before adding a delta to it",
    )
    add_timeout(cmd, "the backup directory's lock and for each lease (a prefix whose lease "
                "times out fails: the backup is partial)")  # fmt: skip
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_backup)

    cmd = command_parser(
        sub,
        "restore",
        "restore a backup directory (or one .hc copy)",
        """\
  hotcopy restore /backups /data/new                 the newest complete, restorable backup
  hotcopy restore /backups /data/new --at 2h         as it was two hours ago
  hotcopy restore /replica /data/new --prefix users --at-seq 1234   one commit of a replica
  hotcopy restore /backups /data/repo --prefix users --force   replace one live prefix
  hotcopy restore users.hc /data/repo --prefix users --force   from one copy""",
        description="Restore a backup directory (or one .hc copy) into ROOT, which must be "
        "empty or absent unless --force (then each prefix is replaced under its exclusive "
        "lease). Restoring what a partial backup holds (--allow-partial) exits 3.",
    )
    cmd.add_argument(
        "source", type=catalog_location, help="a backup directory or s3:// URL, or a .hc file"
    )
    cmd.add_argument("root", type=Path, help="the repository to restore into")
    add_prefixes(cmd, "restore")
    cmd.add_argument(
        "--at",
        metavar="WHEN",
        help="a backup id, 'latest', a duration ago (2h, 7d) or an ISO time (local time "
        "unless it has a zone): the newest complete, restorable backup at or before it",
    )
    cmd.add_argument(
        "--at-seq",
        type=positive_int,
        metavar="N",
        help="from a replica (hotcopy replicate): the one --prefix exactly as it was at its "
        "commit N",
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
    cmd.add_argument(
        "--jobs",
        type=positive_int,
        default=2,
        metavar="N",
        help="copy-worker processes restoring prefixes side by side (default 2)",
    )
    add_timeout(cmd, "each prefix's exclusive lease (with --force)")
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_restore)

    cmd = command_parser(
        sub,
        "prune",
        "apply retention rules; never breaks a chain",
        """\
  hotcopy prune /backups --keep-daily 7 --keep-weekly 4 --dry-run
  hotcopy prune /backups --keep-last 3
  hotcopy prune /backups --keep-within 36h --timeout 60""",
    )
    cmd.add_argument("dest_dir", type=catalog_location, help=CATALOG_HELP)
    cmd.add_argument(
        "--keep-last",
        "--keep",
        type=positive_int,
        metavar="N",
        help="the N newest backups (--keep N is the same)",
    )
    for period in ("hourly", "daily", "weekly", "monthly"):
        cmd.add_argument(
            f"--keep-{period}",
            type=positive_int,
            metavar="N",
            help=f"the newest backup of each of the last N {period} periods (UTC) with one",
        )
    cmd.add_argument(
        "--keep-within",
        type=duration,
        metavar="DURATION",
        help="every backup younger than DURATION (36h, 7d, 2w)",
    )
    cmd.add_argument(
        "--dry-run", action="store_true", help="say what would be kept and removed; change nothing"
    )
    add_timeout(cmd, "the backup directory's lock (another backup or prune)")
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_prune)

    cmd = command_parser(
        sub,
        "backups",
        "list the backups of a backup directory",
        """\
  hotcopy backups /backups
  hotcopy backups /backups --verify --json""",
    )
    cmd.add_argument("dest_dir", type=catalog_location, help=CATALOG_HELP)
    cmd.add_argument(
        "--verify", action="store_true", help="judge restorability from every byte, not sizes"
    )
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_backups)

    cmd = command_parser(
        sub,
        "verify",
        "check every checksum of a .hc file, a repository or a backup directory",
        """\
  hotcopy verify users.hc          one copy or main file
  hotcopy verify /data/repo        every prefix of a repository
  hotcopy verify /backups          every piece and chain of a backup directory""",
        description="Check every checksum of a .hc file, of every prefix of a repository, or "
        "of every piece and chain of a backup directory. Damage in some of a directory's "
        "prefixes or backups exits 3; a damaged file, or a backup directory with nothing "
        "restorable, exits 1.",
    )
    cmd.add_argument(
        "path",
        type=catalog_location,
        help="a .hc file, a repository, or a backup directory or s3:// URL",
    )
    add_key_file(cmd)
    add_endpoint_url(cmd)
    add_json(cmd)
    cmd.set_defaults(command=run_verify)


# -- backup -----------------------------------------------------------------------------------


def run_backup(args: argparse.Namespace, console: Console) -> int:
    waits = console.waits(args.timeout)
    with console.progress("backup") as bar:
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
                progress=bar.update,
                lease_timeout=args.timeout,
                acquire_lock=waits.acquire_lock,
                rate_limit=args.rate_limit,
                compress=args.compress == "zstd",
            )
        except KeyboardInterrupt as err:
            bar.abandon()
            if getattr(err, "recorded", True):
                console.error("interrupted; the backup is recorded as partial")
            else:
                console.error("interrupted while recording the backup; nothing of it is kept")
            return EXIT_INTERRUPTED
        finished = len(result.prefixes) + len(result.failed)
        done = bar.finish(len(result.prefixes), finished, result.bytes, result.seconds)
    failed = {name: _with_holders(args.root, name, why) for name, why in result.failed.items()}
    if args.json:
        print_json({**result.to_json(), "failed": failed})
    else:
        if result.took_over:
            print(result.took_over)
        for name, why in sorted(result.chain_restarts.items()):
            print(f"prefix {name!r}: {why}; full copy taken, a new chain starts")
        print(_backup_summary(result, done.rate_text()))
    if failed:
        failures = "; ".join(f"{name!r}: {error}" for name, error in sorted(failed.items()))
        console.error(
            f"backup {result.id} is partial (never restored by default nor kept by retention): "
            f"{len(failed)} of {finished} prefixes not backed up: {failures}"
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _backup_summary(result: BackupResult, rate: str) -> str:
    kinds = [entry["kind"] for entry in result.prefixes.values()]
    return (
        f"backup {result.id} ({'complete' if result.complete else 'PARTIAL'}): "
        f"{len(result.prefixes)} prefixes ({kinds.count('full')} full, "
        f"{kinds.count('delta')} delta), {human_bytes(result.bytes)} ({result.bytes} bytes) "
        f"in {result.seconds:.2f} s ({rate}) -> {result.path}"
        + waited_text(result.waited, "the backup directory's lock")
    )


def _with_holders(root: Path, prefix: str, why: str) -> str:
    """A prefix's failure; for a lease that timed out, who held the prefix's leases."""
    if not why.startswith(LeaseTimeout.__name__):
        return why
    return f"{why} (held by {lease_holders(root, prefix, 'exclusive')})"


# -- restore ----------------------------------------------------------------------------------


def run_restore(args: argparse.Namespace, console: Console) -> int:
    source: str | Path = args.source
    if isinstance(source, str):
        pass  # an s3:// catalog
    elif not os.path.lexists(source):
        raise CommandError(
            f"{source}: no such file or directory (give a backup directory or a .hc copy)"
        )
    elif not source.is_dir():
        return _restore_copy(args, console)
    with console.progress("restore") as bar:
        try:
            result = restore(
                source,
                args.root,
                args.prefixes,
                at=args.at,
                force=args.force,
                allow_partial=args.allow_partial,
                key_file=args.key_file,
                progress=bar.update,
                lease_timeout=args.timeout,
                jobs=args.jobs,
                at_seq=args.at_seq,
            )
        except LeaseTimeout as err:
            raise _lease_timeout(args.root, err) from None
        done = bar.finish(len(result.prefixes), len(result.prefixes), result.bytes, result.seconds)
    if args.json:
        print_json(result.to_json())
    else:
        if args.at in (None, "latest"):
            print(f"took backup {result.id}, the newest complete and restorable one")
        for why in result.passed_over:
            print(f"passed over {why}")
        for name, why in sorted(result.missing.items()):
            print(f"not in this partial backup: {name} ({why})")
        restored = ", ".join(f"{name}@{seq}" for name, seq in sorted(result.prefixes.items()))
        print(
            f"restored from backup {result.id} into {args.root}: {restored} "
            f"({human_bytes(result.bytes)} in {result.seconds:.2f} s, {done.rate_text()})"
        )
        _tell_older_formats(args.root, result.older_format)
    if result.missing:
        console.error(
            f"restored a partial backup: {len(result.missing)} prefix(es) were not in it: "
            + ", ".join(sorted(result.missing))
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _restore_copy(args: argparse.Namespace, console: Console) -> int:
    source: Path = args.source
    prefixes = args.prefixes or [source.name.removesuffix(".hc")]
    if len(prefixes) != 1 or args.at or args.at_seq:
        raise CommandError(
            "restoring one .hc file takes at most one --prefix and no --at or --at-seq"
        )
    if not _is_hotcopy_file(Path(os.path.realpath(source))):  # the user's link is followed
        raise CommandError(f"{source} is not a hotcopy file (neither a .hc copy nor a directory)")
    seq = restore_copy(
        source,
        args.root,
        prefixes[0],
        force=args.force,
        repository=lambda root: open_repository(root, console.waits(args.timeout)),
    )
    older = older_formats(args.root, prefixes)
    if args.json:
        print_json(
            {
                "id": None,
                "root": str(args.root),
                "prefixes": {prefixes[0]: seq},
                "older_format": older,
            }
        )
    else:
        print(f"restored from {source} into {args.root}: {prefixes[0]}@{seq}")
        _tell_older_formats(args.root, older)
    return EXIT_OK


def _tell_older_formats(root: Path, older: dict[str, int]) -> None:
    if older:
        listed = ", ".join(f"{name} (format {version})" for name, version in sorted(older.items()))
        print(
            f"in an older file format, opened by this version only once converted: {listed}; "
            f"run `hotcopy migrate {root}`"
        )


def _lease_timeout(root: Path, err: LeaseTimeout) -> WaitTimeout:
    prefix = str(getattr(err, "prefix", "?"))
    mode = str(getattr(err, "mode", "exclusive"))
    return WaitTimeout(
        f"{err}: held by {lease_holders(root, prefix, mode)}; `hotcopy status {root}` shows "
        "every lease",
        prefix=prefix,
    )


# -- prune and backups ------------------------------------------------------------------------


def run_prune(args: argparse.Namespace, console: Console) -> int:
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
        acquire_lock=console.waits(args.timeout).acquire_lock,
    )
    if args.json:
        print_json(report.to_json())
        return EXIT_OK
    width = max([len("BACKUP"), *(len(d.id) for d in report.decisions)])
    print(f"{'BACKUP':<{width}}  ACTION  WHY")
    for decision in report.decisions:
        print(f"{decision.id:<{width}}  {decision.action:<6}  {'; '.join(decision.reasons)}")
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb} {len(report.removed)} backup(s), trimmed {len(report.trimmed)} to the links "
        f"kept backups need, kept {len(report.kept)}"
        + (f", left {len(report.left)} in place" if report.left else "")
        + (" (dry run: nothing changed)" if report.dry_run else "")
    )
    return EXIT_OK


def run_backups(args: argparse.Namespace, console: Console) -> int:
    listing = list_backups(args.dest_dir, verify=args.verify, key_file=args.key_file)
    if args.json:
        print_json(listing)  # schema version 1, its own (README)
        return EXIT_OK
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
    return EXIT_OK


# -- verify -----------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace, console: Console) -> int:
    path: str | Path = args.path
    if isinstance(path, str) or (path.is_dir() and os.path.lexists(path / CATALOG_MARKER)):
        return _verify_catalog(path, args.key_file, args.json, console)
    if path.is_dir():
        return _verify_repository(path, args.json, console)
    if not os.path.lexists(path):
        raise StorageError(f"nothing to verify at {path}: no such file or directory")
    path = Path(os.path.realpath(path))  # the user named it: a link to a copy is followed
    if not _is_hotcopy_file(path):
        raise CommandError(
            f"{path} is not a hotcopy file: give a .hc file, a repository or a backup directory"
        )
    report = verify_file(path)
    if args.json:
        print_json({"ok": report.ok, "files": [report.to_json()]})
    elif report.ok:
        print(report.summary())
    if not report.ok:
        console.error(f"{report.path} is damaged at offset {report.offset}: {report.error}")
        return EXIT_ERROR
    return EXIT_OK


def _is_hotcopy_file(path: Path) -> bool:
    """Whether ``path`` starts like a hotcopy main file (a copy, a full backup piece), or is
    one whose magic was damaged; a FIFO, socket or device is refused at once
    (NotRegularFile), never waited on."""
    fd = open_regular(path)
    try:
        raw = os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)
    return raw.startswith(MAIN_MAGIC) or magic_damaged(raw, MAIN_MAGIC)


def _verify_repository(root: Path, as_json: bool, console: Console) -> int:
    reports: list[VerifyReport] = []
    with Repository(root) as repo, console.progress("verify", "files") as bar:
        names = repo.prefixes()
        sizes = {name: file_size(repo.prefix_path(name)) for name in names}
        total = sum(sizes.values())
        for number, name in enumerate(names):
            bar.update(number, len(names), sum(sizes[n] for n in names[:number]), total)
            reports.append(verify_prefix(repo.root, name, repo.id_bytes))
        done = bar.finish(len(names), len(names), total, bar.figures.seconds)
    damaged = [report for report in reports if not report.ok]
    if as_json:
        print_json({"ok": not damaged, "files": [report.to_json() for report in reports]})
    else:
        for report in reports:
            print(report.summary())
        print(
            f"{len(reports)} file(s) checked, {len(damaged)} damaged "
            f"({human_bytes(total)}, {done.rate_text()})"
        )
    if damaged:
        first = damaged[0]
        console.error(
            f"{len(damaged)} of {len(reports)} prefixes damaged; the first: {first.path} at "
            f"offset {first.offset}: {first.error}"
        )
        return EXIT_ERROR  # damage found is an error, whatever else is sound
    return EXIT_OK


def _verify_catalog(
    path: str | Path, key_file: Path | None, as_json: bool, console: Console
) -> int:
    view = Catalog(path, key_file=key_file).scan()
    pieces = [
        (record.manifest, entry)
        for record in view.ordered()
        if record.manifest is not None
        for entry in record.manifest.entries.values()
    ]
    total = sum(entry.size for _, entry in pieces)
    with console.progress("verify", "pieces") as bar:
        done_bytes = 0
        for number, (manifest, entry) in enumerate(pieces):
            bar.update(number, len(pieces), done_bytes, total)
            view.piece_problem(manifest, entry, checksums=True)  # read once; check() reuses it
            done_bytes += entry.size
        check = view.check(checksums=True)
        bar.finish(len(pieces), len(pieces), total, bar.figures.seconds)
    return _report_check(path, check, as_json, console)


def _report_check(path: str | Path, check: Check, as_json: bool, console: Console) -> int:
    found = ", ".join(f"{n} {status}" for status, n in check.counts.items())
    if as_json:
        print_json(
            {
                "ok": not check.problems and check.restorable > 0,
                "backups": sum(check.counts.values()),
                "found": check.counts,
                "restorable": check.restorable,
                "problems": check.problems,
                "notes": check.notes,
            }
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
        console.error(f"{path}: no complete, restorable backup (found {found}){first}")
        return EXIT_ERROR
    if check.problems:
        console.error(f"{path}: {len(check.problems)} problem(s); the first: {check.problems[0]}")
        return EXIT_ERROR
    return EXIT_OK
