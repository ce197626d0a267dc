"""A writer stopped (SIGSTOP, a debugger, a VM pause) anywhere inside a commit can neither keep
other writers waiting past its lease TTL nor get a commit acknowledged after theirs.

Real processes, real SIGSTOP/SIGCONT. The oracle is independent of the code under test: every
writer journals (with fsync) each commit it had acknowledged and each it had refused, and at
the end the files must hold every acknowledged commit, none of the refused ones, and commits in
the order of their lease tokens (a stale writer's batch after a newer holder's is what fencing
must prevent)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hotcopy.coordinator import WouldBlock, connect
from hotcopy.coordinator._paths import RuntimePaths
from hotcopy.storage import Repository
from hotcopy.storage import _format as fmt
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = [pytest.mark.multiprocess]

TTL = 2.0
BOUND = TTL + 1.0  # the longest another writer may wait for a stopped one

WRITER = r"""
import json, os, sys
from hotcopy.coordinator import LeaseFenced
from hotcopy.storage import Repository

root, journal, name, checkpoint_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

def note(**entry):
    os.write(fd, (json.dumps(entry) + "\n").encode())
    os.fsync(fd)

with Repository(root, lease_ttl=float(sys.argv[5]), checkpoint_bytes=checkpoint_bytes) as repo:
    px = repo.open_prefix("p", "rw")
    attempt = 0
    while True:
        attempt += 1
        key = f"{name}-{attempt}"
        try:
            px[key] = attempt
            seq = px.commit()
        except LeaseFenced:
            note(fenced=key)
            continue
        note(acked=key, seq=seq)
"""


def _journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def _start_writer(
    root: Path,
    journal: Path,
    env: dict[str, str] | None = None,
    *,
    checkpoint_bytes: int = 64 << 10,
    ttl: float = TTL,
) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(root),
            str(journal),
            "a",
            str(checkpoint_bytes),
            str(ttl),
        ],
        env=full_env,
    )


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # polling a file the child writes; not synchronising with it


def _is_stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def _check_files(root: Path, acked: dict[str, int], fenced: set[str]) -> None:
    """Every acknowledged commit present with its value, no refused one, tokens in order."""
    with Repository(root) as repo:
        px = repo.open_prefix("p")
        for key, seq in acked.items():
            assert key in px, f"acknowledged commit {seq} ({key}) is missing"
        for key in fenced:
            assert key not in px, f"refused commit {key} left a trace"
    tokens = _tokens_in_seq_order(root)
    assert tokens == sorted(tokens), "a commit of an older lease follows a newer one"


def _tokens_in_seq_order(root: Path) -> list[int]:
    """Each commit's lease token, from the main file's segments and then the WAL."""
    found: dict[int, int] = {}
    for path in (root / "p.hc", root / "p.hc-wal"):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, fmt.HEADER_SIZE, 0)
            start = fmt.HEADER_SIZE if raw[:8] in (fmt.MAIN_MAGIC, fmt.WAL_MAGIC) else 0
            reader = fmt.FileReader(fd, start, size)
            while reader.pos < size:
                if fmt.peek_is_trailer(reader):
                    if fmt.read_trailer(reader) is None:
                        break
                    continue
                batch = fmt.read_batch(reader, load_values=False)
                if batch is None:
                    break
                found.setdefault(batch.seq, batch.token)
        finally:
            os.close(fd)
    return [found[seq] for seq in sorted(found)]


OTHER_WRITER = r"""
import json, sys, time
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[3]), lease_timeout=60) as repo:
    px = repo.open_prefix("p", "rw")
    began = time.monotonic()
    px[sys.argv[2]] = sys.argv[2]
    seq = px.commit()
    print(json.dumps({"seq": seq, "waited": time.monotonic() - began}))
"""


def _commit_as_other_writer(root: Path, key: str) -> tuple[int, float]:
    """Commit ``key`` from another process; its commit's sequence and how long it took."""
    try:
        result = h.run_python(OTHER_WRITER, str(root), key, str(TTL), timeout=BOUND + 10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"another writer was blocked for over {BOUND + 10} s") from None
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    return outcome["seq"], outcome["waited"]


def _outcomes(entries: list[dict[str, Any]]) -> tuple[dict[str, int], set[str]]:
    acked = {entry["acked"]: entry["seq"] for entry in entries if "acked" in entry}
    fenced = {entry["fenced"] for entry in entries if "fenced" in entry}
    return acked, fenced


