"""The backup catalog: a directory of backups, read as untrusted input through one loader.

```
DEST/hotcopy-backups.json          marker: format, the repository writing here, its lineage
DEST/catalog.lock                  held by a backup run or a prune (filelock)
DEST/20261204T163000.123456Z/      one backup, named by its start time (UTC, microseconds);
                                   catalogs of format 1 named them hotcopy_<kind>_<sec>_<usec>
    MANIFEST.json                  what the backup holds; absent = a run that never finished
    <prefix>.hc                    full copy: a standalone main file
    <prefix>.hc-delta              delta: main-file bytes [start, end) after its base
```

A backup is *complete* when it holds every prefix it set out to copy, else *partial* (a prefix
failed, the run was interrupted, or prune trimmed it to the links other backups need). A delta
names the backup it continues (``base``); a chain is followed only while every link matches the
one before it (same repository, main file id and salt, ``start`` equal to the base's ``end``).

Everything in a catalog is checked before it is used, here and nowhere else: the marker and
every manifest field by type and range (an error names the backup and the field), a piece must
be its prefix's own file in its own backup's directory, a base must be an older backup of this
catalog, every backup must be of this catalog's repository or of one its lineage records, a
backup directory that is a symbolic link and any file that is not a regular one are refused.
Manifests carry a SHA-256 of their content, which finds damage; with a key, an HMAC-SHA256
instead and a SHA-256 of every piece, which a writer of the catalog without the key cannot
forge.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hotcopy.storage import StorageError
from hotcopy.storage._copy import BaseRef, Piece
from hotcopy.storage._durable import is_temp_name
from hotcopy.storage._files import open_regular, read_regular
from hotcopy.storage._format import HEADER_SIZE
from hotcopy.storage._repository import MARKER as REPOSITORY_MARKER

from ._errors import BackupError, BackupNotFound, BackupUnreadable, CatalogError
from ._places import (
    CATALOG_MARKER,
    LOCK,
    MANIFEST,
    REPLICATOR_LOCK,
    LockWait,
    Place,
    is_own_file,
    is_piece_name,
    is_prefix_name,
    open_place,
)

__all__ = ["CATALOG_MARKER", "MANIFEST", "LockWait", "is_own_file", "is_piece_name"]
CATALOG_FORMAT = 2  # format 1 (no lineage, no checksum of its own) is still read
MANIFEST_FORMAT = 2  # format 1 (no "planned", "complete" despite failures) is still read
KEY_ENV = "HOTCOPY_BACKUP_KEY_FILE"
MIN_KEY_BYTES = 16
_MAX_JSON = 256 << 20  # a manifest of 16,384 prefixes is ~10 MiB

_ID = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_OLD_ID = re.compile(r"hotcopy_(?:backup|delta)_(\d{1,11})_(\d{6})")
_REPOSITORY_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DURATION = re.compile(r"(?:(\d+)([smhdw]))+")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ID_FORMAT = "%Y%m%dT%H%M%S.%fZ"


# -- ids, times, durations ------------------------------------------------------------------------


def is_backup_id(name: object) -> bool:
    return isinstance(name, str) and (_ID.fullmatch(name) or _OLD_ID.fullmatch(name)) is not None


@functools.lru_cache(maxsize=65536)  # every delta names its base: ids repeat
def backup_time_us(backup_id: str) -> int:
    """Microseconds since the epoch (UTC) at which the backup ``backup_id`` started."""
    if _ID.fullmatch(backup_id):
        moment = datetime.strptime(backup_id, _ID_FORMAT).replace(tzinfo=UTC)
        return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    match = _OLD_ID.fullmatch(backup_id)
    if match is None:
        raise CatalogError(f"{backup_id!r} is not a backup id (e.g. 20261204T163000.123456Z)")
    return int(match.group(1)) * 1_000_000 + int(match.group(2))


def new_backup_id(time_us: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=time_us)
    return moment.strftime(_ID_FORMAT)


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``15m``, ``36h``, ``7d``, ``2w``, or sums like ``1d12h``."""
    if _DURATION.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 36h, 7d, 2w, 1d12h)")
    return float(sum(int(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(text)))


def parse_moment(text: str, now: float) -> float:
    """Unix time of ``text``: an ISO 8601 time (without a zone: local time) or a duration ago."""
    with contextlib.suppress(ValueError):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CatalogError(
            f"--at {text!r} is neither a backup id, 'latest', a duration ago (2h, 7d) nor an "
            "ISO time (2026-11-22T07:30:00, local time unless it has a zone)"
        ) from None
    return moment.timestamp()  # a naive datetime is local time


# -- the key --------------------------------------------------------------------------------------


def load_key(key_file: str | os.PathLike[str] | None) -> bytes | None:
    """The catalog key in ``key_file``, or in the file ``$HOTCOPY_BACKUP_KEY_FILE`` names; None
    when neither is given (the catalog is then checksummed, not authenticated)."""
    path = key_file if key_file is not None else os.environ.get(KEY_ENV) or None
    if path is None:
        return None
    try:
        key = read_regular(path, limit=1 << 16)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, StorageError) as err:
        raise CatalogError(f"cannot read the backup key file {path}: {err}") from err
    if mode & 0o027:
        # A key others can read authenticates nothing; one others can write, they choose.
        raise CatalogError(
            f"the backup key file {path} is mode {mode:04o}: others can read or change it; "
            f"make it private (chmod 600 {path}, or 640 to share it with its group)"
        )
    if len(key) < MIN_KEY_BYTES:
        raise CatalogError(
            f"the backup key file {path} holds {len(key)} bytes; a key is at least "
            f"{MIN_KEY_BYTES} (make one with: head -c 32 /dev/urandom > {path})"
        )
    return key


