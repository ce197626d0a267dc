"""Bulk backup and restore to a point, over the catalog and a pool of copy workers.

backup: one job per batch of prefixes on an executor (a :class:`CopyWorkerPool` by default; any
``concurrent.futures.Executor`` will do). A prefix whose copy fails is retried and then reported
without sinking the others; the prefixes of a job whose worker died are retried on the
replacement worker. The manifest is written last: a run that lost a prefix is recorded as
*partial* (never restored by default, never kept by retention, never a base), an interrupted
run (SIGINT) as partial and interrupted, a killed run leaves no manifest, and a run that fails
before it copied anything leaves nothing.

An incremental run proves each chain before it adds a delta to it: every link's manifest and
size (and with ``verify_chain`` every byte); a prefix whose chain fails gets a full copy, and
the result says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import math
import os
import resource
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from hotcopy.storage import DestinationExists, FileLeases, PrefixNotFound, Repository
from hotcopy.storage._copy import (
    DEFAULT_STEP,
    BaseRef,
    CopyResult,
    Piece,
    cut_prefix,
    read_ahead,
    restore_chain,
)
from hotcopy.storage._durable import (
    libc_function,
    sweep_stale_temps,
    sync_filesystem,
    write_durably,
)
from hotcopy.storage._faults import fault
from hotcopy.storage._files import make_directory, refuse_unsafe_place
from hotcopy.storage._format import FORMAT_VERSION
from hotcopy.storage._format import HEADER_SIZE as WAL_HEADER_SIZE
from hotcopy.storage._leases import HeldLease
from hotcopy.storage._log import Cut, main_file_format, main_path, wal_path
from hotcopy.storage._repository import MARKER, RUNTIME_DIR

from ._catalog import (
    COMPLETE,
    Catalog,
    CatalogView,
    Choice,
    Entry,
    LockWait,
    Manifest,
    is_backup_id,
    parse_moment,
    sha256_of,
)
from ._errors import BackupError, BackupInterrupted, BackupNotFound
from ._pool import CopyWorkerPool, InlineExecutor
from ._replica_log import pick_for_seq, pick_for_time, roll_forward
from ._workdir import (
    WorkDirectory,
    opened_directory,
    remove_entry,
    same_directory,
    sweep_work_directories,
    work_directory,
)

Outcome = TypeVar("Outcome")
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
    complete: bool  # every prefix it set out to copy is in it
    bytes: int
    seconds: float
    prefixes: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    # Prefixes whose chain could not be continued (a link missing, damaged or unreadable), and
    # why: each got a full copy in this backup.
    chain_restarts: dict[str, str] = field(default_factory=dict)
    # --consistent: seconds from the first write lease taken to the last released (writers
    # of each prefix waited at most this long for the cut).
    cut_seconds: float = 0.0
    took_over: str | None = None  # the catalog was taken over from the repository restored
    waited: float = 0.0  # seconds waiting for the catalog lock (not counted in ``seconds``)
    # ``skip_unchanged``: nothing changed since backup ``id``, so none was written.
    skipped: bool = False

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
            "chain_restarts": self.chain_restarts,
            "cut_seconds": round(self.cut_seconds, 6),
            "took_over": self.took_over,
            "waited": round(self.waited, 6),
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class Copied:
    """One prefix's copy as a worker reports it."""

    result: CopyResult
    sha256: str | None  # of the piece, for an authenticated catalog


# One prefix of a batch: its name, the base of a delta, the cut a consistent run took.
BatchItem = tuple[str, BaseRef | None, Cut | None]


