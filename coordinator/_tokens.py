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
from typing import Final

__all__ = ["TokenSource"]

_log = logging.getLogger(__name__)

CEILING_STEP: Final = 1 << 16
_FORMAT = struct.Struct("<8sQQ")  # magic, ceiling, flags
_MAGIC: Final = b"HCTOKEN2"
_CLEAN: Final = 1


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


def read_ceiling(path: Path) -> tuple[int, bool, bool]:
    """Read the durable token file.

    Returns:
        (ceiling, existed, clean): the ceiling (0 if none), whether a previous coordinator
        left the file, and whether it shut down cleanly (no lease can be outstanding that
        shared memory does not show). A corrupt file yields a ceiling from the clock in
        microseconds, above any token a real run can have reached, so tokens still grow.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, False, True
    if len(data) == _FORMAT.size:
        magic, ceiling, flags = _FORMAT.unpack(data)
        if magic == _MAGIC:
            return int(ceiling), True, bool(flags & _CLEAN)
    _log.error("corrupt token file path=%s: continuing above a clock-based floor", path)
    return int(time.time() * 1_000_000), True, False


class TokenSource:
    """Hands out strictly increasing fencing tokens, persisting a ceiling in steps.

    Args:
        path: The durable ceiling file.
        floor: The lowest token this run may hand out (e.g. the shm header's next token).

    Attributes:
        next: The next token to hand out.
        previous_run: A coordinator ran before for this repository.
        previous_clean: That coordinator shut down cleanly (or none ran).
    """

    def __init__(self, path: Path, floor: int) -> None:
        self._path = path
        # Temps left by a coordinator killed mid-write; only the election winner gets
        # here, so none of them is being written now.
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        ceiling, self.previous_run, self.previous_clean = read_ceiling(path)
        self.next = max(floor, ceiling, 1)
        self._ceiling = 0
        self._raise_ceiling()

    def _write(self, ceiling: int, flags: int) -> None:
        _write_durably(self._path, _FORMAT.pack(_MAGIC, ceiling, flags))
        self._ceiling = ceiling

    def _raise_ceiling(self) -> None:
        self._write(self.next + CEILING_STEP, 0)

    def close(self) -> None:
        """Record a clean shutdown, lowering the durable ceiling to the exact next token.

        Only a crash then leaves a gap in the token sequence. Safe because no token at or
        above :attr:`next` was handed out.
        """
        self._write(self.next, _CLEAN)

    def take(self) -> int:
        """Return a new token, larger than any handed out before for this repository."""
        token = self.next
        if token + 1 >= self._ceiling:
            self._raise_ceiling()
        self.next = token + 1
        return token
