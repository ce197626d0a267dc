"""Hot copies of a prefix in one process: what a copy holds, copies taken inside this process's
own transaction, every refusal (with the source's bytes and the destination left alone),
restore by replacing the ``.hc`` file and by ``Repository.restore_prefix``, compaction, and
``verify_file`` on copies. Real files and fsync throughout; nothing under test is mocked.

Multi-process copies are in ``test_copy_concurrent.py``, copies killed or failing midway in
``test_copy_crash.py``."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import pytest
from hotcopy.storage import (
    CopyResult,
    CorruptFileError,
    DestinationExists,
    InvalidPrefixName,
    NotEnoughSpace,
    PrefixNotFound,
    Repository,
    SameFileError,
    StorageError,
    verify_file,
)
from hotcopy.storage import _format as fmt
from hotcopy.storage._copy import copy_range
from hotcopy.storage._log import Log
from hotcopy_test_support import storage_helpers

h = storage_helpers()

pytestmark = pytest.mark.timeout(30)

BIG = 1 << 40  # a checkpoint threshold no test reaches: commits stay in the WAL


# -- helpers ----------------------------------------------------------------------------------


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _source_bytes(repo: Repository, name: str = "p") -> dict[str, str | None]:
    main = repo.prefix_path(name)
    return {"hc": _sha(main), "wal": _sha(main.with_name(f"{name}.hc-wal"))}


def _tree(root: Path) -> dict[str, str | None] | None:
    """Every path under ``root`` with the hash of each file: a before/after picture.

    Leaves out every repository's ``.hotcopy`` runtime dir (the coordinator's socket, log and
    pid, lock files whose fencing counters move whenever a lease is taken; never data, never
    backed up)."""
    if not root.exists():
        return None
    found: dict[str, str | None] = {}
    for directory, dirs, files in os.walk(root):
        if ".hotcopy" in dirs:
            dirs.remove(".hotcopy")
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root) + "/"] = None
        for name in files:
            path = Path(directory, name)
            found[os.path.relpath(path, root)] = (
                f"-> {os.readlink(path)}" if path.is_symlink() else _sha(path)
            )
    return found


def _dump(px: Any) -> dict[str, Any]:
    return {key: px[key] for key in px}


def _open_standalone(copy: Path, where: Path, name: str = "p") -> tuple[int, dict[str, Any]]:
    """Open a copy the way a user would in another repository: restored into a fresh one."""
    with Repository.init(where) as repo:
        repo.restore_prefix(copy, name)
        with repo.open_prefix(name, "r") as px:
            return px.seq, _dump(px)


def _fill(repo: Repository, name: str = "p") -> tuple[int, dict[str, Any]]:
    """Commits of every value type, deletes and overwrites; a checkpoint; then WAL-only commits
    (so a checkpoint by anyone would change the source's bytes). Returns (seq, state)."""
    expected: dict[str, Any] = {}
    with repo.open_prefix(name, "rw") as px:
        for i in range(12):
            value: Any = [
                {"i": i, "nested": [1, 2.5, None, True]},
                f"text {i} \u00e9\u4e2d",
                bytes(range(i * 7 % 256)) * 3,
                i * 10**20,
                None,
                -0.5,
            ][i % 6]
            px[f"k{i:02d}"] = value
            expected[f"k{i:02d}"] = value
            if i % 4 == 3:
                del px[f"k{i - 2:02d}"]
                del expected[f"k{i - 2:02d}"]
            px.commit()
        px.checkpoint()
        for i in range(3):
            px[f"k{i:02d}"] = {"rewritten": i}
            expected[f"k{i:02d}"] = {"rewritten": i}
            px["wal-only"] = i
            expected["wal-only"] = i
            px.commit()
        return px.seq, expected


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    with Repository.init(tmp_path / "repo", checkpoint_bytes=BIG, lease_timeout=10.0) as repo:
        yield repo


# -- what a copy is ---------------------------------------------------------------------------


def test_a_copy_is_a_standalone_prefix_holding_exactly_the_commit_it_reports(
    repo: Repository, tmp_path: Path
) -> None:
    seq, expected = _fill(repo)
    dest = tmp_path / "copy.hc"
    result = repo.copy_prefix(dest, "p", page_io_step_size=100)
    assert isinstance(result, CopyResult)
    data = dest.read_bytes()
    assert (result.path, result.prefix, result.seq) == (str(dest), "p", seq)
    assert result.length == len(data)
    assert result.crc32 == zlib.crc32(data)
    source_header = fmt.unpack_main_header(repo.prefix_path("p").read_bytes()[: fmt.HEADER_SIZE])
    copy_header = fmt.unpack_main_header(data[: fmt.HEADER_SIZE])
    assert result.file_id == source_header.file_id.hex() == copy_header.file_id.hex()
    # A fresh salt: no WAL of the live prefix can ever be applied to the copy.
    assert copy_header.salt != source_header.salt
    # Beyond the header, the copy is the source's bytes [HEADER_SIZE, L) exactly.
    assert data[fmt.HEADER_SIZE :] == repo.prefix_path("p").read_bytes()[fmt.HEADER_SIZE :]
    report = verify_file(dest)
    assert report.ok and report.seq == seq and report.keys == len(expected)
    assert _open_standalone(dest, tmp_path / "standalone") == (seq, expected)
    # Exact types survive the trip (bytes stay bytes, big ints stay ints, -0.5 stays float).
    _, got = _open_standalone(dest, tmp_path / "standalone2")
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}


