"""The copy-worker process: runs jobs sent by a :class:`CopyWorkerPool` until told to stop.

Started as ``python -m hotcopy.workers._copy_worker FD`` with one end of a socketpair as FD.
Nothing in the package imports this module, so running it with ``-m`` finds it fresh.
"""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Any

from multiprocess.connection import Connection
from multiprocess.reduction import ForkingPickler


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The parent handles an interrupt (and stops us); a terminal's Ctrl-C reaches us too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(args[0]))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return 0  # the parent is gone
        reply: tuple[bool, Any, str | None]
        try:
            job = ForkingPickler.loads(raw)
        except Exception as err:  # e.g. the job's module is not importable here: fail the job,
            reply = (False, err, traceback.format_exc())  # not the worker
        else:
            if job is None:
                return 0
            fn, fn_args, fn_kwargs = job
            try:
                reply = (True, fn(*fn_args, **fn_kwargs), None)
            except BaseException as err:
                reply = (False, err, traceback.format_exc())
        if not _send(conn, reply):
            return 0  # the parent is gone (killed while we worked): nobody to tell


def _send(conn: Connection, reply: tuple[bool, Any, str | None]) -> bool:
    """Send ``reply``, or that it does not pickle; False if the parent is gone."""
    try:
        conn.send(reply)
    except OSError:  # EPIPE, ECONNRESET: the other end is closed
        return False
    except Exception as err:  # the result or error does not pickle
        try:
            conn.send((False, RuntimeError(f"job reply could not be sent: {err!r}"), None))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
