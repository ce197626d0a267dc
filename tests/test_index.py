"""The persistent key index (format 3): a prefix opens by reading its index, not its main file;
the index agrees with the data through checkpoints, merges, compactions and reopens; damage to
it is reported, never taken for a missing key; older files are refused until migrated."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hotcopy.storage import (
    CorruptFileError,
    FileLeases,
    NeedsMigration,
    Repository,
    StorageError,
    _index,
    verify_file,
)
from hotcopy.storage import _format as fmt
from hotcopy.storage._codec import encode_value
from hotcopy.storage._crc import crc32
from hotcopy.storage._log import Log, check_main_file
from hotcopy.storage._prefix import Prefix
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = pytest.mark.timeout(120)

PROGRAM = [sys.executable, "-m", "hotcopy.workers"]
DATA = Path(__file__).parent / "data"


def _repo(root: Path, **options: object) -> Repository:
    if not (root / "hotcopy.json").exists():
        Repository.init(root).close()
    return Repository(root, leases=FileLeases(root / ".hotcopy"), **options)  # type: ignore[arg-type]


def _fill(root: Path, count: int) -> None:
    with _repo(root) as repo:
        prefix = repo.open_prefix("big", "rw")
        for start in range(0, count, 5000):
            for i in range(start, min(start + 5000, count)):
                prefix[f"key{i:08d}"] = "v" * 100
            prefix.commit()
        prefix.checkpoint()


_OPEN_AND_GET = """
import struct
import sys
from pathlib import Path
from hotcopy.storage import FileLeases, Repository

def rchar():
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])

root = Path(sys.argv[1])
before = rchar()
with Repository(root, leases=FileLeases(root / ".hotcopy")) as repo:
    prefix = repo.open_prefix("big", "r")
    value = prefix["key00012345"]
    count = len(prefix)
print(rchar() - before, count, len(value))
"""


def _open_and_get(root: Path) -> tuple[int, int, int]:
    """In a fresh process: bytes read to open prefix ``big`` and get a key, its number of
    keys, and the length of the value got."""
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_AND_GET, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    read, count, length = map(int, result.stdout.split())
    return read, count, length


def test_a_prefix_opens_and_reads_a_key_without_reading_its_main_file(tmp_path: Path) -> None:
    """Open + first get read a few kilobytes of a main file of megabytes (the old open read
    every segment to build an index in memory)."""
    root = tmp_path / "repo"
    _fill(root, 40_000)
    size = (root / "big.hc").stat().st_size
    assert size > 4 << 20
    read, count, length = _open_and_get(root)
    assert (count, length) == (40_000, 100)
    assert read < 256 << 10, f"open + get read {read} bytes of a {size}-byte main file"


def _colliding_texts() -> tuple[str, str]:
    """Two text keys of one crc32 (of their UTF-8), the hash the index's table probes by."""
    rnd = random.Random(20)
    seen: dict[int, str] = {}
    while True:
        other = rnd.randbytes(8).hex()
        twin = seen.setdefault(crc32(other.encode()), other)
        if twin != other:
            return twin, other


def test_a_get_of_a_checkpointed_key_reads_its_slot_and_its_record_only(tmp_path: Path) -> None:
    """A get reads the index's slot for the key and the record it points to: two reads (a
    third, of the key's index entry, cost a quarter of a get). A key that shares its hash with
    another is still told apart, by the record's own key."""
    root = tmp_path / "repo"
    _fill(root, 40_000)
    twin, other = _colliding_texts()
    with _repo(root) as repo:
        prefix = repo.open_prefix("big", "rw")
        prefix[twin] = "twin"
        prefix.commit()
        prefix.checkpoint()
        prefix.close()
        reader = repo.open_prefix("big", "r")
        keys = [f"key{i:08d}" for i in random.Random(7).sample(range(40_000), 2000)]
        for key in keys:  # every index page a get touches is read, and checked, once
            assert reader[key] == "v" * 100
        before = h.io_count("syscr")
        for key in keys:
            reader[key]
        reads = h.io_count("syscr") - before
        # A probe whose few slots read at once miss the key reads the next few: rarely.
        assert reads < 2.5 * len(keys), f"{reads / len(keys):.2f} reads a get"
        assert reader[twin] == "twin"
        assert other not in reader and reader.get(other) is None


@pytest.mark.parametrize("leases", ["files", "coordinator"])
def test_a_prefix_whose_writer_closed_opens_without_replaying_its_wal(
    tmp_path: Path, leases: str
) -> None:
    """The writer that closes last moves its commits into the main file, as SQLite's last
    connection does: the next process opens an index, it does not replay a WAL of commits."""
    root = tmp_path / "repo"
    _fill(root, 40_000)
    repo = _repo(root) if leases == "files" else Repository(root)
    with repo:
        prefix = repo.open_prefix("big", "rw")
        for i in range(600):  # ~600 KiB of commits, below the automatic checkpoint
            prefix[f"key{i:08d}"] = "w" * 1000
            prefix.commit()
        prefix.close()
    read, count, length = _open_and_get(root)
    assert (count, length) == (40_000, 100)
    assert read < 256 << 10, f"open + get read {read} bytes: the WAL was replayed"
    with _repo(root) as reader:
        assert reader.open_prefix("big", "r")["key00000599"] == "w" * 1000


# What an application process that only reads and writes prefixes must not load: the server's
# election lock (filelock brings asyncio), psutil, OpenSSL (through hashlib or secrets), the
# process launcher and ctypes.util. Together about 8 MiB per process, half of its size. And
# dataclasses, which loads inspect, ast, dis and tokenize: 1.5 MiB more. And zlib-ng's CRC
# (0.5 MiB), which only bulk data needs.
_HEAVY = (
    "filelock",
    "psutil",
    "hashlib",
    "_hashlib",
    "secrets",
    "subprocess",
    "ctypes.util",
    "dataclasses",
    "inspect",
    "zlib_ng",
)

_OPEN_AND_LIST_MODULES = """
import json, sys
from pathlib import Path
from hotcopy.storage import Repository
with Repository(Path(sys.argv[1])) as repo:
    prefix = repo.open_prefix("big", "r")
    prefix["key00000001"]
print(json.dumps(sorted(sys.modules)))
"""


