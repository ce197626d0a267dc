"""A replica's log: the commits a replicator (``_replicate``) ships after each snapshot, and
how a restore finds and checks them (see ``_replicate`` for the whole design).

- ``log/<prefix>/<generation>/<first>-<last>``: commits ``first``..``last`` of ``prefix``
  after the snapshot (backup) ``generation``, their batch frames exactly as the WAL held them,
  behind one JSON line: what they are, when each run of them was read, their SHA-256, and a
  seal over it (a checksum, or an HMAC with the catalog's key).
- ``generations/<generation>``: when the replicator started shipping after that snapshot.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from hotcopy.storage import CorruptFileError
from hotcopy.storage import _format as fmt
from hotcopy.storage._log import check_frames

from ._catalog import (
    COMPLETE,
    Catalog,
    CatalogView,
    Choice,
    Manifest,
    _check_seal,
    _seal,
    is_backup_id,
    iso_utc,
)
from ._errors import BackupNotFound, CatalogError
from ._places import is_prefix_name

LOG_DIR = "log"
GENERATIONS_DIR = "generations"
_MAGIC = b"HCREPLOG1\n"
END = "end"  # log/<prefix>/<generation>/end: the log is closed (LogEnd)
MAX_OBJECT_FRAMES = 64 << 20  # bytes of commits in one log object at most
SMALL_OBJECT = 8 << 20  # log objects smaller than this are merged, up to about this size
_MAX_OBJECT = MAX_OBJECT_FRAMES + (1 << 20)  # with its header (and seal)
_OBJECT_NAME = re.compile(r"(\d{20})-(\d{20})")


# -- log objects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogObject:
    """Commits ``first``..``last`` of ``prefix`` after snapshot ``generation``."""

    prefix: str
    generation: str
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{LOG_DIR}/{self.prefix}/{self.generation}/{self.first:020d}-{self.last:020d}"

    @classmethod
    def parse(cls, name: str) -> LogObject | None:
        """The log object ``name`` names, or None (not one: left alone)."""
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != LOG_DIR:
            return None
        match = _OBJECT_NAME.fullmatch(parts[3])
        if not is_prefix_name(parts[1]) or not is_backup_id(parts[2]) or match is None:
            return None
        first, last = int(match[1]), int(match[2])
        return cls(parts[1], parts[2], first, last) if 0 < first <= last else None


def encode_log_object(
    obj: LogObject, frames: bytes, read: list[tuple[int, float]], key: bytes | None
) -> bytes:
    """The content of log object ``obj``: its commits' ``frames`` and, for each run of them,
    ``(last commit, time read)``."""
    header = {
        "prefix": obj.prefix,
        "generation": obj.generation,
        "first": obj.first,
        "last": obj.last,
        "bytes": len(frames),
        "sha256": hashlib.sha256(frames).hexdigest(),
        "read": [[seq, float(moment)] for seq, moment in read],
    }
    return (
        _MAGIC
        + json.dumps(json.loads(_seal(header, key)), separators=(",", ":")).encode()
        + (b"\n" + frames)
    )


@dataclass
class LogRun:
    """The commits of one log object, checked: ``frames`` and when each run was read."""

    obj: LogObject
    frames: bytes
    read: list[tuple[int, float]]

    def until(self, seq: int | None, moment: float | None) -> LogRun:
        """Its commits up to ``seq`` and read at or before ``moment`` (none: ``obj.last`` is
        ``first - 1``)."""
        last = self.obj.last if seq is None else min(seq, self.obj.last)
        if moment is not None:
            in_time = [run_last for run_last, read in self.read if read <= moment]
            last = min(last, max(in_time, default=self.obj.first - 1))
        return self.between(self.obj.first - 1, last)

    def between(self, after: int, through: int) -> LogRun:
        """Its commits after ``after`` through ``through``."""
        first, last = max(after + 1, self.obj.first), min(through, self.obj.last)
        if (first, last) == (self.obj.first, self.obj.last):
            return self
        start, end = len(self.frames), len(self.frames)
        reader = fmt.FileReader.of_bytes(self.frames)
        while reader.pos < len(self.frames):
            at = reader.pos
            batch = fmt.read_batch(reader, load_values=False)
            if batch is None:
                break
            if batch.seq == first:
                start = at
            if batch.seq > last:
                end = at
                break
        read = [(min(seq, last), moment) for seq, moment in self.read if seq >= first]
        obj = LogObject(self.obj.prefix, self.obj.generation, first, last)
        return LogRun(obj, self.frames[start:end] if first <= last else b"", read)


def decode_log_object(obj: LogObject, data: bytes, key: bytes | None) -> LogRun:
    """Check the content of log object ``obj`` completely: its seal, that it is what its name
    says, and every commit's checksum and sequence.

    Raises:
        CatalogError: anything does not hold.
    """
    what = f"log object {obj.name}"
    if not data.startswith(_MAGIC) or b"\n" not in data[len(_MAGIC) :]:
        raise CatalogError(f"{what} is not a hotcopy log object")
    line_end = data.index(b"\n", len(_MAGIC))
    try:
        header = json.loads(data[len(_MAGIC) : line_end])
    except ValueError:
        raise CatalogError(f"{what}: its header is damaged") from None
    if not isinstance(header, dict):
        raise CatalogError(f"{what}: its header is damaged")
    _check_seal(header, key, what, required=True)
    frames = data[line_end + 1 :]
    said = (header.get("prefix"), header.get("generation"), header.get("first"), header.get("last"))
    if said != (obj.prefix, obj.generation, obj.first, obj.last):
        raise CatalogError(f"{what} holds {said}, not what its name says (moved or swapped)")
    if header.get("bytes") != len(frames) or header.get("sha256") != (
        hashlib.sha256(frames).hexdigest()
    ):
        raise CatalogError(f"{what}: its commits are damaged (size or SHA-256 mismatch)")
    read = header.get("read")
    if not isinstance(read, list) or not all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], float)
        for r in read
    ):
        raise CatalogError(f"{what}: its header is damaged (read times)")
    try:
        if check_frames(frames, obj.first - 1) != obj.last:
            raise CatalogError(f"{what} does not end at commit {obj.last}")
    except CorruptFileError as err:
        offset = err.fields.get("offset")
        raise CatalogError(f"{what} is damaged at offset {offset}: {err}") from None
    return LogRun(obj, frames, [(int(seq), float(moment)) for seq, moment in read])


# -- generations ----------------------------------------------------------------------------------


def generation_name(generation: str) -> str:
    return f"{GENERATIONS_DIR}/{generation}"


def write_generation(catalog: Catalog, generation: str, switched: float) -> None:
    """Record that the replicator ships into ``generation`` from time ``switched`` on."""
    body = {"generation": generation, "switched": float(switched)}
    catalog.place.write(generation_name(generation), _seal(body, catalog.key))


def _read_sealed(catalog: Catalog, name: str, what: str) -> dict[str, Any] | None:
    """The small JSON record ``name``, its seal checked; None if there is none."""
    raw = catalog.place.read(name, what, 1 << 16)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        raise CatalogError(f"{what} is damaged") from None
    if not isinstance(body, dict):
        raise CatalogError(f"{what} is damaged")
    _check_seal(body, catalog.key, what, required=True)
    return body


def _switched(catalog: Catalog, generation: str) -> float | None:
    """When the replicator started shipping into ``generation``, or None if it never did."""
    what = f"generation record {generation_name(generation)}"
    body = _read_sealed(catalog, generation_name(generation), what)
    if body is None:
        return None
    switched = body.get("switched")
    if body.get("generation") != generation or not isinstance(switched, float):
        raise CatalogError(f"{what} is not the record of generation {generation}")
    return switched


@dataclass(frozen=True)
class LogEnd:
    """A generation's log of one prefix is closed: it holds commits through ``through``, and
    nothing after; ``successor``: the snapshot that took over at ``time`` (None: the prefix's
    history was replaced, or a follower read commits a fence discarded, after ``through``)."""

    through: int
    successor: str | None
    time: float


def end_name(prefix: str, generation: str) -> str:
    return f"{LOG_DIR}/{prefix}/{generation}/{END}"


def write_end(catalog: Catalog, prefix: str, generation: str, end: LogEnd) -> None:
    """Close ``prefix``'s log in ``generation`` (once: the first end written stays)."""
    body = {
        "prefix": prefix,
        "generation": generation,
        "through": end.through,
        "successor": end.successor,
        "time": float(end.time),
    }
    catalog.place.write(end_name(prefix, generation), _seal(body, catalog.key), create_only=True)