@pytest.mark.timeout(400)
def test_a_writer_stopped_at_random_instants_neither_blocks_nor_commits_late(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    journal = tmp_path / "a.journal"
    rng = random.Random(13)
    writer = _start_writer(root, journal)
    other_acked: dict[str, int] = {}
    waits = []
    try:
        _wait_for(lambda: len(_journal(journal)) >= 3, 30, "the writer's first commits")
        for i in range(30):
            time.sleep(rng.uniform(0, 0.02))  # a random instant of the writer's loop
            os.kill(writer.pid, signal.SIGSTOP)
            _wait_for(lambda: _is_stopped(writer.pid), 10, "the stop")
            done = len(_journal(journal))
            seq, waited = _commit_as_other_writer(root, f"b-{i}")
            other_acked[f"b-{i}"] = seq
            waits.append(waited)
            os.kill(writer.pid, signal.SIGCONT)
            _wait_for(lambda n=done: len(_journal(journal)) >= n + 2, 30, "the writer going on")
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
        h.reap_popen(writer)
    assert max(waits) < BOUND, f"another writer waited {max(waits):.2f} s (bound {BOUND} s)"
    acked, fenced = _outcomes(_journal(journal))
    _check_files(root, acked | other_acked, fenced)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["commit:after-wal-write", "commit:after-wal-fsync"])
def test_a_writer_stopped_just_before_or_after_its_fdatasync_is_fenced(
    tmp_path: Path, point: str
) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    journal = tmp_path / "a.journal"
    env = {"HOTCOPY_FAULT": point, "HOTCOPY_FAULT_AFTER": "5", "HOTCOPY_FAULT_SIGNAL": "STOP"}
    writer = _start_writer(root, journal, env)
    try:
        _wait_for(lambda: _is_stopped(writer.pid), 30, "the writer stopping itself")
        done = len(_journal(journal))
        assert done == 4
        seq, waited = _commit_as_other_writer(root, "b")
        assert waited < BOUND, f"waited {waited:.2f} s"
        os.kill(writer.pid, signal.SIGCONT)
        _wait_for(lambda: len(_journal(journal)) >= done + 2, 30, "the writer going on")
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
        h.reap_popen(writer)
    entries = _journal(journal)
    straddling = entries[4]
    if "acked" in straddling:
        assert straddling["seq"] < seq, "the stopped writer's commit was ordered after"
    else:
        assert straddling == {"fenced": "a-5"}
    acked, fenced = _outcomes(entries)
    _check_files(root, acked | {"b": seq}, fenced)


def _crash_losing_shared_memory(root: Path) -> None:
    """The coordinator SIGKILLed and its segment removed (systemd-logind's RemoveIPC)."""
    coordinator = psutil.Process(int((root / ".hotcopy" / "coordinator.pid").read_text()))
    coordinator.kill()
    coordinator.wait(20)
    segment = RuntimePaths.for_root(root).segment_path()
    assert segment is not None
    segment.unlink()


def _expiry_recorded(root: Path) -> bool:
    with connect(root) as client:
        return client.expired_token() > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("point", "ending"),
    [
        ("commit:before-wal-write", "crash"),
        ("commit:after-wal-write", "crash"),
        ("commit:before-wal-write", "clean exit after the expiry"),
        ("commit:before-wal-write", "clean exit after the expiry, by the previous release"),
    ],
)
def test_a_writer_stopped_across_a_coordinator_restart_that_lost_shared_memory_is_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, ending: str
) -> None:
    """A writer stopped inside a commit, then the coordinator's shared memory lost: the
    successor knew of no lease and no expiry, and the writer, resumed, still read its lease
    as current in the old segment. Crashed (its segment removed): after its recovery window
    the successor granted the prefix to another writer, which did not fence, and the stopped
    writer wrote its batch where that writer's acknowledged commit was. Exited cleanly, with
    the stopped writer's lease expired and so nothing granted: the segment went, and the
    expiry with it; the same followed. The previous release kept no expiry in its tokens file
    and called every SIGTERM clean: upgraded, a coordinator believed both."""
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "0.5")  # for the successor
    root = tmp_path / "repo"
    Repository.init(root).close()
    journal = tmp_path / "a.journal"
    env = {"HOTCOPY_FAULT": point, "HOTCOPY_FAULT_AFTER": "5", "HOTCOPY_FAULT_SIGNAL": "STOP"}
    crash = ending == "crash"
    writer = _start_writer(root, journal, env, ttl=60.0 if crash else TTL)  # 60: outlives it
    try:
        _wait_for(lambda: _is_stopped(writer.pid), 30, "the writer stopping itself")
        assert len(_journal(journal)) == 4
        if crash:
            _crash_losing_shared_memory(root)
        else:
            _wait_for(lambda: _expiry_recorded(root), BOUND + 5, "the writer's lease to expire")
            coordinator = psutil.Process(int((root / ".hotcopy" / "coordinator.pid").read_text()))
            coordinator.terminate()
            coordinator.wait(20)
            if ending.endswith("by the previous release"):
                tokens = root / ".hotcopy" / "tokens"
                _magic, ceiling, flags, _expired = struct.unpack("<8sQQQ", tokens.read_bytes())
                tokens.write_bytes(struct.pack("<8sQQ", b"HCTOKEN2", ceiling, flags))
        seq, _ = _commit_as_other_writer(root, "b")  # starts the successor
        os.kill(writer.pid, signal.SIGCONT)
        _wait_for(lambda: len(_journal(journal)) >= 6, 30, "the writer going on")
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
        h.reap_popen(writer)
    acked, fenced = _outcomes(_journal(journal))
    _check_files(root, acked | {"b": seq}, fenced)


