"""What the coordinator of a repository is doing, read from shared memory (no round trip),
and who the lease holders are (program, command line, state), read with psutil."""

from __future__ import annotations

import os
import shlex
import time
from typing import Any, NamedTuple

from ._errors import LeaseError
from ._paths import RuntimePaths
from ._process import ProcessIdentity, boot_id, is_alive
from ._protocol import MODE_NAMES
from ._segment import SegmentReader, SegmentTorn

__all__ = [
    "STATUS_VERSION",
    "LeaseStatus",
    "ProcessInfo",
    "Status",
    "describe_process",
    "format_status",
    "read_status",
    "status_to_json",
]

STATUS_VERSION = 1  # of ``hotcopy status --json`` (README); a change of meaning gets a new one

# psutil's process states, as an operator chasing a stuck lease needs them: a sleeping
# process is running as far as its lease goes; a stopped one (SIGSTOP, a debugger) holds its
# leases until their TTL; a zombie has exited (its leases went with its connection).
# (psutil's STATUS_* values: it is imported only where a process is described, so that a
# process that only reads and writes prefixes does not carry it.)
_STATES = {"stopped": "stopped", "tracing-stop": "stopped", "zombie": "zombie", "dead": "gone"}


class ProcessInfo(NamedTuple):
    """Who a process is, for a person: its program, command line and state.

    Attributes:
        pid: The process id.
        name: The program's name (``python3``), None if it could not be read.
        cmdline: Its command line, empty if it could not be read.
        state: ``running``, ``stopped``, ``zombie`` or ``gone`` (no such process any more,
            or another process with its pid).
    """

    pid: int
    name: str | None
    cmdline: tuple[str, ...]
    state: str

    def __str__(self) -> str:
        """``pid 123 (python3 app.py, stopped)``: one phrase for a message."""
        if self.state == "gone":
            return f"pid {self.pid} (gone)"
        program = self.program()
        if len(program) > 100:
            program = program[:97] + "..."
        return f"pid {self.pid} ({program}, {self.state})"

    def program(self) -> str:
        """The command line on one line (the program by its name), or the name alone."""
        if not self.cmdline:
            return self.name or "?"
        return " ".join(shlex.join([os.path.basename(self.cmdline[0]), *self.cmdline[1:]]).split())

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "cmdline": list(self.cmdline),
            "state": self.state,
        }


