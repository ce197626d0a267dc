"""The coordinator process: election, socket server, and its single-threaded event loop.

One coordinator runs per repository, elected by a ``filelock`` on
``ROOT/.hotcopy/coordinator.lock`` (an ``flock`` the kernel drops when the process dies,
so a successor can take over at once). It serves ``ROOT/.hotcopy/coordinator.sock`` with
one epoll loop: no thread per client, so the table needs no locking and a slow
or hostile peer can only ever cost its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from . import _protocol as p
from ._paths import RuntimePaths, peer_uid, unix_address
from ._process import ProcessIdentity, boot_id, is_alive
from ._segment import SegmentWriter
from ._spin import AdaptiveSpin, spin_budget_from_env
from ._table import GRANTED, WANTED, Entry, LeaseTable
from ._tokens import TokenSource

__all__ = ["CoordinatorConfig", "CoordinatorServer"]

_log = logging.getLogger(__name__)

_RECV_SIZE: Final = 65536
_MAX_OUTBUF: Final = 1 << 20
_TICK: Final = 0.25  # liveness sweep and connection timeouts

_LENGTH_UNPACK = p.LENGTH.unpack_from
_REQ_UNPACK = p.REQ_BODY.unpack_from
_ACQUIRE_UNPACK = p.ACQUIRE_BODY.unpack_from
_RELEASE = p.RELEASE
_ACQUIRE = p.ACQUIRE
_RELEASE_LENGTH: Final = 1 + p.REQ_BODY.size
_ACQUIRE_LENGTH: Final = 1 + p.ACQUIRE_BODY.size


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Tunables of a coordinator.

    Attributes:
        idle_timeout: Seconds without clients and leases after which it exits.
        recovery_window: Grace, in seconds, for a ttl-less lease recovered from shared
            memory whose holder is alive but has not reconnected.
        handshake_timeout: Seconds a new connection has to say HELLO, and a started frame
            to complete, before the connection is dropped.
        lock_wait: Seconds to wait for the election lock before giving up.
        spin: Seconds to poll for a client's next request before sleeping (adaptive; 0
            disables; ``HOTCOPY_SPIN_US``).
    """

    idle_timeout: float = 30.0
    recovery_window: float = 5.0
    handshake_timeout: float = 5.0
    lock_wait: float = 2.0
    spin: float = field(default_factory=spin_budget_from_env)


