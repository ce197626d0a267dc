"""Test-wide hygiene for coordinators, which repositories start on demand.

A coordinator is a detached process (it must outlive the client that started it), so tests
cannot reap it as a child. Every coordinator started under a test's tmp_path is stopped
after that test (SIGTERM, a grace period, SIGKILL) and waited for until it is gone, and a
short idle timeout makes any other one exit by itself soon after its last client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import hotcopy.storage as hc
import psutil
import pytest
from hotcopy.coordinator._paths import RuntimePaths

os.environ.setdefault("HOTCOPY_COORDINATOR_IDLE_TIMEOUT", "5")


def _register_support() -> None:
    """Make tests/_storage_helpers.py importable by the test modules.

    With --import-mode=importlib the tests directory is not on sys.path (by design: the repo
    root must not be either), so the shared helpers are loaded here, once, and offered as
    ``from hotcopy_test_support import storage_helpers``.
    """
    spec = importlib.util.spec_from_file_location(
        "hotcopy_storage_test_helpers", Path(__file__).with_name("_storage_helpers.py")
    )
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helpers
    spec.loader.exec_module(helpers)
    support = types.ModuleType("hotcopy_test_support")
    support.storage_helpers = lambda: helpers  # type: ignore[attr-defined]
    sys.modules[support.__name__] = support


_register_support()


def _coordinators_under(directory: Path) -> list[psutil.Process]:
    found = []
    for pid_file in directory.glob("**/.hotcopy/coordinator.pid"):
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            process = psutil.Process(int(pid_file.read_text().split()[0]))
            if any("hotcopy.coordinator" in part for part in process.cmdline()):
                found.append(process)
    return found


def _gone(process: psutil.Process) -> bool:
    # A detached coordinator's parent is PID 1, which may reap late: a zombie has exited and
    # released everything it held, so it counts as gone.
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.005)  # polling an unrelated process's exit: no event to wait on
        alive = [p for p in alive if not _gone(p)]
    return alive


def stop_coordinators(directory: Path) -> None:
    """Stop every coordinator of a repository under ``directory`` and wait until it is gone."""
    processes = _coordinators_under(directory)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()  # a clean exit removes its /dev/shm segment
    for process in _wait_gone(processes, timeout=5):
        with contextlib.suppress(psutil.Error):
            process.kill()
    _wait_gone(processes, timeout=5)


def remove_segments(directory: Path) -> None:
    """Remove the /dev/shm segments of the repositories under ``directory`` (their
    coordinators are stopped): a segment kept for a successor must not outlive the test."""
    for runtime in directory.glob("**/.hotcopy"):
        with contextlib.suppress(Exception):
            segment = RuntimePaths.for_root(runtime.parent).segment_path()
            if segment is not None:
                segment.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _coordinators_stopped(tmp_path: Path) -> Iterator[None]:
    yield
    stop_coordinators(tmp_path)
    remove_segments(tmp_path)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """For the object tests: a repository (module API, ``hotcopy.storage.init``) with prefix
    "main" open and current; closed after the test. Test modules may define their own."""
    hc.init(tmp_path / "repo")
    hc.open("main", "rw")
    try:
        yield tmp_path / "repo"
    finally:
        hc.close()
