"""Test-only fault injection and deliberately broken builds; inert unless their variables are set.

``HOTCOPY_FAULT=<point>[,<point>]`` sends this process SIGKILL (or the signal named by
``HOTCOPY_FAULT_SIGNAL``, e.g. ``STOP``) at that point, the first time it is reached, or the n-th
time with ``HOTCOPY_FAULT_AFTER=<n>`` (so a crash test can let a process commit and checkpoint a
while before it dies, with all its in-memory state). With ``HOTCOPY_FAULT_ONCE_FILE=<path>``,
only the first process to reach it across all processes.

``HOTCOPY_FAULT_EIO=<point>`` makes the fsync at that point fail with EIO instead (once, at the
n-th pass), as Linux reports a writeback error: see ``_durable.sync_file``.

``HOTCOPY_TEST_BREAK=ack-before-write | copy-without-checkpoint | lease-granted-twice`` runs a
deliberately broken build, so the stress checker can show it catches real faults. Never set
outside ``scripts/stress.py --break``.
"""

from __future__ import annotations

import errno
import os
import signal

_FAULTS = frozenset(filter(None, os.environ.get("HOTCOPY_FAULT", "").split(",")))
_FAULT_AFTER = int(os.environ.get("HOTCOPY_FAULT_AFTER", "1") or "1")
_FAULT_SIGNAL = signal.Signals["SIG" + os.environ.get("HOTCOPY_FAULT_SIGNAL", "KILL")]
_FAULT_EIO = os.environ.get("HOTCOPY_FAULT_EIO", "")
_hits: dict[str, int] = {}

BREAK = os.environ.get("HOTCOPY_TEST_BREAK", "")


def fault_due(point: str) -> bool:
    """Count a pass through ``point``; True when this pass is the one that must fail."""
    if point not in _FAULTS and point != _FAULT_EIO:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != _FAULT_AFTER:
        return False
    once = os.environ.get("HOTCOPY_FAULT_ONCE_FILE")
    if once:
        # Across processes (e.g. a pool's replacement workers): only the first to get here.
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
    return True


def fault(point: str) -> None:
    """Signal this process at ``point`` if a test asked for it."""
    if _FAULTS and point in _FAULTS and fault_due(point):
        os.kill(os.getpid(), _FAULT_SIGNAL)


def fsync_fault(point: str) -> None:
    """Raise EIO at the fsync ``point`` if a test asked for it."""
    if point == _FAULT_EIO and fault_due(point):
        raise OSError(errno.EIO, f"Input/output error (injected at {point})")