class _Connection:
    __slots__ = (
        "client_id",
        "fd",
        "hello",
        "identity",
        "inbuf",
        "opened_at",
        "outbuf",
        "partial_since",
        "sock",
    )

    def __init__(self, sock: socket.socket, identity: ProcessIdentity, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.identity = identity
        self.client_id = 0
        self.hello = False
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.opened_at = now
        self.partial_since = 0.0


class _Drop(Exception):
    """Internal: drop the connection being served, with this reason."""


class CoordinatorServer:
    """A running coordinator for one repository.

    Use :meth:`run`, which elects, serves until idle or :meth:`stop`, and cleans up.

    Args:
        root: The repository root.
        config: Tunables.
        clock: Monotonic clock.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = RuntimePaths.for_root(root)
        self.config = config or CoordinatorConfig()
        self._clock = clock
        self._stopping = False
        self._conns: dict[int, _Connection] = {}
        self._prefix_names: dict[bytes, str] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def run(self) -> int:
        """Elect, serve, clean up.

        Returns:
            0 after serving, 1 if another coordinator holds the election lock.
        """
        try:
            return self._elect_and_serve()
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _elect_and_serve(self) -> int:
        import filelock  # here, not above: a client that only imports this module (through
        # the package) would carry filelock's 8 MiB of modules (asyncio among them)

        self.paths.ensure_runtime_dir()
        lock = filelock.FileLock(
            self.paths.lock,
            mode=0o600,
            thread_local=False,
            poll_interval=0.005,
            preserve_lock_file=True,  # unlinking a lock file lets two holders coexist
        )
        try:
            lock.acquire(timeout=self.config.lock_wait)
        except filelock.Timeout:
            _log.info("another coordinator holds the election lock root=%s", self.paths.root)
            return 1
        try:
            self._serve()
        finally:
            lock.release()
        return 0

    # -- setup and teardown ------------------------------------------------------------

    def _serve(self) -> None:
        paths = self.paths
        me = ProcessIdentity.current()
        segment_path = paths.segment_path(create=True)
        assert segment_path is not None  # created on demand
        segment = SegmentWriter(segment_path)
        self._segment = segment
        keep_segment = True
        try:
            header = segment.header()
            tokens = TokenSource(paths.tokens, header.next_token if segment.recovered else 0)
            table = self._table = LeaseTable(segment, tokens, self._clock)
            segment.record_expired(tokens.expired)  # kept by a predecessor's clean exit
            if segment.recovered:
                table.recover(segment.leases(), self.config.recovery_window)
                table.load_commits(segment.prefixes())
            elif tokens.previous_run and not tokens.previous_clean:
                # The predecessor crashed and its table is gone with /dev/shm: leases may
                # be held that nothing records. Give their holders the recovery window to
                # re-register before granting anything.
                _log.warning(
                    "predecessor crashed and shared memory is lost: holding grants %.1fs",
                    self.config.recovery_window,
                )
                table.hold_grants_until(self._clock() + self.config.recovery_window)
            segment.write_header(
                me.pid, me.start_ticks, tokens.next, boot_id(), header.lease_hwm,
                self._clock(), time.time(),
            )  # fmt: skip
            self._header_token = tokens.next
            listener = self._listen()
            try:
                paths.pid.write_text(f"{me.pid}\n")
                _log.info(
                    "coordinator serving root=%s pid=%s recovered=%s next_token=%s",
                    paths.root, me.pid, segment.recovered, tokens.next,
                )  # fmt: skip
                self._loop(listener)
            finally:
                self._shutdown(listener)
                # Leases still held (a SIGTERM with clients connected) are handed to the
                # successor. Commit counters alone are not worth a /dev/shm file that outlives
                # the repository: they are change hints, and a fresh counter reads as a change.
                # Nor is anything, once the repository was deleted: no successor can find it.
                table.sweep()  # leases of dead holders are not worth handing over
                keep_segment = not table.is_empty() and paths.runtime_dir.is_dir()
                try:  # the successor continues without a gap
                    tokens.close(
                        leases_outstanding=not table.is_empty(), expired=segment.expired_token()
                    )
                except OSError as err:
                    _log.warning("cannot record a clean exit in %s: %s", paths.tokens, err)
                header = segment.header()
                segment.write_header(
                    0, 0, tokens.next, header.boot, header.lease_hwm,
                    header.started_monotonic, header.started_wall,
                )  # fmt: skip
        finally:
            segment.close()
            if not keep_segment:
                segment.unlink()

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.paths.socket
        # We hold the election lock, so a socket file here is a dead predecessor's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)  # the socket is created 0600: never briefly wider
        try:
            with unix_address(path) as address:
                listener.bind(address)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._bound = _file_id(path)
        return listener

    def _shutdown(self, listener: socket.socket) -> None:
        # Stop accepting first; queued connections are reset and their clients retry
        # against a successor. Remove only our own files: if the repository was deleted and
        # recreated under us, these paths belong to a successor serving the new one.
        if _file_id(self.paths.socket) == self._bound:
            with contextlib.suppress(OSError):
                os.unlink(self.paths.socket)
        listener.close()
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        with contextlib.suppress(OSError):
            if self.paths.pid.read_text().split() == [str(os.getpid())]:
                os.unlink(self.paths.pid)
        _log.info("coordinator stopped root=%s", self.paths.root)

    # -- the loop ----------------------------------------------------------------------

    def _loop(self, listener: socket.socket) -> None:
        # Raw epoll rather than selectors: the selectors wrapper costs several µs per
        # wakeup, a measurable share of a ~40 µs acquire+release.
        poller = select.epoll()
        self._poller = poller
        listener_fd = listener.fileno()
        wake_fd = self._wake_r.fileno()
        poller.register(listener_fd, select.EPOLLIN)
        poller.register(wake_fd, select.EPOLLIN)
        table = self._table
        clock = self._clock
        idle_since = clock()
        next_tick = idle_since + _TICK
        conns = self._conns
        readable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        writable = select.EPOLLOUT
        on_readable = self._on_readable
        spin = AdaptiveSpin(self.config.spin)
        served = False
        try:
            while not self._stopping:
                now = clock()
                wake = next_tick
                deadline = table.next_deadline()
                if deadline is not None and deadline < wake:
                    wake = deadline
                if not conns and table.is_empty():
                    idle_at = idle_since + self.config.idle_timeout
                    if now >= idle_at:
                        _log.info("idle for %.1fs, exiting", self.config.idle_timeout)
                        return
                    wake = min(wake, idle_at)
                else:
                    idle_since = now
                try:
                    events = None
                    if served and spin.should_spin():
                        # A client just got an answer and is likely to send its next
                        # request within microseconds: poll before sleeping.
                        start = clock()
                        until = start + spin.budget
                        while not events and clock() <= until:
                            events = poller.poll(0)
                        spin.report(bool(events) and clock() - start <= spin.budget)
                    if not events:
                        events = poller.poll(max(0.0, wake - now))
                    served = False
                    for fd, mask in events:
                        conn = conns.get(fd)
                        if conn is not None:
                            served = True
                            if mask & readable:
                                on_readable(conn)
                            if mask & writable and conns.get(fd) is conn:
                                self._flush(conn)
                        elif fd == listener_fd:
                            self._accept(listener)
                        elif fd == wake_fd:
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(4096)
                    now = clock()
                    if deadline is not None and now >= deadline:
                        table.expire(now)
                        self._deliver()
                    if now >= next_tick:
                        next_tick = now + _TICK
                        self._maintain(now)
                except Exception:
                    # A bug must not end the service for every client; it is logged with
                    # its traceback and the loop goes on.
                    _log.exception("internal error in the coordinator loop")
        finally:
            _log.debug("spin successes=%s failures=%s", spin.successes, spin.failures)
            poller.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # Out of descriptors or memory, or a peer gone before we took it: try
                # again at the next readiness, never die of it.
                _log.error("cannot accept a connection: %s", err)
                return
            try:
                pid, uid = peer_uid(sock)
            except OSError:
                sock.close()
                continue
            if uid != os.getuid():
                _log.warning("refused peer of another user pid=%s uid=%s", pid, uid)
                sock.close()
                continue
            identity = ProcessIdentity.of(pid)
            if identity is None:
                sock.close()  # gone already
                continue
            sock.setblocking(False)
            conn = _Connection(sock, identity, self._clock())
            self._conns[conn.fd] = conn
            self._poller.register(conn.fd, select.EPOLLIN)

    def _maintain(self, now: float) -> None:
        limit = self.config.handshake_timeout
        for conn in list(self._conns.values()):
            if not conn.hello and now - conn.opened_at > limit:
                self._drop(conn, "no HELLO within the handshake timeout")
            elif conn.partial_since and now - conn.partial_since > limit:
                self._drop(conn, "frame left incomplete")
            elif not is_alive(conn.identity):
                self._drop(conn, "peer process is gone but its socket lingers")
        self._table.sweep()
        self._deliver()
        if self._table.next_token != self._header_token:
            self._header_token = self._table.next_token
            self._segment.set_next_token(self._header_token)

    def _drop(self, conn: _Connection, reason: str) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if reason:
            _log.warning("dropped connection pid=%s: %s", conn.identity.pid, reason)
        with contextlib.suppress(OSError, ValueError):
            self._poller.unregister(conn.fd)
        conn.sock.close()
        released = self._table.drop_owner(conn)
        if released:
            _log.debug("connection closed pid=%s released=%s", conn.identity.pid, released)
        self._deliver()

    # -- input -------------------------------------------------------------------------

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:  # closed with a frame unread (a WANTED, say): a close
            self._drop(conn, "")
            return
        except OSError as err:
            self._drop(conn, f"receive failed: {err}")
            return
        if not data:
            self._drop(conn, "")  # EOF: the client closed or died; nothing to report
            return
        buf: bytes | bytearray = data
        if conn.inbuf:
            conn.inbuf += data
            buf = conn.inbuf
        pos = 0
        end = len(buf)
        unpack_length = _LENGTH_UNPACK
        try:
            while end - pos >= 5:
                (length,) = unpack_length(buf, pos)
                if length == 0 or length > p.MAX_FRAME:
                    raise _Drop(f"frame length {length} out of range")
                stop = pos + 4 + length
                if stop > end:
                    break
                kind = buf[pos + 4]
                # The two hot messages are handled inline, without building a body copy.
                if kind == _RELEASE and length == _RELEASE_LENGTH:
                    (req_id,) = _REQ_UNPACK(buf, pos + 5)
                    self._table.release(conn, req_id)
                elif kind == _ACQUIRE and conn.hello and length > _ACQUIRE_LENGTH:
                    req_id, mode, flags, ttl_ms = _ACQUIRE_UNPACK(buf, pos + 5)
                    raw = bytes(buf[pos + 5 + _ACQUIRE_LENGTH - 1 : stop])
                    entry = self._entry(conn, req_id, mode, ttl_ms, raw)
                    if not self._table.acquire(entry, bool(flags & p.FLAG_NOWAIT)):
                        self._send(
                            conn,
                            p.frame(p.REFUSED, p.REFUSED_BODY.pack(req_id, p.REFUSED_WOULD_BLOCK)),
                        )
                else:
                    self._handle(conn, kind, bytes(buf[pos + 5 : stop]))
                pos = stop
            if end - pos == 4:
                (length,) = unpack_length(buf, pos)
                if length == 0 or length > p.MAX_FRAME:
                    raise _Drop(f"frame length {length} out of range")
        except _Drop as drop:
            self._drop(conn, str(drop))
            return
        except (p.ProtocolError, ValueError, IndexError, struct.error) as err:
            self._drop(conn, f"malformed message: {err}")
            return
        except Exception:
            # A bug in serving one connection must not take the service down with it.
            _log.exception("internal error serving pid=%s; dropping it", conn.identity.pid)
            self._drop(conn, "internal error")
            return
        if pos < end:
            if buf is data:
                conn.inbuf = bytearray(data[pos:])
            else:
                del conn.inbuf[:pos]
            if not conn.partial_since:
                conn.partial_since = self._clock()
        else:
            if buf is not data:
                conn.inbuf.clear()
            conn.partial_since = 0.0
        if self._table.outbox:
            self._deliver()

    def _handle(self, conn: _Connection, kind: int, body: bytes) -> None:
        table = self._table
        if kind == p.ACQUIRE:
            if not conn.hello:
                raise _Drop("request before HELLO")
            req_id, mode, flags, ttl_ms = p.ACQUIRE_BODY.unpack_from(body)
            entry = self._entry(conn, req_id, mode, ttl_ms, body[p.ACQUIRE_BODY.size :])
            if not table.acquire(entry, bool(flags & p.FLAG_NOWAIT)):
                self._send(
                    conn, p.frame(p.REFUSED, p.REFUSED_BODY.pack(req_id, p.REFUSED_WOULD_BLOCK))
                )
        elif kind == p.RELEASE:
            (req_id,) = p.REQ_BODY.unpack(body)
            table.release(conn, req_id)
        elif kind == p.RENEW:
            (req_id,) = p.REQ_BODY.unpack(body)
            table.renew(conn, req_id)
        elif kind == p.PARKING:
            (req_id,) = p.REQ_BODY.unpack(body)
            table.parking(conn, req_id)
        elif kind == p.PUBLISH:
            if not conn.hello:
                raise _Drop("request before HELLO")
            (seq,) = p.PUBLISH_BODY.unpack_from(body)
            raw = body[p.PUBLISH_BODY.size :]
            table.publish_commit(p.decode_prefix(raw), raw, seq)
        elif kind == p.PUBLISH_SYNC:
            if not conn.hello:
                raise _Drop("request before HELLO")
            req_id, seq = p.PUBLISH_SYNC_BODY.unpack_from(body)
            raw = body[p.PUBLISH_SYNC_BODY.size :]
            table.publish_commit(p.decode_prefix(raw), raw, seq)
            self._send(conn, p.frame(p.PUBLISHED, p.REQ_BODY.pack(req_id)))
        elif kind == p.HELLO:
            version, client_id = p.HELLO_BODY.unpack(body)
            if version != p.PROTOCOL_VERSION or conn.hello:
                raise _Drop(f"unexpected HELLO (version {version})")
            conn.hello = True
            conn.client_id = client_id
        elif kind == p.REGISTER:
            if not conn.hello:
                raise _Drop("request before HELLO")
            req_id, mode, ttl_ms, token = p.REGISTER_BODY.unpack_from(body)
            entry = self._entry(conn, req_id, mode, ttl_ms, body[p.REGISTER_BODY.size :])
            ok = table.register(entry, token)
            _log.info(
                "re-registration prefix=%s token=%s pid=%s accepted=%s",
                entry.prefix, token, conn.identity.pid, ok,
            )  # fmt: skip
            self._send(
                conn,
                p.frame(
                    p.REGISTERED,
                    p.REGISTERED_BODY.pack(req_id, int(ok), token, max(entry.slot, 0)),
                ),
            )
        elif kind == p.REGISTER_END:
            if not conn.hello:
                raise _Drop("request before HELLO")
            table.register_end(conn.identity, conn.client_id)
        else:
            raise _Drop(f"unknown message type {kind:#x}")

    def _entry(
        self, conn: _Connection, req_id: int, mode: int, ttl_ms: int, raw_prefix: bytes
    ) -> Entry:
        if mode not in p.MODE_NAMES:
            raise p.ProtocolError(f"unknown mode {mode}")
        if self._table.has_request(conn, req_id):
            raise p.ProtocolError(f"request id {req_id} reused while in flight")
        prefix = self._prefix_names.get(raw_prefix)
        if prefix is None:
            prefix = p.decode_prefix(raw_prefix)
            if len(self._prefix_names) < 65536:
                self._prefix_names[raw_prefix] = prefix
        return Entry(
            owner=conn,
            req_id=req_id,
            prefix=prefix,
            prefix_bytes=raw_prefix,
            mode=mode,
            ttl=ttl_ms / 1000.0,
            holder=conn.identity,
            client_id=conn.client_id,
        )

    # -- output ------------------------------------------------------------------------

    def _deliver(self) -> None:
        outbox = self._table.outbox
        if not outbox:
            return
        self._table.outbox = []
        pack = p.GRANT_FRAME.pack
        conns = self._conns
        for entry, outcome in outbox:
            conn = entry.owner
            if not isinstance(conn, _Connection) or conns.get(conn.fd) is not conn:
                continue
            if outcome == GRANTED:
                data = pack(
                    p.GRANT_BODY.size + 1, p.GRANT, entry.req_id, entry.token, entry.slot,
                    entry.waited,
                )  # fmt: skip
            elif outcome == WANTED:
                data = p.frame(p.WANTED, p.REQ_BODY.pack(entry.req_id))
            else:
                data = p.frame(p.REFUSED, p.REFUSED_BODY.pack(entry.req_id, p.REFUSED_TABLE_FULL))
            self._send(conn, data)

    def _send(self, conn: _Connection, data: bytes) -> None:
        if conn.outbuf:
            conn.outbuf += data
            if len(conn.outbuf) > _MAX_OUTBUF:
                self._drop(conn, "client does not read its replies")
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The peer is gone; its EOF (read side) will release its leases.
            return
        if sent < len(data):
            conn.outbuf += data[sent:]
            self._poller.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(conn, f"send failed: {err}")
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self._poller.modify(conn.fd, select.EPOLLIN)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino
