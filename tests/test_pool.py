"""CopyWorkerPool: real worker processes, real pickling, real SIGKILLs.

Jobs are closures made inside this module's functions (dill ships them by value) or stdlib
functions: a function defined at the top level of a test module is pickled by reference, and a
worker cannot import test modules (``--import-mode=importlib``) -- which is itself a case below.

A job that must stay running while the test acts on it connects to a Unix socket the test
listens on (abstract namespace: no path, no length limit), reports its pid and blocks reading
until the test sends a byte or closes: a rendezvous without sleeping.
"""

from __future__ import annotations

import json
import operator
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, wait
from pathlib import Path
from typing import Any

import psutil
import pytest
from hotcopy.workers import CopyWorkerPool, WorkerDied
from hotcopy.workers._errors import RemoteTraceback

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

WAIT = 30.0  # bound on any single wait for a worker; far above what a healthy run needs


def _blocking_job() -> Callable[[str], str]:
    """A job that reports its pid over a Unix socket, then blocks until released."""

    def job(address: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            sock.sendall(f"{os.getpid()}\n".encode())
            return "released" if sock.recv(1) else "closed"

    return job


class Rendezvous:
    """The test's end of :func:`_blocking_job`: accepts jobs and releases them."""

    def __init__(self) -> None:
        self.address = f"\0hotcopy-test-pool-{secrets.token_hex(8)}"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.address)
        self._server.listen(8)
        self._server.settimeout(WAIT)
        self.jobs: list[tuple[socket.socket, int]] = []

    def accept(self) -> tuple[socket.socket, int]:
        conn, _ = self._server.accept()
        conn.settimeout(WAIT)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(64)
            assert chunk, "a job hung up before reporting its pid"
            data += chunk
        self.jobs.append((conn, int(data)))
        return conn, int(data)

    def close(self) -> None:
        for conn, _ in self.jobs:
            conn.close()
        self._server.close()


@pytest.fixture
def rendezvous() -> Iterator[Rendezvous]:
    point = Rendezvous()
    try:
        yield point
    finally:
        point.close()


@pytest.fixture
def pools() -> Iterator[list[CopyWorkerPool]]:
    """Pools made by a test; each is stopped (workers killed and reaped) whatever happens."""
    made: list[CopyWorkerPool] = []
    try:
        yield made
    finally:
        for pool in made:
            pool.terminate()