IN_A_TRANSACTION = r"""
import sys
from hotcopy.coordinator import LeaseFenced
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[2])) as repo:
    px = repo.open_prefix("p", "rw")
    for line in sys.stdin:  # the parent paces us
        if line == "begin\n":
            px.begin()  # the write lease taken now and held
            px["a"] = 1
            print("begun", flush=True)
            continue
        try:
            print(px.commit(), flush=True)
        except LeaseFenced:
            print("fenced", flush=True)
"""


def _granted_now(client: Any, prefix: str) -> bool:
    try:
        client.lease_nowait(prefix, "write").release()
    except WouldBlock:
        return False
    return True


@pytest.mark.timeout(120)
def test_a_lease_that_expired_while_its_holder_was_stopped_is_not_registered_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder stopped in a transaction, its lease expired and another writer fenced it and
    committed; then the coordinator crashed and its segment was removed. Resumed, the stopped
    holder's client re-registered the expired lease with the successor, which could not tell
    and accepted it during its recovery hold: the holder's commit was acknowledged into the
    WAL the other writer's fence had replaced, and was not in the prefix."""
    monkeypatch.setenv("HOTCOPY_COORDINATOR_RECOVERY_WINDOW", "2.0")  # for the successor
    root = tmp_path / "repo"
    Repository.init(root).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", IN_A_TRANSACTION, str(root), str(TTL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        holder.stdin.write("begin\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "begun"
        os.kill(holder.pid, signal.SIGSTOP)
        _wait_for(lambda: _is_stopped(holder.pid), 10, "the holder's stop")
        _wait_for(lambda: _expiry_recorded(root), BOUND + 5, "the holder's lease to expire")
        seq, _ = _commit_as_other_writer(root, "b")
        _crash_losing_shared_memory(root)
        os.kill(holder.pid, signal.SIGCONT)  # its client reconnects, starting a successor
        with connect(root) as client:
            _wait_for(lambda: _granted_now(client, "q"), 30, "the successor's hold to end")
        holder.stdin.write("commit\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "fenced"
    finally:
        holder.stdin.close()
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        h.reap_popen(holder)
        holder.stdout.close()
    _check_files(root, {"b": seq}, {"a"})


# -- the fence's bookkeeping ---------------------------------------------------------------


def _fenced_through(root: Path) -> int:
    return fmt.unpack_wal_header((root / "p.hc-wal").read_bytes()[: fmt.HEADER_SIZE]).fenced_through


@pytest.mark.timeout(60)
def test_a_fence_records_its_own_grant_not_the_expiry_it_was_told_of(tmp_path: Path) -> None:
    """Whatever ``expired_token`` said (even "unknown", which reads as more than any token),
    a fence vouches for the leases granted before its own, and the next expiry of any lease
    granted since makes the next holder fence again."""
    from hotcopy.storage._log import Log

    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        with repo.open_prefix("p", "rw") as px:
            px["a"] = 1
            px.commit()
        log = Log(root, "p", repo.id_bytes, writable=True)
        try:
            with repo.leases.lease("p", "write", timeout=5) as lease:
                log.prepare(lease, 1 << 62)  # an expiry it cannot tell: fence
                assert _fenced_through(root) == lease.token - 1
                first = lease.token
            wal_before = (root / "p.hc-wal").stat().st_ino
            with repo.leases.lease("p", "write", timeout=5) as lease:
                log.prepare(lease, first - 1)  # nothing expired since that fence
                assert (root / "p.hc-wal").stat().st_ino == wal_before
                log.prepare(lease, first)  # the fencer's own lease expired: fence again
                assert (root / "p.hc-wal").stat().st_ino != wal_before
                assert _fenced_through(root) == lease.token - 1
        finally:
            log.close()


READER = r"""
import sys
from hotcopy.storage import Repository

with Repository(sys.argv[1]) as repo:
    for _ in range(int(sys.argv[2])):
        repo.open_prefix("p", "r").close()
print("ok")
"""


@pytest.mark.timeout(120)
def test_opening_while_a_writer_appends_never_reports_damage(tmp_path: Path) -> None:
    """An opener without the lease reads the WAL while a writer appends to it: a batch it saw
    half-written, with a whole one after it by the time it looks again, is a write in
    progress, not damage."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    journal = tmp_path / "a.journal"
    writer = _start_writer(root, journal)  # checkpoints every 64 KiB: main and WAL both move
    try:
        _wait_for(lambda: len(_journal(journal)) >= 5, 30, "the writer's first commits")
        result = h.run_python(READER, str(root), "150", timeout=100)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    finally:
        h.reap_popen(writer)
