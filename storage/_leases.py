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
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from hotcopy.coordinator._errors import HotcopyError, LeaseFenced, LeaseTimeout, WouldBlock

from ._files import open_dir, open_dir_at, open_regular_at

_log = logging.getLogger(__name__)

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
    """Optional side of a lease provider: per-prefix change counters in shared memory, and a
    commit board beside them.

    A prefix's counter changes whenever a ``write`` or ``exclusive`` lease on it is granted or
    released, and is odd while one is. So a reader that reads the same even value as at its
    last look at the files knows that nothing changed since; the same odd one, that the same
    holder kept the lease, and it finds that holder's commits on the board: the holder posts
    each one there (``post``) once its batch is written and before its fsync, and the reader
    compares what it reads with the counter (``commit_state``) with what it read at its last
    look.

    The board replaced an announcement to the coordinator per commit: a message, and the
    coordinator woken, at every commit (a fifth of a followed writer's commit rate here), and
    a writer that waited for a stopped coordinator.
    """

    def commit_state(self, prefix: str) -> tuple[int, bytes | None]: ...

    def post(self, prefix: str, token: int, seq: int) -> bool: ...


# How long a reader trusts an unchanged counter and board before it looks at the files anyway,
# in case a post was lost; so also how long a writer that cannot post waits before it
# acknowledges. At least as long as a reader goes without looking whether its segment was
# replaced (the coordinator client's ``_SEGMENT_RECHECK``): a writer also waits this long
# while readers may still trust the replaced segment.
TRUST_COUNTER_FOR = 1.0


def post_commit(feed: ChangeFeed, prefix: str, token: int, seq: int) -> Callable[[], None]:
    """Post commit ``seq`` of ``prefix``, written under the lease of ``token``; call what is
    returned before acknowledging it. That returns at once, or, if the board cannot be
    written (this process has no segment mapped, or its prefix no slot there yet, where
    readers may trust a counter), once
    :data:`TRUST_COUNTER_FOR` has passed since the write: by then every reader's next get
    looks at the files. Either way no reader misses the commit."""
    # The commit is in the file already: whatever goes wrong here must not report it failed.
    written = time.monotonic()
    try:
        if feed.post(prefix, token, seq):
            return _posted
    except (HotcopyError, OSError):
        pass
    _log.warning(
        "commit %s of prefix %s could not be posted for readers: acknowledged only once they "
        "look at the files (%.0f s)",
        seq,
        prefix,
        TRUST_COUNTER_FOR,
    )

    def acknowledge() -> None:
        time.sleep(max(0.0, written + TRUST_COUNTER_FOR - time.monotonic()))

    return acknowledge


def _posted() -> None:
    pass


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
    # Not isinstance(leases, FencingFeed): a protocol's check costs 15 microseconds, at every
    # grant of the write lease.
    ask: Callable[[], int] | None = getattr(leases, "expired_token", None)
    if ask is None:
        return 0
    try:
        return ask()
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
        self._lock_files = LockFiles(runtime_dir)
        self._closed = False

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
                fds.append(self._lock_files.open(f"{prefix}.{suffix}"))
                _flock_until(fds[-1], operation, deadline, timeout == 0, prefix, mode)
            token = _next_token(fds[0]) if mode in ("write", "exclusive") else 0
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return FileLease(fds, token)

    def close(self) -> None:
        self._closed = True
        self._lock_files.close()


class LockFiles:
    """The lock files of a repository, in ``locks/`` of its runtime directory (created or
    checked at the first use), opened relative to a checked descriptor of that directory."""

    def __init__(self, runtime_dir: Path) -> None:
        self._runtime_dir = runtime_dir
        self._locks_fd = -1
        self._opening = threading.Lock()

    def open(self, name: str) -> int:
        """A new descriptor on the lock file ``name`` (created if missing), the caller's."""
        with self._opening:
            if self._locks_fd < 0:
                runtime_fd = open_dir(self._runtime_dir, create=True)
                try:
                    where = self._runtime_dir / "locks"
                    self._locks_fd = open_dir_at(runtime_fd, "locks", where)
                finally:
                    os.close(runtime_fd)
            where = self._runtime_dir / "locks" / name
            return open_regular_at(self._locks_fd, name, os.O_RDWR | os.O_CREAT, path=where)

    def close(self) -> None:
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
