"""Shared helpers of the storage tests (not a test module; loaded by path, see ``load``).

With ``--import-mode=importlib`` the tests directory is not on ``sys.path``, so the test files
load this module with :func:`importlib.util.spec_from_file_location` (see the top of each).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
from hotcopy.storage import _format as fmt

PYTHON = sys.executable
GRACE = 5.0  # seconds a stopped child gets before it is killed


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (directories too), relative and sorted: a before/after listing."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def coordinators_of(work: Path) -> list[psutil.Process]:
    """The live coordinators whose command line names a path under ``work``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        alive = process.info["status"] != psutil.STATUS_ZOMBIE
        if alive and "hotcopy.coordinator" in cmdline and str(work) in cmdline:
            found.append(process)
    return found


def reap(processes: Iterable[Any]) -> None:
    """Stop and reap multiprocessing children: terminate, join with a grace period, then kill."""
    processes = list(processes)
    for proc in processes:
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
    for proc in processes:
        if proc.pid is None:
            continue
        proc.join(GRACE)
        if proc.is_alive():
            proc.kill()
            proc.join(GRACE)


def reap_popen(proc: subprocess.Popen[Any]) -> None:
    """The same for a ``subprocess.Popen`` child."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(GRACE)


def run_python(
    code: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:] == args``); reaped even on timeout."""
    full_env = dict(os.environ)
    for name in ("HOTCOPY_FAULT", "HOTCOPY_FAULT_AFTER"):
        full_env.pop(name, None)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [PYTHON, "-c", code, *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        reap_popen(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> int:
    """XOR the byte at ``offset`` of ``path`` with ``mask``; return the original byte."""
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ mask]))
    return original


def wal_used(path: Path, header_size: int | None = None) -> int:
    """Bytes of a WAL in use: its header and batches, not the zeros reserved after them."""
    data = path.read_bytes()
    if header_size is None:
        header_size = fmt.unpack_wal_header(data[: fmt.HEADER_SIZE]).size
    return header_size + len(data[header_size:].rstrip(b"\0"))


def dump_repository(
    root: Path, names: Iterable[str] | None = None, *, kernel_locks: bool = False
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each prefix of the repository at ``root`` (or just ``names``): its commit seq and
    contents. ``kernel_locks``: through file locks, without starting a coordinator (for the
    many short-lived repositories a test restores)."""
    from hotcopy.storage import FileLeases, Repository

    leases = FileLeases(root / ".hotcopy") if kernel_locks else None
    with Repository(root, leases=leases) as repo:
        found = {}
        for name in repo.prefixes() if names is None else names:
            with repo.open_prefix(name, "r") as px:
                found[name] = (px.seq, {key: px[key] for key in px})
        return found


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount_point`` (made here) with ``options`` (``mode=0700`` unless
    they say otherwise: a world-writable mount is refused as an unsafe place); a skip where
    this process may not mount one. Unmounted after, its coordinators stopped first."""
    import pytest

    mount_point.mkdir()
    if "mode=" not in options:
        options += ",mode=0700"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        try:
            wanted = str(Path(__file__).with_name("conftest.py"))
            for module in list(sys.modules.values()):
                if getattr(module, "__file__", None) == wanted:
                    module.stop_coordinators(mount_point)  # their files are on this disk
                    module.remove_segments(mount_point)
        finally:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


class HeldThread:
    """A thread held at a line (see :func:`thread_held_at`)."""

    def __init__(self, thread: threading.Thread, go: threading.Event) -> None:
        self.found: dict[str, Any] = {}  # "result" or "error", once it is done
        self._thread = thread
        self._go = go

    def release(self, wait: float = 0.0) -> None:
        """Let it go on, and wait up to ``wait`` seconds for it to end."""
        self._go.set()
        self._thread.join(wait)


@contextlib.contextmanager
def thread_held_at(
    function: Callable[..., Any], text: str, action: Callable[[], Any]
) -> Iterator[HeldThread]:
    """Run ``action`` in a thread that is held at each line of ``function`` containing
    ``text`` (through ``sys.settrace``) until it is released or the block ends; what it
    returned or raised is in ``found`` once the block ends."""
    lines, first = inspect.getsourcelines(function)
    target = first + next(i for i, line in enumerate(lines) if text in line)
    inside, go = threading.Event(), threading.Event()

    def at_line(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target:
            inside.set()
            assert go.wait(60)
        return at_line

    def trace(frame: Any, event: str, arg: Any) -> Any:
        return at_line if frame.f_code is function.__code__ else None

    def run() -> None:
        sys.settrace(trace)
        try:
            held.found["result"] = action()
        except Exception as err:  # what the test reports
            held.found["error"] = err
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=run)
    held = HeldThread(thread, go)
    thread.start()
    try:
        assert inside.wait(60)
        yield held
    finally:
        held.release(60)


def io_count(field: str) -> int:
    """This process's counter ``field`` of ``/proc/self/io``: ``rchar``, the bytes its reads
    (and ``copy_file_range``) passed, or ``syscr``, its read calls."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith(f"{field}:")).split()[1])
