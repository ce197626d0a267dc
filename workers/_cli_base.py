"""What every ``hotcopy`` subcommand shares: exit codes, errors, options, the operator's terminal.

The subcommands live in ``_cli_repository`` (one repository: init, put, get, ls, copy, salvage,
status, coordinator) and ``_cli_backup`` (backup directories: backup, restore, prune, backups,
verify); ``_cli`` parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from hotcopy.coordinator._errors import HotcopyError

from ._catalog import KEY_ENV, parse_duration
from ._cli_waits import Waits
from ._progress import Progress
from ._s3 import is_object_url

EXIT_OK = 0
EXIT_ERROR = 1  # one line "hotcopy: error: ..." on stderr, no traceback
EXIT_USAGE = 2  # argparse's convention
EXIT_PARTIAL = 3  # ran to the end, but some prefixes failed: the others are done
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
exit status:
  0    ok
  1    error, told in one line "hotcopy: error: ..." on stderr
  2    usage: the command line is wrong
  3    partial: some prefixes failed, the others are done (backup, restore
       --allow-partial); the line on stderr names them. Damage that verify or ls
       finds is an error (1)
  130  interrupted (Ctrl-C)"""

JSON_VERSION = 1  # of every --json output (README); a change of meaning gets a new version


class CommandError(HotcopyError):
    """A command could not do what was asked; the message is shown to the user as is."""


class Console:
    """Where a command talks to its operator, besides its output on stdout.

    Notices and progress bars go to stderr, and only when it is a terminal and the command
    was not told ``--quiet``; errors always go there.
    """

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self._stream = stream if stream is not None else sys.stderr

    @property
    def terminal(self) -> bool:
        """Whether stderr is a terminal that wants to be told what happens."""
        return not self.quiet and self._stream.isatty()

    def notice(self, line: str) -> None:
        """A line for the operator at a terminal (a wait, say); nothing otherwise."""
        if self.terminal:
            print(f"hotcopy: {line}", file=self._stream, flush=True)

    def error(self, line: str) -> None:
        print(f"hotcopy: error: {line}", file=self._stream, flush=True)

    def progress(self, label: str, unit: str = "prefixes") -> Progress:
        return Progress(label, unit, quiet=self.quiet, stream=self._stream)

    def waits(self, timeout: float | None) -> Waits:
        return Waits(timeout, self.notice)


def print_json(payload: dict[str, Any]) -> None:
    """One JSON object on stdout, with the schema's ``version`` first."""
    print(json.dumps({"version": JSON_VERSION, **payload}))


def one_line(err: BaseException) -> str:
    """An error as one line of text."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


# -- options ----------------------------------------------------------------------------------


def command_parser(
    sub: Any, name: str, summary: str, examples: str, *, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand's parser: its one-line help, a description, and examples in the epilog."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        epilog=f"examples:\n{examples.rstrip()}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_verbosity(parser, argparse.SUPPRESS)  # also after the subcommand: hotcopy ls -v R
    return parser


def add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or notices; errors only",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log what happens to stderr (-vv: debug); or set HOTCOPY_LOG=debug",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (see README: --json outputs)"
    )


def add_timeout(parser: argparse.ArgumentParser, what: str = "a lease") -> None:
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help=f"wait at most SECONDS for {what}, then fail naming its holder "
        "(default: wait as long as it takes, saying who holds it after 1 s)",
    )


def add_prefixes(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--prefix",
        action="append",
        dest="prefixes",
        metavar="P",
        help=f"{verb} this prefix (repeatable; default all)",
    )


def catalog_location(text: str) -> str | Path:
    """A backup catalog on the command line: ``s3://BUCKET/PATH`` as given, else a path."""
    return text if is_object_url(text) else Path(text)


def add_endpoint_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="the S3 API server of an s3:// catalog (MinIO, Ceph RGW, R2...; default: "
        "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL or AWS itself)",
    )


def use_endpoint_url(args: argparse.Namespace) -> None:
    """Point this process's S3 client at ``--endpoint-url``, as the AWS CLI's own variable
    does: credentials and region come from the standard AWS variables and files."""
    if getattr(args, "endpoint_url", None):
        os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint_url


def add_key_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help=f"the key of an authenticated backup catalog (default: ${KEY_ENV})",
    )


def add_rate_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate-limit",
        type=mib_per_second,
        metavar="MIB/S",
        help="copy at most this many MiB per second on average, to spare live writers "
        "(default: as fast as the disk allows)",
    )


def mib_per_second(text: str) -> float:
    """A rate in MiB/s, returned in bytes per second."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of MiB/s, not {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB/s, not {text}")
    return value * (1 << 20)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return value


def duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
