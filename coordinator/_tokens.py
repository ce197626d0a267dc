"""Fencing tokens that keep growing across coordinator restarts, even after /dev/shm is lost.

The shared memory header holds the exact next token, but /dev/shm does not survive a
reboot (or a cleanup). So a *ceiling* is also kept durably in ``ROOT/.hotcopy/tokens``:
every token handed out is below the ceiling on disk, and the ceiling is raised in large
steps, so the fsync cost is paid once per :data:`CEILING_STEP` grants, not per grant.
A restart starts at ``max(shm next token, durable ceiling)``: tokens skip a gap but never
repeat or go back. A clean shutdown writes the exact next token and a *clean* flag, so
only crashes leave gaps, and a successor that finds the flag unset and shared memory gone
knows leases may be outstanding that nothing records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from pathlib import Path
from typing import Final, NamedTuple

__all__ = ["TokenSource"]

_log = logging.getLogger(__name__)

CEILING_STEP: Final = 1 << 16
_FORMAT = struct.Struct("<8sQQQ")  # magic, ceiling, flags, largest expired token
_MAGIC: Final = b"HCTOKEN3"
_FORMAT_2 = struct.Struct("<8sQQ")  # before the expired token was kept
_MAGIC_2: Final = b"HCTOKEN2"
_CLEAN: Final = 1


class Ceiling(NamedTuple):
    """What the durable token file says (see :func:`read_ceiling`)."""

    ceiling: int
    existed: bool
    clean: bool
    expired: int


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp, fsync, rename, fsync dir)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_ceiling(path: Path) -> Ceiling:
    """Read the durable token file.

    Returns:
        The ceiling (0 if none); whether a previous coordinator left the file; whether it
        shut down cleanly (no lease can be outstanding that shared memory does not show); and
        the largest token of a lease that expired, as that coordinator's shared memory said
        when it shut down (the next holder of a prefix fences it). A corrupt file yields a
        ceiling from the clock in microseconds, above any token a real run can have reached,
        so tokens still grow, and every token below it counts as expired.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Ceiling(0, False, True, 0)
    if len(data) == _FORMAT.size:
        magic, ceiling, flags, expired = _FORMAT.unpack(data)
        if magic == _MAGIC:
            return Ceiling(int(ceiling), True, bool(flags & _CLEAN), int(expired))
    if len(data) == _FORMAT_2.size:
        magic, ceiling, _flags = _FORMAT_2.unpack(data)
        if magic == _MAGIC_2:
            # The previous release kept no expiry, and called every SIGTERM clean, leases
            # held or not: believe neither (one fence per prefix, and one hold on grants
            # if shared memory went too, at the first start after an upgrade).
            return Ceiling(int(ceiling), True, False, int(ceiling))
    _log.error("corrupt token file path=%s: continuing above a clock-based floor", path)
    floor = int(time.time() * 1_000_000)
    return Ceiling(floor, True, False, floor)


class TokenSource:
    """Hands out strictly increasing fencing tokens, persisting a ceiling in steps.

    Args:
        path: The durable ceiling file.
        floor: The lowest token this run may hand out (e.g. the shm header's next token).

    Attributes:
        next: The next token to hand out.
        expired: The largest token of a lease that expired, as the last shutdown recorded.
        previous_run: A coordinator ran before for this repository.
        previous_clean: That coordinator shut down cleanly with no lease outstanding (or none
            ran): no lease can be held that its shared memory does not show.
    """

    def __init__(self, path: Path, floor: int) -> None:
        self._path = path
        # Temps left by a coordinator killed mid-write; only the election winner gets
        # here, so none of them is being written now.
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        ceiling, self.previous_run, self.previous_clean, self.expired = read_ceiling(path)
        self.next = max(floor, ceiling, 1)
        self._ceiling = 0
        self._raise_ceiling()

    def _write(self, ceiling: int, flags: int) -> None:
        _write_durably(self._path, _FORMAT.pack(_MAGIC, ceiling, flags, self.expired))
        self._ceiling = ceiling

    def _raise_ceiling(self) -> None:
        self._write(self.next + CEILING_STEP, 0)

    def close(self, *, leases_outstanding: bool, expired: int) -> None:
        """Record a shutdown, lowering the durable ceiling to the exact next token.

        Only a crash then leaves a gap in the token sequence. Safe because no token at or
        above :attr:`next` was handed out. The shutdown counts as *clean* only with no lease
        outstanding: those that are live in shared memory, which a successor adopts, but
        which it cannot know of if that is lost (see :attr:`previous_clean`). ``expired``, the
        largest expired token that shared memory records, is kept for a successor that finds
        shared memory gone: a holder whose lease expired may still be stopped mid-commit.
        """
        self.expired = max(self.expired, expired)
        self._write(self.next, 0 if leases_outstanding else _CLEAN)

    def take(self) -> int:
        """Return a new token, larger than any handed out before for this repository."""
        token = self.next
        if token + 1 >= self._ceiling:
            self._raise_ceiling()
        self.next = token + 1
        return token
