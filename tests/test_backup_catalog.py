"""A catalog an operator can trust (issue 14): complete means restorable, retention never
breaks a chain and says why, chains are proved before they are extended, damage reaches only
what depends on it, the catalog can be listed, and a restored repository backs up into the
catalog it came from.

Each state is checked against what the repository held when the backup was taken (dumped by
the test, independently of the code under test), and every claim of the catalog ("complete",
"restorable", "kept") by restoring what it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository
from hotcopy.storage._format import HEADER_SIZE
from hotcopy.workers import (
    BackupError,
    BackupManager,
    BackupNotFound,
    Catalog,
    CatalogError,
    backup,
    list_backups,
    main,
    prune,
    restore,
)
from hotcopy.workers._catalog import MANIFEST
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.timeout(90)]

h = storage_helpers()


dump_repo = h.dump_repository


def commit(root: Path, name: str, changes: dict[str, Any], *, checkpoint: bool = False) -> None:
    with Repository.init(root) as repo, repo.open_prefix(name, "rw") as px:
        for key, value in changes.items():
            px[key] = value
        px.commit()
        if checkpoint:
            px.checkpoint()


def compact(root: Path, name: str) -> None:
    with Repository(root) as repo, repo.open_prefix(name, "rw") as px:
        px.compact()


def damage_batch_header(root: Path, name: str) -> None:
    """Flip a bit of the first batch header of a main file (damage the copy refuses today)."""
    h.flip_byte(root / f"{name}.hc", HEADER_SIZE + 5, 0x40)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def backup_dirs(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.is_dir())


class Clock:
    """A settable wall clock (unix seconds) for backups, restores and prunes."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta).total_seconds()


# -- 1. complete means restorable -----------------------------------------------------------------


def test_a_backup_in_which_a_prefix_failed_is_partial_and_never_costs_its_last_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    for name in ("a", "bad", "c"):
        commit(root, name, {"v": name}, checkpoint=True)
    first_state = dump_repo(root)
    first = backup(root, dest, jobs=1)
    assert first.complete
    commit(root, "a", {"v": "a2"})
    damage_batch_header(root, "bad")

    status, out, err = cli(capsys, "backup", root, dest, "--json")
    assert status == 3, "a backup that lost a prefix must say so: partial"
    second = json.loads(out)
    assert second["complete"] is False
    assert sorted(second["failed"]) == ["bad"]
    assert "partial" in err and "bad" in err
    manifest = Catalog(dest).load(second["id"])
    assert manifest.complete is False and sorted(manifest.failed) == ["bad"]

    # Retention: the partial backup is never a kept backup, and the newest complete copy of
    # 'bad' (which the newer backup failed to take) is never removed.
    report = prune(dest, 1)
    assert first.id not in report.removed
    assert any(
        "bad" in reason for d in report.decisions if d.id == first.id for reason in d.reasons
    )
    # The default restore takes the newest complete backup and says which.
    status, out, err = cli(capsys, "restore", dest, tmp_path / "out")
    assert status == 0, err
    assert first.id in out
    assert dump_repo(tmp_path / "out") == first_state
    # The partial one only on request, saying what is missing.
    status, _, err = cli(capsys, "restore", dest, tmp_path / "p1", "--at", second["id"])
    assert status == 1 and "--allow-partial" in err and "bad" in err
    assert not (tmp_path / "p1").exists()
    result = restore(dest, tmp_path / "p2", at=second["id"], allow_partial=True)
    assert sorted(result.prefixes) == ["a", "c"] and sorted(result.missing) == ["bad"]
    # A partial backup is never the base of a chain.
    third = backup(root, dest, ["a", "c"], incremental=True, jobs=1)
    for name in ("a", "c"):
        entry = Catalog(dest).load(third.id).entries[name]
        assert entry.base != second["id"]


