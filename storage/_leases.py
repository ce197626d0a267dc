"""How storage takes its locks: a small Protocol, and an OS file-lock implementation of it.

Storage never talks to a lock mechanism directly, only to a :class:`LeaseProvider`; the
coordinator's client satisfies the same Protocol structurally. :class:`FileLeases` is the
embedded provider: ``flock`` locks on files under ``ROOT/.hotcopy/locks/``, released by the
kernel when their holder dies, so a crashed writer never leaves a lock behind. It is also the
provider of a repository shared with a group (the coordinator serves one user only).

The lock files are opened relative to a checked descriptor of ``locks/`` (see ``_files``):
never through a symlink, never a file of a user we do not trust (its content is the fencing
token), so a planted ``.hotcopy/locks`` can neither redirect our writes nor fake a token.

Modes follow DESIGN.md: ``read`` and ``snapshot`` share with everything but ``exclusive``;
``write`` excludes ``write``; ``exclusive`` excludes everything. Two lock files per prefix give
exactly that: ``write`` holds ``<p>.w`` exclusively, ``read``/``snapshot`` hold ``<p>.a`` shared,
``exclusive`` holds both exclusively.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from hotcopy.coordinator._errors import HotcopyError, LeaseFenced, LeaseTimeout, WouldBlock

from ._files import open_dir, open_dir_at, open_regular_at

MODES = ("read", "snapshot", "write", "exclusive")


class HeldLease(Protocol):
    @property
    def token(self) -> int: ...

    def is_current(self) -> bool: ...

    def release(self) -> None: ...

    def park(self) -> None:
        """Keep the lease for a quick :meth:`resume`; the provider may release it any time."""

    def resume(self) -> bool:
        """Take a parked lease back into use; False if it is gone."""

    def __enter__(self) -> HeldLease: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """Optional side of a lease provider: per-prefix change counters in shared memory.

    A prefix's counter is odd exactly while a ``write`` or ``exclusive`` lease on it is
    granted, and changes whenever one is granted or released. So a reader that reads the
    same even value as at its last look at the files knows that nothing changed since; an
    odd value means a writer may be appending, and the files must be looked at.
    """

    def commit_seq(self, prefix: str) -> int: ...


@runtime_checkable
class FencingFeed(Protocol):
    """Optional side of a lease provider whose leases can expire while their holder lives.

    ``expired_token()`` is the largest fencing token of a ``write`` or ``exclusive`` lease that
    expired: its holder may be stopped with a change pending, so the next holder of that prefix
    fences it before changing anything (see ``_log``). A provider without expiry (kernel
    locks, held until release or death) needs no fencing and does not implement this.
    """

    def expired_token(self) -> int: ...


def expired_token(leases: object) -> int:
    """What ``leases`` says of expired leases (see :class:`FencingFeed`): 0 for a provider
    without expiry, and more than any token when it cannot tell (a needless fence costs one
    checkpoint, a missed one can cost data)."""
    if not isinstance(leases, FencingFeed):
        return 0
    try:
        return leases.expired_token()
    except HotcopyError:
        return 1 << 62


class LeaseProvider(Protocol):
    def lease(
        self, prefix: str, mode: str, timeout: float | None = None, ttl: float | None = None
    ) -> HeldLease: ...

    def close(self) -> None: ...


_TOKEN = struct.Struct("<Q")


class FileLease:
    """A held set of ``flock`` locks; ``release()`` is idempotent."""

    def __init__(self, fds: list[int], token: int) -> None:
        self._fds = fds
        self._token = token

    @property
    def token(self) -> int:
        return self._token

    def is_current(self) -> bool:
        # The kernel holds flock locks until release or death: a live holder is always current.
        return bool(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the only descriptor releases its flock

    def park(self) -> None:
        self.release()  # nobody could tell a waiter to us: never keep a lock unused

    def resume(self) -> bool:
        return False

    def __enter__(self) -> FileLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLeases:
    """:class:`LeaseProvider` on ``flock``; waits poll with a short backoff (no broker).

    Args:
        runtime_dir: The repository's runtime directory (``ROOT/.hotcopy``); it and its
            ``locks/`` are created or checked at the first lease, once the repository exists.
    """

    def __init__(self, runtime_dir: Path) -> None:
        self._runtime_dir = runtime_dir
        self._locks_fd = -1
        self._opening = threading.Lock()
        self._closed = False

    def _locks(self) -> int:
        with self._opening:
            if self._locks_fd < 0:
                runtime_fd = open_dir(self._runtime_dir, create=True)
                try:
                    where = self._runtime_dir / "locks"
                    self._locks_fd = open_dir_at(runtime_fd, "locks", where)
                finally:
                    os.close(runtime_fd)
            return self._locks_fd

    def lease(
        self, prefix: str, mode: str, timeout: float | None = None, ttl: float | None = None
    ) -> FileLease:
        if self._closed:
            raise LeaseFenced("lease provider is closed", prefix=prefix)
        if mode not in MODES:
            raise ValueError(f"unknown lease mode {mode!r}; expected one of {', '.join(MODES)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        plan = {
            "read": [("a", fcntl.LOCK_SH)],
            "snapshot": [("a", fcntl.LOCK_SH)],
            "write": [("w", fcntl.LOCK_EX)],
            "exclusive": [("w", fcntl.LOCK_EX), ("a", fcntl.LOCK_EX)],
        }[mode]
        fds: list[int] = []
        try:
            for suffix, operation in plan:
                name = f"{prefix}.{suffix}"
                where = self._runtime_dir / "locks" / name
                fd = open_regular_at(self._locks(), name, os.O_RDWR | os.O_CREAT, path=where)
                fds.append(fd)
                _flock_until(fd, operation, deadline, timeout == 0, prefix, mode)
            token = _next_token(fds[0]) if mode in ("write", "exclusive") else 0
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return FileLease(fds, token)

    def close(self) -> None:
        self._closed = True
        with self._opening:
            fd, self._locks_fd = self._locks_fd, -1
        if fd >= 0:
            os.close(fd)


def _flock_until(
    fd: int, operation: int, deadline: float | None, nowait: bool, prefix: str, mode: str
) -> None:
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                error = WouldBlock if nowait else LeaseTimeout
                raise error(
                    f"no {mode} lease on prefix {prefix!r} within the timeout",
                    prefix=prefix,
                    mode=mode,
                ) from None
            pause = delay if deadline is None else min(delay, max(deadline - now, 0.0))
            time.sleep(pause)
            delay = min(delay * 2, 0.01)


def _next_token(fd: int) -> int:
    """Bump the counter stored in the (exclusively held) lock file: a monotonic fencing token."""
    raw = os.pread(fd, _TOKEN.size, 0)
    token = (_TOKEN.unpack(raw)[0] if len(raw) == _TOKEN.size else 0) + 1
    os.pwrite(fd, _TOKEN.pack(token), 0)
    return token
