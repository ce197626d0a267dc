"""Bounded, visible waits: ``--timeout`` on every command that may wait for a lease or the
catalog lock, a notice naming the holder after a second on a terminal, and timings that leave
the wait out (issue 17, point 2)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hotcopy.storage import Repository
from hotcopy.workers import Catalog, backup, prune
from hotcopy.workers._places import CatalogLock

pytestmark = pytest.mark.timeout(60)


def _repository(root: Path) -> None:
    with Repository.init(root) as repo, repo.open_prefix("p", "rw") as px:
        px["k"] = "v" * 1000
        px.commit()


def test_backup_and_prune_take_the_catalog_lock_through_the_callers_acquire(
    tmp_path: Path,
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    _repository(root)
    taken: list[CatalogLock] = []

    def slow_acquire(lock: CatalogLock) -> None:
        began = time.monotonic()
        while time.monotonic() - began < 0.3:  # a wait the caller measures, not a sync
            pass
        lock.acquire(5)
        taken.append(lock)

    def released() -> bool:
        with Catalog(dest).locked(lambda lock: lock.acquire(0)):  # LockBusy if still held
            return True

    began = time.monotonic()
    result = backup(root, dest, jobs=1, acquire_lock=slow_acquire)
    total = time.monotonic() - began
    assert len(taken) == 1 and released()
    assert result.waited >= 0.3
    assert result.seconds <= total - result.waited + 0.01  # the wait is not backup time
    assert result.to_json()["waited"] == round(result.waited, 6)
    prune(dest, keep_last=1, acquire_lock=slow_acquire)
    assert len(taken) == 2 and released()
