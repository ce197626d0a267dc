"""Crash tests: a child process commits transactions with a fault point armed and is SIGKILLed
there for real (``HOTCOPY_FAULT`` / ``HOTCOPY_FAULT_AFTER``, see ``storage/_prefix.py``); then the
parent recovers the repository and checks that no acknowledged commit was lost, that no
transaction is half applied, that a reader which stayed open across the crash agrees, and that the
prefix is writable and verifiable afterwards.

Each transaction ``t`` sets ``a``, ``b``, ``c`` to ``{"t": t}``, adds ``txn-t``, moves ``tmp-*`` to
``tmp-t`` (a delete and a put) and sets ``txn`` to ``t``: after recovery every part must carry the
same ``t``. The child appends ``t`` to an fsynced journal only after ``commit()`` returned, so the
journal is exactly the set of acknowledged commits."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hotcopy.storage import CorruptFileError, Prefix, Repository, verify_file
from hotcopy.storage import _format as fmt
from hotcopy.storage._verify import verify_prefix
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = [pytest.mark.crash, pytest.mark.timeout(60)]

CHECKPOINT_BYTES = 2048  # a checkpoint every ~6 transactions
MAX_TXNS = 200  # the child gives up (and the test fails) if its fault never fires

CHILD = r"""
import os, sys
from hotcopy.storage import Repository

root, journal = sys.argv[1], sys.argv[2]
checkpoint_bytes, max_txns = int(sys.argv[3]), int(sys.argv[4])
repo = Repository(root, checkpoint_bytes=checkpoint_bytes)
px = repo.open_prefix("p", "rw")
first = px.get("txn", 0) + 1
jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for t in range(first, first + max_txns):
    for part in "abc":
        px[part] = {"t": t, "pad": part * 60}
    px[f"txn-{t}"] = t
    px.pop(f"tmp-{t - 1}", None)
    px[f"tmp-{t}"] = t
    px["txn"] = t
    assert px.commit() == t
    os.write(jfd, b"%d\n" % t)
    os.fsync(jfd)
