"""Hot copies, restores and compactions while other processes write and read the prefix.

Real processes (``fork`` children for writers, fresh interpreters for readers), real files,
real fsync. Processes synchronise with barriers, events and pipes only; every child is reaped
in ``finally``."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import CopyResult, Repository, verify_file
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

CTX = multiprocessing.get_context("fork")
GRACE = 5.0
h = storage_helpers()
WRITERS = 3
COPIES = 6
WAIT = 20.0  # the longest any synchronisation may take before the test fails


# -- helpers ----------------------------------------------------------------------------------


def _dump(px: Any) -> dict[str, Any]:
    return {key: px[key] for key in px}


def _open_standalone(copy: Path, where: Path, name: str = "p") -> tuple[int, dict[str, Any]]:
    """Open a copy the way a user would in another repository: restored into a fresh one."""
    with Repository.init(where) as repo:
        repo.restore_prefix(copy, name)
        with repo.open_prefix(name, "r") as px:
            return px.seq, _dump(px)


# -- three writers, six copies ----------------------------------------------------------------


def _writer(root: str, wid: int, barrier: Any, tick: Any, stop: Any, count: Any) -> None:
    """Commit ``w{wid}/{i}`` and ``w{wid}/last = i`` in one transaction, over and over.

    Writer 0 checkpoints after every commit, so the main file grows while copies run; the
    others leave their commits in the WAL, so a copy's own checkpoint has work to do.
    """
    checkpoint_bytes = 1 if wid == 0 else 1 << 20
    with Repository(root, checkpoint_bytes=checkpoint_bytes, lease_timeout=WAIT) as repo:
        px = repo.open_prefix("p", "rw")
        i = 0
        while True:
            i += 1
            px[f"w{wid}/{i}"] = {"w": wid, "i": i, "pad": "x" * 64}
            px[f"w{wid}/last"] = i
            px.commit()
            count.value = i
            tick.set()
            if i == 1:
                barrier.wait(WAIT)
            if stop.is_set():
                return


def _check_writer_records(state: dict[str, Any], wid: int) -> int:
    """Exactly ``w{wid}/1 .. w{wid}/last``, each intact: no tear, no hole, nothing beyond."""
    last = state.get(f"w{wid}/last", 0)
    keys = sorted(
        int(key.split("/")[1])
        for key in state
        if key.startswith(f"w{wid}/") and key != f"w{wid}/last"
    )
    assert keys == list(range(1, last + 1)), f"writer {wid}: records {keys} with last={last}"
    for i in keys:
        assert state[f"w{wid}/{i}"] == {"w": wid, "i": i, "pad": "x" * 64}
    return int(last)


def test_copies_taken_while_three_writers_commit_are_each_an_exact_commit(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        repo.open_prefix("p", "rw").close()
    barrier = CTX.Barrier(WRITERS + 1)
    stop = CTX.Event()
    ticks = [CTX.Event() for _ in range(WRITERS)]
    counts = [CTX.Value("q", 0, lock=False) for _ in range(WRITERS)]
    writers = [
        CTX.Process(target=_writer, args=(str(root), wid, barrier, ticks[wid], stop, counts[wid]))
        for wid in range(WRITERS)
    ]
    results: list[CopyResult] = []
    counts_after: list[list[int]] = []
    try:
        for proc in writers:
            proc.start()
        barrier.wait(WAIT)  # every writer has committed once and is committing on

        def every_writer_commits_during_the_copy(done: int, total: int) -> None:
            # Called after the first step of the byte copy, i.e. after the checkpoint fixed the
            # cut: make sure each writer commits (and perhaps checkpoints, appending to the main
            # file) while this copy is still in progress.
            if waited:
                return
            waited.append(done)
            # Two ticks each: the first may come from a commit that ended before the cut but
            # had not yet ticked (a copy's checkpoint is quick); the second is from a commit
            # that began after it.
            for _ in range(2):
                for tick in ticks:
                    tick.clear()
                for wid, tick in enumerate(ticks):
                    assert tick.wait(WAIT), f"writer {wid} made no progress during copy {k}"
            sizes_during.append(os.stat(root / "p.hc").st_size)

        with Repository(root, lease_timeout=WAIT) as repo:
            for k in range(COPIES):
                waited: list[int] = []
                sizes_during: list[int] = []
                result = repo.copy_prefix(
                    tmp_path / f"copy{k}.hc",
                    "p",
                    page_io_step_size=4096,
                    progress=every_writer_commits_during_the_copy,
                )
                assert waited, "the copy reported no progress"
                # Writer 0's checkpoints appended to the main file while this copy ran.
                assert sizes_during[0] > result.length
                results.append(result)
                counts_after.append([count.value for count in counts])
        stop.set()
        for proc in writers:
            proc.join(WAIT)
        assert [proc.exitcode for proc in writers] == [0] * WRITERS
    finally:
        stop.set()
        h.reap(writers)

    lasts: list[list[int]] = []
    for k, result in enumerate(results):
        copy = Path(result.path)
        assert result.length == copy.stat().st_size
        report = verify_file(copy)
        assert report.ok and report.seq == result.seq, report
        seq, state = _open_standalone(copy, tmp_path / f"standalone{k}")
        assert seq == result.seq
        strays = [key for key in state if not re.fullmatch(rf"w[0-{WRITERS - 1}]/(last|\d+)", key)]
        assert strays == []
        per_writer = [_check_writer_records(state, wid) for wid in range(WRITERS)]
        # The cut holds only commits that finished before it; a commit per record pair.
        assert sum(per_writer) == seq
        # Writers were committing while this copy ran: they are past what it holds.
        assert all(a > c for a, c in zip(counts_after[k], per_writer, strict=True))
        lasts.append(per_writer)
    for earlier, later in itertools.pairwise(results):
        assert later.seq > earlier.seq
    for earlier_lasts, later_lasts in itertools.pairwise(lasts):
        assert all(b > a for a, b in zip(earlier_lasts, later_lasts, strict=True))
    assert all(last >= 1 for last in lasts[0])

    # Nothing a writer acknowledged is missing from the live prefix either.
    with Repository(root) as repo, repo.open_prefix("p", "r") as px:
        state = _dump(px)
        finals = [_check_writer_records(state, wid) for wid in range(WRITERS)]
        assert finals == [count.value for count in counts]
        assert px.seq == sum(finals)


# -- a reader in another process during a restore or a compaction -----------------------------

READER = r"""
import json, os, select, sys
from hotcopy.storage import Repository