def _canonical(body: Mapping[str, Any]) -> bytes:
    content = {key: value for key, value in body.items() if key not in ("checksum", "hmac")}
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def _seal(body: dict[str, Any], key: bytes | None) -> bytes:
    """``body`` as stored: with the SHA-256 of its content, or with a key its HMAC-SHA256."""
    if key is None:
        body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    else:
        body["hmac"] = hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _check_seal(body: Mapping[str, Any], key: bytes | None, what: str, *, required: bool) -> None:
    if key is None:
        if "hmac" in body:
            raise CatalogError(
                f"{what} is authenticated with a key; give it with --key-file or {KEY_ENV}"
            )
        checksum = body.get("checksum")
        if checksum is None and not required:
            return
        if not isinstance(checksum, str) or not hmac.compare_digest(
            checksum, hashlib.sha256(_canonical(body)).hexdigest()
        ):
            raise CatalogError(f"{what} is damaged: checksum mismatch")
        return
    mac = body.get("hmac")
    if not isinstance(mac, str):
        raise CatalogError(
            f"{what} is not authenticated (no HMAC): written without a key (authenticated "
            "backups go into a new backup directory), or forged"
        )
    if not hmac.compare_digest(mac, hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()):
        raise CatalogError(f"{what} fails its authentication (HMAC): damaged or forged")


# -- validated fields -----------------------------------------------------------------------------