def test_a_backup_of_which_every_prefix_failed_leaves_nothing_behind(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    commit(root, "bad", {"v": 1}, checkpoint=True)
    backup(root, dest, jobs=1)
    before = backup_dirs(dest)
    damage_batch_header(root, "bad")
    with pytest.raises(BackupError, match="bad"):
        backup(root, dest, jobs=1)
    assert backup_dirs(dest) == before


# -- 2. retention ---------------------------------------------------------------------------------


def _staggered_chains(root: Path, dest: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Backups whose prefixes' chains restart at different backups: a compaction of one
    prefix, then of the other, between incremental backups."""
    ids, states = [], []

    def take() -> None:
        states.append(dump_repo(root))
        ids.append(backup(root, dest, incremental=True, jobs=1).id)

    for name in ("a", "b"):
        commit(root, name, {"v": 0})
    take()  # 0: a full, b full
    commit(root, "a", {"v": 1})
    commit(root, "b", {"v": 1})
    take()  # 1: a delta, b delta
    compact(root, "a")
    commit(root, "b", {"v": 2})
    take()  # 2: a full, b delta (base 1)
    commit(root, "a", {"v": 3})
    commit(root, "b", {"v": 3})
    take()  # 3: a delta (base 2), b delta (base 2)
    compact(root, "b")
    commit(root, "a", {"v": 4})
    take()  # 4: a delta (base 3), b full
    return ids, states


def test_prune_of_chains_that_restart_at_different_backups_breaks_none(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    ids, states = _staggered_chains(root, dest)
    kinds = [
        {name: entry.kind for name, entry in Catalog(dest).load(i).entries.items()} for i in ids
    ]
    assert kinds[2] == {"a": "full", "b": "delta"} and kinds[4] == {"a": "delta", "b": "full"}

    report = prune(dest, 1)
    assert Catalog(dest).verify() == [], "prune broke a chain"
    assert restore(dest, tmp_path / "latest").id == ids[4]
    assert dump_repo(tmp_path / "latest") == states[4]
    # Every backup still listed complete restores whole; every other one is marked.
    listing = list_backups(dest)
    for row in listing["backups"]:
        if row["status"] == "complete":
            assert row["restorable"], row
            target = tmp_path / f"r-{row['id']}"
            restore(dest, target, at=row["id"])
            assert dump_repo(target) == states[ids.index(row["id"])]
    assert ids[0] in report.removed and ids[1] in report.removed
    # A later prune with a wider rule works (it errored from then on).
    prune(dest, 3)
    assert Catalog(dest).verify() == []


def test_prune_says_what_it_keeps_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    ids, _ = _staggered_chains(root, dest)
    before = sorted(os.listdir(dest))
    status, out, _ = cli(capsys, "prune", dest, "--keep-last", "1", "--dry-run")
    assert status == 0
    assert sorted(os.listdir(dest)) == before  # a dry run changes nothing
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "keep" in lines[ids[4]] and "keep-last" in lines[ids[4]]
    assert "base of" in lines[ids[3]] and ids[4] in lines[ids[3]]
    assert "remove" in lines[ids[0]]
    # --keep N is --keep-last N
    status, out2, _ = cli(capsys, "prune", dest, "--keep", "1", "--dry-run")
    assert status == 0 and out2 == out
    status, _, err = cli(capsys, "prune", dest)
    assert status == 1 and "--keep" in err  # no rule: nothing is removed by accident


def _expected_keeps(times: list[datetime], now: datetime, rule: str, n: int) -> set[int]:
    """Which backups (by index, oldest first) a rule keeps, computed independently: the
    newest backup of each of the last ``n`` UTC periods that have one."""
    if rule == "last":
        return set(range(len(times))[-n:]) if n else set()
    if rule == "within":
        return {i for i, t in enumerate(times) if t >= now - timedelta(days=n)}
    period = {
        "hourly": lambda t: (t.year, t.month, t.day, t.hour),
        "daily": lambda t: (t.year, t.month, t.day),
        "weekly": lambda t: t.isocalendar()[:2],
        "monthly": lambda t: (t.year, t.month),
    }[rule]
    kept: dict[object, int] = {}
    for i in sorted(range(len(times)), key=lambda i: times[i], reverse=True):
        if period(times[i]) not in kept and len(kept) < n:
            kept[period(times[i])] = i
    return set(kept.values())


@pytest.mark.timeout(240)
def test_each_retention_rule_over_60_simulated_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    clock = Clock(datetime(2026, 10, 1, 0, 30, tzinfo=UTC))
    times, ids = [], []
    for step in range(150):  # every 9.6 hours for 60 days: hours, days and weeks skipped
        commit(root, "p", {"step": step})
        result = backup(root, dest, jobs=1, clock=clock)  # full copies: no chain to keep
        times.append(datetime.fromtimestamp(clock.now, UTC))
        ids.append(result.id)
        clock.advance(hours=9.6)
    now = datetime.fromtimestamp(clock.now, UTC)
    before = sorted(os.listdir(dest))
    for rule, n, option in [
        ("last", 5, "--keep-last"),
        ("hourly", 30, "--keep-hourly"),
        ("daily", 14, "--keep-daily"),
        ("weekly", 6, "--keep-weekly"),
        ("monthly", 3, "--keep-monthly"),
        ("within", 7, "--keep-within"),
    ]:
        report = prune(
            dest, clock=clock, dry_run=True, **{f"keep_{rule}": n if rule != "within" else f"{n}d"}
        )
        kept = {ids.index(d.id) for d in report.decisions if d.action == "keep"}
        assert kept == _expected_keeps(times, now, rule, n), rule
        assert sorted(os.listdir(dest)) == before
        if rule != "within":  # the command line runs on the real clock
            status, out, _ = cli(capsys, "prune", dest, option, n, "--dry-run", "--json")
            assert status == 0
            rows = json.loads(out)["backups"]
            assert {ids.index(r["id"]) for r in rows if r["action"] == "keep"} == kept
    # No rule empties a catalog: when the rules keep nothing, the newest backup stays.
    report = prune(dest, keep_within="1h", clock=clock, dry_run=True)
    assert report.kept == [ids[-1]] and "no rule kept any" in report.decisions[-1].reasons[0]
    # Rules combine (a backup kept by any rule is kept), and a real run removes the rest.
    report = prune(dest, keep_daily=7, keep_weekly=4, keep_monthly=2, clock=clock)
    rules = [("daily", 7), ("weekly", 4), ("monthly", 2)]
    expected = set().union(*(_expected_keeps(times, now, r, n) for r, n in rules))
    assert sorted(backup_dirs(dest)) == sorted(ids[i] for i in expected)
    assert sorted(report.removed) == sorted(set(ids) - {ids[i] for i in expected})
    assert Catalog(dest).verify() == []


# -- 3. chains proved before they are extended ----------------------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Path, Path, list[str]]]:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    with Repository.init(root) as repo, repo.open_prefix("p", "rw") as px:
        for i in range(40):
            px[f"k{i}"] = os.urandom(512)
        px.commit()
    ids = [backup(root, dest, incremental=True, jobs=1).id]
    commit(root, "p", {"more": 1})
    ids.append(backup(root, dest, incremental=True, jobs=1).id)
    assert Catalog(dest).load(ids[1]).entries["p"].kind == "delta"
    yield root, dest, ids


def test_an_incremental_backup_never_extends_a_chain_whose_full_copy_is_gone(
    chain: tuple[Path, Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest, ids = chain
    (dest / ids[0] / "p.hc").unlink()
    commit(root, "p", {"after": "loss"})
    state = dump_repo(root)
    status, out, _ = cli(capsys, "backup", root, dest, "--incremental")
    assert status == 0
    assert "full copy" in out and "p" in out  # the output says why
    latest = Catalog(dest).pick(None)
    assert latest.entries["p"].kind == "full"
    restore(dest, tmp_path / "out")
    assert dump_repo(tmp_path / "out") == state


def test_bit_rot_in_a_chain_is_found_by_verify_chain_and_a_full_copy_taken(
    chain: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    root, dest, ids = chain
    piece = dest / ids[0] / "p.hc"
    h.flip_byte(piece, piece.stat().st_size // 2, 0x01)
    commit(root, "p", {"after": "rot"})
    result = backup(root, dest, incremental=True, jobs=1, verify_chain=True)
    assert result.prefixes["p"]["kind"] == "full"
    assert "p" in result.chain_restarts and "checksum" in result.chain_restarts["p"]
    state = dump_repo(root)
    restore(dest, tmp_path / "out")
    assert dump_repo(tmp_path / "out") == state


def test_backup_manager_checks_chain_checksums_every_nth_run(
    chain: tuple[Path, Path, list[str]],
) -> None:
    root, dest, ids = chain
    manager = BackupManager(root, dest, incremental=True, verify_chain_every=3)
    piece = dest / ids[0] / "p.hc"
    h.flip_byte(piece, piece.stat().st_size // 2, 0x01)
    kinds = []
    for step in range(3):
        commit(root, "p", {"step": step})
        result = manager.backup_now()
        assert result is not None
        kinds.append(result.prefixes["p"]["kind"])
    assert "full" in kinds  # within N runs of the damage, the chain restarts


# -- 4. damage reaches only what depends on it ----------------------------------------------------


def test_a_damaged_manifest_and_a_duplicated_directory_block_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    commit(root, "p", {"v": 0})
    full0 = backup(root, dest, jobs=1)
    commit(root, "p", {"v": 1})
    delta1 = backup(root, dest, jobs=1, incremental=True)
    commit(root, "p", {"v": 2})
    full2 = backup(root, dest, jobs=1)
    state2 = dump_repo(root)
    (dest / delta1.id / MANIFEST).write_text('{"format": 2, "id": "garbage"')
    # A backup directory copied under a new (later) name.
    twin = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y%m%dT%H%M%S.%fZ")
    shutil.copytree(dest / full2.id, dest / twin)

    assert restore(dest, tmp_path / "out").id == full2.id
    assert dump_repo(tmp_path / "out") == state2
    before = backup_dirs(dest)
    commit(root, "p", {"v": 3})
    again = backup(root, dest, jobs=1, incremental=True)
    assert backup_dirs(dest) == sorted([*before, again.id])  # no empty directory left
    assert Catalog(dest).load(again.id).entries["p"].base == full2.id
    status, out, _ = cli(capsys, "verify", dest)
    assert status == 1
    assert delta1.id in out and twin in out
    assert restore(dest, tmp_path / "old", at=full0.id).id == full0.id
    prune(dest, 2)
    remaining = backup_dirs(dest)
    assert full2.id in remaining and again.id in remaining
    assert delta1.id not in remaining and twin not in remaining


def test_verify_of_a_catalog_with_nothing_restorable_fails_and_says_what_it_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    commit(root, "good", {"v": 1}, checkpoint=True)
    commit(root, "bad", {"v": 1}, checkpoint=True)
    Catalog.create(dest, Repository(root).id)  # an empty catalog
    status, _, err = cli(capsys, "verify", dest)
    assert status == 1 and "no complete" in err
    damage_batch_header(root, "bad")
    assert not backup(root, dest, jobs=1).complete
    status, _, err = cli(capsys, "verify", dest)
    assert status == 1
    assert "no complete" in err and "1 partial" in err


# -- 5. listing, ids, --at ------------------------------------------------------------------------

BACKUPS_JSON_KEYS = {
    "version",
    "catalog",
    "repository_id",
    "lineage",
    "backups",
}
BACKUP_ROW_KEYS = {
    "id",
    "time",
    "status",
    "consistent",
    "repository_id",
    "prefixes",
    "full",
    "delta",
    "missing",
    "bytes",
    "depends_on",
    "restorable",
    "problem",
}


def test_backups_lists_every_backup_with_a_versioned_json_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    ids, _ = _staggered_chains(root, dest)
    (dest / ids[1] / "b.hc-delta").unlink()  # 1 and the backups chained to it for b break
    status, out, _ = cli(capsys, "backups", dest, "--json")
    assert status == 0
    listing = json.loads(out)
    assert set(listing) == BACKUPS_JSON_KEYS and listing["version"] == 1
    rows = listing["backups"]
    assert [row["id"] for row in rows] == ids  # oldest first
    for row in rows:
        assert set(row) == BACKUP_ROW_KEYS
        assert datetime.fromisoformat(row["time"]).utcoffset() == timedelta(0)
        assert row["status"] == "complete"
    assert [row["restorable"] for row in rows] == [True, False, False, False, True]
    assert rows[3]["depends_on"] == ids[:3]  # a from 2; b from 2, 1 and 0
    assert sorted(rows[4]["depends_on"]) == [ids[2], ids[3]]
    assert (rows[2]["full"], rows[2]["delta"]) == (1, 1)
    assert "b.hc-delta" in rows[1]["problem"]
    status, text, _ = cli(capsys, "backups", dest)
    assert status == 0
    assert [line.split()[0] for line in text.splitlines()[2:]] == ids
    # `hotcopy ls` of a catalog points at `backups`, not at `init`.
    status, _, err = cli(capsys, "ls", dest)
    assert status == 1 and "hotcopy backups" in err


def test_ids_are_readable_timestamps_and_at_takes_ids_times_durations_and_latest(
    tmp_path: Path,
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    clock = Clock(datetime(2026, 12, 4, 16, 30, 0, 123456, tzinfo=UTC))
    states, ids = [], []
    for step in range(3):
        commit(root, "p", {"step": step})
        states.append(dump_repo(root))
        ids.append(backup(root, dest, jobs=1, incremental=True, clock=clock).id)
        clock.advance(hours=3)
    assert ids[0] == "20261204T163000.123456Z"
    assert ids == sorted(ids)

    def at(text: str) -> str:
        return Catalog(dest).pick(text, clock=clock).id

    assert at(ids[1]) == ids[1]
    assert at("latest") == ids[2]
    # now is 16:30 + 9 h: "4h" ago is 21:30, after the second backup (19:30)
    assert at("4h") == ids[1]
    assert at("7h") == ids[0]
    with pytest.raises(BackupNotFound):
        at("2d")
    local = datetime(2026, 12, 4, 20, 0, tzinfo=UTC).astimezone().replace(tzinfo=None)
    assert at(local.isoformat()) == ids[1]  # no zone: local time
    assert at("2026-12-04T20:00:00+00:00") == ids[1]
    with pytest.raises(CatalogError, match="neither"):
        at("yesterday")
    out = tmp_path / "out"
    restore(dest, out, at="5h", clock=clock)
    assert dump_repo(out) == states[1]


def test_catalogs_of_the_previous_format_keep_working(tmp_path: Path) -> None:
    """A catalog as the previous format wrote it (ids ``hotcopy_<kind>_<sec>_<usec>``, a
    format-1 marker and manifests) is read, listed, restored, extended and pruned."""
    root, dest = tmp_path / "repo", tmp_path / "bk"
    commit(root, "p", {"v": 0})
    commit(root, "q", {"v": 0})
    old_state = dump_repo(root)
    repo_id = Repository(root).id
    old_id = "hotcopy_backup_1700000000_000001"
    (dest / old_id).mkdir(parents=True)
    (dest / "hotcopy-backups.json").write_text(json.dumps({"format": 1, "repository_id": repo_id}))
    prefixes = {}
    with Repository(root) as repo:
        for name in ("p", "q"):
            copy = repo.copy_prefix(dest / old_id / f"{name}.hc", name)
            prefixes[name] = {
                "kind": "full",
                "file": f"{name}.hc",
                "base": None,
                "file_id": copy.file_id,
                "salt": copy.salt,
                "start": 0,
                "end": copy.length,
                "seq": copy.seq,
                "size": copy.size,
                "crc32": copy.crc32,
                "boundary_crc": copy.boundary_crc,
            }
    old: dict[str, Any] = {
        "format": 1,
        "id": old_id,
        "created": 1700000000.000001,
        "created_iso": "2023-11-14T22:13:20.000001+00:00",
        "repository_id": repo_id,
        "complete": True,
        "consistent": False,
        "interrupted": False,
        "prefixes": prefixes,
        "failed": {},
    }
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    old["checksum"] = hashlib.sha256(canonical).hexdigest()
    (dest / old_id / MANIFEST).write_text(json.dumps(old, indent=1, sort_keys=True))

    assert [row["id"] for row in list_backups(dest)["backups"]] == [old_id]
    restore(dest, tmp_path / "out", at=old_id)
    assert dump_repo(tmp_path / "out") == old_state
    commit(root, "p", {"v": 1})
    new = backup(root, dest, jobs=1, incremental=True)
    assert Catalog(dest).load(new.id).entries["p"].base == old_id
    assert Catalog(dest).backup_ids() == [old_id, new.id]
    prune(dest, 1)
    assert Catalog(dest).verify() == []
    assert Catalog(dest).backup_ids() == [old_id, new.id]  # the base of the kept one


# -- 6. lineage -----------------------------------------------------------------------------------


def test_a_restored_repository_backs_up_into_the_catalog_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest, new_root = tmp_path / "repo", tmp_path / "bk", tmp_path / "restored"
    commit(root, "p", {"v": 0})
    commit(root, "q", {"v": 0})
    first = backup(root, dest, jobs=1)
    restored = restore(dest, new_root)
    with Repository(new_root) as repo:
        assert repo.id != Repository(root).id
        assert repo.lineage is not None
        assert repo.lineage["restored_from"]["backup"] == first.id
    commit(new_root, "p", {"v": "after restore"})
    state = dump_repo(new_root)

    result = backup(new_root, dest, jobs=1, incremental=True)
    assert result.complete
    # Its files differ from the catalog's (a fresh salt): a new chain starts.
    assert {info["kind"] for info in result.prefixes.values()} == {"full"}
    restore(dest, tmp_path / "again")
    assert dump_repo(tmp_path / "again") == state
    listing = list_backups(dest)
    assert listing["repository_id"] == Repository(new_root).id
    assert listing["lineage"][0]["repository_id"] == Repository(root).id
    assert listing["lineage"][0]["restored_from"] == first.id
    _, out, _ = cli(capsys, "backups", dest)
    assert Repository(root).id in out and restored.id in out

    # The repository it replaced can no longer write there: two live repositories never
    # share a catalog by accident.
    commit(root, "p", {"v": "old one goes on"})
    with pytest.raises(CatalogError, match="superseded"):
        backup(root, dest, jobs=1)
    # Nor can a second restore of the old repository take the catalog over again.
    restore(dest, tmp_path / "second", at=first.id)
    with pytest.raises(CatalogError, match="superseded"):
        backup(tmp_path / "second", dest, jobs=1)


# -- 7. --consistent for 5,000 prefixes -----------------------------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: 5,000 prefixes cost 25,000 fsyncs on a disk,
    which says nothing about lease tables. Its coordinator is stopped afterwards."""
    base = Path("/dev/shm")
    if not base.is_dir() or not os.access(base, os.W_OK):
        yield tmp_path
        return
    path = base / f"hotcopy-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir()
    try:
        yield path
    finally:
        pid_file = path / "repo" / ".hotcopy" / "coordinator.pid"
        if pid_file.exists():
            subprocess.run([sys.executable, "-c", _STOP, str(pid_file)], check=False, timeout=30)
        shutil.rmtree(path, ignore_errors=True)


_STOP = r"""
import sys, psutil
with open(sys.argv[1]) as f:
    pid = int(f.read().split()[0])
try:
    p = psutil.Process(pid)
    p.terminate()
    p.wait(10)
except psutil.Error:
    pass
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_a_consistent_backup_of_5000_prefixes(shm_dir: Path) -> None:
    root, dest = shm_dir / "repo", shm_dir / "bk"
    count = 5000
    with Repository.init(root) as repo:
        for i in range(count):
            with repo.open_prefix(f"p{i:05d}", "rw") as px:
                px["i"] = i
                px.commit()
    result = backup(root, dest, consistent=True, jobs=2)
    assert result.complete and not result.failed, list(result.failed.items())[:3]
    assert len(result.prefixes) == count
    manifest = Catalog(dest).load(result.id)
    assert manifest.consistent and len(manifest.entries) == count
    # The write leases were held for the cut alone, not for the copies.
    assert 0 < result.cut_seconds < result.seconds
    with Repository(root) as repo, repo.open_prefix("p04999", "rw") as px:
        px["after"] = True
        px.commit()
    out = shm_dir / "out"
    restored = restore(dest, out, ["p00000", "p04999"])
    assert restored.prefixes == {"p00000": 1, "p04999": 1}