def read_end(catalog: Catalog, prefix: str, generation: str) -> LogEnd | None:
    """The end of ``prefix``'s log in ``generation``, or None while it is open."""
    name = end_name(prefix, generation)
    what = f"log end {name}"
    body = _read_sealed(catalog, name, what)
    if body is None:
        return None
    through, successor, moment = body.get("through"), body.get("successor"), body.get("time")
    if (
        (body.get("prefix"), body.get("generation")) != (prefix, generation)
        or not isinstance(through, int)
        or not (successor is None or is_backup_id(successor))
        or not isinstance(moment, float)
    ):
        raise CatalogError(f"{what} is not the end of that log (moved or damaged)")
    return LogEnd(through, successor, moment)


@dataclass
class _Log:
    """The log of one prefix in one generation, as listed."""

    objects: list[LogObject]
    ended: bool  # it has an end record
    sizes: dict[str, int]  # of each object, as stored

    def limit(self, obj: LogObject) -> int:
        """Bytes a read of ``obj`` may take at most: one commit may be larger than objects
        normally are (a compressed one opens larger than it is stored)."""
        return max(_MAX_OBJECT, 64 * self.sizes.get(obj.name, 0))


def _listed(catalog: Catalog, prefix: str, generation: str) -> _Log:
    return _grouped(catalog.place.listing(f"{LOG_DIR}/{prefix}/{generation}"))


