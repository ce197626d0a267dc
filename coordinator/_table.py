"""The lease table: compatibility, FIFO queues, expiry and recovery (the coordinator's policy).

This module decides who holds what; it does no socket I/O. Every change is written
through to the shared memory segment *before* it is reported, so a grant a client
receives is always visible to a successor that rebuilds the table after a crash.
Decisions are collected in :attr:`LeaseTable.outbox` for the server to send.

Compatibility: ``read``, ``snapshot`` and ``write`` go together except write with write;
``exclusive`` goes with nothing. Grants are strictly FIFO per prefix: a request is granted
only when every request queued before it on the prefix has been, so a queued writer (or
exclusive) is never overtaken by later readers and cannot starve.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ._process import ProcessIdentity, is_alive
from ._protocol import MODE_CODES, MODE_NAMES
from ._segment import LeaseRecord, SegmentWriter
from ._tokens import TokenSource

__all__ = ["Entry", "LeaseTable"]

_log = logging.getLogger(__name__)

READ = MODE_CODES["read"]
SNAPSHOT = MODE_CODES["snapshot"]
WRITE = MODE_CODES["write"]
EXCLUSIVE = MODE_CODES["exclusive"]

# Outcomes reported in the outbox.
GRANTED = 1
REFUSED_FULL = 2
WANTED = 3  # a request queued behind this granted lease


@dataclass(slots=True, eq=False)
class Entry:
    """A request, queued or granted.

    Attributes:
        owner: The connection it came on (any hashable), None for a lease recovered from
            shared memory whose holder has not re-registered yet (an orphan).
        req_id: The client's request id on that connection.
        prefix: The prefix.
        prefix_bytes: The prefix, ASCII-encoded.
        mode: Mode code.
        ttl: Seconds, 0.0 for none.
        holder: The requesting process.
        client_id: The requesting client object's id.
        token: Fencing token once granted, else 0.
        slot: Lease slot once granted, else -1.
        granted_at: Monotonic time of the grant.
        deadline: Monotonic time the table drops the lease (ttl expiry, or the end of an
            orphan's grace period); 0.0 for never.
        waited: True if it was queued before being granted.
        parks: True once its holder said it may keep it parked (PARKING).
        told: True once its holder was told that a request waits for it (see
            ``LeaseTable._tell_blockers``).
    """

    owner: Hashable | None
    req_id: int
    prefix: str
    prefix_bytes: bytes
    mode: int
    ttl: float
    holder: ProcessIdentity
    client_id: int
    token: int = 0
    slot: int = -1
    granted_at: float = 0.0
    deadline: float = 0.0
    waited: bool = False
    parks: bool = False
    told: bool = False


@dataclass(slots=True)
class _Prefix:
    granted: set[Entry] = field(default_factory=set)
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    queue: deque[Entry] = field(default_factory=deque)
    pslot: int | None = None
    commit: int = 0


def _conflict(held: int, wanted: int) -> bool:
    """Whether a lease of mode ``held`` keeps a request of mode ``wanted`` waiting."""
    return held == EXCLUSIVE or wanted == EXCLUSIVE or held == wanted == WRITE


def _compatible(counts: list[int], mode: int) -> bool:
    if counts[EXCLUSIVE]:
        return False
    if mode == EXCLUSIVE:
        return not (counts[READ] or counts[SNAPSHOT] or counts[WRITE])
    if mode == WRITE:
        return not counts[WRITE]
    return True


class LeaseTable:
    """All leases of one repository.

    Args:
        segment: The shared memory segment to write through to.
        tokens: Source of fencing tokens.
        clock: Monotonic clock (injectable for tests).
        alive: Liveness check for holders (injectable for tests).
    """

    def __init__(
        self,
        segment: SegmentWriter,
        tokens: TokenSource,
        clock: Callable[[], float],
        alive: Callable[[ProcessIdentity], bool] = is_alive,
    ) -> None:
        self._segment = segment
        self._tokens = tokens
        self._clock = clock
        self._alive = alive
        self._prefixes: dict[str, _Prefix] = {}
        self._by_owner: dict[Hashable, dict[int, Entry]] = {}
        self._orphans: dict[int, Entry] = {}
        self._free_slots: list[int] = list(range(segment.lease_slots))
        self._expiry: list[tuple[float, int, Entry]] = []
        self._counter = itertools.count()
        self._hold_until = 0.0
        self.outbox: list[tuple[Entry, int]] = []
        self.granted_count = 0
        self.queued_count = 0

    # -- queries ---------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when nothing is granted or queued."""
        return self.granted_count == 0 and self.queued_count == 0

    def next_deadline(self) -> float | None:
        """Monotonic time of the next expiry (or end of a hold on grants) to act on."""
        found: float | None = None
        while self._expiry:
            deadline, _, entry = self._expiry[0]
            if entry.slot >= 0 and entry.deadline == deadline:
                found = deadline
                break
            heapq.heappop(self._expiry)  # stale: released or renewed since
        if self._hold_until and (found is None or self._hold_until < found):
            return self._hold_until
        return found

    def hold_grants_until(self, deadline: float) -> None:
        """Queue every new request until ``deadline``; only until then are re-registrations
        of leases that nothing records accepted.

        Used when a predecessor crashed *and* its shared memory is gone: leases may be
        outstanding that nothing records, so their holders get this long to re-register
        before anything else is granted. A holder that does not (stopped, hung) may still act
        on its lease, as after an expiry: every token handed out before counts as expired, so
        that the next holder of each prefix fences it (see ``storage._log``).
        """
        self._hold_until = deadline
        if self._tokens.next:
            self._segment.record_expired(self._tokens.next - 1)

    @property
    def next_token(self) -> int:
        """The next fencing token to be handed out."""
        return self._tokens.next

    def holders(self) -> set[ProcessIdentity]:
        """Every process holding a granted lease."""
        return {e.holder for p in self._prefixes.values() for e in p.granted}

    # -- recovery --------------------------------------------------------------------

    def recover(self, records: list[LeaseRecord], recovery_window: float) -> None:
        """Adopt leases a predecessor recorded, as orphans until their holders re-register.

        A lease whose holder is dead is dropped at once. A live holder keeps its lease
        for a grace period (its ttl, or ``recovery_window`` for leases without one) during
        which nothing conflicting is granted; it ends when the holder re-registers (the
        lease is adopted), reconnects without it, or dies.
        """
        now = self._clock()
        used = set()
        for record in records:
            holder = ProcessIdentity(record.pid, record.start_ticks, ProcessIdentity.current().boot)
            if record.mode not in MODE_NAMES or not self._alive(holder):
                self._segment.clear_lease(record.slot)
                _log.info(
                    "dropped lease of dead holder prefix=%s token=%s pid=%s",
                    record.prefix, record.token, record.pid,
                )  # fmt: skip
                continue
            grace = record.ttl if record.ttl > 0 else recovery_window
            entry = Entry(
                owner=None,
                req_id=0,
                prefix=record.prefix,
                prefix_bytes=record.prefix.encode("ascii"),
                mode=record.mode,
                ttl=record.ttl,
                holder=holder,
                client_id=record.client_id,
                token=record.token,
                slot=record.slot,
                granted_at=record.granted_at,
                deadline=now + grace,
            )
            used.add(record.slot)
            state = self._prefix(entry.prefix)
            state.granted.add(entry)
            state.counts[entry.mode] += 1
            self.granted_count += 1
            self._orphans[entry.token] = entry
            heapq.heappush(self._expiry, (entry.deadline, next(self._counter), entry))
            if record.ttl > 0:
                # The holder could not renew while no coordinator ran: give it a full ttl.
                self._segment.set_lease_expiry(record.slot, entry.deadline)
            _log.info(
                "recovered lease prefix=%s mode=%s token=%s pid=%s grace=%.3f",
                entry.prefix, MODE_NAMES[entry.mode], entry.token, record.pid, grace,
            )  # fmt: skip
        self._free_slots = [s for s in range(self._segment.lease_slots) if s not in used]
        heapq.heapify(self._free_slots)

    def load_commits(self, prefixes: list[tuple[int, str, int, int]]) -> None:
        """Adopt the prefix slots (change counters) a predecessor left; waiters restart at 0.

        Called after :meth:`recover`, so that each counter's parity can be made to match the
        write leases recovered.
        """
        for pslot, name, waiters, commit in prefixes:
            state = self._prefix(name)
            state.pslot = pslot
            state.commit = commit
            if waiters:
                self._segment.set_prefix_counters(pslot, state_bytes(name), 0, commit)
        for name, state in self._prefixes.items():
            self._mark_writing(state_bytes(name), state)

    # -- requests --------------------------------------------------------------------

    def _prefix(self, prefix: str) -> _Prefix:
        state = self._prefixes.get(prefix)
        if state is None:
            state = self._prefixes[prefix] = _Prefix()
        return state

    def _requests(self, owner: Hashable) -> dict[int, Entry]:
        # Kept (even empty) until the owner is dropped: no dict churn per acquire.
        requests = self._by_owner.get(owner)
        if requests is None:
            requests = self._by_owner[owner] = {}
        return requests

    def has_request(self, owner: Hashable, req_id: int) -> bool:
        """True if ``owner`` has request ``req_id`` queued or granted."""
        return req_id in self._by_owner.get(owner, ())

    def acquire(self, entry: Entry, nowait: bool) -> bool:
        """Grant or queue ``entry``; with ``nowait``, refuse instead of queueing.

        Returns:
            False if refused because it would have to wait; True otherwise (granted and
            reported in the outbox, refused for a full table and reported, or queued).
        """
        state = self._prefix(entry.prefix)
        if not state.queue and not self._hold_until and _compatible(state.counts, entry.mode):
            requests = self._requests(entry.owner)
            requests[entry.req_id] = entry
            if not self._grant(state, entry):
                del requests[entry.req_id]
            return True
        if nowait:
            return False
        self._requests(entry.owner)[entry.req_id] = entry
        entry.waited = True
        state.queue.append(entry)
        self.queued_count += 1
        self._publish_waiters(entry.prefix, state)
        if len(state.queue) == 1:
            self._tell_blockers(state, entry)
        return True

    def _tell_blockers(self, state: _Prefix, head: Entry) -> None:
        """Tell the holders that keep ``head``, the first request in the queue, waiting, and
        said they may keep their leases parked (see :meth:`parking`): they give them back in
        their turn once told, without polling. Each grant is told once at most, so that a
        holder that never reads its socket (stopped, say) is never sent more than a frame;
        a holder told before looks for later waiters itself. Holders that never park are
        told nothing (a frame they would only skip)."""
        for holder in state.granted:
            if holder.parks and not holder.told and _conflict(holder.mode, head.mode):
                holder.told = True
                self.outbox.append((holder, WANTED))

    def parking(self, owner: Hashable, req_id: int) -> None:
        """The holder of ``owner``'s granted request ``req_id`` may keep it parked: tell it
        when a request waits for it, at once if one does already."""
        entry = self._by_owner.get(owner, {}).get(req_id)
        if entry is None or entry.slot < 0:  # gone, or not granted (a confused client)
            return
        entry.parks = True
        state = self._prefix(entry.prefix)
        if state.queue and not self._hold_until:
            self._tell_blockers(state, state.queue[0])

    def _grant(self, state: _Prefix, entry: Entry) -> bool:
        if not self._free_slots:
            _log.error(
                "lease table full (%s slots) prefix=%s pid=%s: raise LEASE_SLOTS",
                self._segment.lease_slots, entry.prefix, entry.holder.pid,
            )  # fmt: skip
            self.outbox.append((entry, REFUSED_FULL))
            return False
        # The durable ceiling (TokenSource) already keeps a successor above this token;
        # the header's copy is refreshed by the server's periodic tick, not per grant.
        self._add_granted(state, entry, self._tokens.take())
        self.outbox.append((entry, GRANTED))
        return True

    def _add_granted(self, state: _Prefix, entry: Entry, token: int) -> None:
        """Give ``entry`` a slot and ``token``; write it through to shared memory first."""
        now = self._clock()
        entry.slot = heapq.heappop(self._free_slots)
        entry.token = token
        entry.granted_at = now
        entry.deadline = now + entry.ttl if entry.ttl > 0 else 0.0
        self._segment.write_lease(
            entry.slot, entry.prefix_bytes, entry.mode, entry.holder.pid,
            entry.holder.start_ticks, entry.client_id, token, now, entry.deadline, entry.ttl,
        )  # fmt: skip
        state.granted.add(entry)
        state.counts[entry.mode] += 1
        self.granted_count += 1
        self._mark_writing(entry.prefix_bytes, state)
        if entry.deadline:
            heapq.heappush(self._expiry, (entry.deadline, next(self._counter), entry))

    def _drop_granted(self, state: _Prefix, entry: Entry) -> None:
        state.granted.discard(entry)
        state.counts[entry.mode] -= 1
        self.granted_count -= 1
        self._mark_writing(entry.prefix_bytes, state)
        self._segment.clear_lease(entry.slot)
        heapq.heappush(self._free_slots, entry.slot)
        entry.slot = -1

    def _pump(self, prefix: str, state: _Prefix) -> None:
        queue = state.queue
        if not queue or self._hold_until:
            return
        changed = False
        while queue and _compatible(state.counts, queue[0].mode):
            entry = queue.popleft()
            self.queued_count -= 1
            changed = True
            if not self._grant(state, entry):
                self._forget(entry)
        if changed:
            self._publish_waiters(prefix, state)
        if queue:
            self._tell_blockers(state, queue[0])

    def _forget(self, entry: Entry) -> None:
        requests = self._by_owner.get(entry.owner)
        if requests is not None:
            requests.pop(entry.req_id, None)

    def _remove(self, entry: Entry) -> None:
        """Release a granted entry or withdraw a queued one, then serve the queue."""
        state = self._prefixes[entry.prefix]
        if entry.slot >= 0:
            self._drop_granted(state, entry)
        else:
            state.queue.remove(entry)
            self.queued_count -= 1
            self._publish_waiters(entry.prefix, state)
        if entry.owner is None:
            self._orphans.pop(entry.token, None)
        self._pump(entry.prefix, state)

    def release(self, owner: Hashable, req_id: int) -> None:
        """Release (or withdraw, if still queued) request ``req_id`` of ``owner``."""
        requests = self._by_owner.get(owner)
        if requests is None:
            return
        entry = requests.pop(req_id, None)
        if entry is None:
            return  # already expired or never known: releases are idempotent
        self._remove(entry)

    def renew(self, owner: Hashable, req_id: int) -> None:
        """Push back the expiry of a granted ttl lease by its ttl."""
        entry = self._by_owner.get(owner, {}).get(req_id)
        if entry is None or entry.slot < 0 or entry.ttl <= 0:
            return
        entry.deadline = self._clock() + entry.ttl
        self._segment.set_lease_expiry(entry.slot, entry.deadline)
        heapq.heappush(self._expiry, (entry.deadline, next(self._counter), entry))

    def drop_owner(self, owner: Hashable) -> int:
        """Release everything ``owner`` holds or waits for (its connection closed)."""
        requests = self._by_owner.pop(owner, None)
        if not requests:
            return 0
        # Withdraw queued requests first so that releases do not grant them in passing.
        entries = sorted(requests.values(), key=lambda e: e.slot >= 0)
        for entry in entries:
            self._remove(entry)
        return len(entries)

    # -- re-registration after a coordinator switch --------------------------------

    def register(self, entry: Entry, token: int) -> bool:
        """Re-attach a lease its holder held before the previous coordinator died.

        Accepted if it matches an orphan recovered from shared memory with the same holder,
        client, prefix and mode; or, when shared memory was lost (nothing to check it
        against), if it is compatible with everything granted now and grants are still held
        for re-registrations (see :meth:`hold_grants_until`).
        """
        orphan = self._orphans.get(token)
        now = self._clock()
        if orphan is not None:
            if (
                orphan.holder != entry.holder
                or orphan.client_id != entry.client_id
                or orphan.prefix != entry.prefix
                or orphan.mode != entry.mode
            ):
                return False
            del self._orphans[token]
            orphan.owner = entry.owner
            orphan.req_id = entry.req_id
            orphan.ttl = entry.ttl
            orphan.deadline = now + entry.ttl if entry.ttl > 0 else 0.0
            self._segment.set_lease_expiry(orphan.slot, orphan.deadline)
            if orphan.deadline:
                heapq.heappush(self._expiry, (orphan.deadline, next(self._counter), orphan))
            self._requests(entry.owner)[entry.req_id] = orphan
            entry.slot = orphan.slot
            entry.token = token
            return True
        # Only while grants are held: after that, others may have held the prefix since.
        if not self._hold_until or token >= self._tokens.next:
            return False
        state = self._prefix(entry.prefix)
        if not _compatible(state.counts, entry.mode) or not self._free_slots:
            return False
        self._add_granted(state, entry, token)
        self._requests(entry.owner)[entry.req_id] = entry
        return True

    def register_end(self, holder: ProcessIdentity, client_id: int) -> None:
        """Drop orphans of this client that it did not re-register: it no longer holds them."""
        stale = [
            e for e in self._orphans.values() if e.holder == holder and e.client_id == client_id
        ]
        for entry in stale:
            _log.info(
                "dropped unclaimed lease prefix=%s token=%s pid=%s",
                entry.prefix, entry.token, holder.pid,
            )  # fmt: skip
            self._remove(entry)

    # -- time and liveness -----------------------------------------------------------

    def expire(self, now: float) -> list[Hashable]:
        """Fence every lease past its deadline.

        Returns:
            Owners that lost a lease (for logging by the caller).
        """
        losers: list[Hashable] = []
        if self._hold_until and now >= self._hold_until:
            self._hold_until = 0.0
            _log.info("hold on grants over: serving queued requests")
            for prefix, state in list(self._prefixes.items()):
                self._pump(prefix, state)
        while self._expiry and self._expiry[0][0] <= now:
            deadline, _, entry = heapq.heappop(self._expiry)
            if entry.slot < 0 or entry.deadline != deadline:
                continue
            _log.warning(
                "lease expired, token fenced prefix=%s mode=%s token=%s pid=%s",
                entry.prefix, MODE_NAMES[entry.mode], entry.token, entry.holder.pid,
            )  # fmt: skip
            if entry.mode in (WRITE, EXCLUSIVE):
                # Before anyone is granted what it held: the next holder must fence it.
                self._segment.record_expired(entry.token)
            if entry.owner is not None:
                self._forget(entry)
                losers.append(entry.owner)
            self._remove(entry)
        return losers

    def sweep(self) -> None:
        """Release leases whose holder process is gone (and whose connection lingers).

        A connection's EOF normally releases at once; this catches orphans recovered from
        shared memory and connections kept open by a dead holder's forked children.
        """
        dead = {h for h in self.holders() if not self._alive(h)}
        if not dead:
            return
        for state in list(self._prefixes.values()):
            for entry in [e for e in state.granted if e.holder in dead]:
                _log.warning(
                    "holder died, lease reclaimed prefix=%s token=%s pid=%s",
                    entry.prefix, entry.token, entry.holder.pid,
                )  # fmt: skip
                self._forget(entry)
                self._remove(entry)

    # -- commit counters -------------------------------------------------------------

    def publish_commit(self, prefix: str, prefix_bytes: bytes, seq: int) -> None:
        """Announce a commit of ``prefix``: move its counter on.

        The counter of a prefix changes whenever its content may have: it becomes odd when a
        ``write`` or ``exclusive`` lease is granted and even again when the last one goes,
        and moves by two for a publication (``seq`` is not needed for that and is ignored),
        which storage makes for a commit before acknowledging it while a reader follows the
        prefix. So a reader that saw the same even value before may trust that nothing
        changed in between, and a follower the same odd one that no commit was acknowledged.
        """
        state = self._prefix(prefix)
        state.commit += 2
        self._write_prefix(prefix_bytes, state)

    def _mark_writing(self, prefix_bytes: bytes, state: _Prefix) -> None:
        """Keep the counter odd exactly while a write or exclusive lease is granted."""
        writing = bool(state.counts[WRITE] or state.counts[EXCLUSIVE])
        if writing != bool(state.commit & 1):
            state.commit += 1
            self._write_prefix(prefix_bytes, state)

    def _publish_waiters(self, prefix: str, state: _Prefix) -> None:
        self._write_prefix(state_bytes(prefix), state)

    def _write_prefix(self, prefix_bytes: bytes, state: _Prefix) -> None:
        if state.pslot is None:
            state.pslot = self._segment.allocate_prefix(prefix_bytes)
            if state.pslot is None:
                _log.error(
                    "prefix table full (%s slots): counters of prefix=%s not shared",
                    self._segment.prefix_slots, prefix_bytes.decode("ascii"),
                )  # fmt: skip
                return
        self._segment.set_prefix_counters(state.pslot, prefix_bytes, len(state.queue), state.commit)


def state_bytes(prefix: str) -> bytes:
    """Encode a (validated) prefix for the segment."""
    return prefix.encode("ascii")