print("the fault never fired")
"""


def _write_txn(px: Prefix, t: int) -> None:
    for part in "abc":
        px[part] = {"t": t, "pad": part * 60}
    px[f"txn-{t}"] = t
    px.pop(f"tmp-{t - 1}", None)
    px[f"tmp-{t}"] = t
    px["txn"] = t


def _check_state(px: Prefix, acknowledged: list[int]) -> int:
    """Assert the invariants of the workload; return the last transaction present."""
    t = px.get("txn", 0)
    assert px.seq == t
    assert all(px[part] == {"t": t, "pad": part * 60} for part in "abc") if t else True
    for n in acknowledged:
        assert n <= t, f"acknowledged commit {n} was lost (recovered up to {t})"
    for n in range(1, t + 1):
        assert px[f"txn-{n}"] == n
    assert f"txn-{t + 1}" not in px
    tmp = [key for key in px if key.startswith("tmp-")]
    assert tmp == ([f"tmp-{t}"] if t else [])
    assert len(px) == (t + 5 if t else 0)
    return int(t)


def _journal(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def _wal_shape(wal: Path) -> tuple[fmt.WalHeader, int, int]:
    """The WAL's header, the end of its last whole batch, and the end of its non-zero bytes
    (after them comes only space reserved for appends)."""
    data = wal.read_bytes()
    header = fmt.unpack_wal_header(data[: fmt.HEADER_SIZE])
    end = fmt.HEADER_SIZE
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        while True:
            batch = fmt.read_batch(reader, load_values=True)
            if batch is None:
                break
            end = reader.pos
    finally:
        os.close(fd)
    return header, end, end + len(data[end:].rstrip(b"\0"))


def _crash_child(root: Path, journal: Path, fault: str, after: int) -> None:
    result = h.run_python(
        CHILD,
        str(root),
        str(journal),
        str(CHECKPOINT_BYTES),
        str(MAX_TXNS),
        env={"HOTCOPY_FAULT": fault, "HOTCOPY_FAULT_AFTER": str(after)},
        timeout=45,
    )
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr)


# point -> (its n-th pass fires, how many commits beyond the journal survive)
POINTS: dict[str, tuple[int, int]] = {
    "commit:before-wal-write": (20, 0),
    "commit:torn-wal-write": (20, 0),
    "commit:after-wal-write": (20, 1),  # whole batch in the page cache: survives a process crash
    "commit:after-wal-fsync": (20, 1),
    "checkpoint:before-main-write": (3, 1),  # the checkpoint runs inside a durable commit
    "checkpoint:after-batches-write": (3, 1),  # the segment's batches, not its key index
    "checkpoint:after-index-write": (3, 1),  # its key index, not its trailer
    "checkpoint:after-main-write": (3, 1),
    "checkpoint:after-main-fsync": (3, 1),
    "checkpoint:after-wal-reset": (3, 1),
}


def _on_disk_evidence(root: Path, fault: str) -> None:
    """Show the child died where it was told to (else the test would prove nothing)."""
    main_size = (root / "p.hc").stat().st_size
    header, whole_end, size = _wal_shape(root / "p.hc-wal")
    assert main_size > fmt.HEADER_SIZE  # earlier checkpoints happened
    if fault == "commit:torn-wal-write":
        assert size > whole_end, "no torn tail"
    else:
        assert size == whole_end
    if fault in (
        "checkpoint:after-batches-write",
        "checkpoint:after-index-write",
        "checkpoint:after-main-write",
        "checkpoint:after-main-fsync",
    ):
        assert main_size > header.base_len, "the new segment is not beyond the WAL's base"
    else:
        assert main_size == header.base_len
    if fault == "checkpoint:after-wal-reset":
        assert size == fmt.HEADER_SIZE


def _recover_and_check(root: Path, journal: Path, survivors: int | None, reader: Prefix) -> None:
    acknowledged = _journal(journal)
    assert acknowledged == sorted(set(acknowledged)) and acknowledged
    with Repository(root) as repo:
        last = _check_state(repo.open_prefix("p", "r"), acknowledged)
    if survivors is not None:
        assert last == acknowledged[-1] + survivors
    assert _check_state(reader, acknowledged) == last  # the reader open across the crash agrees
    with Repository(root, checkpoint_bytes=CHECKPOINT_BYTES) as repo:
        px = repo.open_prefix("p", "rw")
        assert _check_state(px, acknowledged) == last
        _write_txn(px, last + 1)
        assert px.commit() == last + 1
        assert _check_state(reader, acknowledged) == last + 1
        cut = px.checkpoint()
        report = verify_file(root / "p.hc")
        assert report.ok and report.seq == cut.seq == last + 1, report
        assert report.size == cut.length
    with Repository(root) as repo:
        assert _check_state(repo.open_prefix("p", "r"), acknowledged) == last + 1


def _fresh(tmp_path: Path) -> tuple[Path, Path, Repository, Prefix]:
    root = tmp_path / "repo"
    Repository.init(root).close()
    with Repository(root) as repo:
        repo.open_prefix("p", "rw")  # create it, so a reader can open before the child runs
    watcher_repo = Repository(root)
    return root, tmp_path / "journal", watcher_repo, watcher_repo.open_prefix("p", "r")


@pytest.mark.parametrize("fault", list(POINTS))
def test_sigkill_at_each_fault_point_loses_no_acknowledged_commit(
    tmp_path: Path, fault: str
) -> None:
    after, survivors = POINTS[fault]
    root, journal, watcher_repo, reader = _fresh(tmp_path)
    try:
        _crash_child(root, journal, fault, after)
        assert len(_journal(journal)) >= 2
        _on_disk_evidence(root, fault)
        _recover_and_check(root, journal, survivors, reader)
    finally:
        watcher_repo.close()


@pytest.mark.parametrize(
    "faults",
    [
        ("checkpoint:after-main-write", "checkpoint:after-main-write"),
        ("commit:torn-wal-write", "checkpoint:after-main-fsync"),
        ("checkpoint:after-main-fsync", "commit:torn-wal-write"),
    ],
)
def test_repeated_crashes_each_recovered_by_the_next_writer(
    tmp_path: Path, faults: tuple[str, str]
) -> None:
    """The second child's first commit must run the recovery the first crash left behind."""
    root, journal, watcher_repo, reader = _fresh(tmp_path)
    try:
        for fault in faults:
            _crash_child(root, journal, fault, POINTS[fault][0])
        _recover_and_check(root, journal, None, reader)
    finally:
        watcher_repo.close()


def test_a_writer_that_committed_before_clears_the_torn_tail_of_a_writer_that_died(
    tmp_path: Path,
) -> None:
    """A writer keeps its lease parked between commits and then trusts the files as it left
    them; a lease given away meanwhile (here to a child killed mid-append) ends that trust."""
    root, journal, watcher_repo, reader = _fresh(tmp_path)
    try:
        with Repository(root, checkpoint_bytes=1 << 30) as repo:
            px = repo.open_prefix("p", "rw")
            _write_txn(px, 1)
            assert px.commit() == 1  # our lease is parked now; the child's request takes it
            _crash_child(root, journal, "commit:torn-wal-write", 3)  # acknowledged 2 and 3
            _, whole_end, data_end = _wal_shape(root / "p.hc-wal")
            assert data_end > whole_end, "no torn tail"
            px["small"] = 4  # a batch shorter than the torn one: it cannot cover it all
            assert px.commit() == 4
        _, whole_end, data_end = _wal_shape(root / "p.hc-wal")
        assert data_end == whole_end, "debris of the torn batch is left after our commit"
        assert verify_prefix(root, "p").notes == ()
        with Repository(root) as repo:
            px = repo.open_prefix("p", "r")
            assert px.seq == 4 and px["small"] == 4 and px["txn"] == 3 == _journal(journal)[-1]
        assert reader.seq == 4 and reader["small"] == 4  # open across it all, it follows
    finally:
        watcher_repo.close()


