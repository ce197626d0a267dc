"""Process identity: who holds a lease, and is that process still the same one.

A pid alone is not an identity (pids are reused), and ``psutil.Process.create_time()`` is
derived from the wall clock, which shifts when the clock is stepped. The kernel's start
time in clock ticks since boot (``/proc/<pid>/stat`` field 22) never changes for a
process, and the boot id tells one boot from the next, so the triple
(pid, start ticks, boot id) names exactly one process for ever. The storage and worker
layers reuse this module.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

__all__ = ["ProcessIdentity", "boot_id", "is_alive", "own_pid"]

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

# This process's pid, kept current across fork(): objects check it on every operation (a
# forked child must never act as its parent), and a getpid() syscall each time costs more.
_OWN_PID = [os.getpid()]


def own_pid() -> int:
    """Return the calling process's pid, without a system call."""
    return _OWN_PID[0]


def _after_fork_in_child() -> None:
    _OWN_PID[0] = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def boot_id() -> bytes:
    """Return the 16-byte id of the running boot (constant until the next reboot)."""
    with open(_BOOT_ID_PATH, encoding="ascii") as file:
        return bytes.fromhex(file.read().strip().replace("-", ""))


def _read_stat(pid: int) -> tuple[str, int] | None:
    """Return (state letter, start ticks) of ``pid``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may itself contain spaces and parentheses: everything
    # after the *last* ')' is the fixed-format tail, which starts at field 3 (state).
    tail = data[data.rindex(b")") + 2 :].split()
    return tail[0].decode("ascii"), int(tail[19])


class ProcessIdentity(NamedTuple):
    """One process, for ever: pid, kernel start time in clock ticks, and boot id.

    Attributes:
        pid: The process id.
        start_ticks: Start time in clock ticks since boot (``/proc/<pid>/stat`` field 22).
        boot: The 16-byte boot id the process ran under.
    """

    pid: int
    start_ticks: int
    boot: bytes

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """Return the identity of the live process ``pid``, or None if it does not exist."""
        stat = _read_stat(pid)
        if stat is None or stat[0] in "ZX":
            return None
        return cls(pid, stat[1], boot_id())

    @classmethod
    def current(cls) -> ProcessIdentity:
        """Return the identity of the calling process."""
        identity = cls.of(own_pid())
        if identity is None:  # pragma: no cover - /proc/self always exists on Linux
            raise RuntimeError("cannot read /proc/self/stat: is /proc mounted?")
        return identity


def is_alive(identity: ProcessIdentity) -> bool:
    """Tell whether the process named by ``identity`` still runs.

    A zombie counts as dead: it has exited, only its parent has not reaped it yet (and a
    detached process's parent may never do so). A process with the same pid but another
    start time, or any process of an earlier boot, is a different process.
    """
    if identity.boot != boot_id():
        return False
    stat = _read_stat(identity.pid)
    if stat is None:
        # Not in /proc for this user: gone, or another user's under ``hidepid`` (systemd's
        # ProtectProc=invisible). Only the kernel's "no such process" proves it gone: a
        # process this one cannot see is never taken for dead.
        return _exists(identity.pid)
    return stat[0] not in "ZX" and stat[1] == identity.start_ticks


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