def test_copies_of_one_main_file_share_its_file_id_and_move_forward(
    repo: Repository, tmp_path: Path
) -> None:
    _fill(repo)
    first = repo.copy_prefix(tmp_path / "a.hc", "p")
    with repo.open_prefix("p", "rw") as px:
        px["later"] = 1
        px.commit()
    second = repo.copy_prefix(tmp_path / "b.hc", "p")
    assert first.file_id == second.file_id
    assert second.seq == first.seq + 1 and second.length > first.length
    # The later copy extends the earlier one byte for byte (append-only main file).
    a, b = (tmp_path / "a.hc").read_bytes(), (tmp_path / "b.hc").read_bytes()
    assert b[fmt.HEADER_SIZE : len(a)] == a[fmt.HEADER_SIZE :]


def test_copy_of_an_empty_prefix_opens_empty(repo: Repository, tmp_path: Path) -> None:
    repo.open_prefix("p", "rw").close()
    result = repo.copy_prefix(tmp_path / "empty.hc", "p")
    assert result.seq == 0 and result.length == fmt.HEADER_SIZE
    assert verify_file(tmp_path / "empty.hc").ok
    assert _open_standalone(tmp_path / "empty.hc", tmp_path / "standalone") == (0, {})


def test_a_copys_checkpoint_writes_what_a_prefix_checkpoint_writes(tmp_path: Path) -> None:
    """copy_prefix checkpoints without building a key index; the main file and WAL it leaves
    are byte for byte what ``Prefix.checkpoint`` leaves in a twin repository."""
    files = []
    for twin in ("a", "b"):
        with Repository.init(tmp_path / twin, checkpoint_bytes=BIG) as repo:
            seq, expected = _fill(repo)
            main = repo.prefix_path("p")
            if twin == "a":
                cut = repo.copy_prefix(tmp_path / "copy.hc", "p")
                assert (cut.seq, cut.length) == (seq, main.stat().st_size)
            else:
                with repo.open_prefix("p", "rw") as px:
                    px.checkpoint()
            data = bytearray(main.read_bytes())
            data[: fmt.HEADER_SIZE] = b""  # the headers differ by file id and salt only
            wal = fmt.unpack_wal_header((tmp_path / twin / "p.hc-wal").read_bytes())
            files.append((bytes(data), wal.base_len, wal.base_seq))
            with repo.open_prefix("p", "r") as px:
                assert (px.seq, _dump(px)) == (seq, expected)
    assert files[0] == files[1]
    assert _open_standalone(tmp_path / "copy.hc", tmp_path / "standalone") == (seq, expected)


def test_a_copy_refuses_a_main_file_with_damaged_metadata(repo: Repository, tmp_path: Path) -> None:
    """The copy's checkpoint reads no segment; the copy itself still refuses to record a
    range whose metadata does not parse (and leaves no destination behind)."""
    _fill(repo)
    repo.copy_prefix(tmp_path / "first.hc", "p")  # checkpointed: the WAL is empty now
    main = repo.prefix_path("p")
    with open(main, "r+b") as file:  # the first batch header's magic
        file.seek(fmt.HEADER_SIZE)
        first = file.read(1)
        file.seek(fmt.HEADER_SIZE)
        file.write(bytes([first[0] ^ 0xFF]))
    dest = tmp_path / "second.hc"
    with pytest.raises(CorruptFileError, match=f"damaged at offset {fmt.HEADER_SIZE}"):
        repo.copy_prefix(dest, "p")
    assert sorted(os.listdir(tmp_path)) == ["first.hc", "repo"]


def test_a_copy_whose_checkpoint_appends_still_refuses_damage_before_it(
    repo: Repository, tmp_path: Path
) -> None:
    """The segment the copy's checkpoint appends is built from checked WAL batches and not
    parsed again; what lies before it still is."""
    _fill(repo)
    repo.copy_prefix(tmp_path / "first.hc", "p")  # checkpointed: the WAL is empty now
    with repo.open_prefix("p", "rw") as px:  # opened (so parsed) before the damage
        with open(repo.prefix_path("p"), "r+b") as file:  # the first batch header's magic
            file.seek(fmt.HEADER_SIZE)
            first = file.read(1)
            file.seek(fmt.HEADER_SIZE)
            file.write(bytes([first[0] ^ 0xFF]))
        px["more"] = 1
        px.commit()  # in the WAL: the copy's checkpoint appends a segment
        damaged = f"offset {fmt.HEADER_SIZE}"
        with Repository(repo.root) as other, pytest.raises(CorruptFileError, match=damaged):
            other.copy_prefix(tmp_path / "second.hc", "p")
    assert sorted(os.listdir(tmp_path)) == ["first.hc", "repo"]


# -- a copy taken inside this process's own transaction -----------------------------------


