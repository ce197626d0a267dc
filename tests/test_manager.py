"""BackupManager: periodic and change-triggered backups, failure accounting, incremental chains,
and JSON logical documents replayed with ``apply_delta``.

Debouncing is driven by an injected clock: the test sets the time, and learns that the manager's
thread has looked at it (so has decided whether a backup is due) from the clock itself -- no
real interval is waited for. Only the periodic test uses a short real interval, with a bounded
wait on its outcome.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository
from hotcopy.workers import (
    BackupError,
    BackupManager,
    BackupResult,
    Catalog,
    CatalogError,
    apply_delta,
)
from hotcopy.workers._catalog import backup_time_us

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

WAIT = 30.0


def dump_repo(root: Path) -> dict[str, dict[str, Any]]:
    with Repository(root) as repo:
        found = {}
        for name in repo.prefixes():
            with repo.open_prefix(name, "r") as px:
                found[name] = {key: px[key] for key in px}
        return found


def commit(root: Path, name: str, changes: dict[str, Any]) -> int:
    with Repository.init(root) as repo, repo.open_prefix(name, "rw") as px:
        for key, value in changes.items():
            if value is None:
                del px[key]
            else:
                px[key] = value
        return px.commit()


def document_of(dest: Path, result: BackupResult | None) -> Path:
    """The logical document of ``result``, found as a DictDB user finds one: by name."""
    assert result is not None
    seconds, micros = divmod(backup_time_us(result.id), 1_000_000)
    (found,) = dest.glob(f"hotcopy_*_{seconds}_{micros:06d}.json")
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Bounded wait on an observable outcome."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        while not predicate():
            if stop.wait(0.01):
                return predicate()
        return True
    finally:
        timer.cancel()


class FakeClock:
    """A settable clock that counts how often a thread other than the test's reads it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._owner = threading.current_thread()
        self._cond = threading.Condition()
        self.reads = 0

    def __call__(self) -> float:
        with self._cond:
            if threading.current_thread() is not self._owner:
                self.reads += 1
                self._cond.notify_all()
            return self.now

    def wait_for_reads(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reads >= count, WAIT), "the manager is stuck"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    commit(path, "users", {"alice": {"age": 3}, "bob": "x"})
    commit(path, "blobs", {"b": b"\x00\x01"})
    return path


def _no_manager_thread() -> bool:
    return not any(t.name == "hotcopy-backup" and t.is_alive() for t in threading.enumerate())


# -- when backups happen ------------------------------------------------------------------------


def test_periodic_backups_happen(root: Path, tmp_path: Path) -> None:
    manager = BackupManager(root, tmp_path / "b", backup_interval=0.2, min_backup_interval=0)
    with manager:
        assert wait_until(lambda: manager.backups_taken >= 2)
    assert _no_manager_thread()
    taken = manager.backups_taken
    assert taken >= 2
    manifests = Catalog(tmp_path / "b").manifests()
    assert len(manifests) == taken and all(m.complete for m in manifests)
    assert manager.last_result is not None and manager.last_result.id == manifests[-1].id
    manager.stop()  # idempotent


