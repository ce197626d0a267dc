"""The ``hotcopy`` command line: parsing, conventions, dispatch, and the one place errors become
exit codes.

Exit status (``_cli_base.EXIT_CODES``): 0 ok; 1 error, reported as one line
``hotcopy: error: ...`` on stderr without a traceback; 2 usage (argparse's convention); 3
partial (some prefixes failed, the others are done); 130 interrupted. The subcommands live in
``_cli_repository``, ``_cli_backup`` and ``_cli_replicate``; each takes the parsed arguments and
the console and returns its exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

from hotcopy.coordinator._errors import HotcopyError

from . import _cli_backup, _cli_replicate, _cli_repository
from ._cli_base import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CommandError,
    Console,
    add_verbosity,
    one_line,
    use_endpoint_url,
)

__all__ = ["CommandError", "main"]

Command = Callable[[argparse.Namespace, Console], int]

LOG_ENV = "HOTCOPY_LOG"  # debug, info, warning or error: the log level without -v
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hotcopy`` command line; return the exit status."""
    args = build_parser().parse_args(argv)
    use_endpoint_url(args)
    command: Command = args.command
    console = Console(quiet=args.quiet)
    with _logging(args):
        try:
            return command(args, console)
        except KeyboardInterrupt:
            print("hotcopy: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (HotcopyError, OSError, ValueError, TypeError) as err:
            logging.getLogger(__name__).debug("%s failed", args.name, exc_info=True)
            console.error(one_line(err))
            return EXIT_ERROR


@contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """hotcopy's loggers to stderr for the length of one command, at the level that ``-v``,
    ``-q`` or ``$HOTCOPY_LOG`` asks (warnings by default). The coordinator command logs on
    its own terms."""
    if getattr(args, "configures_logging", False):
        yield
        return
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    elif args.quiet:
        level = logging.ERROR
    else:
        level = _LEVELS.get(os.environ.get(LOG_ENV, "").strip().lower(), logging.WARNING)
    logger = logging.getLogger("hotcopy")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hotcopy: %(levelname)s: %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _version() -> str:
    try:
        return version("hotcopy")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotcopy",
        description="Embedded multi-process prefix store with hot backups.",
        epilog=f"""\
examples:
  hotcopy init /data/repo
  hotcopy put /data/repo users alice 'Alice Smith'
  hotcopy backup /data/repo /backups --incremental
  hotcopy restore /backups /data/restored --at 2h
  hotcopy status /data/repo
  hotcopy COMMAND --help             each command's options and examples

logging: -v (info) or -vv (debug) to stderr; HOTCOPY_LOG=debug does the same without -v.

{EXIT_CODES}""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hotcopy {_version()}")
    add_verbosity(parser, None)
    parser.set_defaults(quiet=False, verbose=0)
    sub = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")
    _cli_repository.register(sub)
    _cli_backup.register(sub)
    _cli_replicate.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