def _workers_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Bounded wait on an observable outcome (a condition other threads change)."""
    event = threading.Event()
    deadline = threading.Timer(timeout, event.set)
    deadline.start()
    try:
        while not predicate():
            if event.wait(0.01):
                return predicate()
        return True
    finally:
        deadline.cancel()


# -- results, exceptions, closures ------------------------------------------------------------


def test_results_come_back_from_stdlib_functions_and_closures(
    pools: list[CopyWorkerPool],
) -> None:
    pool = CopyWorkerPool(2)
    pools.append(pool)
    offset = 1000
    parent = os.getpid()

    def where_and_what(x: int) -> tuple[int, int]:
        return os.getpid(), x + offset  # a global module and a captured variable

    adds = [pool.submit(operator.add, i, i) for i in range(10)]
    closures = [pool.submit(where_and_what, i) for i in range(10)]
    assert [f.result(WAIT) for f in adds] == [2 * i for i in range(10)]
    results = [f.result(WAIT) for f in closures]
    assert [value for _, value in results] == [i + offset for i in range(10)]
    ran_in = {pid for pid, _ in results}
    assert parent not in ran_in
    assert ran_in <= set(pool.pids)
    assert list(pool.map(lambda s: s.upper(), ["a", "b"], timeout=WAIT)) == ["A", "B"]
    assert pool.submit(lambda **kw: sorted(kw), b=1, a=2).result(WAIT) == ["a", "b"]
    assert pool.replaced == 0


def test_an_exception_comes_back_with_the_remote_traceback_as_its_cause(
    pools: list[CopyWorkerPool],
) -> None:
    pool = CopyWorkerPool(1)
    pools.append(pool)

    def deep_in_the_worker(n: int) -> None:
        raise ValueError(f"boom {n} in {os.getpid()}")

    def job() -> None:
        deep_in_the_worker(42)

    error = pool.submit(job).exception(WAIT)
    assert isinstance(error, ValueError)
    assert str(error).startswith("boom 42 in ")
    assert int(str(error).rsplit(" ", 1)[1]) in pool.pids  # raised in the worker
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "deep_in_the_worker" in cause.text
    assert "ValueError: boom 42" in cause.text
    assert cause.text.startswith("Traceback (most recent call last):")
    with pytest.raises(ValueError, match="boom 42"):
        pool.submit(job).result(WAIT)
    # A failing job does not cost the worker.
    assert pool.submit(lambda: 7).result(WAIT) == 7
    assert pool.replaced == 0


@pytest.fixture
def phantom_function() -> Iterator[Callable[[], int]]:
    """A function whose module exists only in this process: dill pickles it by reference."""
    name = f"hotcopy_test_phantom_{secrets.token_hex(4)}"
    module = types.ModuleType(name)
    exec("def phantom():\n    return 1\n", module.__dict__)
    sys.modules[name] = module
    try:
        yield module.phantom
    finally:
        del sys.modules[name]


def test_a_job_the_worker_cannot_load_fails_the_job_not_the_worker(
    pools: list[CopyWorkerPool], phantom_function: Callable[[], int]
) -> None:
    pool = CopyWorkerPool(1)
    pools.append(pool)
    before = pool.pids
    assert len(before) == 1
    error = pool.submit(phantom_function).exception(WAIT)
    assert isinstance(error, ImportError), error
    assert phantom_function.__module__ in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert pool.submit(lambda: "still here").result(WAIT) == "still here"
    assert pool.pids == before
    assert pool.replaced == 0


def test_a_result_that_cannot_be_sent_back_fails_the_job_not_the_worker(
    pools: list[CopyWorkerPool],
) -> None:
    pool = CopyWorkerPool(1)
    pools.append(pool)
    before = pool.pids

    def unpicklable() -> Any:
        return (i for i in range(3))  # generators do not pickle, even with dill

    error = pool.submit(unpicklable).exception(WAIT)
    assert isinstance(error, RuntimeError)
    assert "could not be sent" in str(error)
    assert pool.submit(lambda: 1).result(WAIT) == 1
    assert pool.pids == before


@pytest.mark.timeout(60)
def test_a_worker_whose_parent_is_gone_exits_quietly_with_its_reply_unsent() -> None:
    """The backup or restore that started a worker killed while the worker copies: its reply
    has nobody to go to. It printed a chained traceback onto the killed command's terminal
    (the failed send was taken for a reply that does not pickle, and sent again)."""
    from multiprocess.connection import Connection
    from multiprocess.reduction import ForkingPickler

    ours, theirs = socket.socketpair()
    with theirs:
        worker = subprocess.Popen(
            [sys.executable, "-P", "-m", "hotcopy.workers._copy_worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        with Connection(ours.detach()) as parent:
            parent.send_bytes(ForkingPickler.dumps((os.getpid, (), {})))
        # The parent's end is closed: the job is read, run, and its reply cannot be sent.
        _, stderr = worker.communicate(timeout=30)
        assert (worker.returncode, stderr) == (0, "")
    finally:
        worker.kill()
        worker.wait()


def test_a_pool_needs_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        CopyWorkerPool(0)


# -- death and replacement ----------------------------------------------------------------------


@pytest.mark.crash
def test_a_worker_killed_from_outside_fails_its_job_and_is_replaced(
    pools: list[CopyWorkerPool], rendezvous: Rendezvous
) -> None:
    pool = CopyWorkerPool(2)
    pools.append(pool)
    job = _blocking_job()
    futures = [pool.submit(job, rendezvous.address) for _ in range(2)]
    (_, victim), (survivor_conn, survivor) = rendezvous.accept(), rendezvous.accept()
    assert {victim, survivor} == set(pool.pids)
    victim_proc = psutil.Process(victim)

    os.kill(victim, signal.SIGKILL)

    done, not_done = wait(futures, timeout=WAIT, return_when=FIRST_COMPLETED)
    assert len(done) == 1 and len(not_done) == 1
    error = done.pop().exception(0)
    assert isinstance(error, WorkerDied), error
    assert error.pid == victim
    assert error.exitcode == -signal.SIGKILL
    assert _wait_until(lambda: pool.replaced == 1)
    assert len(pool.pids) == 2 and victim not in pool.pids and survivor in pool.pids
    assert not victim_proc.is_running()  # reaped, not left a zombie
    # The other worker's job was untouched and finishes when released.
    other = not_done.pop()
    assert not other.done()
    survivor_conn.sendall(b"x")
    assert other.result(WAIT) == "released"
    # The replacement takes work.
    pids = set(pool.pids)
    assert {pool.submit(os.getpid).result(WAIT) for _ in range(4)} <= pids
    assert pool.replaced == 1


@pytest.mark.crash
def test_terminate_fails_the_running_job_and_cancels_the_pending_ones(
    pools: list[CopyWorkerPool], rendezvous: Rendezvous
) -> None:
    pool = CopyWorkerPool(1)
    pools.append(pool)
    running = pool.submit(_blocking_job(), rendezvous.address)
    rendezvous.accept()
    pending = [pool.submit(operator.add, 1, 1) for _ in range(3)]
    pids = pool.pids
    pool.terminate()
    assert isinstance(running.exception(WAIT), WorkerDied)
    for future in pending:
        assert future.cancelled()
        with pytest.raises(CancelledError):
            future.result(0)
    assert _workers_alive(pids) == []
    with pytest.raises(RuntimeError, match="shutting down"):
        pool.submit(operator.add, 1, 1)


def test_shutdown_finishes_queued_work_then_reaps_every_worker(
    pools: list[CopyWorkerPool],
) -> None:
    pool = CopyWorkerPool(2)
    pools.append(pool)
    futures = [pool.submit(operator.mul, i, 3) for i in range(12)]
    assert _wait_until(lambda: len(pool.pids) == 2)
    workers = [psutil.Process(pid) for pid in pool.pids]
    pool.shutdown(wait=True)
    assert [f.result(0) for f in futures] == [3 * i for i in range(12)]
    for worker in workers:
        assert not worker.is_running(), worker
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    assert not children & {worker.pid for worker in workers}
    with pytest.raises(RuntimeError, match="shutting down"):
        pool.submit(operator.add, 1, 1)
    pool.shutdown()  # idempotent


def test_a_stopped_pool_writes_nothing_into_files_opened_after_it(tmp_path: Path) -> None:
    # The pool's wake-up pipe is closed when it stops; descriptors opened later may get its
    # numbers, and a later shutdown() (as ``with`` does after terminate()) must not write there.
    pool = CopyWorkerPool(1)
    pool.terminate()
    path = tmp_path / "innocent"
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT, 0o600) for _ in range(8)]
    try:
        pool.shutdown()
        pool.terminate()
        with pytest.raises(RuntimeError, match="shutting down"):
            pool.submit(operator.add, 1, 1)
    finally:
        for fd in fds:
            os.close(fd)
    assert path.read_bytes() == b""


def test_the_pool_is_a_context_manager_that_reaps_on_exit() -> None:
    with CopyWorkerPool(1) as pool:
        assert pool.submit(operator.neg, 5).result(WAIT) == -5
        worker = psutil.Process(pool.pids[0])
    assert not worker.is_running()


_PARENT = r"""
import json, math, os, sys
from hotcopy.workers import CopyWorkerPool

SCALE = 10  # a global of __main__: the job must take it along

def helper(x):
    return math.floor(x * SCALE)

def make(n):
    return lambda x: (os.getpid(), helper(x) + n)

with CopyWorkerPool(2) as pool:
    pids = pool.pids
    results = [pool.submit(make(i), 1.5).result(30) for i in range(4)]
    error = pool.submit(lambda: 1 / 0).exception(30)
print(json.dumps({"parent": os.getpid(), "pids": pids, "results": results,
                  "error": type(error).__name__, "cause": str(error.__cause__)}))
"""


def test_a_pool_works_from_a_python_dash_c_parent() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert [value for _, value in report["results"]] == [15, 16, 17, 18]
    assert {pid for pid, _ in report["results"]} <= set(report["pids"])
    assert report["parent"] not in report["pids"]
    assert report["error"] == "ZeroDivisionError"
    assert "ZeroDivisionError" in report["cause"]
    assert _workers_alive(report["pids"]) == []