def test_copy_during_own_transaction_neither_deadlocks_nor_includes_pending_changes(
    repo: Repository, tmp_path: Path
) -> None:
    seq, expected = _fill(repo)
    px = repo.open_prefix("p", "rw")
    px["pending"] = "not committed"
    del px["k00"]
    # The write lease is held by the open transaction: another writer cannot get it.
    with (
        Repository(repo.root, lease_timeout=0.2) as other,
        other.open_prefix("p", "rw") as opx,
        pytest.raises(TimeoutError),
    ):
        opx["x"] = 1
    result = repo.copy_prefix(tmp_path / "copy.hc", "p")  # lease_timeout=10: no deadlock
    assert result.seq == seq
    assert _open_standalone(tmp_path / "copy.hc", tmp_path / "s1") == (seq, expected)
    # The transaction is intact and still ours: it commits afterwards.
    assert px["pending"] == "not committed" and "k00" not in px
    assert px.commit() == seq + 1
    px.close()
    repo.copy_prefix(tmp_path / "after.hc", "p")
    expected = {**expected, "pending": "not committed"}
    del expected["k00"]
    assert _open_standalone(tmp_path / "after.hc", tmp_path / "s2") == (seq + 1, expected)


def test_module_api_copies_the_current_prefix_during_its_own_transaction(tmp_path: Path) -> None:
    try:
        hc.init(tmp_path / "repo", lease_timeout=10.0)
        px = hc.open("users", "rw")
        px["alice"] = {"age": 3}
        committed = hc.commit()
        px["bob"] = "pending"
        result = hc.copy_prefix(tmp_path / "users.hc")
        assert (result.prefix, result.seq) == ("users", committed)
        assert hc.get_current_prefix()["bob"] == "pending"
        assert hc.commit() == committed + 1
        hc.open("other", "rw")
        hc.get_current_prefix()["x"] = 1
        hc.commit()
        named = hc.copy_prefix(tmp_path / "named.hc", prefix="users")
        assert named.seq == committed + 1
    finally:
        hc.close()
    assert _open_standalone(tmp_path / "users.hc", tmp_path / "s1", "users") == (
        committed,
        {"alice": {"age": 3}},
    )
    assert _open_standalone(tmp_path / "named.hc", tmp_path / "s2", "users") == (
        committed + 1,
        {"alice": {"age": 3}, "bob": "pending"},
    )


# -- refusals ---------------------------------------------------------------------------------

# Each case prepares a destination and returns (destination directory to watch, the attempt).
Attempt = Callable[[Repository, Path], tuple[Path, Callable[[], object]]]