root, name, leased = sys.argv[1], sys.argv[2], sys.argv[3] == "leased"
repo = Repository(root, lease_timeout=20.0)
px = repo.open_prefix(name, "r")

def snapshot():
    items = {k: px[k] for k in px}
    return json.dumps({"seq": px.seq, "items": items}, sort_keys=True, default=bytes.hex)

def dump():
    if leased:  # a read lease: a stable view of several keys at once
        with repo.leases.lease(name, "read", timeout=20.0):
            return snapshot()
    return snapshot()

def command():
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    return line.strip()

while True:
    cmd = command()
    if cmd == "dump":
        print(dump(), flush=True)
    elif cmd == "loop":
        # Dump over and over until the next line arrives; report every distinct view seen. The
        # parent sends it only after a reply, so nothing is left in stdin's buffer for select.
        seen = {}
        while True:
            state = dump()
            seen[state] = seen.get(state, 0) + 1
            if len(seen) == 1 and seen[state] == 1:
                print("looping", flush=True)  # one view taken: the parent may go ahead
            if select.select([sys.stdin], [], [], 0.002)[0]:
                break
        command()
        print(json.dumps(seen), flush=True)
"""


class Reader:
    """A prefix reader in a fresh interpreter, driven line by line over pipes."""

    def __init__(self, root: Path, name: str, *, leased: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(root), name, "leased" if leased else "free"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"reader exited with {self.proc.wait(GRACE)}"
        return line

    def dump(self) -> dict[str, Any]:
        self._send("dump")
        return dict(json.loads(self._receive()))

    def start_loop(self) -> None:
        self._send("loop")
        assert self._receive().strip() == "looping"

    def stop_loop(self) -> dict[str, int]:
        self._send("stop")
        return dict(json.loads(self._receive()))

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(GRACE)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            h.reap_popen(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def reader_factory() -> Iterator[Any]:
    readers: list[Reader] = []

    def make(root: Path, name: str, *, leased: bool) -> Reader:
        reader = Reader(root, name, leased=leased)
        readers.append(reader)
        return reader

    try:
        yield make
    finally:
        for reader in readers:
            reader.close()


def _view(seq: int, items: dict[str, Any]) -> dict[str, Any]:
    return {"seq": seq, "items": items}


def test_a_reader_sees_the_old_or_the_restored_state_never_a_mix(
    tmp_path: Path, reader_factory: Any
) -> None:
    root = tmp_path / "repo"
    with Repository.init(root, lease_timeout=WAIT) as repo:
        with repo.open_prefix("p", "rw") as px:
            for i in range(10):
                px[f"k{i}"] = "A"
            restored_seq = px.commit()
            copy = repo.copy_prefix(tmp_path / "copy.hc", "p")
            for i in range(15):  # the later state differs in every key and has more of them
                px[f"k{i}"] = "B"
            px.commit()
            px.checkpoint()
            px["extra"] = "B"
            old_seq = px.commit()  # left in the WAL
        restored = _view(restored_seq, {f"k{i}": "A" for i in range(10)})
        old = _view(old_seq, {**{f"k{i}": "B" for i in range(15)}, "extra": "B"})

        reader = reader_factory(root, "p", leased=True)
        assert reader.dump() == old
        reader.start_loop()
        assert repo.restore_prefix(copy.path, "p", force=True) == restored_seq
        views = reader.stop_loop()
        seen = [json.loads(view) for view in views]
        assert seen and all(view in (old, restored) for view in seen), seen
        assert reader.dump() == restored

        # The restored prefix goes on from its own commit, and the reader follows.
        with repo.open_prefix("p", "rw") as px:
            px["k0"] = "C"
            assert px.commit() == restored_seq + 1
        assert reader.dump() == _view(restored_seq + 1, {**restored["items"], "k0": "C"})


def test_a_reader_keeps_working_through_a_compaction_and_sees_the_same_data(
    tmp_path: Path, reader_factory: Any
) -> None:
    root = tmp_path / "repo"
    with Repository.init(root, lease_timeout=WAIT) as repo:
        px = repo.open_prefix("p", "rw")
        for round_ in range(30):
            for i in range(10):
                px[f"k{i}"] = {"round": round_, "blob": "y" * 300}
            px.commit()
            if round_ % 7 == 6:
                px.checkpoint()
        px["bytes"] = b"\xff\x00"
        seq = px.commit()  # left in the WAL
        # A reader with no lease at all: compaction must not change what it sees, ever.
        reader = reader_factory(root, "p", leased=False)
        view = reader.dump()
        assert view["seq"] == seq and len(view["items"]) == 11
        before = repo.copy_prefix(tmp_path / "before.hc", "p")
        size_before = repo.prefix_path("p").stat().st_size

        reader.start_loop()
        cut = px.compact()
        views = reader.stop_loop()

        assert list(views) == [json.dumps(view, sort_keys=True)]
        assert cut.seq == seq
        assert repo.prefix_path("p").stat().st_size < size_before // 5
        assert reader.dump() == view
        px["after"] = 1
        assert px.commit() == seq + 1
        assert reader.dump() == _view(seq + 1, {**view["items"], "after": 1})
        after = repo.copy_prefix(tmp_path / "after.hc", "p")
        assert after.file_id != before.file_id
        report = verify_file(after.path)
        assert report.ok and report.seq == seq + 1
        px.close()
        assert os.path.getsize(after.path) == after.length


# -- a copy in progress holds off whatever would replace the main file ------------------------

REPLACER = r"""
import sys
from hotcopy.coordinator._errors import LeaseTimeout
from hotcopy.storage import Repository

