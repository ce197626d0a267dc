"""The damage model (README, "Damage"): damage is never mistaken for a torn tail, never written
over, and named with its file and offset and the way out; every file names its repository and
prefix; refusals instead of hangs. Real files throughout; damage is made by flipping bytes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import (
    CorruptFileError,
    FileLeases,
    Prefix,
    Repository,
    StorageError,
    verify_file,
)
from hotcopy.storage import _format as fmt
from hotcopy.workers import main as cli
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = pytest.mark.timeout(60)

BIG = 1 << 40  # a checkpoint threshold no test reaches: keeps commits in the WAL


def _ten_commits(root: Path, name: str = "p", *, checkpointed: int = 0) -> dict[str, Any]:
    """A prefix with commits 1..10 (the first ``checkpointed`` of them in the main file)."""
    model: dict[str, Any] = {}
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix(name, "rw")
        for i in range(1, 11):
            px[f"key{i}"] = model[f"key{i}"] = {"i": i, "pad": "v" * 20}
            assert px.commit() == i
            if i == checkpointed:
                px.checkpoint()
    return model


def _six_commits(root: Path, checkpointed: int) -> list[int]:
    """Commits ``k1..k6 = 1..6``, each of the first ``checkpointed`` in a segment of its own;
    the main file's size after each of those checkpoints."""
    ends = []
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 7):
            px[f"k{i}"] = i
            px.commit()
            if i <= checkpointed:
                px.checkpoint()
                ends.append((root / "p.hc").stat().st_size)
    return ends


def _wal_batches(wal: Path) -> list[fmt.Batch]:
    data = wal.read_bytes()
    header = fmt.unpack_wal_header(data[: fmt.HEADER_SIZE])
    assert header is not None
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        batches = []
        while (batch := fmt.read_batch(reader, load_values=True)) is not None:
            batches.append(batch)
        return batches
    finally:
        os.close(fd)


def _position(batch: fmt.Batch, where: str) -> int:
    op = batch.ops[0]
    key_len = len(op.key.encode())
    return {
        "batch header": batch.offset + 5,
        "op header": op.offset + 3,
        "key": op.offset + fmt.OP_SIZE + 1,
        "value": op.offset + fmt.OP_SIZE + key_len + 3,
    }[where]


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = cli(["verify", str(path)])
    out = capsys.readouterr()
    return status, out.out + out.err


