"""Storage on the coordinator's leases: fencing of a stopped writer, readers on the shared
commit counters, and the status and coordinator commands."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hotcopy.coordinator import Client, LeaseTimeout, _client, connect
from hotcopy.coordinator._paths import RuntimePaths
from hotcopy.coordinator._segment import PREFIX_SLOTS, SegmentReader
from hotcopy.coordinator._status import read_status
from hotcopy.storage import FileLeases, Prefix, Repository, _leases
from hotcopy.workers import main
from hotcopy_test_support import storage_helpers

h = storage_helpers()

FENCED_WRITER = r"""
import sys
from hotcopy.coordinator import LeaseFenced
from hotcopy.storage import FileLeases, Repository

repo = Repository(sys.argv[1], lease_ttl=1.0)
px = repo.open_prefix("p", "rw")
px.begin()
px["stale"] = 1
print("holding", flush=True)
sys.stdin.readline()  # the parent stops us here, lets another writer commit, continues us
try:
    px.commit()
    print("committed", flush=True)
except LeaseFenced:
    print("fenced", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_stopped_writer_loses_its_lease_after_the_ttl_and_its_commit_is_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    child = subprocess.Popen(
        [sys.executable, "-c", FENCED_WRITER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "holding"
        os.kill(child.pid, signal.SIGSTOP)
        with Repository(root, lease_timeout=20) as repo:
            px = repo.open_prefix("p", "rw")
            began = time.monotonic()
            px["fresh"] = 2  # waits until the stopped holder's lease expires
            px.commit()
            assert time.monotonic() - began < 15
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "fenced"
        with Repository(root) as repo:
            px = repo.open_prefix("p")
            assert px.get("fresh") == 2 and "stale" not in px and px.seq == 1
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)  # never leave a stopped process behind
            child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.timeout(60)
def test_readers_follow_commits_through_the_shared_counter(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with Repository.init(root) as writer_repo, Repository(root) as reader_repo:
        writer = writer_repo.open_prefix("p", "rw")
        reader = reader_repo.open_prefix("p")
        assert isinstance(reader_repo.leases, Client)
        assert "k" not in reader
        writer["k"] = 1
        writer.commit()
        # The writer keeps its lease parked for its next commit: the counter stays odd, and
        # the commit board shows the commit, so the reader looks at the files and sees it.
        assert reader_repo.leases.commit_seq("p") % 2 == 1
        assert reader["k"] == 1
        old = tmp_path / "old.hc"
        writer["k"] = 2
        writer.commit()
        writer.checkpoint()
        shutil.copy(root / "p.hc", old)
        writer["k"] = 3
        writer.commit()
        writer.checkpoint()
        assert reader["k"] == 3
        # Unused, the parked lease goes back soon; with an even counter unchanged since its
        # last look, the reader trusts its view and touches no file: a replacement of the
        # main file by hand (outside the protocol) is not noticed ...
        deadline = time.monotonic() + 10
        while reader_repo.leases.commit_seq("p") % 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert reader_repo.leases.commit_seq("p") % 2 == 0
        assert reader["k"] == 3
        shutil.copy(old, tmp_path / "staged.hc")
        os.replace(tmp_path / "staged.hc", root / "p.hc")
        assert reader["k"] == 3
        # ... while a restore through the protocol (an exclusive lease) moves the counter on,
        # and the reader follows at once.
        writer_repo.restore_prefix(old, "p", force=True)
        assert reader["k"] == 2


@pytest.mark.timeout(60)
def test_a_reader_trusts_the_counter_of_a_prefix_no_writer_leased_since_the_coordinator_began(
    tmp_path: Path,
) -> None:
    """Counter 0 (the prefix has no slot yet: no write lease since the segment was made,
    as for every prefix after a reboot) is as good as any even counter: the reader touches
    no file per get. It looked at the files on every get, 40 % of a get's time."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    with Repository(root, leases=FileLeases(root / ".hotcopy")) as embedded:  # no counters
        prefix = embedded.open_prefix("p", "rw")
        prefix["k"] = 1
        prefix.commit()
        prefix.checkpoint()
        shutil.copy(root / "p.hc", tmp_path / "old.hc")
        prefix["k"] = 2
        prefix.commit()
        prefix.checkpoint()
        prefix.close()
    with Repository(root) as reader_repo:
        reader = reader_repo.open_prefix("p")
        assert isinstance(reader_repo.leases, Client)
        assert reader["k"] == 2
        assert reader_repo.leases.commit_seq("p") % (1 << 56) == 0  # no slot: counter 0
        # A replacement by hand (outside the protocol) shows whether the reader looks.
        os.replace(root / "p.hc", tmp_path / "new.hc")
        os.replace(tmp_path / "old.hc", root / "p.hc")
        assert reader["k"] == 2
        os.replace(tmp_path / "new.hc", root / "p.hc")
        # A writer through the coordinator moves the counter: the reader follows at once.
        with Repository(root) as writer_repo:
            writer = writer_repo.open_prefix("p", "rw")
            writer["k"] = 3
            writer.commit()
            assert reader["k"] == 3


_COMMIT_THROUGH_A_NEW_COORDINATOR = """
import sys
from hotcopy.storage import Repository
with Repository(sys.argv[1]) as repo:
    for name in sys.argv[2:]:
        prefix = repo.open_prefix(name, "rw")
        prefix["k"] = 2
        prefix.commit()
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_reader_sees_commits_made_through_the_successor_of_a_coordinator_that_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator that exits cleanly removes its segment; a reader that asks nothing of
    the coordinator keeps reading that segment's frozen counters. It must not take them for
    "no change" (found by an attack: both prefixes were read stale, for up to a second)."""
    # The reader's periodic full look would hide the stale counters if the writer below took
    # more than its period to start: push it out of the test's reach.
    monkeypatch.setattr(_leases, "TRUST_COUNTER_FOR", 600.0)
    root = tmp_path / "repo"
    Repository.init(root).close()
    with Repository(root, leases=FileLeases(root / ".hotcopy")) as embedded:
        for name in ("slotless", "slotted"):
            prefix = embedded.open_prefix(name, "rw")
            prefix["k"] = 1
            prefix.commit()
            prefix.close()
    with Repository(root) as writer_repo, writer_repo.open_prefix("slotted", "rw") as prefix:
        prefix["k"] = 1  # through the coordinator: the prefix gets a slot
        prefix.commit()
    with Repository(root) as reader_repo:  # reads only: it never talks to the coordinator
        readers = {name: reader_repo.open_prefix(name) for name in ("slotless", "slotted")}
        assert {name: view["k"] for name, view in readers.items()} == {
            "slotless": 1,
            "slotted": 1,
        }
        pid = int((root / ".hotcopy" / "coordinator.pid").read_text())
        coordinator = psutil.Process(pid)
        coordinator.terminate()
        coordinator.wait(20)
        subprocess.run(
            [sys.executable, "-c", _COMMIT_THROUGH_A_NEW_COORDINATOR, str(root), *readers],
            check=True,
            timeout=60,
        )
        assert {name: view["k"] for name, view in readers.items()} == {
            "slotless": 2,
            "slotted": 2,
        }


@pytest.mark.timeout(60)
def test_a_view_closed_after_its_repository_skips_the_checkpoint_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint a closing writer takes is optional: with its lease provider closed
    (the repository closed first, or a view collected at exit) it is skipped, not warned of.
    Found by an attack: 'checkpoint at close skipped ... the client is closed'."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    repo = Repository(root)
    view = repo.open_view("p", "rw")
    for i in range(100):
        view[f"k{i}"] = "x" * 1000
        view.commit()
    repo.close()
    with caplog.at_level(logging.WARNING, logger="hotcopy"):
        view.close()
    assert view.closed
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    with Repository(root) as again:
        assert again.open_prefix("p")["k99"] == "x" * 1000


@pytest.mark.timeout(60)
def test_status_shows_the_coordinator_and_a_held_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    with connect(root) as client, client.lease("users", "write") as lease:
        assert main(["status", str(root), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["coordinator"]["pid"] is not None
        held = [entry for entry in status["leases"] if entry["prefix"] == "users"]
        assert held and held[0]["mode"] == "write" and held[0]["token"] == lease.token
        assert held[0]["pid"] == os.getpid()
        assert main(["status", str(root)]) == 0
        table = capsys.readouterr().out
        assert "users" in table and "write" in table
    assert main(["status", str(tmp_path / "nothing")]) == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_the_coordinator_command_serves_in_the_foreground(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    # Created with kernel file locks, so that no coordinator is started on demand first.
    Repository.init(root, leases=FileLeases(root / ".hotcopy")).close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotcopy.workers", "coordinator", str(root), "--idle-timeout", "30"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # its log goes to stderr in the foreground
            if "coordinator serving" in line:
                break
        else:
            raise AssertionError(f"the coordinator exited with {proc.wait()}")
        with connect(root) as client, client.lease("p", "read") as lease:
            status = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "hotcopy.workers", "status", str(root), "--json"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            assert status["coordinator"]["pid"] == proc.pid
            assert [entry["token"] for entry in status["leases"]] == [lease.token]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


STEPPED_WRITER = r"""
import sys
from hotcopy.coordinator import _client
from hotcopy.storage import Repository, _leases

if len(sys.argv) > 2:  # how long readers trust a segment unlooked at, and a writer may wait
    _client._SEGMENT_RECHECK = _leases.TRUST_COUNTER_FOR = float(sys.argv[2])
with Repository(sys.argv[1]) as repo:
    px = repo.open_prefix("p", "rw")
    for line in sys.stdin:  # the parent paces us, a line at a time
        if line == "begin\n":
            px.begin()  # the write lease taken now and held, as in a long transaction
            print("begun", flush=True)
            continue
        px["n"] = px.get("n", 0) + 1
        print(px.commit(), flush=True)  # acknowledged: the parent may look for it now
"""


@contextlib.contextmanager
def _stepped_writer(root: Path, *args: str) -> Iterator[Callable[..., str]]:
    """A writer process that does what it is told when called: "commit" (the call returns the
    commit's sequence number once it is acknowledged) or "begin" (a transaction)."""
    child = subprocess.Popen(
        [sys.executable, "-c", STEPPED_WRITER, str(root), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    def step(order: str = "commit") -> str:
        stdin.write(order + "\n")
        stdin.flush()
        return stdout.readline().strip()

    try:
        yield step
    finally:
        stdin.close()  # the writer's loop ends
        try:
            child.wait(timeout=30)
        finally:
            child.kill()
            child.wait()
            stdout.close()


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_reader_beside_a_writer_that_keeps_its_lease_looks_at_the_files_once_per_commit(
    tmp_path: Path,
) -> None:
    """A writer keeps its lease parked between commits, so the counter stays odd. It used to
    tell readers "look at the files at every get" (a third of the gets a reader made beside a
    working writer); now the writer posts every commit on the commit board before it is
    acknowledged, and an unchanged counter and board mean nothing new, odd or not."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    with _stepped_writer(root) as commit, Repository(root) as repo:
        reader = None
        gets = looks = 0
        for number in range(1, 41):
            assert int(commit()) == number
            reader = reader or repo.open_prefix("p")
            before = h.io_count("syscr")
            assert reader["n"] == number  # every acknowledged commit, at once
            for _ in range(200):
                assert reader["n"] == number
            looks += h.io_count("syscr") - before - 1
            gets += 201
        assert repo.leases.commit_seq("p") % 2 == 1  # the lease stayed parked throughout
    # A read of the WAL per get before; now a few per commit.
    assert looks < gets // 10, (looks, gets)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_every_acknowledged_commit_is_seen_at_once_while_the_coordinator_is_stopped_or_killed(
    tmp_path: Path,
) -> None:
    """A stopped or dead coordinator's counters stand still, and a successor may map a new
    segment: the writer's posts on the commit board must still reach every reader. A reader
    told of each acknowledgement must see it."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    stopped = None
    try:
        with _stepped_writer(root) as commit, Repository(root) as repo:
            reader = None
            for number in range(1, 301):
                assert int(commit()) == number
                reader = reader or repo.open_prefix("p")
                assert reader["n"] == number
                if number == 200:
                    pid = int((root / ".hotcopy" / "coordinator.pid").read_text())
                    stopped = psutil.Process(pid)
                    stopped.suspend()
                elif number == 203:
                    stopped.kill()  # a successor takes over
                    stopped.wait(20)
                    stopped = None
    finally:
        if stopped is not None:
            stopped.kill()


@pytest.mark.timeout(60)
def test_a_writer_posts_its_commits_for_readers_without_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer keeping its lease, with a reader following the prefix, announced every commit
    to the coordinator: a message, and the coordinator woken, per commit (a fifth of the
    writer's rate, and a core shared with the reader). It now posts each commit on the
    prefix's board in ``locks/``, which the reader reads; the counter moves with the lease
    only."""
    monkeypatch.setattr(_client, "_PARK_IDLE", 600.0)  # the lease stays parked: no release
    root = tmp_path / "repo"
    with Repository.init(root) as writer_repo, Repository(root) as reader_repo:
        assert isinstance(reader_repo.leases, Client)
        writer = writer_repo.open_prefix("p", "rw")
        writer["k"] = 0
        writer.commit()
        reader = reader_repo.open_prefix("p")
        assert reader["k"] == 0
        counter = reader_repo.leases.commit_seq("p")
        assert counter % 2 == 1  # the writer keeps its lease
        for number in range(1, 4):
            writer["k"] = writer["k"] + 1  # its own reads see its own lease
            writer.commit()
            assert reader["k"] == number  # every acknowledged commit, at once
        assert reader_repo.leases.commit_seq("p") == counter


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_writer_keeping_its_lease_commits_at_once_while_the_coordinator_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer followed by a reader waited for the coordinator to confirm each commit's
    announcement; with the coordinator stopped, until readers would look at the files anyway
    (``TRUST_COUNTER_FOR``, made longer than this test here). A commit posted on the board
    waits for nobody, and the reader sees it at once."""
    monkeypatch.setattr(_client, "_PARK_IDLE", 600.0)
    monkeypatch.setattr(_leases, "TRUST_COUNTER_FOR", 600.0)
    root = tmp_path / "repo"
    with Repository.init(root) as writer_repo, Repository(root) as reader_repo:
        writer = writer_repo.open_prefix("p", "rw")
        writer["k"] = 0
        writer.commit()
        reader = reader_repo.open_prefix("p")
        assert reader["k"] == 0
        coordinator = psutil.Process(int((root / ".hotcopy" / "coordinator.pid").read_text()))
        coordinator.suspend()
        try:
            for number in range(1, 6):
                writer["k"] = number
                writer.commit()
                assert reader["k"] == number
        finally:
            coordinator.resume()


@pytest.mark.timeout(120)
def test_a_writer_of_a_prefix_without_a_counter_slot_waits_for_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the coordinator's prefix table is full, a new prefix has no counter and no place
    on the board: its readers look at the files at every get, so its writer has nothing to
    post and must not wait (it waited TRUST_COUNTER_FOR at every commit, with a warning)."""
    monkeypatch.setattr(_leases, "TRUST_COUNTER_FOR", 600.0)
    root = tmp_path / "repo"
    with Repository.init(root) as writer_repo, Repository(root) as reader_repo:
        filler = writer_repo.leases
        assert isinstance(filler, Client)
        for number in range(PREFIX_SLOTS):  # each prefix keeps its slot after its lease
            filler.lease(f"fill-{number}", "write").release()
        writer = writer_repo.open_prefix("p", "rw")
        reader = reader_repo.open_prefix("p")
        for number in range(3):
            writer["k"] = number
            writer.commit()
            seq = reader_repo.leases.commit_seq("p")
            # no slot: "look at the files" (failed once in CI, not reproduced: say what was seen)
            assert seq == -1, _segment_as_seen_afresh(root, seq)
            assert reader["k"] == number


def _segment_as_seen_afresh(root: Path, seq: int) -> str:
    path = RuntimePaths.for_root(root).segment_path()
    assert path is not None
    with SegmentReader(path) as segment:
        return (
            f"commit_seq {seq:#x}; a fresh map of {path} (inode {os.stat(path).st_ino}): "
            f"table full {segment.prefix_table_full()}, slot of p {segment.find_prefix('p')}, "
            f"coordinator {segment.coordinator_pid()}, pid file "
            f"{(root / '.hotcopy' / 'coordinator.pid').read_text().strip()!r}"
        )


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_reader_moves_to_a_successors_segment_when_its_own_was_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment removed under a live coordinator (systemd-logind's RemoveIPC removes a
    user's /dev/shm files at logout), then the coordinator killed: its successor makes a new
    segment. A reader that never reconnects read the dead one's frozen counters for good,
    stale at every look by up to TRUST_COUNTER_FOR. It looks for a new segment every
    ``_SEGMENT_RECHECK`` seconds (here at every get), as a writer does before every post."""
    monkeypatch.setattr(_leases, "TRUST_COUNTER_FOR", 600.0)
    monkeypatch.setattr(_client, "_SEGMENT_RECHECK", 0.0, raising=False)
    root = tmp_path / "repo"
    Repository.init(root).close()
    with _stepped_writer(root) as commit, Repository(root) as repo:
        assert int(commit()) == 1
        reader = repo.open_prefix("p")
        assert reader["n"] == 1
        _remove_segment_then_kill_coordinator(root)
        for number in range(2, 5):
            assert int(commit()) == number
            assert reader["n"] == number


def _remove_segment_then_kill_coordinator(root: Path) -> None:
    """systemd-logind's RemoveIPC removes the segment under the live coordinator, which then
    dies without a clean exit: its pid stays in the removed segment's header."""
    segment = RuntimePaths.for_root(root).segment_path()
    assert segment is not None
    os.unlink(segment)
    coordinator = psutil.Process(int((root / ".hotcopy" / "coordinator.pid").read_text()))
    coordinator.kill()
    coordinator.wait(20)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_commit_made_just_after_the_segment_was_replaced_is_seen_by_a_reader_of_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment removed under a live coordinator (RemoveIPC), then the coordinator killed,
    its pid left in the removed segment's header: a reader keeps trusting that segment's
    frozen counters until it looks at the path again (every ``_SEGMENT_RECHECK`` seconds). A
    writer that held its lease across the crash re-registered with the successor and posted
    its next commit on the new segment's board, acknowledged at once: the reader, asked after
    the acknowledgement, served the value before it (found by an attack: 9 runs in 20)."""
    recheck = 3.0  # the same in both processes; long enough for a successor to start
    monkeypatch.setattr(_client, "_SEGMENT_RECHECK", recheck)
    monkeypatch.setattr(_client, "_KEEPALIVE", 600.0)  # the reader reconnects only when asked
    monkeypatch.setattr(_leases, "TRUST_COUNTER_FOR", 600.0)  # nor looks at the files by age
    root = tmp_path / "repo"
    Repository.init(root).close()
    with _stepped_writer(root, str(recheck)) as tell:
        assert tell("commit") == "1"
        with Repository(root) as repo:
            reader = repo.open_prefix("p")
            assert reader["n"] == 1  # looks at the segment's path now, next in `recheck` s
            assert tell("begin") == "begun"
            assert reader["n"] == 1  # and has seen the counter and board of that grant
            _remove_segment_then_kill_coordinator(root)
            with connect(root):  # a successor, with a new segment
                assert tell("commit") == "2"
                assert reader["n"] == 2


@pytest.mark.timeout(60)
def test_a_commit_after_a_clean_coordinator_restart_is_posted_at_once(tmp_path: Path) -> None:
    """A coordinator that exits cleanly with nothing granted removes its segment and clears
    its pid first, so readers map the successor's at their next get: a writer has nobody to
    wait for. (The wait above, in its first form, made every commit in the second after a
    SIGTERM restart wait a second: found by an attack.)"""
    root = tmp_path / "repo"
    Repository.init(root).close()
    with connect(root) as client:
        client.lease("p", "write").release()
        coordinator = psutil.Process(int((root / ".hotcopy" / "coordinator.pid").read_text()))
        coordinator.terminate()
        coordinator.wait(20)
        with client.lease("p", "write") as lease:  # from a successor, in a segment of its own
            assert client.post("p", lease.token, 1)


BUSY_WRITER = r"""
import sys
from hotcopy.storage import Repository

with Repository(sys.argv[1]) as repo:
    px = repo.open_prefix("p", "rw")
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(int(sys.argv[2])):
        px[f"{sys.argv[3]}-{n}"] = n
        px.commit()
    print(repo.leases.statistics().acquires, flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_writers_that_contend_for_a_prefix_keep_the_lease_for_a_quantum_in_turn(
    tmp_path: Path,
) -> None:
    """The write lease went back to the coordinator at every commit as soon as another
    writer queued: a hand-over (two processes woken, the files read again) per commit, and
    4 writers on one prefix made 0.28x the commits of sqlite3. A holder now keeps it for a
    quantum of time while it commits, then hands it over in FIFO order."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    commits = 150
    # A long quantum, so that even a slow disk puts several commits in each.
    env = {**os.environ, "HOTCOPY_LEASE_QUANTUM_MS": "50"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", BUSY_WRITER, str(root), str(commits), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        acquires = [int(writer.communicate(timeout=90)[0]) for writer in writers]
        assert [writer.returncode for writer in writers] == [0, 0]
        assert sum(acquires) < 2 * commits // 3, acquires  # one per commit before
        with Repository(root) as repo:
            prefix = repo.open_prefix("p")
            assert len(prefix) == 2 * commits and prefix.seq == 2 * commits
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
            for pipe in (writer.stdin, writer.stdout):
                if pipe is not None:
                    pipe.close()


def _keeper_wakeups(repo: Repository) -> int:
    """How often the lease keeper thread of ``repo``'s client went to sleep and woke again."""
    keeper = repo.leases._keeper  # type: ignore[union-attr]
    assert keeper is not None and keeper.native_id is not None
    status = Path(f"/proc/self/task/{keeper.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def _commit_for_half_a_second(repo: Repository, writer: Prefix) -> tuple[int, int, float]:
    """Commit through ``writer`` for half a second: the commits, the wakeups of ``repo``'s
    keeper meanwhile, and the seconds it took."""
    before = _keeper_wakeups(repo)
    began = time.monotonic()
    commits = 0
    while time.monotonic() - began < 0.5:
        writer["k"] = commits
        writer.commit()
        commits += 1
    return commits, _keeper_wakeups(repo) - before, time.monotonic() - began


@pytest.mark.timeout(60)
def test_a_writer_alone_is_not_interrupted_by_its_lease_keeper(tmp_path: Path) -> None:
    """While a writer kept its lease parked between commits, the client's keeper thread woke
    every 2 ms to look whether anybody queued for it; each wake took the interpreter's lock
    from the writer at its next write or sync (a writer alone made 10-20 % fewer commits than
    with the keeper asleep). The coordinator now tells a holder when a request queues behind
    its lease, and the keeper sleeps until then (or until the lease is due back unused)."""
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        writer = repo.open_prefix("p", "rw")
        writer["k"] = 0
        writer.commit()
        commits, wakeups, seconds = _commit_for_half_a_second(repo, writer)
        # About every 50 ms (the parked lease's idle check; the count also has the keeper's
        # waits for the client's lock): far from every 2 ms.
        assert wakeups <= seconds / 0.01 + 4, (wakeups, seconds, commits)


@pytest.mark.timeout(60)
def test_a_parked_lease_goes_to_a_writer_that_queues_without_the_keeper_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that queues behind a lease parked unused gets it at once, and one that queues
    behind a lease in use gets it once its holder parks it after its quantum: the holder
    learns of the request from the coordinator, not by polling."""
    monkeypatch.setattr(_client, "_PARK_IDLE", 600.0)  # never given back for being unused
    monkeypatch.setattr(_client, "_LEASE_QUANTUM", 0.2)
    root = tmp_path / "repo"
    Repository.init(root).close()
    with Repository(root, lease_timeout=20.0) as first_repo, Repository(
        root, lease_timeout=20.0
    ) as second_repo:
        first = first_repo.open_prefix("p", "rw")
        second = second_repo.open_prefix("p", "rw")
        first["k"] = "first"
        first.commit()  # parked, unused from now on
        second["k"] = "second"
        assert second.commit() == 2  # queued behind the parked lease, handed over
        assert first_repo.leases.commit_seq("p") % 2 == 1  # the second one keeps it parked
        # Now the second holds it in a transaction while the first queues, then parks it
        # before its quantum is over: the lease must go on once the quantum is.
        second.begin()
        committed: list[int] = []
        queued = threading.Thread(
            target=lambda: (first.__setitem__("k", "again"), committed.append(first.commit()))
        )
        queued.start()
        try:
            _wait_for_waiter(root, "p")
            second["k"] = "second again"
            assert second.commit() == 3
        finally:
            queued.join(timeout=30)
        assert committed == [4]
        assert second["k"] == "again"


@pytest.mark.timeout(60)
def test_a_writer_granted_while_others_wait_hands_the_lease_on_in_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator told a holder that somebody waits only when a request queued behind
    it: a writer granted the lease from the queue, with others still queued, was never told,
    and kept it parked until its keeper happened to look (up to 50 ms, an attack measured).
    It is now told with its grant, and the next writer gets the lease after its quantum."""
    monkeypatch.setattr(_client, "_PARK_IDLE", 600.0)  # never given back for being unused
    monkeypatch.setattr(_client, "_KEEPALIVE", 600.0)  # nor found by a keeper's routine look
    monkeypatch.setattr(_client, "_LEASE_QUANTUM", 0.05)
    root = tmp_path / "repo"
    Repository.init(root).close()
    repos = [Repository(root, lease_timeout=3.0) for _ in range(3)]
    threads: list[threading.Thread] = []
    committed: dict[str, int] = {}
    try:
        first, second, third = (repo.open_prefix("p", "rw") for repo in repos)
        # The second one's keeper has a parked lease to look after already, on another
        # prefix: it sleeps until that one is due, and must be woken for this one.
        other = repos[1].open_prefix("other", "rw")
        other["k"] = "parked"
        other.commit()
        first.begin()  # holds the write lease while the others queue behind it

        def commit(prefix: Prefix, name: str) -> None:
            prefix["k"] = name
            committed[name] = prefix.commit()

        for waiters, (prefix, name) in enumerate([(second, "second"), (third, "third")], 1):
            threads.append(threading.Thread(target=commit, args=(prefix, name)))
            threads[-1].start()
            _wait_for_waiter(root, "p", waiters)
        first["k"] = "first"
        assert first.commit() == 1  # its quantum is over: the lease goes to the second
        for thread in threads:
            thread.join(timeout=30)
        assert committed == {"second": 2, "third": 3}
    finally:
        for thread in threads:
            thread.join(timeout=30)
        for repo in repos:
            repo.close()


@pytest.mark.timeout(60)
def test_a_writer_whose_waiter_gave_up_looks_for_the_next_one_without_waking_at_each_commit(
    tmp_path: Path,
) -> None:
    """A holder is told once per grant that somebody waits. Told, a writer woke its keeper at
    every commit for the rest of its grant once the waiter had given up (6,000 wakes a
    second, an attack measured). It now has its keeper look for the next waiter every 2 ms,
    as a keeper did before the coordinator told anybody: never more than that."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    with Repository(root) as repo, Repository(root, lease_timeout=0.2) as impatient_repo:
        writer = repo.open_prefix("p", "rw")
        impatient = impatient_repo.open_prefix("p", "rw")
        writer["k"] = 0
        writer.commit()
        writer.begin()  # in use: the impatient one cannot have it
        with pytest.raises(LeaseTimeout):
            impatient["k"] = "mine"  # a change takes the write lease
        writer["k"] = 1
        writer.commit()
        commits, wakeups, seconds = _commit_for_half_a_second(repo, writer)
        # About once per 2 ms (with the keeper's waits for the client's lock), not per commit.
        assert wakeups <= 2.5 * seconds / _client._PARK_POLL + 4, (wakeups, seconds, commits)
        if commits >= 1000:  # a disk fast enough to tell the two apart
            assert wakeups < commits / 2, (wakeups, seconds, commits)
        # ... and a new waiter still gets the lease, from the look or at the quantum.
        impatient["k"] = "mine at last"
        assert impatient.commit() == commits + 3


def _wait_for_waiter(root: Path, prefix: str, waiters: int = 1) -> None:
    deadline = time.monotonic() + 20
    while read_status(root).waiters.get(prefix, 0) < waiters:
        assert time.monotonic() < deadline, "nobody queued"
        time.sleep(0.005)  # polling the coordinator's table; not synchronising with it


@pytest.mark.timeout(60)
def test_a_view_that_closes_gives_back_the_descriptors_it_held(
    tmp_path: Path,
) -> None:
    """A process that writes and reads many prefixes in turn kept two descriptors open per
    prefix it ever touched, until its repository closed: it ran out of them (an attack)."""
    root = tmp_path / "repo"
    with Repository.init(root) as writer_repo, Repository(root) as reader_repo:
        fds = len(os.listdir("/proc/self/fd"))
        for number in range(60):
            writer = writer_repo.open_prefix(f"p{number}", "rw")
            writer["k"] = number
            writer.commit()  # the write lease stays parked: the counter is odd
            reader = reader_repo.open_prefix(f"p{number}")
            assert reader["k"] == number
            writer["k"] = number + 1
            writer.commit()  # posted on the board
            assert reader["k"] == number + 1
            reader.close()
            writer.close()
        assert len(os.listdir("/proc/self/fd")) < fds + 10
