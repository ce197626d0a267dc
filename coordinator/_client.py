"""The coordinator client: leases over a Unix socket, reads of shared memory without one.

Mechanism notes (why it looks like this):

* The acquiring thread itself sends the request and reads the reply, so an uncontended
  acquire costs one round trip and no thread hand-off (a hand-off to a reader thread
  costs more than the round trip). Several threads may wait at once: whoever is not
  already receiving becomes *the* receiver and files replies for the others
  (leader/followers), so nobody busy-polls.
* A release is one-way: the connection is ordered, so the coordinator sees it before
  anything this client sends next.
* The acquiring thread polls briefly (adaptively, see ``_spin``) for the grant before it
  blocks, which saves two context switches when client and coordinator run on
  different cores.
* If the coordinator dies, the thread that notices (EOF) reconnects, starting a successor
  if needed, re-registers every held lease by token and re-sends pending requests.
* A daemon "keeper" thread renews ttl leases at ttl/3, gives back parked leases in their
  turn, and notices a dead coordinator while the client is idle (so held leases are
  re-registered within the grace period). It sleeps on the socket as well as on its timer:
  the coordinator says when a request queues behind a lease (WANTED), so a writer keeping
  its lease parked is not interrupted by a keeper looking every few milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Final, NamedTuple

from . import _protocol as p
from ._errors import (
    ClientClosed,
    CoordinatorUnavailable,
    LeaseTableFull,
    LeaseTimeout,
    WouldBlock,
)
from ._paths import RuntimePaths, peer_uid, unix_address
from ._process import own_pid
from ._segment import SegmentReader, SegmentTorn
from ._spin import AdaptiveSpin, spin_budget_from_env

__all__ = ["Client", "ClientStatistics", "Lease", "connect"]

_log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT: Final = 15.0
_KEEPALIVE: Final = 0.5  # how often an idle client holding leases checks the coordinator
# Seconds before starting another candidate if the election is still free after ours
# (it failed, or won and died already): the launcher has returned by then, so a live
# candidate holds the election lock within milliseconds.
_SPAWN_RETRY: Final = 0.5
_SEND_ATTEMPTS: Final = 5  # connections a frame is sent on before the coordinator counts as gone
# Connections one running coordinator may drop unanswered in a row before this client stops
# reconnecting to it: it refuses this client (another hotcopy version), it is not dying.
_REFUSALS: Final = 3
_REPLY_GRACE: Final = 30.0  # a nowait reply later than this means the coordinator hangs
# A parked lease (see Lease.park) goes back to the coordinator once anybody queues for its
# prefix and its quantum is over, or after this long unused: a process stopped or busy
# elsewhere holds a prefix no longer than it would in a short transaction. The coordinator
# says when a request waits for a lease, once per grant: a holder whose waiter gave up looks
# for the next one this often.
_PARK_IDLE: Final = 0.05
_PARK_POLL: Final = 0.002
# How often a client looks whether its segment's path names another file (see commit_seq);
# no longer than storage's TRUST_COUNTER_FOR, which a writer waits while readers may still
# trust a replaced segment (see post).
_SEGMENT_RECHECK: Final = 1.0
ENV_LEASE_QUANTUM_MS: Final = "HOTCOPY_LEASE_QUANTUM_MS"


def _lease_quantum_from_env() -> float:
    """How long a holder may keep a parked lease that others queue for, since its grant
    (``HOTCOPY_LEASE_QUANTUM_MS``, default 1 ms; 0: hand it over at once).

    A hand-over costs about half a millisecond here (the coordinator and the next holder
    woken, the files read again): handed over at every commit, 4 writers on one prefix made
    1,700-1,900 commits/s in all, each waiting 2.1 ms at the median. With a quantum of 1 ms
    a writer makes a few commits per turn: 3,500-4,100/s, 0.15 ms at the median, a p99 of
    4.4-5.2 ms instead of 3.3-4.6; with 2 ms, 4,400-4,600/s and 7.8 ms (README, Numbers:
    scripts/bench_contention.py). Turns still go round in FIFO order: every writer its share.
    """
    raw = os.environ.get(ENV_LEASE_QUANTUM_MS, "")
    try:
        millis = float(raw) if raw else 1.0
    except ValueError:
        millis = 1.0
    return max(0.0, millis) / 1000


_LEASE_QUANTUM: Final = _lease_quantum_from_env()

_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Drop inherited client sockets at once: an open copy in a child would keep the
    # parent's connection (and leases) alive past the parent's death until the
    # coordinator's liveness sweep notices.
    for client in list(_CLIENTS):
        with contextlib.suppress(Exception):
            client._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)

_GRANT_SIZE: Final = 4 + 1 + p.GRANT_BODY.size
_GRANT: Final = p.GRANT
_GRANT_UNPACK = p.GRANT_BODY.unpack_from
_ACQUIRE: Final = p.ACQUIRE
_ACQUIRE_PACK = p.ACQUIRE_FRAME.pack
_ACQUIRE_LEN: Final = 1 + p.ACQUIRE_BODY.size
_MODE_CODES: Final = p.MODE_CODES
_RELEASE: Final = p.RELEASE
_RELEASE_PACK = p.RELEASE_FRAME.pack
_REGISTERED_SIZE: Final = 4 + 1 + p.REGISTERED_BODY.size
_PUBLISHED_SIZE: Final = 4 + 1 + p.REQ_BODY.size
_WANTED_SIZE: Final = 4 + 1 + p.REQ_BODY.size
_PARKING: Final = p.PARKING
_PARKING_PACK = p.RELEASE_FRAME.pack  # the same layout: length, type, request id


class _Wake:
    """What the keeper thread sleeps on: its timer, :meth:`set` from any thread, and a
    descriptor (the coordinator's socket) becoming readable. Its own descriptor is an
    eventfd, closed by the keeper as it ends."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()  # set() never writes to a descriptor closed meanwhile

    def set(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def wait(self, timeout: float, also: int) -> None:
        """Sleep until set, ``also`` (if >= 0) is readable, or ``timeout`` seconds passed."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if also >= 0:
            poller.register(also, select.POLLIN)
        with contextlib.suppress(OSError):  # ``also`` closed meanwhile: look again
            poller.poll(timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor (its lock may be held)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


class ClientStatistics(NamedTuple):
    """A snapshot of one client's activity.

    Attributes:
        leases_held: Leases held now.
        acquires: Leases granted.
        waits: Grants that had to queue first.
        timeouts: Requests that timed out.
        would_block: ``lease_nowait`` refusals.
        releases: Leases released.
        renewals: Renewals sent for ttl leases.
        reconnects: Reconnections after the coordinator went away.
        fenced: Leases lost at a reconnect (the successor refused their token).
    """

    leases_held: int
    acquires: int
    waits: int
    timeouts: int
    would_block: int
    releases: int
    renewals: int
    reconnects: int
    fenced: int


class Lease:
    """A granted lease; a context manager that releases it on exit.

    Attributes:
        prefix: The leased prefix.
        mode: ``"read"``, ``"snapshot"``, ``"write"`` or ``"exclusive"``.
        token: The fencing token, larger than any granted before on this repository.
        ttl: Seconds the lease survives without renewal, None for no expiry.
    """

    __slots__ = (
        "__weakref__",
        "_client",
        "_frame",
        "_granted_at",
        "_lost",
        "_next_renew",
        "_parked",
        "_parked_at",
        "_released",
        "_req_id",
        "_segment",
        "_slot",
        "_told_wanted",
        "mode",
        "prefix",
        "token",
        "ttl",
    )

    def __init__(
        self,
        client: Client,
        req_id: int,
        prefix: str,
        mode: str,
        token: int,
        slot: int,
        ttl: float | None,
        frame: bytes,
    ) -> None:
        self._client = client
        self._req_id = req_id
        self.prefix = prefix
        self.mode = mode
        self.token = token
        self._slot = slot
        self._segment = client._segment  # the one ``slot`` is in (see _connect_locked)
        self.ttl = ttl
        self._frame = frame
        self._released = False
        self._lost = False
        self._parked = False
        self._parked_at = 0.0  # monotonic time it was last parked; 0.0 if never
        self._told_wanted = False  # the coordinator said a request queues behind it
        self._granted_at = time.monotonic()
        self._next_renew = time.monotonic() + ttl / 3 if ttl else 0.0

    def release(self) -> None:
        """Give the lease back (idempotent; one-way, no round trip)."""
        if not self._released:
            self._client._release(self)

    def park(self) -> None:
        """Keep the lease for a quick :meth:`resume` instead of releasing it.

        The lease is given back at once if a request already queues for its prefix and it
        was held for its quantum (1 ms since its grant, see ``_lease_quantum_from_env``), and
        later by the client's keeper thread as soon as that holds, or after a short time
        unused; so parking saves the next acquire's round trip without making anybody wait
        for an idle holder. Meant for a holder that is likely to need the lease again soon
        (a writer between two commits).
        """
        if not self._released:
            self._client._park(self)

    def resume(self) -> bool:
        """Take a parked lease back into use; False if it is gone (then acquire anew)."""
        return self._client._resume(self)

    def is_current(self) -> bool:
        """Tell whether this lease's token is still granted, reading shared memory only.

        False once released, expired (ttl without renewal), reclaimed, or refused by a
        successor coordinator. Storage refuses commits of a lease that is not current.
        """
        if self._released or self._lost:
            return False
        segment = self._client._segment
        if segment is None:
            return False
        return segment.lease_is_current(self._slot, self.token, time.monotonic())

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self._lost else "held"
        return f"<Lease {self.prefix!r} {self.mode} token={self.token} {state}>"


class _Connection:
    """One socket to the coordinator and its receive buffer; the coordinator's pid, and
    whether it ever sent anything on this connection."""

    __slots__ = ("buf", "heard", "peer_pid", "poller", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.heard = False
        self.peer_pid = peer_uid(sock)[0]
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    def received(self, data: bytes) -> None:
        self.buf += data
        self.heard = True

    def refused(self) -> bool:
        """Whether this connection, closed, was dropped by a coordinator that still runs and
        never answered on it: it refused the handshake (or a request), it did not die."""
        if self.heard:
            return False
        try:
            os.kill(self.peer_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class Client:
    """A connection to the coordinator of one repository (see :func:`connect`).

    Thread-safe. Fork-aware: a child process that inherits a client does not touch the
    parent's socket or leases; it reconnects with a fresh identity on first use.

    Args:
        root: The repository root (an existing directory).
        connect_timeout: Seconds to wait for a coordinator to accept, starting one if
            none runs.
        start: Start a coordinator when none is reachable.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        start: bool = True,
    ) -> None:
        self._paths = RuntimePaths.for_root(root)
        self._connect_timeout = connect_timeout
        self._start = start
        self._closed = False
        self._conn: _Connection | None = None
        self._segment: SegmentReader | None = None
        self._segment_number = 0  # segments mapped so far: counters of two never compare
        self._segment_recheck = 0.0  # when to look whether the segment path names another
        self._pslots: dict[str, int] = {}
        self._pslot_gaps: dict[str, int] = {}  # see _pslot
        self._replaced_trusted_until = 0.0  # see post
        self._prefix_cache: dict[str, bytes] = {}
        self._spin = AdaptiveSpin(spin_budget_from_env())
        self._reset_process_state()
        with self._mutex:
            self._connect_locked()
        _CLIENTS.add(self)

    def _reset_process_state(self) -> None:
        # Everything a forked child must not share with its parent.
        self._pid = own_pid()
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._receiving = False
        self._sleepers = 0
        self._client_id = int.from_bytes(os.urandom(8))
        self._next_id = 1
        self._pending: dict[int, bytes] = {}
        self._replies: dict[int, tuple[int, int, int, int]] = {}
        self._held: dict[int, Lease] = {}
        self._keeper: threading.Thread | None = None
        self._keeper_wake: _Wake | None = None  # made with the keeper
        self._keep_interval = _KEEPALIVE
        self._keeper_due = math.inf  # monotonic time the keeper looks next, at the latest
        self._keeper_parks = False  # whether it saw a parkable lease (see _park) at its last look
        self._keeper_socket = -1  # what it sleeps on (see _socket_for_keeper_locked)
        self._keeper_unwatched = False  # the keeper sleeps without the socket: a thread receives
        self._early_wanted: set[int] = set()  # WANTED for requests granted, not yet leases
        self._acquires = self._waits = self._timeouts = self._would_block = 0
        self._releases = self._renewals = self._reconnects = self._fenced = 0
        self._refused_by = (0, 0)  # (coordinator pid, connections it dropped unanswered)

    # -- public API --------------------------------------------------------------------

    def lease(
        self, prefix: str, mode: str, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Acquire a lease, waiting (without polling) until it is granted.

        Args:
            prefix: The prefix to lease.
            mode: ``"read"``, ``"snapshot"``, ``"write"`` or ``"exclusive"``.
            timeout: Seconds to wait at most; None waits for ever; 0 does not wait at all
                (as :meth:`lease_nowait`, and as the file leases read it).
            ttl: Seconds the lease survives without renewal; the client renews it in the
                background while this process runs, so it only expires if the process is
                stopped or hung. None: held until released or the process dies.

        Returns:
            The granted lease (a context manager).

        Raises:
            LeaseTimeout: Not granted within ``timeout`` (the request is withdrawn).
            WouldBlock: ``timeout`` is 0 and the lease could not be granted at once.
            LeaseTableFull: The coordinator's lease table is full.
            CoordinatorUnavailable: No coordinator could be reached or started.
            ClientClosed: The client was closed.
            ValueError: Invalid prefix, mode, timeout or ttl.
        """
        # Fast path: one send, one receive, no condition variable, when this thread can
        # take the receiver role at once. Anything unusual falls back to _acquire.
        raw = self._prefix_cache.get(prefix)
        code = _MODE_CODES.get(mode)
        mutex = self._mutex
        if (
            raw is None
            or code is None
            or timeout is not None
            or (ttl is not None and not 0.001 <= ttl < 1e6)
            or self._pid != own_pid()
        ):
            return self._acquire(prefix, mode, timeout, ttl, nowait=timeout == 0)
        ttl_ms = round(ttl * 1000) if ttl is not None else 0
        mutex.acquire()
        conn = self._conn
        if self._receiving or self._closed or conn is None:
            mutex.release()
            return self._acquire(prefix, mode, timeout, ttl, nowait=False)
        req_id = self._take_id()
        data = _ACQUIRE_PACK(_ACQUIRE_LEN + len(raw), _ACQUIRE, req_id, code, 0, ttl_ms) + raw
        self._pending[req_id] = data
        self._receiving = True
        try:
            conn.sock.sendall(data)
        except OSError:
            # The coordinator died: reconnecting re-sends pending requests.
            try:
                self._reconnect_locked()
            except BaseException:
                self._pending.pop(req_id, None)
                self._stop_receiving_locked()
                raise
            finally:
                mutex.release()
            try:
                reply = self._receive_until(req_id, None)
            except BaseException:
                self._withdraw(req_id)
                raise
        else:
            mutex.release()
            try:
                try:
                    chunk = self._spin_recv(conn.sock) if self._spin.should_spin() else None
                    if chunk is None:
                        chunk = conn.sock.recv(65536)
                except OSError:
                    chunk = b""
                if (
                    len(chunk) == _GRANT_SIZE
                    and not conn.buf
                    and chunk[4] == _GRANT
                    and _GRANT_UNPACK(chunk, 5)[0] == req_id
                ):
                    _req, token, slot, waited = _GRANT_UNPACK(chunk, 5)
                    conn.heard = True
                    lease = Lease(self, req_id, prefix, mode, token, slot, ttl, data)
                    with mutex:
                        del self._pending[req_id]
                        self._stop_receiving_locked()
                        if self._closed:
                            raise ClientClosed("the client was closed while acquiring")
                        self._hold_locked(lease, waited)
                        self._keep_locked(ttl)
                    return lease
                # Not just our grant: file what came and carry on as the general receiver.
                with mutex:
                    if chunk:
                        conn.received(chunk)
                        self._dispatch_locked(conn)
                    elif conn is self._conn and not self._closed:
                        self._reconnect_locked()
                    reply = self._replies.pop(req_id, None)
            except BaseException:
                # Interrupted (or the reconnect failed): give up the receiver role, or
                # every other waiter in this process would wait for ever.
                with mutex:
                    self._stop_receiving_locked()
                self._withdraw(req_id)
                raise
            if reply is None:
                try:
                    reply = self._receive_until(req_id, None)
                except BaseException:
                    self._withdraw(req_id)
                    raise
            else:
                with mutex:
                    self._stop_receiving_locked()
        return self._finish_acquire(reply, req_id, prefix, mode, None, data)

    def _spin_recv(self, sock: socket.socket) -> bytes | None:
        """Poll the socket for up to the spin budget; None if nothing came (then block)."""
        spin = self._spin
        start = time.perf_counter()
        until = start + spin.budget
        recv = sock.recv
        while True:
            try:
                chunk = recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() > until:
                    spin.report(False)
                    return None
                continue
            # Found, but only a success if we were not descheduled along the way.
            spin.report(time.perf_counter() - start <= spin.budget)
            return chunk

    def lease_nowait(self, prefix: str, mode: str, ttl: float | None = None) -> Lease:
        """Acquire a lease only if it can be granted at once.

        Raises:
            WouldBlock: It would have to wait (held incompatibly, or others queue first).
            LeaseTableFull: The coordinator's lease table is full.
            CoordinatorUnavailable: No coordinator could be reached or started.
            ClientClosed: The client was closed.
            ValueError: Invalid prefix, mode or ttl.
        """
        return self._acquire(prefix, mode, None, ttl, nowait=True)

    def commit_seq(self, prefix: str) -> int:
        """Return the change counter of ``prefix``; -1 if the coordinator cannot tell.

        Reads shared memory; no round trip. The counter is odd exactly while a ``write`` or
        ``exclusive`` lease on the prefix is granted, and changes whenever one is granted or
        released and with every :meth:`publish_commit`. So an even value equal to one read
        earlier means that no lease that could change the prefix was granted in between; an
        odd one, that the same holder kept its lease (storage posts that holder's commits on
        the commit board: see :meth:`commit_state` and :meth:`post`). The counter is 0 while
        no such lease was granted since the segment was made (the prefix has no slot yet);
        the answer is -1 when there is no segment, or the prefix table was ever full (a
        prefix without a slot may then have a writer whose counter is not shared).

        A coordinator that exits may remove its segment, whose counters then stop moving
        while a successor counts in a new one: without a coordinator behind the segment this
        maps the current one, if any, or answers -1 (and it looks for a new one at least
        every second: a segment removed under a live coordinator, which a successor replaced
        when it died); and a counter of another segment than the last one read never equals
        one of it (the segment's number is in the high bits).
        """
        return self.commit_state(prefix)[0]

    def commit_state(self, prefix: str) -> tuple[int, bytes | None]:
        """``prefix``'s change counter (see :meth:`commit_seq`) and, while it is odd, what
        the holder of its write lease posted last on the commit board (see :meth:`post`):
        ``b""`` while it is even; None where the board cannot be read. Reads shared memory; no
        round trip."""
        # Every get asks this: the common case is written out, without calls.
        if self._closed or own_pid() != self._pid:
            self._check_usable()
        segment = self._segment
        if (
            segment is None
            or time.monotonic() >= self._segment_recheck
            or not segment.coordinator_pid()
        ):
            segment = self._current_segment()
            if segment is None:
                return -1, None
        number = self._segment_number << 56  # no counter of another segment reads the same
        pslot = self._pslots.get(prefix)
        if pslot is None:
            pslot = self._pslot(prefix)
            if pslot is None:
                return (-1, None) if segment.prefix_table_full() else (number, b"")
        counter, posted = segment.state_at(pslot)
        if segment is not self._segment:  # another thread mapped a successor's meanwhile
            return -1, None
        return counter + number, posted

    def post(self, prefix: str, token: int, seq: int) -> bool:
        """Post commit ``seq`` of ``prefix``, made under the write lease of ``token``, on the
        commit board (see ``SegmentReader.post``), for readers that trust its odd counter.
        True once posted, or where no reader can trust that counter (the prefix has no slot
        in a full table, or the segment has no board); False if this process cannot post: it
        has no segment, or its segment was replaced by a successor's, which readers may map
        and which holds this process's leases only once it reconnected (and mapped it); or
        its segment replaced another one less than ``_SEGMENT_RECHECK`` seconds ago, whose
        frozen counters a reader may still trust (a holder whose lease outlived a killed
        coordinator commits then; a new grant waits for the successor's recovery window).
        The caller then waits before it acknowledges (``storage._leases.TRUST_COUNTER_FOR``,
        which is at least as long). Writes shared memory (and looks at the segment's path: one
        stat); no round trip."""
        self._check_usable()
        segment = self._segment
        if segment is None:
            return False
        if segment.replaced():
            with self._mutex:  # its coordinator died: reconnect now, not at the keeper's next look
                if self._conn is not None and not self._receiving:
                    self._poll_idle_locked(self._conn)
                segment = self._segment
            if segment is None or segment.replaced():
                return False
        if self._replaced_trusted_until and time.monotonic() < self._replaced_trusted_until:
            return False  # a reader may still trust the segment this one replaced
        pslot = self._pslot(prefix)
        try:
            if pslot is None:
                return segment.prefix_table_full()  # readers read -1 then: they look
            segment.post(pslot, token, seq)
        except ValueError:  # unmapped meanwhile
            return False
        return segment is self._segment

    def _current_segment(self) -> SegmentReader | None:
        """The segment mapped, mapped anew first if its coordinator exited or (looked at every
        ``_SEGMENT_RECHECK`` seconds) its path names another file now; None if there is none
        with a coordinator behind it."""
        segment = self._segment
        stale = segment is None or not segment.coordinator_pid()
        if not stale and segment is not None:
            now = time.monotonic()
            if now >= self._segment_recheck:
                self._segment_recheck = now + _SEGMENT_RECHECK
                stale = segment.replaced()
        if stale:
            with self._mutex:
                self._open_segment()
                segment = self._segment
            if segment is None or not segment.coordinator_pid():
                return None
        return segment

    def expired_token(self) -> int:
        """The largest fencing token of a ``write`` or ``exclusive`` lease that expired, its
        holder alive but not renewing (stopped, hung): such a holder may still act on it, and
        storage fences it before it changes the prefix (0 if none ever expired). Reads
        shared memory; no round trip."""
        self._check_usable()
        segment = self._segment
        if segment is None:
            raise CoordinatorUnavailable("no coordinator segment to read")
        return segment.expired_token()

    def _pslot(self, prefix: str) -> int | None:
        segment = self._segment
        if segment is None:
            return None
        pslot = self._pslots.get(prefix)
        if pslot is not None:
            return pslot
        # A reader of a prefix that no writer leased asks at every get: the free slot its
        # last search ended at answers "none yet" as long as it stays free.
        gap = self._pslot_gaps.get(prefix)
        if gap is not None and segment.slot_unused(gap):
            return None
        self._prefix_bytes(prefix)
        pslot, gap = segment.locate_prefix(prefix)
        if pslot is not None:
            self._pslots[prefix] = pslot  # slots never move within a segment
        elif gap is not None and len(self._pslot_gaps) < 4096:
            self._pslot_gaps[prefix] = gap
        return pslot

    def _wanted(self, prefix: str) -> bool:
        """True if a request queues for ``prefix`` (or nobody can tell: assume one does)."""
        segment = self._segment
        pslot = self._pslot(prefix)
        if segment is None or pslot is None:
            return True
        try:
            return segment.waiters_at(pslot) > 0
        except SegmentTorn:
            return True

    def publish_commit(self, prefix: str, seq: int, *, wait: bool = False) -> None:
        """Tell the coordinator ``prefix`` reached commit ``seq``; its counter moves on.

        Args:
            wait: Return only once the new counter is visible in shared memory (one round
                trip). Without it the message is one-way: fast, but a reader may look at the
                counter before it moves.

        Raises:
            ValueError: Invalid prefix or negative ``seq``.
            CoordinatorUnavailable: ``wait`` and no coordinator answered in time.
        """
        self._check_usable()
        raw = self._prefix_bytes(prefix)
        if not 0 <= seq < 1 << 64:
            raise ValueError(f"commit sequence {seq} out of range")
        if not wait:
            data = p.frame(p.PUBLISH, p.PUBLISH_BODY.pack(seq) + raw)
            with self._mutex:
                self._check_usable_locked()
                self._send_locked(data, resend=True)
            return
        if not self._publish_sync(raw, seq)(time.monotonic() + _REPLY_GRACE):
            raise CoordinatorUnavailable(
                f"the coordinator of {str(self._paths.root)!r} did not acknowledge a commit "
                f"of {prefix!r} within {_REPLY_GRACE:.0f}s",
                root=str(self._paths.root),
            )

    def _publish_sync(self, raw: bytes, seq: int) -> Callable[[float], bool]:
        """Send a publication that the coordinator acknowledges; the function returned waits
        for that, by a monotonic deadline, and tells whether it came."""
        with self._mutex:
            self._check_usable_locked()
            req_id = self._take_id()
            data = p.frame(p.PUBLISH_SYNC, p.PUBLISH_SYNC_BODY.pack(req_id, seq) + raw)
            self._pending[req_id] = data  # a reconnect re-sends it: publishing is idempotent
            self._send_locked(data, resend=False)

        def published(deadline: float) -> bool:
            reply = self._await(req_id, deadline)
            if reply is None:
                with self._mutex:
                    self._pending.pop(req_id, None)
                    self._replies.pop(req_id, None)
            return reply is not None

        return published

    def statistics(self) -> ClientStatistics:
        """Return a frozen snapshot of this client's counters."""
        if own_pid() != self._pid:
            self._forget_parent()
        with self._mutex:
            return ClientStatistics(
                leases_held=len(self._held),
                acquires=self._acquires,
                waits=self._waits,
                timeouts=self._timeouts,
                would_block=self._would_block,
                releases=self._releases,
                renewals=self._renewals,
                reconnects=self._reconnects,
                fenced=self._fenced,
            )

    def close(self) -> None:
        """Close the connection, which releases every lease this client holds (idempotent)."""
        self._close(join=True)

    def _close(self, *, join: bool) -> None:
        if own_pid() != self._pid:
            self._forget_parent()
            self._closed = True
            return
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            for lease in self._held.values():
                lease._released = True
            self._held.clear()
            self._pending.clear()
            self._cond.notify_all()
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
                conn.sock.close()
        self._wake_keeper()
        keeper = self._keeper
        if join and keeper is not None and keeper is not threading.current_thread():
            keeper.join()
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A fallback only: close() is the contract. Never act for another process.
        with contextlib.suppress(Exception):
            if getattr(self, "_pid", None) == own_pid() and not self._closed:
                self._close(join=False)  # never block in a finalizer

    def __repr__(self) -> str:
        return f"<Client root={str(self._paths.root)!r} closed={self._closed}>"

    # -- acquiring ---------------------------------------------------------------------

    def _take_id(self) -> int:
        """Return a fresh request id (holding the mutex).

        Ids are 32 bits and wrap after ~4 billion requests; one still in use (a lease
        held for days) is skipped, as the coordinator refuses an id in flight twice.
        """
        req_id = self._next_id
        while req_id in self._held or req_id in self._pending:
            req_id = (req_id + 1) & 0xFFFFFFFF or 1
        self._next_id = (req_id + 1) & 0xFFFFFFFF or 1
        return req_id

    def _prefix_bytes(self, prefix: str) -> bytes:
        raw = self._prefix_cache.get(prefix)
        if raw is None:
            raw = p.validate_prefix(prefix)
            if len(self._prefix_cache) < 4096:
                self._prefix_cache[prefix] = raw
        return raw

    def _acquire(
        self, prefix: str, mode: str, timeout: float | None, ttl: float | None, nowait: bool
    ) -> Lease:
        raw = self._prefix_bytes(prefix)
        code = p.MODE_CODES.get(mode)
        if code is None:
            raise ValueError(f"invalid lease mode {mode!r}: use one of {', '.join(p.MODES)}")
        if ttl is None:
            ttl_ms = 0
        elif ttl > 0:
            ttl_ms = max(1, min(round(ttl * 1000), 0xFFFFFFFF))
        else:
            raise ValueError(f"ttl must be positive seconds or None, not {ttl!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
        now = time.monotonic()
        if nowait:
            deadline: float | None = now + _REPLY_GRACE
        else:
            deadline = None if timeout is None else now + timeout
        self._check_usable()
        with self._mutex:
            self._check_usable_locked()
            req_id = self._take_id()
            data = (
                p.ACQUIRE_FRAME.pack(
                    p.ACQUIRE_BODY.size + 1 + len(raw),
                    p.ACQUIRE,
                    req_id,
                    code,
                    p.FLAG_NOWAIT if nowait else 0,
                    ttl_ms,
                )
                + raw
            )
            self._pending[req_id] = data
            self._send_locked(data, resend=False)  # a reconnect re-sends pending requests
        try:
            reply = self._await(req_id, deadline)
        except BaseException:
            self._withdraw(req_id)
            raise
        if reply is None:
            with self._mutex:
                reply = self._replies.pop(req_id, None)
                if reply is None:
                    # Withdraw: the coordinator drops it from the queue, or releases it if
                    # its grant is in flight (we ignore grants for unknown requests).
                    self._pending.pop(req_id, None)
                    self._timeouts += 1
                    with contextlib.suppress(CoordinatorUnavailable):
                        self._send_locked(p.RELEASE_FRAME.pack(5, p.RELEASE, req_id), resend=False)
            if reply is None:
                if nowait:
                    raise CoordinatorUnavailable(
                        f"the coordinator of {str(self._paths.root)!r} did not answer within "
                        f"{_REPLY_GRACE:.0f}s: is it stopped?",
                        root=str(self._paths.root),
                    )
                raise LeaseTimeout(
                    f"lease {mode!r} on prefix {prefix!r} not granted within {timeout}s",
                    prefix=prefix,
                    mode=mode,
                    timeout=timeout,
                )
        return self._finish_acquire(reply, req_id, prefix, mode, ttl, data)

    def _hold_locked(self, lease: Lease, waited: int) -> None:
        """Count ``lease``, just granted, as held (holding the mutex)."""
        self._held[lease._req_id] = lease
        self._acquires += 1
        self._waits += waited
        if lease._req_id in self._early_wanted:
            self._early_wanted.discard(lease._req_id)
            lease._told_wanted = True

    def _withdraw(self, req_id: int) -> None:
        """Forget a request whose caller gave up on an error.

        A request left behind would be re-sent by a reconnect and granted to nobody.
        """
        with self._mutex:
            self._early_wanted.discard(req_id)
            if self._pending.pop(req_id, None) is not None and self._conn is not None:
                with contextlib.suppress(Exception):
                    self._send_locked(p.RELEASE_FRAME.pack(5, p.RELEASE, req_id), resend=False)
            self._replies.pop(req_id, None)

    def _finish_acquire(
        self,
        reply: tuple[int, int, int, int] | None,
        req_id: int,
        prefix: str,
        mode: str,
        ttl: float | None,
        data: bytes,
    ) -> Lease:
        if reply is None:  # pragma: no cover - only deadline-bound waits return None
            raise LeaseTimeout(f"lease {mode!r} on prefix {prefix!r} not granted", prefix=prefix)
        kind, token, slot, waited = reply
        if kind == p.GRANT:
            lease = Lease(self, req_id, prefix, mode, token, slot, ttl, data)
            with self._mutex:
                if self._closed:
                    raise ClientClosed("the client was closed while acquiring")
                self._hold_locked(lease, waited)
                self._keep_locked(ttl)
            return lease
        if token == p.REFUSED_WOULD_BLOCK:
            with self._mutex:
                self._would_block += 1
            raise WouldBlock(
                f"lease {mode!r} on prefix {prefix!r} would block",
                prefix=prefix,
                mode=mode,
            )
        if token == p.REFUSED_TABLE_FULL:
            raise LeaseTableFull(
                f"the coordinator's lease table is full; lease {mode!r} on {prefix!r} refused "
                "(release leases, or raise LEASE_SLOTS)",
                prefix=prefix,
                mode=mode,
            )
        raise CoordinatorUnavailable(f"the coordinator refused the request (reason {token})")

    def _await(self, req_id: int, deadline: float | None) -> tuple[int, int, int, int] | None:
        """Wait for the reply to ``req_id``; None at the deadline."""
        mutex = self._mutex
        with mutex:
            while True:
                reply = self._replies.pop(req_id, None)
                if reply is not None:
                    return reply
                if self._closed:
                    raise ClientClosed("the client was closed while waiting")
                if not self._receiving:
                    self._receiving = True
                    break
                # Another thread receives for everybody: sleep until it files our reply
                # or hands the role over.
                self._sleepers += 1
                try:
                    if deadline is None:
                        self._cond.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return None
                        self._cond.wait(remaining)
                finally:
                    self._sleepers -= 1
        return self._receive_until(req_id, deadline)

    def _stop_receiving_locked(self) -> None:
        """Give up the receiver role (holding the mutex): to a sleeping thread, or to the
        keeper if it stopped watching the socket for this receiver."""
        self._receiving = False
        if self._sleepers:
            self._cond.notify_all()
        if self._keeper_unwatched:
            self._keeper_unwatched = False
            self._wake_keeper()

    def _receive_until(
        self, req_id: int, deadline: float | None
    ) -> tuple[int, int, int, int] | None:
        """Receive for everybody until the reply to ``req_id`` (the caller is the receiver)."""
        mutex = self._mutex
        try:
            while True:
                conn = self._conn
                if conn is None:
                    raise ClientClosed("the client was closed while waiting")
                eof = self._read(conn, deadline)
                with mutex:
                    if eof and conn is self._conn and not self._closed:
                        self._reconnect_locked()
                    if conn.buf:
                        self._dispatch_locked(conn)
                    reply = self._replies.pop(req_id, None)
                    if reply is not None:
                        return reply
                    if self._closed:
                        raise ClientClosed("the client was closed while waiting")
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
        finally:
            with mutex:
                self._stop_receiving_locked()

    def _read(self, conn: _Connection, deadline: float | None) -> bool:
        """Receive into ``conn.buf`` once; True at EOF. Only the receiver calls this."""
        try:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not conn.poller.poll(max(1, int(remaining * 1000) + 1)):
                    return False
            data = conn.sock.recv(65536)
        except InterruptedError:
            return False
        except OSError:
            return True
        if not data:
            return True
        conn.received(data)
        return False

    def _dispatch_locked(self, conn: _Connection) -> None:
        """File every complete frame in ``conn.buf`` (holding the mutex)."""
        buf = conn.buf
        pos = 0
        end = len(buf)
        notify = False
        while end - pos >= 5:
            (length,) = p.LENGTH.unpack_from(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            kind = buf[pos + 4]
            if kind == p.GRANT and stop - pos == _GRANT_SIZE:
                req_id, token, slot, waited = p.GRANT_BODY.unpack_from(buf, pos + 5)
                if self._pending.pop(req_id, None) is not None:
                    self._replies[req_id] = (p.GRANT, token, slot, waited)
                    notify = True
            elif kind == p.REFUSED:
                req_id, reason = p.REFUSED_BODY.unpack_from(buf, pos + 5)
                if self._pending.pop(req_id, None) is not None:
                    self._replies[req_id] = (p.REFUSED, reason, 0, 0)
                    notify = True
            elif kind == p.WANTED and stop - pos == _WANTED_SIZE:
                (req_id,) = p.REQ_BODY.unpack_from(buf, pos + 5)
                lease = self._held.get(req_id)
                if lease is not None:
                    lease._told_wanted = True
                    self._wake_keeper()  # to give it back in its turn if it is parked
                else:  # granted, not a lease yet (or given back before the notice came)
                    early = self._early_wanted
                    early.add(req_id)
                    if len(early) > 64:  # forget the given back, never to be leases
                        early.intersection_update({req_id, *self._pending, *self._replies})
            elif kind == p.PUBLISHED and stop - pos == _PUBLISHED_SIZE:
                (req_id,) = p.REQ_BODY.unpack_from(buf, pos + 5)
                if self._pending.pop(req_id, None) is not None:
                    self._replies[req_id] = (p.PUBLISHED, 0, 0, 0)
                    notify = True
            elif kind == p.REGISTERED and stop - pos == _REGISTERED_SIZE:
                req_id, ok, token, slot = p.REGISTERED_BODY.unpack_from(buf, pos + 5)
                lease = self._held.get(req_id)
                if lease is not None and lease.token == token:
                    if ok:
                        lease._slot, lease._segment = slot, self._segment
                    else:
                        self._lose_locked(lease, "refused by the coordinator's successor")
            else:
                _log.warning("ignoring unexpected message type %#x from the coordinator", kind)
            pos = stop
        if pos:
            del buf[:pos]
        if notify and self._sleepers:
            self._cond.notify_all()

    # -- releasing and renewing --------------------------------------------------------

    def _release(self, lease: Lease) -> None:
        if own_pid() != self._pid:
            # The parent's lease, seen from a forked child: not ours to release, and the
            # inherited mutex may have been held by a parent thread at fork time.
            lease._released = True
            return
        with self._mutex:
            self._release_locked(lease)

    def _release_locked(self, lease: Lease) -> None:
        if lease._released:
            return
        lease._released = True
        lease._parked = False
        if self._closed:
            return  # closing already released everything
        if self._held.pop(lease._req_id, None) is None:
            return  # lost at a reconnect: the coordinator no longer knows it
        self._releases += 1
        # If the coordinator is gone, the successor never hears of this lease: not
        # re-registering it is the release.
        with contextlib.suppress(CoordinatorUnavailable):
            self._send_locked(_RELEASE_PACK(5, _RELEASE, lease._req_id), resend=False)

    def _park(self, lease: Lease) -> None:
        with self._mutex:
            if lease._released or lease._lost or self._held.get(lease._req_id) is not lease:
                return
            now = time.monotonic()
            if self._turn_over(lease, now):
                self._release_locked(lease)
                return
            if not lease._parked_at and self._conn is not None:
                # Its first park: from now on the coordinator says when a request waits.
                with contextlib.suppress(CoordinatorUnavailable):
                    self._send_locked(_PARKING_PACK(5, _PARKING, lease._req_id), resend=False)
            lease._parked = True
            lease._parked_at = now
            # The keeper gives it back in its turn (somebody waits, its quantum not over) or
            # once unused for long: wake it if it would look too late, or does not yet look
            # after parked leases (nor sleep on the socket for a WANTED).
            if not lease._told_wanted:
                due = now + _PARK_IDLE
            elif now - lease._granted_at < _LEASE_QUANTUM:
                due = lease._granted_at + _LEASE_QUANTUM
            else:  # told, and _turn_over found nobody waiting: a later waiter is not told
                due = now + _PARK_POLL
            if not self._keeper_parks or due < self._keeper_due:
                self._wake_keeper()

    def _turn_over(self, lease: Lease, now: float) -> bool:
        """True if a parked ``lease`` must go back: somebody queues for its prefix and its
        holder had it for its quantum (see :func:`_lease_quantum_from_env`)."""
        return now - lease._granted_at >= _LEASE_QUANTUM and self._wanted(lease.prefix)

    def _parked_due(self, lease: Lease, now: float) -> float | None:
        """Give back a parked ``lease`` that is due (see :meth:`_park`): None then; else the
        seconds until it may be (the keeper looks again by then)."""
        if not lease._parked:  # in use: its next park wakes the keeper if it must look sooner
            return _PARK_POLL if lease._told_wanted else _PARK_IDLE
        unused = lease._parked_at + _PARK_IDLE - now
        if unused > 0 and self._wanted(lease.prefix):
            unused = min(unused, lease._granted_at + _LEASE_QUANTUM - now)
        elif unused > 0 and lease._told_wanted:
            return min(unused, _PARK_POLL)  # told once per grant: a later waiter is looked for
        if unused > 0:
            return unused
        self._release_locked(lease)
        return None

    def _resume(self, lease: Lease) -> bool:
        with self._mutex:
            if not lease._parked or lease._released:
                return False
            lease._parked = False
            # A request queued meanwhile gets the lease when this holder parks it again.
            if lease._lost or not lease.is_current():
                self._release_locked(lease)
                return False
            return True

    def _keep_locked(self, ttl: float | None) -> None:
        """Make sure the keeper runs, and often enough for a lease of this ``ttl``."""
        if self._keeper is None:
            # Renews ttl leases, and notices a dead coordinator while this client idles,
            # so held leases are re-registered within the grace period.
            self._start_keeper()
        elif ttl is not None and ttl / 3 < self._keep_interval:
            self._keep_interval = ttl / 3
            self._wake_keeper()

    def _wake_keeper(self) -> None:
        wake = self._keeper_wake
        if wake is not None:
            wake.set()

    def _start_keeper(self) -> None:
        self._keeper_wake = _Wake()
        self._keep_interval = min(
            [_KEEPALIVE] + [lease.ttl / 3 for lease in self._held.values() if lease.ttl]
        )
        self._keeper_due = time.monotonic() + self._keep_interval
        # The thread holds only a weak reference, so a client dropped without close() can
        # still be collected (its finalizer closes the socket, which stops the keeper).
        self._keeper = threading.Thread(
            target=Client._keep,
            args=(weakref.ref(self), self._keeper_wake),
            name=f"hotcopy-lease-keeper-{self._pid}",
            daemon=True,
        )
        try:
            self._keeper.start()
        except BaseException:  # no thread (interpreter shutdown): no descriptor left behind
            self._keeper_wake.close()
            self._keeper_wake = self._keeper = None
            raise

    @staticmethod
    def _keep(ref: weakref.ref[Client], wake: _Wake) -> None:
        # Woken to stop (close), to reschedule at once (a new ttl lease may need renewing
        # sooner than the current sleep ends; a lease parked), or by the socket.
        client = ref()
        interval = _KEEPALIVE if client is None else client._keep_interval
        del client
        watched = -1
        try:
            while True:
                wake.wait(interval, watched)
                client = ref()
                if client is None or client._closed or own_pid() != client._pid:
                    return
                try:
                    client._keep_once()
                except Exception:
                    # The keeper must outlive a bad moment (say, a root being deleted); the
                    # calling threads see the same error on their next operation.
                    _log.exception("lease keeper failed root=%s", client._paths.root)
                interval, watched = client._keep_interval, client._keeper_socket
                del client
        finally:
            wake.close()

    def _keep_once(self) -> None:
        interval = _KEEPALIVE
        parkable = False
        with self._mutex:
            try:
                if self._closed or own_pid() != self._pid:
                    return
                now = time.monotonic()
                for lease in list(self._held.values()):
                    if lease._parked_at:  # parked now, or likely to be again soon
                        parkable = True
                        due = self._parked_due(lease, now)
                        if due is None:
                            continue
                        interval = min(interval, due)
                    if lease.ttl is None:
                        continue
                    if now >= lease._next_renew and self._conn is not None:
                        lease._next_renew = now + lease.ttl / 3
                        self._renewals += 1
                        with contextlib.suppress(CoordinatorUnavailable):
                            self._send_locked(
                                p.RELEASE_FRAME.pack(5, p.RENEW, lease._req_id), resend=False
                            )
                    interval = min(interval, max(0.001, lease._next_renew - now))
                if self._receiving:
                    return  # a waiting thread reads the socket and will see EOF itself
                if self._conn is not None:
                    self._poll_idle_locked(self._conn)
                elif self._held:
                    # A reconnect failed earlier: keep trying while leases need re-registering.
                    with contextlib.suppress(CoordinatorUnavailable):
                        self._connect_locked()
            finally:
                self._keep_interval = interval
                self._keeper_due = time.monotonic() + interval
                self._keeper_parks = parkable
                self._keeper_socket = self._socket_for_keeper_locked()

    def _socket_for_keeper_locked(self) -> int:
        """The socket the keeper sleeps on, -1 for none: only while it may have a parked
        lease to give back (a WANTED notice to read), and no thread receives (which files
        what comes, a notice too, and wakes the keeper when it stops)."""
        conn = self._conn
        self._keeper_unwatched = self._keeper_parks and conn is not None and self._receiving
        if not self._keeper_parks or conn is None or self._receiving:
            return -1
        return conn.sock.fileno()

    def _poll_idle_locked(self, conn: _Connection) -> None:
        # Nobody is receiving: look for a dead coordinator (EOF) or stray replies.
        try:
            data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(CoordinatorUnavailable):
                self._reconnect_locked()
            return
        conn.received(data)
        self._dispatch_locked(conn)

    # -- connection management ---------------------------------------------------------

    def _check_usable(self) -> None:
        if own_pid() != self._pid:
            self._forget_parent()
        if self._closed:
            raise ClientClosed("the client is closed: open a new one with connect()")

    def _check_usable_locked(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed: open a new one with connect()")
        if own_pid() != self._pid:
            raise RuntimeError("internal: fork not handled before locking")
        if self._conn is None:
            self._connect_locked()

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's socket and leases, keep nothing shared."""
        conn = self._conn
        self._conn = None
        if conn is not None:
            # close(), never shutdown(): shutdown would cut the parent's connection too.
            conn.sock.close()
        for lease in self._held.values():
            lease._released = True
        if self._keeper_wake is not None:
            self._keeper_wake.forget()
        self._reset_process_state()
        self._pslots = {}
        self._pslot_gaps = {}

    def _send_locked(self, data: bytes, *, resend: bool) -> None:
        """Send one frame (holding the mutex), reconnecting if the coordinator died; with
        ``resend``, send it again on the new connection (the handshake re-sends only pending
        requests), which may die in turn: a successor killed at once is reconnected to again,
        up to a few times, and then the coordinator counts as unavailable."""
        if own_pid() != self._pid:
            raise RuntimeError("internal: fork not handled before sending")
        for _ in range(_SEND_ATTEMPTS):
            conn = self._conn
            if conn is None:
                raise ClientClosed("the client is closed")
            try:
                conn.sock.sendall(data)
                return
            except OSError as err:
                if err.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                    raise
            self._reconnect_locked()
            if not resend:
                return
        raise CoordinatorUnavailable(
            f"the coordinator of {str(self._paths.root)!r} died at every connection, "
            f"{_SEND_ATTEMPTS} times in a row",
            root=str(self._paths.root),
        )

    def _reconnect_locked(self) -> None:
        """Replace a dead connection and restore this client's state on the new one."""
        old = self._conn
        self._conn = None
        if old is not None:
            with contextlib.suppress(OSError):
                old.sock.shutdown(socket.SHUT_RDWR)  # wake the receiver, if another thread
            old.sock.close()
        if old is None or not old.refused():
            self._refused_by = (0, 0)
        else:
            pid, times = self._refused_by
            self._refused_by = (old.peer_pid, times + 1 if pid == old.peer_pid else 1)
            if self._refused_by[1] >= _REFUSALS:
                raise CoordinatorUnavailable(
                    f"the coordinator of {str(self._paths.root)!r} (pid {old.peer_pid}) "
                    f"dropped this client's connection unanswered {_REFUSALS} times in a row, "
                    "while it runs: it refuses the handshake, as a coordinator of another "
                    f"hotcopy version does (this one speaks protocol version "
                    f"{p.PROTOCOL_VERSION}); its log {str(self._paths.log)!r} says why. Stop "
                    "it once no process of its version runs, and the next client starts one "
                    "of this version",
                    root=str(self._paths.root),
                    pid=old.peer_pid,
                )
        _log.info("coordinator connection lost, reconnecting root=%s", self._paths.root)
        self._reconnects += 1
        self._connect_locked()

    def _lose_locked(self, lease: Lease, why: str) -> None:
        lease._lost = True
        del self._held[lease._req_id]
        self._fenced += 1
        _log.warning(
            "lease lost across a coordinator restart prefix=%s token=%s: %s",
            lease.prefix, lease.token, why,
        )  # fmt: skip

    def _connect_locked(self) -> None:
        for lease in list(self._held.values()):
            segment = lease._segment
            if segment is not None and not segment.lease_held_until(lease._slot, lease.token):
                # Taken back while we were away (it expired: its holder was stopped, say):
                # a successor that lost shared memory could not tell, and would accept it.
                self._lose_locked(lease, "it expired before")
        parts = [p.frame(p.HELLO, p.HELLO_BODY.pack(p.PROTOCOL_VERSION, self._client_id))]
        for req_id, lease in self._held.items():
            parts.append(
                p.frame(
                    p.REGISTER,
                    p.REGISTER_BODY.pack(
                        req_id,
                        p.MODE_CODES[lease.mode],
                        round(lease.ttl * 1000) if lease.ttl else 0,
                        lease.token,
                    )
                    + lease.prefix.encode("ascii"),
                )
            )
            if lease._parked_at:  # a successor tells it when one waits too
                parts.append(_PARKING_PACK(5, _PARKING, req_id))
        parts.append(p.frame(p.REGISTER_END))
        parts.extend(self._pending.values())
        sock = self._open_socket(b"".join(parts))
        self._open_segment()
        self._conn = _Connection(sock)

    def _open_segment(self) -> None:
        try:
            path = self._paths.segment_path()
            if path is None:
                return
            info = os.stat(path)
        except FileNotFoundError:
            return
        if self._segment is not None and self._segment.inode == (info.st_dev, info.st_ino):
            return
        try:
            segment = SegmentReader(path)
        except (OSError, ValueError) as err:
            _log.warning("cannot map shared memory path=%s error=%s", path, err)
            return
        # The old map is not closed here: another thread may be reading it (a lease's
        # is_current, a get's counter), and it goes with the last reference to it.
        if self._segment is not None and self._segment.coordinator_pid():
            # Killed, its pid left behind (a clean exit clears it: readers map anew at once).
            self._replaced_trusted_until = _replaced_trusted_until(segment)
        self._segment = segment
        self._segment_number += 1
        self._pslots = {}
        self._pslot_gaps = {}

    def _open_socket(self, handshake: bytes) -> socket.socket:
        """Connect to the coordinator, starting one if none answers, and send ``handshake``.

        A connection that breaks while sending the handshake (a coordinator dying or
        exiting while our connection sat in its backlog) counts as no answer: retry.
        """
        paths = self._paths
        paths.ensure_runtime_dir()
        deadline = time.monotonic() + self._connect_timeout
        spawned_at: float | None = None
        delay = 0.002
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with unix_address(paths.socket) as address:
                    sock.connect(address)
                _pid, uid = peer_uid(sock)
                if uid != os.getuid():
                    sock.close()
                    raise CoordinatorUnavailable(
                        f"{str(paths.socket)!r} is served by uid {uid}, not by this user: "
                        "refusing to talk to it",
                        root=str(paths.root),
                    )
                sock.sendall(handshake)
                return sock
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
                sock.close()
            except BrokenPipeError:
                sock.close()
            except BaseException:
                sock.close()
                raise
            now = time.monotonic()
            if (
                self._start
                and (spawned_at is None or now - spawned_at > _SPAWN_RETRY)
                and self._election_is_free()
                and self._spawn_coordinator()
            ):
                spawned_at = time.monotonic()
            if now >= deadline:
                raise CoordinatorUnavailable(
                    f"no coordinator answers for {str(paths.root)!r} after "
                    f"{self._connect_timeout:.0f}s; see {str(paths.log)!r} or run "
                    f"'hotcopy coordinator {paths.root}' to see why",
                    root=str(paths.root),
                )
            time.sleep(delay)  # waiting for another process to bind: nothing to block on
            delay = min(delay * 2, 0.02)

    def _election_is_free(self) -> bool:
        """True if no coordinator (running or starting) holds the election lock."""
        try:
            fd = os.open(self._paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops our probe lock, if we took it
        return True

    def _spawn_coordinator(self) -> bool:
        """Start a coordinator candidate; False if another client is starting one now."""
        # When a coordinator dies, every client notices at once; a second lock lets one
        # of them start the successor instead of all of them racing interpreters up.
        try:
            fd = os.open(
                self._paths.runtime_dir / "spawn.lock",
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
        except OSError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # another client is starting one right now
            _log.info("starting a coordinator root=%s", self._paths.root)
            import subprocess  # here: most processes never start one, and it costs 1 MiB

            # The launcher forks the real coordinator into its own session and exits at
            # once, so it is never our child (no zombie, no Popen left to reap).
            subprocess.run(
                [sys.executable, "-m", "hotcopy.coordinator", str(self._paths.root), "--detach"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                check=False,
                timeout=60,
            )
            return True
        finally:
            if fd >= 0:
                os.close(fd)


def _replaced_trusted_until(successor: SegmentReader) -> float:
    """Until when a reader may still trust the counters of the segment that ``successor``
    replaced: a reader looks whether its segment's path names another file only every
    ``_SEGMENT_RECHECK`` seconds (see :meth:`Client.commit_seq`), and a predecessor that was
    killed left its pid in the old segment, which then reads as served (its file removed
    meanwhile, say by systemd-logind's RemoveIPC, the successor made a new one)."""
    now = time.monotonic()
    try:
        started = successor.header().started_monotonic
    except SegmentTorn:
        started = 0.0
    # The new file appeared before its coordinator wrote when it started, if it did yet.
    return min(started or now, now) + _SEGMENT_RECHECK


def connect(root: str | os.PathLike[str], *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Client:
    """Connect to the coordinator of the repository at ``root``, starting it if none runs.

    Args:
        root: The repository root (an existing directory).
        timeout: Seconds to wait for a coordinator to accept.

    Returns:
        A :class:`Client` (a context manager).

    Raises:
        CoordinatorUnavailable: No coordinator could be reached or started in time.
        FileNotFoundError: ``root`` does not exist.
    """
    return Client(root, connect_timeout=timeout)
