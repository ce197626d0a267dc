"""Unit tests of the storage layer in one process: repository and prefix basics, the value
codec, recovery, checkpoints, prefix-name validation, the durable-write helper, the module API,
``verify_file``, lazy value reads, and the WAL/main-file safety rules (torn tails, stale and
foreign WALs). Real files and fsync throughout; nothing under test is mocked."""

from __future__ import annotations

import enum
import gc
import math
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import pytest
from hotcopy.coordinator import ProcessIdentity
from hotcopy.coordinator._errors import HotcopyError, LeaseTimeout
from hotcopy.storage import (
    ClosedError,
    CorruptFileError,
    FileLeases,
    InvalidPrefixName,
    PrefixNotFound,
    ReadOnlyError,
    Repository,
    RepositoryNotFound,
    StorageError,
    TransactionConflict,
    validate_prefix_name,
    verify_file,
)
from hotcopy.storage import _format as fmt
from hotcopy.storage._codec import decode_value, encode_value
from hotcopy.storage._durable import sweep_stale_temps, write_durably
from hotcopy.storage._log import Log
from hotcopy.storage._verify import verify_prefix
from hotcopy.storage._wal_space import written_end
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = pytest.mark.timeout(30)

BIG = 1 << 40  # a checkpoint threshold no test reaches: keeps commits in the WAL


def _repo(tmp_path: Path, **options: Any) -> Repository:
    return Repository.init(tmp_path / "repo", **options)


def _paths(repo: Repository, name: str) -> tuple[Path, Path]:
    main = repo.root / f"{name}.hc"
    return main, repo.root / f"{name}.hc-wal"


def _same(a: Any, b: Any) -> bool:
    """Exact equality: same types all the way down, -0.0 apart from 0.0, NaN equal to NaN,
    dict key order included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


# -- repository and prefix basics -------------------------------------------------------------


def test_repository_init_is_idempotent_and_open_needs_a_marker(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "a" / "b") as repo:
        first_id = repo.id
    with Repository.init(tmp_path / "a" / "b") as again, Repository(tmp_path / "a" / "b") as o:
        assert again.id == o.id == first_id
    with pytest.raises(RepositoryNotFound) as err:
        Repository(tmp_path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, HotcopyError)
    (tmp_path / "bad").mkdir()
    for damaged in ("{not json", "[]", '{"format": 1}', '{"format": 1, "id": 5}', "\xff"):
        (tmp_path / "bad" / "hotcopy.json").write_text(damaged, errors="surrogateescape")
        with pytest.raises(StorageError, match="damaged"):
            Repository(tmp_path / "bad")
    (tmp_path / "bad" / "hotcopy.json").write_text('{"format": 99, "id": "x"}')
    with pytest.raises(StorageError, match="format 99"):
        Repository(tmp_path / "bad")


def test_dict_api_commit_rollback_and_sequence_numbers(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("users", "rw")
        assert (len(px), list(px), px.seq) == (0, [], 0)
        px["bob"] = {"age": 5}
        px["alice"] = {"age": 3}
        assert "alice" in px and px["alice"] == {"age": 3}  # pending, seen by its writer
        assert list(px) == ["alice", "bob"] and len(px) == 2
        assert px.commit() == 1
        px["carol"] = 1
        del px["bob"]
        assert list(px) == ["alice", "carol"]
        assert "bob" not in px and px.get("bob") is None  # a pending deletion, to its writer
        px.rollback()
        assert list(px) == ["alice", "bob"] and px.get("carol") is None
        del px["bob"]
        assert px.commit() == 2
        assert px.commit() == 2  # nothing pending: no new commit
        with pytest.raises(KeyError):
            px["bob"]
        assert px.get("bob", "dflt") == "dflt" and "bob" not in px and 5 not in px
        assert repo.prefixes() == ["users"]
        assert repo.open_prefix("users", "rw") is px  # one object per prefix per repository


def test_another_repository_object_sees_commits_without_reopening(tmp_path: Path) -> None:
    with (
        _repo(tmp_path, checkpoint_bytes=BIG) as writer_repo,
        Repository(tmp_path / "repo") as reader_repo,
    ):
        writer = writer_repo.open_prefix("p", "rw")
        writer["k"] = "v1"
        reader = reader_repo.open_prefix("p", "r")
        assert "k" not in reader and len(reader) == 0  # pending changes are private
        writer.commit()
        assert reader["k"] == "v1" and reader.seq == 1
        writer["k"] = "v2"
        writer.commit()
        writer.checkpoint()  # the reader must follow the WAL reset and the new segment
        writer["j"] = "w"
        writer.commit()
        assert reader["k"] == "v2" and reader["j"] == "w" and reader.seq == 3


def test_views_follow_another_process_checkpoint_of_batches_they_know_or_not(
    tmp_path: Path,
) -> None:
    """A view that indexed every checkpointed batch from the WAL takes the new segment by
    arithmetic (no parse); a view that lags parses it. Both must read exactly the same."""
    with (
        _repo(tmp_path, checkpoint_bytes=BIG) as writer_repo,
        Repository(tmp_path / "repo") as other_repo,
    ):
        writer = writer_repo.open_prefix("p", "rw")
        lagging = other_repo.open_prefix("p", "r")
        expected: dict[str, Any] = {}
        rng = random.Random(5)
        for i in range(300):
            key = f"k{rng.randrange(60)}"
            if key in expected and rng.random() < 0.2:
                del writer[key]
                del expected[key]
            else:
                writer[key] = expected[key] = bytes([i % 256]) * (i % 40) if i % 3 else {"i": i}
            writer.commit()
            if i == 150:
                assert lagging.seq == 151  # it read the first half of the WAL only
        with Repository(tmp_path / "repo") as third_repo:
            third_repo.open_prefix("p", "rw").checkpoint()  # another view's checkpoint
        main_size = (tmp_path / "repo" / "p.hc").stat().st_size
        writer.begin()  # catches up under the write lease: the fast path
        assert writer._mem_seq == {} and writer._log.cut().length == main_size
        assert dict(writer.items()) == expected
        writer.rollback()
        assert dict(lagging.items()) == expected and lagging.seq == 300  # parsed
        writer["after"] = 1  # and the writer goes on appending to the fresh WAL
        writer.commit()
        assert lagging["after"] == 1


def test_read_only_and_closed_prefixes_refuse_changes(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = 1
        px.commit()
    with Repository(tmp_path / "repo") as repo:
        ro = repo.open_prefix("p", "r")
        for change in (
            lambda: ro.__setitem__("a", 2),
            lambda: ro.__delitem__("a"),
            ro.checkpoint,
        ):
            with pytest.raises(ReadOnlyError) as err:
                change()
            assert isinstance(err.value, PermissionError)
        assert ro["a"] == 1
        with pytest.raises(PrefixNotFound):
            repo.open_prefix("missing", "r")
        with pytest.raises(ValueError, match="mode"):
            repo.open_prefix("p", "w")
        ro.close()
        ro.close()  # idempotent
        with pytest.raises(ClosedError):
            ro["a"]
        with pytest.raises(ClosedError):
            len(ro)
        rw = repo.open_prefix("p", "rw")
    with pytest.raises(ClosedError):
        rw["a"]  # closing the repository closed it
    with pytest.raises(ClosedError):
        repo.open_prefix("p")


def test_open_of_a_missing_prefix_read_only_touches_nothing(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        before = h.tree(tmp_path)
        with pytest.raises(PrefixNotFound) as err:
            repo.open_prefix("nope", "r")
        assert isinstance(err.value, FileNotFoundError)
        with pytest.raises(ValueError):
            repo.open_prefix("nope", "x")
        assert h.tree(tmp_path) == before


def test_prefix_refuses_use_in_a_forked_child(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = 1
        px.commit()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                try:
                    px["a"]
                except StorageError as err:
                    code = 0 if "open the repository again" in str(err) else 2
            finally:
                os.write(write, bytes([code]))
                os._exit(0)
        try:
            os.close(write)
            assert os.read(read, 1) == b"\0"
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        assert px["a"] == 1  # the parent's object is unaffected


_COMMITTER = """
import sys
from hotcopy.storage import Repository
with Repository(sys.argv[1]) as repo, repo.open_prefix("p", "rw") as px:
    for n in range(1, 1501):
        px["counter"] = n
        px.commit()
