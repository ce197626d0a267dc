"""BackupManager: periodic, change-triggered and incremental backups in the background.

One daemon thread decides when to back up: every ``backup_interval`` seconds, and soon after
:meth:`notify_change` — but never sooner than ``min_backup_interval`` after the previous backup,
so a burst of notifications becomes one backup. Manual calls (:meth:`backup_now` and friends)
run in the caller's thread; a lock keeps backups one at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotcopy.storage import Repository

from ._backup import BackupResult, backup
from ._catalog import Catalog
from ._errors import BackupError
from ._logical import changes_in, write_document

log = logging.getLogger(__name__)

FailureCallback = Callable[[BaseException, int], None]


class BackupManager:
    """Keeps the backups of one repository in ``backup_dir``.

    Args:
        root_or_repo: The repository (or its root directory).
        backup_dir: The backup catalog directory (created if absent).
        backup_interval: Seconds between periodic backups once started.
        file_format: ``"native"``, or ``"json"`` to also write each backup's logical document
            (``<backup_dir>/<backup id>.json``; see :func:`apply_delta`).
        min_backup_interval: Least seconds between a backup and one triggered by a change.
        on_backup_failure: Called as ``(error, consecutive_failures)`` after a failed backup.
        incremental: Periodic and triggered backups are deltas where possible.
        max_deltas_before_full: Longest chain of deltas before a full backup is forced.
        jobs: Copy-worker processes per backup.
        verify_chain_every: Every N-th incremental backup (the first one included) reads every
            byte of each chain it continues; the others check each link's manifest and size.
            A prefix whose chain fails gets a full copy.
        key_file: The key of an authenticated catalog (default ``$HOTCOPY_BACKUP_KEY_FILE``).
        clock: The monotonic clock that times periodic and triggered backups.
    """

    def __init__(
        self,
        root_or_repo: Repository | str | os.PathLike[str],
        backup_dir: str | os.PathLike[str],
        backup_interval: float = 300,
        file_format: str = "native",
        min_backup_interval: float = 5.0,
        on_backup_failure: FailureCallback | None = None,
        incremental: bool = False,
        max_deltas_before_full: int = 10,
        jobs: int = 1,
        clock: Callable[[], float] = time.monotonic,
        verify_chain_every: int = 10,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if file_format not in ("native", "json"):
            raise ValueError(f"file_format must be 'native' or 'json', not {file_format!r}")
        if backup_interval <= 0 or min_backup_interval < 0:
            raise ValueError("backup_interval must be positive and min_backup_interval >= 0")
        if verify_chain_every < 1:
            raise ValueError(f"verify_chain_every must be at least 1, not {verify_chain_every}")
        self.root = str(
            root_or_repo.root if isinstance(root_or_repo, Repository) else Path(root_or_repo)
        )
        self.backup_dir = Path(backup_dir)
        self.backup_interval = backup_interval
        self.file_format = file_format
        self.min_backup_interval = min_backup_interval
        self.on_backup_failure = on_backup_failure
        self.incremental = incremental
        self.max_deltas_before_full = max_deltas_before_full
        self.jobs = jobs
        self.verify_chain_every = verify_chain_every
        self.key_file = key_file
        self.consecutive_failures = 0
        self.incremental_runs = 0
        self.deltas_since_full = 0
        self.backups_taken = 0
        self.last_result: BackupResult | None = None
        self._clock = clock
        self._last_backup_at: float | None = None
        self._change_pending = False
        self._stopping = False
        self._wakeup = threading.Condition()
        self._backup_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- manual backups -------------------------------------------------------------------

    def backup_now(self) -> BackupResult | None:
        """Back up now: a delta in incremental mode (until the chain is long), else full."""
        full = not self.incremental or self.deltas_since_full >= self.max_deltas_before_full
        return self._run(incremental=not full)

    def backup_full(self) -> BackupResult | None:
        """A full backup now; it starts a new chain."""
        return self._run(incremental=False)

    def backup_delta(self) -> BackupResult | None:
        """An incremental backup now (deltas where the chain allows, full copies elsewhere)."""
        return self._run(incremental=True)

    def notify_change(self) -> None:
        """Ask for a backup soon; debounced by ``min_backup_interval``."""
        with self._wakeup:
            self._change_pending = True
            self._wakeup.notify()

    # -- the background thread ------------------------------------------------------------

    def start(self) -> None:
        """Start periodic and change-triggered backups in a daemon thread."""
        with self._wakeup:
            if self._thread is not None:
                raise RuntimeError("BackupManager is already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="hotcopy-backup", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after the backup in progress, if any; idempotent."""
        with self._wakeup:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._wakeup.notify()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> BackupManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        with self._wakeup:
            if self._last_backup_at is None:
                self._last_backup_at = self._clock()  # the first periodic backup is one interval in
        while True:
            with self._wakeup:
                while not self._stopping:
                    delay = self._seconds_until_due()
                    if delay <= 0:
                        break
                    self._wakeup.wait(delay)
                if self._stopping:
                    return
                self._change_pending = False
            self.backup_now()

    def _seconds_until_due(self) -> float:
        last = self._last_backup_at if self._last_backup_at is not None else self._clock()
        now = self._clock()
        due = last + self.backup_interval
        if self._change_pending:
            due = min(due, last + self.min_backup_interval)
        return due - now

    # -- one backup -----------------------------------------------------------------------

    def _run(self, *, incremental: bool) -> BackupResult | None:
        with self._backup_lock:
            verify_chain = incremental and self.incremental_runs % self.verify_chain_every == 0
            self.incremental_runs += incremental
            try:
                result = backup(
                    self.root,
                    self.backup_dir,
                    jobs=self.jobs,
                    incremental=incremental,
                    max_deltas_before_full=self.max_deltas_before_full,
                    verify_chain=verify_chain,
                    key_file=self.key_file,
                )
                if not result.complete:
                    raise BackupError(
                        f"backup {result.id} is partial: it could not copy "
                        f"{len(result.failed)} prefix(es): "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(result.failed.items()))
                    )
                if self.file_format == "json":
                    self._write_logical(result)
            except Exception as err:
                self.consecutive_failures += 1
                log.warning(
                    "backup failed root=%s failures=%s error=%s",
                    self.root,
                    self.consecutive_failures,
                    err,
                )
                if self.on_backup_failure is not None:
                    self.on_backup_failure(err, self.consecutive_failures)
                return None
            finally:
                with self._wakeup:
                    self._last_backup_at = self._clock()
            self.consecutive_failures = 0
            self.backups_taken += 1
            self.last_result = result
            kinds = {entry["kind"] for entry in result.prefixes.values()}
            self.deltas_since_full = self.deltas_since_full + 1 if "delta" in kinds else 0
            log.info("backup done id=%s bytes=%s", result.id, result.bytes)
            return result

    def _write_logical(self, result: BackupResult) -> None:
        catalog = Catalog(self.backup_dir, key_file=self.key_file)
        manifest = catalog.load(result.id)
        full = all(entry.kind == "full" for entry in manifest.entries.values())
        prefixes: dict[str, Any] = {}
        for name, entry in manifest.entries.items():
            prefixes[name] = changes_in(
                catalog.path / result.id / entry.file,
                full=entry.kind == "full",
                start=entry.start,
            )
        write_document(
            catalog.path / f"{result.id}.json",
            "full" if full else "delta",
            manifest.created,
            prefixes,
            # A full copy inside a delta backup (a new or compacted prefix): applying it must
            # also drop what the rewrite dropped, or a replay resurrects deleted records.
            frozenset(name for name, entry in manifest.entries.items() if entry.kind == "full"),
        )
