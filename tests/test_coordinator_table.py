"""Unit tests of the coordinator's lease policy (``_table``) on a real shared memory segment.

Hypothesis drives random sequences of acquires, releases, disconnects and expiries
against a :class:`LeaseTable` and checks, after every step, that no two incompatible
leases are granted, that queues are strictly FIFO (the head is never grantable, grants
leave in queue order), that tokens only grow, and that the segment shows exactly the
table. The clock is injected, so nothing sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotcopy.coordinator._process import ProcessIdentity
from hotcopy.coordinator._protocol import MODE_CODES
from hotcopy.coordinator._segment import _POSTED, SegmentReader, SegmentWriter
from hotcopy.coordinator._spin import AdaptiveSpin
from hotcopy.coordinator._table import GRANTED, WANTED, Entry, LeaseTable
from hotcopy.coordinator._tokens import TokenSource
from hypothesis import given, settings
from hypothesis import strategies as st

ME = ProcessIdentity.current()
PREFIXES = ("a", "b")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def table_on_shm(tmp_path: Path) -> Iterator[tuple[LeaseTable, SegmentReader, FakeClock]]:
    path = Path(f"/dev/shm/hotcopy-test-{uuid.uuid4().hex}")
    segment = SegmentWriter(path, lease_slots=64, prefix_slots=64)
    reader = SegmentReader(path)
    clock = FakeClock()
    tokens = TokenSource(tmp_path / f"tokens-{uuid.uuid4().hex}", 0)
    try:
        yield LeaseTable(segment, tokens, clock, alive=lambda identity: True), reader, clock
    finally:
        reader.close()
        segment.close()
        os.unlink(path)


def _any(identity: object) -> bool:
    return True


def _entry(owner: int, req_id: int, prefix: str, mode: str, ttl: float = 0.0) -> Entry:
    return Entry(
        owner=owner,
        req_id=req_id,
        prefix=prefix,
        prefix_bytes=prefix.encode(),
        mode=MODE_CODES[mode],
        ttl=ttl,
        holder=ME,
        client_id=owner,
    )


# The compatibility matrix, written out independently of the code under test.
COMPATIBLE = {
    ("read", "read"),
    ("read", "snapshot"),
    ("read", "write"),
    ("snapshot", "snapshot"),
    ("snapshot", "write"),
}
MODE_NAME = {code: name for name, code in MODE_CODES.items()}


def compatible(first: str, second: str) -> bool:
    return (first, second) in COMPATIBLE or (second, first) in COMPATIBLE


class Model:
    """A deliberately naive reference: per prefix, granted requests and a FIFO queue."""

    def __init__(self) -> None:
        self.granted: dict[str, dict[int, tuple[int, str, float]]] = {p: {} for p in PREFIXES}
        self.queue: dict[str, list[tuple[int, int, str, float]]] = {p: [] for p in PREFIXES}
        self.expires: dict[int, float] = {}
        self.parking: set[int] = set()  # granted requests whose holders said they park

    def _fits(self, prefix: str, mode: str) -> bool:
        return all(compatible(mode, m) for _, m, _ in self.granted[prefix].values())

    def _grant(self, prefix: str, req: int, owner: int, mode: str, ttl: float, now: float) -> None:
        self.granted[prefix][req] = (owner, mode, ttl)
        if ttl:
            self.expires[req] = now + ttl

    def _pump(self, prefix: str, now: float) -> None:
        queue = self.queue[prefix]
        while queue and self._fits(prefix, queue[0][2]):
            req, owner, mode, ttl = queue.pop(0)
            self._grant(prefix, req, owner, mode, ttl, now)

    def acquire(self, prefix: str, req: int, owner: int, mode: str, ttl: float, now: float) -> None:
        if not self.queue[prefix] and self._fits(prefix, mode):
            self._grant(prefix, req, owner, mode, ttl, now)
        else:
            self.queue[prefix].append((req, owner, mode, ttl))

    def remove(self, reqs: set[int], now: float) -> None:
        for prefix in PREFIXES:
            for req in reqs:
                self.granted[prefix].pop(req, None)
                self.expires.pop(req, None)
                self.parking.discard(req)
            self.queue[prefix] = [q for q in self.queue[prefix] if q[0] not in reqs]
            self._pump(prefix, now)

    def owned_by(self, owner: int) -> set[int]:
        reqs = {q[0] for p in PREFIXES for q in self.queue[p] if q[1] == owner}
        return reqs | {r for p in PREFIXES for r, g in self.granted[p].items() if g[0] == owner}

    def expire(self, now: float) -> None:
        self.remove({req for req, at in self.expires.items() if at <= now}, now)


def _check(
    table: LeaseTable,
    reader: SegmentReader,
    model: Model,
    last_token: list[int],
    told: dict[int, int],
) -> None:
    """The table matches the model; and every holder that keeps the head of a queue waiting,
    and said it parks, was told so since its grant, once (``told``: request -> token of each
    grant told)."""
    for entry, outcome in table.outbox:
        if outcome == WANTED:
            assert entry.token > 0  # a granted lease
            assert told.get(entry.req_id) != entry.token  # never told twice
            told[entry.req_id] = entry.token
            continue
        assert outcome == GRANTED
        assert entry.token > last_token[0]  # tokens only grow
        last_token[0] = entry.token
    shown = {(r.prefix, r.mode, r.token) for r in reader.leases()}
    expected = set()
    waiters = {name: n for _, name, n, _ in reader.prefixes()}
    for prefix in PREFIXES:
        state = table._prefixes.get(prefix)
        granted = {e.req_id: MODE_NAME[e.mode] for e in state.granted} if state else {}
        queued = [e.req_id for e in state.queue] if state else []
        assert granted == {r: g[1] for r, g in model.granted[prefix].items()}
        assert queued == [q[0] for q in model.queue[prefix]]
        assert waiters.get(prefix, 0) == len(queued)
        if state:
            expected |= {(prefix, e.mode, e.token) for e in state.granted}
            for entry in state.granted:
                head = state.queue[0] if state.queue else None
                blocks = head and not compatible(MODE_NAME[entry.mode], MODE_NAME[head.mode])
                if blocks and entry.req_id in model.parking:
                    assert told.get(entry.req_id) == entry.token, (prefix, entry.req_id)
    assert shown == expected  # the segment shows exactly the table


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.integers(0, 3),
            st.sampled_from(PREFIXES),
            st.sampled_from(sorted(MODE_CODES)),
            st.booleans(),
        ),
        st.tuples(st.just("release"), st.integers(0, 3), st.integers(0, 40)),
        st.tuples(st.just("drop"), st.integers(0, 3)),
        st.tuples(st.just("park"), st.integers(0, 3), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.floats(0.0, 2.0)),
    ),
    max_size=60,
)


@pytest.mark.timeout(30)
def test_the_commit_board_is_memory_of_its_own_made_with_the_segment(tmp_path: Path) -> None:
    """A writer posts each commit on the board, readers read it, through the segment's map:
    the board's pages are allocated when the segment is made, so that a post or a read never
    asks a full /dev/shm for a page (a SIGBUS; a board in a sparse file did that). A post of
    one prefix leaves every other's, and the coordinator's tables, as they were."""
    path = Path(f"/dev/shm/hotcopy-test-{uuid.uuid4().hex}")
    writer = SegmentWriter(path, lease_slots=64, prefix_slots=64)
    try:
        # Pages held before anybody reads: the header's (written) and the board's (one here).
        assert os.stat(path).st_blocks * 512 == 2 * 4096
        table = LeaseTable(writer, TokenSource(tmp_path / "tokens", 0), FakeClock(), alive=_any)
        table.acquire(_entry(0, 1, "p", "write"), nowait=False)
        table.acquire(_entry(0, 2, "q", "write"), nowait=False)
        with SegmentReader(path) as one, SegmentReader(path) as other:
            p_slot, q_slot = one.find_prefix("p"), one.find_prefix("q")
            assert p_slot is not None and q_slot is not None
            # Odd while the prefix's write lease is held: the board is read then.
            counter, posted = one.state_at(p_slot)
            assert counter % 2 == 1 and posted == bytes(16)
            before = other.state_at(q_slot), other.header()
            one.post(p_slot, 7, 12)
            assert other.state_at(p_slot) == (counter, _POSTED.pack(7, 12))
            assert (other.state_at(q_slot), other.header()) == before
            table.release(0, 1)
            assert other.state_at(p_slot) == (counter + 1, b"")  # even: nobody else's posts
    finally:
        writer.close()
        os.unlink(path)


@pytest.mark.timeout(30)
def test_a_segment_whose_board_cannot_be_had_is_made_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/shm too full for the board's pages: the coordinator could not start at all. Its
    segment now has no board: readers read None (they look at the files while a write lease
    is held), a post changes nothing, and a successor adopts the segment as it is."""

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = Path(f"/dev/shm/hotcopy-test-{uuid.uuid4().hex}")
    try:
        with monkeypatch.context() as full:
            full.setattr(os, "posix_fallocate", refuse)
            writer = SegmentWriter(path, lease_slots=64, prefix_slots=64)
        table = LeaseTable(writer, TokenSource(tmp_path / "tokens", 0), FakeClock(), alive=_any)
        table.acquire(_entry(0, 1, "p", "write"), nowait=False)
        with SegmentReader(path) as reader:
            pslot = reader.find_prefix("p")
            assert pslot is not None
            before = reader.header()
            reader.post(pslot, 7, 12)
            counter, posted = reader.state_at(pslot)
            assert counter % 2 == 1 and posted is None and reader.header() == before
        writer.close()
        successor = SegmentWriter(path, lease_slots=64, prefix_slots=64)
        assert successor.recovered
        successor.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_random_operations_match_a_reference_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[object, ...]]
) -> None:
    with table_on_shm(tmp_path_factory.getbasetemp()) as (table, reader, clock):
        model = Model()
        last_token = [0]
        next_req = 0
        told: dict[int, int] = {}
        for op in ops:
            if op[0] == "acquire":
                _, owner, prefix, mode, with_ttl = op
                next_req += 1
                ttl = 1.0 if with_ttl else 0.0
                table.acquire(_entry(owner, next_req, prefix, mode, ttl), nowait=False)  # type: ignore[arg-type]
                model.acquire(prefix, next_req, owner, mode, ttl, clock.now)  # type: ignore[arg-type]
            elif op[0] == "release":
                _, owner, index = op
                owned = sorted(model.owned_by(owner))  # type: ignore[arg-type]
                if owned:
                    req = owned[index % len(owned)]  # type: ignore[operator]
                    table.release(owner, req)
                    model.remove({req}, clock.now)
            elif op[0] == "park":
                _, owner, index = op
                held = sorted(
                    req
                    for prefix in PREFIXES
                    for req, (holder, _, _) in model.granted[prefix].items()
                    if holder == owner
                )
                if held:
                    req = held[index % len(held)]  # type: ignore[operator]
                    table.parking(owner, req)
                    model.parking.add(req)
            elif op[0] == "drop":
                table.drop_owner(op[1])
                model.remove(model.owned_by(op[1]), clock.now)  # type: ignore[arg-type]
            else:
                clock.now += op[1]  # type: ignore[operator]
                table.expire(clock.now)
                model.expire(clock.now)
            _check(table, reader, model, last_token, told)
            table.outbox.clear()


