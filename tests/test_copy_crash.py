"""Copies that die or fail midway: a file-size limit (EFBIG), a SIGKILL during the byte copy, and
a SIGKILL at each crash point of the copy's checkpoint. Afterwards nothing is at the destination,
no lease is left behind, the source is untouched (or, for a crash inside the checkpoint,
recovers every commit), and the next copy sweeps the dead copier's temp file.

Children are fresh interpreters (``subprocess``) that report over a pipe; every one is reaped in
``finally``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository, verify_file
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.crash, pytest.mark.timeout(40)]

GRACE = 5.0
h = storage_helpers()
BIG = 1 << 40  # a checkpoint threshold no test reaches: commits stay in the WAL


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _source_bytes(root: Path) -> tuple[str | None, str | None]:
    return _sha(root / "p.hc"), _sha(root / "p.hc-wal")


def _dump(px: Any) -> dict[str, Any]:
    return {key: px[key] for key in px}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}
    env.update(extra)
    return env


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            h.reap_popen(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _start(started: list[subprocess.Popen[str]], code: str, *args: object, **env: str) -> Any:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )
    started.append(proc)
    return proc


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"child exited ({proc.wait(GRACE)}): {proc.stderr.read()}")
    return line.strip()


def _make_prefix(root: Path, *, wal_commits: int = 0) -> dict[str, Any]:
    """A prefix of about 200 KiB, checkpointed; then ``wal_commits`` commits left in the WAL."""
    expected: dict[str, Any] = {}
    with Repository.init(root, checkpoint_bytes=BIG) as repo, repo.open_prefix("p", "rw") as px:
        for i in range(50):
            px[f"k{i:02d}"] = {"i": i, "blob": "z" * 4000}
            expected[f"k{i:02d}"] = {"i": i, "blob": "z" * 4000}
            px.commit()
        px.checkpoint()
        for i in range(wal_commits):
            px[f"wal{i}"] = i
            expected[f"wal{i}"] = i
            px.commit()
    return expected


def _prefix_is_free_and_writable(root: Path) -> None:
    """No lease of a failed copy survives: the strongest lease is granted and a commit goes in."""
    with Repository(root, lease_timeout=2.0) as repo:
        repo.leases.lease("p", "exclusive", timeout=2.0).release()
        with repo.open_prefix("p", "rw") as px:
            seq = px.seq
            px["after-failed-copy"] = True
            assert px.commit() == seq + 1


def _temps(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".hotcopy-tmp-" in name)


COPY_UNDER_FSIZE_LIMIT = r"""
import json, resource, sys
from hotcopy.storage import Repository

root, dest, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
repo = Repository(root, lease_timeout=10.0)
try:
    repo.copy_prefix(dest, "p", page_io_step_size=4096)
except OSError as err:
    print(json.dumps({"errno": err.errno, "error": type(err).__name__}), flush=True)
else:
    print(json.dumps({"errno": None}), flush=True)
sys.stdin.readline()  # stay alive, repository open, until the parent has looked
repo.close()
"""


def test_a_copy_that_hits_the_file_size_limit_leaves_nothing_behind(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "repo"
    expected = _make_prefix(root)
    size = (root / "p.hc").stat().st_size
    dest_dir = tmp_path / "dst"
    dest_dir.mkdir()
    before = _source_bytes(root)

    child = _start(children, COPY_UNDER_FSIZE_LIMIT, root, dest_dir / "c.hc", size // 2)
    outcome = json.loads(_line(child))

    assert outcome["errno"] == errno.EFBIG, outcome
    # The copier is still alive with its repository open: whatever is left is not its death's
    # doing but the failure path's.
    assert os.listdir(dest_dir) == []
    assert _source_bytes(root) == before
    _prefix_is_free_and_writable(root)
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(GRACE) == 0
    with Repository(root) as repo, repo.open_prefix("p", "r") as px:
        assert _dump(px) == {**expected, "after-failed-copy": True}


COPY_THAT_BLOCKS = r"""
import sys, threading
from pathlib import Path
from hotcopy.storage import Repository

root, dest, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
repo = Repository(root, lease_timeout=10.0)

def progress(done, total):
    if done < total:
        marker.write_text(f"{done} {total}")
        print("blocked", flush=True)
        threading.Event().wait()  # until the parent SIGKILLs this process

repo.copy_prefix(dest, "p", page_io_step_size=4096, progress=progress)
print("finished", flush=True)
"""


def test_a_copy_killed_midway_leaves_a_temp_that_the_next_copy_sweeps(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "repo"
    expected = _make_prefix(root)
    dest_dir = tmp_path / "dst"
    dest_dir.mkdir()
    dest = dest_dir / "c.hc"
    marker = tmp_path / "marker"
    before = _source_bytes(root)

    child = _start(children, COPY_THAT_BLOCKS, root, dest, marker)
    assert _line(child) == "blocked"
    done, total = map(int, marker.read_text().split())
    assert 0 < done < total
    temps = _temps(dest_dir)
    assert len(temps) == 1 and temps[0].startswith(f"c.hc.hotcopy-tmp-{child.pid}-"), temps
    child.send_signal(signal.SIGKILL)
    assert child.wait(GRACE) == -signal.SIGKILL

    assert not os.path.lexists(dest)
    assert _temps(dest_dir) == temps  # a dead copier's litter, until someone sweeps it
    assert _source_bytes(root) == before
    _prefix_is_free_and_writable(root)

    with Repository(root, lease_timeout=10.0) as repo:
        result = repo.copy_prefix(dest_dir / "next.hc", "p")
        assert _temps(dest_dir) == []
        assert sorted(os.listdir(dest_dir)) == ["next.hc"]
        report = verify_file(result.path)
        assert report.ok and report.seq == result.seq == len(expected) + 1
        # The killed copy's own name is free to use.
        assert verify_file(repo.copy_prefix(dest, "p").path).ok


COPY_WITH_FAULT = r"""
import sys
from hotcopy.storage import Repository

root, dest = sys.argv[1], sys.argv[2]
repo = Repository(root, lease_timeout=10.0)
print("started", flush=True)
repo.copy_prefix(dest, "p", page_io_step_size=4096)
print("finished", flush=True)
"""

COPY_FAULTS = [
    "checkpoint:before-main-write",
    "checkpoint:after-main-write",
    "checkpoint:after-main-fsync",
    "checkpoint:after-wal-reset",
    "copy:after-step",
]


@pytest.mark.parametrize("fault", COPY_FAULTS)
def test_a_copy_killed_at_each_crash_point_loses_no_commit(
    tmp_path: Path, children: list[subprocess.Popen[str]], fault: str
) -> None:
    root = tmp_path / "repo"
    expected = _make_prefix(root, wal_commits=3)  # so the copy's checkpoint has work to do
    dest_dir = tmp_path / "dst"
    dest_dir.mkdir()
    dest = dest_dir / "c.hc"

    child = _start(children, COPY_WITH_FAULT, root, dest, HOTCOPY_FAULT=fault)
    assert _line(child) == "started"
    if child.wait(20.0) != -signal.SIGKILL:
        assert child.stderr is not None
        raise AssertionError(f"the fault point was never reached: {child.stderr.read()}")

    assert not os.path.lexists(dest)
    _prefix_is_free_and_writable(root)
    with Repository(root, lease_timeout=10.0) as repo:
        with repo.open_prefix("p", "r") as px:
            assert (px.seq, _dump(px)) == (54, {**expected, "after-failed-copy": True})
        result = repo.copy_prefix(dest, "p")
        assert _temps(dest_dir) == []
        report = verify_file(result.path)
        assert report.ok and report.seq == result.seq == 54