def _grouped(sizes: dict[str, int]) -> _Log:
    objects = [obj for obj in map(LogObject.parse, sizes) if obj is not None]
    ended = any(name.endswith(f"/{END}") for name in sizes)
    return _Log(sorted(objects, key=lambda obj: (obj.first, -obj.last)), ended, sizes)


def log_problems(view: CatalogView) -> list[str]:
    """Every log object of the replica read and checked, and each generation's log checked
    to follow its snapshot without a gap (and to reach its end, once closed): what a restore
    from it would refuse."""
    by_generation: dict[tuple[str, str], dict[str, int]] = {}
    for name, size in view.catalog.place.listing(LOG_DIR).items():
        parts = name.split("/")
        if len(parts) == 4:
            by_generation.setdefault((parts[1], parts[2]), {})[name] = size
    problems = []
    for (prefix, generation), names in sorted(by_generation.items()):
        record = view.records.get(generation)
        manifest = record.manifest if record is not None else None
        if manifest is None or prefix not in manifest.entries:
            continue  # of a snapshot gone or never finished: retention removes it
        try:
            read_log(view.catalog, manifest, prefix, listed=_grouped(names))
        except CatalogError as err:
            problems.append(str(err))
    return problems


def roll_forward(
    catalog: Catalog,
    manifest: Manifest,
    prefix: str,
    *,
    seq: int | None = None,
    moment: float | None = None,
) -> tuple[bytes, int]:
    """The commits of ``prefix`` shipped after snapshot ``manifest`` (up to commit ``seq``,
    and read at or before ``moment``, when given), as WAL frames; and the last of them.

    Raises:
        CatalogError: a log object is damaged, or missing in the middle or at a closed log's
            end; or the log was continued by a snapshot whose generation record is missing.
    """
    runs = read_log(catalog, manifest, prefix, seq=seq, moment=moment)
    last = runs[-1].obj.last if runs else manifest.entries[prefix].seq
    return b"".join(run.frames for run in runs), last


def read_log(
    catalog: Catalog,
    manifest: Manifest,
    prefix: str,
    *,
    after: int | None = None,
    seq: int | None = None,
    moment: float | None = None,
    listed: _Log | None = None,
) -> list[LogRun]:
    """The checked runs of commits of ``prefix`` after snapshot ``manifest`` (after commit
    ``after``, by default the snapshot's; see :func:`roll_forward`)."""
    for _ in range(_RELISTS):
        log = listed or _listed(catalog, prefix, manifest.id)
        listed = None
        try:
            return _read(catalog, manifest, prefix, log, after, seq, moment)
        except _Vanished:
            pass  # merged into a larger object meanwhile: list them again
    raise CatalogError(f"the log of prefix {prefix!r} keeps changing under this restore")


_RELISTS = 3


class _Vanished(Exception):
    pass


def _read(
    catalog: Catalog,
    manifest: Manifest,
    prefix: str,
    log: _Log,
    after: int | None,
    seq: int | None,
    moment: float | None,
) -> list[LogRun]:
    end = read_end(catalog, prefix, manifest.id) if log.ended else None
    if log.ended and end is None:
        raise _Vanished  # removed by retention meanwhile
    last = manifest.entries[prefix].seq if after is None else after
    bound = seq
    if end is not None:
        bound = end.through if bound is None else min(bound, end.through)
    runs: list[LogRun] = []
    limited = bound is not None and last >= bound
    for obj in log.objects:
        if limited:
            break
        if obj.last <= last:
            continue  # covered by what was taken (the parts of an object merged since)
        if obj.first > last + 1:
            raise CatalogError(
                f"the log of prefix {prefix!r} after snapshot {manifest.id} lacks commits "
                f"{last + 1}..{obj.first - 1} (an object is missing from {catalog.where})"
            )
        data = catalog.place.read(obj.name, f"log object {obj.name}", log.limit(obj))
        if data is None:
            raise _Vanished
        run = decode_log_object(obj, data, catalog.key).between(last, obj.last)
        part = run.until(bound, moment)
        if part.obj.last >= part.obj.first:
            runs.append(part)
            last = part.obj.last
        limited = part.obj.last < run.obj.last or (bound is not None and last >= bound)
    if end is not None and not limited and last < end.through:
        raise CatalogError(
            f"the log of prefix {prefix!r} after snapshot {manifest.id} lacks commits "
            f"{last + 1}..{end.through} (objects are missing from {catalog.where})"
        )
    if (
        end is not None
        and end.successor is not None
        and moment is not None
        and end.time <= moment
        and _switched(catalog, end.successor) is None
    ):
        raise CatalogError(
            f"snapshot {end.successor} took over the log of prefix {prefix!r} at "
            f"{iso_utc(end.time)}, but its generation record is missing from "
            f"{catalog.where}: this replica cannot say what followed"
        )
    return runs