@pytest.mark.parametrize("where", ["batch header", "op header", "key", "value"])
def test_a_flipped_byte_in_a_wal_batch_with_intact_batches_after_it_is_damage(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    _ten_commits(root)
    wal = root / "p.hc-wal"
    third = _wal_batches(wal)[2]
    h.flip_byte(wal, _position(third, where), 0x10)
    before = wal.read_bytes(), (root / "p.hc").read_bytes()

    status, output = _verify(root, capsys)
    assert status == 1, output
    assert "p.hc-wal" in output and str(third.offset) in output and "DAMAGED" in output
    for mode in ("r", "rw"):
        with Repository(root) as repo, pytest.raises(CorruptFileError) as caught:
            repo.open_prefix("p", mode)
        message = str(caught.value)
        assert "p.hc-wal" in message and str(third.offset) in message
        assert "hotcopy salvage" in message
    # A writer that tries anyway changes nothing.
    with Repository(root) as repo, pytest.raises(CorruptFileError):
        px = repo.open_prefix("p", "rw")
        px["new"] = 1
        px.commit()
    assert (wal.read_bytes(), (root / "p.hc").read_bytes()) == before


def test_a_flipped_byte_in_a_checkpointed_segment_with_later_segments_is_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    _six_commits(root, checkpointed=6)
    main = root / "p.hc"
    size = main.stat().st_size
    h.flip_byte(main, fmt.HEADER_SIZE + fmt.BATCH_SIZE + 2)  # the first segment's op header
    status, output = _verify(root, capsys)
    assert status == 1 and "p.hc" in output and str(fmt.HEADER_SIZE) in output
    for mode in ("r", "rw"):
        # Opening reads the index, not old segments: the damage shows where its bytes are
        # needed, and the key is never taken for absent.
        with Repository(root) as repo:
            px = repo.open_prefix("p", mode)
            assert list(px) == [f"k{i}" for i in range(1, 7)]
            with pytest.raises(CorruptFileError, match="salvage"):
                px["k1"]
            assert [px[f"k{i}"] for i in range(2, 7)] == [2, 3, 4, 5, 6]
            if mode == "rw":
                with pytest.raises(CorruptFileError, match="salvage"):
                    px.compact()  # a rewrite reads every record: it refuses
    assert main.stat().st_size == size


def test_the_last_batch_cut_short_is_a_torn_tail_and_its_sequence_is_never_acknowledged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    model = _ten_commits(root)
    wal = root / "p.hc-wal"
    last = _wal_batches(wal)[-1]
    data = wal.read_bytes()
    wal.write_bytes(data[: last.offset + last.size // 2])  # a crash mid-append: nothing after
    status, output = _verify(root, capsys)
    assert status == 0 and "torn tail" in output
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert px.seq == 9 and "key10" not in px
        px["again"] = 1
        assert px.commit() == 10
    del model["key10"]
    with Repository(root) as repo:
        assert dict(repo.open_prefix("p").items()) == model | {"again": 1}


def test_a_whole_batch_that_does_not_follow_is_damage_not_a_tail(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _ten_commits(root)
    wal = root / "p.hc-wal"
    used = h.wal_used(wal, fmt.HEADER_SIZE)
    with open(wal, "r+b") as f:  # a whole, checksummed batch that does not follow commit 10
        f.seek(used)
        f.write(fmt.encode_batch(19, 1, [fmt.encode_op(fmt.OP_PUT, "ghost", 1, b"1")]))
    with Repository(root) as repo, pytest.raises(CorruptFileError, match="salvage"):
        repo.open_prefix("p", "rw")


# -- identity: every file names its repository and prefix ------------------------------------


def test_a_damaged_wal_header_in_front_of_batches_is_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    _ten_commits(root)
    wal = root / "p.hc-wal"
    h.flip_byte(wal, 20)
    status, output = _verify(root, capsys)
    assert status == 1 and "p.hc-wal" in output
    with Repository(root) as repo, pytest.raises(CorruptFileError, match="salvage"):
        repo.open_prefix("p", "r")


def test_swapped_wals_of_two_prefixes_are_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _ten_commits(root, "p")
    _ten_commits(root, "q")
    os.rename(root / "p.hc-wal", root / "swap")
    os.rename(root / "q.hc-wal", root / "p.hc-wal")
    os.rename(root / "swap", root / "q.hc-wal")
    with Repository(root) as repo:
        for name, other in (("p", "q"), ("q", "p")):
            with pytest.raises(CorruptFileError, match=f"prefix '{other}'"):
                repo.open_prefix(name, "r")


def test_a_main_file_of_another_prefix_or_repository_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _ten_commits(root, "p", checkpointed=10)
    _ten_commits(root, "q", checkpointed=10)
    _ten_commits(tmp_path / "other", "p", checkpointed=10)
    shutil.copy(root / "q.hc", root / "p.hc")
    with Repository(root) as repo, pytest.raises(CorruptFileError, match="prefix 'q'"):
        repo.open_prefix("p", "r")
    shutil.copy(tmp_path / "other" / "p.hc", root / "p.hc")
    with Repository(root) as repo, pytest.raises(CorruptFileError, match="repository"):
        repo.open_prefix("p", "r")


@pytest.mark.parametrize("cut", ["header", "segment boundary"])
def test_a_main_file_shorter_than_its_wal_proves_is_refused(
    tmp_path: Path, cut: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 4):
            px[f"k{i}"] = i
            px.commit()
            px.checkpoint()
            if i == 1:
                first_end = (root / "p.hc").stat().st_size
        px["wal"] = "only"
        px.commit()
    main = root / "p.hc"
    os.truncate(main, fmt.HEADER_SIZE if cut == "header" else first_end)
    status, output = _verify(root, capsys)
    assert status == 1, output
    with Repository(root) as repo, pytest.raises(CorruptFileError, match=r"shortened|unreadable"):
        repo.open_prefix("p", "r")


def test_restore_by_replacing_the_main_file_with_a_copy_still_works(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = "old"
        px.commit()
        repo.copy_prefix(tmp_path / "copy.hc", prefix="p")
        px["a"] = "new"
        px.commit()
        px.checkpoint()
        px["b"] = "wal only"
        px.commit()
    os.replace(tmp_path / "copy.hc", root / "p.hc")
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert dict(px.items()) == {"a": "old"} and px.seq == 1
        px["c"] = 1
        assert px.commit() == 2


# -- refusals instead of hangs or silent loss -------------------------------------------------


@pytest.mark.parametrize("how", ["itself", "hard link", "symlink"])
def test_restoring_a_prefix_from_its_own_live_main_file_is_refused(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    model = _ten_commits(root, checkpointed=5)
    source = root / "p.hc"
    if how == "hard link":
        source = tmp_path / "link.hc"
        os.link(root / "p.hc", source)
    elif how == "symlink":
        source = tmp_path / "sym.hc"
        source.symlink_to(root / "p.hc")
    assert cli(["restore", str(source), str(root), "--prefix", "p", "--force"]) == 1
    assert "own main file" in capsys.readouterr().err
    with Repository(root) as repo:
        px = repo.open_prefix("p")
        assert dict(px.items()) == model and px.seq == 10


def test_a_fifo_where_a_main_file_belongs_is_refused_at_once(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    os.mkfifo(root / "f.hc")
    result = subprocess.run(
        [sys.executable, "-m", "hotcopy.workers", "get", str(root), "f", "k"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1 and "FIFO" in result.stderr, result.stderr


# -- debris of an unfinished checkpoint is a note, not damage --------------------------------


def test_debris_after_the_last_segment_that_the_wal_covers_is_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    model = _ten_commits(root, checkpointed=5)
    main = root / "p.hc"
    with open(main, "ab") as f:  # a checkpoint that died mid-write, as after ENOSPC
        f.write(b"\x48\x43\x42\x31" + os.urandom(300))
    status, output = _verify(root, capsys)
    assert status == 0 and "debris" in output, output
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert dict(px.items()) == model
        px.checkpoint()
    status, output = _verify(root, capsys)
    assert status == 0, output


# -- the way out: hotcopy salvage ------------------------------------------------------------


def test_salvage_keeps_what_is_provable_and_moves_the_damaged_wal_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    model = _ten_commits(root, checkpointed=2)
    wal = root / "p.hc-wal"
    h.flip_byte(wal, _position(_wal_batches(wal)[3], "value"))  # commit 6
    damaged = wal.read_bytes()
    capsys.readouterr()
    assert cli(["salvage", str(root), "p"]) == 0
    output = capsys.readouterr().out
    assert "kept commits 1-5" in output and "lost commits 6-10" in output, output
    aside = [path for path in root.iterdir() if path.name.startswith("p.hc-wal.damaged")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert dict(px.items()) == {f"key{i}": model[f"key{i}"] for i in range(1, 6)}
        # Commits 6-10 were acknowledged once: their numbers stay taken (as empty commits).
        assert px.seq == 10
        px["after"] = 1
        assert px.commit() == 11
    status, output = _verify(root, capsys)
    assert status == 0, output


def test_salvage_of_a_sound_prefix_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    _ten_commits(root, checkpointed=4)

    def files() -> list[tuple[str, bytes]]:
        return sorted((p.name, p.read_bytes()) for p in root.iterdir() if p.is_file())

    before = files()
    assert cli(["salvage", str(root), "p"]) == 0
    assert "nothing to salvage" in capsys.readouterr().out
    assert files() == before


def test_errors_are_storage_errors_with_offsets(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _ten_commits(root)
    h.flip_byte(root / "p.hc-wal", _position(_wal_batches(root / "p.hc-wal")[1], "key"))
    with Repository(root) as repo, pytest.raises(StorageError) as caught:
        repo.open_prefix("p")
    assert isinstance(caught.value, CorruptFileError) and caught.value.fields["offset"] > 0


# -- an fsync failure is never retried and trusted --------------------------------------------

FSYNC_VICTIM = r"""
import sys
from hotcopy.storage import Repository, StorageError

with Repository(sys.argv[1], checkpoint_bytes=int(sys.argv[2])) as repo:
    px = repo.open_prefix("p", "rw")
    acked = []
    for i in range(1, 30):
        try:
            px[f"k{i}"] = "x" * 100
            acked.append(px.commit())
        except StorageError as err:
            print("failed", i, err)
            break
    try:
        px["after"] = 1
        px.commit()
        print("committed after the failure")
    except StorageError as err:
        print("refused after the failure:", err)
    print("acked", " ".join(map(str, acked)))
"""


@pytest.mark.parametrize(
    ("point", "checkpoint_bytes"), [("commit:wal-fsync", 1 << 40), ("checkpoint:main-fsync", 500)]
)
def test_after_an_fsync_failure_the_process_stops_writing_and_the_next_opener_recovers(
    tmp_path: Path, point: str, checkpoint_bytes: int
) -> None:
    root = tmp_path / "repo"
    Repository.init(root).close()
    result = h.run_python(
        FSYNC_VICTIM,
        str(root),
        str(checkpoint_bytes),
        env={"HOTCOPY_FAULT_EIO": point, "HOTCOPY_FAULT_AFTER": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert "refused after the failure" in result.stdout, result.stdout
    assert "stopped writing" in result.stdout, result.stdout
    acked = [int(seq) for seq in result.stdout.split("acked")[1].split()]
    assert acked == list(range(1, len(acked) + 1)) and acked
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert all(f"k{seq}" in px for seq in acked) and "after" not in px
        px["next"] = 1
        px.commit()
        px.checkpoint()
    assert verify_file(root / "p.hc").ok


def test_salvage_of_a_damaged_main_file_keeps_the_segments_before_the_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    second_end = _six_commits(root, checkpointed=4)[1]  # commits 5 and 6 in the WAL
    main = root / "p.hc"
    damaged = bytearray(main.read_bytes())
    damaged[second_end + fmt.BATCH_SIZE + 2] ^= 0x40  # commit 3's op header
    main.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert cli(["salvage", str(root), "p"]) == 0
    output = capsys.readouterr().out
    assert "kept commits 1-2" in output and "lost commits 3-6" in output, output
    aside = {
        path.name.split(".damaged-")[0]: path for path in root.iterdir() if ".damaged-" in path.name
    }
    assert sorted(aside) == ["p.hc", "p.hc-wal"]
    assert aside["p.hc"].read_bytes() == bytes(damaged)
    with Repository(root) as repo:
        px = repo.open_prefix("p", "rw")
        assert dict(px.items()) == {"k1": 1, "k2": 2} and px.seq == 6
        px["after"] = 1
        assert px.commit() == 7
    status, output = _verify(root, capsys)
    assert status == 0, output


def test_a_whole_batch_after_what_a_log_read_is_read_not_cut_as_a_torn_tail(
    tmp_path: Path,
) -> None:
    """A sound commit at the point a log has read to (appended by another writer after that
    log last looked) is read on, never taken for a torn tail: a writer's prepare truncates a
    torn tail, and an acknowledged commit would go with it (found by the chaos stress run: a
    successor's cut dropped the commit its predecessor had just acknowledged)."""
    from hotcopy.storage._log import Log

    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = 1
        px.commit()
        log = Log(root, "p", repo.id_bytes, writable=True)  # it has read commit 1
        try:
            px["b"] = 2
            assert px.commit() == 2
            assert log._tail_is_clean()  # not torn: commit 2 is whole and sound
            assert log.seq == 2
        finally:
            log.close()
        px.close()
        assert dict(repo.open_prefix("p", "r").items()) == {"a": 1, "b": 2}


def _last_wal_batch(wal: Path) -> fmt.Batch:
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, os.fstat(fd).st_size)
        last = None
        while (batch := fmt.read_batch(reader, load_values=True)) is not None:
            last = batch
    finally:
        os.close(fd)
    assert last is not None
    return last


@contextlib.contextmanager
def _writer_and_reader(root: Path) -> Iterator[tuple[Prefix, Callable[[], Prefix]]]:
    """A new repository at ``root``: prefix ``p`` open for writing, and a way to open it for
    reading in a second view (two repository objects, as two processes would have)."""
    Repository.init(root).close()
    leases = root / ".hotcopy"
    with Repository(root, leases=FileLeases(leases)) as writing, Repository(
        root, leases=FileLeases(leases)
    ) as reading:
        yield writing.open_prefix("p", "rw"), lambda: reading.open_prefix("p", "r")


def test_a_reader_that_follows_reports_a_damaged_batch_that_later_commits_follow(
    tmp_path: Path,
) -> None:
    """A WAL batch a following reader has not read yet is damaged, and the writer commits on:
    the reader must report the damage (as one that opens now does), not take the batch for a
    write in progress for ever and serve the state before it while later commits are
    acknowledged; the writer stops acknowledging commits once its checkpoint finds it."""
    root = tmp_path / "repo"
    with _writer_and_reader(root) as (writer, open_reader):
        writer["a"] = 1
        writer.commit()
        reader = open_reader()
        assert reader["a"] == 1
        writer["a"] = 2
        writer["b"] = "x" * 100
        writer.commit()
        damaged = _last_wal_batch(root / "p.hc-wal")
        h.flip_byte(root / "p.hc-wal", damaged.offset + fmt.BATCH_SIZE + 40, 0x10)
        for value in range(3, 6):
            writer["a"] = value
            writer.commit()
        with pytest.raises(CorruptFileError):
            reader["a"]
        # The writer finds it when its checkpoint reads the WAL again, and acknowledges no
        # commit after it (they are not recovered without a salvage).
        with pytest.raises(CorruptFileError):
            writer.checkpoint()
        with pytest.raises(CorruptFileError, match="stopped writing"):
            writer["a"] = 9
            writer.commit()


def test_a_reader_that_follows_reports_a_main_file_cut_short_below_what_it_read(
    tmp_path: Path,
) -> None:
    """The main file is cut inside its last segment while a reader follows the prefix: the
    reader must report it (it went on serving the keys whose bytes were left)."""
    root = tmp_path / "repo"
    with _writer_and_reader(root) as (writer, open_reader):
        for value in range(3):
            writer[f"k{value}"] = "x" * 100
            writer.commit()
            writer.checkpoint()
        reader = open_reader()
        assert reader["k0"] == "x" * 100
        os.truncate(root / "p.hc", os.path.getsize(root / "p.hc") - 10)
        with pytest.raises(CorruptFileError, match="cut short"):
            reader["k0"]
