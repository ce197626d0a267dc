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

With the coordinator's leases, ``locks/`` holds one more file per prefix, ``<p>.f``: the readers
that trust its change counter while a writer keeps its lease hold it shared (see
:class:`Follow`), and the writer announces its commits while anybody does.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable
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

    A prefix's counter changes whenever a ``write`` or ``exclusive`` lease on it is granted or
    released, and with every commit that a follower of the prefix must see (see
    :class:`Follow` and :func:`announced`). So a reader that reads the same value as at its
    last look at the files knows that no commit was acknowledged since: if the counter is
    even, always; if it is odd (a writer holds its lease between commits), once it follows.
    """

    def commit_seq(self, prefix: str) -> int: ...

    def announce_commit(self, prefix: str, seq: int) -> Callable[[float], bool]: ...


# How long a reader trusts an unchanged counter before it looks at the files anyway, in case a
# publication was lost; so also how long a writer waits at most for its announcement.
TRUST_COUNTER_FOR = 1.0


def announced(feed: ChangeFeed, prefix: str, seq: int) -> Callable[[], None]:
    """Announce commit ``seq``, just written; call what is returned before acknowledging it.

    That waits until the counter moved, or, if the coordinator cannot confirm it (stopped,
    dead, being replaced), until :data:`TRUST_COUNTER_FOR` has passed since the write: by then
    every reader's next get looks at the files. Either way no reader misses the commit.
    """
    # The commit is in the file already: whatever goes wrong here must not report it failed.
    written = time.monotonic()
    try:
        published: Callable[[float], bool] | None = feed.announce_commit(prefix, seq)
    except (HotcopyError, OSError):
        published = None

    def acknowledge() -> None:
        deadline = written + TRUST_COUNTER_FOR
        try:
            if published is not None and published(deadline):
                return
        except (HotcopyError, OSError):
            pass
        time.sleep(max(0.0, deadline - time.monotonic()))

    return acknowledge


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


class Follow:
    """One view's part in following a prefix: whether readers trust its change counter while
    a writer keeps its lease, so that the writer must announce each commit (see
    :func:`announced`).

    A reader *follows* by holding a shared ``flock`` on ``locks/<prefix>.f``, taken before its
    next look at the files and kept until the view closes (the kernel drops it with the
    process); a writer asks, once its batch is written, whether anybody holds one, through a
    descriptor of its own. A writer alone thus pays two system calls per commit instead of a
    message to the coordinator, and a reader that starts to follow later looks at the files
    after that batch.
    """

    def __init__(self, lock_files: LockFiles, prefix: str) -> None:
        self._lock_files = lock_files
        self._name = f"{prefix}.f"
        self._following = -1  # the descriptor holding our shared lock
        self._asking = -1  # the descriptor we ask through

    def follow(self) -> bool:
        """Follow (idempotent); False if not now (a writer is asking just now, or the lock
        file cannot be opened): the reader then looks at the files at every get."""
        if self._following < 0:
            try:
                fd = self._lock_files.open(self._name)
            except (OSError, HotcopyError):
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._following = fd
        return True

    def followed(self) -> bool:
        """Whether any reader (of any process, this one included) may follow the prefix."""
        try:
            if self._asking < 0:
                self._asking = self._lock_files.open(self._name)
            fcntl.flock(self._asking, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (OSError, HotcopyError):  # held (BlockingIOError), or cannot tell
            return True
        fcntl.flock(self._asking, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        fds = (self._following, self._asking)
        self._following = self._asking = -1
        for fd in fds:
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
