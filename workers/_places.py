"""Where a backup catalog lives: a local directory, or a path in an S3-compatible bucket.

The catalog (``_catalog``) decides what is valid and what a backup needs; a *place* only stores
and finds its files, named relative to the catalog (``hotcopy-backups.json``,
``<backup id>/MANIFEST.json``, ``<backup id>/<prefix>.hc``). Both keep the catalog's rules: a
backup's pieces are durable before its manifest names them, a backup without a manifest is
never used, and one run or prune changes a catalog at a time.

- :class:`DirectoryPlace`: files made durable by fsync and temp-then-rename; a backup is a
  directory the copy workers write into; the catalog lock is a ``flock``.
- :class:`ObjectPlace`: objects, which are never renamed. A backup id is claimed by a
  create-only put of ``<id>/STARTED``; copy workers write the pieces into a local staging
  directory, which is uploaded before the manifest is put; the catalog lock is a create-only
  lock object with an expiry, renewed while held (``_s3.ObjectStore.lock``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from filelock import FileLock, Timeout
from hotcopy.coordinator._status import describe_process
from hotcopy.storage import NotRegularFile, StorageError
from hotcopy.storage._crc import bulk_crc32
from hotcopy.storage._durable import (
    fsync_dir,
    is_temp_name,
    sweep_stale_temps,
    sync_filesystem,
    write_durably,
)
from hotcopy.storage._files import make_directory, open_regular, read_regular, refuse_unsafe_place
from hotcopy.storage._repository import validate_prefix_name

from ._errors import BackupNotFound, BackupUnreadable, CatalogError
from ._s3 import LeaseBusy, ObjectLock, ObjectStore, is_object_url
from ._workdir import (
    WorkDirectory,
    opened_directory,
    remove_work_directory,
    sweep_work_directories,
)

if TYPE_CHECKING:
    from ._catalog import Entry

CATALOG_MARKER = "hotcopy-backups.json"
MANIFEST = "MANIFEST.json"
LOCK = "catalog.lock"
REPLICATOR_LOCK = "replicator.lock"  # one replicator ships into a replica at a time
_LOCKS = {  # what each lock is called, and who holds it, in a message
    LOCK: ("the lock", "another backup or prune"),
    REPLICATOR_LOCK: ("the replicator lock", "another replicator"),
}
STARTED = "STARTED"  # an object place's claim on a backup id (a directory place's mkdir)
SEALED = ".sealed"  # an object place's sealed piece: <prefix>.hc.sealed


class LockBusy(CatalogError):
    """A catalog lock was not granted within the time given: another run holds it."""


class CatalogLock(Protocol):
    """One backup run or prune at a time, in a catalog's place."""

    @property
    def what(self) -> str: ...  # e.g. "the lock of backup directory D (another backup or prune)"
    def holders(self) -> str: ...  # who holds it now, for a message
    def acquire(self, timeout: float | None) -> None: ...  # LockBusy after timeout s (None: never)
    def release(self, failing: bool) -> None: ...  # failing: an error is on its way out


# Takes a catalog lock (see Catalog.locked): bounded or reported as the caller wants.
LockWait = Callable[[CatalogLock], None]


def is_prefix_name(name: object) -> bool:
    try:
        validate_prefix_name(name)
    except StorageError:
        return False
    return True


def is_piece_name(name: str) -> bool:
    """Whether ``name`` is a piece hotcopy writes (``<prefix>.hc`` or ``<prefix>.hc-delta``)."""
    for suffix in (".hc", ".hc-delta"):
        if name.endswith(suffix) and is_prefix_name(name[: -len(suffix)]):
            return True
    return False


def is_own_file(name: str) -> bool:
    """Whether hotcopy writes files named ``name`` into a backup directory."""
    return name == MANIFEST or is_piece_name(name) or is_temp_name(name)


