"""Bulk backup, restore to a point, and retention, over the catalog and a pool of copy workers.

backup: one job per batch of prefixes on an executor (a :class:`CopyWorkerPool` by default; any
``concurrent.futures.Executor`` will do). A prefix whose copy fails is retried and then reported
without sinking the others; the prefixes of a job whose worker died are retried on the
replacement worker. The manifest is written last: an interrupted run (SIGINT) records
``complete: false`` and a killed run leaves no manifest, so neither ever looks complete.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hotcopy.storage import FileLeases, PrefixNotFound, Repository
from hotcopy.storage._copy import DEFAULT_STEP, BaseRef, CopyResult, Piece, restore_chain
from hotcopy.storage._durable import (
    fsync_dir,
    is_abandoned_temp,
    sweep_stale_temps,
    sync_filesystem,
    temp_path_for,
    temps_of,
)
from hotcopy.storage._files import make_directory, refuse_unsafe_place
from hotcopy.storage._format import HEADER_SIZE as WAL_HEADER_SIZE
from hotcopy.storage._log import Cut, wal_path
from hotcopy.storage._prefix import Prefix
from hotcopy.storage._repository import RUNTIME_DIR

from ._catalog import Catalog, Entry, Manifest
from ._errors import BackupError
from ._pool import CopyWorkerPool, InlineExecutor

BackupProgress = Callable[[int, int, int, int], None]  # prefixes done/total, bytes done/total
# Below this many bytes to copy, jobs run in the calling process: starting copy workers would
# cost more than the copying (an incremental run of small deltas).
INLINE_BELOW = 32 << 20
# Prefixes go to the workers in batches: one job's fixed cost (a round trip to the worker, a
# repository opened there) is paid per batch. Small enough batches keep both the progress
# moving and every worker busy to the end.
BATCH_PREFIXES = 16
BATCH_BYTES = 16 << 20


@dataclass
class BackupResult:
    id: str
    path: str
    complete: bool
    bytes: int
    seconds: float
    prefixes: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "complete": self.complete,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "prefixes": self.prefixes,
            "failed": self.failed,
            "retries": self.retries,
        }


# One prefix of a batch: its name, the base of a delta, the cut a consistent run took.
BatchItem = tuple[str, BaseRef | None, Cut | None]


def copy_batch(
    root: str, backup_dir: str, batch: Sequence[BatchItem], step: int
) -> list[CopyResult | Exception]:
    """Snapshot several prefixes into a backup directory (runs in a copy worker).

    One repository (one coordinator connection) serves the whole batch: opening one per
    prefix cost more than copying a small prefix. Each prefix still gets the whole snapshot
    protocol; a prefix that fails gives its exception in its place, the others go on.
    """
    outcomes: list[CopyResult | Exception] = []
    directory = Path(backup_dir)
    with Repository(root) as repo:
        for prefix, base, cut in batch:
            try:
                outcomes.append(_copy_one(repo, prefix, directory, base, cut, step))
            except Exception as err:  # an interrupt is the run's, not the prefix's
                outcomes.append(err)
    return outcomes


def _copy_one(
    repo: Repository,
    prefix: str,
    backup_dir: Path,
    base: BaseRef | None,
    cut: Cut | None,
    step: int,
) -> CopyResult:
    dest = backup_dir / f"{prefix}.hc"
    delta = backup_dir / f"{prefix}.hc-delta"
    for leftover in (dest, delta):  # a finished file from a retried attempt
        leftover.unlink(missing_ok=True)
    # Not fsynced here: the run syncs the file system once before its manifest. Temps left
    # by a dead worker are swept once at the end of the run, not by every copy (a listing of
    # the whole backup directory per prefix).
    result = repo.copy_prefix(
        dest, prefix, step, base=base, cut=cut, sync=False, sweep_temps=False
    )
    if result.kind == "delta":
        os.rename(dest, delta)
        result = replace(result, path=str(delta))
    return result


def backup(
    root: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    prefixes: Sequence[str] | None = None,
    *,
    jobs: int = 2,
    incremental: bool = False,
    consistent: bool = False,
    max_deltas_before_full: int = 10,
    retries: int = 2,
    step: int = DEFAULT_STEP,
    progress: BackupProgress | None = None,
    executor: Executor | None = None,
) -> BackupResult:
    """Back up ``prefixes`` (default: all) of the repository at ``root`` into ``dest_dir``.

    Args:
        jobs: Copy-worker processes when no ``executor`` is given.
        incremental: Write deltas for prefixes whose main file is unchanged since their latest
            backup, unless their chain already has ``max_deltas_before_full`` deltas.
        consistent: Cut every prefix at one instant (all write leases held together).
        retries: Further attempts for a prefix whose copy failed or whose worker died.
        executor: Any ``concurrent.futures.Executor``; ``copy_batch`` and its arguments pickle.
    """
    began = time.monotonic()
    with Repository(root) as repo:
        names = sorted(set(prefixes)) if prefixes else repo.prefixes()
        for name in names:
            if not repo.prefix_path(name).exists():
                raise PrefixNotFound(f"prefix {name!r} does not exist in {repo.root}", prefix=name)
        catalog = Catalog.create(dest_dir, repo.id)
        with catalog.lock():
            catalog.sweep_abandoned()  # unfinished copies of runs that were killed
            backup_id, path = catalog.new_backup_dir("delta" if incremental else "backup")
            manifest = Manifest(backup_id, time.time(), repo.id, False, consistent)
            bases = _bases(catalog, names, max_deltas_before_full) if incremental else {}
            with contextlib.ExitStack() as held:
                cuts = _consistent_cuts(repo, names, held) if consistent else {}
                sizes = {name: _pending_bytes(repo, name, bases.get(name)) for name in names}
                run = _Run(names, sizes, progress)
                if executor is not None:
                    pool: Executor = executor
                elif sum(sizes.values()) < INLINE_BELOW:
                    pool = InlineExecutor()
                else:
                    pool = CopyWorkerPool(max(min(jobs, len(names)), 1))
                try:
                    run.execute(
                        pool,
                        lambda batch: (
                            copy_batch,
                            str(repo.root),
                            str(path),
                            [
                                (
                                    name,
                                    bases[name][1].base_ref() if name in bases else None,
                                    cuts.get(name),
                                )
                                for name in batch
                            ],
                            step,
                        ),
                        retries,
                        # Inline, jobs run one by one, each opening a repository (a
                        # coordinator connection): as few as the batch limits allow.
                        workers=1 if isinstance(pool, InlineExecutor) else max(jobs, 1),
                    )
                except KeyboardInterrupt:
                    if isinstance(pool, CopyWorkerPool):
                        pool.terminate()
                    sweep_stale_temps(path)  # the killed workers' unfinished copies
                    manifest.interrupted = True
                    manifest.entries = _entries(run.results, bases)
                    catalog.write_manifest(manifest)
                    raise
                finally:
                    if executor is None:
                        pool.shutdown(wait=True)
            # Temps of workers that died mid-copy (their prefix was copied again since).
            sweep_stale_temps(path)
            sync_filesystem(path)  # every copy durable before the manifest names it
            manifest.entries = _entries(run.results, bases)
            manifest.failed = run.failed
            manifest.complete = True
            catalog.write_manifest(manifest)
    return BackupResult(
        id=backup_id,
        path=str(path),
        complete=True,
        bytes=sum(result.size for result in run.results.values()),
        seconds=time.monotonic() - began,
        prefixes={
            name: {"kind": result.kind, "bytes": result.size, "seq": result.seq}
            for name, result in sorted(run.results.items())
        },
        failed=run.failed,
        retries=run.retries,
    )


class _Run:
    """Submits the prefixes in batches, retries failures, and tracks what finished."""

    def __init__(
        self, names: list[str], sizes: dict[str, int], progress: BackupProgress | None
    ) -> None:
        self.names = names
        self.sizes = sizes
        self.progress = progress
        self.results: dict[str, CopyResult] = {}
        self.failed: dict[str, str] = {}
        self.retries = 0

    def execute(
        self,
        pool: Executor,
        job: Callable[[list[str]], tuple[Any, ...]],
        retries: int,
        *,
        workers: int,
    ) -> None:
        total_bytes = sum(self.sizes.values())
        attempts = dict.fromkeys(self.names, 0)
        running: dict[Future[list[CopyResult | Exception]], list[str]] = {}

        def submit(batch: list[str]) -> None:
            fn, *args = job(batch)
            for name in batch:
                attempts[name] += 1
            running[pool.submit(fn, *args)] = batch

        def retry(name: str, err: BaseException) -> bool:
            """Whether ``name`` has attempts left; if not, record its failure."""
            if attempts[name] <= retries:
                self.retries += 1
                return True
            self.failed[name] = f"{type(err).__name__}: {err}"
            return False

        for batch in _batches(self.names, self.sizes, workers):
            submit(batch)
        self._report(total_bytes)
        while running:
            done, _ = wait(running, return_when="FIRST_COMPLETED")
            for future in done:
                batch = running.pop(future)
                again: list[str] = []
                try:
                    outcomes = future.result()
                except Exception as err:  # the whole batch: its worker died, say
                    again = [name for name in batch if retry(name, err)]
                else:
                    for name, outcome in zip(batch, outcomes, strict=True):
                        if not isinstance(outcome, Exception):
                            self.results[name] = outcome
                        elif retry(name, outcome):
                            again.append(name)
                if again:
                    submit(again)
                self._report(total_bytes)

    def _report(self, total_bytes: int) -> None:
        if self.progress is not None:
            finished = len(self.results) + len(self.failed)
            done_bytes = sum(self.sizes[name] for name in self.results)
            self.progress(finished, len(self.names), done_bytes, total_bytes)


def _batches(names: list[str], sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Consecutive runs of ``names`` of at most ``BATCH_PREFIXES`` prefixes and
    ``BATCH_BYTES`` bytes (a larger prefix alone), and, for several workers, at least four
    batches per worker while there are prefixes for them, so every worker stays busy to the
    end. One worker has nobody to wait for: smaller batches would only cost it more jobs."""
    if workers == 1:
        limit = BATCH_PREFIXES
    else:
        limit = max(1, min(BATCH_PREFIXES, len(names) // (4 * workers)))
    batches: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in names:
        if current and (len(current) >= limit or current_bytes + sizes[name] > BATCH_BYTES):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += sizes[name]
    if current:
        batches.append(current)
    return batches


def _bases(
    catalog: Catalog, names: Iterable[str], max_deltas: int
) -> dict[str, tuple[Manifest, Entry]]:
    """For each prefix, the latest backup entry a delta may continue, if its chain allows."""
    bases = {}
    manifests = catalog.manifests()  # loaded once: a run may ask about thousands of prefixes
    by_id = {manifest.id: manifest for manifest in manifests}
    for name in names:
        latest = catalog.latest_entry(name, manifests)
        if latest is None:
            continue
        try:
            deltas = len(catalog.chain(latest[0], name, by_id)) - 1
        except BackupError:
            continue  # a broken chain is not continued: a full copy starts a new one
        if deltas < max_deltas:
            bases[name] = latest
    return bases


def _pending_bytes(repo: Repository, name: str, base: tuple[Manifest, Entry] | None) -> int:
    """An estimate of what the job will write: the main file (past the base's end, for a
    delta) and what its checkpoint will add from the WAL."""
    size = repo.prefix_path(name).stat().st_size
    with contextlib.suppress(FileNotFoundError):
        size += max(wal_path(repo.root, name).stat().st_size - WAL_HEADER_SIZE, 0)
    return max(size - base[1].end, 0) if base else size


def _consistent_cuts(
    repo: Repository, names: list[str], held: contextlib.ExitStack
) -> dict[str, Cut]:
    """Cut every prefix at one instant: checkpoints under simultaneously held write leases.

    Snapshot leases stay held (on ``held``) until the copies are done, so no cut file can be
    replaced meanwhile; write leases are dropped as soon as every cut is taken. Leases are
    taken in name order, so two consistent runs cannot deadlock each other.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a lease may hold a descriptor or two per prefix
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name in names:
        held.enter_context(repo.leases.lease(name, "snapshot", timeout=repo.lease_timeout))
    prefixes = [Prefix(repo.root, name, "rw", repo.leases, repo.id_bytes) for name in names]
    for prefix in prefixes:
        held.callback(prefix.close)
    try:
        for prefix in prefixes:
            prefix.begin()  # takes the write lease; all are held before the first cut
        cuts = {}
        for prefix in prefixes:
            cut, fd = prefix.checkpoint_and_open()
            os.close(fd)
            cuts[prefix.name] = cut
    finally:
        for prefix in prefixes:
            prefix.rollback()  # nothing pending: this only drops the write lease
    return cuts


def _entries(
    results: dict[str, CopyResult], bases: dict[str, tuple[Manifest, Entry]]
) -> dict[str, Entry]:
    entries = {}
    for name, result in sorted(results.items()):
        entries[name] = Entry(
            kind=result.kind,
            file=Path(result.path).name,
            base=bases[name][0].id if result.kind == "delta" else None,
            file_id=result.file_id,
            salt=result.salt,
            start=result.start,
            end=result.length,
            seq=result.seq,
            size=result.size,
            crc32=result.crc32,
            boundary_crc=result.boundary_crc,
        )
    return entries


@dataclass
class RestoreResult:
    id: str
    root: str
    prefixes: dict[str, int]  # name -> commit restored
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "root": self.root,
            "prefixes": self.prefixes,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
        }


def restore(
    dest_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    prefixes: Sequence[str] | None = None,
    *,
    at: str | None = None,
    force: bool = False,
    progress: BackupProgress | None = None,
) -> RestoreResult:
    """Rebuild prefixes in ``root`` from the newest backup at or before ``at``.

    ``root`` must be empty or absent unless ``force``, which replaces each prefix under its
    ``exclusive`` lease. Every piece is checked before a prefix goes live.
    """
    began = time.monotonic()
    catalog = Catalog(dest_dir)
    manifest = catalog.pick(at)
    names = sorted(set(prefixes)) if prefixes else sorted(manifest.entries)
    missing = [name for name in names if name not in manifest.entries]
    if missing:
        raise BackupError(
            f"backup {manifest.id} does not hold prefix(es) {', '.join(missing)}"
            + (f" (they failed: {manifest.failed})" if manifest.failed else "")
        )
    target = Path(root)
    refuse_unsafe_place(target)  # an existing ROOT (or a link to one) must be a safe place
    if not force and target.exists() and any(target.iterdir()):
        raise BackupError(
            f"{target} is not empty; restore into an empty directory or use --force",
            root=str(target),
        )
    chains = {name: catalog.pieces(manifest, name) for name in names}
    total = sum(piece.size for pieces in chains.values() for piece in pieces)
    restored: dict[str, int] = {}
    fresh = not target.exists() or not any(target.iterdir())
    if not fresh:  # --force into a repository: prefix by prefix, each under its exclusive lease
        _restore_into(target, names, chains, manifest, force, progress, total, restored)
    else:
        # All or nothing: build the repository beside ROOT, then rename it into place (rename
        # replaces an empty directory), so a failed restore leaves ROOT as it was. Nothing in
        # staging is live before the rename: one syncfs makes it all durable first, instead of
        # four device flushes per prefix.
        make_directory(target.parent)
        _sweep_abandoned_restores(target)
        # Named for this process, so that a later restore can tell it was abandoned.
        staging = temp_path_for(target.parent / f".{target.name}.restoring")
        make_directory(staging, exist_ok=False)
        try:
            _restore_into(
                staging, names, chains, manifest, force, progress, total, restored, staged=True
            )
            sync_filesystem(staging)
            os.rename(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if progress is not None:
        progress(len(names), len(names), total, total)
    return RestoreResult(manifest.id, str(target), restored, total, time.monotonic() - began)


def _sweep_abandoned_restores(target: Path) -> None:
    """Remove the staging directories of restores into ``target`` whose process died."""
    for staging in temps_of(target.parent / f".{target.name}.restoring"):
        if is_abandoned_temp(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _restore_into(
    target: Path,
    names: list[str],
    chains: dict[str, list[Piece]],
    manifest: Manifest,
    force: bool,
    progress: BackupProgress | None,
    total: int,
    restored: dict[str, int],
    *,
    staged: bool = False,
) -> None:
    """``staged``: ``target`` is a staging directory (see ``restore_chain``)."""
    done_bytes = 0
    # Nobody else can know a staging directory: no coordinator for it, kernel locks will do.
    leases = FileLeases(target / RUNTIME_DIR) if staged else None
    with Repository.init(target, leases=leases) as repo:
        for number, name in enumerate(names):

            def step(done: int, _: int, base: int = done_bytes, number: int = number) -> None:
                if progress is not None:
                    progress(number, len(names), base + done, total)

            restored[name] = restore_chain(
                repo,
                chains[name],
                name,
                force=force,
                expect_seq=manifest.entries[name].seq,
                progress=step,
                staged=staged,
            )
            done_bytes += sum(piece.size for piece in chains[name])


def prune(dest_dir: str | os.PathLike[str], keep: int) -> list[str]:
    """Drop the oldest backups beyond ``keep``, never one a kept backup's chain needs."""
    catalog = Catalog(dest_dir)
    with catalog.lock():
        return catalog.prune(keep)
