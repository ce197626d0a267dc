"""Bounded, visible waits for the command line: leases and the catalog lock.

A command that may wait (for a prefix's lease, or a backup catalog's lock) waits at most
``--timeout`` seconds and then fails with a message naming the holder; after a second of
waiting it says what it waits for and who holds it (on a terminal; in the log otherwise).
Every wait is timed, so that a command reports its work's time without its waits.

Who holds what: a lease's holder from the coordinator's shared memory (``hotcopy status``),
a catalog lock's from the kernel's table of file locks (``/proc/locks``); each described by
its program, command line and state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hotcopy.coordinator import LeaseTimeout, connect, read_status
from hotcopy.coordinator._errors import HotcopyError
from hotcopy.coordinator._paths import shared_with_group
from hotcopy.storage import FileLeases, Repository
from hotcopy.storage._leases import HeldLease, LeaseProvider
from hotcopy.storage._repository import MARKER, RUNTIME_DIR

from ._places import CatalogLock, LockBusy

log = logging.getLogger(__name__)

NOTICE_AFTER = 1.0  # seconds of waiting before a command says what it waits for

# Modes a granted lease of each mode keeps waiting (DESIGN.md, Leases).
_BLOCKED_BY = {
    "read": {"exclusive"},
    "snapshot": {"exclusive"},
    "write": {"write", "exclusive"},
    "exclusive": {"read", "snapshot", "write", "exclusive"},
}


class WaitTimeout(HotcopyError, TimeoutError):
    """A command gave up waiting (``--timeout``); the message names what and who held it."""


class Waits:
    """The waits of one command: bounded by ``timeout``, told to ``notice`` after
    :data:`NOTICE_AFTER` seconds, and added up in :attr:`waited`.

    Args:
        timeout: Seconds to wait at most for each lease or lock; None waits as long as it takes.
        notice: Where the "waiting for ..." line goes (the terminal); None: the log only.
        notice_after: Seconds of waiting before the notice.
    """

    def __init__(
        self,
        timeout: float | None,
        notice: Callable[[str], None] | None = None,
        *,
        notice_after: float = NOTICE_AFTER,
    ) -> None:
        self.timeout = timeout
        self.waited = 0.0
        self._notice = notice
        self._notice_after = notice_after
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def waiting(self, what: str, holders: Callable[[], str]) -> Iterator[None]:
        """Time one wait for ``what``; after :attr:`notice_after` seconds, say who holds it
        (``holders()``, read then) without disturbing the wait itself."""

        def tell() -> None:
            line = f"waiting for {what}, held by {holders()}" + (
                f" (giving up after {self.timeout:g} s)" if self.timeout is not None else ""
            )
            log.info("%s", line)
            if self._notice is not None:
                self._notice(line)

        timer = threading.Timer(self._notice_after, tell)
        timer.daemon = True
        began = time.monotonic()
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
            with self._lock:
                self.waited += time.monotonic() - began

    def acquire_lock(self, lock: CatalogLock) -> None:
        """Take a backup catalog's lock (``Catalog.locked``'s ``acquire``), bounded and told."""
        with self.waiting(lock.what, lock.holders):
            try:
                lock.acquire(self.timeout)
            except LockBusy:
                raise WaitTimeout(
                    f"gave up after {self.timeout:g} s waiting for {lock.what}: held by "
                    f"{lock.holders()}"
                ) from None


class WatchedLeases:
    """A lease provider whose waits are bounded, told and timed by :class:`Waits`.

    Everything else (change counters, expired tokens, ``lease_nowait``) is the wrapped
    provider's own, so storage sees the same capabilities it would see without the wrapper.
    """

    def __init__(self, inner: LeaseProvider, root: Path, waits: Waits) -> None:
        self._inner = inner
        self._root = root
        self._waits = waits

    def lease(
        self, prefix: str, mode: str, timeout: float | None = None, ttl: float | None = None
    ) -> HeldLease:
        what = f"the {mode} lease on prefix {prefix!r}"
        with self._waits.waiting(what, lambda: lease_holders(self._root, prefix, mode)):
            try:
                return self._inner.lease(prefix, mode, timeout=timeout, ttl=ttl)
            except LeaseTimeout:
                raise WaitTimeout(
                    f"gave up after {timeout:g} s waiting for {what} of {self._root}: held by "
                    f"{lease_holders(self._root, prefix, mode)}; `hotcopy status {self._root}` "
                    "shows every lease",
                    prefix=prefix,
                    mode=mode,
                ) from None

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def open_repository(root: Path, waits: Waits) -> Repository:
    """``Repository(root)`` whose lease waits go through ``waits`` (bounded by its timeout)."""
    if not (root / MARKER).is_file():
        return Repository(root)  # raises: not a repository, with its own message
    # The provider Repository(root) would choose: the coordinator, or kernel file locks for a
    # repository shared with its group (the coordinator serves one user only).
    shared = shared_with_group(os.stat(root))
    inner: LeaseProvider = FileLeases(root / RUNTIME_DIR) if shared else connect(root)
    try:
        return Repository(
            root, leases=WatchedLeases(inner, root, waits), lease_timeout=waits.timeout
        )
    except BaseException:
        inner.close()
        raise


def lease_holders(root: Path, prefix: str, mode: str) -> str:
    """Who holds the leases that keep a ``mode`` lease on ``prefix`` waiting, for a message."""
    held = [
        lease
        for lease in read_status(root).leases
        if lease.prefix == prefix and lease.mode in _BLOCKED_BY.get(mode, ())
    ]
    if not held:
        return "nobody now (it was just released, or others queued first)"
    return "; ".join(
        f"{lease.holder} with a {lease.mode} lease for {lease.age:.1f} s" for lease in held
    )