def test_no_starvation_behind_a_queued_writer(tmp_path: Path) -> None:
    with table_on_shm(tmp_path) as (table, _reader, _clock):
        table.acquire(_entry(0, 1, "a", "read"), nowait=False)
        table.acquire(_entry(1, 2, "a", "exclusive"), nowait=False)
        # A compatible read may not overtake the queued exclusive, waiting or not.
        assert not table.acquire(_entry(2, 3, "a", "read"), nowait=True)
        table.acquire(_entry(2, 4, "a", "read"), nowait=False)
        table.outbox.clear()
        table.release(0, 1)
        assert [(e.req_id, o) for e, o in table.outbox] == [(2, GRANTED)]
        table.outbox.clear()
        # Its holder says it parks it: a read waits for it already, so it is told at once.
        table.parking(1, 2)
        assert [(e.req_id, o) for e, o in table.outbox] == [(2, WANTED)]
        table.outbox.clear()
        table.release(1, 2)
        assert [(e.req_id, o) for e, o in table.outbox] == [(4, GRANTED)]


def test_expiry_fences_and_grants_the_next(tmp_path: Path) -> None:
    with table_on_shm(tmp_path) as (table, reader, clock):
        holder = _entry(0, 1, "a", "write", ttl=2.0)
        table.acquire(holder, nowait=False)
        table.acquire(_entry(1, 2, "a", "write"), nowait=False)
        table.outbox.clear()
        assert reader.lease_is_current(holder.slot, holder.token, clock.now)
        clock.now += 1.0
        table.renew(0, 1)  # pushed to now + ttl
        clock.now += 1.5
        table.expire(clock.now)
        assert table.outbox == []
        clock.now += 1.0
        slot, token = holder.slot, holder.token
        table.expire(clock.now)
        assert [(e.req_id, o) for e, o in table.outbox] == [(2, GRANTED)]
        assert not reader.lease_is_current(slot, token, clock.now)