def copy_batch(
    root: str,
    backup_dir: str,
    batch: Sequence[BatchItem],
    step: int,
    hash_pieces: bool = False,
    lease_timeout: float | None = None,
    rate_limit: float | None = None,
) -> list[Copied | Exception]:
    """Snapshot several prefixes into a backup directory (runs in a copy worker).

    One repository (one coordinator connection) serves the whole batch: opening one per
    prefix cost more than copying a small prefix. Each prefix still gets the whole snapshot
    protocol; a prefix that fails gives its exception in its place, the others go on.
    ``hash_pieces``: also the SHA-256 of each piece (read back from the page cache).
    ``rate_limit``: this worker's bytes per second.
    """
    outcomes: list[Copied | Exception] = []
    directory = Path(backup_dir)
    with Repository(root, lease_timeout=lease_timeout) as repo:
        for prefix, base, cut in batch:
            try:
                result = _copy_one(repo, prefix, directory, base, cut, step, rate_limit)
                digest = sha256_of(Path(result.path)) if hash_pieces else None
                outcomes.append(Copied(result, digest))
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
    rate_limit: float | None,
) -> CopyResult:
    dest = backup_dir / f"{prefix}.hc"
    delta = backup_dir / f"{prefix}.hc-delta"
    for leftover in (dest, delta):  # a finished file from a retried attempt
        leftover.unlink(missing_ok=True)
    # Not fsynced here: the run syncs the file system once before its manifest. Temps left
    # by a dead worker are swept once at the end of the run, not by every copy (a listing of
    # the whole backup directory per prefix).
    result = repo.copy_prefix(
        dest,
        prefix,
        step,
        base=base,
        cut=cut,
        sync=False,
        sweep_temps=False,
        rate_limit=rate_limit,
    )
    if result.kind == "delta":
        os.rename(dest, delta)
        result = result._replace(path=str(delta))
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
    verify_chain: bool = False,
    key_file: str | os.PathLike[str] | None = None,
    clock: Callable[[], float] = time.time,
    lease_timeout: float | None = None,
    acquire_lock: LockWait | None = None,
    skip_unchanged: bool = False,
    rate_limit: float | None = None,
    compress: bool = False,
) -> BackupResult:
    """Back up ``prefixes`` (default: all) of the repository at ``root`` into ``dest_dir``.

    Args:
        jobs: Copy-worker processes when no ``executor`` is given.
        incremental: Write deltas for prefixes whose main file is unchanged since their latest
            complete backup, unless their chain already has ``max_deltas_before_full`` deltas.
        consistent: Cut every prefix at one instant (all write leases held together, for the
            cut alone).
        retries: Further attempts for a prefix whose copy failed or whose worker died.
        executor: Any ``concurrent.futures.Executor``; ``copy_batch`` and its arguments pickle.
        verify_chain: Read every byte of each chain an incremental run continues (without it,
            each link's manifest and size are checked).
        key_file: Authenticate the catalog with this key (default ``$HOTCOPY_BACKUP_KEY_FILE``).
        clock: Wall-clock time (unix seconds) that names the backup.
        lease_timeout: Seconds to wait at most for each lease (None: as long as it takes); a
            prefix whose lease is not granted in time fails (the backup is then partial).
        acquire_lock: Takes the catalog lock (see ``Catalog.locked``); the wait is reported
            as ``waited`` and not counted in ``seconds``.
        skip_unchanged: With ``incremental``: when no prefix changed since the newest complete
            backup and it holds exactly these prefixes, write nothing and return that backup's
            id with ``skipped`` set.
        rate_limit: Bytes per second at most that the run copies, on average (shared among
            its workers); the cuts are never slowed.
        compress: Store the backup zstd-compressed (``s3://`` catalogs only).

    Returns:
        The result; ``complete`` is False (and ``failed`` says why) when a prefix could not be
        copied: the backup is then recorded as partial.

    Raises:
        BackupError: Nothing could be copied (the run leaves nothing behind).
    """
    began = time.monotonic()
    with Repository(root, lease_timeout=lease_timeout) as repo:
        names = sorted(set(prefixes)) if prefixes else repo.prefixes()
        for name in names:
            if not repo.prefix_path(name).exists():
                raise PrefixNotFound(f"prefix {name!r} does not exist in {repo.root}", prefix=name)
        catalog = Catalog.create(dest_dir, repo.id, key_file=key_file, compress=compress)
        with catalog.locked(acquire_lock) as waited:
            took_over = catalog.admit(repo.id, repo.lineage, clock())
            catalog.sweep_abandoned()  # unfinished copies of runs that were killed
            bases: dict[str, tuple[Manifest, Entry]] = {}
            restarts: dict[str, str] = {}
            newest: Manifest | None = None
            if incremental:
                view = catalog.scan()
                bases, restarts = _bases(
                    view, names, max_deltas_before_full, checksums=verify_chain
                )
                newest = _newest_complete(view)
            created = clock()
            backup_id, path = catalog.new_backup(created)
            manifest = Manifest(backup_id, created, repo.id, names, consistent)
            run: _Run[Copied] = _Run(
                names,
                progress,
                lambda copied: catalog.ship(backup_id, path, Path(copied.result.path).name),
            )
            try:
                cut_seconds = _copy_all(
                    repo, path, run, bases, consistent, jobs, retries, step, executor,
                    hash_pieces=catalog.key is not None, rate_limit=rate_limit,
                )  # fmt: skip
            except KeyboardInterrupt:
                manifest.interrupted = True
                manifest.entries = _entries(run.results, bases)
                manifest.failed = run.failed
                _record(catalog, manifest, path)
                raise BackupInterrupted(recorded=True) from None
            except BaseException:
                catalog.discard(backup_id, path)
                raise
            if names and not run.results:
                catalog.discard(backup_id, path)
                raise BackupError(
                    f"no prefix could be backed up into {catalog.where}: "
                    + "; ".join(f"{name}: {error}" for name, error in sorted(run.failed.items()))
                )
            if skip_unchanged and newest is not None and _unchanged(newest, names, run, bases):
                catalog.discard(backup_id, path)
                return BackupResult(
                    id=newest.id,
                    path=catalog.location_of(newest.id),
                    complete=True,
                    bytes=0,
                    seconds=time.monotonic() - began - waited,
                    took_over=took_over,
                    waited=waited,
                    skipped=True,
                )
            manifest.entries = _entries(run.results, bases)
            manifest.failed = run.failed
            _record(catalog, manifest, path)
    return BackupResult(
        id=backup_id,
        path=catalog.location_of(backup_id),
        complete=manifest.complete,
        bytes=sum(copied.result.size for copied in run.results.values()),
        seconds=time.monotonic() - began - waited,
        prefixes={
            name: {
                "kind": copied.result.kind,
                "bytes": copied.result.size,
                "seq": copied.result.seq,
            }
            for name, copied in sorted(run.results.items())
        },
        failed=run.failed,
        retries=run.retries,
        chain_restarts={name: why for name, why in restarts.items() if name in run.results},
        cut_seconds=cut_seconds,
        took_over=took_over,
        waited=waited,
    )


