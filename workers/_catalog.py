"""The backup catalog: a directory of backups, each with a manifest written last, atomically.

```
DEST/hotcopy-backups.json                 marker: format, the repository these backups are of
DEST/catalog.lock                         held by a backup run or a prune (filelock)
DEST/hotcopy_backup_<sec>_<usec>/         a backup whose prefixes are all full copies
DEST/hotcopy_delta_<sec>_<usec>/          an incremental backup (deltas where possible)
    MANIFEST.json                         what the backup holds; absent = never finished
    <prefix>.hc                           full copy: a standalone main file
    <prefix>.hc-delta                     delta: main-file bytes [start, end) after its base
```

A backup is usable only once its manifest says ``"complete": true``; a directory without a
manifest is a run that died (swept by prune). A delta names the backup it continues
(``base``); a chain is followed only while every link matches the previous one exactly (same
main file id and salt, ``start`` equal to the base's ``end``), so a stale delta or one from
another chain is never applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from hotcopy.storage._copy import BaseRef, Piece
from hotcopy.storage._durable import fsync_dir, sweep_stale_temps, write_durably
from hotcopy.storage._files import make_directory, open_regular, refuse_unsafe_place

from ._errors import BackupNotFound, CatalogError

CATALOG_MARKER = "hotcopy-backups.json"
MANIFEST = "MANIFEST.json"
CATALOG_FORMAT = 1
_ID = re.compile(r"hotcopy_(backup|delta)_(\d+)_(\d{6})")


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

    def base_ref(self) -> BaseRef:
        return BaseRef(self.file_id, self.salt, self.end, self.boundary_crc)


@dataclass
class Manifest:
    id: str
    created: float  # unix time the backup started
    repository_id: str
    complete: bool
    consistent: bool = False  # all prefixes cut at one instant (--consistent)
    interrupted: bool = False
    entries: dict[str, Entry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = CATALOG_FORMAT
        data["created_iso"] = datetime.fromtimestamp(self.created).astimezone().isoformat()
        data["prefixes"] = data.pop("entries")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != CATALOG_FORMAT:
            raise CatalogError(f"manifest format {data.get('format')!r} is not supported")
        return cls(
            id=data["id"],
            created=data["created"],
            repository_id=data["repository_id"],
            complete=data["complete"],
            consistent=data.get("consistent", False),
            interrupted=data.get("interrupted", False),
            entries={name: Entry(**entry) for name, entry in data["prefixes"].items()},
            failed=data.get("failed", {}),
        )


def _manifest_checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its checksum: any flipped byte shows."""
    content = {key: value for key, value in body.items() if key != "checksum"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def backup_time(backup_id: str) -> float:
    match = _ID.fullmatch(backup_id)
    if match is None:
        raise CatalogError(f"{backup_id!r} is not a backup id")
    return int(match.group(2)) + int(match.group(3)) / 1e6


class Catalog:
    """The backups of one repository under ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        refuse_unsafe_place(self.path)
        marker = self.path / CATALOG_MARKER
        try:
            info = json.loads(marker.read_text())
        except FileNotFoundError:
            raise CatalogError(
                f"{self.path} is not a hotcopy backup directory (no {CATALOG_MARKER})",
                path=str(self.path),
            ) from None
        except ValueError as err:
            raise CatalogError(f"{marker} is damaged: {err}", path=str(self.path)) from err
        if info.get("format") != CATALOG_FORMAT:
            raise CatalogError(f"{marker}: format {info.get('format')!r} is not supported")
        self.repository_id: str = info["repository_id"]

    @classmethod
    def create(cls, path: str | os.PathLike[str], repository_id: str) -> Catalog:
        """Open the catalog at ``path``, creating it for ``repository_id`` if there is none.

        Raises:
            CatalogError: ``path`` is a file, or holds the backups of another repository.
        """
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise CatalogError(f"backup directory {path} is not a directory", path=str(path))
        make_directory(path)
        refuse_unsafe_place(path)
        marker = {"format": CATALOG_FORMAT, "repository_id": repository_id}
        # Looked for first: the attempt alone costs a file and its fsync in every run.
        if not (path / CATALOG_MARKER).exists():
            with contextlib.suppress(FileExistsError):  # another run made it meanwhile
                write_durably(path / CATALOG_MARKER, json.dumps(marker).encode(), overwrite=False)
        catalog = cls(path)
        if catalog.repository_id != repository_id:
            raise CatalogError(
                f"{path} holds backups of repository {catalog.repository_id}, not "
                f"{repository_id}; use another backup directory",
                path=str(path),
            )
        return catalog

    def lock(self, timeout: float = -1) -> FileLock:
        """The catalog lock: one backup run or prune at a time."""
        os.close(open_regular(self.path / "catalog.lock", os.O_RDWR | os.O_CREAT))  # its mode
        return FileLock(self.path / "catalog.lock", timeout=timeout, poll_interval=0.01)

    def new_backup_dir(self, kind: str) -> tuple[str, Path]:
        """A fresh, empty backup directory named by the current time in microseconds."""
        now = time.time_ns() // 1000
        while True:
            backup_id = f"hotcopy_{kind}_{now // 1_000_000}_{now % 1_000_000:06d}"
            path = self.path / backup_id
            try:
                make_directory(path, exist_ok=False)
            except FileExistsError:
                now += 1
                continue
            fsync_dir(self.path)
            return backup_id, path

    def sweep_abandoned(self) -> list[Path]:
        """Remove the temps that killed runs left in their manifest-less directories.

        Only temps whose writer process is dead go; the caller holds :meth:`lock`, so no run
        of its own is writing there. (The directories themselves go at the next prune.)
        """
        removed: list[Path] = []
        for backup_id in self.backup_ids():
            if not (self.path / backup_id / MANIFEST).exists():
                removed += sweep_stale_temps(self.path / backup_id)
        return removed

    def write_manifest(self, manifest: Manifest) -> None:
        body = manifest.to_json()
        body["checksum"] = _manifest_checksum(body)
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        write_durably(self.path / manifest.id / MANIFEST, data)

    def load(self, backup_id: str) -> Manifest:
        try:
            data = json.loads((self.path / backup_id / MANIFEST).read_text())
        except FileNotFoundError:
            raise BackupNotFound(
                f"backup {backup_id} has no manifest in {self.path}", backup=backup_id
            ) from None
        except ValueError as err:
            raise CatalogError(f"manifest of {backup_id} is damaged: {err}") from err
        if not isinstance(data, dict) or data.get("checksum") != _manifest_checksum(data):
            raise CatalogError(f"manifest of {backup_id} is damaged: checksum mismatch")
        try:
            manifest = Manifest.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # Valid JSON of the wrong shape (a damaged key, a missing field) is damage too, not
            # a crash of every command that lists the catalog.
            raise CatalogError(
                f"manifest of {backup_id} is damaged: {type(err).__name__}: {err}"
            ) from err
        if manifest.id != backup_id:
            raise CatalogError(f"manifest in {backup_id} names backup {manifest.id}")
        return manifest

    def backup_ids(self) -> list[str]:
        """Every backup directory, finished or not, oldest first."""
        ids = [entry.name for entry in os.scandir(self.path) if _ID.fullmatch(entry.name)]
        return sorted(ids, key=backup_time)

    def manifests(self) -> list[Manifest]:
        """Complete backups, oldest first."""
        found = []
        for backup_id in self.backup_ids():
            with contextlib.suppress(BackupNotFound):
                manifest = self.load(backup_id)
                if manifest.complete:
                    found.append(manifest)
        return found

    def latest_entry(
        self, prefix: str, manifests: Sequence[Manifest] | None = None
    ) -> tuple[Manifest, Entry] | None:
        """The newest complete backup holding ``prefix``, and its entry there.

        ``manifests``: what :meth:`manifests` returned, for a caller asking about many
        prefixes (each call would otherwise load every manifest again).
        """
        for manifest in reversed(self.manifests() if manifests is None else manifests):
            if prefix in manifest.entries:
                return manifest, manifest.entries[prefix]
        return None

    def chain(
        self, manifest: Manifest, prefix: str, loaded: Mapping[str, Manifest] | None = None
    ) -> list[tuple[Manifest, Entry]]:
        """The full copy and every delta leading to ``prefix`` in ``manifest``, oldest first.

        ``loaded``: manifests already loaded, by id, used instead of loading them again.
        """
        if prefix not in manifest.entries:
            raise BackupNotFound(
                f"backup {manifest.id} does not hold prefix {prefix!r}", prefix=prefix
            )
        links = [(manifest, manifest.entries[prefix])]
        while links[-1][1].kind == "delta":
            later = links[-1][1]
            if later.base is None:
                raise CatalogError(f"delta of {prefix!r} in {links[-1][0].id} names no base")
            base = loaded[later.base] if loaded and later.base in loaded else self.load(later.base)
            entry = base.entries.get(prefix)
            if (
                not base.complete
                or entry is None
                or (entry.file_id, entry.salt, entry.end)
                != (later.file_id, later.salt, later.start)
            ):
                raise CatalogError(
                    f"the chain of prefix {prefix!r} is broken at {later.base}: its base does "
                    "not end where the delta starts",
                    prefix=prefix,
                )
            links.append((base, entry))
        links.reverse()
        return links

    def pieces(self, manifest: Manifest, prefix: str) -> list[Piece]:
        return [
            Piece(self.path / link.id / entry.file, entry.size, entry.crc32)
            for link, entry in self.chain(manifest, prefix)
        ]

    def pick(self, at: str | None) -> Manifest:
        """The backup named ``at``, or the newest at or before the ISO time ``at``."""
        if at is None:
            manifests = self.manifests()
            if not manifests:
                raise BackupNotFound(f"no complete backup in {self.path}")
            return manifests[-1]
        if _ID.fullmatch(at):
            manifest = self.load(at)
            if not manifest.complete:
                raise BackupNotFound(f"backup {at} is incomplete; it cannot be restored")
            return manifest
        try:
            moment = datetime.fromisoformat(at).timestamp()
        except ValueError:
            raise CatalogError(
                f"--at {at!r} is neither a backup id nor an ISO time (e.g. 2026-11-22T07:30:00)"
            ) from None
        # Only a choice by time needs every manifest: one backup named by its id is found (or
        # not) by itself, even if another backup's manifest is damaged.
        earlier = [manifest for manifest in self.manifests() if manifest.created <= moment]
        if not earlier:
            raise BackupNotFound(f"no complete backup at or before {at} in {self.path}")
        return earlier[-1]

    def prune(self, keep: int) -> list[str]:
        """Drop all but the newest ``keep`` complete backups, sparing what their chains need.

        A backup is dropped by removing its manifest first (durably), so an interrupted prune
        leaves at worst a manifest-less directory, which no chain can depend on; those are
        swept here too. The caller holds :meth:`lock`, so no run is in progress.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        manifests = self.manifests()
        needed = {manifest.id for manifest in manifests[-keep:]}
        for manifest in manifests[-keep:]:
            for prefix in manifest.entries:
                needed.update(link.id for link, _ in self.chain(manifest, prefix))
        removed = []
        for backup_id in self.backup_ids():
            if backup_id in needed:
                continue
            manifest_path = self.path / backup_id / MANIFEST
            if manifest_path.exists():
                manifest_path.unlink()
                fsync_dir(manifest_path.parent)
            shutil.rmtree(self.path / backup_id)
            (self.path / f"{backup_id}.json").unlink(missing_ok=True)  # its logical document
            removed.append(backup_id)
        if removed:
            fsync_dir(self.path)
        return removed

    def verify(self) -> list[str]:
        """Every problem found: manifests, file sizes and checksums, chains. Empty when sound."""
        problems = []
        for backup_id in self.backup_ids():
            try:
                manifest = self.load(backup_id)
            except BackupNotFound:
                problems.append(f"{backup_id}: no manifest (a run that never finished)")
                continue
            except CatalogError as err:
                problems.append(f"{backup_id}: {err}")
                continue
            if not manifest.complete:
                continue  # recorded as incomplete: nothing in it is relied on
            for prefix, entry in manifest.entries.items():
                problem = _check_file(self.path / backup_id / entry.file, entry)
                if problem:
                    problems.append(f"{backup_id}/{entry.file}: {problem}")
                try:
                    self.chain(manifest, prefix)
                except (CatalogError, BackupNotFound) as err:
                    problems.append(f"{backup_id}: {err}")
        return problems


def _check_file(path: Path, entry: Entry) -> str | None:
    try:
        with open(path, "rb") as file:
            crc = 0
            size = 0
            while chunk := file.read(4 << 20):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
    except FileNotFoundError:
        return "missing"
    if size != entry.size:
        return f"{size} bytes, the manifest says {entry.size}"
    if crc & 0xFFFFFFFF != entry.crc32:
        return "checksum mismatch (the file is damaged)"
    return None