def test_notify_change_is_debounced_by_min_backup_interval(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    clock = FakeClock()
    manager = BackupManager(root, dest, backup_interval=1000, min_backup_interval=10, clock=clock)
    manager.start()
    try:
        clock.wait_for_reads(1)  # the thread is up
        clock.now = 1.0
        manager.notify_change()  # no backup yet: taken at once
        assert wait_until(lambda: manager.backups_taken == 1)
        for moment in (3.0, 5.0, 9.0, 10.0):  # a burst within min_backup_interval of it
            reads = clock.reads
            clock.now = moment
            manager.notify_change()
            clock.wait_for_reads(reads + 1)  # the thread has looked at the time again
        # Had any notification started a backup, the thread would have read the clock only
        # after it.
        assert manager.backups_taken == 1

        clock.now = 11.0  # min_backup_interval after that backup: due
        manager.notify_change()
        assert wait_until(lambda: manager.backups_taken == 2)
    finally:
        manager.stop()
    assert _no_manager_thread()
    assert manager.backups_taken == 2
    assert len(Catalog(dest).manifests()) == 2
    assert manager.consecutive_failures == 0


def test_start_twice_is_refused(root: Path, tmp_path: Path) -> None:
    manager = BackupManager(root, tmp_path / "b", clock=FakeClock())
    manager.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            manager.start()
    finally:
        manager.stop()


def test_bad_settings_are_refused(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file_format"):
        BackupManager(root, tmp_path / "b", file_format="pickle")
    with pytest.raises(ValueError, match="backup_interval"):
        BackupManager(root, tmp_path / "b", backup_interval=0)
    with pytest.raises(ValueError, match="rate_limit"):
        BackupManager(root, tmp_path / "b", rate_limit=0)


# -- failures -----------------------------------------------------------------------------------


def test_failures_are_counted_reported_and_reset_by_a_success(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    dest.write_text("a regular file where the backup directory should be")
    calls: list[tuple[BaseException, int]] = []
    manager = BackupManager(root, dest, on_backup_failure=lambda err, n: calls.append((err, n)))
    for expected in (1, 2, 3):
        assert manager.backup_now() is None
        assert manager.consecutive_failures == expected
    assert [n for _, n in calls] == [1, 2, 3]
    for error, _ in calls:
        assert isinstance(error, CatalogError) and isinstance(error, BackupError)
        assert "not a directory" in str(error)
    assert manager.backups_taken == 0

    dest.unlink()
    result = manager.backup_now()
    assert result is not None
    assert manager.consecutive_failures == 0
    assert manager.backups_taken == 1
    assert len(calls) == 3

    # After a success the count starts again at 1.
    other = tmp_path / "elsewhere"
    other.write_text("again a file")
    manager.backup_dir = other
    assert manager.backup_full() is None
    assert calls[-1][1] == 1 and manager.consecutive_failures == 1


def test_a_background_failure_reaches_the_callback(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    dest.write_text("not a directory")
    failures: list[int] = []
    failed = threading.Event()

    def on_failure(error: BaseException, n: int) -> None:
        failures.append(n)
        failed.set()

    clock = FakeClock()
    manager = BackupManager(
        root, dest, min_backup_interval=0, on_backup_failure=on_failure, clock=clock
    )
    with manager:
        manager.notify_change()
        assert failed.wait(WAIT)
    assert failures == [1]
    assert manager.consecutive_failures == 1


# -- incremental --------------------------------------------------------------------------------


def test_incremental_backups_are_deltas_counted_until_a_full_one(
    root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    manager = BackupManager(root, dest, incremental=True, max_deltas_before_full=3)

    def kinds(result: Any) -> set[str]:
        assert result is not None
        return {info["kind"] for info in result.prefixes.values()}

    assert kinds(manager.backup_now()) == {"full"}  # nothing to continue yet
    assert manager.deltas_since_full == 0
    for expected in (1, 2, 3):
        commit(root, "users", {f"n{expected}": expected})
        assert kinds(manager.backup_now()) == {"delta"}
        assert manager.deltas_since_full == expected
    commit(root, "users", {"n4": 4})
    assert kinds(manager.backup_now()) == {"full"}  # the chain is as long as allowed
    assert manager.deltas_since_full == 0
    commit(root, "users", {"n5": 5})
    assert kinds(manager.backup_delta()) == {"delta"}
    assert manager.deltas_since_full == 1
    assert kinds(manager.backup_full()) == {"full"}  # even when nothing changed
    assert manager.deltas_since_full == 0
    catalog = Catalog(dest)
    for manifest in catalog.manifests():
        assert len(catalog.chain(manifest, "users")) <= 4


# -- JSON logical documents ---------------------------------------------------------------------


def test_json_documents_replayed_with_apply_delta_reproduce_the_repository(
    root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    manager = BackupManager(root, dest, file_format="json", incremental=True)
    commit(root, "users", {"carol": [1, 2, {"x": None}], "dave": True})
    states = [dump_repo(root)]
    results = [manager.backup_full()]

    commit(root, "users", {"alice": {"age": 4}, "bob": None, "erin": b"\xff\x00bin"})
    commit(root, "fresh", {"k": "new prefix"})  # new since the full one: a full entry
    states.append(dump_repo(root))
    results.append(manager.backup_delta())

    commit(root, "users", {"bob": "back", "carol": None})
    commit(root, "blobs", {"b": None, "c": b""})
    states.append(dump_repo(root))
    results.append(manager.backup_now())

    assert all(result is not None for result in results)
    docs = [document_of(dest, result) for result in results]
    loaded = [json.loads(doc.read_text()) for doc in docs]
    assert [doc["type"] for doc in loaded] == ["full", "delta", "delta"]
    users = loaded[1]["prefixes"]["users"]
    assert users["deletes"] == ["bob"]
    assert users["upserts"]["erin"] == {"$base64": base64.b64encode(b"\xff\x00bin").decode()}
    assert sorted(users["upserts"]) == ["alice", "erin"]

    # A fresh repository, with one stray record a full document must remove.
    fresh = tmp_path / "fresh-repo"
    commit(fresh, "users", {"stray": 1})
    counts = []
    for doc, state in zip(docs, states, strict=True):
        counts.append(apply_delta(fresh, doc))
        assert dump_repo(fresh) == state
    # full: users alice, bob, carol, dave (+ the stray delete) and blobs b
    # delta 1: users alice, erin upserted and bob deleted; fresh k; blobs unchanged
    # delta 2: users bob upserted and carol deleted; blobs c upserted and b deleted
    assert counts == [6, 4, 4]
    restored = dump_repo(fresh)
    assert restored["users"]["erin"] == b"\xff\x00bin"
    assert restored["blobs"]["c"] == b""

    with Repository.init(tmp_path / "again") as repo:
        assert apply_delta(repo, docs[0]) == 5  # a Repository object works too
        assert repo.prefixes() == ["blobs", "users"]  # and stays open: it is the caller's

    (tmp_path / "junk.json").write_text(json.dumps({"type": "other"}))
    with pytest.raises(BackupError, match="not a hotcopy"):
        apply_delta(fresh, tmp_path / "junk.json")


def test_native_format_writes_no_document(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    result = BackupManager(root, dest).backup_now()
    assert result is not None
    assert [path.name for path in dest.glob("*.json")] == ["hotcopy-backups.json"]
    assert (dest / result.id / "MANIFEST.json").exists()


def test_a_replay_after_compaction_drops_what_the_compaction_dropped(
    root: Path, tmp_path: Path
) -> None:
    # A compacted prefix has no delta: its entry in the next (delta) backup is a full copy that
    # only holds the live records. Its document must say so, or a replay of the documents in
    # order keeps the records deleted before the compaction.
    dest = tmp_path / "b"
    manager = BackupManager(root, dest, file_format="json", incremental=True)
    commit(root, "users", {f"u{i}": i for i in range(6)})
    first = manager.backup_full()
    with Repository(root) as repo, repo.open_prefix("users", "rw") as px:
        del px["u0"]
        del px["alice"]
        px.commit()
        px.compact()
    commit(root, "blobs", {"more": b"\x01"})
    second = manager.backup_now()
    assert first is not None and second is not None
    assert second.prefixes["users"]["kind"] == "full"
    assert second.prefixes["blobs"]["kind"] == "delta"
    document = json.loads(document_of(dest, second).read_text())
    assert document["type"] == "delta"
    assert document["prefixes"]["users"]["full"] is True
    assert "full" not in document["prefixes"]["blobs"]

    fresh = tmp_path / "fresh-repo"
    apply_delta(fresh, document_of(dest, first))
    # users: 6 live records (bob, u1..u5) upserted, 2 deleted (u0, alice); blobs: one upsert.
    assert apply_delta(fresh, document_of(dest, second)) == 6 + 2 + 1
    assert dump_repo(fresh) == dump_repo(root)


def test_a_dict_shaped_like_the_bytes_encoding_survives_a_replay(
    root: Path, tmp_path: Path
) -> None:
    lookalike = {"$base64": base64.b64encode(b"not bytes").decode()}
    commit(root, "users", {"tricky": lookalike})
    dest = tmp_path / "b"
    result = BackupManager(root, dest, file_format="json").backup_full()
    assert result is not None
    fresh = tmp_path / "fresh-repo"
    apply_delta(fresh, document_of(dest, result))
    assert dump_repo(fresh)["users"]["tricky"] == lookalike


# -- as DictDB's documents use it (issue 16) ----------------------------------------------------


def test_the_manager_takes_dictdbs_arguments_by_name(root: Path, tmp_path: Path) -> None:
    with Repository(root) as db:
        backup = BackupManager(
            db=db,
            backup_dir=tmp_path / "backups",
            backup_interval=300,
            file_format="json",
            min_backup_interval=5.0,
            on_backup_failure=lambda error, count: None,
            incremental=False,
            max_deltas_before_full=10,
        )
        assert backup.backup_now() is not None
    assert backup.consecutive_failures == 0 and backup.deltas_since_full == 0


def test_notify_change_without_start_backs_up_at_once_respecting_min_backup_interval(
    root: Path, tmp_path: Path
) -> None:
    clock = FakeClock()
    backup = BackupManager(db=root, backup_dir=tmp_path / "b", min_backup_interval=10, clock=clock)
    backup.notify_change()  # never backed up: now, in this thread
    assert backup.backups_taken == 1
    clock.now = 5.0
    backup.notify_change()  # within min_backup_interval of that backup: not now
    assert backup.backups_taken == 1
    clock.now = 10.0
    backup.notify_change()
    assert backup.backups_taken == 2
    assert _no_manager_thread()
    assert len(Catalog(tmp_path / "b").manifests()) == 2


def test_the_first_change_after_start_is_backed_up_without_waiting_min_backup_interval(
    root: Path, tmp_path: Path
) -> None:
    clock = FakeClock()
    backup = BackupManager(
        db=root,
        backup_dir=tmp_path / "b",
        backup_interval=1000,
        min_backup_interval=60,
        clock=clock,
    )
    backup.start()
    try:
        clock.wait_for_reads(1)
        clock.now = 1.0  # one second after start, no backup ever taken
        backup.notify_change()
        assert wait_until(lambda: backup.backups_taken == 1)
    finally:
        backup.stop()


def test_an_incremental_backup_of_an_unchanged_repository_is_skipped(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "b"
    backup = BackupManager(db=root, backup_dir=dest, incremental=True, max_deltas_before_full=2)
    first = backup.backup_now()
    assert first is not None
    commit(root, "users", {"carol": 1})
    assert backup.backup_now() is not None and backup.deltas_since_full == 1
    with caplog.at_level("INFO", logger="hotcopy.workers._manager"):
        for _ in range(3):
            assert backup.backup_now() is None  # nothing changed: no backup written
    assert "nothing changed" in caplog.text
    assert backup.backups_skipped == 3 and backup.backups_taken == 2
    assert backup.deltas_since_full == 1 and backup.consecutive_failures == 0
    assert len(Catalog(dest).manifests()) == 2
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(
        m.id for m in Catalog(dest).manifests()
    )  # and no directory was left behind
    commit(root, "users", {"carol": 2})
    assert backup.backup_now() is not None and backup.deltas_since_full == 2


def test_json_documents_are_named_as_dictdb_names_them_by_what_they_hold(
    root: Path, tmp_path: Path
) -> None:
    backup_dir = tmp_path / "backups"
    backup = BackupManager(db=root, backup_dir=backup_dir, file_format="json", incremental=True)
    assert backup.backup_now() is not None  # the first incremental run: all full copies
    commit(root, "users", {"carol": 1})
    assert backup.backup_delta() is not None
    fulls = sorted(backup_dir.glob("hotcopy_backup_*.json"))
    deltas = sorted(backup_dir.glob("hotcopy_delta_*.json"))
    assert len(fulls) == 1 and len(deltas) == 1
    assert json.loads(fulls[0].read_text())["type"] == "full"
    assert json.loads(deltas[0].read_text())["type"] == "delta"

    # DictDB's restore recipe: the latest full one, then the deltas in order.
    fresh = tmp_path / "restored"
    apply_delta(fresh, fulls[-1])
    for delta_file in sorted(backup_dir.glob("hotcopy_delta_*.json")):
        apply_delta(fresh, delta_file)
    assert dump_repo(fresh) == dump_repo(root)


def test_apply_delta_leaves_the_callers_open_prefix_and_its_pending_writes_alone(
    root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    result = BackupManager(db=root, backup_dir=dest, file_format="json").backup_full()
    assert result is not None
    (document,) = dest.glob("hotcopy_backup_*.json")
    fresh = tmp_path / "fresh"
    commit(fresh, "blobs", {"old": 1})  # a full document drops it
    with Repository.init(fresh) as db:
        users = db.open_prefix("users", "rw")
        users["pending"] = 1
        with pytest.raises(BackupError, match="uncommitted"):
            apply_delta(db, document)
        assert not users.closed and users["pending"] == 1 and users.in_transaction
        assert "pending" not in _read_in_another_process(fresh, "users")
        users.rollback()

        reader = db.open_prefix("blobs", "r")  # open read-only by the caller
        assert apply_delta(db, document) == 4  # users alice, bob; blobs b, and old deleted
        assert not users.closed and not reader.closed and reader.mode == "r"
        assert users["alice"] == {"age": 3} and reader["b"] == b"\x00\x01" and "old" not in reader
        users["mine"] = 2  # the caller's prefix is still usable
        users.commit()
    assert _read_in_another_process(fresh, "users")["mine"] == 2


def _read_in_another_process(root: Path, name: str) -> dict[str, Any]:
    import subprocess
    import sys

    code = (
        "import json, sys\nfrom hotcopy.storage import Repository\n"
        "with Repository(sys.argv[1]) as r, r.open_prefix(sys.argv[2], 'r') as p:\n"
        "    print(json.dumps({k: p[k] for k in p if not isinstance(p[k], bytes)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root), name],
        capture_output=True, text=True, timeout=WAIT, check=True,
    )  # fmt: skip
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def test_prune_removes_the_logical_document_of_each_backup_it_removes(
    root: Path, tmp_path: Path
) -> None:
    from hotcopy.workers import prune

    dest = tmp_path / "b"
    backup = BackupManager(db=root, backup_dir=dest, file_format="json")
    old, new = backup.backup_full(), backup.backup_full()
    assert old is not None and new is not None
    kept = document_of(dest, new)
    prune(dest, keep_last=1)
    assert [m.id for m in Catalog(dest).manifests()] == [new.id]
    assert list(dest.glob("hotcopy_*.json")) == [kept]


def test_the_first_periodic_backup_is_one_interval_after_start_whatever_the_clock_reads(
    root: Path, tmp_path: Path
) -> None:
    clock = FakeClock()  # reads 0.0 at start: a falsy time is still a time
    backup = BackupManager(db=root, backup_dir=tmp_path / "b", backup_interval=0.2, clock=clock)
    backup.start()
    try:
        clock.wait_for_reads(1)  # started at 0.0; the thread rereads the clock every 0.2 s
        assert backup.backups_taken == 0
        clock.now = 0.2  # one interval after the start: due, with no change notified
        assert wait_until(lambda: backup.backups_taken == 1)
    finally:
        backup.stop()