def _show(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


class _Fields:
    """The fields of one JSON object, each checked before it is used; an error names the
    object (``where``: a backup, a prefix of a backup, the marker) and the field."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise CatalogError(f"{where} is {_show(data)}, not a JSON object")
        self.data: dict[str, Any] = data
        self.where = where

    def bad(self, name: str, expected: str) -> CatalogError:
        value = self.data.get(name)
        return CatalogError(
            f"{self.where}: field {name!r} is {_show(value)}, not {expected}", field=name
        )

    def get(self, name: str) -> Any:
        if name not in self.data:
            raise CatalogError(f"{self.where}: field {name!r} is missing", field=name)
        return self.data[name]

    def integer(self, name: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
        value = self.get(name)
        if type(value) is not int or not low <= value <= high:
            raise self.bad(name, f"an integer in [{low}, {high}]")
        return value

    def boolean(self, name: str, default: bool | None = None) -> bool:
        value = self.data.get(name, default) if default is not None else self.get(name)
        if type(value) is not bool:
            raise self.bad(name, "true or false")
        return value

    def text(self, name: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        value = self.get(name)
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise self.bad(name, what or "a string")
        return value

    def moment(self, name: str) -> float:
        value = self.get(name)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise self.bad(name, "a time in seconds since 1970")
        return float(value)

    def names(self, name: str, default: object = None) -> list[str]:
        value = self.data.get(name, default) if default is not None else self.get(name)
        if not isinstance(value, list) or not all(is_prefix_name(item) for item in value):
            raise self.bad(name, "a list of prefix names")
        if value != sorted(set(value)):
            raise self.bad(name, "a sorted list without repeats")
        return value

    def texts_by_name(self, name: str, default: object = None) -> dict[str, str]:
        value = self.data.get(name, default) if default is not None else self.get(name)
        if not isinstance(value, dict) or not all(
            is_prefix_name(key) and isinstance(item, str) for key, item in value.items()
        ):
            raise self.bad(name, "an object of prefix names to messages")
        return value

    def objects_by_name(self, name: str) -> dict[str, Any]:
        value = self.get(name)
        if not isinstance(value, dict) or not all(is_prefix_name(key) for key in value):
            raise self.bad(name, "an object of prefix names to entries")
        return value


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise CatalogError(f"{what} is damaged: {err}") from None


# -- the marker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Succession:
    """A repository that stopped writing into the catalog: a restore of one of its backups
    (``restored_from``) created the repository that took over."""

    repository_id: str
    succeeded_by: str
    restored_from: str
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "repository_id": self.repository_id,
            "succeeded_by": self.succeeded_by,
            "restored_from": self.restored_from,
            "time": self.time,
        }


@dataclass(frozen=True)
class Marker:
    repository_id: str  # the repository that writes into the catalog now
    lineage: tuple[Succession, ...] = ()  # the ones before it, oldest first

    @property
    def repositories(self) -> frozenset[str]:
        """Every repository whose backups this catalog holds."""
        return frozenset({self.repository_id, *(s.repository_id for s in self.lineage)})

    def succession_of(self, repository_id: str) -> Succession | None:
        return next((s for s in self.lineage if s.repository_id == repository_id), None)


def _parse_marker(data: object, where: str) -> Marker:
    fields = _Fields(data, where)
    version = fields.get("format")
    if type(version) is not int or version not in (1, CATALOG_FORMAT):
        raise fields.bad("format", f"a catalog format this hotcopy reads (1 or {CATALOG_FORMAT})")
    repository_id = fields.text("repository_id", _REPOSITORY_ID, "a repository id (32 hex digits)")
    raw = fields.data.get("lineage", [])
    if not isinstance(raw, list):
        raise fields.bad("lineage", "a list of successions")
    lineage = []
    for number, item in enumerate(raw):
        entry = _Fields(item, f"{where}: lineage[{number}]")
        lineage.append(
            Succession(
                entry.text("repository_id", _REPOSITORY_ID, "a repository id"),
                entry.text("succeeded_by", _REPOSITORY_ID, "a repository id"),
                entry.text("restored_from", _ID_OR_OLD, "a backup id"),
                entry.moment("time"),
            )
        )
    return Marker(repository_id, tuple(lineage))


_ID_OR_OLD = re.compile(f"{_ID.pattern}|{_OLD_ID.pattern}")


def _write_marker(place: Place, marker: Marker, key: bytes | None, *, overwrite: bool) -> bool:
    body = {
        "format": CATALOG_FORMAT,
        "repository_id": marker.repository_id,
        "lineage": [succession.to_json() for succession in marker.lineage],
    }
    return place.write(CATALOG_MARKER, _seal(body, key), create_only=not overwrite)


# -- manifests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One prefix in one backup."""

    kind: str  # "full" or "delta"
    file: str  # name within the backup's directory
    base: str | None  # for a delta: the backup id it continues
    file_id: str  # of the source main file
    salt: int  # of the source main file
    start: int  # byte range [start, end) of the source main file this entry holds
    end: int
    seq: int  # commit at ``end``
    size: int  # bytes of ``file``
    crc32: int  # of ``file``
    boundary_crc: int  # of the source bytes [end - 32, end): lets the next delta continue
    sha256: str | None = None  # of ``file``, in an authenticated (keyed) catalog
    stored: int | None = None  # bytes as its place stores it, when not ``size`` (sealed)

    def base_ref(self) -> BaseRef:
        return BaseRef(self.file_id, self.salt, self.end, self.boundary_crc)

    def to_json(self) -> dict[str, Any]:
        data = {
            "kind": self.kind,
            "file": self.file,
            "base": self.base,
            "file_id": self.file_id,
            "salt": self.salt,
            "start": self.start,
            "end": self.end,
            "seq": self.seq,
            "size": self.size,
            "crc32": self.crc32,
            "boundary_crc": self.boundary_crc,
        }
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        if self.stored is not None:
            data["stored"] = self.stored
        return data


def piece_name(prefix: str, kind: str) -> str:
    return f"{prefix}.hc" if kind == "full" else f"{prefix}.hc-delta"


@dataclass
class Manifest:
    id: str
    created: float  # unix time the backup started
    repository_id: str
    planned: list[str]  # every prefix the run set out to copy
    consistent: bool = False  # all prefixes cut at one instant (--consistent)
    interrupted: bool = False
    entries: dict[str, Entry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # prefix -> why it was not copied
    pruned: dict[str, str] = field(default_factory=dict)  # prefix -> why prune removed it

    @property
    def complete(self) -> bool:
        """Whether it holds every prefix it set out to copy (only then is it restorable whole)."""
        return (
            not self.interrupted
            and not self.failed
            and not self.pruned
            and set(self.entries) == set(self.planned)
        )

    @property
    def missing(self) -> dict[str, str]:
        """Prefixes it set out to copy and does not hold, with the reason."""
        reasons = {**self.failed, **self.pruned}
        return {
            name: reasons.get(name, "not reached: the run was interrupted")
            for name in self.planned
            if name not in self.entries
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "id": self.id,
            "created": self.created,
            "created_iso": iso_utc(self.created),
            "repository_id": self.repository_id,
            "complete": self.complete,
            "consistent": self.consistent,
            "interrupted": self.interrupted,
            "planned": sorted(self.planned),
            "prefixes": {name: self.entries[name].to_json() for name in sorted(self.entries)},
            "failed": dict(sorted(self.failed.items())),
            "pruned": dict(sorted(self.pruned.items())),
        }


def _parse_entry(data: object, backup_id: str, prefix: str, *, keyed: bool) -> Entry:
    fields = _Fields(data, f"backup {backup_id}, prefix {prefix!r}")
    kind = fields.get("kind")
    if kind not in ("full", "delta"):
        raise fields.bad("kind", "'full' or 'delta'")
    expected = piece_name(prefix, kind)
    if fields.get("file") != expected:
        raise fields.bad(
            "file", f"{expected!r} (a piece is its prefix's own file in its backup's directory)"
        )
    base = fields.get("base")
    if kind == "full" and base is not None:
        raise fields.bad("base", "null (a full copy continues nothing)")
    if kind == "delta" and (
        not is_backup_id(base) or backup_time_us(base) >= backup_time_us(backup_id)
    ):
        raise fields.bad("base", "the id of an earlier backup of this catalog")
    start = fields.integer("start", 0 if kind == "full" else HEADER_SIZE)
    if kind == "full" and start != 0:
        raise fields.bad("start", "0 (a full copy starts at the beginning)")
    end = fields.integer("end", max(start, HEADER_SIZE))
    size = fields.integer("size")
    if size != end - start:
        raise fields.bad("size", f"end - start = {end - start}")
    sha256 = fields.data.get("sha256")
    if (keyed or sha256 is not None) and (
        not isinstance(sha256, str) or not _SHA256.fullmatch(sha256)
    ):
        raise fields.bad("sha256", "a SHA-256 in hex (64 digits)")
    return Entry(
        kind=kind,
        file=expected,
        base=base,
        file_id=fields.text("file_id", _REPOSITORY_ID, "a file id (32 hex digits)"),
        salt=fields.integer("salt", 0, (1 << 64) - 1),
        start=start,
        end=end,
        seq=fields.integer("seq"),
        size=size,
        crc32=fields.integer("crc32", 0, 0xFFFFFFFF),
        boundary_crc=fields.integer("boundary_crc", 0, 0xFFFFFFFF),
        sha256=sha256,
        stored=fields.integer("stored") if "stored" in fields.data else None,
    )


def _parse_manifest(data: object, backup_id: str, *, keyed: bool) -> Manifest:
    fields = _Fields(data, f"backup {backup_id}")
    version = fields.get("format")
    if type(version) is not int or version not in (1, MANIFEST_FORMAT):
        raise fields.bad("format", f"a manifest format this hotcopy reads (1 or {MANIFEST_FORMAT})")
    if fields.get("id") != backup_id:
        raise fields.bad("id", f"{backup_id!r}, the name of its directory (a copied backup?)")
    raw_entries = fields.objects_by_name("prefixes")
    entries = {
        name: _parse_entry(raw, backup_id, name, keyed=keyed)
        for name, raw in sorted(raw_entries.items())
    }
    failed = fields.texts_by_name("failed", {} if version == 1 else None)
    complete = fields.boolean("complete")
    interrupted = fields.boolean("interrupted", False if version == 1 else None)
    if version == 1:
        # Format 1 wrote neither what it set out to copy nor "partial": a run that lost a
        # prefix was recorded as complete. Read as what it is.
        planned = sorted({*entries, *failed})
        pruned: dict[str, str] = {}
        if not complete:
            interrupted = True
    else:
        planned = fields.names("planned")
        pruned = fields.texts_by_name("pruned")
    manifest = Manifest(
        id=backup_id,
        created=fields.moment("created"),
        repository_id=fields.text("repository_id", _REPOSITORY_ID, "a repository id"),
        planned=planned,
        consistent=fields.boolean("consistent", False if version == 1 else None),
        interrupted=interrupted,
        entries=entries,
        failed=failed,
        pruned=pruned,
    )
    if not set(entries) | set(failed) | set(pruned) <= set(planned):
        raise fields.bad("planned", "every prefix the backup holds, failed or pruned")
    if version != 1 and complete != manifest.complete:
        raise fields.bad("complete", f"{str(manifest.complete).lower()}, as its prefixes say")
    return manifest


# -- the catalog ----------------------------------------------------------------------------------


class Catalog:
    """The backups of one repository (and its lineage) at ``location``.

    Args:
        location: The catalog: a directory, or ``s3://BUCKET/PATH``.
        key_file: The key of an authenticated catalog (default: ``$HOTCOPY_BACKUP_KEY_FILE``).
        key: The key itself, already loaded (overrides ``key_file``).
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | Place,
        *,
        key_file: str | os.PathLike[str] | None = None,
        key: bytes | None = None,
    ) -> None:
        self.key = key if key is not None else load_key(key_file)
        if isinstance(location, str | os.PathLike):
            location = open_place(location, key=self.key)
        self.place = location
        self.where = self.place.where
        self.marker = self._read_marker()

    @property
    def repository_id(self) -> str:
        return self.marker.repository_id

    def refresh(self) -> None:
        """Read the marker again (another process may have admitted a successor)."""
        self.marker = self._read_marker()

    def _read_marker(self) -> Marker:
        where = f"{self.where}/{CATALOG_MARKER}"
        raw = self.place.read(CATALOG_MARKER, where, _MAX_JSON)
        if raw is None:
            advice = "" if self.place.exists() else "; back up into it first (`hotcopy backup`)"
            raise CatalogError(
                f"{self.where} is not a hotcopy backup directory (no {CATALOG_MARKER}){advice}",
                path=self.where,
            )
        data = _parse_json(raw, where)
        marker = _parse_marker(data, where)
        _check_seal(data, self.key, where, required=data.get("format") != 1)
        return marker

    @classmethod
    def create(
        cls,
        location: str | os.PathLike[str],
        repository_id: str,
        *,
        key_file: str | os.PathLike[str] | None = None,
        key: bytes | None = None,
        compress: bool = False,
    ) -> Catalog:
        """Open the catalog at ``location``, creating it for ``repository_id`` if there is
        none. Whether that repository may write here is decided by :meth:`admit`.
        ``compress``: an object catalog's objects are written zstd-compressed."""
        key = key if key is not None else load_key(key_file)
        place = open_place(location, create=True, key=key, compress=compress)
        if place.read(CATALOG_MARKER, CATALOG_MARKER, _MAX_JSON) is None:
            if place.read(REPOSITORY_MARKER, REPOSITORY_MARKER, _MAX_JSON) is not None:
                raise CatalogError(
                    f"{place.where} is a hotcopy repository, not a backup directory: back up "
                    "into a directory of its own (a catalog there would mix with its files)",
                    path=place.where,
                )
            others = sorted(
                name
                for name in place.top_names()
                if name not in (LOCK, REPLICATOR_LOCK, "lost+found")  # (a new disk's)
                and not (name.startswith(CATALOG_MARKER) and is_temp_name(name))  # a racing run's
            )
            if others and place.read(CATALOG_MARKER, CATALOG_MARKER, _MAX_JSON) is None:
                backups = any(map(is_backup_id, others))
                lost = " (backups, but its marker is gone)" if backups else ""
                raise CatalogError(
                    f"{place.where} is not empty and not a hotcopy backup directory{lost}: it "
                    f"holds {others[0]!a}{' and more' if len(others) > 1 else ''}; back up into "
                    "an empty or new directory",
                    path=place.where,
                )
            # create-only: another run may have made it meanwhile
            _write_marker(place, Marker(repository_id), key, overwrite=False)
        return cls(place, key=key)

    def admit(
        self, repository_id: str, lineage: Mapping[str, Any] | None, now: float
    ) -> str | None:
        """Let ``repository_id`` write here, or refuse; the caller holds :meth:`locked`.

        The catalog's own repository may. So may a repository restored from one of its backups
        (``lineage["restored_from"]``), which takes the catalog over: from then on the
        repository it came from is refused, so two live repositories never write into one
        catalog. Returns a note when the catalog was taken over.
        """
        self.marker = self._read_marker()  # as it is now, under the lock
        marker = self.marker
        if repository_id == marker.repository_id:
            return None
        superseded = marker.succession_of(repository_id)
        if superseded is not None:
            raise CatalogError(
                f"repository {repository_id} was superseded in {self.where} by repository "
                f"{superseded.succeeded_by} (restored from its backup {superseded.restored_from} "
                f"on {iso_utc(superseded.time)}); its backups would mix with that one's: "
                "back it up into another directory",
                path=self.where,
            )
        source = lineage.get("restored_from") if isinstance(lineage, Mapping) else None
        origin = source.get("repository_id") if isinstance(source, Mapping) else None
        backup_id = source.get("backup") if isinstance(source, Mapping) else None
        if origin == marker.repository_id and is_backup_id(backup_id):
            assert isinstance(backup_id, str)
            succession = Succession(marker.repository_id, repository_id, backup_id, now)
            self.marker = Marker(repository_id, (*marker.lineage, succession))
            _write_marker(self.place, self.marker, self.key, overwrite=True)
            return (
                f"repository {repository_id} (restored from backup {backup_id}) takes over "
                f"this catalog from repository {marker.repository_id}, which can no longer "
                "back up here"
            )
        if isinstance(origin, str) and marker.succession_of(origin) is not None:
            raise CatalogError(
                f"repository {repository_id} was restored from a backup of repository {origin}, "
                f"which repository {marker.succession_of(origin).succeeded_by} "  # type: ignore[union-attr]
                f"has since superseded in {self.where}; back it up into another directory",
                path=self.where,
            )
        raise CatalogError(
            f"{self.where} holds backups of repository {marker.repository_id}, not "
            f"{repository_id}; use another backup directory",
            path=self.where,
        )

    @contextlib.contextmanager
    def locked(self, acquire: LockWait | None = None) -> Iterator[float]:
        """Hold the catalog lock (one backup run or prune at a time); yields the seconds spent
        waiting for it.

        ``acquire`` takes a directory's lock on the caller's terms (a timeout, a notice naming
        the holder: the command line's ``--timeout``); by default it is waited for without end.
        """
        asked = time.monotonic()
        with self.place.locked(acquire):
            yield time.monotonic() - asked

    # -- backups in their place ---------------------------------------------------------------

    def backup_ids(self) -> list[str]:
        """Every entry named like a backup (finished or not, valid or not), oldest first."""
        ids = [name for name in self.place.top_names() if is_backup_id(name)]
        return sorted(ids, key=lambda backup_id: (backup_time_us(backup_id), backup_id))

    def location_of(self, backup_id: str) -> str:
        return f"{self.where}/{backup_id}"

    def new_backup(self, moment: float) -> tuple[str, Path]:
        """A fresh backup named by ``moment`` (unix time), made unique, and the local directory
        its pieces are copied into (see :meth:`publish`)."""
        time_us = round(moment * 1_000_000)
        while True:
            backup_id = new_backup_id(time_us)
            staging = self.place.new_backup(backup_id)
            if staging is not None:
                return backup_id, staging
            time_us += 1

    def ship(self, backup_id: str, staging: Path, piece: str) -> None:
        """Store the piece ``piece`` of ``staging`` now if the place gains from it (see
        :meth:`publish`, which stores the rest)."""
        self.place.ship(backup_id, staging, piece)

    def publish(self, backup_id: str, staging: Path) -> dict[str, int]:
        """Make the pieces copied into ``staging`` durable in the catalog: before any manifest
        names them. Returns the size each piece is stored at, where that is not its own."""
        return self.place.publish(backup_id, staging)

    def discard(self, backup_id: str, staging: Path) -> None:
        """Remove what a run that failed wrote."""
        self.place.discard(backup_id, staging)

    def write_manifest(self, manifest: Manifest) -> None:
        """Write (or replace) the manifest of a backup, sealed (with the key, authenticated)."""
        self.place.check_backup(manifest.id)
        self.place.write(f"{manifest.id}/{MANIFEST}", _seal(manifest.to_json(), self.key))

    def load(self, backup_id: str) -> Manifest:
        """The manifest of ``backup_id``, every field checked.

        Raises:
            BackupNotFound: No such backup, or it has no manifest (a run that never finished).
            CatalogError: Its place or manifest is not usable (the message says why).
        """
        if not is_backup_id(backup_id):
            raise CatalogError(f"{backup_id!r} is not a backup id (e.g. 20261204T163000.123456Z)")
        self.place.check_backup(backup_id)
        what = f"manifest of backup {backup_id}"
        raw = self.place.read(f"{backup_id}/{MANIFEST}", what, _MAX_JSON)
        if raw is None:
            raise BackupNotFound(
                f"backup {backup_id} has no manifest (a run that never finished)", backup=backup_id
            )
        data = _parse_json(raw, what)
        manifest = _parse_manifest(data, backup_id, keyed=self.key is not None)
        _check_seal(data, self.key, what, required=True)
        if manifest.repository_id not in self.marker.repositories:
            raise CatalogError(
                f"backup {backup_id}: field 'repository_id' names repository "
                f"{manifest.repository_id}, whose backups this catalog does not hold (it holds "
                f"{', '.join(sorted(self.marker.repositories))})",
                field="repository_id",
            )
        return manifest

    def scan(self) -> CatalogView:
        """Every backup as it is now, loaded once."""
        return CatalogView(self)

    def manifests(self) -> list[Manifest]:
        """Complete backups with a valid manifest, oldest first."""
        return [m for m in self.scan().manifests() if m.complete]

    def chain(self, manifest: Manifest | str, prefix: str) -> list[tuple[Manifest, Entry]]:
        backup_id = manifest if isinstance(manifest, str) else manifest.id
        return self.scan().chain(backup_id, prefix)

    def pick(
        self,
        at: str | None,
        *,
        clock: Callable[[], float] | None = None,
        allow_partial: bool = False,
    ) -> Manifest:
        return self.scan().pick(at, clock=clock, allow_partial=allow_partial).manifest

    def verify(self) -> list[str]:
        """Every problem found (every piece's checksum read); empty when sound."""
        return self.scan().check(checksums=True).problems

    def sweep_abandoned(self) -> list[str]:
        """Remove the temps that killed runs left in their unfinished backups.

        Only temps whose writer process is dead go; the caller holds :meth:`locked`, so no run
        of its own is writing there. (The unfinished backups themselves go at the next prune.)
        """
        return self.place.sweep_abandoned(self.backup_ids())


def list_backups(
    dest_dir: str | os.PathLike[str],
    *,
    verify: bool = False,
    key_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Every backup of the catalog ``dest_dir``, oldest first, as ``hotcopy backups --json``
    prints it: whether each is restorable is judged from the manifests and the pieces' sizes,
    with ``verify`` from every byte."""
    return Catalog(dest_dir, key_file=key_file).scan().listing(checksums=verify)


# -- the catalog as it is now ---------------------------------------------------------------------

COMPLETE, PARTIAL, UNFINISHED, INVALID = "complete", "partial", "unfinished", "invalid"


@dataclass
class Record:
    """One backup-named entry of the catalog."""

    id: str
    time_us: int
    status: str  # COMPLETE, PARTIAL, UNFINISHED (no manifest) or INVALID (refused)
    manifest: Manifest | None = None
    problem: str | None = None  # why an UNFINISHED or INVALID one cannot be used
    foreign: bool = False  # a symbolic link or not a directory: not hotcopy's
    unreadable: bool = False  # this user may not read it (another's): unknown, so untouched

    @property
    def time(self) -> float:
        return self.time_us / 1_000_000


@dataclass
class Choice:
    manifest: Manifest
    passed_over: list[str]  # newer backups not taken, and why


@dataclass
class Check:
    problems: list[str]  # damage: what cannot be restored that should be
    notes: list[str]  # not damage: unfinished runs, partial backups
    counts: dict[str, int]  # backups by status
    restorable: int  # complete backups that restore as a whole


class CatalogView:
    """Every backup of a catalog, loaded once, with chains and pieces checked on demand
    (each at most once)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.records: dict[str, Record] = {}
        for backup_id in catalog.backup_ids():
            self.records[backup_id] = self._record(backup_id)
        self._chains: dict[tuple[str, str], list[tuple[Manifest, Entry]] | CatalogError] = {}
        self._pieces: dict[tuple[str, str, bool], str | None] = {}

    def _record(self, backup_id: str) -> Record:
        time_us = backup_time_us(backup_id)
        try:
            manifest = self.catalog.load(backup_id)
        except BackupNotFound as err:
            return Record(backup_id, time_us, UNFINISHED, problem=str(err))
        except BackupUnreadable as err:
            return Record(backup_id, time_us, INVALID, problem=str(err), unreadable=True)
        except CatalogError as err:
            foreign = self.catalog.place.is_foreign(backup_id)
            return Record(backup_id, time_us, INVALID, problem=str(err), foreign=foreign)
        status = COMPLETE if manifest.complete else PARTIAL
        return Record(backup_id, time_us, status, manifest)

    def ordered(self) -> list[Record]:
        return list(self.records.values())

    def manifests(self) -> list[Manifest]:
        """Every valid manifest (complete or partial), oldest first."""
        return [r.manifest for r in self.records.values() if r.manifest is not None]

    def manifest(self, backup_id: str) -> Manifest:
        record = self.records.get(backup_id)
        if record is None:
            raise BackupNotFound(f"no backup {backup_id} in {self.catalog.where}", backup=backup_id)
        if record.manifest is None:
            assert record.problem is not None
            if record.status == UNFINISHED:
                raise BackupNotFound(record.problem, backup=backup_id)
            raise CatalogError(record.problem, backup=backup_id)
        return record.manifest

    # -- chains and pieces --------------------------------------------------------------------

    def chain(self, backup_id: str, prefix: str) -> list[tuple[Manifest, Entry]]:
        """The full copy and every delta leading to ``prefix`` in ``backup_id``, oldest first.

        Raises:
            CatalogError: A link is missing, invalid or does not continue the one before it.
        """
        key = (backup_id, prefix)
        if key not in self._chains:
            try:
                self._chains[key] = self._chain(backup_id, prefix)
            except CatalogError as err:
                self._chains[key] = err
        found = self._chains[key]
        if isinstance(found, CatalogError):
            raise found
        return found

    def _chain(self, backup_id: str, prefix: str) -> list[tuple[Manifest, Entry]]:
        manifest = self.manifest(backup_id)
        entry = manifest.entries.get(prefix)
        if entry is None:
            raise BackupNotFound(
                f"backup {backup_id} does not hold prefix {prefix!r}", prefix=prefix
            )
        if entry.kind == "full":
            return [(manifest, entry)]
        assert entry.base is not None
        try:
            base = self.manifest(entry.base)
        except CatalogError as err:
            raise CatalogError(
                f"backup {backup_id}, prefix {prefix!r}: its base {entry.base} is not usable: "
                f"{err}",
                prefix=prefix,
            ) from None
        below = base.entries.get(prefix)
        if (
            below is None
            or base.repository_id != manifest.repository_id
            or (below.file_id, below.salt, below.end) != (entry.file_id, entry.salt, entry.start)
        ):
            raise CatalogError(
                f"backup {backup_id}, prefix {prefix!r}: the chain is broken at its base "
                f"{entry.base}, which does not end where the delta starts",
                prefix=prefix,
            )
        return [*self.chain(entry.base, prefix), (manifest, entry)]

    def piece_problem(self, manifest: Manifest, entry: Entry, *, checksums: bool) -> str | None:
        """Why the piece of ``entry`` is not the one recorded, or None. Without ``checksums``
        only that it is a regular file of the recorded size."""
        key = (manifest.id, entry.file, checksums)
        if key not in self._pieces:
            self._pieces[key] = self.catalog.place.piece_problem(
                manifest.id, entry, checksums=checksums, key=self.catalog.key
            )
        return self._pieces[key]

    def check_chain(self, backup_id: str, prefix: str, *, checksums: bool) -> str | None:
        """Why ``prefix`` of ``backup_id`` does not restore (from the manifests and each
        link's size; with ``checksums``, every byte), or None."""
        try:
            links = self.chain(backup_id, prefix)
        except CatalogError as err:
            return str(err)
        for manifest, entry in links:
            problem = self.piece_problem(manifest, entry, checksums=checksums)
            if problem is not None:
                return f"{manifest.id}/{entry.file}: {problem}"
        return None

    def restorable_problem(self, backup_id: str, *, checksums: bool = False) -> str | None:
        """Why backup ``backup_id`` does not restore (what it holds), or None."""
        try:
            manifest = self.manifest(backup_id)
        except CatalogError as err:
            return str(err)
        for prefix in sorted(manifest.entries):
            problem = self.check_chain(backup_id, prefix, checksums=checksums)
            if problem is not None:
                return f"prefix {prefix!r}: {problem}"
        return None

    def pieces(
        self, backup_id: str, prefix: str, *, checksums: bool, scratch: Path | None = None
    ) -> list[Piece]:
        """The pieces that rebuild ``prefix`` of ``backup_id``, as local files, each checked
        to be there with its size; with ``checksums``, each carries its SHA-256, which the
        restore checks on the descriptor it copies from (``restore_chain``), so the bytes
        checked are the bytes restored, whatever is put in a piece's place meanwhile. The
        pieces of a catalog that is not local are downloaded into ``scratch`` first.

        Raises:
            CatalogError: A link is missing or not the one recorded.
        """
        links = self.chain(backup_id, prefix)
        for manifest, entry in links:
            problem = self.piece_problem(manifest, entry, checksums=False)
            if problem is not None:
                raise CatalogError(
                    f"backup {backup_id}, prefix {prefix!r}: {manifest.id}/{entry.file}: {problem}",
                    prefix=prefix,
                )
        names = [f"{manifest.id}/{entry.file}" for manifest, entry in links]
        sizes = {name: entry.size for name, (_, entry) in zip(names, links, strict=True)}
        place = self.catalog.place
        if not place.local and scratch is None:
            raise CatalogError(f"the pieces of {self.catalog.where} must be fetched to be read")
        local = place.fetch(sizes, scratch or Path())
        return [
            Piece(local[name], entry.size, entry.crc32, entry.sha256 if checksums else None)
            for name, (_, entry) in zip(names, links, strict=True)
        ]

    def depends_on(self, backup_id: str) -> list[str]:
        """Every backup whose pieces ``backup_id`` needs (following bases as far as they go;
        a base is always older, so every walk ends)."""
        found: set[str] = set()
        manifest = self.records[backup_id].manifest
        for prefix, entry in manifest.entries.items() if manifest else ():
            base = entry.base
            while base is not None:
                found.add(base)
                record = self.records.get(base)
                below = record.manifest.entries.get(prefix) if record and record.manifest else None
                base = below.base if below is not None else None
        return sorted(found, key=lambda i: (backup_time_us(i), i))

    # -- choosing a backup --------------------------------------------------------------------

    def newest_restorable(self, before_us: int | None = None) -> Choice:
        passed: list[str] = []
        for record in reversed(self.ordered()):
            if before_us is not None and record.time_us > before_us:
                continue
            if record.status != COMPLETE:
                if record.status != UNFINISHED:
                    why = record.problem or "partial, without " + ", ".join(
                        sorted(record.manifest.missing if record.manifest else ())
                    )
                    passed.append(f"{record.id}: {why}")
                continue
            problem = self.restorable_problem(record.id)
            if problem is None:
                assert record.manifest is not None
                return Choice(record.manifest, passed)
            passed.append(f"{record.id}: not restorable: {problem}")
        when = "" if before_us is None else f" at or before {iso_utc(before_us / 1e6)}"
        raise BackupNotFound(
            f"no complete, restorable backup{when} in {self.catalog.where}"
            + (f" (passed over {'; '.join(passed[:3])})" if passed else "")
        )

    def pick(
        self,
        at: str | None,
        *,
        clock: Callable[[], float] | None = None,
        allow_partial: bool = False,
    ) -> Choice:
        """The backup ``at`` names: an id, ``latest`` (also None), an ISO time or a duration
        ago (the newest complete, restorable backup at or before it).

        A partial backup is taken only by its id and with ``allow_partial``.
        """
        if at is None or at == "latest":
            return self.newest_restorable()
        if is_backup_id(at):
            manifest = self.manifest(at)
            if not manifest.complete and not allow_partial:
                missing = "; ".join(f"{n} ({why})" for n, why in manifest.missing.items())
                raise BackupError(
                    f"backup {at} is partial: it does not hold {missing}; restore what it holds "
                    "with --allow-partial",
                    backup=at,
                )
            problem = self.restorable_problem(at)
            if problem is not None:
                raise CatalogError(f"backup {at} is not restorable: {problem}", backup=at)
            return Choice(manifest, [])
        moment = parse_moment(at, (clock or _wall_clock)())
        return self.newest_restorable(before_us=math.floor(moment * 1_000_000))

    # -- checking and listing -----------------------------------------------------------------

    def check(self, *, checksums: bool) -> Check:
        """Every problem: invalid manifests, pieces not as recorded, broken chains, and every
        complete backup that does not restore whole because of a link below it."""
        problems: list[str] = []
        notes: list[str] = []
        counts = dict.fromkeys((COMPLETE, PARTIAL, UNFINISHED, INVALID), 0)
        restorable = 0
        for record in self.ordered():
            counts[record.status] += 1
            if record.status == UNFINISHED:
                notes.append(
                    f"{record.id}: a run that never finished (no manifest); prune removes it"
                )
                continue
            if record.unreadable:
                notes.append(f"{record.id}: {record.problem}; not checked, never pruned")
                continue
            if record.manifest is None:
                problems.append(f"{record.id}: {record.problem}")
                continue
            manifest = record.manifest
            damaged = False
            for prefix, entry in sorted(manifest.entries.items()):
                problem = self.piece_problem(manifest, entry, checksums=checksums)
                if problem is not None:
                    problems.append(f"{record.id}/{entry.file}: {problem}")
                    damaged = True
                try:
                    self.chain(record.id, prefix)
                except CatalogError as err:
                    problems.append(f"{record.id}: {err}")
                    damaged = True
            if record.status == PARTIAL:
                missing = ", ".join(sorted(manifest.missing))
                notes.append(f"{record.id}: partial, without {missing}; never restored by default")
                continue
            below = None if damaged else self.restorable_problem(record.id, checksums=checksums)
            if below is not None:
                problems.append(f"{record.id}: not restorable: {below}")
            elif not damaged:
                restorable += 1
        if checksums:
            from ._replica_log import log_problems  # a replica's log is read on top of it

            problems += log_problems(self)
        return Check(problems, notes, counts, restorable)

    def listing(self, *, checksums: bool = False) -> dict[str, Any]:
        """The catalog as ``hotcopy backups --json`` prints it (schema version 1, README)."""
        marker = self.catalog.marker
        rows = []
        for record in self.ordered():
            manifest = record.manifest
            problem = record.problem
            if manifest is not None:
                problem = self.restorable_problem(record.id, checksums=checksums)
            kinds = [entry.kind for entry in manifest.entries.values()] if manifest else []
            rows.append(
                {
                    "id": record.id,
                    "time": iso_utc(record.time),
                    "status": record.status,
                    "consistent": bool(manifest and manifest.consistent),
                    "repository_id": manifest.repository_id if manifest else None,
                    "prefixes": len(kinds),
                    "full": kinds.count("full"),
                    "delta": kinds.count("delta"),
                    "missing": dict(manifest.missing) if manifest else {},
                    "bytes": sum(e.size for e in manifest.entries.values()) if manifest else 0,
                    "depends_on": self.depends_on(record.id),
                    "restorable": manifest is not None and problem is None,
                    "problem": problem,
                }
            )
        return {
            "version": 1,
            "catalog": self.catalog.where,
            "repository_id": marker.repository_id,
            "lineage": [
                {**succession.to_json(), "time": iso_utc(succession.time)}
                for succession in marker.lineage
            ],
            "backups": rows,
        }


def _wall_clock() -> float:
    return datetime.now(UTC).timestamp()


def sha256_of(path: Path) -> str:
    """SHA-256 of the regular file ``path``, in hex."""
    digest = hashlib.sha256()
    fd = open_regular(path)
    try:
        while chunk := os.read(fd, 4 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
