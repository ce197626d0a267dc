"""The repository: a directory of prefixes with a marker file and a private runtime dir."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from hotcopy.coordinator import connect
from hotcopy.coordinator._paths import shared_with_group

from ._copy import (
    DEFAULT_STEP,
    BaseRef,
    CopyResult,
    Progress,
    copy_prefix,
    restore_prefix_file,
)
from ._durable import sweep_stale_temps, write_durably
from ._errors import ClosedError, InvalidPrefixName, RepositoryNotFound, StorageError
from ._files import make_directory, open_dir, read_regular, refuse_unsafe_place
from ._leases import FileLeases, LeaseProvider
from ._log import Cut, Log, Salvaged, main_path, migrate_files
from ._prefix import DEFAULT_CHECKPOINT_BYTES, DEFAULT_LEASE_TTL, Prefix

MARKER = "hotcopy.json"
RUNTIME_DIR = ".hotcopy"
REPOSITORY_FORMAT = 1
_PREFIX_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def _is_repository_id(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) is not None


def validate_prefix_name(name: object) -> str:
    """Return ``name`` if it is a valid prefix name, else raise :class:`InvalidPrefixName`.

    1 to 200 characters of ``[A-Za-z0-9._-]``, not starting with ``.``: no name can reach outside
    the repository directory or collide with its runtime dir or temps.
    """
    if not isinstance(name, str) or _PREFIX_NAME.fullmatch(name) is None:
        raise InvalidPrefixName(
            f"invalid prefix name {name!r}: use 1-200 characters of A-Z a-z 0-9 . _ - "
            "not starting with '.'",
            prefix=name,
        )
    return name


def _group_id(group: str) -> int:
    """The gid of ``group`` (a name or a number), which this user must belong to."""
    try:
        gid = int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise StorageError(f"no group named {group!r}: create it first (groupadd)") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise StorageError(
            f"you are not a member of group {group!r}; only a member can share with it",
            group=group,
        )
    return gid


def _share_existing(path: Path, gid: int, group: str | None) -> None:
    """Share the existing directory ``path`` with ``gid``: at once if it holds no repository
    yet, never behind the back of one already in use (its files would keep their modes)."""
    info = os.stat(path)
    if shared_with_group(info) and info.st_gid == gid:
        return
    if (path / MARKER).exists() or any(path.iterdir()):
        raise StorageError(
            f"{path} is not empty; to share an existing repository with group {group!r}, close "
            f"it everywhere, then: chgrp -R {group} {path} && chmod -R g+rwX,o-rwx {path} && "
            f"find {path} -type d -exec chmod g+s {{}} +",
            root=str(path),
        )
    os.chown(path, -1, gid)
    os.chmod(path, 0o2770)


class Repository:
    """A hotcopy repository rooted at a directory.

    The repository directory must be safe (see ``hotcopy.coordinator._paths.check_place``):
    nobody but its owner, root, and the group it is shared with may change it. Every file
    created in it gets the mode the directory gives: 0600, or 0640/0660 when it is shared with
    its group (set-group-ID, as ``hotcopy init --group`` makes it).

    Args:
        root: The repository directory (must hold ``hotcopy.json``; see :meth:`init`).
        leases: Where prefix leases come from; by default the repository's coordinator
            (started on demand), or kernel file locks for a repository shared with a group
            (the coordinator serves its own user only). ``FileLeases(root / ".hotcopy")``
            uses kernel file locks in any repository, with no coordinator process.
        checkpoint_bytes: WAL size past which a commit checkpoints automatically.
        lease_timeout: How long a writer waits for a prefix's write lease (None: forever).
        lease_ttl: Seconds a write lease survives its holder being stopped or hung (renewed in
            the background while the process runs); after that another writer may commit and
            the stopped one's commit is refused. None: held until released or the holder dies.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        leases: LeaseProvider | None = None,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        lease_timeout: float | None = None,
        lease_ttl: float | None = DEFAULT_LEASE_TTL,
    ) -> None:
        self.root = refuse_unsafe_place(Path(root).absolute())
        marker = self.root / MARKER
        try:
            info = json.loads(read_regular(marker))
        except FileNotFoundError:
            raise RepositoryNotFound(
                f"{self.root} is not a hotcopy repository (no {MARKER}); "
                "create one with Repository.init() or `hotcopy init`",
                root=str(self.root),
            ) from None
        except (ValueError, UnicodeDecodeError) as err:
            raise StorageError(f"{marker} is damaged: {err}", root=str(self.root)) from err
        if not isinstance(info, dict):
            raise StorageError(f"{marker} is damaged: not an object", root=str(self.root))
        if info.get("format") != REPOSITORY_FORMAT:
            raise StorageError(
                f"{marker}: repository format {info.get('format')!r} is not supported",
                root=str(self.root),
            )
        if not _is_repository_id(info.get("id")):
            raise StorageError(
                f"{marker} is damaged: no repository id (32 hex digits)", root=str(self.root)
            )
        self.id: str = info["id"]
        self.id_bytes = bytes.fromhex(self.id)  # as every file's header names it
        # Where the repository came from when a restore created it (None otherwise): a backup
        # catalog lets a restored repository go on backing up where its backup came from.
        lineage = info.get("lineage")
        self.lineage: dict[str, Any] | None = lineage if isinstance(lineage, dict) else None
        self.runtime_dir = self.root / RUNTIME_DIR
        os.close(open_dir(self.runtime_dir, create=True))  # checked: no link, nobody else's
        sweep_stale_temps(self.root)
        # The coordinator's leases by default (started on demand): FIFO, fenced, visible in
        # `hotcopy status`; FileLeases (kernel flock) remain for embedding without it, and
        # serve a repository shared with a group, whose members the coordinator would refuse.
        if leases is None:
            shared = shared_with_group(os.stat(self.root))
            leases = FileLeases(self.runtime_dir) if shared else connect(self.root)
        self._leases = leases
        self._checkpoint_bytes = checkpoint_bytes
        self._lease_timeout = lease_timeout
        self._lease_ttl = lease_ttl
        self._open: dict[str, Prefix] = {}
        self._closed = False

    @classmethod
    def init(
        cls,
        root: str | os.PathLike[str],
        *,
        group: str | None = None,
        lineage: dict[str, Any] | None = None,
        existing: bool = False,
        **options: Any,
    ) -> Repository:
        """Create a repository at ``root`` (parents included) or open the one already there.

        A new ``root`` is 0700 (or shared like the directory it is made in, if that is shared
        with its group). With ``group`` (a group name or number), ``root`` is shared with that
        group on purpose: 2770, its files 0660, so its members read and write it.
        ``lineage``: recorded in a repository this call creates (see :attr:`lineage`).
        ``existing``: ``root`` is a directory made before (a restore's staging directory),
        never made here: where its path no longer leads to it, nothing is made where it leads.
        """
        path = Path(root).absolute()
        gid = -1 if group is None else _group_id(group)
        if existing:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
            created = False
        else:
            created = make_directory(path, gid=gid)
        refuse_unsafe_place(path)  # after: what is checked is what we go on with
        if gid != -1 and not created:
            _share_existing(path, gid, group)
        marker: dict[str, Any] = {"format": REPOSITORY_FORMAT, "id": os.urandom(16).hex()}
        if lineage is not None:
            marker["lineage"] = lineage
        # An existing marker means it is a repository already (perhaps made a moment ago).
        with contextlib.suppress(FileExistsError):
            write_durably(path / MARKER, json.dumps(marker).encode() + b"\n", overwrite=False)
        return cls(path, **options)

    @property
    def leases(self) -> LeaseProvider:
        return self._leases

    def open_prefix(
        self, name: str, mode: str = "r", *, writable_on_demand: bool = False
    ) -> Prefix:
        """Open (with ``"rw"``, create) a prefix. One object per prefix per repository object:
        a prefix already open is returned, reopened for writing in place if ``"rw"`` is asked
        of a read-only one.

        Args:
            writable_on_demand: With ``"r"``, reopen the prefix for writing at its first change
                instead of refusing it (see :class:`Prefix`). Asking ``"r"`` without it of a
                prefix open so makes it strictly read-only.
        """
        self._check_open()
        validate_prefix_name(name)
        if mode not in ("r", "rw"):  # checked here too: an open prefix would be returned as is
            raise ValueError(f"mode must be 'r' or 'rw', not {mode!r}")
        existing = self._open.get(name)
        if existing is not None and not existing.closed:
            if mode == "rw":
                existing.open_for_writing()
            elif not writable_on_demand:
                existing.writable_on_demand = False
            return existing
        prefix = self.open_view(name, mode, writable_on_demand=writable_on_demand)
        self._open[name] = prefix
        return prefix

    def open_view(self, name: str, mode: str = "r", *, writable_on_demand: bool = False) -> Prefix:
        """A view of a prefix of its own, with this repository's settings, that the caller
        closes: unlike :meth:`open_prefix`, never the view (and transaction) other code of
        this process shares."""
        self._check_open()
        validate_prefix_name(name)
        return Prefix(
            self.root,
            name,
            mode,
            self._leases,
            self.id_bytes,
            checkpoint_bytes=self._checkpoint_bytes,
            lease_timeout=self._lease_timeout,
            lease_ttl=self._lease_ttl,
            writable_on_demand=writable_on_demand and mode == "r",
        )

    def open_prefixes(self) -> dict[str, Prefix]:
        """The prefixes this object has open, by name."""
        return {name: px for name, px in self._open.items() if not px.closed}

    @property
    def lease_timeout(self) -> float | None:
        return self._lease_timeout

    @property
    def lease_ttl(self) -> float | None:
        """The TTL of every lease this repository object takes (see the class docstring)."""
        return self._lease_ttl

    def copy_prefix(
        self,
        dest: str | os.PathLike[str],
        prefix: str | None = None,
        page_io_step_size: int = DEFAULT_STEP,
        progress: Progress | None = None,
        *,
        base: BaseRef | None = None,
        cut: Cut | None = None,
        sync: bool = True,
        sweep_temps: bool = True,
        rate_limit: float | None = None,
    ) -> CopyResult:
        """Write a consistent copy of ``prefix`` to the new file ``dest`` while writers go on.

        The prefix need not be open. Without ``prefix``, the only prefix open through this
        object is copied; with none or several open, ``RuntimeError``. ``rate_limit``: bytes
        per second at most, on average.
        """
        self._check_open()
        if prefix is None:
            open_names = list(self.open_prefixes())
            if len(open_names) != 1:
                raise RuntimeError(
                    "copy_prefix needs a prefix name: "
                    + ("no prefix is open" if not open_names else "several prefixes are open")
                )
            prefix = open_names[0]
        return copy_prefix(
            self,
            dest,
            validate_prefix_name(prefix),
            page_io_step_size,
            progress,
            base=base,
            cut=cut,
            sync=sync,
            sweep_temps=sweep_temps,
            rate_limit=rate_limit,
        )

    def restore_prefix(
        self, source: str | os.PathLike[str], prefix: str, *, force: bool = False
    ) -> int:
        """Replace (``force``) or create ``prefix`` from a copy; return its commit number."""
        self._check_open()
        validate_prefix_name(prefix)
        open_prefix = self.open_prefixes().get(prefix)
        if open_prefix is not None and open_prefix.in_transaction:
            # Our own transaction holds the write lease the exclusive lease waits for: refuse
            # (as compaction does) rather than wait on ourselves for ever.
            raise StorageError(
                f"prefix {prefix!r} has a transaction in progress; commit or roll back first",
                prefix=prefix,
            )
        return restore_prefix_file(self, source, prefix, force=force)

    def salvage_prefix(self, name: str) -> Salvaged:
        """Keep what is provable of a damaged prefix (see ``hotcopy salvage``); a sound prefix
        is left as it is (``damage`` is None then)."""
        self._check_open()
        validate_prefix_name(name)
        open_prefix = self.open_prefixes().get(name)
        if open_prefix is not None:
            open_prefix.close()  # it would follow the files anyway; no transaction survives
        with self._leases.lease(
            name, "exclusive", timeout=self._lease_timeout, ttl=self._lease_ttl
        ) as lease:
            log = Log(self.root, name, self.id_bytes, writable=True, scan=True, tolerant=True)
            try:
                return log.salvage(lease)
            finally:
                log.close()

    def migrate_prefix(self, name: str) -> int | None:
        """Rewrite prefix ``name`` in the current file format (through a compaction, under its
        exclusive lease): the format it was in, or None if it was current (nothing changed)."""
        self._check_open()
        validate_prefix_name(name)
        open_prefix = self.open_prefixes().get(name)
        if open_prefix is not None:
            open_prefix.close()
        with self._leases.lease(
            name, "exclusive", timeout=self._lease_timeout, ttl=self._lease_ttl
        ) as lease:
            return migrate_files(self.root, name, self.id_bytes, lease)

    def prefixes(self) -> list[str]:
        """Names of every prefix in the repository, sorted."""
        self._check_open()
        names = []
        for entry in os.scandir(self.root):
            # A link is not a prefix: hotcopy never follows one it did not make.
            if entry.name.endswith(".hc") and entry.is_file(follow_symlinks=False):
                name = entry.name[: -len(".hc")]
                if _PREFIX_NAME.fullmatch(name):
                    names.append(name)
        return sorted(names)

    def prefix_path(self, name: str) -> Path:
        """The main file of prefix ``name`` (validated; it need not exist)."""
        return main_path(self.root, validate_prefix_name(name))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every prefix opened through this object, rolling back what none of them
        committed (as :meth:`Prefix.close` does); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for prefix in self._open.values():
                prefix.close()
        finally:
            self._open.clear()
            self._leases.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"repository {self.root} is closed", root=str(self.root))

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repository {str(self.root)!r}>"
