"""Coordinator tests: real coordinator processes, real client processes, real shared memory.

Tiers, by marker: unmarked tests talk to a real coordinator from this process;
``multiprocess`` tests add client processes; ``crash`` tests SIGKILL/SIGSTOP holders or
the coordinator and assert recovery. Every test runs in its own ``tmp_path`` repository
and kills every coordinator of that repository on the way out.

Synchronisation is by barriers, pipes, queues and observed state (``wait_for`` polls a
condition with a deadline); nothing sleeps for a fixed time hoping something happened.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import hotcopy.coordinator as hc
import psutil
import pytest
from hotcopy.coordinator import (
    ClientClosed,
    LeaseTimeout,
    ProcessIdentity,
    WouldBlock,
    connect,
    format_status,
    is_alive,
    read_status,
    status_to_json,
)
from hotcopy.coordinator._main import main as coordinator_main
from hotcopy.coordinator._paths import RuntimePaths, unix_address
from hotcopy.coordinator._segment import (
    HEADER_SIZE,
    LEASE_SLOT_SIZE,
    PREFIX_SLOT_SIZE,
    PREFIX_SLOTS,
    SegmentReader,
)

CTX = multiprocessing.get_context("fork")

MODES = ("read", "snapshot", "write", "exclusive")
COMPATIBLE = {
    ("read", "read"),
    ("read", "snapshot"),
    ("read", "write"),
    ("snapshot", "read"),
    ("snapshot", "snapshot"),
    ("snapshot", "write"),
    ("write", "read"),
    ("write", "snapshot"),
}


# -- helpers -------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def coordinator_processes(root: Path) -> list[psutil.Process]:
    """Every coordinator (or candidate) process serving ``root``."""
    real = str(RuntimePaths.for_root(root).root)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if (
            "hotcopy.coordinator" in cmdline
            and real in cmdline
            and proc.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(proc)
    return found


def kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Signal a process we may not be the parent of, and wait until it is gone."""
    identity = ProcessIdentity.of(pid)
    if identity is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    wait_for(lambda: not is_alive(identity), timeout, f"pid {pid} to die")


def coordinator_pid(root: Path) -> int:
    """The pid of the running coordinator (from shared memory), failing if none runs."""
    pid = read_status(str(root)).pid
    assert pid is not None, "no coordinator runs"
    return pid


def _has_waiters(root: Path, prefix: str, count: int) -> bool:
    return read_status(root).waiters.get(prefix) == count


def _has_successor(root: Path, old_pid: int) -> bool:
    return read_status(root).pid not in (None, old_pid)


def _progressed(progress: Any, target: int) -> bool:
    return bool(progress.value >= target)