root, action, copy = sys.argv[1], sys.argv[2], sys.argv[3]
with Repository(root, lease_timeout=float(sys.argv[4])) as repo:
    try:
        if action == "compact":
            with repo.open_prefix("p", "rw") as px:
                px.compact()
        else:
            repo.restore_prefix(copy, "p", force=True)
    except LeaseTimeout:
        print("waited", flush=True)
    else:
        print("done", flush=True)
"""


def _replace_in_child(root: Path, action: str, copy: Path, timeout: float) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", REPLACER, str(root), action, str(copy), str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        h.reap_popen(proc)
    assert proc.returncode == 0, err
    return out.strip()


def test_compaction_and_restore_wait_for_a_copy_in_progress(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with Repository.init(root, lease_timeout=WAIT) as repo:
        with repo.open_prefix("p", "rw") as px:
            for round_ in range(5):
                for i in range(20):
                    px[f"k{i}"] = {"round": round_, "pad": "p" * 200}
                px.commit()
        old = repo.copy_prefix(tmp_path / "old.hc", "p")
        with repo.open_prefix("p", "rw") as px:
            px["k0"] = "later"
            seq = px.commit()
        outcomes: list[str] = []

        def replace_midway(done: int, total: int) -> None:
            if not outcomes:  # after the first step: the copy holds its snapshot lease
                outcomes.append(_replace_in_child(root, "compact", old.path, 0.5))
                outcomes.append(_replace_in_child(root, "restore", old.path, 0.5))

        result = repo.copy_prefix(
            tmp_path / "copy.hc", "p", page_io_step_size=1024, progress=replace_midway
        )
        assert outcomes == ["waited", "waited"]
        assert result.seq == seq and result.file_id == old.file_id
        report = verify_file(result.path)
        assert report.ok and report.seq == seq
        # The copy over, both go through.
        assert _replace_in_child(root, "compact", old.path, 5.0) == "done"
        assert _replace_in_child(root, "restore", old.path, 5.0) == "done"
        with repo.open_prefix("p", "r") as px:
            assert px.seq == old.seq and px["k0"] == {"round": 4, "pad": "p" * 200}


HOLDER = """
import sys
from hotcopy.storage import Repository
root = sys.argv[1]
with Repository(root) as repo:
    px = repo.open_prefix("p", "rw")
    px.begin()  # the write lease, held by a transaction that has written nothing yet
    print("holding", flush=True)
    sys.stdin.readline()
    px["k"] = "after the copy"
    print(px.commit(), flush=True)
"""


def test_a_copy_of_a_prefix_whose_wal_holds_no_commit_never_asks_for_its_write_lease(
    tmp_path: Path,
) -> None:
    """An idle prefix (every commit checkpointed, as the last backup left it) has nothing to
    checkpoint: a copy takes its last commit at once, though a writer holds its write lease
    (an open transaction, a holder stopped), instead of waiting for the writer to finish."""
    root = tmp_path / "repo"
    with Repository.init(root) as repo, repo.open_prefix("p", "rw") as px:
        px["k"] = "before"
        before = px.commit()
        px.checkpoint()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        with Repository(root, lease_timeout=2.0) as repo:
            copied = repo.copy_prefix(tmp_path / "copy.hc", "p")
        assert copied.seq == before
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert int(holder.stdout.readline()) == before + 1
    finally:
        h.reap_popen(holder)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
    seq, state = _open_standalone(tmp_path / "copy.hc", tmp_path / "standalone")
    assert (seq, state) == (before, {"k": "before"})
