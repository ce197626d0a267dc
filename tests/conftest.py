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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import psutil
import pytest
from hotcopy.coordinator._paths import RuntimePaths

os.environ.setdefault("HOTCOPY_COORDINATOR_IDLE_TIMEOUT", "5")


def _load(name: str, filename: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _register_support() -> types.ModuleType:
    """Make tests/_storage_helpers.py and tests/_s3server.py importable by the test modules.

    With --import-mode=importlib the tests directory is not on sys.path (by design: the repo
    root must not be either), so the shared helpers are loaded here, once, and offered as
    ``from hotcopy_test_support import storage_helpers, s3server``.
    """
    helpers = _load("hotcopy_storage_test_helpers", "_storage_helpers.py")
    s3server = _load("hotcopy_s3_test_server", "_s3server.py")
    support = types.ModuleType("hotcopy_test_support")
    support.storage_helpers = lambda: helpers  # type: ignore[attr-defined]
    support.s3server = lambda: s3server  # type: ignore[attr-defined]
    sys.modules[support.__name__] = support
    return s3server


_s3server = _register_support()


def _coordinators_under(directory: Path) -> list[psutil.Process]:
    found = []
    for pid_file in directory.glob("**/.hotcopy/coordinator.pid"):
        # IndexError: a coordinator starting now has not written its pid yet (it is found
        # by stop_coordinators' next look, or exits idle).
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server for the session (see tests/_s3server.py): moto as a child process on a
    free port, or the one ``HOTCOPY_TEST_S3_ENDPOINT`` names. A test may ``kill()`` and
    ``start()`` it; a restarted moto is empty."""
    server = _s3server.S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """``(url, endpoint_url)`` of a fresh, empty bucket (``s3://hotcopy-test-<hex>/catalog``),
    emptied and removed after the test. Against moto, fake credentials and no ~/.aws files."""
    import boto3

    if not s3_server.external:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = f"hotcopy-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}/catalog", s3_server.endpoint_url
    finally:
        with contextlib.suppress(Exception):  # a test may have killed the server
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)
