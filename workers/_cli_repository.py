"""``hotcopy`` subcommands on one repository: init, put, get, ls, copy, salvage, migrate,
status, coordinator. Each ``run_*`` takes the parsed arguments and the console and returns the exit
status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hotcopy.coordinator import format_status, read_status, status_to_json
from hotcopy.coordinator._main import main as coordinator_main
from hotcopy.storage import (
    CorruptFileError,
    NotRegularFile,
    Repository,
    StorageError,
    verify_file,
)
from hotcopy.storage._codec import too_deep
from hotcopy.storage._format import FORMAT_VERSION
from hotcopy.storage._repository import MARKER

from ._catalog import CATALOG_MARKER
from ._cli_base import (
    EXIT_ERROR,
    EXIT_OK,
    CommandError,
    Console,
    add_json,
    add_rate_limit,
    add_timeout,
    command_parser,
    one_line,
    positive_int,
    print_json,
)
from ._cli_waits import open_repository
from ._progress import human_bytes


def register(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (argparse subparsers)."""
    cmd = command_parser(
        sub,
        "init",
        "create a repository (or open the one there)",
        """\
  hotcopy init /data/repo                 a private repository (0700/0600)
  hotcopy init /data/shared --group app   shared with the members of group app""",
        description="Create a repository in ROOT (created if absent), or open the one there. "
        "A directory that holds anything else (files, a backup directory) is refused.",
    )
    cmd.add_argument("root", type=Path, help="the repository directory")
    cmd.add_argument(
        "--group",
        metavar="NAME",
        help="share the repository with this group: its members read and write it "
        "(directories 2770, files 0660); without it the repository is private (0700/0600)",
    )
    cmd.set_defaults(command=run_init)

    cmd = command_parser(
        sub,
        "put",
        "commit one key",
        """\
  hotcopy put /data/repo users alice 'Alice Smith'       the string "Alice Smith"
  hotcopy put /data/repo users bob '{"age": 3}' --json   a JSON value
  hotcopy put /data/repo users carol x --timeout 5       fail after 5 s of waiting""",
        description="Commit one key to a prefix (created if absent) and print the commit "
        "sequence number. Waits for the prefix's write lease.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("prefix", help="the prefix (1-200 characters of A-Z a-z 0-9 . _ -)")
    cmd.add_argument("key", help="the key")
    cmd.add_argument("value", help="the value: a string, or JSON with --json")
    cmd.add_argument("--json", action="store_true", help="parse VALUE as JSON")
    add_timeout(cmd, "the prefix's write lease")
    cmd.set_defaults(command=run_put)

    cmd = command_parser(
        sub,
        "get",
        "print one value (JSON unless it is a string)",
        """\
  hotcopy get /data/repo users alice      prints: Alice Smith
  hotcopy get /data/repo users bob        prints: {"age": 3}""",
        description="Print one value: a string as it is, bytes raw, anything else as JSON. "
        "Exit 1 if the key is absent.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("prefix", help="the prefix")
    cmd.add_argument("key", help="the key")
    cmd.set_defaults(command=run_get)

    cmd = command_parser(
        sub,
        "ls",
        "list prefixes with size and commit sequence; exit 1 if any is damaged",
        """\
  hotcopy ls /data/repo
  hotcopy ls /data/repo --json | jq '.prefixes[] | select(.damaged)'""",
        description="List every prefix with its size, commit sequence and number of keys. A "
        "prefix that cannot be read is listed as damaged, with the file and offset of the "
        "damage, and the exit status is 1.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    add_json(cmd)
    cmd.set_defaults(command=run_ls)

    cmd = command_parser(
        sub,
        "copy",
        "one consistent copy of a prefix, taken hot",
        """\
  hotcopy copy /data/repo users /backups/users.hc
  hotcopy copy /data/repo users users.hc --timeout 10 --json""",
        description="Write one consistent copy of a prefix to the new file DEST while writers "
        "go on (they wait only for a brief checkpoint). The time reported leaves out waits "
        "for leases, which are reported apart.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("prefix", help="the prefix to copy")
    cmd.add_argument("dest", type=Path, help="the copy: a new file (not a directory)")
    cmd.add_argument(
        "--step-size",
        type=positive_int,
        default=4 << 20,
        metavar="N",
        help="bytes copied per step (default 4 MiB)",
    )
    add_rate_limit(cmd)
    add_timeout(cmd, "each lease (the copy's snapshot lease, the checkpoint's write lease)")
    add_json(cmd)
    cmd.set_defaults(command=run_copy)

    cmd = command_parser(
        sub,
        "salvage",
        "keep what is provable of a damaged prefix",
        """\
  hotcopy salvage /data/repo users
  hotcopy salvage /data/repo users --json --timeout 30""",
        description=(
            "Keep what is provable of a damaged prefix: its main file up to any damage in it and "
            "the WAL's commits before any damage in that; the commits lost are printed and stay "
            "taken (as empty commits), and the damaged files are moved aside under new names, "
            "never deleted. A sound prefix is left as it is."
        ),
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument("prefix", help="the damaged prefix")
    add_timeout(cmd, "the prefix's exclusive lease")
    add_json(cmd)
    cmd.set_defaults(command=run_salvage)

    cmd = command_parser(
        sub,
        "migrate",
        "rewrite every prefix of an older file format in the current one",
        """\
  hotcopy migrate /data/repo
  hotcopy migrate /data/repo --json --timeout 30""",
        description=(
            "Rewrite each prefix whose files are of an older format in the current one, through "
            "a compaction under the prefix's exclusive lease (every live record as one commit; "
            "a new file id, so the next incremental backup starts a new chain). Prefixes "
            "already current are left as they are. A damaged prefix is refused: salvage it "
            "first."
        ),
    )
    cmd.add_argument("root", type=Path, help="the repository")
    add_timeout(cmd, "each prefix's exclusive lease")
    add_json(cmd)
    cmd.set_defaults(command=run_migrate)

    cmd = command_parser(
        sub,
        "status",
        "coordinator, leases and their holders, waiters (from shared memory)",
        """\
  hotcopy status /data/repo          who holds which lease: program, state, for how long
  hotcopy status /data/repo --json""",
        description="Show the repository's coordinator, every lease held (prefix, mode, "
        "holder's pid, program, command line and state: running, stopped or zombie; how long "
        "it has held it; fencing token) and how many requests wait per prefix. Read from "
        "shared memory: starts nothing.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    add_json(cmd)
    cmd.set_defaults(command=run_status)

    cmd = command_parser(
        sub,
        "coordinator",
        "run the repository's coordinator in the foreground",
        """\
  hotcopy coordinator /data/repo                     until stopped (Ctrl-C, SIGTERM)
  hotcopy coordinator /data/repo --idle-timeout 60""",
        description="Run the coordinator of ROOT in the foreground, logging to stderr. "
        "Clients start one on demand; this is for running it under a supervisor.",
    )
    cmd.add_argument("root", type=Path, help="the repository")
    cmd.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="exit after S seconds with no clients (default: never in the foreground)",
    )
    cmd.set_defaults(command=run_coordinator, configures_logging=True)


def run_init(args: argparse.Namespace, console: Console) -> int:
    root: Path = args.root
    refuse_to_init(root)
    with Repository.init(root, group=args.group) as repo:
        print(f"repository {repo.root} (id {repo.id})")
    return EXIT_OK


def refuse_to_init(root: Path) -> None:
    """Refuse to make a repository of a directory that holds anything else."""
    if os.path.lexists(root / MARKER) or not os.path.lexists(root):
        return  # a repository already (init opens it), or a new directory
    if not root.is_dir():
        raise CommandError(f"{root} exists and is not a directory")
    if os.path.lexists(root / CATALOG_MARKER):
        raise CommandError(
            f"{root} is a backup directory, not a repository; create the repository "
            f"elsewhere (`hotcopy restore {root} NEW_ROOT` rebuilds one from it)"
        )
    if any(root.iterdir()):
        raise CommandError(
            f"{root} is not empty and holds no repository; give an empty or new directory"
        )


def run_put(args: argparse.Namespace, console: Console) -> int:
    value: Any = args.value
    if args.json:
        try:
            value = json.loads(args.value)
        except json.JSONDecodeError as err:
            raise CommandError(f"VALUE is not valid JSON: {err}") from err
        except RecursionError:  # json's C parser stops there, cleanly; the store refuses less
            raise too_deep("VALUE") from None
    waits = console.waits(args.timeout)
    with open_repository(args.root, waits) as repo, repo.open_prefix(args.prefix, "rw") as px:
        px[args.key] = value
        print(px.commit())
    return EXIT_OK


def run_get(args: argparse.Namespace, console: Console) -> int:
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
    return EXIT_OK


def run_copy(args: argparse.Namespace, console: Console) -> int:
    dest: Path = args.dest
    if dest.is_dir():
        raise CommandError(
            f"{dest} is a directory: give a file name inside it (e.g. {dest / args.prefix}.hc)"
        )
    waits = console.waits(args.timeout)
    with (
        open_repository(args.root, waits) as repo,
        console.progress(f"copy {args.prefix}", "prefix") as bar,
    ):
        result = repo.copy_prefix(
            dest,
            args.prefix,
            args.step_size,
            progress=lambda done, total: bar.update(0, 0, done, total),
            rate_limit=args.rate_limit,
        )
        seconds = max(result.seconds - waits.waited, 0.0)  # the copy's own time, waits apart
        done = bar.finish(0, 0, result.size, seconds)
    if args.json:
        print_json({**result._asdict(), "seconds": round(seconds, 6), "waited": waits.waited})
        return EXIT_OK
    print(
        f"copied prefix {result.prefix!r} at commit {result.seq}: {human_bytes(result.size)} "
        f"({result.size} bytes) to {result.path} in {seconds:.2f} s ({done.rate_text()})"
        + waited_text(waits.waited, "leases")
    )
    return EXIT_OK


def waited_text(waited: float, what: str) -> str:
    """``; waited 3.2 s for leases`` when a command waited noticeably, else nothing."""
    return f"; waited {waited:.1f} s for {what}" if waited >= 0.05 else ""


def run_migrate(args: argparse.Namespace, console: Console) -> int:
    migrated: dict[str, int] = {}
    with open_repository(args.root, console.waits(args.timeout)) as repo:
        names = repo.prefixes()
        for name in names:
            version = repo.migrate_prefix(name)
            if version is not None:
                migrated[name] = version
                if not args.json:
                    print(f"prefix {name!r}: format {version} -> {FORMAT_VERSION}")
    if args.json:
        print_json({"format": FORMAT_VERSION, "prefixes": len(names), "migrated": migrated})
    else:
        print(
            f"{len(migrated)} of {len(names)} prefixes migrated to format {FORMAT_VERSION}; "
            f"{len(names) - len(migrated)} were current"
        )
    return EXIT_OK


def run_salvage(args: argparse.Namespace, console: Console) -> int:
    with open_repository(args.root, console.waits(args.timeout)) as repo:
        result = repo.salvage_prefix(args.prefix)
    lost = f"{result.lost[0]}-{result.lost[1]}" if result.lost else None
    if args.json:
        print_json(
            {
                "prefix": args.prefix,
                "damaged": result.damage is not None,
                "kept": result.kept,
                "lost": list(result.lost) if result.lost else None,
                "moved_aside": [str(path) for path in result.moved_aside],
            }
        )
        return EXIT_OK
    if result.damage is None:
        print(f"prefix {args.prefix!r}: nothing to salvage (no damage found); nothing changed")
        return EXIT_OK
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
    return EXIT_OK


def require_repository(root: Path) -> None:
    if not (root / MARKER).exists():
        raise CommandError(f"{root} is not a hotcopy repository (no {MARKER})")


def run_status(args: argparse.Namespace, console: Console) -> int:
    require_repository(args.root)
    status = read_status(args.root)  # shared memory only: no round trip, starts nothing
    if args.json:
        print(json.dumps(status_to_json(status)))  # its own "version" (coordinator._status)
    else:
        print(format_status(status))
    return EXIT_OK


def run_coordinator(args: argparse.Namespace, console: Console) -> int:
    require_repository(args.root)
    # In the foreground a coordinator runs until stopped, unless told otherwise.
    idle = args.idle_timeout if args.idle_timeout is not None else 10.0 * 365 * 86400
    return coordinator_main([str(args.root), "--idle-timeout", str(idle)])


def run_ls(args: argparse.Namespace, console: Console) -> int:
    if os.path.lexists(args.root / CATALOG_MARKER):
        raise CommandError(f"{args.root} is a backup directory; list it with `hotcopy backups`")
    rows: list[dict[str, Any]] = []
    with Repository(args.root) as repo:
        for name in repo.prefixes():
            main = repo.prefix_path(name)
            size = file_size(main) + file_size(main.with_suffix(".hc-wal"))
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
        print_json({"prefixes": rows})
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
        console.error(
            f"{len(damaged)} of {len(rows)} prefixes are damaged: "
            f"{', '.join(map(repr, damaged))}; `hotcopy verify {args.root}` checks every file"
        )
        return EXIT_ERROR
    return EXIT_OK


def _damage(main: Path, err: StorageError) -> str:
    """What kept a prefix from opening, with the file and offset as ``verify`` reports them."""
    if isinstance(err, CorruptFileError):
        report = verify_file(main)  # the main file: where all that opening refuses lies today
        if not report.ok:
            return report.summary()
    return one_line(err)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