def _record(catalog: Catalog, manifest: Manifest, staging: Path) -> None:
    """Publish the pieces copied into ``staging``, then the manifest that names them; if
    either fails (an upload, a second Ctrl-C), what the run left is discarded."""
    try:
        stored = catalog.publish(manifest.id, staging)  # durable before the manifest names it
        manifest.entries = {
            prefix: dataclasses.replace(entry, stored=stored[entry.file])
            if entry.file in stored
            else entry
            for prefix, entry in manifest.entries.items()
        }
        catalog.write_manifest(manifest)
    except KeyboardInterrupt:
        catalog.discard(manifest.id, staging)
        raise BackupInterrupted(recorded=False) from None
    except BaseException:
        catalog.discard(manifest.id, staging)
        raise


def _copy_all(
    repo: Repository,
    path: Path,
    run: _Run[Copied],
    bases: Mapping[str, tuple[Manifest, Entry]],
    consistent: bool,
    jobs: int,
    retries: int,
    step: int,
    executor: Executor | None,
    *,
    hash_pieces: bool,
    rate_limit: float | None,
) -> float:
    """Copy every prefix of ``run`` into ``path``; the seconds of a consistent run's cut."""
    with contextlib.ExitStack() as held:
        cuts: dict[str, Cut] = {}
        cut_seconds = 0.0
        if consistent:
            cuts, cut_seconds = _consistent_cuts(repo, run.names, held, run.failed)
        names = [name for name in run.names if name not in run.failed]
        sizes = {name: _pending_bytes(repo, name, bases.get(name)) for name in names}
        inline = executor is None and sum(sizes.values()) < INLINE_BELOW
        workers = 1 if inline else max(min(jobs, len(names)), 1)
        share = rate_limit / workers if rate_limit is not None else None
        try:
            with _copy_workers(workers, inline, executor) as pool:
                run.execute(
                    pool,
                    names,
                    sizes,
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
                        hash_pieces,
                        repo.lease_timeout,
                        share,
                    ),
                    retries,
                    # Inline, jobs run one by one, each opening a repository (a coordinator
                    # connection): as few as the batch limits allow.
                    workers=1 if inline else max(jobs, 1),
                )
        except BaseException:
            sweep_stale_temps(path)  # the killed workers' unfinished copies
            raise
    # Temps of workers that died mid-copy (their prefix was copied again since).
    sweep_stale_temps(path)
    return cut_seconds


@contextlib.contextmanager
def _copy_workers(jobs: int, inline: bool, executor: Executor | None = None) -> Iterator[Executor]:
    """The executor of a run's jobs: the caller's, this process (``inline``), or ``jobs`` copy
    workers, killed if the run fails (an interrupt included) and always stopped."""
    if executor is not None:
        yield executor
        return
    pool = InlineExecutor() if inline else CopyWorkerPool(jobs)
    try:
        yield pool
    except BaseException:
        if isinstance(pool, CopyWorkerPool):
            pool.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


class _Run(Generic[Outcome]):
    """Submits the prefixes in batches, retries failures, and tracks what finished (each
    prefix's outcome: a backup's :class:`Copied`, a restore's commit)."""

    def __init__(
        self,
        names: list[str],
        progress: BackupProgress | None,
        finished: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.names = names
        self.sizes: dict[str, int] = {}
        self.progress = progress
        self.finished = finished  # called with each outcome as it comes in
        self.results: dict[str, Outcome] = {}
        self.failed: dict[str, str] = {}
        self.retries = 0

    def execute(
        self,
        pool: Executor,
        names: list[str],
        sizes: dict[str, int],
        job: Callable[[list[str]], tuple[Any, ...]],
        retries: int,
        *,
        workers: int,
    ) -> None:
        """Copy ``names`` (of :attr:`names`, the others failed already)."""
        self.sizes = sizes
        total_bytes = sum(sizes.values())
        attempts = dict.fromkeys(names, 0)
        running: dict[Future[list[Outcome | Exception]], list[str]] = {}

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

        # One batch queued beyond those the workers run: they never wait for work, and
        # copies run ahead of what is done with them (a bucket's uploads) by that much only.
        pending = _batches(names, sizes, workers)[::-1]
        while pending and len(running) <= workers:
            submit(pending.pop())
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
                            if self.finished is not None:
                                self.finished(outcome)
                        elif retry(name, outcome):
                            again.append(name)
                if again:
                    submit(again)
                elif pending:
                    submit(pending.pop())
                self._report(total_bytes)

    def _report(self, total_bytes: int) -> None:
        if self.progress is not None:
            finished = len(self.results) + len(self.failed)
            done_bytes = sum(self.sizes.get(name, 0) for name in self.results)
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
    view: CatalogView, names: Iterable[str], max_deltas: int, *, checksums: bool
) -> tuple[dict[str, tuple[Manifest, Entry]], dict[str, str]]:
    """For each prefix, the entry of its newest complete backup that a delta may continue;
    and the prefixes whose chain is not sound (each gets a full copy), with the reason.

    A chain is proved before it is extended: every link's manifest, its place in the chain
    and its size, and with ``checksums`` every byte.
    """
    newest: dict[str, tuple[Manifest, Entry]] = {}
    for record in view.ordered():  # oldest first: the newest complete backup wins
        if record.status == COMPLETE and record.manifest is not None:
            for name, entry in record.manifest.entries.items():
                newest[name] = (record.manifest, entry)
    bases: dict[str, tuple[Manifest, Entry]] = {}
    restarts: dict[str, str] = {}
    for name in names:
        if name not in newest:
            continue
        manifest, entry = newest[name]
        problem = view.check_chain(manifest.id, name, checksums=checksums)
        if problem is not None:
            restarts[name] = f"its chain ending at backup {manifest.id} is not sound: {problem}"
        elif len(view.chain(manifest.id, name)) - 1 < max_deltas:
            bases[name] = (manifest, entry)
    return bases, restarts