def reap(procs: list[Any]) -> None:
    """Stop child processes: terminate, grace period, kill; always join."""
    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped child cannot die of SIGTERM
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh repository root whose coordinators are all killed at the end."""
    # The coordinator is started on demand by clients and inherits this environment.
    monkeypatch.setenv("HOTCOPY_COORDINATOR_IDLE_TIMEOUT", "20")
    monkeypatch.setenv("HOTCOPY_COORDINATOR_HANDSHAKE_TIMEOUT", "1")
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "3")
    repo = tmp_path / "repo"
    repo.mkdir()
    paths = RuntimePaths.for_root(repo)
    try:
        yield repo
    finally:
        # Repeat: a candidate started by a client just before the kill may still appear.
        for _ in range(3):
            procs = coordinator_processes(repo)
            if not procs:
                break
            for proc in procs:
                kill_and_wait(proc.pid)
        segment = paths.segment_path()
        if segment is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)


@pytest.fixture
def client(root: Path) -> Iterator[hc.Client]:
    with connect(root) as c:
        yield c


# -- surface and basics ----------------------------------------------------------------------


def test_public_surface_is_pinned() -> None:
    assert hc.__all__ == sorted(hc.__all__)
    assert set(hc.__all__) == {
        "Client",
        "ClientClosed",
        "ClientStatistics",
        "CoordinatorUnavailable",
        "HotcopyError",
        "Lease",
        "LeaseError",
        "LeaseFenced",
        "LeaseMode",
        "LeaseStatus",
        "LeaseTableFull",
        "LeaseTimeout",
        "ProcessIdentity",
        "Status",
        "UnsafePlace",
        "WouldBlock",
        "connect",
        "format_status",
        "is_alive",
        "read_status",
        "status_to_json",
    }
    assert issubclass(hc.LeaseTimeout, TimeoutError)
    assert issubclass(hc.WouldBlock, BlockingIOError)
    assert issubclass(hc.CoordinatorUnavailable, ConnectionError)
    assert issubclass(hc.ClientClosed, hc.LeaseError)
    assert issubclass(hc.UnsafePlace, PermissionError)


@pytest.mark.timeout(30)
def test_lease_basics(client: hc.Client) -> None:
    with client.lease("users", "write", timeout=5.0, ttl=None) as lease:
        assert (lease.prefix, lease.mode) == ("users", "write")
        assert isinstance(lease.token, int) and lease.token > 0
        assert lease.is_current()
        first = lease.token
    assert not lease.is_current()
    lease.release()  # idempotent
    second = client.lease("users", "read")
    assert second.token > first
    second.release()
    stats = client.statistics()
    assert (stats.acquires, stats.releases, stats.leases_held) == (2, 2, 0)
    with pytest.raises(ValueError, match="invalid prefix"):
        client.lease("../etc", "read")
    with pytest.raises(ValueError, match="invalid prefix"):
        client.lease(".hidden", "read")
    with pytest.raises(ValueError, match="invalid lease mode"):
        client.lease("users", "upgrade")
    with pytest.raises(ValueError, match="ttl"):
        client.lease("users", "read", ttl=0)


@pytest.mark.timeout(30)
def test_compatibility_matrix(root: Path) -> None:
    with connect(root) as holder, connect(root) as other:
        for held in MODES:
            for wanted in MODES:
                with holder.lease("matrix", held, timeout=5.0):
                    if (held, wanted) in COMPATIBLE:
                        other.lease_nowait("matrix", wanted).release()
                    else:
                        with pytest.raises(WouldBlock):
                            other.lease_nowait("matrix", wanted)
        # Leases on different prefixes never conflict.
        with holder.lease("a", "exclusive"), other.lease("b", "exclusive"):
            pass
        assert other.statistics().would_block == 16 - len(COMPATIBLE)


@pytest.mark.timeout(30)
def test_a_zero_timeout_tries_once_as_the_file_leases_do(root: Path) -> None:
    """``timeout=0`` grants a free lease and refuses a held one at once (WouldBlock), never
    a LeaseTimeout that came before the coordinator could answer."""
    with connect(root) as holder, connect(root) as other:
        with other.lease("free", "write", timeout=0):
            pass
        with holder.lease("p", "write"), pytest.raises(WouldBlock):
            other.lease("p", "write", timeout=0)
        wait_for(lambda: not read_status(str(root)).waiters, 5.0, "waiters to clear")


@pytest.mark.timeout(30)
def test_timeout_withdraws_the_request(root: Path) -> None:
    with connect(root) as holder, connect(root) as waiter:
        held = holder.lease("p", "exclusive")
        started = time.monotonic()
        with pytest.raises(LeaseTimeout) as info:
            waiter.lease("p", "read", timeout=0.2)
        assert time.monotonic() - started >= 0.2
        assert isinstance(info.value, TimeoutError)
        assert info.value.prefix == "p"  # type: ignore[attr-defined]
        # The withdrawn request neither waits in the queue nor holds anything.
        wait_for(lambda: not read_status(str(root)).waiters, 5.0, "waiters to clear")
        held.release()
        holder.lease_nowait("p", "exclusive").release()
        assert waiter.statistics().timeouts == 1


@pytest.mark.timeout(30)
def test_change_counters_are_odd_exactly_while_a_writer_holds(root: Path) -> None:
    with connect(root) as writer, connect(root) as reader:
        counter_bits = (1 << 56) - 1  # above them: which segment the counter comes from
        assert reader.commit_seq("users") & counter_bits == 0
        seen = []
        for mode in ("write", "exclusive"):
            lease = writer.lease("users", mode)
            seen.append(reader.commit_seq("users"))  # written before the grant is sent
            assert seen[-1] % 2 == 1, (mode, seen)
            lease.release()
            wait_for(lambda: reader.commit_seq("users") % 2 == 0, 5.0, "an even counter")
            seen.append(reader.commit_seq("users"))
        with writer.lease("users", "read"), writer.lease("users", "snapshot"):
            assert reader.commit_seq("users") == seen[-1]  # readers change nothing
        writer.publish_commit("users", 3)  # a change made outside a write lease
        wait_for(lambda: reader.commit_seq("users") != seen[-1], 5.0, "the publication")
        assert reader.commit_seq("users") % 2 == 0
        assert seen == sorted(set(seen))  # every grant and release moved it on
        assert reader.commit_seq("other") & counter_bits == 0


def test_a_counter_read_before_its_prefix_had_a_slot_moves_once_it_has_one(root: Path) -> None:
    """A reader remembers where the search for a prefix without a slot ended, so that it
    need not search at every get; a slot made there for another prefix of the same hash, or
    for this one, must not leave it reading "no writer yet"."""
    start = zlib.crc32(b"users") % PREFIX_SLOTS
    other = next(
        name
        for name in (f"c{i}" for i in itertools.count())
        if zlib.crc32(name.encode()) % PREFIX_SLOTS == start
    )
    counter_bits = (1 << 56) - 1
    with connect(root) as writer, connect(root) as reader:
        assert reader.commit_seq("users") & counter_bits == 0
        with writer.lease(other, "write"):  # takes the slot "users" would have taken
            assert reader.commit_seq(other) % 2 == 1
            assert reader.commit_seq("users") & counter_bits == 0
        with writer.lease("users", "write"):
            assert reader.commit_seq("users") % 2 == 1


@pytest.mark.timeout(30)
def test_close_is_idempotent_and_releases(root: Path) -> None:
    first = connect(root)
    lease = first.lease("p", "write")
    first.close()
    first.close()
    assert first.closed and not lease.is_current()
    with pytest.raises(ClientClosed):
        first.lease("p", "read")
    with connect(root) as second:
        # The close released the write lease on the coordinator too.
        second.lease("p", "write", timeout=5.0).release()


@pytest.mark.timeout(30)
def test_read_status_shows_leases_and_waiters(root: Path) -> None:
    assert read_status(str(root)).pid is None  # nothing started yet: reported, not raised
    with connect(root) as holder, connect(root) as waiter:
        lease = holder.lease("users", "write")
        result: list[hc.Lease] = []
        thread = threading.Thread(
            target=lambda: result.append(waiter.lease("users", "exclusive", timeout=10.0))
        )
        thread.start()
        try:
            status = wait_for(
                lambda: (s := read_status(str(root))).waiters.get("users") == 1 and s,
                5.0,
                "one waiter on users",
            )
            assert status.pid == coordinator_pid(root)
            assert status.uptime is not None and status.uptime >= 0
            assert [(x.prefix, x.mode, x.pid, x.token) for x in status.leases] == [
                ("users", "write", os.getpid(), lease.token)
            ]
            doc = status_to_json(status)
            json.dumps(doc)
            assert doc["coordinator"]["pid"] == status.pid
            assert doc["waiters"] == {"users": 1}
            entry = doc["leases"][0]
            assert {"prefix", "mode", "pid", "age", "token"} <= entry.keys()
            text = format_status(status)
            assert "users" in text and "write" in text and str(lease.token) in text
        finally:
            lease.release()
            thread.join(10.0)
        assert result and result[0].mode == "exclusive"
        result[0].release()


def _holding_child(root: Path, ready: Any) -> None:
    with connect(root) as client:
        client.lease("kept", "write")
        client.lease("torn", "read")
        ready.set()
        threading.Event().wait(60.0)  # stopped, then killed, by the test


@pytest.mark.timeout(60)
def test_status_of_a_coordinator_killed_mid_record_leaves_that_record_out_and_never_raises(
    root: Path,
) -> None:
    """A coordinator SIGKILLed while it rewrote a lease or prefix record leaves its counter odd
    until a successor repairs it. Status, which never starts one, still answers then: the torn
    records are left out (it raised SegmentTorn, and the contention test caught that)."""
    ready = CTX.Event()
    holder = CTX.Process(target=_holding_child, args=(root, ready))
    holder.start()
    try:
        assert ready.wait(20.0), "the holder took no lease"
        os.kill(holder.pid, signal.SIGSTOP)  # it must not start a successor
        kill_and_wait(coordinator_pid(root))
        path = RuntimePaths.for_root(root).segment_path()
        assert path is not None
        with SegmentReader(path) as segment:
            (slot,) = [r.slot for r in segment.leases() if r.prefix == "torn"]
            pslot = segment.find_prefix("kept")  # a write lease's prefix has a counter slot
            assert pslot is not None
            prefix_at = HEADER_SIZE + segment.lease_slots * LEASE_SLOT_SIZE
        with open(path, "r+b") as raw:
            for at in (HEADER_SIZE + slot * LEASE_SLOT_SIZE, prefix_at + pslot * PREFIX_SLOT_SIZE):
                raw.seek(at)
                (seq,) = struct.unpack("<I", raw.read(4))
                raw.seek(at)
                raw.write(struct.pack("<I", seq | 1))  # as if killed mid-write
        status = read_status(str(root))
        assert status.pid is None
        assert [(lease.prefix, lease.mode) for lease in status.leases] == [("kept", "write")]
        header_seq_at = 12  # _HEADER_SEQ_AT of coordinator/_segment.py
        with open(path, "r+b") as raw:  # and its header: nothing of it can be trusted
            raw.seek(header_seq_at)
            (seq,) = struct.unpack("<I", raw.read(4))
            raw.seek(header_seq_at)
            raw.write(struct.pack("<I", seq | 1))
        assert read_status(str(root))[1:] == (None, None, 0, (), {})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGKILL)
        holder.join(10.0)


@pytest.mark.timeout(30)
def test_runtime_files_are_private(client: hc.Client, root: Path) -> None:
    paths = RuntimePaths.for_root(root)
    assert stat.S_IMODE(os.stat(paths.runtime_dir).st_mode) == 0o700
    sock_mode = os.stat(paths.socket).st_mode
    assert stat.S_ISSOCK(sock_mode) and stat.S_IMODE(sock_mode) == 0o600
    segment = paths.segment_path()
    assert segment is not None
    assert stat.S_IMODE(os.stat(segment).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.segment_salt).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.tokens).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.lock).st_mode) == 0o600
    assert str(segment).startswith("/dev/shm/hotcopy-")


@pytest.mark.timeout(30)
def test_process_identity() -> None:
    me = ProcessIdentity.current()
    assert me.pid == os.getpid() and is_alive(me)
    assert not is_alive(ProcessIdentity(me.pid, me.start_ticks + 1, me.boot))
    assert not is_alive(ProcessIdentity(me.pid, me.start_ticks, b"\1" * 16))
    child = CTX.Process(target=os._exit, args=(0,))
    child.start()
    child_identity = ProcessIdentity.of(child.pid)  # type: ignore[arg-type]
    child.join()
    assert child_identity is None or not is_alive(child_identity)


@pytest.mark.timeout(30)
def test_coordinator_exits_when_idle(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTCOPY_COORDINATOR_IDLE_TIMEOUT", "0.3")
    with connect(root) as c:
        c.lease("p", "read").release()
        identity = ProcessIdentity.of(coordinator_pid(root))
    assert identity is not None
    wait_for(lambda: not is_alive(identity), 10.0, "the idle coordinator to exit")
    assert read_status(str(root)).pid is None
    assert not RuntimePaths.for_root(root).socket.exists()
    with connect(root) as again:  # started on demand again
        again.lease("p", "read").release()


@pytest.mark.timeout(60)
def test_coordinator_of_a_deleted_repository_leaves_its_successor_alone(root: Path) -> None:
    with connect(root) as old_client:
        old_client.lease("p", "read").release()
        old_pid = coordinator_pid(root)
    shutil.rmtree(root)  # deleted and recreated at the same path while its coordinator runs
    root.mkdir()
    paths = RuntimePaths.for_root(root)
    with connect(root) as client:
        new_pid = coordinator_pid(root)
        assert new_pid != old_pid
        kill_and_wait(old_pid, signal.SIGTERM)  # a clean exit removes its own files only
        assert paths.socket.exists()
        assert paths.pid.read_text().split() == [str(new_pid)]
        with connect(root) as newcomer:
            newcomer.lease("p", "write").release()
        client.lease("p", "read").release()
    assert coordinator_pid(root) == new_pid


@pytest.mark.timeout(60)
def test_coordinator_of_a_deleted_repository_removes_its_segment(root: Path) -> None:
    with connect(root) as client:
        client.lease("p", "write").release()
        pid = coordinator_pid(root)
        segment = RuntimePaths.for_root(root).segment_path()
    assert segment is not None and segment.exists()
    shutil.rmtree(root)
    root.mkdir()  # for the fixture's clean-up
    kill_and_wait(pid, signal.SIGTERM)
    assert not segment.exists()  # 4.7 MB of /dev/shm nobody could ever use again


# -- multiple processes -------------------------------------------------------------------


def _fifo_child(root: Path, mode: str, name: str, events: Any, go: Any) -> None:
    with connect(root) as client:
        lease = client.lease("fifo", mode, timeout=20.0)
        events.put((name, lease.token))
        go.wait(20.0)
        lease.release()


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_fifo_and_no_starvation(client: hc.Client, root: Path) -> None:
    events = CTX.Queue()
    go = CTX.Event()
    held = client.lease("fifo", "read")
    procs = []
    try:
        # Queue an exclusive request, then a read request behind it.
        for index, (mode, name) in enumerate((("exclusive", "X"), ("read", "R"))):
            proc = CTX.Process(target=_fifo_child, args=(root, mode, name, events, go))
            proc.start()
            procs.append(proc)
            wait_for(
                functools.partial(_has_waiters, root, "fifo", index + 1),
                10.0,
                f"{index + 1} waiters",
            )
        # The read is compatible with the held read, but may not overtake the exclusive.
        with pytest.raises(WouldBlock):
            client.lease_nowait("fifo", "read")
        held.release()
        name, x_token = events.get(timeout=10.0)
        assert name == "X"
        # While X holds exclusive, R still waits.
        status = read_status(str(root))
        assert status.waiters.get("fifo") == 1
        assert [lease.mode for lease in status.leases] == ["exclusive"]
        go.set()
        name, r_token = events.get(timeout=10.0)
        assert name == "R" and r_token > x_token > held.token
        for proc in procs:
            proc.join(10.0)
            assert proc.exitcode == 0
    finally:
        reap(procs)


def _contender(
    root: Path,
    barrier: Any,
    counter: Any,
    marker: str,
    iterations: int,
    results: Any,
    progress: Any,
) -> None:
    overlaps = 0
    not_current = 0
    tokens = []
    with connect(root) as client:
        barrier.wait(30.0)
        for _ in range(iterations):
            with client.lease("shared", "write", timeout=30.0) as lease:
                # Detector 1: an O_EXCL marker file only one holder can create.
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                except FileExistsError:
                    overlaps += 1
                    fd = -1
                # Detector 2: a shared counter that must read 1 inside the lease.
                counter.value += 1
                os.sched_yield()
                if counter.value != 1:
                    overlaps += 1
                if not lease.is_current():
                    not_current += 1
                counter.value -= 1
                tokens.append(lease.token)
                if fd >= 0:
                    os.close(fd)
                    os.unlink(marker)
            with progress.get_lock():
                progress.value += 1
        results.put((os.getpid(), overlaps, not_current, tokens, client.statistics().reconnects))


def _run_contention(
    root: Path,
    processes: int,
    iterations: int,
    during: Callable[[Any, list[Any]], None] | None = None,
) -> list[tuple[int, int, int, list[int], int]]:
    barrier = CTX.Barrier(processes + 1)
    counter = CTX.RawValue("i", 0)
    progress = CTX.Value("i", 0)
    results = CTX.Queue()
    marker = str(root / "overlap.marker")
    procs = [
        CTX.Process(
            target=_contender,
            args=(root, barrier, counter, marker, iterations, results, progress),
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            proc.start()
        barrier.wait(60.0)
        if during is not None:
            during(progress, procs)
        collected: list[tuple[int, int, int, list[int], int]] = []
        deadline = time.monotonic() + 60.0
        while len(collected) < processes:
            with contextlib.suppress(queue.Empty):
                collected.append(results.get(timeout=0.2))
                continue
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"contender processes failed: exit codes {failed}"
            assert time.monotonic() < deadline, "contenders did not finish in time"
        for proc in procs:
            proc.join(10.0)
            assert proc.exitcode == 0
        return collected
    finally:
        reap(procs)


def _check_no_overlap(collected: list[tuple[int, int, int, list[int], int]], total: int) -> None:
    all_tokens: list[int] = []
    for _pid, overlaps, not_current, tokens, _reconnects in collected:
        assert overlaps == 0
        assert not_current == 0
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
        all_tokens.extend(tokens)
    assert len(all_tokens) == total
    assert len(set(all_tokens)) == total  # every grant had its own token


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_eight_processes_never_overlap(root: Path) -> None:
    with connect(root):  # start the coordinator once, up front
        collected = _run_contention(root, 8, 300)
    _check_no_overlap(collected, 8 * 300)


def _holder_child(root: Path, mode: str, ttl: float | None, pipe: Connection) -> None:
    with connect(root) as client:
        lease = client.lease("victim", mode, timeout=20.0, ttl=ttl)
        pipe.send(lease.token)
        while True:  # serve commands from the test until told to stop
            command = pipe.recv()
            if isinstance(command, tuple) and command[0] == "fork":
                # A child that inherits the client (and its socket) and outlives us; it
                # exits when the test closes the pipe it blocks on.
                child = os.fork()
                if child == 0:
                    os.read(command[1], 1)
                    os._exit(0)
                pipe.send(child)
            elif command == "is_current":
                pipe.send(lease.is_current())
            elif command == "release":
                lease.release()
                pipe.send("released")
            elif command == "stop":
                return


def _start_holder(
    root: Path, mode: str = "write", ttl: float | None = None
) -> tuple[Any, Connection, int]:
    ours, theirs = CTX.Pipe()
    proc = CTX.Process(target=_holder_child, args=(root, mode, ttl, theirs))
    proc.start()
    assert ours.poll(20.0), "holder did not report its lease"
    return proc, ours, ours.recv()


def _waiter_thread(
    client: hc.Client, root: Path, granted: list[tuple[float, hc.Lease]]
) -> threading.Thread:
    def wait() -> None:
        lease = client.lease("victim", "write", timeout=20.0)
        granted.append((time.monotonic(), lease))

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: read_status(str(root)).waiters.get("victim") == 1, 10.0, "the waiter to queue")
    return thread


@pytest.mark.crash
@pytest.mark.timeout(60)
@pytest.mark.parametrize("forked_child", [False, True], ids=["plain", "with-forked-child"])
def test_sigkill_of_holder_grants_waiter_within_a_second(
    client: hc.Client, root: Path, forked_child: bool
) -> None:
    release_r, release_w = os.pipe()
    proc, pipe, token = _start_holder(root)
    granted: list[tuple[float, hc.Lease]] = []
    grandchild = 0
    try:
        if forked_child:
            pipe.send(("fork", release_r))
            grandchild = pipe.recv()
        thread = _waiter_thread(client, root, granted)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        thread.join(20.0)
        assert granted, "the waiter was never granted"
        assert granted[0][0] - killed_at < 1.0
        assert granted[0][1].token > token
        granted[0][1].release()
    finally:
        reap([proc])
        os.close(release_w)  # lets the grandchild exit
        os.close(release_r)
        if grandchild:
            kill_and_wait(grandchild)


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_sigstop_of_ttl_holder_fences_its_token(client: hc.Client, root: Path) -> None:
    ttl = 1.5
    proc, pipe, token = _start_holder(root, ttl=ttl)
    granted: list[tuple[float, hc.Lease]] = []
    try:
        # Alive and renewing: the lease outlives several ttls.
        thread = _waiter_thread(client, root, granted)
        pipe.send("is_current")
        assert pipe.recv() is True
        stopped_at = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)
        thread.join(20.0)
        assert granted, "the waiter was never granted"
        # Only after the stop. (Not asserted tighter: on a loaded machine the last
        # renewal may have come well before the stop.)
        assert granted[0][0] >= stopped_at
        assert granted[0][1].token > token
        os.kill(proc.pid, signal.SIGCONT)
        pipe.send("is_current")
        assert pipe.poll(10.0)
        assert pipe.recv() is False  # fenced
        granted[0][1].release()
        pipe.send("stop")
        proc.join(10.0)
        assert proc.exitcode == 0
    finally:
        reap([proc])


def _forked_client_child(client: hc.Client, parent_token: int, pipe: Connection) -> None:
    # The inherited client must not use the parent's socket: it reconnects on its own.
    lease = client.lease("forked", "read", timeout=10.0)
    pipe.send((lease.token > parent_token, client.statistics().leases_held))
    lease.release()
    client.close()


@pytest.mark.multiprocess
@pytest.mark.timeout(30)
def test_fork_aware_client(client: hc.Client, root: Path) -> None:
    parent_lease = client.lease("forked", "write")
    ours, theirs = CTX.Pipe()
    proc = CTX.Process(target=_forked_client_child, args=(client, parent_lease.token, theirs))
    try:
        proc.start()
        assert ours.poll(20.0)
        assert ours.recv() == (True, 1)
        proc.join(10.0)
        assert proc.exitcode == 0
        # The child's close did not touch the parent's connection or lease.
        assert parent_lease.is_current()
        with pytest.raises(WouldBlock):
            client.lease_nowait("forked", "write")
        parent_lease.release()
        client.lease_nowait("forked", "write").release()
    finally:
        reap([proc])


# -- coordinator crashes ------------------------------------------------------------------


@pytest.mark.crash
@pytest.mark.timeout(90)
def test_sigkill_of_coordinator_during_contention_twice(root: Path) -> None:
    processes, iterations = 6, 150

    def kill_twice(progress: Any, procs: list[Any]) -> None:
        for round_ in range(2):
            pid = coordinator_pid(root)
            floor = progress.value
            wait_for(
                functools.partial(_progressed, progress, floor + 30), 30.0, "contention progress"
            )
            kill_and_wait(pid)
            # A successor is started on demand by the clients and serves them.
            wait_for(
                functools.partial(_has_successor, root, pid),
                30.0,
                f"a successor after kill {round_ + 1}",
            )

    with connect(root):
        collected = _run_contention(root, processes, iterations, kill_twice)
    _check_no_overlap(collected, processes * iterations)
    assert sum(reconnects for *_, reconnects in collected) >= processes


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_held_lease_survives_coordinator_death(client: hc.Client, root: Path) -> None:
    proc, pipe, token = _start_holder(root, mode="write")
    try:
        first = coordinator_pid(root)
        kill_and_wait(first)
        # The successor (started by our acquire attempt) must not grant the write while
        # the live holder's lease is recorded: the holder re-registers it.
        with pytest.raises(WouldBlock):
            client.lease_nowait("victim", "write")
        assert coordinator_pid(root) != first
        wait_for(
            lambda: [x.token for x in read_status(str(root)).leases] == [token],
            10.0,
            "the holder's lease in the successor's table",
        )
        pipe.send("is_current")
        assert pipe.recv() is True
        with pytest.raises(WouldBlock):
            client.lease_nowait("victim", "write")
        pipe.send("release")
        assert pipe.recv() == "released"
        lease = client.lease("victim", "write", timeout=10.0)
        assert lease.token > token
        lease.release()
        pipe.send("stop")
        proc.join(10.0)
        assert proc.exitcode == 0
    finally:
        reap([proc])


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_tokens_grow_across_restarts(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "0.2")
    paths = RuntimePaths.for_root(root)
    with connect(root) as c, c.lease("p", "write") as lease:
        first = lease.token
    kill_and_wait(coordinator_pid(root))
    with connect(root) as c:
        second = c.lease("p", "write")
        assert second.token > first
        second.release()
    # Lose /dev/shm entirely: the durable high-water mark in .hotcopy/ still holds.
    kill_and_wait(coordinator_pid(root))
    segment = paths.segment_path()
    assert segment is not None
    os.unlink(segment)
    with connect(root) as c:
        third = c.lease("p", "write")
        assert third.token > second.token
        third.release()


# -- hostile peers ------------------------------------------------------------------------


def _raw_connect(root: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix_address(RuntimePaths.for_root(root).socket) as address:
        sock.connect(address)
    return sock


def _is_dropped(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the coordinator closes ``sock`` within ``timeout`` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.timeout(60)
def test_hostile_input_is_dropped_and_service_goes_on(client: hc.Client, root: Path) -> None:
    pid = coordinator_pid(root)
    hello = struct.pack("<IBHQ", 11, 0x01, 1, 42)
    attacks = {
        "bad hello": struct.pack("<IBHQ", 12, 0x01, 1, 42) + b"\0",
        "wrong version": struct.pack("<IBHQ", 11, 0x01, 99, 42),
        "garbage": b"\xff\xfe\x00GET / HTTP/1.1\r\n\r\n" * 4,
        "oversized": struct.pack("<I", 1 << 30) + b"x" * 16,
        "oversized header only": struct.pack("<I", 1 << 30),
        "zero length": struct.pack("<I", 0) + b"\x01",
        "half message": hello + struct.pack("<IB", 20, 0x02) + b"\x01\x00",
        "silent": b"",
        "request before hello": struct.pack("<IBIBBI", 11 + 1, 0x02, 1, 3, 0, 0) + b"a",
        "unknown type": hello + struct.pack("<IB", 1, 0x7F),
        "bad prefix": hello + struct.pack("<IBIBBI", 11 + 5, 0x02, 1, 3, 0, 0) + b"../x\xff",
        "bad mode": hello + struct.pack("<IBIBBI", 11 + 1, 0x02, 1, 9, 0, 0) + b"a",
    }
    socks = {}
    try:
        for name, payload in attacks.items():
            sock = _raw_connect(root)
            socks[name] = sock
            if payload:
                sock.sendall(payload)
        # While the attackers are connected, service goes on.
        for _ in range(50):
            client.lease("service", "write", timeout=5.0).release()
        for name, sock in socks.items():
            assert _is_dropped(sock), f"{name}: connection not dropped"
        assert coordinator_pid(root) == pid  # no crash, no restart
        with client.lease("service", "exclusive", timeout=5.0) as lease:
            assert lease.is_current()
    finally:
        for sock in socks.values():
            sock.close()


def _other_uid_child(address_path: str, pipe: Connection) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address_path)
    except PermissionError:
        pipe.send("connect refused")
        return
    hello = struct.pack("<IBHQ", 11, 0x01, 1, 42)
    sock.settimeout(10.0)
    try:
        sock.sendall(hello + struct.pack("<IBIBBI", 11 + 1, 0x02, 1, 3, 0, 0) + b"a")
        data = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        data = b""
    pipe.send("dropped" if not data else f"answered {data!r}")


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_peer_of_another_uid_is_refused(client: hc.Client, root: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to switch to another uid")
    paths = RuntimePaths.for_root(root)
    # The path needs to be short and fd-free for a process that drops privileges.
    assert len(str(paths.socket)) < 100

    def attempt() -> str:
        ours, theirs = CTX.Pipe()
        proc = CTX.Process(target=_other_uid_child, args=(str(paths.socket), theirs))
        try:
            proc.start()
            assert ours.poll(20.0), "the other-uid child did not report"
            return str(ours.recv())
        finally:
            reap([proc])

    # First line of defence: the 0700 directory keeps other users from the socket.
    assert attempt() == "connect refused"
    # Second line: even with every permission on the way opened up (a misconfiguration
    # simulated here), SO_PEERCRED refuses the peer.
    opened = [paths.socket, *(d for d in paths.socket.parents if d != Path("/"))]
    saved = {path: stat.S_IMODE(os.stat(path).st_mode) for path in opened}
    try:
        for path, mode in saved.items():
            os.chmod(path, mode | (0o666 if path == paths.socket else 0o011))
        assert attempt() == "dropped"
    finally:
        for path, mode in saved.items():
            os.chmod(path, mode)
    with client.lease("service", "write", timeout=5.0) as lease:
        assert lease.is_current()


# -- more contract ------------------------------------------------------------------------


class _StorageLease(Protocol):
    @property
    def token(self) -> int: ...

    def is_current(self) -> bool: ...

    def release(self) -> None: ...

    def park(self) -> None: ...

    def resume(self) -> bool: ...

    def __enter__(self) -> _StorageLease: ...

    def __exit__(self, *exc: object) -> None: ...


class _StorageLeaseClient(Protocol):
    """What the storage layer needs (checked structurally, as storage will)."""

    def lease(
        self, prefix: str, mode: str, timeout: float | None = None, ttl: float | None = None
    ) -> _StorageLease: ...

    def commit_seq(self, prefix: str) -> int: ...

    def close(self) -> None: ...


@pytest.mark.timeout(30)
def test_client_satisfies_the_storage_protocol(client: hc.Client) -> None:
    provider: _StorageLeaseClient = client  # mypy checks the structure
    with provider.lease("users", "write", timeout=5.0, ttl=None) as lease:
        assert lease.is_current()


@pytest.mark.timeout(30)
def test_ttl_lease_is_renewed_while_its_holder_runs(root: Path) -> None:
    with connect(root) as holder, connect(root) as other:
        lease = holder.lease("p", "write", ttl=0.6)
        # Waiting 1.5 s for it proves it outlived its ttl more than twice.
        with pytest.raises(LeaseTimeout):
            other.lease("p", "write", timeout=1.5)
        assert lease.is_current()
        assert holder.statistics().renewals >= 2
        lease.release()
        other.lease("p", "write", timeout=5.0).release()


@pytest.mark.timeout(30)
def test_lease_table_capacity_is_explicit(client: hc.Client) -> None:
    from hotcopy.coordinator._segment import LEASE_SLOTS

    held = [client.lease_nowait(f"p{i}", "read") for i in range(LEASE_SLOTS)]
    with pytest.raises(hc.LeaseTableFull, match="lease table is full"):
        client.lease_nowait("one-more", "read")
    held.pop().release()
    client.lease_nowait("one-more", "read").release()
    for lease in held:
        lease.release()


@pytest.mark.timeout(30)
def test_main_refuses_a_second_coordinator(
    client: hc.Client, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert coordinator_main([str(root), "--idle-timeout", "1"]) == 1
    assert "another coordinator already serves" in capsys.readouterr().err
    assert coordinator_main([str(root / "missing")]) == 1
    assert "hotcopy: error:" in capsys.readouterr().err
    client.lease("p", "read").release()  # the running one was not disturbed


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_recovery_window_fences_a_holder_that_does_not_come_back(
    client: hc.Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The successor is started by this test's client and inherits a short window.
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "0.5")
    proc, pipe, token = _start_holder(root, mode="write")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        kill_and_wait(coordinator_pid(root))
        started = time.monotonic()
        # Not granted at once (the stopped holder's lease is recorded and it is alive)...
        with pytest.raises(WouldBlock):
            client.lease_nowait("victim", "write")
        # ...but after the recovery window, since the holder never re-registered.
        lease = client.lease("victim", "write", timeout=20.0)
        assert time.monotonic() - started >= 0.4
        assert lease.token > token
        os.kill(proc.pid, signal.SIGCONT)
        pipe.send("is_current")
        assert pipe.poll(10.0)
        assert pipe.recv() is False  # its re-registration is refused: fenced
        lease.release()
    finally:
        reap([proc])


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_lost_shared_memory_after_a_crash_still_excludes(
    client: hc.Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "1.0")
    proc, pipe, token = _start_holder(root, mode="write")
    try:
        kill_and_wait(coordinator_pid(root))
        segment = RuntimePaths.for_root(root).segment_path()
        assert segment is not None
        os.unlink(segment)  # /dev/shm lost with the coordinator
        # The successor knows its predecessor crashed (no clean-shutdown mark) and holds
        # grants until the holder has re-registered its lease.
        with pytest.raises(WouldBlock):
            client.lease_nowait("victim", "write")
        wait_for(
            lambda: [x.token for x in read_status(root).leases] == [token],
            10.0,
            "the holder's re-registered lease",
        )
        with pytest.raises(LeaseTimeout):
            client.lease("victim", "write", timeout=1.5)  # past the hold: the holder's
        pipe.send("is_current")
        assert pipe.recv() is True
        pipe.send("release")
        assert pipe.recv() == "released"
        lease = client.lease("victim", "write", timeout=10.0)
        assert lease.token > token
        lease.release()
    finally:
        reap([proc])


@pytest.mark.crash
@pytest.mark.timeout(60)
def test_lost_shared_memory_after_a_clean_exit_with_a_lease_held_still_excludes(
    client: hc.Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while a client holds a lease: the coordinator exits cleanly and keeps its
    segment for the successor. If the segment goes too (RemoveIPC), the successor knew of no
    crash and granted the same write lease to a second process at once."""
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "3.0")
    proc, pipe, token = _start_holder(root, mode="write")
    holder = psutil.Process(proc.pid)
    try:
        holder.suspend()  # so that it starts no successor before the segment is gone
        wait_for(lambda: holder.status() == psutil.STATUS_STOPPED, 10.0, "the holder's stop")
        coordinator = psutil.Process(coordinator_pid(root))
        coordinator.terminate()
        coordinator.wait(20)
        segment = RuntimePaths.for_root(root).segment_path()
        assert segment is not None
        os.unlink(segment)
        with pytest.raises(WouldBlock):
            client.lease_nowait("victim", "write")
        holder.resume()
        wait_for(
            lambda: [x.token for x in read_status(root).leases] == [token],
            10.0,
            "the holder's re-registered lease",
        )
        pipe.send("is_current")
        assert pipe.recv() is True
    finally:
        with contextlib.suppress(psutil.Error):
            holder.resume()
        reap([proc])