def merge_small_objects(
    catalog: Catalog, prefix: str, generation: str, *, small: int = SMALL_OBJECT
) -> int:
    """Merge each run of consecutive log objects smaller than ``small`` of one generation
    into one (Litestream's compaction does the same): fewer objects to list and read for the
    same commits and read times. A merged object is written before the ones it replaces are
    removed, so a reader always finds every commit. Returns how many objects were removed."""
    log = _listed(catalog, prefix, generation)
    objects, sizes = log.objects, log.sizes
    runs: list[list[LogObject]] = []
    covered: list[LogObject] = []  # parts of a merge that was interrupted before removal
    reach = 0
    for obj in objects:
        if obj.last <= reach:
            covered.append(obj)
            continue
        reach = obj.last
        run = runs[-1] if runs else []
        joins = run and run[-1].last + 1 == obj.first
        if joins and sizes[obj.name] < small and sum(sizes[o.name] for o in run) < small:
            run.append(obj)
        else:
            runs.append([obj])
    removed = [obj.name for obj in covered]
    for run in runs:
        if len(run) < 2:
            continue
        parts = []
        for obj in run:
            data = catalog.place.read(obj.name, f"log object {obj.name}", log.limit(obj))
            if data is None:
                return 0  # merged by another process meanwhile
            parts.append(decode_log_object(obj, data, catalog.key))
        merged = LogObject(prefix, generation, run[0].first, run[-1].last)
        frames = b"".join(part.frames for part in parts)
        read = [moment for part in parts for moment in part.read]
        catalog.place.write(
            merged.name, encode_log_object(merged, frames, read, catalog.key), create_only=True
        )
        removed += [obj.name for obj in run]
    if removed:
        catalog.place.remove(removed)
    return len(removed)


def pick_for_time(view: CatalogView, moment: float) -> Choice | None:
    """The newest restorable snapshot the replicator had switched to at ``moment`` (None: the
    catalog has no generations, it is not a replica). Backups taken into a replica by other
    means are passed over: the commits after them are in another snapshot's log."""
    catalog = view.catalog
    if not catalog.place.listing(GENERATIONS_DIR):
        return None
    passed: list[str] = []
    for record in reversed(view.ordered()):
        if record.status != COMPLETE or record.manifest is None:
            continue
        switched = _switched(catalog, record.id)
        if switched is None or switched > moment:
            continue
        problem = view.restorable_problem(record.id)
        if problem is None:
            return Choice(record.manifest, passed)
        passed.append(f"{record.id}: not restorable: {problem}")
    when = "" if math.isinf(moment) else f" was in use at {iso_utc(moment)}"
    raise BackupNotFound(
        f"no restorable snapshot of the replica in {catalog.where}{when}"
        + (f" (passed over {'; '.join(passed[:3])})" if passed else "")
    )


def pick_for_seq(view: CatalogView, prefix: str, seq: int) -> Choice:
    """The newest restorable snapshot from which commit ``seq`` of ``prefix`` is reached."""
    catalog = view.catalog
    passed: list[str] = []
    for record in reversed(view.ordered()):
        manifest = record.manifest
        if record.status != COMPLETE or manifest is None or prefix not in manifest.entries:
            continue
        entry = manifest.entries[prefix]
        if entry.seq > seq:
            continue
        problem = view.check_chain(record.id, prefix, checksums=False)
        if problem is not None:
            passed.append(f"{record.id}: not restorable: {problem}")
            continue
        if entry.seq == seq:
            return Choice(manifest, passed)
        log = _listed(catalog, prefix, record.id)
        reach = entry.seq
        for obj in log.objects:
            if obj.first <= reach + 1 <= obj.last + 1:
                reach = max(reach, obj.last)
        end = read_end(catalog, prefix, record.id) if log.ended else None
        if end is not None:
            reach = min(reach, end.through)
        if reach >= seq:
            return Choice(manifest, passed)
        passed.append(f"{record.id}: its log of {prefix!r} reaches commit {reach}")
    raise BackupNotFound(
        f"commit {seq} of prefix {prefix!r} is not in {catalog.where}"
        + (f" ({'; '.join(passed[:3])})" if passed else "")
    )