def _newest_complete(view: CatalogView) -> Manifest | None:
    complete = [r.manifest for r in view.ordered() if r.status == COMPLETE and r.manifest]
    return complete[-1] if complete else None


def _unchanged(
    newest: Manifest,
    names: list[str],
    run: _Run[Copied],
    bases: Mapping[str, tuple[Manifest, Entry]],
) -> bool:
    """Whether ``run`` copied nothing new: ``newest`` holds exactly ``names``, and each copy is
    an empty delta continuing ``newest`` (a main file is append-only between rewrites, so no
    new bytes past the base's end means no new commit)."""
    if set(newest.entries) != set(names) or set(run.results) != set(names):
        return False
    for name, copied in run.results.items():
        result = copied.result
        if (
            result.kind != "delta"
            or result.start != result.length
            or bases[name][0].id != newest.id
        ):
            return False
    return True


def _pending_bytes(repo: Repository, name: str, base: tuple[Manifest, Entry] | None) -> int:
    """An estimate of what the job will write: the main file (past the base's end, for a
    delta) and what its checkpoint will add from the WAL."""
    size = repo.prefix_path(name).stat().st_size
    with contextlib.suppress(FileNotFoundError):
        size += max(wal_path(repo.root, name).stat().st_size - WAL_HEADER_SIZE, 0)
    return max(size - base[1].end, 0) if base else size


def _cut(repo: Repository, name: str) -> None:
    """Checkpoint ``name`` under its own write lease (what a consistent cut does beforehand)."""
    with repo.leases.lease(name, "write", timeout=repo.lease_timeout, ttl=repo.lease_ttl) as lease:
        os.close(cut_prefix(repo, name, lease)[1])