@pytest.mark.timeout(90)
def test_a_publication_while_coordinators_are_killed_again_and_again_raises_only_its_errors(
    root: Path, client: hc.Client
) -> None:
    """A one-way publication (every announced commit sends one) is sent again on the new
    connection after a reconnect; a successor killed just then broke that second send, and
    a raw BrokenPipeError escaped into the committing writer (found by the CI's chaos run)."""
    client.publish_commit("p", 1, wait=True)
    chance = random.Random(7)
    stop = threading.Event()

    def kill_coordinators() -> None:
        # Each successor soon after it starts serving: while clients reconnect to it.
        while not stop.wait(chance.uniform(0.0, 0.05)):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((root / ".hotcopy" / "coordinator.pid").read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_coordinators)
    killer.start()
    published = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.publish_commit("p", 2)
                published += 1
            except hc.CoordinatorUnavailable:
                pass  # the coordinator's own error: what a caller is told to expect
    finally:
        stop.set()
        killer.join()
    assert published


_CLIENT_OF_ANOTHER_VERSION = """
import sys
import hotcopy.coordinator._protocol as protocol
from hotcopy.coordinator import CoordinatorUnavailable, connect
protocol.PROTOCOL_VERSION += 1  # a client of a newer hotcopy, whose protocol changed
try:
    with connect(sys.argv[1]) as client:
        client.lease("p", "read", timeout=5).release()
except CoordinatorUnavailable as err:
    print(err)
    sys.exit(3)
"""


@pytest.mark.timeout(60)
def test_a_client_of_another_protocol_version_is_told_so_instead_of_reconnecting_forever(
    root: Path, client: hc.Client
) -> None:
    """After an upgrade of hotcopy, a running coordinator of the old version drops every
    connection of the new version at its HELLO. The client took each drop for a coordinator's
    death and reconnected at once, forever, at full CPU: every new process hung. It must fail
    with an error that says why, and the coordinator go on serving its own version."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_OF_ANOTHER_VERSION, str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "protocol" in done.stdout and "version" in done.stdout, done.stdout
    with client.lease("p", "read", timeout=5):
        pass