"""


@pytest.mark.timeout(120)
def test_reader_threads_sharing_one_prefix_never_take_a_commit_for_damage(
    tmp_path: Path,
) -> None:
    """Threads of one process sharing a Prefix (the module API's current prefix is shared so)
    while another process commits. Two of them followed the WAL at once through the one view,
    each advancing it under the other, and raised ``CorruptFileError: ... is damaged ... run
    hotcopy salvage`` on intact files. Each must see only committed values, never going back."""
    with _repo(tmp_path) as repo, repo.open_prefix("p", "rw") as px:
        px["counter"] = 0
        px.commit()
    with Repository(tmp_path / "repo") as repo, repo.open_prefix("p", "r") as px:
        writer = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(tmp_path / "repo")])
        failures: list[str] = []

        def read() -> None:
            last = 0
            try:
                while last < 1500 and not failures:
                    value = px["counter"]
                    if value < last:
                        failures.append(f"went back from {last} to {value}")
                    last = value
            except BaseException as err:  # handed to the test's thread
                failures.append(f"{type(err).__name__}: {err}")

        readers = [threading.Thread(target=read) for _ in range(3)]
        try:
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join(100)
        finally:
            writer.kill()
            writer.wait()
        assert not failures, failures[:3]
        assert px["counter"] == 1500


@pytest.mark.timeout(60)
def test_writer_threads_sharing_one_prefix_commit_every_change_they_made(tmp_path: Path) -> None:
    """Threads sharing a Prefix share its transaction: a commit by one takes what the others
    set before it, and none of them may see a commit fail because another set a key while
    it was being encoded."""
    with _repo(tmp_path) as repo, repo.open_prefix("p", "rw") as px:
        failures: list[str] = []

        def write(thread: int) -> None:
            try:
                for n in range(300):
                    for k in range(5):
                        px[f"t{thread}-{n}-{k}"] = n
                    px.commit()
            except BaseException as err:  # handed to the test's thread
                failures.append(f"{type(err).__name__}: {err}")

        writers = [threading.Thread(target=write, args=(thread,)) for thread in range(4)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(50)
        assert not failures, failures[:3]
        assert len(px) == 4 * 300 * 5
    with Repository(tmp_path / "repo") as repo, repo.open_prefix("p", "r") as px:
        assert len(px) == 4 * 300 * 5


@pytest.mark.timeout(60)
def test_a_thread_compacting_a_shared_view_while_another_writes_through_it_never_deadlocks(
    tmp_path: Path,
) -> None:
    """Every lease is taken after the view's lock, never before: a writer thread that held the
    lock while it waited for the write lease, and a compacting thread that held the exclusive
    lease while it waited for the lock, blocked each other for ever (found by an attack)."""
    with _repo(tmp_path) as repo, repo.open_prefix("p", "rw") as px:
        failures: list[str] = []
        compactions = 0

        def write() -> None:
            try:
                for n in range(300):
                    px[f"k{n % 50}"] = n
                    px.commit()
            except BaseException as err:  # handed to the test's thread
                failures.append(f"writer: {type(err).__name__}: {err}")

        def compact() -> None:
            nonlocal compactions
            try:
                while writer.is_alive():
                    try:
                        px.compact()
                        compactions += 1
                    except StorageError as err:
                        if "transaction in progress" not in str(err):
                            raise
            except BaseException as err:  # handed to the test's thread
                failures.append(f"compactor: {type(err).__name__}: {err}")

        writer = threading.Thread(target=write, daemon=True)
        compactor = threading.Thread(target=compact, daemon=True)
        writer.start()
        compactor.start()
        writer.join(40)
        compactor.join(10)
        assert not writer.is_alive() and not compactor.is_alive(), "deadlocked"
        assert not failures, failures[:3]
        assert compactions and px["k49"] == 299


# -- value codec ---------------------------------------------------------------------------------


ROUND_TRIP = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    -(2**64) - 1,
    2**1000,
    10**4000,
    0.1,
    -0.0,
    1e308,
    5e-324,
    "",
    "plain",
    "ünïcödé 🎉 中文",
    "\x00nul\x1fctl",
    "\ufeffbom",
    b"",
    b"\x00\xff" * 10,
    bytes(range(256)),
    [],
    {},
    [1, [2, [3, {"a": None}]], 2.5, "x"],
    {"": 0, "k": [1.5, "x", -0.0], "\U0001f389": {"nested": [True, None, 1e-300]}},
    {"z": 1, "a": 2, "m": {"y": 0, "b": 1}},  # key order is kept
]


def test_codec_round_trips_every_json_type_and_bytes_exactly() -> None:
    for value in ROUND_TRIP:
        assert _same(decode_value(*encode_value(value)), value), value


def test_values_round_trip_exactly_through_memory_wal_and_main_file(tmp_path: Path) -> None:
    keys = [f"v{i:02}" for i in range(len(ROUND_TRIP))]
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("vals", "rw")
        for key, value in zip(keys, ROUND_TRIP, strict=True):
            px[key] = value
        for key, value in zip(keys, ROUND_TRIP, strict=True):
            assert _same(px[key], value), (key, "pending")
        px.commit()
        for key, value in zip(keys, ROUND_TRIP, strict=True):
            assert _same(px[key], value), (key, "committed, in memory")
    for stage in ("from the WAL", "from the main file"):
        with Repository(tmp_path / "repo") as repo:
            px = repo.open_prefix("vals", "rw")
            for key, value in zip(keys, ROUND_TRIP, strict=True):
                assert _same(px[key], value), (key, stage)
            px.checkpoint()


REFUSED = [
    (1, 2),
    {1, 2},
    frozenset(),
    {"a": b"x"},
    [b"x"],
    [1, (2,)],
    {1: "a"},
    {None: 1},
    {("a",): 1},
    {"ok": {2.5: 1}},
    bytearray(b"x"),
    memoryview(b"x"),
    complex(1, 2),
    object(),
]


class _Color(enum.IntEnum):
    RED = 1


class _Text(str):
    pass


@pytest.mark.parametrize(
    "value", [*REFUSED, _Color.RED, _Text("x"), {"k": _Color.RED}], ids=lambda v: type(v).__name__
)
def test_values_that_would_not_round_trip_are_refused_with_type_error(
    tmp_path: Path, value: Any
) -> None:
    with pytest.raises(TypeError):
        encode_value(value)
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        px["ok"] = 1
        px.commit()
        with pytest.raises(TypeError):
            px["bad"] = value
        assert "bad" not in px and len(px) == 1
        assert px.commit() == 1  # the refused value started no transaction


JSON_DEPTH_LIMIT = 512  # documented in README's Use section


def _nested(levels: int) -> list[Any]:
    """A list nested ``levels`` deep: ``_nested(2) == [[]]``."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


NOT_JSON = [
    (float("nan"), r"value: nan is not a JSON number"),
    (float("inf"), r"value: inf is not a JSON number"),
    ([1, {"x": float("-inf")}], r"value\[1\]\['x'\]: -inf is not a JSON number"),
    ("\ud800", r"value: .*lone surrogate U\+D800 at index 0"),
    (["ok", {"k": "ab\udfffc"}], r"value\[1\]\['k'\]: .*lone surrogate U\+DFFF at index 2"),
    ({"ok": {"b\udc80": None}}, r"value\['ok'\]: .*key 'b\\udc80'.*lone surrogate U\+DC80"),
    (_nested(JSON_DEPTH_LIMIT + 1), r"^value: .*deeper than 512 levels"),
    ({"a": _nested(JSON_DEPTH_LIMIT)}, r"^value: .*deeper than 512 levels"),
    (_nested(60_000), r"^value: .*deeper than 512 levels"),
    (_circular(), r"^value: .*deeper than 512 levels"),
]


@pytest.mark.parametrize(
    ("value", "message"),
    NOT_JSON,
    ids=["nan", "inf", "nested-inf", "surrogate", "nested-surrogate", "surrogate-in-dict-key",
         "513-levels", "513-levels-in-a-dict", "60000-levels", "circular"],
)  # fmt: skip
def test_values_that_are_not_json_text_are_refused_with_value_error(
    tmp_path: Path, value: Any, message: str
) -> None:
    """NaN/Infinity, lone surrogates and nesting past the limit would store something that
    cannot be read back or printed as JSON: refused at assignment, in one line, naming where."""
    with pytest.raises(ValueError, match=message) as refused:
        encode_value(value)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        px["ok"] = 1
        px.commit()
        with pytest.raises(ValueError, match=message):
            px["bad"] = value
        assert "bad" not in px and len(px) == 1
        assert px.commit() == 1  # the refused value started no transaction


def test_json_nested_up_to_the_limit_round_trips(tmp_path: Path) -> None:
    deepest = {"a": _nested(JSON_DEPTH_LIMIT - 1)}  # 512 levels, the dict included
    assert decode_value(*encode_value(deepest)) == deepest
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        px["deep"] = deepest
        px.commit()
    with Repository(tmp_path / "repo") as repo:
        px = repo.open_prefix("p", "rw")
        assert px["deep"] == deepest  # from the WAL
        px.checkpoint()
    with Repository(tmp_path / "repo") as repo:
        assert repo.open_prefix("p", "r")["deep"] == deepest  # from the main file


def test_keys_with_a_lone_surrogate_are_refused_at_assignment(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        for bad in ("\ud800", "k\udcff", "\U0001f389\udfff"):
            with pytest.raises(ValueError, match=r"key .*lone surrogate"):
                px[bad] = 1
            with pytest.raises(KeyError):
                del px[bad]  # not refused: a key stored by an older version can still go
        assert len(px) == 0 and px.commit() == 0


@pytest.mark.xfail(
    strict=True,
    reason="json.dumps refuses ints over CPython's 4300-digit str limit with ValueError: "
    "a legal JSON int cannot be stored",
)
def test_ints_beyond_the_int_str_digit_limit_round_trip() -> None:
    value = 10**5000
    assert decode_value(*encode_value(value)) == value


def test_keys_must_be_str_and_fit_the_key_limit_checked_at_assignment(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("p", "rw")
        px["kept"] = 1
        for bad in (1, b"k", None, ("a",)):
            with pytest.raises(TypeError):
                px[bad] = 1
            with pytest.raises(TypeError):
                del px[bad]
        with pytest.raises(ValueError, match="limit"):
            px["é" * 40000] = 1  # 80,000 bytes of UTF-8: refused before it sinks the commit
        px["\u20ac" * 21845] = "max"  # 65,535 bytes of UTF-8: allowed
        assert px.commit() == 1
        assert px["kept"] == 1 and px["\u20ac" * 21845] == "max"


def test_deleting_a_missing_key_does_not_keep_the_write_lease(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo, Repository(tmp_path / "repo", lease_timeout=2.0) as other:
        px = repo.open_prefix("p", "rw")
        with pytest.raises(KeyError):
            del px["missing"]
        writer = other.open_prefix("p", "rw")
        writer["x"] = 1  # would wait for the lease (LeaseTimeout) if the failed del kept it
        assert writer.commit() == 1
        assert px["x"] == 1


def test_an_abandoned_transaction_does_not_hold_the_write_lease_forever(tmp_path: Path) -> None:
    def abandon() -> None:
        repo = _repo(tmp_path)
        px = repo.open_prefix("p", "rw")
        px["a"] = 1  # takes the write lease; then every reference is dropped

    abandon()
    gc.collect()
    with Repository(tmp_path / "repo", lease_timeout=0.5) as other:
        px = other.open_prefix("p", "rw")
        px["b"] = 2
        assert px.commit() == 1 and "a" not in px


def test_interleaved_read_modify_write_never_loses_an_update(tmp_path: Path) -> None:
    with _repo(tmp_path) as one, Repository(tmp_path / "repo") as two:
        first = one.open_prefix("c", "rw")
        first["n"] = 0
        first.commit()
        second = two.open_prefix("c", "rw")
        seen_by_first = first["n"]  # both read 0 ...
        seen_by_second = second["n"]
        first["n"] = seen_by_first + 1  # ... and both write 1
        first.commit()
        with pytest.raises(TransactionConflict):  # second's read is stale: refused, not lost
            second["n"] = seen_by_second + 1
            second.commit()
        assert first["n"] == 1 and second["n"] == 1
        with second.transaction():  # the lease held from before the read: no conflict
            second["n"] += 1
        assert first["n"] == 2


def test_a_waiting_writer_times_out_while_a_transaction_is_open(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo, Repository(tmp_path / "repo", lease_timeout=0.2) as other:
        px = repo.open_prefix("p", "rw")
        px["a"] = 1  # the transaction holds the write lease until commit
        writer = other.open_prefix("p", "rw")
        with pytest.raises(LeaseTimeout) as err:
            writer["b"] = 2
        assert isinstance(err.value, TimeoutError)
        px.commit()
        writer["b"] = 2
        assert writer.commit() == 2


# -- recovery and checkpoints ---------------------------------------------------------------------


def test_recovery_from_the_wal_and_from_main_plus_wal(tmp_path: Path) -> None:
    model: dict[str, Any] = {}
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(10):
            px[f"k{i}"] = model[f"k{i}"] = i
            if i % 3 == 2:
                del px[f"k{i - 1}"]
                del model[f"k{i - 1}"]
            px.commit()
            if i == 5:
                px.checkpoint()
    _, wal = _paths(repo, "p")
    assert os.path.getsize(wal) > fmt.HEADER_SIZE  # commits 7..10 exist only in the WAL
    with Repository(tmp_path / "repo") as repo:
        px = repo.open_prefix("p", "r")
        assert dict(px.items()) == model and px.seq == 10


def test_checkpoint_on_demand_moves_the_wal_into_the_main_file(tmp_path: Path) -> None:
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        main, wal = _paths(repo, "p")
        for i in range(5):
            px[f"k{i}"] = "x" * i
            px.commit()
        assert os.path.getsize(main) == fmt.HEADER_SIZE
        cut = px.checkpoint()
        assert cut.seq == px.seq == 5
        assert cut.length == os.path.getsize(main) > fmt.HEADER_SIZE
        assert os.path.getsize(wal) == fmt.HEADER_SIZE
        report = verify_file(main)
        assert report.ok and (report.seq, report.keys, report.segments) == (5, 5, 1)
        assert px.checkpoint() == cut  # nothing new: same cut, file untouched
        assert os.path.getsize(main) == cut.length
        px["pending"] = 1
        second = px.checkpoint()  # pending changes stay pending, outside the cut
        assert second == cut and px["pending"] == 1
        assert px.commit() == 6
        assert px.checkpoint().seq == 6 and verify_file(main).segments == 2


def test_commit_checkpoints_automatically_past_checkpoint_bytes(tmp_path: Path) -> None:
    threshold = 1000
    with _repo(tmp_path, checkpoint_bytes=threshold) as repo:
        px = repo.open_prefix("p", "rw")
        main, wal = _paths(repo, "p")
        checkpoints = 0
        for i in range(12):
            px[f"k{i}"] = "v" * 300
            px.commit()
            if os.path.getsize(wal) == fmt.HEADER_SIZE:
                checkpoints += 1
                assert verify_file(main).seq == px.seq
            else:
                assert h.wal_used(wal) - fmt.HEADER_SIZE < threshold
        assert checkpoints >= 3
        report = verify_file(main)
        assert report.ok and report.segments == checkpoints


def test_every_checkpoint_cut_is_the_exact_state_at_its_commit(tmp_path: Path) -> None:
    """Invariant 2: the main file cut at a trailer is that commit's state, standalone."""
    rng = random.Random(7)
    cuts = []
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        model: dict[str, Any] = {}
        for i in range(30):
            for _ in range(rng.randint(1, 3)):
                key = f"k{rng.randint(0, 9)}"
                if key in model and rng.random() < 0.3:
                    del px[key]
                    del model[key]
                else:
                    px[key] = model[key] = [i, rng.random()]
            px.commit()
            if rng.random() < 0.3:
                cuts.append((px.checkpoint(), dict(model)))
        main, _ = _paths(repo, "p")
        data = main.read_bytes()
    assert len(cuts) >= 3
    for n, (cut, state) in enumerate(cuts):
        standalone = tmp_path / f"cut{n}.hc"
        standalone.write_bytes(data[: cut.length])
        assert verify_file(standalone).seq == cut.seq
        with Repository.init(tmp_path / f"cut{n}") as target:
            assert target.restore_prefix(standalone, "c") == cut.seq
            px = target.open_prefix("c", "r")
            assert px.seq == cut.seq and dict(px.items()) == state


# -- prefix names ---------------------------------------------------------------------------------


BAD_NAMES: list[Any] = [
    "../x",
    "a/b",
    "/abs",
    "",
    ".hidden",
    ".",
    "..",
    "x" * 201,
    "has space",
    "nul\0byte",
    "tab\t",
    "new\nline",
    "trailing\n",
    "ünï",
    "a\\b",
    "a:b",
    "٣",  # a non-ASCII digit
    None,
    5,
    b"bytes",
    ["x"],
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_prefix_names_are_refused_before_any_file_is_touched(tmp_path: Path, name: Any) -> None:
    repo = _repo(tmp_path)
    try:
        hc.init(tmp_path / "repo")
        before = h.tree(tmp_path)
        for mode in ("r", "rw"):
            with pytest.raises(InvalidPrefixName) as err:
                repo.open_prefix(name, mode)
            assert isinstance(err.value, ValueError) and isinstance(err.value, StorageError)
            with pytest.raises(InvalidPrefixName):
                hc.open(name, mode)
        with pytest.raises(InvalidPrefixName):
            validate_prefix_name(name)
        with pytest.raises(InvalidPrefixName):
            repo.prefix_path(name)
        assert h.tree(tmp_path) == before
    finally:
        hc.close()
        repo.close()


def test_longest_and_odd_but_valid_prefix_names_are_accepted(tmp_path: Path) -> None:
    names = ["x" * 200, "-rf", "a.b", "A_Z-0.9", "_", "hotcopy.json", "x.hc", "x.hc-wal"]
    with _repo(tmp_path, checkpoint_bytes=64) as repo:
        for name in names:
            px = repo.open_prefix(name, "rw")
            px["k"] = name
            px.commit()  # with checkpoint_bytes=64 this also writes the longest temp names
        assert repo.prefixes() == sorted(names)
    with Repository(tmp_path / "repo") as repo:
        for name in names:
            assert repo.open_prefix(name, "r")["k"] == name


# -- durable file creation ------------------------------------------------------------------------


def test_write_durably_removes_its_temp_when_the_writer_fails(tmp_path: Path) -> None:
    before = h.tree(tmp_path)

    def writer(fd: int) -> None:
        os.write(fd, b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_durably(tmp_path / "dest", writer)
    with pytest.raises(RuntimeError):
        write_durably(tmp_path / "dest", writer, overwrite=False)
    assert h.tree(tmp_path) == before


def test_write_durably_without_overwrite_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    write_durably(dest, b"first", overwrite=False)
    assert dest.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        write_durably(dest, b"second", overwrite=False)
    assert dest.read_bytes() == b"first" and h.tree(tmp_path) == ["dest"]
    write_durably(dest, lambda fd: os.write(fd, b"third"))
    assert dest.read_bytes() == b"third" and h.tree(tmp_path) == ["dest"]


def test_stale_temps_of_dead_processes_are_swept_when_a_repository_opens(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.close()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    me = os.getpid()
    mine = ProcessIdentity.of(me)
    assert mine is not None and ProcessIdentity.of(dead_pid) is None
    my_ticks = mine.start_ticks
    names = {
        "dead": f"p.hc.hotcopy-tmp-{dead_pid}-12345-0badf00d",
        # our pid, another start time
        "reused": f"p.hc-wal.hotcopy-tmp-{me}-{my_ticks + 1}-deadbeef",
        "alive": f"hotcopy.json.hotcopy-tmp-{me}-{my_ticks}-cafef00d",
    }
    for name in names.values():
        (repo.root / name).write_bytes(b"litter")
    (repo.root / "p.hc.tmp-notes").write_bytes(b"not a temp name")
    with Repository(repo.root):
        pass
    left = set(os.listdir(repo.root))
    assert names["dead"] not in left and names["reused"] not in left
    assert names["alive"] in left and "p.hc.tmp-notes" in left
    assert sweep_stale_temps(repo.root) == []  # the live one stays on a second sweep too


# -- the module API --------------------------------------------------------------------------------


def test_module_api(tmp_path: Path) -> None:
    try:
        with pytest.raises(RuntimeError):
            hc.get_current_prefix()
        with pytest.raises(RuntimeError):
            hc.open("users")  # no repository yet
        hc.init(tmp_path / "repo")
        with pytest.raises(RuntimeError):
            hc.get_current_prefix()
        px = hc.open("users", "rw")
        assert hc.get_current_prefix() is px and hc.get_current_prefix().name == "users"
        px.close()
        with pytest.raises(RuntimeError):
            hc.get_current_prefix()  # a closed prefix is not current
        px = hc.open("users", "rw")
        px["alice"] = {"age": 3}
        assert hc.commit() == 1
        hc.open("other", "rw")
        assert hc.get_current_prefix().name == "other"
        hc.close()
        with pytest.raises(RuntimeError):
            hc.get_current_prefix()
        with pytest.raises(RuntimeError):
            hc.commit()
        hc.close()  # idempotent
        hc.init(tmp_path / "repo")
        assert hc.open("users", "r")["alice"] == {"age": 3}
    finally:
        hc.close()


# -- verify_file and lazy reads --------------------------------------------------------------------


def _small_main_file(tmp_path: Path) -> Path:
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("small", "rw")
        for i in range(12):
            px[f"key{i % 5}"] = {"i": i, "pad": "p" * 40}
            if i % 4 == 3:
                px.pop(f"key{(i + 1) % 5}", None)
            px.commit()
            if i % 3 == 2:
                px.checkpoint()
        return _paths(repo, "small")[0]


def test_verify_file_detects_a_flipped_byte_at_every_offset(tmp_path: Path) -> None:
    main = _small_main_file(tmp_path)
    clean = verify_file(main)
    size = main.stat().st_size
    assert clean.ok and clean.segments == 4 and clean.seq == 12 and 1500 < size < 4096
    for offset in range(size):
        original = h.flip_byte(main, offset)
        report = verify_file(main)
        assert not report.ok, f"a flipped byte at {offset} went unnoticed"
        assert report.offset is not None and report.offset <= offset
        h.flip_byte(main, offset)
        assert main.read_bytes()[offset] == original
    assert verify_file(main) == clean


def test_verify_file_accepts_exactly_the_cuts_at_commit_boundaries(tmp_path: Path) -> None:
    main = _small_main_file(tmp_path)
    data = main.read_bytes()
    fd = os.open(main, os.O_RDONLY)
    try:
        boundaries = {fmt.HEADER_SIZE}
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        while reader.pos < len(data):
            segment = fmt.read_segment(reader, load_values=True)
            assert segment is not None
            boundaries.add(segment.end)
    finally:
        os.close(fd)
    cut = tmp_path / "cut.hc"
    for length in range(len(data) + 1):
        cut.write_bytes(data[:length])
        assert verify_file(cut).ok == (length in boundaries), length


def test_verify_file_refuses_a_well_formed_trailer_that_does_not_match_its_segment(
    tmp_path: Path,
) -> None:
    main = _small_main_file(tmp_path)
    expected = _committed(main)
    data = main.read_bytes()
    fd = os.open(main, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        segment = fmt.read_segment(reader, load_values=True)
        assert segment is not None
    finally:
        os.close(fd)
    at = segment.end - fmt.TRAILER_SIZE
    good = fmt.segment_trailer(segment.start, segment.batches, segment.index_crc)
    assert data[at : segment.end] == good
    n = len(segment.batches)
    for wrong in (
        fmt.encode_trailer(segment.last_seq, segment.start, n, 12345),  # wrong meta crc
        fmt.encode_trailer(segment.last_seq, segment.start + 1, n, 0),
        fmt.encode_trailer(segment.last_seq + 1, segment.start, n, 0),
        fmt.encode_trailer(segment.last_seq, segment.start, n + 1, 0),
    ):
        main.write_bytes(data[:at] + wrong + data[segment.end :])
        report = verify_file(main)
        assert not report.ok and report.offset == at, report
        # The segment is durable (the WAL's boundary is after it): a bad trailer there is
        # damage, not a tail. Opening reads the index at the boundary, not this trailer: it
        # may not see the damage, but it never reads wrong data because of it.
        with Repository(main.parent) as repo:
            try:
                px = repo.open_prefix("small", "r")
            except CorruptFileError:
                continue
            assert dict(px.items()) == expected


def test_a_reader_whose_main_file_check_came_just_before_a_checkpoint_follows_on(
    tmp_path: Path,
) -> None:
    """White-box interleaving: a reader looked at the main file, then a checkpoint appended a
    segment and reset the WAL, then the reader looks at the WAL. The new WAL's base is past what
    the reader scanned; it must rescan the main file rather than judge the WAL foreign."""
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo, Repository(tmp_path / "repo") as other:
        px = repo.open_prefix("p", "rw")
        px["a"] = 1
        px.commit()
        reader = other.open_prefix("p", "r")
        assert reader.seq == 1
        px["b"] = 2
        px.commit()
        px.checkpoint()
        px["c"] = 3
        px.commit()
        reader._log._follow_wal()  # the WAL half of a catch-up, as if the main half came first
        assert reader._log.seq == 3
        assert dict(reader.items()) == {"a": 1, "b": 2, "c": 3}
        px["d"] = 4
        px.commit()
        assert reader["d"] == 4 and reader.seq == 4


def _committed(main: Path) -> dict[str, Any]:
    with Repository(main.parent) as repo:
        return dict(repo.open_prefix(main.name[: -len(".hc")], "r").items())


def _damage_first_segment_key(tmp_path: Path) -> tuple[Path, int]:
    main = _small_main_file(tmp_path)
    data = bytearray(main.read_bytes())
    data[data.index(b"key0")] ^= 0x01  # a key in the first, long-durable segment
    main.write_bytes(bytes(data))
    return main, len(data)


def test_damage_before_the_durable_boundary_is_reported_not_silently_dropped(
    tmp_path: Path,
) -> None:
    expected = _committed(_small_main_file(tmp_path / "pristine"))
    main, _ = _damage_first_segment_key(tmp_path)
    assert not verify_file(main).ok
    with Repository(main.parent) as repo:
        # Opening reads the index, not the old segment, and the damaged record there was
        # replaced by later commits: no read needs it, and every key reads its last value.
        assert dict(repo.open_prefix("small", "r").items()) == expected


def test_a_commit_never_destroys_durable_segments_after_damage(tmp_path: Path) -> None:
    main, size = _damage_first_segment_key(tmp_path)
    try:
        with Repository(main.parent) as repo:
            px = repo.open_prefix("small", "rw")
            px["new"] = 1
            px.commit()
            px.checkpoint()
    except CorruptFileError:
        pass  # refusing to write over damage is fine too
    assert main.stat().st_size >= size


@pytest.mark.timeout(60)
def test_opening_a_prefix_does_not_read_value_bytes(tmp_path: Path) -> None:
    big = random.Random(1).randbytes(20 << 20)
    with _repo(tmp_path) as repo:
        px = repo.open_prefix("big", "rw")
        px["big"] = big
        px["small"] = "s"
        px.commit()  # 20 MiB is past the default checkpoint_bytes: it lands in the main file
        main, wal = _paths(repo, "big")
        assert os.path.getsize(wal) == fmt.HEADER_SIZE
    before = h.io_count("rchar")
    with Repository(tmp_path / "repo") as repo:
        px = repo.open_prefix("big", "r")
        assert len(px) == 2 and "big" in px and "small" in px and px["small"] == "s"
    read = h.io_count("rchar") - before
    assert read < 4 << 20, f"opening read {read} bytes"
    h.flip_byte(main, os.path.getsize(main) // 2)  # the middle of the value's bytes
    with Repository(tmp_path / "repo") as repo:
        px = repo.open_prefix("big", "r")
        assert len(px) == 2 and "big" in px and px["small"] == "s"
        with pytest.raises(CorruptFileError):
            px["big"]
    assert not verify_file(main).ok


# -- torn WAL tails, stale and foreign WALs --------------------------------------------------------


def _three_commits(tmp_path: Path) -> tuple[Repository, dict[str, Any]]:
    repo = _repo(tmp_path, checkpoint_bytes=BIG)
    px = repo.open_prefix("p", "rw")
    model: dict[str, Any] = {}
    for i in range(3):
        px[f"k{i}"] = model[f"k{i}"] = {"i": i, "pad": "x" * 30}
        px["shared"] = model["shared"] = i
        px.commit()
    repo.close()
    return repo, model


@pytest.mark.parametrize("garbage_len", [1, 7, fmt.BATCH_SIZE, 200, 5000])
def test_torn_wal_tail_recovers_to_the_last_whole_commit(tmp_path: Path, garbage_len: int) -> None:
    repo, model = _three_commits(tmp_path)
    _, wal = _paths(repo, "p")
    whole = wal.read_bytes()[: h.wal_used(wal)]
    with open(wal, "r+b") as f:  # where the next batch goes: over the reserved zeros, if any
        f.seek(len(whole))
        f.write(random.Random(garbage_len).randbytes(garbage_len))
    with Repository(repo.root) as again:
        reader = again.open_prefix("p", "r")
        assert dict(reader.items()) == model and reader.seq == 3
    with Repository(repo.root) as again, Repository(repo.root) as watcher:
        watching = watcher.open_prefix("p", "r")  # opened over the garbage, then follows on
        assert watching.seq == 3
        px = again.open_prefix("p", "rw")
        px["new"] = model["new"] = "after the tear"
        assert px.commit() == 4
        assert dict(watching.items()) == model and watching.seq == 4
    data = wal.read_bytes()
    assert data.startswith(whole) and len(data) > len(whole)
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader_ = fmt.FileReader(fd, len(whole), len(data))
        assert fmt.read_batch(reader_, load_values=True) is not None
        # The garbage is gone: the WAL ends with the commit, then at most reserved zeros.
        assert reader_.pos == h.wal_used(wal) and not data[reader_.pos :].strip(b"\0")
    finally:
        os.close(fd)
    with Repository(repo.root) as again:
        assert dict(again.open_prefix("p", "r").items()) == model


def test_space_reserved_after_the_wal_is_neither_a_commit_nor_a_torn_tail(tmp_path: Path) -> None:
    repo, model = _three_commits(tmp_path)
    main, wal = _paths(repo, "p")
    used = h.wal_used(wal)
    assert wal.stat().st_size > used  # commits overwrite reserved zeros: no size change each
    report = verify_prefix(main.parent, "p")
    assert report.ok and report.wal_commits == 3 and report.notes == ()
    with open(wal, "r+b") as f:  # debris deep in the reserved space, zeros before it
        f.seek(used + 5000)
        f.write(b"debris")
    assert "torn tail" in verify_prefix(main.parent, "p").notes[0]
    with Repository(repo.root) as again:
        px = again.open_prefix("p", "rw")
        assert dict(px.items()) == model
        px["new"] = model["new"] = 4
        assert px.commit() == 4
    data = wal.read_bytes()
    assert b"debris" not in data  # the next writer removed it before it appended
    assert verify_prefix(main.parent, "p").notes == ()
    with Repository(repo.root) as again:
        assert dict(again.open_prefix("p", "r").items()) == model


@pytest.mark.timeout(60)
def test_a_writer_taking_the_lease_over_reads_only_what_was_written_of_the_wal(
    tmp_path: Path,
) -> None:
    """A writer that takes the lease after another checks that nothing torn follows the last
    batch. It read the whole space reserved after it (64-256 KiB) at every hand-over, a quarter
    of the time a hand-over took among 4 writers; the file system knows which of those bytes
    were never written (``SEEK_DATA``), and only the rest needs reading."""
    with _repo(tmp_path, checkpoint_bytes=BIG) as first, Repository(first.root) as second:
        a, b = first.open_prefix("p", "rw"), second.open_prefix("p", "rw")
        _, wal = _paths(first, "p")
        taken_over = []
        for i in range(20):
            a["a"] = i
            a.commit()
            before = h.io_count("rchar")
            b["b"] = i
            b.commit()  # takes the lease from `a`, which kept it parked
            taken_over.append(h.io_count("rchar") - before)
        reserved = wal.stat().st_size - h.wal_used(wal)
    assert reserved >= 60 << 10
    assert max(taken_over) < 16 << 10, taken_over


_DIES_AFTER_COMMITS = """
import os, sys
from hotcopy.storage import Repository
px = Repository(sys.argv[1], checkpoint_bytes=1 << 40).open_prefix("p", "rw")
px["a"] = "first"
px.commit()
px["blob"] = b"\\x01" + bytes(64 << 10) + b"\\x01"
px.commit()
if sys.argv[2] == "False":
    for n in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1):
        px["b"] = "after" if n == 0 else n
        px.commit()
os._exit(0)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("last", [False, True], ids=["a batch after it", "the last batch"])
def test_a_wal_whose_zero_blocks_were_made_holes_reads_the_same(tmp_path: Path, last: bool) -> None:
    """A sparse copy (``cp --sparse=always``, ``rsync -S``) or ``fallocate --dig-holes`` turns
    the blocks of zeros inside a committed value into a hole: the bytes are the same, so is
    the WAL. Reading only up to the first hole had called it damaged (helper 38)."""
    repo = _repo(tmp_path)
    repo.close()
    blob = b"\x01" + bytes(64 << 10) + b"\x01"
    # A writer that dies after its commits: its close would have checkpointed them.
    writer = [sys.executable, "-c", _DIES_AFTER_COMMITS, str(repo.root), str(last)]
    subprocess.run(writer, check=True, timeout=30)
    model = {"a": "first", "blob": blob} | ({} if last else {"b": "after"})
    _, wal = _paths(repo, "p")
    before = wal.read_bytes()
    subprocess.run(["fallocate", "--dig-holes", str(wal)], check=True)
    assert wal.read_bytes() == before
    fd = os.open(wal, os.O_RDONLY)
    try:  # a hole inside the blob's batch, before the end of the written data
        assert os.lseek(fd, fmt.HEADER_SIZE, os.SEEK_HOLE) < h.wal_used(wal)
    finally:
        os.close(fd)
    assert verify_prefix(wal.parent, "p").ok
    with Repository(repo.root) as again:
        px = again.open_prefix("p", "rw")
        assert dict(px.items()) == model and px["blob"] == blob
        px["c"] = model["c"] = 1
        px.commit()
    with Repository(repo.root) as again:
        assert dict(again.open_prefix("p", "r").items()) == model


@pytest.mark.timeout(60)
def test_reading_a_wal_past_a_hole_inside_a_batch_reads_ahead_again(tmp_path: Path) -> None:
    """Read-ahead stops where the WAL's data ends for good, not at a hole inside a batch (a
    sparse copy's): past one, every batch had been read with reads of its own (helper 39:
    a thousand times the reads, opens 26-40 % slower)."""
    repo = _repo(tmp_path)
    repo.close()
    writer = [sys.executable, "-c", _DIES_AFTER_COMMITS, str(repo.root), "False", "2000"]
    subprocess.run(writer, check=True, timeout=60)
    _, wal = _paths(repo, "p")
    subprocess.run(["fallocate", "--dig-holes", str(wal)], check=True)
    before = h.io_count("syscr")
    with Repository(repo.root) as again:
        assert again.open_prefix("p", "r")["b"] == 1999
    assert h.io_count("syscr") - before < 200


@pytest.mark.timeout(60)
def test_a_reader_checking_a_torn_tail_that_a_writer_removes_meanwhile_sees_no_damage(
    tmp_path: Path,
) -> None:
    """A reader found bytes after the last batch (a writer died mid-append) and looks for a
    whole batch after them, when a new writer removes them (``ftruncate``) first. The reader
    then read past the file's new end and reported "file ends inside a value" (helper 38)."""
    repo, model = _three_commits(tmp_path)
    _, wal = _paths(repo, "p")
    used = h.wal_used(wal)
    frame = wal.read_bytes()[used - 200 : used]  # a batch's bytes, cut: a torn append
    frame = frame[frame.index(b"HCB1") :]
    with open(wal, "r+b") as f:
        f.seek(used)
        f.write(frame[: len(frame) // 2])
    with Repository(repo.root) as readers, Repository(repo.root) as writers:
        opening = h.thread_held_at(
            Log._check_wal_tail, "later = _valid_batch_after", lambda: readers.open_prefix("p")
        )
        with opening as reader:
            writer = writers.open_prefix("p", "rw")
            writer["x"] = 1  # takes the lease: the torn bytes go
            writer.rollback()
            assert wal.stat().st_size == used
        assert set(reader.found) == {"result"}, reader.found
        assert dict(reader.found["result"].items()) == model


def test_a_wal_cut_at_every_byte_of_its_last_batch_drops_just_that_commit(
    tmp_path: Path,
) -> None:
    repo, model = _three_commits(tmp_path)
    _, wal = _paths(repo, "p")
    data = wal.read_bytes()[: h.wal_used(wal)]
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        starts = []
        while reader.pos < len(data):
            starts.append(reader.pos)
            assert fmt.read_batch(reader, load_values=True) is not None
    finally:
        os.close(fd)
    last = starts[-1]
    before_last = {k: v for k, v in model.items() if k != "k2"} | {"shared": 1}
    for length in range(last, len(data) + 1):
        wal.write_bytes(data[:length])
        with Repository(repo.root) as again:
            px = again.open_prefix("p", "r")
            expected = model if length == len(data) else before_last
            assert dict(px.items()) == expected and px.seq == (3 if expected is model else 2)


def test_an_open_reader_follows_a_main_file_replaced_under_it(tmp_path: Path) -> None:
    """A restore or compaction replaces the main file with ``os.replace``: an open reader moves
    to the new file at its next read, and the stale WAL left beside it is not applied.

    The reader uses kernel file locks: with the coordinator's commit counters it would trust an
    unchanged counter for up to a second, and a replacement by hand (outside the protocol,
    unlike restore_prefix) publishes nothing."""
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        px["a"] = "old"
        px.commit()
        main, _ = _paths(repo, "p")
        repo.copy_prefix(tmp_path / "old.hc", prefix="p")
        px["a"] = "new"
        px.commit()
        px.checkpoint()
        px["b"] = "wal only"
        px.commit()
        file_locks = FileLeases(repo.root / ".hotcopy")
        with Repository(repo.root, leases=file_locks) as readers:
            reader = readers.open_prefix("p", "r")
            assert dict(reader.items()) == {"a": "new", "b": "wal only"} and reader.seq == 3
            shutil.copy(tmp_path / "old.hc", tmp_path / "staged.hc")
            os.replace(tmp_path / "staged.hc", main)
            assert dict(reader.items()) == {"a": "old"} and reader.seq == 1


def _wal_with_commits(repo_root: Path, name: str, values: dict[str, Any]) -> None:
    with Repository(repo_root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix(name, "rw")
        for key, value in values.items():
            px[key] = value
            px.commit()


def test_wals_of_another_main_file_are_ignored_and_foreign_or_damaged_ones_refused(
    tmp_path: Path,
) -> None:
    with _repo(tmp_path) as repo:
        root = repo.root
    _wal_with_commits(root, "p", {"mine": 1})
    with Repository(root) as again:
        again.open_prefix("p", "rw").checkpoint()  # p's state is now in p.hc alone
    _wal_with_commits(root, "q", {"theirs": 2, "more": 3})
    _, p_wal = _paths(repo, "p")
    _, q_wal = _paths(repo, "q")
    p_header = fmt.unpack_wal_header(p_wal.read_bytes()[: fmt.HEADER_SIZE])
    q_data = q_wal.read_bytes()
    q_header = fmt.unpack_wal_header(q_data[: fmt.HEADER_SIZE])
    body = q_data[fmt.HEADER_SIZE :]
    # q's batches are commits 1 and 2; p is at commit 1 after its checkpoint, so q's commit 2
    # would apply as p's next commit if the header checks were missing.
    other_file = p_header._replace(file_id=q_header.file_id)
    other_salt = p_header._replace(main_salt=p_header.main_salt ^ 1)
    for header in (other_file, other_salt):  # what a copy replacing the main file leaves
        p_wal.write_bytes(fmt.pack_wal_header(header) + body)
        with Repository(root) as again:
            px = again.open_prefix("p", "r")
            assert dict(px.items()) == {"mine": 1} and px.seq == 1, header
    p_wal.write_bytes(q_data)  # another prefix's WAL
    with Repository(root) as again, pytest.raises(CorruptFileError, match="prefix 'q'"):
        again.open_prefix("p", "r")
    damaged = bytearray(fmt.pack_wal_header(p_header))
    damaged[20] ^= 0xFF
    p_wal.write_bytes(bytes(damaged) + body)
    with Repository(root) as again, pytest.raises(CorruptFileError, match="header is damaged"):
        again.open_prefix("p", "rw")
    p_wal.write_bytes(fmt.pack_wal_header(other_salt) + body)
    with Repository(root) as again:
        px = again.open_prefix("p", "rw")
        px["next"] = 2
        assert px.commit() == 2  # the stale WAL was replaced, not applied
    with Repository(root) as again:
        assert dict(again.open_prefix("p", "r").items()) == {"mine": 1, "next": 2}


def test_iterating_items_while_another_view_deletes_yields_live_pairs_and_pinned_one_commit(
    tmp_path: Path,
) -> None:
    """items() and values() list the keys, then read each as it is now: a key another
    process deleted meanwhile is passed over, never a KeyError halfway through, and the view
    is never held back. Inside pinned(), every pair is of the commit the block started at."""
    with _repo(tmp_path) as repo:
        writer = repo.open_view("p", "rw")
        for n in range(10):
            writer[f"k{n}"] = n
        writer.commit()
        reader = repo.open_view("p", "r")

        def change(round_: int) -> None:
            for n in (1, 5, 9):
                writer.pop(f"k{n}", None)
            writer["k2"] = round_
            writer.commit()

        items, values = iter(reader.items()), iter(reader.values())
        assert next(items) == ("k0", 0) and next(values) == 0
        change(1)
        assert reader["k2"] == 1  # an unfinished iteration holds nothing back
        assert list(items) == [(f"k{n}", 1 if n == 2 else n) for n in (2, 3, 4, 6, 7, 8)]
        assert list(values) == [1, 3, 4, 6, 7, 8]
        for n in (1, 5, 9):
            writer[f"k{n}"] = n
        writer.commit()
        with reader.pinned():
            pinned = iter(reader.items())
            assert next(pinned) == ("k0", 0)
            change(2)
            assert list(pinned) == [(f"k{n}", 1 if n == 2 else n) for n in range(1, 10)]
        assert dict(reader.items())["k2"] == 2
        writer.close()
        reader.close()


def test_a_reader_finding_a_batch_half_written_leaves_the_wals_reservation_uncached(
    tmp_path: Path,
) -> None:
    """A reader that finds a batch being written looks for a whole batch after it (damage, not
    a write in progress). It read the whole reservation to do so, and the zeros it brought
    into the page cache became data to the file system: every later check of the WAL's tail,
    by every reader and every writer taking the lease, read them again (100 KiB a look beside
    a busy writer). Only what was written is read now."""
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo:
        writer = repo.open_prefix("p", "rw")
        for i in range(3):
            writer[f"k{i}"] = i
            writer.commit()
        _, wal = _paths(repo, "p")
        used = h.wal_used(wal)
        fd = os.open(wal, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            assert size - used >= 60 << 10  # a reservation follows the batches
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as if never read
            op = fmt.encode_op(fmt.OP_PUT, "k3", 0, b"y" * 1000)
            frame, _ = fmt.encode_batch_with_meta(4, 1, [op])
            os.pwrite(fd, frame[:200], used)  # the next commit, half written
            written = -(-(used + 200) // 4096) * 4096
            with Repository(repo.root) as other, other.open_prefix("p", "r") as reader:
                assert reader["k2"] == 2 and "k3" not in reader
            assert written_end(fd, used, size) <= written, (written_end(fd, used, size), written)
        finally:
            os.close(fd)
        writer.rollback()


def test_a_reader_following_a_writer_leaves_the_wals_reservation_uncached(
    tmp_path: Path,
) -> None:
    """The kernel's read-ahead of a reader's small reads of the WAL brought the zeros reserved
    after the last batch into the page cache, where they count as data: each look at the tail
    read them again (58 KiB a look beside a busy writer). A WAL is read without it."""
    with _repo(tmp_path, checkpoint_bytes=BIG) as repo, Repository(repo.root) as other:
        writer = repo.open_prefix("p", "rw")
        reader = other.open_prefix("p", "r")
        for i in range(300):
            writer[f"k{i}"] = i
            writer.commit()
            assert reader[f"k{i}"] == i
        _, wal = _paths(repo, "p")
        fd = os.open(wal, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data_end = written_end(fd, fmt.HEADER_SIZE, size)  # before anything reads it all
            written = -(-h.wal_used(wal) // 4096) * 4096
            assert size - written >= 8 << 10  # a reservation follows the batches
            assert data_end <= written, (data_end, written)
        finally:
            os.close(fd)