def test_a_process_that_opens_a_prefix_through_the_coordinator_loads_no_heavy_module(
    tmp_path: Path,
) -> None:
    """Peak memory of a reader is mostly the modules it imports: a client must not load
    the server's or the operator tools' modules."""
    root = tmp_path / "repo"
    _fill(root, 10)
    result = subprocess.run(  # the coordinator it starts is stopped by conftest
        [sys.executable, "-c", _OPEN_AND_LIST_MODULES, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert not loaded.intersection(_HEAVY), sorted(loaded.intersection(_HEAVY))


def _check_against(prefix: object, model: dict[str, object]) -> None:
    assert len(prefix) == len(model)  # type: ignore[arg-type]
    assert list(prefix) == sorted(model)  # type: ignore[call-overload]
    for key, value in model.items():
        assert prefix[key] == value  # type: ignore[index]


_READ_ALL = """
import json, sys
from pathlib import Path
from hotcopy.storage import FileLeases, Repository
root = Path(sys.argv[1])
with Repository(root, leases=FileLeases(root / ".hotcopy")) as repo:
    prefix = repo.open_prefix("p", "r")
    print(json.dumps({key: prefix[key] for key in prefix}))
"""


def test_the_index_agrees_with_a_dict_through_merges_compactions_and_reopens(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    rnd = random.Random(18)
    model: dict[str, object] = {}
    keys = [f"k{i:04d}" for i in range(400)] + ["", "é", "\U0001f389", "z" * 300]
    repo = _repo(root, checkpoint_bytes=6000)  # a checkpoint every few commits: many merges
    follower_repo = _repo(root)
    try:
        writer = repo.open_prefix("p", "rw")
        follower = follower_repo.open_prefix("p", "r")
        for step in range(400):
            for _ in range(rnd.randint(1, 12)):
                key = rnd.choice(keys)
                if model and rnd.random() < 0.3:
                    gone = rnd.choice(sorted(model))
                    del writer[gone]
                    del model[gone]
                else:
                    value = {"step": step, "pad": "x" * rnd.randint(0, 80)}
                    writer[key] = value
                    model[key] = value
            writer.commit()
            if step % 50 == 49:
                _check_against(follower, model)
            if step % 97 == 96:
                writer.compact()
            if step % 131 == 130:
                writer.close()
                writer = repo.open_prefix("p", "rw")
                _check_against(writer, model)
        _check_against(writer, model)
        _check_against(follower, model)
        writer.checkpoint()
    finally:
        follower_repo.close()
        repo.close()
    result = subprocess.run(
        [sys.executable, "-c", _READ_ALL, str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == model
    report = verify_file(root / "p.hc")
    assert report.ok and report.keys == len(model), report


def _last_segment(main: Path) -> fmt.Segment:
    """The main file's last segment (with where its key index record lies)."""
    fd = os.open(main, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, size)
        last = None
        while reader.pos < size:
            segment = fmt.read_segment(reader, load_values=False)
            assert segment is not None
            last = segment
    finally:
        os.close(fd)
    assert last is not None and last.index_end is not None
    return last


def _index_record_span(segment: fmt.Segment) -> tuple[int, int]:
    assert segment.index_end is not None
    return segment.batches[-1].offset + segment.batches[-1].size, segment.index_end


def _rebuild_the_index(
    main: Path, change: Callable[[list[_index.Entry]], list[_index.Entry]]
) -> fmt.Segment:
    """Rewrite the key index of ``main``'s one segment from ``change`` of its sorted entries,
    every CRC right (a wrong build, not damage); the segment."""
    data = main.read_bytes()
    segment = _last_segment(main)
    start, _ = _index_record_span(segment)
    assert segment.start == fmt.HEADER_SIZE  # the one segment: its index has no runs before it
    entries = fmt.frame_entries(data[segment.start : start], segment.start)
    record = _index.encode_record(
        _index.KeyIndex.empty(), change(sorted(entries.items())), start, _confirm_by([])
    )
    trailer = fmt.segment_trailer(segment.start, segment.batches, _index.record_crc(record))
    main.write_bytes(data[:start] + record + trailer)
    return segment


def test_damage_in_the_index_is_reported_never_taken_for_a_missing_key(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, 3000)
    main = root / "big.hc"
    pristine = main.read_bytes()
    start, end = _index_record_span(_last_segment(main))
    assert end - start > 4 * _index.PAGE
    keys = [f"key{i:08d}" for i in range(3000)]
    for at in sorted({start + 3, start + 20, *range(start + 100, end, 997), end - 30, end - 3}):
        damaged = bytearray(pristine)
        damaged[at] ^= 0x40
        main.write_bytes(bytes(damaged))
        report = verify_file(main)
        assert not report.ok, f"a flipped byte at {at} passed verify"
        with _repo(root) as repo:
            try:
                prefix = repo.open_prefix("big", "r")
                for key in keys:
                    with contextlib.suppress(CorruptFileError):
                        assert prefix[key] == "v" * 100
            except CorruptFileError:
                pass  # the directory or a run header: refused at open
    main.write_bytes(pristine)
    assert verify_file(main).ok


def test_verify_finds_an_index_that_checks_but_does_not_match_the_data(tmp_path: Path) -> None:
    """A well-formed index (every CRC right) that lost a key is still found out."""
    root = tmp_path / "repo"
    _fill(root, 500)
    main = root / "big.hc"
    _rebuild_the_index(main, lambda entries: [e for e in entries if e[0] != b"key00000042"])
    fd = os.open(main, os.O_RDONLY)
    try:
        found = check_main_file(fd)
    finally:
        os.close(fd)
    assert found.error is not None and "does not match the data" in found.error, found
    assert "key00000042" in found.error


def test_a_copy_and_its_restore_check_the_index_by_its_checksums_and_leave_its_build_to_verify(
    tmp_path: Path,
) -> None:
    """Copy and restore check every byte against its checksum once, at the speed of a CRC: a
    walk of every index entry through the table (Python, a few microseconds an entry) made a
    copy of small records run at 30 MB/s. An index that is damaged is still refused (see the
    flipped-byte tests); one that every CRC vouches for but that was built wrong (no disk does
    that, a bug does) is copied byte for byte, and ``verify`` names it."""
    root = tmp_path / "repo"
    _fill(root, 500)
    main = root / "big.hc"
    segment = _rebuild_the_index(main, lambda entries: entries[::-1])
    report = verify_file(main)
    assert not report.ok and "key index" in str(report.error), report

    with _repo(root) as repo:
        copied = repo.copy_prefix(tmp_path / "copy.hc", "big")
        assert copied.seq == segment.last_seq
    assert (tmp_path / "copy.hc").read_bytes()[fmt.HEADER_SIZE :] == main.read_bytes()[
        fmt.HEADER_SIZE :
    ]
    with _repo(tmp_path / "restored") as repo:
        assert repo.restore_prefix(tmp_path / "copy.hc", "big") == segment.last_seq


def _legacy_repo(tmp_path: Path, version: int = 2) -> Path:
    root = tmp_path / "legacy"
    root.mkdir(mode=0o700)
    with tarfile.open(DATA / f"format{version}-repo.tar.gz") as archive:
        archive.extractall(root, filter="data")
    return root


def _legacy_model() -> dict[str, object]:
    """What tests/data/format{2,3}-repo.tar.gz hold in prefix "legacy" (made by
    tests/data/make_legacy_repo.py: 300 keys, every 7th deleted, "late" added, key0001
    deleted)."""
    model: dict[str, object] = {
        f"key{i:04d}": {"n": i, "text": "é" * (i % 7)} for i in range(300) if i % 7
    }
    model["late"] = [1, 2, 3]
    del model["key0001"]
    return model


@pytest.mark.parametrize("version", [2, 3])
def test_older_files_are_refused_until_migrated_then_read_exactly(
    tmp_path: Path, version: int
) -> None:
    root = _legacy_repo(tmp_path, version)
    if version == 3:  # its index is checked (entries, pages), not looked up in
        assert verify_file(root / "legacy.hc").ok
    with _repo(root) as repo, pytest.raises(NeedsMigration) as refused:
        repo.open_prefix("legacy", "r")
    assert f"hotcopy migrate {root}" in str(refused.value)
    assert f"format {version}" in str(refused.value)
    result = subprocess.run(
        [*PROGRAM, "migrate", str(root), "--json"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["migrated"] == {"empty": version, "legacy": version}
    assert report["format"] == 4
    with _repo(root) as repo:
        legacy = repo.open_prefix("legacy", "rw")
        _check_against(legacy, _legacy_model())
        assert len(repo.open_prefix("empty", "r")) == 0
        legacy["after"] = 1
        legacy.commit()
        legacy.checkpoint()
    for name in ("legacy", "empty"):
        assert verify_file(root / f"{name}.hc").ok
    again = subprocess.run(
        [*PROGRAM, "migrate", str(root)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "0 of 2 prefixes migrated" in again.stdout, again


def _confirm_by(entries: list[_index.Entry]) -> _index.Confirm[int]:
    """A confirm for runs of made-up ``entries``, whose ops are nowhere: the op an offset and
    CRC name holds the key whose entry names them; the target is what it makes of it."""
    ops = {target: key for key, target in entries if target}

    def confirm(read: _index.Read, key: bytes, offset: int, op_crc: int) -> int | None:
        target = _index.target_of(offset, op_crc)
        return target if ops.get(target) == key else None

    return confirm


def _colliding_keys(pairs: int) -> list[tuple[bytes, bytes]]:
    """Pairs of distinct keys with the same crc32 (the hash a run's table probes by)."""
    seen: dict[int, bytes] = {}
    found: list[tuple[bytes, bytes]] = []
    rnd = random.Random(20)  # random keys: crc32 of counted ones collides late (it is linear)
    while len(found) < pairs:
        key = rnd.randbytes(12)
        other = seen.setdefault(crc32(key), key)
        if other != key:
            found.append((other, key))
    return found


def test_a_run_finds_every_key_across_collisions_page_edges_and_the_table_end() -> None:
    """Lookups read a few slots at once: keys whose probes cross a page edge or wrap around
    the table, keys that share a crc32 with another key (present, deleted or absent), all
    found or refused exactly; a run whose file ends inside its table is reported damaged."""
    collisions = _colliding_keys(8)
    present = [f"k{n:05d}".encode() for n in range(3000)]
    present += [first for first, _ in collisions[:3]] + [b for pair in collisions[3:] for b in pair]
    absent = [second for _, second in collisions[:3]] + [f"x{n}".encode() for n in range(500)]
    deleted = {collisions[6][0], collisions[7][1], *present[::10]}
    entries = sorted(
        (key, 0 if key in deleted else _index.target_of(100 + n, n))
        for n, key in enumerate(present)
    )
    confirm = _confirm_by(entries)
    base = 4096
    data = _index.encode_run(entries)
    run = _index.Run(_index.bytes_reader(data, base), base, len(data), len(entries))
    assert len(data) > 8 * _index.PAGE  # slots on many pages, so probes cross their edges
    for key, target in entries:
        assert run.lookup(key, crc32(key), confirm) == (target or _index.DELETED), key
    for key in absent:
        assert run.lookup(key, crc32(key), confirm) is None, key
    run.check_all()
    # The file is cut short in the slot table after the run was opened (between two slots
    # or inside one): each key is found or reported damaged, never taken for a missing one.
    whole = _index.bytes_reader(data, base)
    for cut in (_index.RUN_HEAD_SIZE + 16 * 700, len(data) // 5 + 7):
        ends: list[int] = []

        def read(size: int, offset: int, ends: list[int] = ends) -> bytes:
            chunk = whole(size, offset)
            return chunk[: max(0, ends[0] - offset)] if ends else chunk

        short = _index.Run(read, base, len(data), len(entries))
        cut_index = _index.KeyIndex([short], len(entries))
        for key, target in entries:  # every page read, and checked, before the cut
            assert cut_index.lookup(key, confirm) == (target or None)
        ends.append(base + cut)
        damaged = 0
        for key, target in entries:
            try:
                assert cut_index.lookup(key, confirm) == (target or None), key
            except CorruptFileError:
                damaged += 1
        assert damaged, "no lookup noticed the cut"


def _checkpointed_after_a_big_one(tmp_path: Path) -> tuple[Path, int, int]:
    """A prefix of 3,000 keys, checkpointed, then one more checkpoint of one key: its main
    file and where the index records of the two checkpoints end."""
    root = tmp_path / "repo"
    _fill(root, 3000)
    main = root / "big.hc"
    before = _last_segment(main)
    with _repo(root) as repo:
        prefix = repo.open_prefix("big", "rw")
        prefix["one more"] = "v"
        prefix.commit()
        prefix.checkpoint()
    after = _last_segment(main)
    assert before.index_end is not None and after.index_end is not None
    return main, before.index_end, after.index_end


def test_a_follower_keeps_the_runs_a_checkpoint_did_not_touch(tmp_path: Path) -> None:
    """After a checkpoint, the index is opened again at the new boundary: the runs it names
    again are the ones read before (with their page CRCs and filters), not read
    and checked again; an index of another open file shares nothing."""
    main, before, after = _checkpointed_after_a_big_one(tmp_path)
    fd = os.open(main, os.O_RDONLY)
    try:
        read = _index.FileRead(fd)
        first = _index.open_index(read, before)
        second = _index.open_index(read, after, first)
        assert len(first.runs) == 1 and len(second.runs) == 2
        assert second.runs[1] is first.runs[0]
        confirm = fmt.read_keyed_op
        assert second.lookup(b"key00000007", confirm) == first.lookup(b"key00000007", confirm)
        other = _index.open_index(_index.FileRead(fd), after, first)
        assert all(run is not first.runs[0] for run in other.runs)
    finally:
        os.close(fd)


def test_a_follower_reads_runs_of_commits_larger_than_what_it_reads_at_once(
    tmp_path: Path,
) -> None:
    """A follower reads the WAL a little at a time: commits behind it that span many such
    reads, and single commits larger than one, arrive whole and in order."""
    root = tmp_path / "repo"
    repo = _repo(root, checkpoint_bytes=1 << 30)
    follower_repo = _repo(root)
    try:
        writer = repo.open_prefix("p", "rw")
        writer["start"] = 0
        writer.commit()
        follower = follower_repo.open_prefix("p", "r")
        assert follower["start"] == 0
        model: dict[str, object] = {"start": 0}
        for n in range(300):
            key = f"k{n % 40}"
            model[key] = "x" * (50_000 if n % 97 == 0 else n)
            writer[key] = model[key]
            writer.commit()
            if n % 150 == 149:
                _check_against(follower, model)
    finally:
        follower_repo.close()
        repo.close()


@pytest.mark.parametrize("count", [1, 7, 1000, 20_000])
def test_a_runs_filter_never_turns_away_a_key_it_holds_and_rarely_lets_others_through(
    count: int,
) -> None:
    """The filter a newer run keeps once probed often: every key it holds passes (a miss would
    hide the key's newest value behind an older run's), and few of the others do."""
    rng = random.Random(count)
    keys = sorted({rng.randbytes(12) for _ in range(count)})
    entries = [(key, _index.target_of(100 + n, n)) for n, key in enumerate(keys)]
    data = _index.encode_run(entries)
    run = _index.Run(_index.bytes_reader(data, 4096), 4096, len(data), len(entries))
    held = [crc32(key) for key in keys]
    for hashed in held * (1 + 64 // len(held)):  # probed often enough to build the filter
        assert run.may_hold(hashed)
    others = [rng.getrandbits(32) for _ in range(20_000)]
    known = set(held)
    passed = sum(run.may_hold(hashed) for hashed in others if hashed not in known)
    assert passed <= len(others) / 16


def _run_file(tmp_path: Path, entries: list[tuple[bytes, int]]) -> tuple[Path, int, bytes]:
    """A file holding the run of ``entries`` at offset 4096: its path, the offset, the run."""
    data = _index.encode_run(entries)
    path = tmp_path / "run"
    path.write_bytes(bytes(4096) + data)
    return path, 4096, data


@contextlib.contextmanager
def _opened_run(path: Path, base: int, data: bytes, count: int) -> Iterator[_index.Run]:
    """The run ``data`` of ``count`` keys at ``base`` of the file ``path``, read from it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield _index.Run(_index.FileRead(fd), base, len(data), count)
    finally:
        os.close(fd)


def _entry_at(data: bytes, key: bytes) -> int:
    """Where ``key``'s entry lies in the run ``data`` (entries follow the header and slots)."""
    count, n_slots = struct.unpack_from("<QQ", data, 4)
    at = _index.RUN_HEAD_SIZE + 16 * n_slots
    for _ in range(count):
        _, _, key_len = struct.unpack_from("<QIH", data, at)
        if data[at + 14 : at + 14 + key_len] == key:
            return at
        at += 14 + key_len
    raise AssertionError("no such key")


def test_a_long_key_damaged_between_the_pages_a_lookup_checked_is_reported(
    tmp_path: Path,
) -> None:
    """A long key's deletion entry spans many index pages; once others' lookups checked its
    first and last page, the pages between must still be checked before it is compared (a
    damaged one made the key absent: in a newer run, an older value shows through)."""
    long_key = b"L" * 65000
    others = [f"k{n:04d}".encode() for n in range(300)]
    entries = [(long_key, 0)]
    entries += [(key, _index.target_of(100 + n, n)) for n, key in enumerate(others)]
    confirm = _confirm_by(entries)
    path, base, data = _run_file(tmp_path, entries)
    middle = base + _entry_at(data, long_key) + 14 + 30000
    with path.open("r+b") as file:
        file.seek(middle)
        byte = file.read(1)
        file.seek(middle)
        file.write(bytes([byte[0] ^ 1]))
    with _opened_run(path, base, data, len(entries)) as run:
        for key, target in entries[1:]:
            assert run.lookup(key, crc32(key), confirm) == target
        with pytest.raises(CorruptFileError):
            run.lookup(long_key, crc32(long_key), confirm)


@pytest.mark.parametrize("twin_deleted", [True, False])
def test_a_long_key_whose_hash_another_key_has_is_looked_up_within_the_run(
    tmp_path: Path, twin_deleted: bool
) -> None:
    """A long key probed in a run whose short key has the same crc32: the lookup must not
    read past the run for the long key's length (it failed with EINVAL on a sound file)."""
    rnd = random.Random(3)
    short = {crc32(key): key for key in (rnd.randbytes(10) for _ in range(1 << 16))}
    stem = b"Q" * 65000
    stem_crc = crc32(stem)
    long_key = None
    while long_key is None:
        suffix = rnd.randbytes(8)
        if crc32(suffix, stem_crc) in short:
            long_key = stem + suffix
    twin = short[crc32(long_key)]
    twin_target = 0 if twin_deleted else _index.target_of(100, 1)
    entries = sorted([(twin, twin_target)] + [
        (f"f{n:05d}".encode(), _index.target_of(200 + n, n)) for n in range(2000)
    ])  # fmt: skip
    confirm = _confirm_by(entries)
    path, base, data = _run_file(tmp_path, entries)
    with _opened_run(path, base, data, len(entries)) as run:
        assert run.lookup(long_key, crc32(long_key), confirm) is None
        assert run.lookup(twin, crc32(twin), confirm) == (twin_target or _index.DELETED)


def test_a_run_cut_short_inside_an_entry_it_checked_is_reported(tmp_path: Path) -> None:
    """The file is cut inside the last entry, a deletion's, after its page was checked: the
    key must be reported damaged, not absent (the short read just failed to match)."""
    entries = [(f"k{n:04d}".encode(), _index.target_of(100 + n, n)) for n in range(299)]
    entries.append((b"k0299", 0))
    confirm = _confirm_by(entries)
    path, base, data = _run_file(tmp_path, entries)
    last = entries[-1][0]
    with _opened_run(path, base, data, len(entries)) as run:
        for key, target in entries:
            assert run.lookup(key, crc32(key), confirm) == (target or _index.DELETED)
        os.truncate(path, base + _entry_at(data, last) + 14 + 2)
        with pytest.raises(CorruptFileError):
            run.lookup(last, crc32(last), confirm)


def test_a_follower_checks_the_pages_of_a_kept_run_again_after_a_checkpoint(
    tmp_path: Path,
) -> None:
    """A run a checkpoint left alone is kept by a follower, but what it checked is checked
    again: damage done to the file since must be reported, not trusted for as long as the
    follower lives (it made a key absent, or gave an older run's value)."""
    main, before, after = _checkpointed_after_a_big_one(tmp_path)
    key = b"key00000007"
    fd = os.open(main, os.O_RDONLY)
    try:
        read = _index.FileRead(fd)
        confirm = fmt.read_keyed_op
        first = _index.open_index(read, before)
        assert first.lookup(key, confirm) == encode_value("v" * 100)
        (run,) = first.runs
        raw = os.pread(fd, run.length, run.offset)
        slots = range(_index.RUN_HEAD_SIZE, _index.RUN_HEAD_SIZE + 16 * 2 * run.count, 16)
        hashed = crc32(key).to_bytes(4, "little")
        at = run.offset + next(at for at in slots if raw[at : at + 4] == hashed)
        with main.open("r+b") as file:
            file.seek(at)
            file.write(bytes(16))  # the key's slot emptied: "absent"
        second = _index.open_index(read, after, first)
        with pytest.raises(CorruptFileError):
            second.lookup(key, confirm)
    finally:
        os.close(fd)


def _resealed(data: bytes, body: bytes) -> bytes:
    """The run ``data`` with its body replaced by ``body``, every CRC made right again."""
    magic, count, n_slots, entries_len, n_pages, _ = struct.unpack_from("<IQQQII", data)
    pages = b"".join(
        crc32(body[at : at + _index.PAGE]).to_bytes(4, "little")
        for at in range(0, len(body), _index.PAGE)
    )
    head = struct.pack("<IQQQII", magic, count, n_slots, entries_len, n_pages, crc32(pages))
    return head + crc32(head).to_bytes(4, "little") + body + pages


def test_verify_finds_a_table_slot_that_names_an_older_op_of_a_key() -> None:
    """A slot names an op directly: one more slot, naming an older op of a key and placed
    where a probe finds it first, would answer with that older value. Every CRC is right
    (a wrong build, not damage): the run's check compares the slots with the entries."""
    entries = [(f"k{n:04d}".encode(), _index.target_of(1000 + n, n)) for n in range(300)]
    key = entries[42][0]
    stale = _index.target_of(500, 77)
    data = _reslotted(entries, key, struct.pack("<IIQ", crc32(key), 77, 500))
    run = _index.Run(_index.bytes_reader(data, 4096), 4096, len(data), len(entries))
    confirm = _confirm_by([*entries, (key, stale)])
    assert run.lookup(key, crc32(key), confirm) == stale  # what such a table answers
    with pytest.raises(CorruptFileError, match="other slots"):
        run.check_all()


def test_a_copy_of_a_format_3_prefix_with_commits_in_its_wal_asks_for_a_migration(
    tmp_path: Path,
) -> None:
    """A copy checkpoints first; the index record it would append must be of the file's own
    format, which this version only checks: it is refused, and nothing is written (it
    reported the file damaged, or wrote a format 4 record into a format 3 file)."""
    root = _legacy_repo(tmp_path, 3)
    before = {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()}
    assert os.path.getsize(root / "legacy.hc-wal") > fmt.HEADER_SIZE  # commits wait there
    with _repo(root) as repo, pytest.raises(NeedsMigration, match=f"hotcopy migrate {root}"):
        repo.copy_prefix(tmp_path / "copy.hc", "legacy")
    after = {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()}
    assert after == before
    assert verify_file(root / "legacy.hc").ok


def _fifty_keys(root: Path) -> None:
    with _repo(root) as repo:
        writer = repo.open_prefix("p", "rw")
        for i in range(50):
            writer[f"k{i}"] = i
        writer.commit()
        writer.checkpoint()


def test_a_thread_in_a_lookup_while_another_moves_to_a_compacted_file_reads_one_file(
    tmp_path: Path,
) -> None:
    """Threads share a view; one is inside a lookup when another catches up with a compaction
    (a new main file). The op a slot names is read from the file the slot came from, never
    from the new one (``in`` reported the prefix damaged)."""
    root = tmp_path / "repo"
    _fifty_keys(root)
    with _repo(root) as readers, _repo(root) as writers:
        reader = readers.open_prefix("p", "r")
        assert reader["k2"] == 2
        holding = h.thread_held_at(
            _index.Run.lookup, "if self.format_3", lambda: ("k1" in reader, reader["k9"])
        )
        with holding as looking:
            writer = writers.open_prefix("p", "rw")
            writer["k1"] = "new"
            writer.commit()
            writer.compact()
            assert reader["k3"] == 3  # this thread moves the view to the compacted file
    assert looking.found == {"result": (True, 9)}, looking.found


@contextlib.contextmanager
def _new_key_in_the_wal(root: Path) -> Iterator[tuple[Prefix, Prefix]]:
    """A writer's and a reader's view of fifty checkpointed keys and "new", only in the WAL."""
    _fifty_keys(root)
    with _repo(root) as readers, _repo(root) as writers:
        writer = writers.open_prefix("p", "rw")
        writer["new"] = "in the WAL"
        writer.commit()
        yield writer, readers.open_prefix("p", "r")


def test_a_get_while_another_thread_catches_up_with_a_checkpoint_finds_its_key(
    tmp_path: Path,
) -> None:
    """Threads share a view. One has just found a key among the commits still in the WAL when
    another catches up with a checkpoint that put them in the main file, so that the view
    keeps them in memory no longer. The get still returns the value (it raised KeyError for a
    key that was there all along)."""
    with _new_key_in_the_wal(tmp_path / "repo") as (writer, reader):
        holding = h.thread_held_at(Prefix._committed, "[key]", lambda: reader["new"])
        with holding as getter:
            writer.checkpoint()
            assert reader["k3"] == 3  # this thread catches the view up with the checkpoint
    assert getter.found == {"result": "in the WAL"}, getter.found


@pytest.mark.parametrize("look", ["get", "in"])
def test_a_lookup_while_another_thread_moves_the_view_to_a_compacted_file_finds_its_key(
    tmp_path: Path, look: str
) -> None:
    """Another process compacted a prefix whose newest key was only in the WAL. One thread of
    a view looks that key up just as another, catching the view up, has dropped the commits
    it kept in memory and not yet read the new file's index: the key is in neither. The
    lookup waits for the catch-up and finds it (it raised KeyError; ``in`` said False)."""
    with _new_key_in_the_wal(tmp_path / "repo") as (writer, reader):
        assert reader["new"] == "in the WAL"
        action = (lambda: reader["new"]) if look == "get" else (lambda: "new" in reader)
        with h.thread_held_at(Prefix._committed if look == "get" else Prefix.__contains__,
                              "= self._mem", action) as looking:  # fmt: skip
            writer.compact()
            with h.thread_held_at(
                Log._load_once, "self._open_wal(strict=True)", lambda: reader["k3"]
            ):
                # Up to 5 s for the lookup to end in that window; it waits, now, for the
                # catch-up, held until this block ends.
                looking.release(wait=5.0)
    assert looking.found == {"result": "in the WAL" if look == "get" else True}, looking.found


def test_iteration_while_another_thread_catches_up_lists_one_state(tmp_path: Path) -> None:
    """One thread lists a view's keys while another catches it up with another process's
    ``del x; y = 1`` and checkpoint. It listed the old commits in memory with the new index:
    a, x and y, a state that never was (found by helper 39)."""
    root = tmp_path / "repo"
    with _repo(root) as repo:
        writer = repo.open_prefix("p", "rw")
        writer["a"] = 1
        writer.commit()
        writer.checkpoint()
    with _repo(root) as readers, _repo(root) as writers:
        writer = writers.open_prefix("p", "rw")
        writer["x"] = 1
        writer.commit()  # x only in the WAL
        reader = readers.open_prefix("p", "r")
        assert sorted(reader) == ["a", "x"]
        with h.thread_held_at(Prefix._keys, "keys = [", lambda: list(reader)) as listing:
            del writer["x"]
            writer["y"] = 1
            writer.commit()
            writer.checkpoint()
            catching_up = threading.Thread(target=lambda: reader["a"])
            catching_up.start()
            catching_up.join(5.0)  # it ends at once, or waits for the listing to end
        catching_up.join(60)
    assert listing.found["result"] in (["a", "x"], ["a", "y"]), listing.found


def test_a_get_of_a_pending_change_while_another_thread_commits_it_finds_it(
    tmp_path: Path,
) -> None:
    """Threads share a view and its transaction: one reads a key the transaction changed just
    as another commits it. The get returns the committed value (it raised KeyError)."""
    root = tmp_path / "repo"
    _fifty_keys(root)
    with _repo(root) as repo:
        view = repo.open_prefix("p", "rw")
        view["k1"] = "changed"
        getter = h.thread_held_at(Prefix.__getitem__, "pending = self._pending", lambda: view["k1"])
        with getter as held:
            view.commit()
    assert held.found == {"result": "changed"}, held.found


def _reslotted(
    entries: list[_index.Entry], key: bytes, slot: bytes, drop: bytes | None = None
) -> bytes:
    """The run of ``entries`` with ``slot`` put first on ``key``'s probe (the probe's slots
    after it move down by one; with ``drop``, that slot leaves the probe), every CRC right:
    a wrong build, not damage."""
    data = _index.encode_run(entries)
    n_slots = 2 * len(entries)
    pages_len = 4 * struct.unpack_from("<IQQQII", data)[4]
    body = bytearray(data[_index.RUN_HEAD_SIZE : len(data) - pages_len])
    slots = [bytes(body[16 * i : 16 * i + 16]) for i in range(n_slots)]
    home = end = crc32(key) % n_slots
    while any(slots[end]):  # up to the first empty slot
        end = (end + 1) % n_slots
    moved = [slots[(home + i) % n_slots] for i in range((end - home) % n_slots)]
    if drop is not None:
        moved.remove(drop)
    for i, value in enumerate([slot, *moved]):
        at = 16 * ((home + i) % n_slots)
        body[at : at + 16] = value
    return _resealed(data, bytes(body))


def test_verify_finds_slots_that_are_not_the_entries_one_for_one() -> None:
    """Two keys of one hash whose entries name the same op share one slot in a forged run;
    the slot that frees names an older op of one of them, first on its probe: every entry is
    still found through the table and the slots are as many as the entries, yet a get
    answers with the older value. The run's check compares the slots with the entries."""
    ((a, b),) = _colliding_keys(1)
    new, old = _index.target_of(1000, 5), _index.target_of(500, 6)
    entries = sorted([(a, new), (b, new), *((f"k{n:03d}".encode(), 0) for n in range(50))])
    new_slot = struct.pack("<IIQ", crc32(a), 5, 1000)
    data = _reslotted(entries, a, struct.pack("<IIQ", crc32(a), 6, 500), drop=new_slot)
    run = _index.Run(_index.bytes_reader(data, 4096), 4096, len(data), len(entries))
    confirm = _confirm_by([(a, old), (a, new), (b, new)])
    assert run.lookup(a, crc32(a), confirm) == old  # what such a table answers
    with pytest.raises(CorruptFileError, match="other slots"):
        run.check_all()


def test_a_slot_naming_an_op_past_its_run_is_damage_not_an_os_error(tmp_path: Path) -> None:
    entries = [(f"k{n:03d}".encode(), _index.target_of(100 + n, n)) for n in range(50)]
    key = entries[7][0]
    far = struct.pack("<IIQ", crc32(key), 7, 2**63 - 1)
    data = _reslotted(entries, key, far)
    path = tmp_path / "run"
    path.write_bytes(bytes(4096) + data)
    with _opened_run(path, 4096, data, len(entries)) as run:
        with pytest.raises(CorruptFileError):
            run.lookup(key, crc32(key), fmt.read_keyed_op)
        with pytest.raises(CorruptFileError):
            run.check_all()


def test_a_checkpoint_over_a_damaged_older_op_names_the_file_and_what_to_do(
    tmp_path: Path,
) -> None:
    """A checkpoint counts live keys through the ops the index names: one whose record is
    damaged stops it, and the report must say which file and how to salvage it."""
    root = tmp_path / "repo"
    with _repo(root) as repo:
        prefix = repo.open_prefix("p", "rw")
        for i in range(20):
            prefix[f"key{i:02d}"] = f"value{i}"
        prefix.commit()
        prefix.checkpoint()
    main = root / "p.hc"
    at = main.read_bytes().index(b"key07") + 3  # in the key of its op
    with main.open("r+b") as file:
        file.seek(at)
        file.write(b"X")
    with _repo(root) as repo:
        prefix = repo.open_prefix("p", "rw")
        prefix["key07"] = "again"
        prefix.commit()
        with pytest.raises(CorruptFileError) as found:
            prefix.checkpoint()
        assert str(main) in str(found.value) and "hotcopy salvage" in str(found.value)
        assert prefix["key07"] == "again"


def test_verify_compares_a_format_3_runs_slots_with_its_entries(tmp_path: Path) -> None:
    """A format 3 index is never looked up in, but verify still finds a slot that names no
    entry of its key (one hash changed, every CRC made right)."""
    root = _legacy_repo(tmp_path, 3)
    main = root / "legacy.hc"
    end = _last_segment(main).index_end
    assert end is not None
    fd = os.open(main, os.O_RDONLY)
    try:
        runs = _index.open_index(_index.FileRead(fd), end, format_3=True).runs
        data = os.pread(fd, runs[-1].length, runs[-1].offset)
        count = runs[-1].count
    finally:
        os.close(fd)
    at = next(
        _index.RUN_HEAD_SIZE + 16 * i
        for i in range(2 * count)
        if data[_index.RUN_HEAD_SIZE + 16 * i + 8 : _index.RUN_HEAD_SIZE + 16 * i + 16] != bytes(8)
    )
    pages_len = 4 * struct.unpack_from("<IQQQII", data)[4]
    body = bytearray(data[_index.RUN_HEAD_SIZE : len(data) - pages_len])
    body[at - _index.RUN_HEAD_SIZE] ^= 1  # the slot's hash
    forged = _resealed(data, bytes(body))
    run = _index.Run(_index.bytes_reader(forged, 4096), 4096, len(forged), count, format_3=True)
    with pytest.raises(CorruptFileError, match="other slots"):
        run.check_all()


def test_len_in_one_thread_while_another_catches_up_counts_one_state(tmp_path: Path) -> None:
    """len() looks up each key the view holds from the WAL; another thread that catches up
    meanwhile changes that set: the count is taken under the view's lock (it raised
    "dictionary changed size during iteration", or kept a count of the state before)."""
    root = tmp_path / "repo"
    _fifty_keys(root)
    with _repo(root) as readers, _repo(root, checkpoint_bytes=1 << 30) as writers:
        writer = writers.open_prefix("p", "rw")
        writer["w1"] = 1  # in the WAL: the view holds it apart from the index
        writer.commit()
        reader = readers.open_prefix("p", "r")
        assert reader["w1"] == 1
        caught: dict[str, object] = {}

        def catch_up() -> None:
            caught["k3"] = reader["k3"]

        other = threading.Thread(target=catch_up)
        with h.thread_held_at(
            _index.Run.lookup, "if self.format_3", lambda: len(reader)
        ) as counting:
            writer["w2"] = 2
            writer.commit()
            other.start()
            # It must wait for the count (the view's lock), not change what is counted.
            other.join(2)
            waited = other.is_alive()
        if other.ident is not None:
            other.join(60)
        assert (counting.found, caught) == ({"result": 51}, {"k3": 3}), (counting.found, caught)
        assert waited
        assert len(reader) == 52


def test_verify_finds_an_entry_that_names_another_keys_op(tmp_path: Path) -> None:
    """A slot names an op, and a get takes the first slot of its hash whose op puts its key.
    An entry of one key that names an older op of another key of the same hash, first on the
    probe, would answer that key's get with the older value: verify checks that every entry's
    op puts the entry's key (every CRC right here: a wrong build, not damage)."""
    first, second = sorted(_colliding_texts())
    root = tmp_path / "repo"
    with _repo(root, checkpoint_bytes=1 << 30) as repo:
        prefix = repo.open_prefix("p", "rw")
        prefix[second] = "old"
        prefix.commit()
        prefix[second] = "new"
        prefix[first] = "other"
        for i in range(40):
            prefix[f"k{i}"] = i
        prefix.commit()
        prefix.checkpoint()
    main = root / "p.hc"
    ops = [op for batch in _last_segment(main).batches for op in batch.ops]
    old = fmt.index_target(next(op for op in ops if op.key == second))
    first_key = first.encode()

    def forged(entries: list[_index.Entry]) -> list[_index.Entry]:
        return [(key, old if key == first_key else target) for key, target in entries]

    _rebuild_the_index(main, forged)
    with _repo(root) as repo:
        assert repo.open_prefix("p", "r")[second] == "old"  # what such an index answers
    report = verify_file(main)
    assert not report.ok and "another key" in str(report.error), report


@pytest.mark.parametrize("swapped_in", ["another repository's", "a format 3 one"])
def test_a_view_that_may_not_take_a_replaced_main_file_keeps_saying_why(
    tmp_path: Path, swapped_in: str
) -> None:
    """A main file replaced under a reader (a restore) by one it may not read: every get says
    why, and once the file is put back the view reads it again (the view took the new file
    half: the next get read it at the old file's offsets and reported it damaged)."""
    root = tmp_path / "repo"
    _fifty_keys(root)
    if swapped_in == "a format 3 one":
        foreign = _legacy_repo(tmp_path, 3) / "legacy.hc"
    else:
        _fifty_keys(tmp_path / "other")
        foreign = tmp_path / "other" / "p.hc"
    main = root / "p.hc"
    kept = tmp_path / "kept.hc"
    with _repo(root) as repo:
        reader = repo.open_prefix("p", "r")
        assert reader["k1"] == 1
        os.rename(main, kept)
        shutil.copyfile(foreign, main)
        errors = []
        for _ in range(2):
            with pytest.raises((StorageError, OSError)) as refused:
                reader["k2"]
            errors.append((type(refused.value), str(refused.value)))
        assert errors[0] == errors[1], errors
        os.replace(kept, main)
        assert reader["k2"] == 2


def test_views_whose_main_file_is_replaced_by_a_damaged_one_keep_refusing_until_it_is_back(
    tmp_path: Path,
) -> None:
    """The main file is replaced under a reader and a writer by an older copy of itself,
    shorter than where its WAL continues: damage every look must report, and no writer may
    commit over it. A view that failed to load it took it half: its next look served the old
    copy's values without a word, and the writer's next commit dropped an acknowledged one."""
    root = tmp_path / "repo"
    main = root / "p.hc"
    with _repo(root, checkpoint_bytes=1 << 30) as repo:
        writer = repo.open_prefix("p", "rw")
        writer["k"] = "v1"
        writer.commit()
        writer.checkpoint()
        shutil.copyfile(main, tmp_path / "old.hc")
        writer["k"] = "v2"
        writer.commit()
        writer.checkpoint()
        writer["k"] = "v3"  # acknowledged, in the WAL only
        writer.commit()
    with _repo(root) as readers, _repo(root) as writers:
        reader = readers.open_prefix("p", "r")
        writer = writers.open_prefix("p", "rw")
        assert reader["k"] == writer["k"] == "v3"
        os.rename(main, tmp_path / "kept.hc")
        shutil.copyfile(tmp_path / "old.hc", main)
        for _ in range(3):
            with pytest.raises(CorruptFileError, match="salvage"):
                reader["k"]
        for i in range(2):
            with pytest.raises(CorruptFileError, match="salvage"):
                writer["c"] = i  # the write lease's holder looks at the files first
                writer.commit()
        os.replace(tmp_path / "kept.hc", main)
        assert reader["k"] == writer["k"] == "v3"


def test_a_restore_of_older_files_names_them_and_the_command_that_converts_them(
    tmp_path: Path,
) -> None:
    """A backup taken before an upgrade restores its files exactly, in their format; the
    restore and ``verify`` say which prefixes this version opens only after ``migrate``,
    instead of leaving the operator to find out from the application."""
    root = _legacy_repo(tmp_path, 3)
    catalog, restored, single = tmp_path / "catalog", tmp_path / "restored", tmp_path / "one"

    def hotcopy(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PROGRAM, *map(str, args)], capture_output=True, text=True, timeout=60
        )

    # "empty" has nothing in its WAL: this version copies it as it is, in format 3.
    assert hotcopy("backup", root, catalog, "--prefix", "empty").returncode == 0
    shown = hotcopy("restore", catalog, restored)
    assert shown.returncode == 0, shown.stderr
    said = shown.stdout + shown.stderr
    assert "empty" in said and "format 3" in said and f"hotcopy migrate {restored}" in said
    as_json = hotcopy("restore", catalog, tmp_path / "again", "--json")
    assert json.loads(as_json.stdout)["older_format"] == {"empty": 3}
    piece = next(catalog.glob("*/empty.hc"))
    one = hotcopy("restore", piece, single)
    assert one.returncode == 0 and f"hotcopy migrate {single}" in one.stdout + one.stderr
    checked = hotcopy("verify", restored)
    assert checked.returncode == 0 and f"hotcopy migrate {restored}" in checked.stdout
    assert hotcopy("migrate", restored).returncode == 0
    assert "migrate" not in hotcopy("verify", restored).stdout
    assert json.loads(hotcopy("restore", catalog, restored, "--force", "--json").stdout)[
        "older_format"
    ] == {"empty": 3}
