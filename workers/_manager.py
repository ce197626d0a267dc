"""BackupManager: periodic, change-triggered and incremental backups, as DictDB's.

Once started, one daemon thread decides when to back up: every ``backup_interval`` seconds,
and after :meth:`notify_change` -- at once if no backup was taken yet, else no sooner than
``min_backup_interval`` after the previous one, so a burst of notifications becomes one backup.
Not started, :meth:`notify_change` backs up in the caller's thread under the same rule. Manual
calls (:meth:`backup_now` and friends) run in the caller's thread; a lock keeps backups one at
a time. An incremental run that finds nothing changed since the newest backup writes none.
"""

from __future__ import annotations

import logging
import math
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
from ._places import DirectoryPlace
from ._replicate import Replicator
from ._s3 import is_object_url

log = logging.getLogger(__name__)

FailureCallback = Callable[[BaseException, int], None]


class BackupManager:
    """Keeps the backups of one repository in ``backup_dir``.

    Args:
        db: The repository (or its root directory); named as DictDB names it.
        backup_dir: The backup catalog: a directory (created if absent) or ``s3://BUCKET/PATH``.
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
        rate_limit: Bytes per second at most that a backup copies, on average (as RocksDB's
            BackupEngine offers): gentler on live writers, longer backups.
        compress: Store backups zstd-compressed (an ``s3://`` catalog only).
        replicate_interval: Once started, replicate instead (``_replicate``): every commit is
            shipped to ``backup_dir`` within this many seconds, with a snapshot every
            ``backup_interval``; change notifications are then not needed.
        clock: The monotonic clock that times periodic and triggered backups.
    """

    def __init__(
        self,
        db: Repository | str | os.PathLike[str],
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
        rate_limit: float | None = None,
        compress: bool = False,
        replicate_interval: float | None = None,
    ) -> None:
        if file_format not in ("native", "json"):
            raise ValueError(f"file_format must be 'native' or 'json', not {file_format!r}")
        if backup_interval <= 0 or min_backup_interval < 0:
            raise ValueError("backup_interval must be positive and min_backup_interval >= 0")
        if rate_limit is not None and not rate_limit > 0:
            raise ValueError(f"rate_limit must be positive (bytes per second), not {rate_limit}")
        if verify_chain_every < 1:
            raise ValueError(f"verify_chain_every must be at least 1, not {verify_chain_every}")
        self.root = str(db.root if isinstance(db, Repository) else Path(db))
        remote = isinstance(backup_dir, str) and is_object_url(backup_dir)
        if file_format == "json" and remote:
            raise ValueError("file_format 'json' writes local documents: give a backup directory")
        self.backup_dir = backup_dir if remote else Path(backup_dir)
        self.backup_interval = backup_interval
        self.file_format = file_format
        self.min_backup_interval = min_backup_interval
        self.on_backup_failure = on_backup_failure
        self.incremental = incremental
        self.max_deltas_before_full = max_deltas_before_full
        self.jobs = jobs
        self.verify_chain_every = verify_chain_every
        self.key_file = key_file
        self.rate_limit = rate_limit
        self.compress = compress
        self.replicate_interval = replicate_interval
        self.replicator: Replicator | None = None  # while started, replicating
        self._stop_replicating = threading.Event()
        self.consecutive_failures = 0
        self.incremental_runs = 0
        self.deltas_since_full = 0
        self.backups_taken = 0
        self.backups_skipped = 0  # incremental runs that found nothing changed
        self.last_result: BackupResult | None = None
        self._clock = clock
        self._last_backup_at: float | None = None
        self._started_at: float | None = None
        self._change_pending = False
        self._stopping = False
        self._wakeup = threading.Condition()
        self._backup_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- manual backups -------------------------------------------------------------------

    def backup_now(self) -> BackupResult | None:
        """Back up now: a delta in incremental mode (until the chain is long), else full.

        Returns None when the backup failed (see ``consecutive_failures``) or, incremental,
        when nothing changed since the newest backup (see ``backups_skipped``).
        """
        full = not self.incremental or self.deltas_since_full >= self.max_deltas_before_full
        return self._run(incremental=not full)

    def backup_full(self) -> BackupResult | None:
        """A full backup now; it starts a new chain."""
        return self._run(incremental=False)

    def backup_delta(self) -> BackupResult | None:
        """An incremental backup now (deltas where the chain allows, full copies elsewhere)."""
        return self._run(incremental=True)

    def notify_change(self) -> None:
        """Ask for a backup after a change; debounced by ``min_backup_interval``.

        Started, the thread takes it; not started, it is taken here and now when due (a
        notification within ``min_backup_interval`` of the last backup is left pending for
        the next one, or for the thread once started).
        """
        if self.replicator is not None:
            return  # every commit is shipped anyway
        with self._wakeup:
            self._change_pending = True
            if self._thread is not None:
                self._wakeup.notify()
                return
            if self._seconds_until_due() > 0:
                return
            self._change_pending = False
        self.backup_now()

    # -- the background thread ------------------------------------------------------------

    def start(self) -> None:
        """Start periodic and change-triggered backups in a daemon thread."""
        with self._wakeup:
            if self._thread is not None:
                raise RuntimeError("BackupManager is already started")
            self._stopping = False
            self._started_at = self._clock()  # the first periodic backup is one interval in
            loop = self._loop
            if self.replicate_interval is not None:
                self.replicator = Replicator(
                    self.root,
                    self.backup_dir,
                    interval=self.replicate_interval,
                    snapshot_interval=self.backup_interval,
                    key_file=self.key_file,
                    compress=self.compress,
                    jobs=self.jobs,
                )
                self.replicator.snapshot()  # shipping starts from it: an error is the caller's
                self._stop_replicating.clear()
                loop = self._replicate
            self._thread = threading.Thread(target=loop, name="hotcopy-backup", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after the backup in progress, if any; idempotent."""
        with self._wakeup:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._stop_replicating.set()
            self._wakeup.notify()
        if thread is not None:
            thread.join(timeout)
        if self.replicator is not None and (thread is None or not thread.is_alive()):
            self.replicator.close()
            self.replicator = None

    def __enter__(self) -> BackupManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _replicate(self) -> None:
        assert self.replicator is not None
        self.replicator.run(self._stop_replicating, started=True)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping:
                    delay = self._seconds_until_due()
                    if delay <= 0:
                        break
                    self._wakeup.wait(delay)
                if self._stopping:
                    return
            self.backup_now()

    def _seconds_until_due(self) -> float:
        """Seconds until a backup is due (<= 0: now); the caller holds ``_wakeup``."""
        now = self._clock()
        last = self._last_backup_at
        due = math.inf
        if self._thread is not None:
            since = last if last is not None else self._started_at
            due = (since if since is not None else now) + self.backup_interval
        if self._change_pending:
            due = min(due, last + self.min_backup_interval if last is not None else now)
        return due - now

    # -- one backup -----------------------------------------------------------------------

    def _run(self, *, incremental: bool) -> BackupResult | None:
        with self._backup_lock:
            with self._wakeup:
                self._change_pending = False  # this backup covers every change notified so far
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
                    skip_unchanged=incremental,
                    rate_limit=self.rate_limit,
                    compress=self.compress,
                )
                if not result.complete:
                    raise BackupError(
                        f"backup {result.id} is partial: it could not copy "
                        f"{len(result.failed)} prefix(es): "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(result.failed.items()))
                    )
                if self.file_format == "json" and not result.skipped:
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
            if result.skipped:
                self.backups_skipped += 1
                log.info("backup skipped: nothing changed since backup %s", result.id)
                return None
            self.backups_taken += 1
            self.last_result = result
            kinds = {entry["kind"] for entry in result.prefixes.values()}
            self.deltas_since_full = self.deltas_since_full + 1 if "delta" in kinds else 0
            log.info("backup done id=%s bytes=%s", result.id, result.bytes)
            return result

    def _write_logical(self, result: BackupResult) -> Path:
        catalog = Catalog(self.backup_dir, key_file=self.key_file)
        place = catalog.place
        assert isinstance(place, DirectoryPlace)  # refused in __init__
        manifest = catalog.load(result.id)
        prefixes: dict[str, Any] = {}
        for name, entry in manifest.entries.items():
            prefixes[name] = changes_in(
                place.path / result.id / entry.file,
                full=entry.kind == "full",
                start=entry.start,
            )
        return write_document(
            place.path,
            result.id,
            manifest.created,
            prefixes,
            # A full copy inside a delta backup (a new or compacted prefix): applying it must
            # also drop what the rewrite dropped, or a replay resurrects deleted records.
            frozenset(name for name, entry in manifest.entries.items() if entry.kind == "full"),
        )