def test_a_blocked_head_blocks_the_whole_queue(tmp_path: Path) -> None:
    with table_on_shm(tmp_path) as (table, _reader, _clock):
        table.acquire(_entry(0, 1, "a", "write"), nowait=False)
        table.acquire(_entry(0, 2, "a", "read"), nowait=False)
        table.acquire(_entry(1, 3, "a", "write"), nowait=False)  # queued: a write is held
        table.acquire(_entry(2, 4, "a", "read"), nowait=False)  # queued behind it
        table.outbox.clear()
        # Releasing the read serves the queue, whose head still cannot go: nobody can.
        table.release(0, 2)
        assert table.outbox == []
        table.release(0, 1)
        assert [e.req_id for e, _ in table.outbox] == [3, 4]


def test_adaptive_spin_backs_off_and_probes() -> None:
    spin = AdaptiveSpin(30e-6)
    assert spin.should_spin()
    spin.report(False)
    # Out of credit: no spinning, except a probe now and then.
    decisions = [spin.should_spin() for _ in range(16)]
    assert decisions == [False] * 15 + [True]
    spin.report(True)
    assert spin.should_spin()
    assert (spin.successes, spin.failures) == (1, 1)
    assert not any(AdaptiveSpin(0.0).should_spin() for _ in range(100))


def test_a_full_prefix_table_is_shown_so_readers_stop_trusting_missing_counters(
    tmp_path: Path,
) -> None:
    """A prefix without a slot reads counter 0, which readers trust as "no writer since
    the segment was made": once a write lease's counter cannot be shared, the segment
    says so and the client answers -1 (look at the files)."""
    with table_on_shm(tmp_path) as (table, reader, _clock):
        for req_id in range(64):  # each prefix keeps its slot after its lease
            table.acquire(_entry(0, req_id + 1, f"p{req_id}", "write"), nowait=False)
            table.release(0, req_id + 1)
        assert not reader.prefix_table_full()
        table.acquire(_entry(0, 100, "one-too-many", "write"), nowait=False)
        assert reader.find_prefix("one-too-many") is None
        assert reader.prefix_table_full()