def _same_path(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    return repo.root, lambda: repo.copy_prefix(repo.prefix_path("p"), "p")


def _relative_same_path(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (repo.root / "x").mkdir()
    dest = Path(os.path.relpath(repo.root / "x" / ".." / "p.hc"))
    return repo.root, lambda: repo.copy_prefix(dest, "p")


def _symlink(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    (tmp / "dst" / "link.hc").symlink_to(repo.prefix_path("p"))
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "link.hc", "p")


def _hard_link(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    os.link(repo.prefix_path("p"), tmp / "dst" / "hard.hc")
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "hard.hc", "p")


def _exists(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    (tmp / "dst" / "taken.hc").write_bytes(b"somebody else's file")
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "taken.hc", "p")


def _dangling_symlink(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    (tmp / "dst" / "dangling.hc").symlink_to(tmp / "dst" / "nowhere.hc")
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "dangling.hc", "p")


def _missing_directory(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    return tmp / "missing", lambda: repo.copy_prefix(tmp / "missing" / "c.hc", "p")


def _unknown_prefix(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "c.hc", "nope")


def _invalid_name(name: str) -> Attempt:
    def attempt(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
        (tmp / "dst").mkdir()
        return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "c.hc", name)

    return attempt


def _no_prefix_open(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "c.hc")


def _several_prefixes_open(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    repo.open_prefix("p", "r")
    repo.open_prefix("q", "rw")
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "c.hc")


def _bad_step(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    return tmp / "dst", lambda: repo.copy_prefix(tmp / "dst" / "c.hc", "p", page_io_step_size=0)


def _module_api_no_prefix(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()

    def attempt() -> object:
        hc.init(repo.root)
        try:
            return hc.copy_prefix(tmp / "dst" / "c.hc")
        finally:
            hc.close()

    return tmp / "dst", attempt


def _module_api_no_repository(repo: Repository, tmp: Path) -> tuple[Path, Callable[[], object]]:
    (tmp / "dst").mkdir()
    hc.close()
    return tmp / "dst", lambda: hc.copy_prefix(tmp / "dst" / "c.hc", prefix="p")


REFUSALS: list[tuple[str, Attempt, type[BaseException], str]] = [
    ("source path", _same_path, SameFileError, "own main file"),
    ("source path, relative and indirect", _relative_same_path, SameFileError, "own main file"),
    ("symlink to the source", _symlink, SameFileError, "own main file"),
    ("hard link to the source", _hard_link, SameFileError, "own main file"),
    ("destination exists", _exists, DestinationExists, "exists"),
    ("dangling symlink", _dangling_symlink, DestinationExists, "symlink"),
    ("destination directory missing", _missing_directory, StorageError, "does not exist"),
    ("unknown prefix", _unknown_prefix, PrefixNotFound, "nope"),
    ("name with a slash", _invalid_name("../p"), InvalidPrefixName, "invalid prefix name"),
    ("name starting with a dot", _invalid_name(".hotcopy"), InvalidPrefixName, "invalid"),
    ("empty name", _invalid_name(""), InvalidPrefixName, "invalid prefix name"),
    ("name too long", _invalid_name("a" * 201), InvalidPrefixName, "invalid prefix name"),
    ("no prefix open, none given", _no_prefix_open, RuntimeError, "no prefix is open"),
    ("several open, none given", _several_prefixes_open, RuntimeError, "several"),
    ("step size 0", _bad_step, ValueError, "page_io_step_size"),
    ("module API, no prefix open", _module_api_no_prefix, RuntimeError, "no prefix"),
    ("module API, no repository", _module_api_no_repository, RuntimeError, "no repository"),
]


@pytest.mark.parametrize(
    ("attempt", "error", "message"),
    [pytest.param(a, e, m, id=case) for case, a, e, m in REFUSALS],
)
def test_a_refused_copy_leaves_the_source_bytes_and_the_destination_alone(
    repo: Repository,
    tmp_path: Path,
    attempt: Attempt,
    error: type[BaseException],
    message: str,
) -> None:
    _fill(repo)
    assert repo.prefix_path("p").with_name("p.hc-wal").stat().st_size > fmt.HEADER_SIZE
    watched, call = attempt(repo, tmp_path)
    source_before = _source_bytes(repo)
    watched_before = _tree(watched)
    root_before = _tree(repo.root)
    with pytest.raises(error, match=message):
        call()
    assert _source_bytes(repo) == source_before
    assert _tree(watched) == watched_before
    assert _tree(repo.root) == root_before  # no lock file, no temp, no checkpoint
    # The refusal left no lease behind: an exclusive lease (which waits out every other) is free.
    repo.leases.lease("p", "exclusive", timeout=1.0).release()


def test_refusal_errors_are_also_the_matching_builtins() -> None:
    assert issubclass(SameFileError, ValueError)
    assert issubclass(DestinationExists, FileExistsError)
    assert issubclass(PrefixNotFound, FileNotFoundError)
    assert issubclass(InvalidPrefixName, ValueError)
    assert issubclass(NotEnoughSpace, OSError)
    for error in (SameFileError, DestinationExists, PrefixNotFound, NotEnoughSpace):
        assert issubclass(error, StorageError)


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, or a skip when this process may not mount one."""
    with h.tmpfs(tmp_path / "small", "size=1m,mode=0755") as mount_point:
        yield mount_point


def test_a_copy_that_cannot_fit_is_refused_before_anything_is_touched(
    repo: Repository, tmp_path: Path, small_filesystem: Path
) -> None:
    with repo.open_prefix("p", "rw") as px:
        for i in range(20):
            px[f"big{i}"] = os.urandom(64 << 10)
            px.commit()
        px.checkpoint()
        px["wal-only"] = 1  # a checkpoint would move this into the main file
        px.commit()
    assert repo.prefix_path("p").stat().st_size > 1 << 20
    source_before = _source_bytes(repo)
    with pytest.raises(NotEnoughSpace) as refused:
        repo.copy_prefix(small_filesystem / "c.hc", "p")
    assert refused.value.fields["needed"] > refused.value.fields["free"]
    assert str(small_filesystem) in str(refused.value)
    assert _source_bytes(repo) == source_before
    assert os.listdir(small_filesystem) == []
    # A prefix that does fit goes through on the same file system.
    with repo.open_prefix("small", "rw") as px:
        px["a"] = 1
        px.commit()
    assert verify_file(repo.copy_prefix(small_filesystem / "small.hc", "small").path).ok


def test_a_disk_that_fills_during_a_copy_is_reported_as_such_and_leaves_nothing(
    repo: Repository, small_filesystem: Path
) -> None:
    """Another program fills the destination while the copy runs (its check of the free space
    passed): the copy fails as ``NotEnoughSpace`` (still an ``OSError`` with ``errno``
    ``ENOSPC``) naming the file it could not write, not as a bare ``[Errno 28]``, and leaves
    no temp behind."""
    with repo.open_prefix("p", "rw") as px:
        for i in range(10):
            px[f"big{i}"] = os.urandom(64 << 10)
            px.commit()
        px.checkpoint()
    source_before = _source_bytes(repo)
    filler = small_filesystem / "filler"

    def fill_the_disk(done: int, total: int) -> None:
        if not filler.exists():
            free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
            with open(filler, "wb") as out:
                os.posix_fallocate(out.fileno(), 0, free)

    with pytest.raises(NotEnoughSpace) as refused:
        repo.copy_prefix(small_filesystem / "c.hc", "p", 64 << 10, fill_the_disk)
    assert refused.value.errno == errno.ENOSPC
    assert str(small_filesystem / "c.hc") in str(refused.value)
    assert os.listdir(small_filesystem) == ["filler"]
    assert _source_bytes(repo) == source_before


def test_a_file_system_out_of_inodes_is_reported_as_out_of_space(
    repo: Repository, tmp_path: Path
) -> None:
    """No inode left for the copy's temp file: the same ``NotEnoughSpace`` naming the copy,
    not a bare ``[Errno 28]`` naming a temp file the user never asked for."""
    with h.tmpfs(tmp_path / "few-inodes", "size=1m,nr_inodes=2") as mount_point:
        (mount_point / "filler").touch()  # the last inode
        with repo.open_prefix("p", "rw") as px:
            px["a"] = 1
            px.commit()
        with pytest.raises(NotEnoughSpace) as refused:
            repo.copy_prefix(mount_point / "c.hc", "p")
        assert str(mount_point / "c.hc") in str(refused.value)
        assert os.listdir(mount_point) == ["filler"]


@pytest.mark.parametrize(
    "replaced", [False, True], ids=["appended meanwhile", "replaced meanwhile"]
)
def test_a_copy_checkpoint_reads_the_wal_ahead_and_then_what_came_after(
    repo: Repository, tmp_path: Path, replaced: bool
) -> None:
    """The copy's checkpoint reads the WAL before it asks for the write lease (so writers do
    not wait for that); what was committed, or checkpointed, before the lease is granted must
    still be in the cut."""
    with repo.open_prefix("p", "rw") as px:
        for i in range(3):
            px[f"k{i}"] = i
            px.commit()
        ahead = Log(repo.root, "p", repo.id_bytes, writable=True)  # as a copy opens it
        assert ahead.seq == 3
        if replaced:
            px.checkpoint()  # a new WAL: what was read ahead is of no use
        for i in range(3, 5):
            px[f"k{i}"] = i
            px.commit()
        expected = _dump(px)
    try:
        with repo.leases.lease("p", "write", timeout=5) as lease:
            ahead.prepare(lease, 0)
            cut = ahead.checkpoint(lease)
    finally:
        ahead.close()
    assert cut.seq == 5 and cut.length == repo.prefix_path("p").stat().st_size
    copy = repo.copy_prefix(tmp_path / "copy.hc", "p")
    assert (copy.seq, copy.length) == (cut.seq, cut.length)
    assert copy.cut_seconds == 0  # the files are settled: no write lease was asked for
    assert _open_standalone(tmp_path / "copy.hc", tmp_path / "standalone") == (5, expected)
    assert verify_file(repo.prefix_path("p")).ok


# -- restore ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "later_checkpoint",
    [
        pytest.param(False, id="stale WAL continues from the copy's own cut"),
        pytest.param(True, id="main file grew after the copy"),
    ],
)
def test_restore_by_replacing_the_main_file_ignores_the_newer_stale_wal(
    repo: Repository, tmp_path: Path, later_checkpoint: bool
) -> None:
    seq, expected = _fill(repo)
    copy = repo.copy_prefix(tmp_path / "copy.hc", "p")
    with repo.open_prefix("p", "rw") as px:
        for i in range(3):  # later history: in the WAL only, or in the main file and the WAL
            px[f"later{i}"] = i
            px["k00"] = "changed later"
            px.commit()
            if later_checkpoint and i == 1:
                px.checkpoint()
    wal_header = fmt.unpack_wal_header(
        repo.prefix_path("p").with_name("p.hc-wal").read_bytes()[: fmt.HEADER_SIZE]
    )
    # Without the checkpoint, the WAL starts exactly at the copy's cut, with the copy's file id:
    # only the copy's fresh salt keeps it from being applied.
    assert (wal_header.base_len == copy.length) is not later_checkpoint
    wal = repo.prefix_path("p").with_name("p.hc-wal")
    stale_wal = wal.read_bytes()
    assert len(stale_wal) > fmt.HEADER_SIZE
    repo.close()

    os.replace(copy.path, repo.root / "p.hc")
    assert wal.read_bytes() == stale_wal

    with Repository(repo.root) as restored:
        with restored.open_prefix("p", "r") as px:
            assert (px.seq, _dump(px)) == (seq, expected)
        with restored.open_prefix("p", "rw") as px:
            px["after-restore"] = True
            assert px.commit() == seq + 1
    with Repository(repo.root) as reopened, reopened.open_prefix("p", "r") as px:
        assert (px.seq, _dump(px)) == (seq + 1, {**expected, "after-restore": True})
    assert verify_file(repo.root / "p.hc").ok


def test_restore_prefix_creates_or_with_force_replaces_a_prefix(
    repo: Repository, tmp_path: Path
) -> None:
    seq, expected = _fill(repo)
    copy = repo.copy_prefix(tmp_path / "copy.hc", "p")
    with repo.open_prefix("p", "rw") as px:
        px["k00"] = "newer"
        px.commit()
    # A new name: created; an existing one: refused without force, nothing changed.
    assert repo.restore_prefix(copy.path, "twin") == seq
    before = _source_bytes(repo)
    with pytest.raises(DestinationExists):
        repo.restore_prefix(copy.path, "p")
    assert _source_bytes(repo) == before
    assert repo.restore_prefix(copy.path, "p", force=True) == seq
    for name in ("twin", "p"):
        with repo.open_prefix(name, "r") as px:
            assert (px.seq, _dump(px)) == (seq, expected)
    # The restored prefix takes commits, and the copy itself is untouched by all of it.
    with repo.open_prefix("p", "rw") as px:
        px["new"] = 1
        assert px.commit() == seq + 1
    assert zlib.crc32(Path(copy.path).read_bytes()) == copy.crc32


def test_restore_during_own_transaction_is_refused_instead_of_waiting_on_itself(
    tmp_path: Path,
) -> None:
    # A short lease timeout: were restore to wait for the exclusive lease our own transaction
    # blocks, it would fail with LeaseTimeout (and hang with the default of no timeout).
    with Repository.init(tmp_path / "repo", lease_timeout=2.0) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = "copied"
        seq = px.commit()
        copy = repo.copy_prefix(tmp_path / "copy.hc", "p")
        px["a"] = "newer"
        px.commit()
        px["b"] = "pending"
        before = _source_bytes(repo)
        with pytest.raises(StorageError, match="transaction in progress"):
            repo.restore_prefix(copy.path, "p", force=True)
        assert _source_bytes(repo) == before
        assert px["b"] == "pending"
        px.rollback()
        assert repo.restore_prefix(copy.path, "p", force=True) == seq
        assert (px.seq, _dump(px)) == (seq, {"a": "copied"})  # the open object follows


def test_restore_of_a_damaged_copy_is_refused_and_changes_nothing(
    repo: Repository, tmp_path: Path
) -> None:
    _fill(repo)
    copy = Path(repo.copy_prefix(tmp_path / "copy.hc", "p").path)
    with repo.open_prefix("p", "rw") as px:
        px["newer"] = 1
        px.commit()
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    before = _tree(repo.root)
    for name, force in (("p", True), ("fresh", False)):
        with pytest.raises(CorruptFileError):
            repo.restore_prefix(copy, name, force=force)
        assert _tree(repo.root) == before
    with repo.open_prefix("p", "r") as px:
        assert px["newer"] == 1


# -- compaction -------------------------------------------------------------------------------


def test_compaction_shrinks_keeps_data_and_seq_and_changes_the_file_id(
    repo: Repository, tmp_path: Path
) -> None:
    px = repo.open_prefix("p", "rw")
    expected: dict[str, Any] = {}
    for round_ in range(40):
        for i in range(8):
            px[f"k{i}"] = {"round": round_, "blob": "x" * 500}
            expected[f"k{i}"] = {"round": round_, "blob": "x" * 500}
        px[f"gone{round_}"] = round_
        if round_:
            del px[f"gone{round_ - 1}"]
            del expected[f"gone{round_ - 1}"]
        expected[f"gone{round_}"] = round_
        px.commit()
        if round_ % 5 == 4:
            px.checkpoint()
    px["in-wal"] = b"\x00bytes"  # the last commit stays in the WAL until compaction
    expected["in-wal"] = b"\x00bytes"
    seq = px.commit()
    before = repo.copy_prefix(tmp_path / "before.hc", "p")
    size_before = repo.prefix_path("p").stat().st_size

    cut = px.compact()

    size_after = repo.prefix_path("p").stat().st_size
    assert size_after < size_before // 10
    assert cut.seq == seq and cut.length == size_after
    assert (px.seq, _dump(px)) == (seq, expected)
    after = repo.copy_prefix(tmp_path / "after.hc", "p")
    assert after.file_id != before.file_id and after.file_id == cut.file_id.hex()
    assert after.seq == seq
    report = verify_file(after.path)
    assert report.ok and report.seq == seq and report.keys == len(expected)
    assert _open_standalone(Path(after.path), tmp_path / "standalone") == (seq, expected)
    # Commits go on from the same sequence, and a fresh open sees everything.
    px["next"] = 1
    assert px.commit() == seq + 1
    px.close()
    with Repository(repo.root) as reopened, reopened.open_prefix("p", "r") as fresh:
        assert (fresh.seq, _dump(fresh)) == (seq + 1, {**expected, "next": 1})


def test_compaction_of_an_emptied_prefix_and_compaction_twice_keep_every_commit(
    repo: Repository, tmp_path: Path
) -> None:
    px = repo.open_prefix("p", "rw")
    px["a"] = 1
    px.commit()
    del px["a"]
    assert px.commit() == 2
    assert px.compact().seq == 2 and len(px) == 0  # no live key, the commit number kept
    empty = repo.copy_prefix(tmp_path / "empty.hc", "p")
    assert verify_file(empty.path).ok and empty.seq == 2
    first_id = empty.file_id
    assert px.compact().seq == 2  # compacting a compacted file: still a valid file
    px["b"] = b"\x01"
    px.commit()
    second = px.compact()
    px["c"] = 3
    assert px.commit() == 4
    after = repo.copy_prefix(tmp_path / "after.hc", "p")
    assert len({first_id, second.file_id.hex()}) == 2 and after.file_id == second.file_id.hex()
    report = verify_file(after.path)
    assert report.ok and (report.seq, report.keys) == (4, 2)
    # A copy of a compacted prefix restores and goes on committing.
    assert repo.restore_prefix(after.path, "restored") == 4
    with repo.open_prefix("restored", "rw") as restored:
        assert _dump(restored) == {"b": b"\x01", "c": 3}
        restored["d"] = 4
        assert restored.commit() == 5
    assert repo.restore_prefix(empty.path, "empty") == 2
    with repo.open_prefix("empty", "r") as restored:
        assert (restored.seq, _dump(restored)) == (2, {})


def test_compaction_refuses_while_a_transaction_is_open(repo: Repository) -> None:
    px = repo.open_prefix("p", "rw")
    px["a"] = 1
    px.commit()
    px["b"] = 2
    before = _source_bytes(repo)
    with pytest.raises(StorageError, match="transaction in progress"):
        px.compact()
    assert _source_bytes(repo) == before
    assert px.commit() == 2


# -- verify_file on copies --------------------------------------------------------------------


def test_verify_file_detects_one_flipped_byte_at_every_offset_of_a_copy(
    repo: Repository, tmp_path: Path
) -> None:
    with repo.open_prefix("p", "rw") as px:
        px["a"] = {"x": [1, 2]}
        px["b"] = b"\x00\x01"
        px.commit()
        px.checkpoint()
        del px["a"]
        px["c"] = "text"
        px.commit()
    copy = Path(repo.copy_prefix(tmp_path / "copy.hc", "p").path)
    good = verify_file(copy)
    assert good.ok and good.seq == 2 and good.segments == 2 and good.keys == 2
    data = bytearray(copy.read_bytes())
    missed = []
    with open(copy, "r+b") as file:
        for offset in range(len(data)):
            file.seek(offset)
            file.write(bytes([data[offset] ^ 0xFF]))
            file.flush()
            report = verify_file(copy)
            if report.ok or report.offset is None or not 0 <= report.offset <= offset:
                missed.append((offset, report))
            file.seek(offset)
            file.write(bytes([data[offset]]))
            file.flush()
    assert missed == []
    assert verify_file(copy) == good


# -- a rate limit (issue 19) --------------------------------------------------------------------


def test_a_rate_limit_paces_the_steps_to_the_average_asked_for() -> None:
    from hotcopy.storage._writeback import RateLimit

    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pace = RateLimit(4 << 20, clock=lambda: now[0], sleep=sleep)
    pace.wrote(4 << 20)  # a step done at once: one second ahead of 4 MiB/s
    assert slept == [pytest.approx(1.0)]
    now[0] += 3.0  # the next step took longer than its share itself
    pace.wrote(1 << 20)
    assert len(slept) == 1
    pace.wrote(16 << 20)  # 21 MiB in 4 s so far: 1.25 s ahead
    assert slept[-1] == pytest.approx(21 / 4 - 4.0)
    with pytest.raises(ValueError, match="positive"):
        RateLimit(0)


def test_a_rate_limited_copy_is_exact_and_takes_at_least_its_bytes_over_the_rate(
    repo: Repository, tmp_path: Path
) -> None:
    with repo.open_prefix("p", "rw") as px:
        for i in range(4):
            px[f"k{i}"] = os.urandom(1 << 20)
        px.commit()
        expected = _dump(px)
    rate = 8 << 20
    result = repo.copy_prefix(tmp_path / "c.hc", "p", 1 << 20, rate_limit=rate)
    # A lower bound only (sleeps never end early): the limiter is at work. A copy of 4 MiB
    # without it takes a few milliseconds here.
    assert result.seconds >= result.size / rate * 0.99
    assert _open_standalone(tmp_path / "c.hc", tmp_path / "w")[1] == expected


def test_a_copy_and_a_restore_read_each_byte_once_to_check_it_and_once_to_copy_it(
    repo: Repository, tmp_path: Path
) -> None:
    """The checks of a copy or a restore (every segment, every checksum) and the CRC it records
    or compares are one pass over the bytes, and a restore of a standalone copy is not preceded
    by a pass of its own: at a disk's speed, each pass is the time of another copy."""
    with repo.open_prefix("p", "rw") as px:
        value = os.urandom(1 << 20)
        for i in range(48):  # above the size at which the checks run beside the copy
            px[f"v{i:03d}"] = value[i:] + value[:i]
            px.commit()
        for i in range(2000):  # and small records, each its own commit
            px[f"s{i}"] = i
            px.commit()
        px.checkpoint()
    size = repo.prefix_path("p").stat().st_size
    before = h.io_count("rchar")
    copied = repo.copy_prefix(tmp_path / "copy.hc", "p")
    read = h.io_count("rchar") - before
    assert read < 2.25 * size, f"a copy of {size} bytes read {read / size:.2f}x of them"
    with Repository.init(tmp_path / "elsewhere") as other:
        before = h.io_count("rchar")
        assert other.restore_prefix(tmp_path / "copy.hc", "p") == copied.seq
        read = h.io_count("rchar") - before
    assert read < 2.25 * size, f"a restore of {size} bytes read {read / size:.2f}x of them"


_LONG = (16 << 20) + 5 * 4096 + 123  # long enough to be written past the page cache


@pytest.mark.parametrize(
    ("start", "out_offset"), [(0, 0), (512, 512), (1, 4095), (12345, 4096), (4096, 4097)]
)
def test_a_long_fsynced_copy_is_exact_wherever_its_ranges_begin_and_end(
    tmp_path: Path, start: int, out_offset: int
) -> None:
    """Written past the page cache in aligned pieces, with the unaligned head and tail through
    it: every byte lands where it belongs, and the CRC is the source range's."""
    data = os.urandom(start + _LONG)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(out, b"h" * out_offset, 0)
        crc = copy_range(src, out, start, len(data), crc=zlib.crc32(b"head"))
    finally:
        os.close(src)
        os.close(out)
    assert crc == zlib.crc32(data[start:], zlib.crc32(b"head"))
    assert (tmp_path / "out").read_bytes() == b"h" * out_offset + data[start:]


_COPY_ON_RAMFS = """
import os, subprocess, sys, zlib
from hotcopy.storage._copy import copy_range
where = sys.argv[1]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "ramfs", "none", where], check=True)
data = os.urandom(int(sys.argv[2]))
src = os.open(os.path.join(where, "src"), os.O_RDWR | os.O_CREAT, 0o600)
os.write(src, data)
out = os.open(os.path.join(where, "out"), os.O_RDWR | os.O_CREAT, 0o600)
os.write(out, b"h" * 512)
assert copy_range(src, out, 0, len(data)) == zlib.crc32(data)
assert os.pread(out, len(data) + 1024, 0) == b"h" * 512 + data
print("exact")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a ramfs in a mount namespace of its own")
def test_a_long_copy_onto_a_file_system_that_refuses_direct_writes_copies_through_the_cache(
    tmp_path: Path,
) -> None:
    """ramfs refuses ``O_DIRECT``: the copy goes the way it went before, whole and exact."""
    where = tmp_path / "ramfs"
    where.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", _COPY_ON_RAMFS, str(where), str(_LONG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "exact", done.stderr


_COPY_AND_RESTORE_PEAK = """
import os, sys
from pathlib import Path
from hotcopy.storage import Repository, verify_file

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

root, where = Path(sys.argv[1]), Path(sys.argv[2])
with Repository(root) as repo:
    before = peak()
    repo.copy_prefix(where / "copy.hc", "p")
    copied = peak()
with Repository.init(where / "restored") as other:
    other.restore_prefix(where / "copy.hc", "p")
    restored = peak()
assert verify_file(where / "copy.hc").ok
print((copied - before) // 1024, (restored - before) // 1024, (peak() - before) // 1024)
"""


def test_a_copy_a_restore_and_a_verify_of_a_large_commit_never_hold_it_whole_in_memory(
    tmp_path: Path,
) -> None:
    """A commit of 64 MiB is checked as it streams by: what a copy, a restore or a verify
    holds does not grow with the largest commit of the prefix (a restore during an outage must
    not need the machine's memory three times over for one bulk load)."""
    with (
        Repository.init(tmp_path / "repo", checkpoint_bytes=BIG) as repo,
        repo.open_prefix("p", "rw") as px,
    ):
        value = os.urandom(1 << 20)
        for i in range(64):
            px[f"v{i:03d}"] = value[i:] + value[:i]
        px.commit()  # one batch of 64 MiB
        px.checkpoint()
    done = subprocess.run(
        [sys.executable, "-c", _COPY_AND_RESTORE_PEAK, str(tmp_path / "repo"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    copied, restored, verified = map(int, done.stdout.split())
    assert copied < 24 and restored < 24 and verified < 24, (
        f"peak grew {copied} MiB (copy), {restored} MiB (restore), {verified} MiB (verify)"
    )


@pytest.mark.parametrize("where", ["value", "op length", "key"])
def test_damage_inside_a_large_commit_is_refused_by_a_copy(
    repo: Repository, tmp_path: Path, where: str
) -> None:
    """The streamed check of a large commit refuses what the whole-body check refused."""
    size = fmt.STREAM_ABOVE // 40 + 1
    with repo.open_prefix("p", "rw") as px:
        for i in range(40):
            px[f"key{i:03d}"] = bytes([i]) * size  # one commit just over the streaming size
        px.commit()
        px.checkpoint()
    main = repo.prefix_path("p")
    data = bytearray(main.read_bytes())
    key = data.find(b"key017")
    at = {"value": key + 6 + size // 2, "op length": key - 8, "key": key + 3}[where]
    data[at] ^= 0x01
    main.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        repo.copy_prefix(tmp_path / "copy.hc", "p")
    assert not (tmp_path / "copy.hc").exists()


def _resident(path: Path) -> float:
    """The share of ``path``'s pages in the page cache, as ``mincore`` tells of a map of it that
    is never touched: looking does not read (a read, even ``RWF_NOWAIT``, starts read-ahead)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        at = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert at != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            pages = -(-size // mmap.PAGESIZE)
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(at, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in vector.raw) / pages
        finally:
            libc.munmap(at, size)
    finally:
        os.close(fd)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_restore_reads_the_next_small_pieces_ahead_and_never_opens_anything_else(
    tmp_path: Path,
) -> None:
    """A restore of many small prefixes asks the kernel for the next prefix's pieces while it
    restores this one, so the disk is read while the CPU checks (``cp -r`` reads one file at a
    time). The hint opens only regular files: a FIFO planted as a piece does not block it, and
    a missing piece or a link is left for the restore itself to report."""
    from hotcopy.storage._copy import Piece, read_ahead

    piece = tmp_path / "piece.hc"
    piece.write_bytes(os.urandom(1 << 20))
    _evict(piece)
    if _resident(piece) > 0:
        pytest.skip("this file system keeps the pages of a file it was asked to drop (tmpfs)")
    os.mkfifo(tmp_path / "fifo.hc")
    (tmp_path / "link.hc").symlink_to(piece)
    planted = [Piece(tmp_path / name, 1 << 20, None) for name in ("fifo.hc", "gone.hc", "link.hc")]
    read_ahead(planted)
    read_ahead([Piece(piece, 2 << 30, None)])  # too large to be read ahead whole
    assert _resident(piece) == 0, "a link or a large piece was read ahead"
    read_ahead([Piece(piece, 1 << 20, None)])
    deadline = time.monotonic() + 10  # the kernel reads asynchronously; nothing here reads
    while _resident(piece) < 1:
        assert time.monotonic() < deadline, f"{_resident(piece):.0%} of the piece read ahead"