def _consistent_cuts(
    repo: Repository, names: list[str], held: contextlib.ExitStack, failed: dict[str, str]
) -> tuple[dict[str, Cut], float]:
    """Cut every prefix at one instant; the cuts, and the seconds the cut held write leases.

    The cut instant is when the last of the write leases is granted: each prefix is
    checkpointed as soon as its own write lease is held (nothing can commit to it until the
    lease goes), and every write lease goes as soon as the last is taken, so writers wait for
    the cut alone, never for a copy. Leases are taken in name order, so two consistent runs
    cannot deadlock each other. Most prefixes' WALs are checkpointed beforehand, outside the
    window, so that under the leases there is little left to append.

    A cut is then protected for its copy by a snapshot lease (held on ``held`` until the
    copies are done): between the write lease's release and the snapshot's grant, a
    compaction or restore could replace the main file, which the descriptor opened at the cut
    (kept until the snapshot lease is held) shows; such a prefix is recorded in ``failed``.
    So at most one lease per prefix is held at any instant.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a descriptor per prefix is kept from its cut to its snapshot lease
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name in names:  # outside the window: what is in the WALs now
        with contextlib.suppress(Exception):  # the cut below reports a prefix that fails
            _cut(repo, name)
    writes: dict[str, HeldLease] = {}
    fds: dict[str, int] = {}
    cuts: dict[str, Cut] = {}
    began = time.monotonic()
    try:
        for name in names:
            writes[name] = repo.leases.lease(
                name, "write", timeout=repo.lease_timeout, ttl=repo.lease_ttl
            )
            try:
                cuts[name], fds[name] = cut_prefix(repo, name, writes[name])
            except Exception as err:  # a damaged prefix: the others are cut all the same
                failed[name] = f"{type(err).__name__}: {err}"
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        for lease in writes.values():
            lease.release()
    seconds = time.monotonic() - began
    try:
        for name in cuts.copy():
            held.enter_context(
                repo.leases.lease(name, "snapshot", timeout=repo.lease_timeout, ttl=repo.lease_ttl)
            )
            cut_file, now = os.fstat(fds[name]), os.stat(main_path(repo.root, name))
            if (cut_file.st_dev, cut_file.st_ino) != (now.st_dev, now.st_ino):
                failed[name] = (
                    "StorageError: the prefix was compacted or restored between the "
                    "consistent cut and its copy; back it up again"
                )
                del cuts[name]
    finally:
        for fd in fds.values():
            os.close(fd)
    return cuts, seconds


def _entries(
    results: Mapping[str, Copied], bases: Mapping[str, tuple[Manifest, Entry]]
) -> dict[str, Entry]:
    entries = {}
    for name, copied in sorted(results.items()):
        result = copied.result
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
            sha256=copied.sha256,
        )
    return entries


@dataclass
class RestoreResult:
    id: str
    root: str
    prefixes: dict[str, int]  # name -> commit restored
    bytes: int
    seconds: float
    missing: dict[str, str] = field(default_factory=dict)  # partial backup: what it lacks
    passed_over: list[str] = field(default_factory=list)  # newer backups not taken, and why
    # Prefixes restored in an older file format (name -> format): exact, and opened by this
    # version only once `hotcopy migrate` has converted them.
    older_format: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "root": self.root,
            "prefixes": self.prefixes,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "missing": self.missing,
            "passed_over": self.passed_over,
            "older_format": self.older_format,
        }


def restore(
    dest_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    prefixes: Sequence[str] | None = None,
    *,
    at: str | None = None,
    force: bool = False,
    allow_partial: bool = False,
    progress: BackupProgress | None = None,
    key_file: str | os.PathLike[str] | None = None,
    clock: Callable[[], float] = time.time,
    lease_timeout: float | None = None,
    jobs: int = 2,
    at_seq: int | None = None,
) -> RestoreResult:
    """Rebuild prefixes in ``root`` from a backup of the catalog ``dest_dir``.

    From a replica (``_replicate``) each prefix is rolled forward from the snapshot through
    the commits shipped after it: all of them (``latest``), those read at or before ``at``
    (a time), or, with ``at_seq``, exactly to that commit of the one prefix given. A backup
    asked for by its id is restored as it is.

    ``at``: a backup id, ``latest`` (the default), an ISO time or a duration ago (``2h``,
    ``7d``): the newest complete, restorable backup at or before it. A partial backup is
    restored (what it holds) only by its id and with ``allow_partial``. ``root`` must be
    empty or absent unless ``force``, which replaces each prefix under its ``exclusive``
    lease. Every piece is checked before a prefix goes live. A repository created by the
    restore records where it came from (its lineage), so it can go on backing up into this
    catalog. ``lease_timeout``: seconds to wait at most for each exclusive lease (None: as
    long as it takes). ``jobs``: copy-worker processes restoring prefixes side by side (a
    restore small enough runs in this process), as for a backup.
    """
    began = time.monotonic()
    catalog = Catalog(dest_dir, key_file=key_file)
    view = catalog.scan()
    moment = None
    if at_seq is not None:
        if not prefixes or len(set(prefixes)) != 1 or at is not None:
            raise BackupError("--at-seq restores one prefix (give it with --prefix), without --at")
        choice = pick_for_seq(view, prefixes[0], at_seq)
    else:
        found = None
        if at in (None, "latest"):
            found = pick_for_time(view, math.inf)  # a replica's newest snapshot, or None
        elif not is_backup_id(at):
            moment = parse_moment(at, clock())
            found = pick_for_time(view, moment)  # None: not a replica
        choice = found or view.pick(at, clock=clock, allow_partial=allow_partial)
    manifest = choice.manifest
    names = sorted(set(prefixes)) if prefixes else sorted(manifest.entries)
    absent = [name for name in names if name not in manifest.entries]
    if absent:
        missing = manifest.missing
        raise BackupError(
            f"backup {manifest.id} does not hold prefix(es) {', '.join(absent)}"
            + "".join(f"; {name} failed: {missing[name]}" for name in absent if name in missing)
        )
    # Resolved once: a link to ROOT changed while the restore runs does not redirect it.
    target = refuse_unsafe_place(root)
    with _claimed(target) as claim:
        if not claim.fresh and not force:
            raise BackupError(
                f"{root} is not empty; restore into an empty directory or use --force",
                root=str(root),
            )
        tails: dict[str, bytes] = {}
        if at is None or not is_backup_id(at):
            for name in names:
                tails[name], last = roll_forward(
                    catalog, manifest, name, seq=at_seq, moment=moment
                )
                if at_seq is not None and last != at_seq:
                    raise BackupNotFound(
                        f"commit {at_seq} of prefix {name!r} is not in {catalog.where}"
                    )
        # With a key every piece's SHA-256 is checked here (restore_chain checks the CRC-32).
        checksums = catalog.key is not None
        with _scratch_for(catalog, target) as scratch:
            chains = {
                name: view.pieces(manifest.id, name, checksums=checksums, scratch=scratch)
                for name in names
            }
            return _restore(catalog, choice, names, chains, tails, claim, Path(root), force,
                            progress, clock, lease_timeout, jobs, began)  # fmt: skip


@contextlib.contextmanager
def _scratch_for(catalog: Catalog, target: Path) -> Iterator[Path | None]:
    """Where the pieces of a catalog that is not local are downloaded: beside ``target``,
    on its file system; None for a local catalog."""
    if catalog.place.local:
        yield None
        return
    with work_directory(target.parent, f".{target.name}.fetching") as scratch:
        yield scratch.path


def _restore(
    catalog: Catalog,
    choice: Choice,
    names: list[str],
    chains: dict[str, list[Piece]],
    tails: dict[str, bytes],
    claim: _Claim,
    shown: Path,
    force: bool,
    progress: BackupProgress | None,
    clock: Callable[[], float],
    lease_timeout: float | None,
    jobs: int,
    began: float,
) -> RestoreResult:
    manifest = choice.manifest
    target = claim.target
    total = sum(piece.size for pieces in chains.values() for piece in pieces)
    restored: dict[str, int] = {}
    # --force into a repository: prefix by prefix, each under its exclusive lease.
    if not claim.fresh:
        _restore_into(
            target, names, chains, tails, manifest, force, progress, total, restored,
            jobs=jobs, lease_timeout=lease_timeout,
        )  # fmt: skip
    else:
        lineage = {
            "restored_from": {
                "repository_id": manifest.repository_id,
                "backup": manifest.id,
                "catalog": catalog.where,
            },
            "time": clock(),
        }
        with _staged(claim) as staging:
            _restore_into(
                staging,
                names,
                chains,
                tails,
                manifest,
                force,
                progress,
                total,
                restored,
                jobs=jobs,
                staged=True,
                lineage=lineage,
            )
    if progress is not None:
        progress(len(names), len(names), total, total)
    return RestoreResult(
        manifest.id,
        str(shown),
        restored,
        total,
        time.monotonic() - began,
        missing=manifest.missing,
        passed_over=choice.passed_over,
        older_format=older_formats(target, names),
    )


def older_formats(root: Path, names: Iterable[str]) -> dict[str, int]:
    """The prefixes of ``names`` in ``root`` whose main file is of an older format, with it."""
    found = {name: main_file_format(main_path(root, name)) for name in names}
    return {name: version for name, version in found.items() if version < FORMAT_VERSION}


@dataclass(frozen=True)
class _Claim:
    """What a restore found at ROOT (``target``, resolved) and holds of it."""

    target: Path
    fresh: bool  # a restore builds it whole: it does not exist, or is empty
    fd: int | None  # an existing fresh ROOT: a descriptor of it, locked for this restore


@contextlib.contextmanager
def _claimed(target: Path) -> Iterator[_Claim]:
    """ROOT as this restore finds it, held for as long as the block runs.

    An existing ROOT is locked (``flock``) before anything in it is looked at or removed:
    shared while it holds a repository (restored into with ``--force``, then not held: its
    prefixes' leases keep restores apart), alone otherwise. What restores into it that died
    left there is swept (a repository's marker there: only their staging directories). Alone,
    ROOT must then be empty (but for the ``lost+found`` of a new file system mounted there) to
    be built whole, and a second restore into it meanwhile is refused. A missing ROOT is built
    beside it and renamed into place, which cannot replace anything.
    """
    fd = _open_directory(target)
    if fd is None:
        yield _Claim(target, True, None)
        return
    try:
        # Shared first: restores into a repository (--force) may run side by side, and only
        # one that would build ROOT (no marker there) needs it to itself.
        for lock in (fcntl.LOCK_SH, fcntl.LOCK_EX):
            try:
                fcntl.flock(fd, lock | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DestinationExists(
                    f"another restore into {target} is running; nothing restored",
                    path=str(target),
                ) from None
            if lock == fcntl.LOCK_SH and _exists_in(fd, MARKER):
                break
        _sweep_abandoned_restores(target, fd)
        if _exists_in(fd, MARKER) or not _holds_nothing(fd):
            os.close(fd)
            fd = None
            yield _Claim(target, False, None)
            return
        yield _Claim(target, True, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _open_directory(target: Path) -> int | None:
    """A descriptor of the directory ``target`` (not followed if it is a link), None if it
    does not exist."""
    try:
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise DestinationExists(
                f"{target} exists and is not a directory; nothing restored", path=str(target)
            ) from None
        raise


def _holds_nothing(fd: int) -> bool:
    """Whether the directory ``fd`` holds nothing (but a new disk's ``lost+found``)."""
    return all(name == "lost+found" for name in os.listdir(fd))


_STAGING = ".restoring"
_MOVING = ".moving"  # in a staging directory inside ROOT: the names it moves into ROOT


def _sweep_abandoned_restores(target: Path, fd: int) -> None:
    """Remove what restores into ``target`` (open as ``fd``, locked) that died left there:
    their staging directories, and, where one died while it moved its repository in (its
    marker not there yet), the entries it had moved, which its list names with their inode
    numbers (an entry of that name that is not the one it moved is not its to remove). A
    ROOT whose marker is there is complete."""

    def remove_moved(outer: int) -> None:
        if _exists_in(fd, MARKER):
            return
        for inode, name in _moved_entries(outer):
            with contextlib.suppress(OSError):
                remove_entry(fd, name, inode)

    sweep_work_directories(target, fd, _STAGING, remove_moved)


def _moved_entries(outer: int) -> list[tuple[int, str]]:
    """What a dead restore's list (in its staging directory's outer directory ``outer``)
    says it moved into ROOT: inode numbers and names (none if it left no list, or one that
    names anything but entries of ROOT)."""
    try:
        fd = os.open(_MOVING, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=outer)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        with open(fd, "rb", closefd=False) as listing:
            lines = listing.read().decode("utf-8", "replace").split("\n")
    finally:
        os.close(fd)
    entries = []
    for line in filter(None, lines):
        inode, _, name = line.partition(" ")
        if not inode.isdigit() or not name or "/" in name or name in (".", ".."):
            return []  # not a list a restore wrote
        entries.append((int(inode), name))
    return entries


def _exists_in(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def _staged(claim: _Claim) -> Iterator[Path]:
    """A staging directory to build a restored repository in, which becomes ROOT when the
    block ends; removed if the block fails.

    All or nothing: ROOT holds a repository only once all of it is there, and one whose
    restore fails or is killed holds none (its staging directory, named for its process, is
    swept by the next restore). Nothing in staging is live before that, so one ``syncfs``
    makes it all durable first, instead of four device flushes per prefix.

    A ROOT that does not exist is built beside it and renamed into place. One that does (an
    empty directory: a mount point, a directory shared with a group, one its owner may write
    in a directory they may not) is kept, with its file system, owner, mode and group: the
    repository is built in a hidden directory inside it, then moved into it, its marker file
    last, through the descriptor ``claim`` holds (see :func:`_claimed`). The staging directory
    is a :class:`WorkDirectory`, which others who may write where it is cannot redirect.
    """
    target, fd = claim.target, claim.fd
    with contextlib.ExitStack() as stack:
        if fd is not None:  # dead restores' staging directories are swept by _claimed
            parent, parent_fd, base = target, fd, _STAGING
        else:
            parent, base = target.parent, f".{target.name}{_STAGING}"
            make_directory(parent)
            parent_fd = stack.enter_context(opened_directory(parent))
            sweep_work_directories(parent, parent_fd, base)
        staging = WorkDirectory(parent, parent_fd, base)
        stack.callback(staging.close)
        moved: list[str] = []  # into ROOT, to be moved out again if the restore fails
        try:
            yield staging.path
            if not _leads_to(staging.path, staging.fd):  # (the outer one is private)
                raise DestinationExists(
                    f"the staging directory {staging.path} was moved while the restore ran; "
                    "nothing restored",
                    path=str(target),
                )
            sync_filesystem(staging.fd)
            if fd is None:
                _rename_into_place(staging, parent_fd, target)
            else:
                _move_in(target, fd, staging, moved)
        except BaseException:
            for name in reversed(moved):  # the marker, moved last, goes first
                with contextlib.suppress(OSError):  # the first error is the one told
                    remove_entry(parent_fd, name)
            staging.remove()
            raise
        staging.remove()  # ROOT is the repository now: what is left is tidying up
        os.fsync(parent_fd)


def _leads_to(path: Path, fd: int) -> bool:
    """Whether ``path`` leads to the open directory ``fd``."""
    try:
        found = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _move_in(target: Path, fd: int, staging: WorkDirectory, moved: list[str]) -> None:
    """Move the repository built in ``staging`` into ROOT (open as ``fd``), its marker last,
    adding each name to ``moved`` once it is in ROOT."""
    names = sorted(os.listdir(staging.fd), key=lambda name: name == MARKER)
    # Named before any is moved: a restore killed while it moves them leaves the list for
    # the next one, which removes them (see _sweep_abandoned_restores).
    listing = "".join(
        f"{os.stat(name, dir_fd=staging.fd, follow_symlinks=False).st_ino} {name}\n"
        for name in names
    ).encode()
    write_durably(staging.path.parent / _MOVING, listing, directory=staging.outer_fd)
    try:
        for name in names:
            # Nothing but this restore's may be in ROOT when its marker makes it a
            # repository (the moves themselves never replace what arrived meanwhile).
            if name == MARKER and not _holds_only(fd, staging, moved):
                raise FileExistsError(errno.EEXIST, "something else arrived", name)
            _rename_noreplace(name, name, staging.fd, fd)
            moved.append(name)
            fault("restore:moved")
    except FileExistsError:
        raise DestinationExists(
            f"{target} is no longer empty (something was put there while this restore ran); "
            "nothing restored",
            path=str(target),
        ) from None


def _holds_only(fd: int, staging: WorkDirectory, moved: list[str]) -> bool:
    """Whether ROOT (open as ``fd``) holds nothing but what this restore ``moved`` there and
    its staging directory (and a new disk's ``lost+found``)."""
    return all(
        name == "lost+found"
        or name in moved
        or (name == staging.outer_name and same_directory(fd, name, staging.outer_fd))
        for name in os.listdir(fd)
    )


_RENAME_NOREPLACE = 1
_renameat2 = libc_function(
    "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
_AT_FDCWD = -100


def _rename_noreplace(
    source: str | Path, dest: str | Path, source_dir: int = _AT_FDCWD, dest_dir: int = _AT_FDCWD
) -> None:
    """Rename ``source`` (in the directory ``source_dir``) to ``dest`` (in ``dest_dir``), never
    over anything there (``RENAME_NOREPLACE``: FileExistsError). Where the file system cannot,
    a plain rename, which replaces a file or an empty directory."""
    if _renameat2 is not None:
        if _renameat2(source_dir, os.fsencode(source), dest_dir, os.fsencode(dest),
                      _RENAME_NOREPLACE) == 0:  # fmt: skip
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(dest))
    dir_fds = {
        "src_dir_fd": None if source_dir == _AT_FDCWD else source_dir,
        "dst_dir_fd": None if dest_dir == _AT_FDCWD else dest_dir,
    }
    os.rename(source, dest, **dir_fds)


def _rename_into_place(staging: WorkDirectory, parent_fd: int, target: Path) -> None:
    """Rename ``staging`` to the missing ``target`` (in the directory ``parent_fd``); never
    over a directory made meanwhile."""
    try:
        _rename_noreplace(staging.name, target.name, staging.outer_fd, parent_fd)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise DestinationExists(
            f"{target} was made while this restore ran (by another restore?); nothing restored",
            path=str(target),
        ) from None


def restore_copy(
    source: Path,
    root: str | os.PathLike[str],
    prefix: str,
    *,
    force: bool = False,
    repository: Callable[[Path], Repository] = Repository,
) -> int:
    """Restore the standalone copy ``source`` as ``prefix`` of the repository at ``root``; its
    commit. A new or empty ``root`` is built all or nothing, as a backup's restore is (see
    :func:`_staged`): a copy refused as damaged leaves no repository behind. An existing
    repository is opened by ``repository`` and the prefix replaced under its exclusive lease
    (``force``).
    """
    with _claimed(refuse_unsafe_place(root)) as claim:
        if not claim.fresh:
            with repository(claim.target) as repo:
                return repo.restore_prefix(source, prefix, force=force)
        with _staged(claim) as staging:
            leases = FileLeases(staging / RUNTIME_DIR)  # nobody else knows a staging directory
            with Repository.init(staging, leases=leases, existing=True) as repo:
                return repo.restore_prefix(source, prefix)


def _restore_into(
    target: Path,
    names: list[str],
    chains: dict[str, list[Piece]],
    tails: dict[str, bytes],
    manifest: Manifest,
    force: bool,
    progress: BackupProgress | None,
    total: int,
    restored: dict[str, int],
    *,
    jobs: int,
    staged: bool = False,
    lineage: dict[str, Any] | None = None,
    lease_timeout: float | None = None,
) -> None:
    """``staged``: ``target`` is a staging directory (see ``restore_chain``), made a new
    repository that records ``lineage``. With ``jobs`` > 1 and enough to restore, the prefixes
    are restored by that many copy workers, each checking its pieces as it copies them."""
    items = [
        (name, chains[name], manifest.entries[name].seq, tails.get(name, b"")) for name in names
    ]
    sizes = {name: sum(piece.size for piece in chains[name]) for name in names}
    # Nobody else can know a staging directory: no coordinator for it, kernel locks will do.
    leases = FileLeases(target / RUNTIME_DIR) if staged else None
    init = Repository.init
    with init(
        target, leases=leases, lineage=lineage, existing=staged, lease_timeout=lease_timeout
    ) as repo:
        if jobs <= 1 or len(names) <= 1 or total < INLINE_BELOW:
            done_bytes = 0
            for number, (name, pieces, seq, then) in enumerate(_reading_ahead(items)):

                def step(done: int, _: int, base: int = done_bytes, number: int = number) -> None:
                    if progress is not None:
                        progress(number, len(names), base + done, total)

                restored[name] = restore_chain(
                    repo, pieces, name, force=force, expect_seq=seq, progress=step, staged=staged,
                    then=then,
                )  # fmt: skip
                done_bytes += sizes[name]
            return
    by_name = {item[0]: item for item in items}
    run: _Run[int] = _Run(names, progress)
    with _copy_workers(min(jobs, len(names)), False) as pool:
        run.execute(
            pool,
            names,
            sizes,
            lambda batch: (
                restore_batch,
                str(target),
                [by_name[name] for name in batch],
                force,
                staged,
                lease_timeout,
            ),
            0,  # a piece that fails its check fails again: nothing to retry
            workers=jobs,
        )
    restored.update(run.results)
    if run.failed:
        raise BackupError(
            f"{len(run.failed)} prefix(es) could not be restored: "
            + "; ".join(f"{name}: {error}" for name, error in sorted(run.failed.items()))
        )


# One prefix to restore: its name, its chain of pieces, the commit it must end at, and the
# commits that follow (frames of a replica's log).
RestoreItem = tuple[str, list[Piece], int, bytes]


def _reading_ahead(items: Sequence[RestoreItem]) -> Iterator[RestoreItem]:
    """``items`` in order, the pieces of each read ahead while the one before is restored."""
    if items:
        read_ahead(items[0][1])
    for number, item in enumerate(items):
        if number + 1 < len(items):
            read_ahead(items[number + 1][1])
        yield item


def restore_batch(
    root: str,
    batch: Sequence[RestoreItem],
    force: bool,
    staged: bool,
    lease_timeout: float | None,
) -> list[int | Exception]:
    """Restore several prefixes into the repository (or staging directory) ``root`` (runs in
    a copy worker); each gives its commit, or its exception in its place."""
    leases = FileLeases(Path(root) / RUNTIME_DIR) if staged else None
    outcomes: list[int | Exception] = []
    with Repository(root, leases=leases, lease_timeout=lease_timeout) as repo:
        for name, pieces, seq, then in _reading_ahead(batch):
            try:
                outcomes.append(
                    restore_chain(
                        repo, pieces, name, force=force, expect_seq=seq, staged=staged, then=then
                    )
                )
            except Exception as err:  # an interrupt is the run's, not the prefix's
                outcomes.append(err)
    return outcomes
