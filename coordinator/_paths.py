"""Where a repository's coordinator keeps its runtime files, and keeping them private.

Everything lives in ``ROOT/.hotcopy/`` (mode 0700) except the shared memory segment,
which is a plain file under ``/dev/shm`` named after the repository's identity.

This module also holds the one rule for every directory hotcopy keeps files in (a
repository, its runtime directory, a backup catalog): :func:`check_place` refuses one that
somebody hotcopy does not trust could change, and :func:`file_mode_in` / :func:`dir_mode_in`
derive what is created there from the directory itself: private (0600/0700) unless the
directory is shared with its group on purpose. It lives here, in the lowest layer, because
the coordinator's own runtime directory is checked by it too.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ._errors import CoordinatorUnavailable, UnsafePlace

__all__ = [
    "RuntimePaths",
    "check_place",
    "dir_mode_in",
    "file_mode_in",
    "open_dir_at",
    "peer_uid",
    "shared_with_group",
    "trusted_owner",
    "unix_address",
    "user_name",
]

RUNTIME_DIR_NAME = ".hotcopy"
SHM_DIR = Path("/dev/shm")

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SUN_PATH = 107


class RuntimePaths(NamedTuple):
    """The runtime files of one repository.

    Attributes:
        root: The repository root, resolved.
        runtime_dir: ``ROOT/.hotcopy``.
        lock: The election lock file.
        socket: The coordinator's Unix socket.
        tokens: The durable fencing-token high-water mark.
        pid: The pid file of the running coordinator (informational only).
        log: The detached coordinator's log file.
        segment_salt: The file holding the random part of the segment's name.
        segment_key: The fixed part of the segment's name (see :meth:`segment_path`).
    """

    root: Path
    runtime_dir: Path
    lock: Path
    socket: Path
    tokens: Path
    pid: Path
    log: Path
    segment_salt: Path
    segment_key: str

    @classmethod
    def for_root(cls, root: str | os.PathLike[str]) -> RuntimePaths:
        """Name the runtime files of the repository at ``root`` (which must exist).

        The segment name holds the directory's device and inode, which no other live
        directory shares, and the salt kept in the runtime directory, which a repository
        deleted and recreated at the same path (perhaps on the same inode) does not inherit.
        (Not a hash of them: ``hashlib`` would load OpenSSL, 3.6 MiB in every process.)

        Raises:
            FileNotFoundError: ``root`` does not exist.
            NotADirectoryError: ``root`` is not a directory.
        """
        real = Path(os.path.realpath(root))
        info = os.stat(real)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(f"repository root {str(real)!r} is not a directory")
        runtime = real / RUNTIME_DIR_NAME
        return cls(
            root=real,
            runtime_dir=runtime,
            lock=runtime / "coordinator.lock",
            socket=runtime / "coordinator.sock",
            tokens=runtime / "tokens",
            pid=runtime / "coordinator.pid",
            log=runtime / "coordinator.log",
            segment_salt=runtime / "segment-salt",
            segment_key=f"{info.st_dev:x}-{info.st_ino:x}",
        )

    def segment_path(self, *, create: bool = False) -> Path | None:
        """Return the shared memory segment's path under ``/dev/shm``.

        The name is ``hotcopy-<hash of root, device, inode>-<salt>``, where the salt is a
        random string kept in the private ``ROOT/.hotcopy/``: /dev/shm is world-writable,
        and a predictable name would let another user squat it (a planted file the
        coordinator cannot replace, or a fake lease table for readers).

        Args:
            create: Create the salt if there is none yet (the coordinator does).

        Returns:
            The path, or None when no salt exists and ``create`` is False (no coordinator
            ever ran for this repository).
        """
        try:
            salt = self.segment_salt.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not create:
                return None
            salt = os.urandom(8).hex()
            try:
                fd = os.open(
                    self.segment_salt,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except FileExistsError:
                salt = self.segment_salt.read_text(encoding="ascii").strip()
            else:
                with os.fdopen(fd, "w", encoding="ascii") as file:
                    file.write(salt)
                    file.flush()
                    os.fsync(file.fileno())
        if not salt.isalnum() or len(salt) > 64:
            raise PermissionError(
                f"{str(self.segment_salt)!r} is malformed: remove it (no coordinator may run)"
            )
        return SHM_DIR / f"hotcopy-{self.segment_key}-{salt}"

    def ensure_runtime_dir(self) -> None:
        """Create ``ROOT/.hotcopy`` (0700, or shared like ROOT), or check and tighten it.

        Raises:
            UnsafePlace: The directory belongs to another user (its files could be planted
                by them), others may write in it, or it is a symlink.
        """
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.close(open_dir_at(root_fd, RUNTIME_DIR_NAME, self.runtime_dir))
        finally:
            os.close(root_fd)


# -- who may change a place: the one rule ---------------------------------------------------

_GROUP_RX = stat.S_IRGRP | stat.S_IXGRP


def shared_with_group(info: os.stat_result) -> bool:
    """Whether the directory ``info`` is shared with its group on purpose.

    That is: set-group-ID, and its group may enter and list it. Group bits alone say
    nothing, since ``mkdir`` under the usual umask 022 gives every directory group r-x; the
    set-group-ID bit is what makes files created inside belong to the directory's group, which
    sharing needs anyway, and nobody gets it by accident. ``hotcopy init --group`` sets it.
    """
    return bool(info.st_mode & stat.S_ISGID) and info.st_mode & _GROUP_RX == _GROUP_RX


def _shared_writable(info: os.stat_result) -> bool:
    return shared_with_group(info) and bool(info.st_mode & stat.S_IWGRP)


def file_mode_in(directory: os.stat_result) -> int:
    """The exact mode of a file hotcopy creates in ``directory``: 0600; 0640 or 0660 (as the
    directory allows its group to write) in a directory shared with its group. The "other"
    bits of the directory are never copied."""
    if not shared_with_group(directory):
        return 0o600
    return 0o640 | (directory.st_mode & stat.S_IWGRP)


def dir_mode_in(directory: os.stat_result) -> int:
    """The exact mode of a directory hotcopy creates in ``directory``: 0700; 2750 or 2770 in a
    directory shared with its group (set-group-ID again, so sharing goes on below)."""
    if not shared_with_group(directory):
        return 0o700
    return stat.S_ISGID | 0o750 | (directory.st_mode & stat.S_IWGRP)


def _in_group(gid: int) -> bool:
    return gid == os.getegid() or gid in os.getgroups()


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_name(uid: int) -> str:
    """``uid N (login)``, for messages."""
    login = _login(uid)
    return f"uid {uid}" if login == str(uid) else f"uid {uid} ({login})"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def trusted_owner(info: os.stat_result, place: os.stat_result) -> bool:
    """Whether an entry ``info`` of the directory ``place`` was made by someone we trust.

    Ours, root's, or, in a place its group may write because it is shared with it, made
    there by a member of that group (it carries the place's group).
    """
    if info.st_uid in (os.geteuid(), 0):
        return True
    return _shared_writable(place) and info.st_gid == place.st_gid


def check_place(
    path: str | os.PathLike[str], info: os.stat_result, *, ancestor: bool = False
) -> None:
    """Refuse the directory ``path`` (its ``stat`` is ``info``) if an untrusted user could
    change what is in it.

    Trusted are this user, root, and, in a directory shared with a group on purpose
    (:func:`shared_with_group`) that this user belongs to, that group. Refused: anything
    but a directory; a directory of another user; one every user may write, sticky or not
    (the sticky bit keeps others from removing our files, not from creating the names we
    would use next: a prefix's WAL, a backup); one its group may write without being shared
    with it.

    With ``ancestor``, ``path`` is a directory on the way to the place: there a sticky one
    that others may write is fine (``/tmp``), since they cannot rename what is ours in it.

    Raises:
        UnsafePlace: With the command that makes it safe.
    """
    where = os.fspath(path)
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePlace(f"{where!r} is not a directory (a symlink?): remove it", path=where)
    shared = shared_with_group(info)
    if info.st_uid not in (os.geteuid(), 0) and not (shared and _in_group(info.st_gid)):
        raise UnsafePlace(
            f"{where!r} belongs to {user_name(info.st_uid)}, not to this user "
            f"({user_name(os.geteuid())}): run hotcopy as its owner, or "
            f"`chown {_login(os.geteuid())} {where}`",
            path=where,
        )
    if ancestor and mode & stat.S_ISVTX:
        return
    if mode & stat.S_IWOTH:
        sticky = " (the sticky bit does not help)" if mode & stat.S_ISVTX else ""
        raise UnsafePlace(
            f"{where!r} is writable by every user (mode {mode:o}){sticky}: `chmod o-w {where}`",
            path=where,
        )
    if mode & stat.S_IWGRP and not shared:
        raise UnsafePlace(
            f"{where!r} is writable by group {_group_name(info.st_gid)} (mode {mode:o}) "
            f"without being shared with it: `chmod g-w {where}`, or share it on purpose "
            f"with `chmod g+s {where}`",
            path=where,
        )


def open_dir_at(parent_fd: int, name: str, path: Path, *, create: bool = True) -> int:
    """A descriptor on the directory ``name`` of ``parent_fd``, never through a symlink,
    checked by :func:`check_place`; created (``create``) with :func:`dir_mode_in` the parent.

    A directory of ours that is looser than its parent's policy is tightened (``mkdir``
    honours the umask, and an older one may have been made looser).

    Args:
        path: The directory's path, for messages.

    Raises:
        UnsafePlace: It is a symlink or not a directory, or fails :func:`check_place`.
        FileNotFoundError: It does not exist and ``create`` is False.
    """
    policy = dir_mode_in(os.fstat(parent_fd))
    created = False
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)  # never wider than 0700 until checked
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePlace(
                f"{str(path)!r} is not a directory (a symlink?): remove it", path=str(path)
            ) from None
        raise
    try:
        info = os.fstat(fd)
        check_place(path, info)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == os.geteuid() and (created or mode & ~policy):
            os.fchmod(fd, policy if created else mode & policy)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """Yield an address for ``path`` usable with bind/connect despite the 107-byte limit.

    Long paths (deep temporary directories) go through ``/proc/self/fd/N/<name>``, where
    N is an ``O_PATH`` descriptor of the parent directory, which Linux resolves like the
    real path (permission checks included).
    """
    text = str(path)
    if len(os.fsencode(text)) <= _MAX_SUN_PATH:
        yield text
        return
    try:
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise CoordinatorUnavailable(f"cannot open {str(path.parent)!r}: {err}", path=text) from err
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """Return (pid, uid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid
