"""CopyWorkerPool: a ``concurrent.futures.Executor`` of copy-worker processes.

Why not ``multiprocessing.Pool``: a worker that dies there takes its task with it and the
caller waits forever. Here one dispatcher thread watches every worker's result channel and a
pidfd of its process (the kernel's own death notice); a worker that dies fails its job with
:class:`WorkerDied` (the caller decides whether to retry) and is replaced at once.

Workers run ``python -m hotcopy.workers._copy_worker`` and talk over a socketpair wrapped in a
``multiprocess`` connection (dill pickling, so closures can be jobs). Starting them as a module
rather than by ``spawn`` means a pool works whatever its parent is (a script, ``python -c``, a
REPL, a notebook): nothing re-imports the parent's ``__main__``. Workers ignore SIGINT: an
interrupt is the parent's to handle, so Ctrl-C never kills a job behind the parent's back.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from multiprocess.connection import Connection, wait
from multiprocess.reduction import ForkingPickler

from ._errors import RemoteTraceback, WorkerDied

P = ParamSpec("P")
T = TypeVar("T")

_STOP_GRACE = 5.0
_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Worker:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                # -P: the working directory must not shadow any module the worker imports.
                [sys.executable, "-P", "-m", "hotcopy.workers._copy_worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(ours.detach())
        self.sentinel = os.pidfd_open(self.process.pid)
        self.job: Future[Any] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace: float) -> None:
        """terminate, a grace period, then kill; always reaped."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.conn.close()
        os.close(self.sentinel)


class CopyWorkerPool(Executor):
    """``workers`` processes running submitted jobs; a dead worker fails its job and is replaced.

    Args:
        workers: Number of worker processes.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, not {workers}")
        self._size = workers
        self._pending: collections.deque[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ] = collections.deque()
        self._mutex = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a full pipe already holds a pending wake-up
        self._pipe_open = True  # under _mutex: the dispatcher closes the pipe when it ends
        self._stopping = False
        self._workers: list[_Worker] = []
        self.replaced = 0  # workers that died and were replaced
        try:  # started here, not by the dispatcher, so ``pids`` is right as soon as we return
            for _ in range(workers):
                self._workers.append(_Worker())
        except BaseException:
            for worker in self._workers:
                worker.process.kill()
                worker.process.wait()
                worker.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        self._dispatcher = threading.Thread(target=self._dispatch, name="copy-pool", daemon=True)
        self._dispatcher.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._mutex:
            if self._stopping:
                raise RuntimeError("cannot submit to a pool that is shutting down")
            self._pending.append((future, fn, args, kwargs))
        self._wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._mutex:
            self._stopping = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft()[0].cancel()
        self._wake()
        if wait:
            self._dispatcher.join()

    def terminate(self) -> None:
        """Stop now: cancel what has not started, kill the workers, fail their jobs."""
        with self._mutex:
            self._stopping = True
            while self._pending:
                self._pending.popleft()[0].cancel()
        for worker in list(self._workers):
            worker.process.kill()
        self._wake()
        self._dispatcher.join()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [worker.pid for worker in self._workers]

    def _wake(self) -> None:
        # Checked under the mutex: once the dispatcher has closed the pipe, its descriptor
        # numbers may already belong to files opened since (a byte written there is damage).
        with self._mutex:
            if not self._pipe_open:
                return  # the dispatcher is gone: nothing to wake
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _dispatch(self) -> None:
        try:
            while True:
                self._assign()
                with self._mutex:
                    idle = all(worker.job is None for worker in self._workers)
                    if self._stopping and idle and not self._pending:
                        break
                self._wait_once()
        finally:
            for worker in self._workers:
                if worker.job is not None:
                    worker.job.set_exception(WorkerDied("the pool stopped during this job"))
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            for worker in self._workers:
                worker.stop(grace=_STOP_GRACE)
                worker.close()
            with self._mutex:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _assign(self) -> None:
        for worker in self._workers:
            if worker.job is not None:
                continue
            while True:
                with self._mutex:
                    if not self._pending:
                        return
                    future, fn, args, kwargs = self._pending.popleft()
                if future.set_running_or_notify_cancel():
                    break
            worker.job = future
            try:
                # recurse=True: a function defined in the parent's ``__main__`` (a script,
                # ``python -c``) takes the globals it uses along by value. By default dill refers
                # to ``__main__.__dict__`` by name, which in the worker is the worker's own module,
                # so such a job failed with NameError on its first global.
                worker.conn.send_bytes(ForkingPickler.dumps((fn, args, kwargs), recurse=True))
            except Exception as err:  # e.g. the job does not pickle
                worker.job = None
                future.set_exception(err)

    def _wait_once(self) -> None:
        by_conn = {worker.conn: worker for worker in self._workers if worker.job is not None}
        by_sentinel = {worker.sentinel: worker for worker in self._workers}
        ready = wait([self._wake_r, *by_conn, *by_sentinel])
        for item in ready:
            if item == self._wake_r:
                os.read(self._wake_r, 4096)
            elif item in by_conn:
                self._collect(by_conn[item])
        for item in ready:
            if isinstance(item, int) and item in by_sentinel:
                self._replace(by_sentinel[item])

    def _collect(self, worker: _Worker) -> None:
        try:
            ok, value, remote = worker.conn.recv()
        except (EOFError, OSError):
            return  # it died; its sentinel reports it
        future, worker.job = worker.job, None
        assert future is not None
        if ok:
            future.set_result(value)
        else:
            if remote is not None and isinstance(value, BaseException):
                value.__cause__ = RemoteTraceback(remote)
            future.set_exception(value)

    def _replace(self, worker: _Worker) -> None:
        exitcode = worker.process.wait()
        if worker.job is not None:
            worker.job.set_exception(
                WorkerDied(
                    f"copy worker {worker.pid} died (exit code {exitcode}) during this job",
                    pid=worker.pid,
                    exitcode=exitcode,
                )
            )
        worker.close()
        index = self._workers.index(worker)
        if self._stopping:
            del self._workers[index]
        else:
            self._workers[index] = _Worker()
            self.replaced += 1

    def __repr__(self) -> str:
        return f"<CopyWorkerPool workers={self._size} pids={self.pids}>"


class InlineExecutor(Executor):
    """Runs each job in the calling thread, at ``submit``: for work too small to pay for
    starting processes (a few MiB of deltas). Same interface, same error reporting."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # an interrupt is the caller's, not the job's
            future.set_exception(err)
        return future
