"""A real S3 server for tests: moto's, as a child process on 127.0.0.1, or an external one.

``HOTCOPY_TEST_S3_ENDPOINT`` (e.g. a MinIO URL, credentials from ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``) makes the tests use that server and start nothing; it cannot be
killed, so outage tests skip. moto keeps every bucket in memory: after ``kill()`` and
``start()`` the server on the same port is empty, and the tests' buckets are gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """An S3 endpoint for a test session; ``start()``, ``kill()`` and ``stop()`` a moto one.

    Args:
        log: where moto's request log goes (a pipe nobody read would fill and stall it).
        env: added to moto's environment, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to make it
            check signatures (by default moto accepts any credentials).
    """

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        self.external = os.environ.get("HOTCOPY_TEST_S3_ENDPOINT", "")
        self.port = free_port()
        self.endpoint_url = self.external or f"http://127.0.0.1:{self.port}"
        self._log_path, self._env = log, env or {}
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start moto on this server's port and return once it accepts connections."""
        if self.external:
            return
        assert self._process is None, "already running"
        self._log = open(self._log_path, "ab")  # noqa: SIM115 (closed in stop and kill)
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **self._env}
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                self._reap()
                raise RuntimeError(f"moto exited at start: see {self._log_path}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"moto did not answer within {timeout} s: {self._log_path}")
            time.sleep(0.02)  # polling a child's listening socket: there is no event to wait on

    def kill(self) -> None:
        """SIGKILL moto (an outage: connections refused until ``start()``) and reap it."""
        if self.external:
            raise RuntimeError("an external S3 endpoint cannot be killed")
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """Terminate moto, a grace period, then kill; always reaped."""
        if self._process is not None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        self.kill()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class Gate:
    """A TCP relay on 127.0.0.1 in front of an S3 server, which a test can ``close()`` (every
    connection dropped, new ones refused: an outage, while the server keeps its buckets) and
    ``open()`` again on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._upstream = upstream_port
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed = list(self._sockets)
            self._sockets.clear()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self._upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
