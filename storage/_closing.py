"""Closing descriptors of replaced files off the caller's path.

Closing the last descriptor of a file that was replaced or unlinked (a WAL that a checkpoint
swapped out, a main file that a compaction or restore replaced) frees its blocks inside
``close()``. On a file system mounted with ``discard`` (ext4 without a journal, as here) that
is one synchronous discard per extent, each queued behind whatever the disk is doing; and a
WAL, grown in small fsynced appends, is in many extents. Measured: a writer following a
copier's checkpoint spent 5-23 ms in ``close()`` of the old WAL while the copy's writeback was
in flight, on top of the checkpoint it had waited for. Such a descriptor is of no further use
to its owner, so a daemon thread closes it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

from hotcopy.coordinator._process import own_pid

_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
_started_in = -1  # pid of the process whose closing thread serves _queue
_start_lock = threading.Lock()


def close_later(fd: int) -> None:
    """Close ``fd`` soon, on the closing thread; the caller must not use it again."""
    global _started_in
    if _started_in != own_pid():
        with _start_lock:
            if _started_in != own_pid():
                threading.Thread(
                    target=_close_queued, args=(_queue,), name="hotcopy-closer", daemon=True
                ).start()
                _started_in = own_pid()
    _queue.put(fd)


def _close_queued(fds: queue.SimpleQueue[int]) -> None:
    while True:
        fd = fds.get()
        with contextlib.suppress(OSError):
            os.close(fd)


def _after_fork_in_child() -> None:
    # The parent's closing thread does not exist here: close what it had not yet closed
    # (cheap: the parent still holds these files) and start afresh on the next call.
    global _queue, _started_in, _start_lock
    inherited, _queue = _queue, queue.SimpleQueue()
    _started_in = -1
    _start_lock = threading.Lock()
    while True:
        try:
            fd = inherited.get_nowait()
        except queue.Empty:
            break
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_after_fork_in_child)
