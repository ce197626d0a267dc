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
        try:
            job = ForkingPickler.loads(raw)
        except Exception as err:  # e.g. the job's module is not importable here: fail the job,
            conn.send((False, err, traceback.format_exc()))  # not the worker
            continue
        if job is None:
            return 0
        fn, fn_args, fn_kwargs = job
        reply: tuple[bool, Any, str | None]
        try:
            result = fn(*fn_args, **fn_kwargs)
        except BaseException as err:
            reply = (False, err, traceback.format_exc())
        else:
            reply = (True, result, None)
        try:
            conn.send(reply)
        except Exception as err:  # the result or error does not pickle
            conn.send((False, RuntimeError(f"job reply could not be sent: {err!r}"), None))


if __name__ == "__main__":
    sys.exit(main())
