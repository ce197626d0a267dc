"""Continuous replication: every prefix's commits shipped to a catalog (a directory or an
``s3://`` URL) within an interval of being acknowledged, and restore to any commit.

A replica is a backup catalog with a log beside its backups:

- *Snapshots* are ordinary backups of every prefix (incremental where the chain allows),
  taken at start, every ``snapshot_interval``, and whenever a prefix's history can no longer
  be continued from what was shipped: its main file was replaced (a compaction, a restore),
  its follower read a fenced writer's late append, or it is new.
- Each snapshot starts a *generation*, named by its backup id. The commits after it are
  shipped as *log objects* ``log/<prefix>/<generation>/<first>-<last>``: their batch frames
  exactly as the WAL held them, the time they were read, and a seal over all of it (SHA-256,
  or an HMAC with the catalog's key; in a keyed bucket the object is encrypted as well).
  A generation is continued up to the next snapshot's commit before that snapshot takes
  over, and the switch is recorded (``generations/<generation>``, with its time), so every
  commit between two snapshots is restorable exactly.
- Retention keeps every snapshot of the last ``retention`` plus the one before it, and the
  generations of the snapshots it keeps.

The replicator only reads the files, as any follower of a prefix's log does
(``storage._log.Log``): a writer never waits for it. A commit's time in the replica is when
the replicator read it, at most ``interval`` after it was acknowledged: ``--at TIME``
restores the commits read at or before TIME, all of which were committed by then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotcopy.storage import CorruptFileError, PrefixNotFound, Repository
from hotcopy.storage import _format as fmt
from hotcopy.storage._log import Log, check_frames, committed_frames

from ._backup import backup
from ._catalog import Catalog, Entry, Manifest, is_backup_id
from ._errors import BackupError, CatalogError
from ._places import REPLICATOR_LOCK
from ._replica_log import (
    END,
    GENERATIONS_DIR,
    LOG_DIR,
    MAX_OBJECT_FRAMES,
    LogEnd,
    LogObject,
    decode_log_object,
    encode_log_object,
    merge_small_objects,
    read_log,
    write_end,
    write_generation,
)
from ._retention import prune

log = logging.getLogger("hotcopy.replicate")

# A snapshot is a delta of the one before, but every few is whole: a restore reads a bounded
# chain, and retention can remove the old ones (it never breaks a chain).
_DELTAS_PER_FULL = 4
_RETRY_SNAPSHOT = 10.0  # seconds after a failed snapshot before the next
_MERGE_AFTER = 32  # log objects of a prefix shipped between merges


# -- the replicator ------------------------------------------------------------------------------


class _Follower:
    """Follows one prefix's log from a snapshot's cut and keeps the commits not yet shipped
    (a :class:`~hotcopy.storage._log.LogSink`)."""

    def __init__(self, root: Path, name: str, repository_id: bytes, entry: Entry, generation: str):
        self.name = name
        self.generation = generation
        self.shipped = entry.seq  # the last commit the replica holds
        self.unmerged = 0  # log objects shipped since the last merge
        self.lost = False  # what the files hold no longer continues what was shipped
        self.ended = False  # its log in this generation is closed (an end record written)
        # commit -> its frame, or where it lies in the main file (checkpointed before read)
        self._pending: dict[int, bytes | tuple[int, int]] = {}
        self._opened = False
        self.log = Log(root, name, repository_id, writable=False, sink=self, scan=False)
        self._opened = True
        cut = self.log.cut()
        if cut.file_id.hex() != entry.file_id or self.log.seq < entry.seq:
            self.lost = True  # replaced since the snapshot: the next snapshot starts afresh
            return
        first = min(self._pending, default=self.log.seq + 1)
        if first > entry.seq + 1:  # checkpointed before this log looked: read them there
            for seq, frame in committed_frames(self.log.main_fd, entry.end, cut.length, entry.seq):
                if seq >= first:
                    break
                self._pending[seq] = frame

    # LogSink
    def reset(self) -> None:
        if self._opened:
            self.lost = True  # reread from a replaced main file, or after a divergence
        self._pending.clear()

    def apply_main(self, batch: fmt.Batch) -> None:
        if batch.seq > self.shipped:
            self._pending[batch.seq] = (batch.offset, batch.size)

    def apply_wal(self, batch: fmt.Batch) -> None:
        if batch.seq > self.shipped:
            self._pending[batch.seq] = batch.raw or b""

    def repoint(self, batch: fmt.Batch) -> None:
        pass

    def moved(self, first_seq: int, last_seq: int, shift: int) -> None:
        pass

    def pending(self, upto: int | None = None) -> list[tuple[int, bytes]]:
        """The commits not shipped yet (up to ``upto``), in order, each checked."""
        found = []
        for seq in sorted(self._pending):
            if upto is not None and seq > upto:
                break
            item = self._pending[seq]
            if isinstance(item, tuple):
                offset, size = item
                item = fmt.pread_exact(self.log.main_fd, size, offset)
                check_frames(item, seq - 1)
            found.append((seq, item))
        return found

    def shipped_through(self, seq: int) -> None:
        """Commits up to ``seq`` are durable in the replica."""
        for done in [s for s in self._pending if s <= seq]:
            del self._pending[done]
        self.shipped = seq

    def close(self) -> None:
        self.log.close()


def pause_after_pass(interval: float, last_pass: float) -> float:
    """Seconds to pause after a pass that took ``last_pass``.

    A commit made just after a pass read its prefix is durable when the next pass ends: this
    pass, the pause and the next pass after it. Starting passes half an interval apart keeps
    that within the interval whenever no pass takes more than half of it, however their
    times vary; planning from the last pass alone let a slower next pass overrun."""
    return max(0.0, interval / 2 - last_pass)


@dataclass
class ReplicaStatus:
    """What a replicator has done (:attr:`Replicator.status`)."""

    generation: str | None = None
    shipped_commits: int = 0
    shipped_objects: int = 0
    snapshots: int = 0
    last_ship: float | None = None  # when the last pass ended
    errors: list[str] = field(default_factory=list)  # the latest, most recent last

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "shipped_commits": self.shipped_commits,
            "shipped_objects": self.shipped_objects,
            "snapshots": self.snapshots,
            "last_ship": self.last_ship,
            "errors": self.errors[-5:],
        }


class Replicator:
    """Replicates the repository at ``root`` into the catalog ``target`` (see the module
    docstring): :meth:`run` until stopped, or :meth:`snapshot`, then :meth:`ship` passes, then
    :meth:`close`.

    Args:
        interval: Seconds at most between a commit's acknowledgement and its being durable
            in the target, while no pass takes more than half of it (a longer pass is
            logged); passes start half an interval apart.
        snapshot_interval: Seconds between snapshots.
        retention: Seconds of history kept restorable.
        key_file: The catalog's key (authenticates, and in a bucket encrypts, everything).
        compress: Store a bucket's objects zstd-compressed.
        jobs: Copy workers of each snapshot.
        lock_timeout: Seconds to wait for the replicator lock of ``target`` (one replicator
            ships into a replica at a time), None: as long as it takes. A lock in a bucket
            whose holder died elsewhere expires within 60 s.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        target: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        snapshot_interval: float = 3600.0,
        retention: float = 86400.0,
        key_file: str | os.PathLike[str] | None = None,
        compress: bool = False,
        jobs: int = 2,
        lease_timeout: float | None = None,
        lock_timeout: float | None = 90.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0 or snapshot_interval <= 0 or retention <= 0:
            raise ValueError("interval, snapshot interval and retention must be > 0")
        self.root = Path(root)
        self.target = target
        self.interval = interval
        self.snapshot_interval = snapshot_interval
        self.retention = retention
        self._key_file = key_file
        self._compress = compress
        self._jobs = jobs
        self._lease_timeout = lease_timeout
        self._clock = clock
        self._repo = Repository(root, lease_timeout=lease_timeout)
        self.catalog = Catalog.create(target, self._repo.id, key_file=key_file, compress=compress)
        self._held = contextlib.ExitStack()  # the replicator lock, for this object's life
        try:
            self._held.enter_context(
                self.catalog.place.locked(lambda lock: lock.acquire(lock_timeout), REPLICATOR_LOCK)
            )
        except BaseException:
            self._repo.close()
            raise
        self._followers: dict[str, _Follower] = {}
        self._snapshotting = ThreadPoolExecutor(1, thread_name_prefix="hotcopy-snapshot")
        self._merging = ThreadPoolExecutor(1, thread_name_prefix="hotcopy-merge")
        self._merging_now: set[tuple[str, str]] = set()
        self._pending_snapshot: Future[Manifest] | None = None
        self._next_snapshot = 0.0
        self._retry_at = 0.0  # no snapshot before this, after one failed
        self.status = ReplicaStatus()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, started: bool = False) -> None:
        """Replicate until ``stop`` is set; every pass ships what was committed since the last.
        The first snapshot is taken before anything is shipped (unless ``started``)."""
        if not started:
            self.snapshot()
        while not stop.is_set():
            began = time.monotonic()
            self.ship()
            took = time.monotonic() - began
            if took > self.interval / 2:
                log.warning(
                    "a pass took %.3f s, more than half the interval of %.3f s: commits may "
                    "reach the target later than the interval",
                    took,
                    self.interval,
                )
            stop.wait(pause_after_pass(self.interval, took))
        self.ship()

    def snapshot(self) -> str:
        """Take a snapshot now (after one in progress) and follow every prefix from it: the
        first one, before anything is shipped. Returns its id."""
        pending, self._pending_snapshot = self._pending_snapshot, None
        if pending is not None:
            with contextlib.suppress(Exception):  # superseded by this one
                pending.result()
        manifest = self._snapshot()
        self._switch(manifest)
        return manifest.id

    def ship(self) -> int:
        """One pass: switch to a snapshot that completed, ship every prefix's new commits,
        start a snapshot when one is due; the commits shipped."""
        pending = self._pending_snapshot
        if pending is not None and pending.done():
            self._pending_snapshot = None
            try:
                self._switch(pending.result())
            except Exception as err:  # retried soon; shipping goes on meanwhile
                self._error(f"snapshot failed: {err}")
                self._retry_at = self._clock() + _RETRY_SNAPSHOT
                self._next_snapshot = self._clock() + min(self.snapshot_interval, _RETRY_SNAPSHOT)
        shipped = 0
        need_snapshot = False
        for name in list(self._followers):
            follower = self._followers[name]
            try:
                shipped += self._ship_one(follower)
            except PrefixNotFound:
                follower.close()
                del self._followers[name]
            except (CorruptFileError, CatalogError, OSError) as err:
                self._error(f"prefix {name!r}: {err}")
            if follower.lost:
                need_snapshot = True
        if set(self._repo.prefixes()) - set(self._followers):
            need_snapshot = True  # new prefixes are shipped from their first snapshot
        now = self._clock()
        due = now >= self._next_snapshot or (need_snapshot and now >= self._retry_at)
        if self._pending_snapshot is None and due:
            self._pending_snapshot = self._snapshotting.submit(self._snapshot)
        self.status.shipped_commits += shipped
        self.status.last_ship = now
        return shipped

    def _ship_one(self, follower: _Follower, upto: int | None = None) -> int:
        if follower.lost:
            return 0
        follower.log.follow()
        read = self._clock()  # every commit read by now was committed by now
        commits = follower.pending(upto)
        in_order = all(seq == follower.shipped + 1 + at for at, (seq, _) in enumerate(commits))
        if follower.lost or not in_order:
            follower.lost = True
            # What was shipped stays restorable, except commits a fence discarded after the
            # follower read them: the log of this generation ends before those.
            through = follower.shipped
            if follower.log.diverged_through is not None:
                through = min(through, follower.log.diverged_through)
            self._end(follower, through, None)
            return 0
        shipped = 0
        at = 0
        while at < len(commits):
            batch: list[bytes] = []
            size = 0
            while at < len(commits) and (
                not batch or size + len(commits[at][1]) <= MAX_OBJECT_FRAMES
            ):
                batch.append(commits[at][1])
                size += len(commits[at][1])
                at += 1
            first, last = follower.shipped + 1, follower.shipped + len(batch)
            obj = LogObject(follower.name, follower.generation, first, last)
            frames = b"".join(batch)
            data = encode_log_object(obj, frames, [(last, read)], self.catalog.key)
            if not self.catalog.place.write(obj.name, data, create_only=True):
                self._check_ours(obj, frames)
            follower.shipped_through(last)
            follower.unmerged += 1
            shipped += len(batch)
            self.status.shipped_objects += 1
        if follower.unmerged >= _MERGE_AFTER:
            follower.unmerged = 0
            self._merge(follower.name, follower.generation)
        return shipped

    def _end(self, follower: _Follower, through: int, successor: str | None) -> None:
        """Close ``follower``'s log in its generation at commit ``through``."""
        if not follower.ended:
            end = LogEnd(through, successor, self._clock())
            write_end(self.catalog, follower.name, follower.generation, end)
            follower.ended = True

    def _carry_over(self, follower: _Follower, manifest: Manifest) -> None:
        """Ship into ``manifest``'s generation the commits after its snapshot that were shipped
        into the current one while the snapshot ran: each generation alone reaches them."""
        after = manifest.entries[follower.name].seq
        old = self.catalog.load(follower.generation)
        runs = read_log(self.catalog, old, follower.name, after=after, seq=follower.shipped)
        reached = runs[-1].obj.last if runs else after
        if reached != follower.shipped:
            raise CatalogError(
                f"the log of prefix {follower.name!r} in {follower.generation} reaches commit "
                f"{reached}, not {follower.shipped}"
            )
        for run in runs:
            obj = LogObject(follower.name, manifest.id, run.obj.first, run.obj.last)
            data = encode_log_object(obj, run.frames, run.read, self.catalog.key)
            if not self.catalog.place.write(obj.name, data, create_only=True):
                self._check_ours(obj, run.frames)

    def _check_ours(self, obj: LogObject, frames: bytes) -> None:
        """An object of that name exists: this replicator's own, when a put that failed (the
        store unreachable after it stored it) is tried again; anything else is refused."""
        data = self.catalog.place.read(obj.name, f"log object {obj.name}", len(frames) + (1 << 20))
        if data is None or decode_log_object(obj, data, self.catalog.key).frames != frames:
            raise CatalogError(
                f"{obj.name} exists with other commits: is another replicator writing here?"
            )

    def _merge(self, prefix: str, generation: str) -> None:
        """Merge the small log objects of a prefix's generation, in the background."""
        if (prefix, generation) in self._merging_now:
            return
        self._merging_now.add((prefix, generation))

        def merge() -> None:
            try:
                merge_small_objects(self.catalog, prefix, generation)
            except (CatalogError, OSError) as err:
                self._error(f"prefix {prefix!r}: merging its log objects failed: {err}")
            finally:
                self._merging_now.discard((prefix, generation))

        self._merging.submit(merge)

    # -- snapshots and generations ----------------------------------------------------------

    def _snapshot(self) -> Manifest:
        """A backup of every prefix (in the snapshot thread, or at start), then retention."""
        result = backup(
            self.root,
            self.target,
            jobs=self._jobs,
            incremental=True,
            max_deltas_before_full=_DELTAS_PER_FULL,
            key_file=self._key_file,
            compress=self._compress,
            lease_timeout=self._lease_timeout,
            clock=self._clock,
        )
        if not result.complete:
            raise BackupError(
                "snapshot "
                + result.id
                + " is partial: "
                + "; ".join(f"{n}: {why}" for n, why in sorted(result.failed.items()))
            )
        # The backup may have admitted this repository as a successor (restored from this very
        # replica), which the marker read before does not know.
        self.catalog.refresh()
        return self.catalog.load(result.id)

    def _switch(self, manifest: Manifest) -> None:
        """Finish the current generation at the snapshot's commits, record the switch, and
        follow every prefix in the new generation."""
        for name, follower in list(self._followers.items()):
            entry = manifest.entries.get(name)
            keep = entry is not None and not follower.lost
            if keep:
                assert entry is not None
                self._ship_one(follower, upto=entry.seq)
                keep = not follower.lost and follower.shipped >= entry.seq
                if keep and follower.shipped > entry.seq:
                    try:
                        self._carry_over(follower, manifest)
                    except CatalogError as err:
                        self._error(f"prefix {name!r}: {err}")
                        keep = False
            # Closed where it ends: a restore finds out if objects go missing at its end.
            self._end(follower, follower.shipped, manifest.id if keep else None)
            self._merge(name, follower.generation)  # the generation is complete
            follower.unmerged = 0
            if keep:
                follower.generation = manifest.id
                follower.ended = False
            else:
                follower.close()
                del self._followers[name]
        # Only now, with every log of the new generation reaching as far as the old one did,
        # may a restore take the new snapshot for the newest state.
        write_generation(self.catalog, manifest.id, self._clock())
        root, repository_id = self._repo.root, self._repo.id_bytes
        for name, entry in manifest.entries.items():
            if name not in self._followers:
                try:
                    self._followers[name] = _Follower(root, name, repository_id, entry, manifest.id)
                except PrefixNotFound:
                    continue  # removed since: not followed
                except (CorruptFileError, OSError) as err:
                    self._error(f"prefix {name!r}: cannot follow it: {err}")
        self.status.generation = manifest.id
        self.status.snapshots += 1
        self._next_snapshot = self._clock() + self.snapshot_interval
        # In the background: pruning a bucket takes a few hundred ms that passes must not wait.
        self._merging.submit(self._apply_retention)

    def _apply_retention(self) -> None:
        seconds = int(self.retention + self.snapshot_interval)
        try:
            prune(
                self.target,
                keep_last=2,
                keep_within=f"{max(seconds, 1)}s",
                key_file=self._key_file,
                clock=self._clock,
            )
            kept = set(self.catalog.backup_ids())
            place = self.catalog.place
            gone = [  # log/<prefix>/<generation>/...: objects first, then the end record
                name
                for name in sorted(place.listing(LOG_DIR), key=lambda name: name.endswith(END))
                if len(parts := name.split("/")) == 4 and parts[2] not in kept
            ]
            gone += [
                name
                for name in place.listing(GENERATIONS_DIR)
                if name.split("/")[-1] not in kept and is_backup_id(name.split("/")[-1])
            ]
            if gone:
                place.remove(gone)
        except BackupError as err:
            self._error(f"retention: {err}")

    def _error(self, message: str) -> None:
        log.warning("%s", message)
        self.status.errors.append(message)
        del self.status.errors[:-20]

    def close(self) -> None:
        pending = self._pending_snapshot
        self._snapshotting.shutdown(wait=True)
        if pending is not None:
            try:
                self._switch(pending.result())
            except Exception as err:
                self._error(f"snapshot failed: {err}")
        self._merging.shutdown(wait=True)
        for follower in self._followers.values():
            try:  # a restore then knows where this generation's log ends
                self._end(follower, follower.shipped, None)
            except (CatalogError, OSError) as err:
                self._error(f"prefix {follower.name!r}: could not close its log: {err}")
            follower.close()
        self._followers.clear()
        self._held.close()
        self._repo.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
