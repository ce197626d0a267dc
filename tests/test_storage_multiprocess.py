"""Multi-process tests with real processes, real ``flock`` leases and real fsync: concurrent
writers lose nothing, and a reader process opened before them follows their commits (through
checkpoints and WAL resets) without reopening and never sees a torn state."""

from __future__ import annotations

import multiprocessing
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository, verify_file
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

CTX = multiprocessing.get_context("fork")
WRITERS = 4
COMMITS = 40
CHECKPOINT_BYTES = 4096  # several checkpoints (main appends + WAL resets) while readers follow


def _report(conn: Connection, body: Any, *args: Any) -> None:
    """Run ``body`` in a child and send ("ok", result) or ("error", traceback) to the parent."""
    try:
        conn.send(("ok", body(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _writer(root: str, index: int, start: Any) -> int:
    start.wait(30)
    with Repository(root, checkpoint_bytes=CHECKPOINT_BYTES, lease_timeout=30) as repo:
        px = repo.open_prefix("shared", "rw")
        for i in range(COMMITS):
            # The first change takes the write lease; the counter is read under it.
            px[f"w{index}-{i}"] = {"writer": index, "i": i}
            px["counter"] += 1
            px.commit()
    return COMMITS


def _reader(root: str, ready: Any, start: Any, deadline: float) -> dict[str, Any]:
    with Repository(root) as repo:
        px = repo.open_prefix("shared", "r")  # opened before any writer starts
        initial = px["counter"]
        ready.set()
        start.wait(30)
        seen = [initial]
        target = WRITERS * COMMITS
        while seen[-1] < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"reader stuck at counter {seen[-1]} of {target}")
            before = px["counter"]
            writer_keys = len(px) - 1  # all keys but the counter
            after = px["counter"]
            # Every commit adds one writer key and one to the counter, atomically: a torn
            # view would show keys without their count or the other way round.
            assert before <= writer_keys <= after, (before, writer_keys, after)
            assert after >= seen[-1], "the counter went backwards"
            if after != seen[-1]:
                seen.append(after)
        missing = [
            f"w{w}-{i}" for w in range(WRITERS) for i in range(COMMITS) if f"w{w}-{i}" not in px
        ]
        return {"seen": seen, "missing": missing, "seq": px.seq}


def test_concurrent_writers_lose_nothing_and_a_reader_follows_them(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        px = repo.open_prefix("shared", "rw")  # exists before the reader opens it
        px["counter"] = 0
        px.commit()
    ready = CTX.Event()
    start = CTX.Barrier(WRITERS + 2)  # the writers, the reader, and this test
    deadline = time.monotonic() + 75
    pipes = []
    procs = []
    try:
        parent, child = CTX.Pipe(duplex=False)
        reader = CTX.Process(
            target=_report, args=(child, _reader, str(root), ready, start, deadline)
        )
        reader.start()
        child.close()
        pipes.append(parent)
        procs.append(reader)
        assert ready.wait(30), "the reader did not open the prefix"
        for index in range(WRITERS):
            parent, child = CTX.Pipe(duplex=False)
            proc = CTX.Process(target=_report, args=(child, _writer, str(root), index, start))
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        start.wait(30)
        results = []
        for conn in pipes:
            assert conn.poll(80), "a child did not report"
            status, value = conn.recv()
            assert status == "ok", value
            results.append(value)
        for proc in procs:
            proc.join(10)
            assert proc.exitcode == 0
    finally:
        h.reap(procs)
        for conn in pipes:
            conn.close()
    seen = results[0]
    total = WRITERS * COMMITS
    assert results[1:] == [COMMITS] * WRITERS
    assert seen["seen"][0] == 0 and seen["seen"][-1] == total
    assert seen["missing"] == [] and seen["seq"] == total + 1
    assert len(seen["seen"]) > 2, "the reader never saw the counter in between"
    with Repository(root) as repo:
        px = repo.open_prefix("shared", "rw")
        assert px["counter"] == total and px.seq == total + 1 and len(px) == total + 1
        for w in range(WRITERS):
            for i in range(COMMITS):
                assert px[f"w{w}-{i}"] == {"writer": w, "i": i}
        assert px.checkpoint().seq == total + 1
    report = verify_file(root / "shared.hc")
    assert report.ok and report.seq == total + 1 and report.keys == total + 1
    assert report.segments >= 3  # checkpoints really happened under the reader


def _blocked_writer(root: str, holding: Any) -> str:
    with Repository(root, lease_timeout=0.3) as repo:
        px = repo.open_prefix("p", "rw")
        holding.wait(30)
        try:
            px["x"] = 1
        except TimeoutError:
            return "timed out"
        return "got the lease"


def test_a_transaction_in_another_process_excludes_writers_until_it_ends(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    holding = CTX.Event()
    procs = []
    parent, child = CTX.Pipe(duplex=False)
    try:
        with Repository.init(root) as repo:
            px = repo.open_prefix("p", "rw")
            px["mine"] = 1  # takes the write lease
            proc = CTX.Process(target=_report, args=(child, _blocked_writer, str(root), holding))
            proc.start()
            procs.append(proc)
            child.close()
            holding.set()
            assert parent.poll(30)
            assert parent.recv() == ("ok", "timed out")
            assert px.commit() == 1
        proc.join(10)
        with Repository(root, lease_timeout=5) as repo:
            other = repo.open_prefix("p", "rw")
            other["x"] = 1
            assert other.commit() == 2
    finally:
        h.reap(procs)
        parent.close()