class Place(Protocol):
    """What the catalog asks of the place it lives in (names relative to the catalog)."""

    @property
    def where(self) -> str: ...
    @property
    def local(self) -> bool: ...  # pieces are local files (else fetched to be read)
    def exists(self) -> bool: ...
    def read(self, name: str, what: str, limit: int) -> bytes | None: ...
    def write(self, name: str, data: bytes, *, create_only: bool = False) -> bool: ...
    def locked(
        self, acquire: LockWait | None, name: str = ...
    ) -> contextlib.AbstractContextManager[None]: ...  # held while inside: ``name`` (LOCK)
    def top_names(self) -> list[str]: ...
    def listing(self, under: str) -> dict[str, int]: ...  # files below ``under``: their sizes
    def check_backup(self, backup_id: str) -> None: ...
    def is_foreign(self, backup_id: str) -> bool: ...
    def new_backup(self, backup_id: str) -> Path | None: ...
    def ship(self, backup_id: str, staging: Path, piece: str) -> None: ...
    def publish(self, backup_id: str, staging: Path) -> dict[str, int]: ...
    def discard(self, backup_id: str, staging: Path) -> None: ...
    def sweep_abandoned(self, backup_ids: list[str]) -> list[str]: ...
    def piece_problem(
        self, backup_id: str, entry: Entry, *, checksums: bool, key: bytes | None
    ) -> str | None: ...
    def fetch(self, sizes: dict[str, int], into: Path) -> dict[str, Path]: ...
    def remove(self, names: Iterable[str]) -> list[str]: ...  # those left: not ours to remove
    def remove_backup(self, backup_id: str) -> str | None: ...  # why it stays, if it does
    def remove_unnamed_pieces(self, backup_id: str, named: set[str]) -> bool: ...


def open_place(
    location: str | os.PathLike[str],
    *,
    create: bool = False,
    key: bytes | None = None,
    compress: bool = False,
) -> Place:
    """The place named by ``location``: an ``s3://`` URL or a directory. ``key`` and
    ``compress`` seal what an object place writes; a directory's pieces are never sealed."""
    if isinstance(location, str) and is_object_url(location):
        return ObjectPlace(location, key=key, compress=compress)
    if compress:
        raise CatalogError(f"{location}: compression is for s3:// catalogs, not directories")
    return DirectoryPlace(location, create=create)


# -- a directory ----------------------------------------------------------------------------------


# The work directories pieces are copied into: in a directory catalog, in $TMPDIR for an
# object store's (where they wait for their upload).
_STAGING = ".staging"
_UPLOAD_STAGING = "hotcopy-staging"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


