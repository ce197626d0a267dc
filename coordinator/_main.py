"""``hotcopy coordinator ROOT``: run a repository's coordinator (foreground or detached)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from ._server import CoordinatorConfig, CoordinatorServer

__all__ = ["main"]

_log = logging.getLogger(__name__)

# Environment overrides, read when no option is given: clients start the coordinator on
# demand and it inherits their environment, which is how tests shorten its timeouts.
ENV_IDLE_TIMEOUT = "HOTCOPY_COORDINATOR_IDLE_TIMEOUT"
ENV_RECOVERY_WINDOW = "HOTCOPY_COORDINATOR_RECOVERY_WINDOW"
ENV_HANDSHAKE_TIMEOUT = "HOTCOPY_COORDINATOR_HANDSHAKE_TIMEOUT"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        _log.warning("ignoring non-numeric %s=%r", name, raw)
        return default


def _parser() -> argparse.ArgumentParser:
    defaults = CoordinatorConfig()
    parser = argparse.ArgumentParser(
        prog="hotcopy coordinator",
        description="Run the lease coordinator of the repository at ROOT.",
    )
    parser.add_argument("root", metavar="ROOT", help="repository root")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=_env_float(ENV_IDLE_TIMEOUT, defaults.idle_timeout),
        help="exit after this many seconds without clients or leases (default %(default)s)",
    )
    parser.add_argument(
        "--recovery-window",
        type=float,
        default=_env_float(ENV_RECOVERY_WINDOW, defaults.recovery_window),
        help="grace for recovered ttl-less leases of live holders (default %(default)s)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=_env_float(ENV_HANDSHAKE_TIMEOUT, defaults.handshake_timeout),
        help="drop connections silent or mid-frame for this long (default %(default)s)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="run in the background (how clients start it); log to ROOT/.hotcopy/",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a coordinator until it has been idle for the idle timeout, or SIGTERM/SIGINT.

    Args:
        argv: Arguments without the program name (``["ROOT", ...]``); ``sys.argv[1:]``
            when None.

    Returns:
        The exit status: 0 when it served, 1 on error (including: another coordinator
        already serves ROOT).
    """
    args = _parser().parse_args(argv)
    config = CoordinatorConfig(
        idle_timeout=args.idle_timeout,
        recovery_window=args.recovery_window,
        handshake_timeout=args.handshake_timeout,
        lock_wait=2.0 if args.detach else 0.5,
    )
    try:
        server = CoordinatorServer(args.root, config)
    except OSError as err:
        print(f"hotcopy: error: cannot use repository {args.root!r}: {err}", file=sys.stderr)
        return 1
    if args.detach:
        if os.fork():
            return 0  # the launcher: the client waits for the socket, not for us
        os.setsid()
        os.umask(0o077)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            server.paths.ensure_runtime_dir()
            handler: logging.Handler = logging.FileHandler(server.paths.log)
        except OSError:
            handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root_logger = logging.getLogger()
    saved_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(args.log_level.upper())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _log.info("signal %s received, stopping", signum)
        server.stop()

    # Restored on the way out: the hotcopy CLI may call main() inside a longer process.
    saved_signals = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        status = server.run()
        if status and not args.detach:
            print(
                f"hotcopy: error: another coordinator already serves {str(server.paths.root)!r}",
                file=sys.stderr,
            )
        return status
    except PermissionError as err:
        _log.error("cannot run coordinator: %s", err)
        if not args.detach:
            print(f"hotcopy: error: {err}", file=sys.stderr)
        return 1
    except Exception:
        # Detached, stderr is /dev/null: the log is the only place a crash can be seen.
        _log.exception("coordinator crashed")
        return 1
    finally:
        for signum, previous in saved_signals.items():
            signal.signal(signum, previous)
        root_logger.removeHandler(handler)
        root_logger.setLevel(saved_level)
        handler.close()