def describe_process(pid: int, start_ticks: int | None = None) -> ProcessInfo:
    """Describe process ``pid``; with ``start_ticks`` (its identity, see ``_process``), a
    process that reuses the pid is reported ``gone``, not mistaken for the holder."""
    current = ProcessIdentity.of(pid) if start_ticks is not None else None
    if current is not None and current.start_ticks != start_ticks:  # the pid was reused
        return ProcessInfo(pid, None, (), "gone")
    import psutil

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            status = process.status()
            name = process.name()
            try:
                cmdline = tuple(process.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
    except psutil.NoSuchProcess:
        return ProcessInfo(pid, None, (), "gone")
    except psutil.AccessDenied:
        return ProcessInfo(pid, None, (), "running")
    return ProcessInfo(pid, name, cmdline, _STATES.get(status, "running"))


class LeaseStatus(NamedTuple):
    """One granted lease.

    Attributes:
        prefix: The leased prefix.
        mode: Its mode name.
        pid: The holder's pid.
        age: Seconds since the grant.
        token: The fencing token.
        expires_in: Seconds until it expires without renewal, None without a ttl.
        holder: Who holds it (program, command line, state).
    """

    prefix: str
    mode: str
    pid: int
    age: float
    token: int
    expires_in: float | None
    holder: ProcessInfo


class Status(NamedTuple):
    """A snapshot of a repository's coordinator.

    Attributes:
        root: The repository root.
        pid: The coordinator's pid, None if no coordinator runs.
        uptime: Seconds since it started, None if none runs.
        next_token: The next fencing token it will grant (0 if it never ran).
        leases: Granted leases, by prefix then token.
        waiters: Queued requests per prefix (only prefixes with waiters).
    """

    root: str
    pid: int | None
    uptime: float | None
    next_token: int
    leases: tuple[LeaseStatus, ...]
    waiters: dict[str, int]


def read_status(root: str | os.PathLike[str]) -> Status:
    """Read the status of the coordinator of ``root`` from shared memory.

    Never starts a coordinator and never raises because none runs: ``pid`` is then None.
    Leases left in shared memory by a dead coordinator are still listed (a successor
    will recover them).

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    paths = RuntimePaths.for_root(root)
    try:
        path = paths.segment_path()
        if path is None:
            raise FileNotFoundError("no coordinator ever ran here")
        segment = SegmentReader(path)
    except (FileNotFoundError, NotADirectoryError, LeaseError):
        return Status(str(paths.root), None, None, 0, (), {})
    with segment:
        try:
            header = segment.header()
        except SegmentTorn:  # its coordinator killed or stopped mid-header: nothing to trust
            return Status(str(paths.root), None, None, 0, (), {})
        now = time.monotonic()
        pid: int | None = None
        uptime: float | None = None
        if header.pid and is_alive(ProcessIdentity(header.pid, header.start_ticks, header.boot)):
            pid = header.pid
            uptime = max(0.0, now - header.started_monotonic)
        leases = tuple(
            sorted(
                (
                    LeaseStatus(
                        prefix=r.prefix,
                        mode=MODE_NAMES.get(r.mode, f"mode-{r.mode}"),
                        pid=r.pid,
                        age=max(0.0, now - r.granted_at),
                        token=r.token,
                        expires_in=(r.expires_at - now) if r.expires_at else None,
                        holder=describe_process(r.pid, r.start_ticks),
                    )
                    for r in segment.leases(skip_torn=True)
                ),
                key=lambda lease: (lease.prefix, lease.token),
            )
        )
        waiters = {name: n for _, name, n, _ in segment.prefixes(skip_torn=True) if n}
        if header.boot != boot_id():
            leases = ()
        return Status(str(paths.root), pid, uptime, header.next_token, leases, waiters)


def status_to_json(status: Status) -> dict[str, Any]:
    """Render ``status`` as a JSON-ready dict (the ``hotcopy status --json`` shape)."""
    return {
        "version": STATUS_VERSION,
        "root": status.root,
        "coordinator": {
            "pid": status.pid,
            "uptime": None if status.uptime is None else round(status.uptime, 3),
            "next_token": status.next_token,
        },
        "leases": [
            {
                "prefix": lease.prefix,
                "mode": lease.mode,
                "pid": lease.pid,
                "age": round(lease.age, 3),
                "token": lease.token,
                "expires_in": None if lease.expires_in is None else round(lease.expires_in, 3),
                "holder": lease.holder.to_json(),
            }
            for lease in status.leases
        ],
        "waiters": dict(sorted(status.waiters.items())),
    }


def format_status(status: Status) -> str:
    """Render ``status`` as a readable table for a terminal."""
    if status.pid is None:
        lines = [f"coordinator: not running ({status.root})"]
    else:
        lines = [f"coordinator: pid {status.pid}, up {status.uptime or 0.0:.1f}s ({status.root})"]
    if status.leases:
        width = max(6, *(len(lease.prefix) for lease in status.leases))
        lines.append(
            f"{'PREFIX':<{width}}  {'MODE':<9}  {'PID':>7}  {'STATE':<8}  {'HELD':>9}  "
            f"{'TOKEN':>8}  PROGRAM"
        )
        for lease in status.leases:
            holder = lease.holder
            lines.append(
                f"{lease.prefix:<{width}}  {lease.mode:<9}  {lease.pid:>7}  {holder.state:<8}  "
                f"{lease.age:>8.1f}s  {lease.token:>8}  {holder.program()}"
            )
    else:
        lines.append("no leases held")
    if status.waiters:
        lines.append("waiters: " + ", ".join(f"{k}={v}" for k, v in sorted(status.waiters.items())))
    return "\n".join(lines)
