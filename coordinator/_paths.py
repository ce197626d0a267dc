"""Where a repository's coordinator keeps its runtime files, and keeping them private.

Everything lives in ``ROOT/.hotcopy/`` (mode 0700) except the shared memory segment,
which is a plain file under ``/dev/shm`` named after the repository's identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._errors import CoordinatorUnavailable

__all__ = ["RuntimePaths", "peer_uid", "unix_address"]

RUNTIME_DIR_NAME = ".hotcopy"
SHM_DIR = Path("/dev/shm")

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SUN_PATH = 107


@dataclass(frozen=True, slots=True)
class RuntimePaths:
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

        The segment name hashes the real path *and* the directory's device and inode, so
        a repository deleted and recreated at the same path gets a fresh segment.

        Raises:
            FileNotFoundError: ``root`` does not exist.
            NotADirectoryError: ``root`` is not a directory.
        """
        real = Path(os.path.realpath(root))
        info = os.stat(real)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(f"repository root {str(real)!r} is not a directory")
        key = f"{real}\0{info.st_dev}\0{info.st_ino}".encode()
        digest = hashlib.sha256(key).hexdigest()[:24]
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
            segment_key=digest,
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
            salt = secrets.token_hex(8)
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
        """Create ``ROOT/.hotcopy`` with mode 0700, or check and tighten an existing one.

        Raises:
            PermissionError: The directory belongs to another user (its files could be
                planted by them), or it is a symlink.
        """
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.runtime_dir, 0o700)
        info = os.lstat(self.runtime_dir)
        if not stat.S_ISDIR(info.st_mode):
            raise PermissionError(
                f"{str(self.runtime_dir)!r} is not a directory (a symlink?): remove it"
            )
        if info.st_uid != os.getuid():
            raise PermissionError(
                f"{str(self.runtime_dir)!r} belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.getuid()}): remove it or run as its owner"
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            # mkdir honours the umask and an older directory may be looser: tighten it.
            os.chmod(self.runtime_dir, 0o700)


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