class DirectoryPlace:
    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path).absolute()
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise CatalogError(
                    f"backup directory {self.path} is not a directory", path=str(self.path)
                )
            make_directory(self.path)
        refuse_unsafe_place(self.path)
        self._root = str(self.path)  # piece paths as strings: pathlib costs 15 us each
        # The directories of the backups this object claimed: (device, inode), so that one
        # exchanged for another under its name meanwhile is never written as it.
        self._claimed: dict[str, tuple[int, int]] = {}

    @property
    def where(self) -> str:
        return self._root

    @property
    def local(self) -> bool:
        return True

    def exists(self) -> bool:
        return self.path.is_dir()

    def read(self, name: str, what: str, limit: int) -> bytes | None:
        """The regular file ``name`` (never a link, FIFO or device), or None if absent."""
        path = self.path / name
        try:
            os.lstat(path)  # absent, or there but not this user's to read: never the same
            return read_regular(path, limit=limit)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError as err:
            raise BackupUnreadable(f"{what}: this user may not read it ({err.strerror})") from None
        except (NotRegularFile, StorageError) as err:  # or larger than any catalog file
            raise CatalogError(f"{what}: {err}") from None
        except OSError as err:
            raise CatalogError(f"{what}: unreadable: {err.strerror}") from None

    def write(self, name: str, data: bytes, *, create_only: bool = False) -> bool:
        path = self.path / name
        if make_directory(path.parent):  # a replica's log object: its new directories too
            for directory in path.parent.relative_to(self.path).parents:
                fsync_dir(self.path / directory)
        try:
            fd = self._directory_of(name)
        except PermissionError:
            raise  # another member's directory in a shared catalog: not ours to write
        except OSError as err:
            raise CatalogError(
                f"{path} cannot be written: a directory on the way is not one "
                f"({os.strerror(err.errno or 0)}: a link put in its place?)",
                path=str(path),
            ) from None
        try:
            write_durably(path, data, overwrite=not create_only, directory=fd)
        except FileExistsError:
            if not create_only:
                raise
            return False
        finally:
            os.close(fd)
        return True

    def _directory_of(self, name: str) -> int:
        """A descriptor of the directory the entry ``name`` (``a/b/c``) of the catalog is in,
        opened one component at a time, never through a link: in a catalog shared with a
        group, a member may put one in place of a directory, and what this user writes or
        removes must not land outside the catalog."""
        fd = os.open(self.path, _DIRECTORY)
        try:
            for part in name.split("/")[:-1]:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
                claimed = self._claimed.get(part)
                if claimed is not None and claimed != _identity(fd):
                    raise OSError(errno.ESTALE, "not the backup's directory any more", part)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def locked(self, acquire: LockWait | None, name: str = LOCK) -> Iterator[None]:
        os.close(open_regular(self.path / name, os.O_RDWR | os.O_CREAT))  # its policy mode
        lock = _DirectoryLock(self.path / name)
        with _held(lock, acquire):
            yield

    def top_names(self) -> list[str]:
        return [entry.name for entry in os.scandir(self.path)]

    def listing(self, under: str) -> dict[str, int]:
        """Regular files below ``under`` (never through a link); one removed while it is
        listed (a merge of log objects) is left out."""
        found: dict[str, int] = {}
        directories = [self.path / under]
        while directories:
            directory = directories.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir(follow_symlinks=False):
                        directories.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False) and not is_temp_name(entry.name):
                        name = str(Path(entry.path).relative_to(self.path))
                        found[name] = entry.stat(follow_symlinks=False).st_size
        return found

    def backup_dir(self, backup_id: str) -> Path:
        """The directory of backup ``backup_id``: a real directory inside the catalog."""
        path = self.path / backup_id
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise BackupNotFound(
                f"no backup {backup_id} in {self.path}", backup=backup_id
            ) from None
        if stat.S_ISLNK(mode):
            raise CatalogError(
                f"backup {backup_id}: {path} is a symbolic link; refusing to use it",
                backup=backup_id,
            )
        if not stat.S_ISDIR(mode):
            raise CatalogError(f"backup {backup_id}: {path} is not a directory", backup=backup_id)
        return path

    def check_backup(self, backup_id: str) -> None:
        self.backup_dir(backup_id)

    def is_foreign(self, backup_id: str) -> bool:
        path = self.path / backup_id
        return os.path.islink(path) or not os.path.isdir(path)

    def new_backup(self, backup_id: str) -> Path | None:
        """Claim ``backup_id`` (its directory made, empty; None if the id is taken) and return
        a work directory its pieces are copied into: copy workers write them by path, and in
        a catalog shared with a group, whose members may put a link in place of the backup's
        directory, only a work directory's path cannot be redirected (see ``_workdir``).
        :meth:`publish` moves them in."""
        path = self.path / backup_id
        try:
            make_directory(path, exist_ok=False)
        except FileExistsError:
            return None
        fsync_dir(self.path)
        with opened_directory(self.path) as catalog_fd:
            fd = os.open(backup_id, _DIRECTORY, dir_fd=catalog_fd)
            try:  # the one made: ours and empty (not one exchanged for it since)
                if os.fstat(fd).st_uid != os.geteuid() or os.listdir(fd):
                    raise CatalogError(
                        f"backup {backup_id}: its new directory in {self.path} was replaced "
                        "as it was made; nothing of it is used",
                        backup=backup_id,
                    )
                self._claimed[backup_id] = _identity(fd)
            finally:
                os.close(fd)
            staging = WorkDirectory(self.path, catalog_fd, _STAGING)
            staging.close()
        return staging.path

    def ship(self, backup_id: str, staging: Path, piece: str) -> None:
        """Nothing before :meth:`publish`, which moves every piece at once (renames)."""

    def publish(self, backup_id: str, staging: Path) -> dict[str, int]:
        """Move the pieces copied into ``staging`` into the backup's directory, durably,
        through descriptors (never through a link put in its place)."""
        sync_filesystem(staging)  # every copy durable before the manifest names it
        with opened_directory(self.path) as catalog_fd, opened_directory(staging) as pieces:
            fd = self._backup_fd(catalog_fd, backup_id)
            try:
                for name in filter(is_piece_name, os.listdir(pieces)):  # not a dead one's temp
                    os.rename(name, name, src_dir_fd=pieces, dst_dir_fd=fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        remove_work_directory(staging)
        return {}

    def _backup_fd(self, catalog_fd: int, backup_id: str) -> int:
        try:
            fd = os.open(backup_id, _DIRECTORY, dir_fd=catalog_fd)
            if self._claimed.get(backup_id, _identity(fd)) != _identity(fd):
                os.close(fd)
                raise OSError(errno.ESTALE, "not the backup's directory any more")
            return fd
        except OSError as err:
            raise CatalogError(
                f"backup {backup_id}: its directory in {self.path} was replaced while it ran "
                f"({os.strerror(err.errno or 0)}); nothing of it is used",
                backup=backup_id,
            ) from None

    def discard(self, backup_id: str, staging: Path) -> None:
        """Remove what a run that failed left: its work directory, then the directory it
        claimed."""
        remove_work_directory(staging)
        path = self.path / backup_id
        with contextlib.suppress(OSError):
            remove_own_files(path, is_own_file)
            os.rmdir(path)
            fsync_dir(self.path)

    def sweep_abandoned(self, backup_ids: list[str]) -> list[str]:
        """Remove the work directories of runs that were killed, and the temps that runs
        before them left in their backups without a manifest."""
        with opened_directory(self.path) as catalog_fd:
            removed = sweep_work_directories(self.path, catalog_fd, _STAGING)
        for backup_id in backup_ids:
            with contextlib.suppress(CatalogError, PermissionError):  # (another member's)
                path = self.backup_dir(backup_id)
                if not os.path.lexists(path / MANIFEST):
                    removed += [str(p) for p in sweep_stale_temps(path)]
        return removed

    def piece_path(self, backup_id: str, name: str) -> str:
        return os.path.join(self._root, backup_id, name)

    def piece_problem(
        self, backup_id: str, entry: Entry, *, checksums: bool, key: bytes | None
    ) -> str | None:
        return file_problem(self.piece_path(backup_id, entry.file), entry, checksums, key)

    def fetch(self, sizes: dict[str, int], into: Path) -> dict[str, Path]:
        """The pieces ``sizes`` names (``<id>/<file>``) are here already: their paths."""
        return {name: self.path / name for name in sizes}

    def remove(self, names: Iterable[str]) -> list[str]:
        """Unlink the entries ``names`` (never followed), each directory's removal durable;
        the names this user may not remove (in a directory another member of a shared
        catalog made), which stay."""
        directories: set[Path] = set()
        denied = []
        for name in names:
            path = self.path / name
            try:
                fd = self._directory_of(name)
            except PermissionError:
                denied.append(name)
                continue
            except OSError:  # missing, or a link in the way: nothing of the catalog's there
                continue
            try:
                os.unlink(path.name, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except PermissionError:
                denied.append(name)
                continue
            finally:
                os.close(fd)
            directories.add(path.parent)
        for directory in sorted(directories, reverse=True):
            while directory != self.path and directory.is_relative_to(self.path):
                try:
                    os.rmdir(directory)  # emptied (a replica's log of a removed snapshot)
                except FileNotFoundError:
                    pass  # emptied and removed with another: its parent is synced
                except OSError:
                    break  # not empty: what is left stays
                directory = directory.parent
            fsync_dir(directory)
        return denied

    def remove_backup(self, backup_id: str) -> str | None:
        """Remove what hotcopy wrote in the backup's directory, and the directory if that
        empties it; or say why the directory stays (what else it holds). PermissionError:
        this user may not change it (another member's, in a shared catalog)."""
        directory = self.path / backup_id
        try:
            _, denied = remove_own_files(directory, is_own_file)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None  # gone already, or a file or link named like a backup: not ours
            raise
        if denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise  # (EPERM: another's directory in a sticky catalog)
            try:
                with opened_directory(directory) as fd:  # never through a link put in its place
                    left = sorted(os.listdir(fd))  # escaped: names are anyone's
            except OSError:
                return "it was replaced while prune ran"
            return f"it holds files hotcopy did not write ({', '.join(map(ascii, left))})"
        fsync_dir(self.path)
        return None

    def remove_unnamed_pieces(self, backup_id: str, named: set[str]) -> bool:
        """Remove the backup's pieces that ``named`` does not hold; whether any went.
        PermissionError: some this user may not remove (they stay, named in it)."""
        directory = self.path / backup_id
        try:
            removed, denied = remove_own_files(
                directory, lambda name: is_piece_name(name) and name not in named
            )
        except PermissionError:
            return False  # another member's directory, not ours to list
        if removed:
            fsync_dir(directory)
        if denied:  # escaped: names are anyone's
            raise PermissionError(errno.EACCES, "permission denied", ", ".join(map(ascii, denied)))
        return bool(removed)


@contextlib.contextmanager
def _held(lock: CatalogLock, acquire: LockWait | None) -> Iterator[None]:
    if acquire is None:
        lock.acquire(None)
    else:
        acquire(lock)
    try:
        yield
    except BaseException:
        lock.release(failing=True)
        raise
    lock.release(failing=False)


class _DirectoryLock:
    """A directory catalog's lock: ``flock`` on its ``catalog.lock`` (``filelock``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = FileLock(path, timeout=-1, poll_interval=0.01)

    @property
    def what(self) -> str:
        label, holds = _LOCKS[self._path.name]
        return f"{label} of backup directory {self._path.parent} ({holds})"

    def holders(self) -> str:
        return lock_holders(self._path)

    def acquire(self, timeout: float | None) -> None:
        try:
            self._lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise LockBusy(f"{self.what} is held by {self.holders()}") from None

    def release(self, failing: bool) -> None:
        self._lock.release()


def lock_holders(path: Path) -> str:
    """Who holds the file lock on ``path`` (from ``/proc/locks``), for a message."""
    pids = _flock_holders(path)
    if not pids:
        return "an unknown process (not listed in /proc/locks)"
    return "; ".join(str(describe_process(pid)) for pid in pids)


def _flock_holders(path: Path) -> list[int]:
    """Pids holding a lock on ``path``'s inode, as ``/proc/locks`` lists them."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters' lines have "->".
        fields = line.split()
        if len(fields) >= 6 and "->" not in fields and fields[5] == device:
            with contextlib.suppress(ValueError):
                pids.append(int(fields[4]))
    return sorted(set(pids))


def remove_own_files(directory: Path, ours: Callable[[str], bool]) -> tuple[int, list[str]]:
    """Unlink the entries of ``directory`` that ``ours`` accepts; never follows a link (an
    entry that is one is unlinked itself, never what it points to), never enters a
    subdirectory. How many went, and the names this user may not remove (they stay)."""
    removed, denied = 0, []
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            if not ours(name):
                continue
            try:
                os.unlink(name, dir_fd=fd)
            except PermissionError:
                denied.append(name)
            except (FileNotFoundError, IsADirectoryError):
                continue  # gone, or a directory: not hotcopy's
            else:
                removed += 1
    finally:
        os.close(fd)
    return removed, denied


def file_problem(path: str, entry: Entry, checksums: bool, key: bytes | None) -> str | None:
    """Why the local file ``path`` is not the piece of ``entry``, or None. Without
    ``checksums`` only that it is a regular file (never a link followed) of its size."""
    if not checksums:  # one lstat: a regular file (never a link followed) of the right size
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return "missing"
        except OSError as err:
            return f"unreadable: {err.strerror}"
        if not stat.S_ISREG(info.st_mode):
            try:  # refused at once, with what it is (a FIFO is opened without blocking)
                os.close(open_regular(path))
            except (NotRegularFile, OSError) as err:
                return str(err)
        return size_problem(info.st_size, entry)
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return "missing"
    except NotRegularFile as err:
        return str(err)
    except OSError as err:
        return f"unreadable: {err.strerror}"
    try:
        problem = size_problem(os.fstat(fd).st_size, entry)
        if problem is None:
            problem = content_problem(iter(lambda: os.read(fd, 4 << 20), b""), entry, key)
    finally:
        os.close(fd)
    return problem


def size_problem(size: int, entry: Entry) -> str | None:
    return None if size == entry.size else f"{size} bytes, the manifest says {entry.size}"


def content_problem(chunks: Iterable[bytes], entry: Entry, key: bytes | None) -> str | None:
    """Why the bytes ``chunks`` are not the piece of ``entry`` (its CRC-32; with ``key``, the
    SHA-256 that only the key's holder could have recorded), or None."""
    crc = 0
    digest = hashlib.sha256()
    for chunk in chunks:
        crc = bulk_crc32(chunk, crc)
        if key is not None:
            digest.update(chunk)
    if crc != entry.crc32:
        return "checksum mismatch (the file is damaged)"
    if key is not None and not hmac.compare_digest(digest.hexdigest(), entry.sha256 or ""):
        return "SHA-256 mismatch (the file is damaged or was replaced)"
    return None


class _BucketLock:
    """An object catalog's lock: the lease object ``catalog.lock`` (``ObjectStore.lock``)."""

    def __init__(self, store: ObjectStore, ttl: float, name: str = LOCK) -> None:
        self._store, self._ttl, self._name = store, ttl, name
        self.lease: ObjectLock | None = None

    @property
    def what(self) -> str:
        label, holds = _LOCKS[self._name]
        return f"{label} of {self._store.describe} ({holds})"

    def holders(self) -> str:
        return self._store.holder(self._name)

    def acquire(self, timeout: float | None) -> None:
        owner = f"{os.uname().nodename}:{os.getpid()}"
        lease = self._store.lock(self._name, ttl=self._ttl, timeout=timeout, owner=owner)
        try:
            lease.__enter__()
        except LeaseBusy as err:
            raise LockBusy(str(err)) from None
        self.lease = lease

    def release(self, failing: bool) -> None:
        if self.lease is not None:  # a lost lease is reported, unless an error is on its way
            self.lease.__exit__(CatalogError if failing else None, None, None)


# -- an object store ------------------------------------------------------------------------------


def _temp_dir() -> Path:
    return Path(os.path.realpath(tempfile.gettempdir()))


class ObjectPlace:
    """A catalog at ``s3://BUCKET/PATH``: credentials, region and endpoint come from the
    standard AWS environment variables and files (``--endpoint-url`` sets
    ``AWS_ENDPOINT_URL_S3``).

    With a ``key``, every object it writes is *sealed* (``_sealing``: encrypted with
    AES-256-GCM, and zstd-compressed first with ``compress``); with ``compress`` alone,
    compressed and framed with CRC-32s. A sealed piece is stored as ``<file>.sealed``, so a
    listing shows which pieces are; a manifest or marker is recognised by its header. Read with
    a key, anything not sealed with that key is refused.
    """

    LOCK_TTL = 60.0  # a run that dies holding the lock blocks others for this long at most

    def __init__(self, url: str, *, key: bytes | None = None, compress: bool = False) -> None:
        from . import _sealing  # cryptography and zstandard: loaded for buckets only

        self._sealing = _sealing
        self._keys = _sealing.derive_keys(key) if key is not None else None
        self._compress = compress
        self.store = ObjectStore(url)
        self._sizes: dict[str, int] | None = None  # every object's size, as last listed
        self._lock: ObjectLock | None = None  # the catalog lock, while this process holds it
        self._locked_at: float | None = None  # when it was granted
        self._shipped: dict[str, dict[str, int]] = {}  # backup id -> pieces uploaded, sizes

    @property
    def where(self) -> str:
        return self.store.describe

    @property
    def local(self) -> bool:
        return False

    def _listing(self, refresh: bool = False) -> dict[str, int]:
        if self._sizes is None or refresh:
            self._sizes = self.store.sizes()
        return self._sizes

    def exists(self) -> bool:
        return bool(self._listing(refresh=True))

    def _seals(self) -> bool:
        return self._keys is not None or self._compress

    def _opened(self, name: str, raw: bytes, what: str, limit: int) -> bytes:
        """The content of an object as stored: sealed ones opened (at most ``limit`` bytes),
        unsealed ones refused when this catalog is read with a key."""
        if self._sealing.is_sealed(raw):
            try:
                opened = self._sealing.open_stream([raw], self._keys, limit, name.encode())
                return b"".join(opened)
            except CatalogError as err:
                raise CatalogError(f"{what}: {err}") from None
        if self._keys is not None:
            raise CatalogError(f"{what} is not sealed, but a key was given: refused")
        return raw

    def read(self, name: str, what: str, limit: int) -> bytes | None:
        raw = self.store.get(name, limit)
        return None if raw is None else self._opened(name, raw, what, limit)

    def _still_locked(self) -> None:
        """Refuse to change the catalog once its lock was lost (expired while this process
        could not renew it: another run may hold it now)."""
        if self._lock is not None and not self._lock.held:
            raise CatalogError(
                f"lost the lock of {self.where} (it went unrenewed: the store was unreachable "
                "or this process was stopped; another run may hold it); nothing more is written"
            )

    def write(self, name: str, data: bytes, *, create_only: bool = False) -> bool:
        self._still_locked()
        if self._seals():
            context = name.encode()  # a manifest never passes for the marker, nor another's
            data = self._sealing.seal_bytes(
                data, self._keys, compress=self._compress, context=context
            )
        written = self.store.put(name, data, create_only=create_only)
        if written and self._sizes is not None:
            self._sizes[name] = len(data)
        return written

    @contextlib.contextmanager
    def locked(self, acquire: LockWait | None, name: str = LOCK) -> Iterator[None]:
        lock = _BucketLock(self.store, self.LOCK_TTL, name)
        with _held(lock, acquire):
            self._lock, self._locked_at = lock.lease, time.time()
            try:
                yield
            finally:
                self._lock = self._locked_at = None

    def top_names(self) -> list[str]:
        return sorted({name.split("/", 1)[0] for name in self._listing(refresh=True)})

    def listing(self, under: str) -> dict[str, int]:
        return self.store.sizes(under)

    def _objects_of(self, backup_id: str) -> dict[str, int]:
        """The objects of backup ``backup_id`` by their names inside it."""
        start = backup_id + "/"
        return {
            name[len(start) :]: size
            for name, size in self._listing().items()
            if name.startswith(start)
        }

    def check_backup(self, backup_id: str) -> None:
        if not self._objects_of(backup_id):
            self._listing(refresh=True)
            if self.is_foreign(backup_id):
                raise CatalogError(
                    f"backup {backup_id}: {self.where}/{backup_id} is an object, not a backup",
                    backup=backup_id,
                )
            if not self._objects_of(backup_id):
                raise BackupNotFound(f"no backup {backup_id} in {self.where}", backup=backup_id)

    def is_foreign(self, backup_id: str) -> bool:
        """An object named like a backup, where a backup is objects below that name."""
        return not self._objects_of(backup_id) and backup_id in self._listing()

    def new_backup(self, backup_id: str) -> Path | None:
        """A local staging directory for the pieces of ``backup_id``, once the id is claimed;
        None if it is taken."""
        if not self.write(f"{backup_id}/{STARTED}", b"{}", create_only=True):
            return None
        with opened_directory(_temp_dir()) as temp_fd:
            staging = WorkDirectory(_temp_dir(), temp_fd, _UPLOAD_STAGING)  # swept if run died
            staging.close()
        return staging.path

    def ship(self, backup_id: str, staging: Path, piece: str) -> None:
        """Upload the piece ``piece``, copied into ``staging``, now, and remove it there: the
        upload overlaps the copies still running, and staging holds only pieces in flight."""
        self._still_locked()
        self._upload(backup_id, staging, piece)

    def publish(self, backup_id: str, staging: Path) -> dict[str, int]:
        """Upload the pieces in ``staging`` not shipped yet (each verified by its size once
        stored); the staging directory goes once they are all there. Returns the sealed
        pieces' sizes."""
        shipped = self._shipped.setdefault(backup_id, {})
        for name in sorted(os.listdir(staging)):
            if is_piece_name(name) and name not in shipped:
                self._still_locked()
                self._upload(backup_id, staging, name)
        remove_work_directory(staging)
        return dict(self._shipped.pop(backup_id)) if self._seals() else {}

    def _upload(self, backup_id: str, staging: Path, piece: str) -> None:
        """Upload one piece (sealed first, if this catalog seals) and record the size it is
        stored at; only then remove its local copies (a run interrupted before that still
        has the piece for :meth:`publish`)."""
        path, name = staging / piece, f"{backup_id}/{piece}"
        stored = path
        if self._seals():
            stored, context = path.with_name(piece + SEALED), name.encode()
            compress = self._compress
            self._sealing.seal_file(path, stored, self._keys, compress=compress, context=context)
            name += SEALED
        self.store.upload_file(name, stored)
        size = stored.stat().st_size
        if self._sizes is not None:
            self._sizes[name] = size
        self._shipped.setdefault(backup_id, {})[piece] = size
        stored.unlink()
        if stored != path:
            path.unlink()

    def discard(self, backup_id: str, staging: Path) -> None:
        remove_work_directory(staging)
        shipped = [
            f"{backup_id}/{piece}{SEALED if self._seals() else ''}"
            for piece in self._shipped.pop(backup_id, {})
        ]
        with contextlib.suppress(CatalogError):
            self.remove([*shipped, f"{backup_id}/{STARTED}"])

    def sweep_abandoned(self, backup_ids: list[str]) -> list[str]:
        """Remove the local staging directories of runs whose process died, and abort the
        uploads that runs before this lock's holder left unfinished (their claims and whole
        pieces, without a manifest, go at the next prune). The caller holds the lock."""
        assert self._locked_at is not None, "sweep_abandoned wants the catalog lock"
        aborted = self.store.abort_uploads(started_before=self._locked_at)
        with opened_directory(_temp_dir()) as temp_fd:
            swept = sweep_work_directories(_temp_dir(), temp_fd, _UPLOAD_STAGING)
        return swept + [f"{self.where}/{name}" for name in aborted]

    def _stored(self, backup_id: str, file: str) -> tuple[str, int] | str:
        """The object holding piece ``file`` and its size, or why there is none to use."""
        objects = self._objects_of(backup_id)
        if file + SEALED in objects:
            return f"{backup_id}/{file}{SEALED}", objects[file + SEALED]
        if file not in objects:
            return "missing"
        if self._keys is not None:
            return "not sealed, but a key was given: refused (it may be a substitute)"
        return f"{backup_id}/{file}", objects[file]

    def piece_problem(
        self, backup_id: str, entry: Entry, *, checksums: bool, key: bytes | None
    ) -> str | None:
        """Without ``checksums``: present, and of its size (a sealed piece: at least a seal's
        header, its size being known only once opened); with them, every byte read."""
        stored = self._stored(backup_id, entry.file)
        if isinstance(stored, str):
            return stored
        name, size = stored
        sealed = name.endswith(SEALED)
        if sealed and entry.stored is not None and size != entry.stored:
            return f"{size} bytes stored, the manifest says {entry.stored}"
        if sealed and size < self._sealing.HEADER.size:
            return f"{size} bytes, less than a sealed object's header"
        problem = None if sealed else size_problem(size, entry)
        if problem is None and checksums:
            try:
                chunks = self.store.chunks(name)
                if sealed:
                    context = f"{backup_id}/{entry.file}".encode()
                    chunks = self._sealing.open_stream(chunks, self._keys, entry.size, context)
                problem = content_problem(chunks, entry, key)
            except CatalogError as err:
                problem = f"unreadable: {err}"
        return problem

    def fetch(self, sizes: dict[str, int], into: Path) -> dict[str, Path]:
        """Download the pieces ``sizes`` names (``<id>/<file>``, with the size each opens to)
        into the directory ``into``, each opened if sealed (every chunk authenticated as it is
        written out, and never more bytes than its size)."""
        local: dict[str, Path] = {}
        for number, (name, size) in enumerate(sizes.items()):
            backup_id, file = name.split("/", 1)
            stored = self._stored(backup_id, file)
            if isinstance(stored, str):
                raise CatalogError(f"{self.where}/{name}: {stored}")
            path = into / f"{number}-{backup_id}-{file}"
            if stored[0].endswith(SEALED):
                sealed = path.with_name(path.name + SEALED)
                self.store.download_file(stored[0], sealed)
                try:
                    self._sealing.open_file(sealed, path, self._keys, size, name.encode())
                except CatalogError as err:
                    raise CatalogError(f"{self.where}/{stored[0]}: {err}") from None
                finally:
                    sealed.unlink()
            else:
                self.store.download_file(stored[0], path)
            local[name] = path
        return local

    def remove(self, names: Iterable[str]) -> list[str]:
        self._still_locked()
        names = list(names)
        self.store.delete(names)
        if self._sizes is not None:
            for name in names:
                self._sizes.pop(name, None)
        return []

    def remove_backup(self, backup_id: str) -> str | None:
        objects = self._objects_of(backup_id)
        ours = [
            name for name in objects if is_own_file(name.removesuffix(SEALED)) or name == STARTED
        ]
        # The manifest first (the caller removed it already, normally): never a backup whose
        # pieces are going while its manifest still names them.
        if MANIFEST in ours:
            self.remove([f"{backup_id}/{MANIFEST}"])
        self.remove(f"{backup_id}/{name}" for name in ours if name != MANIFEST)
        others = sorted(set(objects) - set(ours))
        if others:  # escaped: names are anyone's
            return f"it holds objects hotcopy did not write ({', '.join(map(ascii, others))})"
        return None

    def remove_unnamed_pieces(self, backup_id: str, named: set[str]) -> bool:
        unnamed = [
            f"{backup_id}/{name}"
            for name in self._objects_of(backup_id)
            if is_piece_name(name.removesuffix(SEALED)) and name.removesuffix(SEALED) not in named
        ]
        if unnamed:
            self.remove(unnamed)
        return bool(unnamed)