def test_an_unsynced_checkpoint_with_a_lost_page_is_rebuilt_from_the_wal(tmp_path: Path) -> None:
    """Killed after the checkpoint wrote the main file but before its fsync; then (as a power
    cut could) one value byte of that unsynced segment is damaged. Its headers and keys still
    check out, so the segment scans as whole; the next writer must check its values against the
    WAL, which still holds every batch, drop the segment and rebuild it."""
    root, journal, watcher_repo, _ = _fresh(tmp_path)
    try:
        _crash_child(root, journal, "checkpoint:after-main-write", 3)
        watcher_repo.close()
        main = root / "p.hc"
        header, _, _ = _wal_shape(root / "p.hc-wal")
        size = main.stat().st_size
        assert size > header.base_len
        fd = os.open(main, os.O_RDWR)
        try:
            segment = fmt.read_segment(fmt.FileReader(fd, header.base_len, size), load_values=True)
            assert segment is not None
            op = next(op for op in segment.batches[0].ops if op.key.startswith("txn-"))
            at = op.offset + fmt.OP_SIZE + len(op.key.encode())
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x20]), at)
        finally:
            os.close(fd)
        with Repository(root) as repo:
            early = repo.open_prefix("p", "r")  # before any writer recovered: never wrong data
            with pytest.raises(CorruptFileError):
                early[op.key]
        acknowledged = _journal(journal)
        with Repository(root, checkpoint_bytes=CHECKPOINT_BYTES) as repo:
            px = repo.open_prefix("p", "rw")
            last = px["txn"]
            _write_txn(px, last + 1)
            assert px.commit() == last + 1  # runs the recovery first
            assert _check_state(px, acknowledged) == last + 1
            px.checkpoint()
        assert verify_file(main).ok
        with Repository(root) as repo:
            assert _check_state(repo.open_prefix("p", "r"), acknowledged) == last + 1
    finally:
        watcher_repo.close()


def test_checkpoint_after_a_crashed_checkpoint_finishes_its_job(tmp_path: Path) -> None:
    """After a kill between the main-file write and the WAL reset, ``checkpoint()`` (what
    ``copy_prefix`` calls) must not hand out a cut whose bytes were never fsynced nor checked:
    it completes the crashed checkpoint (values checked, fsync, WAL reset past the cut)."""
    root, journal, watcher_repo, _ = _fresh(tmp_path)
    try:
        _crash_child(root, journal, "checkpoint:after-main-write", 3)
        watcher_repo.close()
        main = root / "p.hc"
        header, _, _ = _wal_shape(root / "p.hc-wal")
        size = main.stat().st_size
        fd = os.open(main, os.O_RDWR)
        try:
            segment = fmt.read_segment(fmt.FileReader(fd, header.base_len, size), load_values=True)
            assert segment is not None
            op = next(op for op in segment.batches[0].ops if op.key.startswith("txn-"))
            at = op.offset + fmt.OP_SIZE + len(op.key.encode())
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x20]), at)  # a page lost to power
        finally:
            os.close(fd)
        with Repository(root) as repo:
            px = repo.open_prefix("p", "rw")
            cut = px.checkpoint()
            after, _, wal_size = _wal_shape(root / "p.hc-wal")
            expected = (cut.length, cut.seq, fmt.HEADER_SIZE)
            assert (after.base_len, after.base_seq, wal_size) == expected
            assert _check_state(px, _journal(journal)) == cut.seq
        assert verify_file(main).ok
    finally:
        watcher_repo.close()


def test_crash_of_a_writer_with_a_transaction_open_leaves_nothing_and_frees_the_lease(
    tmp_path: Path,
) -> None:
    root, _, watcher_repo, reader = _fresh(tmp_path)
    code = r"""
import os, signal, sys
from hotcopy.storage import Repository
px = Repository(sys.argv[1]).open_prefix("p", "rw")
px["a"] = {"t": 1}
px["uncommitted"] = True   # the write lease is held from here
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    try:
        result = h.run_python(code, str(root), timeout=30)
        assert result.returncode == -signal.SIGKILL and "holding" in result.stdout
        with Repository(root, lease_timeout=10) as repo:
            px = repo.open_prefix("p", "rw")
            assert "uncommitted" not in px and len(px) == 0
            _write_txn(px, 1)
            assert px.commit() == 1  # the dead holder's lease was released by the kernel
        assert _check_state(reader, []) == 1
    finally:
        watcher_repo.close()


def test_crash_child_journal_is_the_acknowledged_commits(tmp_path: Path) -> None:
    """Sanity check of the harness: without a fault the child runs to the end, journaling all."""
    root, journal, watcher_repo, reader = _fresh(tmp_path)
    try:
        result = h.run_python(CHILD, str(root), str(journal), str(CHECKPOINT_BYTES), "15")
        assert result.returncode == 0 and "never fired" in result.stdout, result.stderr
        assert _journal(journal) == list(range(1, 16))
        assert _check_state(reader, _journal(journal)) == 15
    finally:
        watcher_repo.close()
