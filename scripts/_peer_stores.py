"""The stores scripts/bench_peers.py compares, behind one small interface, and its open child.

Kept apart from bench_peers.py so that the fresh process that measures an open imports the
standard library's ``json``, ``os``, ``sys`` and ``time``, the store's own module and nothing
else: its peak RSS is then the store's, not the benchmark's (argparse, multiprocessing and
statistics alone add about 4 MiB to a Python process of 11 MiB).

Each store opens a data set of keys ``key-00000000`` ... with 100-byte values (built by
bench_peers.py) for reading or for writing, and offers ``get(key)`` and ``put(key, value)``, a
put being one durable commit. Every get sees the latest commit of any process: hotcopy
follows the commit counter in the coordinator's shared memory, sqlite3 runs each SELECT in its
own implicit read transaction, lmdb gets a read transaction per get.

    python scripts/_peer_stores.py open SYSTEM DIR KEY_INDEX   # open + first get, as JSON
    python scripts/_peer_stores.py import SYSTEM               # the same process, only imports
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "peers"  # the hotcopy prefix
SQLITE_FILE = "peers.sqlite"
LMDB_DIR = "peers.lmdb"
RAW_FILE = "raw.log"
# Address space only: without MDB_WRITEMAP the file grows with the data, not to this size.
LMDB_MAP_SIZE = 1 << 36
SQLITE_GET = "SELECT v FROM kv WHERE k = ?"
SQLITE_PUT = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"


def key_text(index: int) -> str:
    """The key of number ``index`` (the layout bench_storage.build_prefix writes)."""
    return f"key-{index:08d}"


class HotcopyStore:
    """A prefix of a repository: read mode for readers, read-write for writers."""

    name = "hotcopy"

    @staticmethod
    def load() -> None:
        import hotcopy.storage  # noqa: F401

    def __init__(self, directory: str, writer: bool) -> None:
        from hotcopy.storage import Repository

        self.repo = Repository(directory)
        try:
            self.prefix = self.repo.open_prefix(PREFIX, "rw" if writer else "r")
        except BaseException:
            self.repo.close()
            raise

    key = staticmethod(key_text)

    def get(self, key: str) -> bytes:
        value: bytes = self.prefix[key]
        return value

    def put(self, key: str, value: bytes) -> None:
        self.prefix[key] = value
        self.prefix.commit()

    def close(self) -> None:
        self.repo.close()


class SqliteStore:
    """Python's sqlite3 in WAL mode with ``synchronous=FULL``, autocommit: a put is a commit."""

    name = "sqlite3"

    @staticmethod
    def load() -> None:
        import sqlite3  # noqa: F401

    def __init__(self, directory: str, writer: bool) -> None:
        import sqlite3

        # A long busy timeout: four writers wait for each other rather than fail.
        self.conn = sqlite3.connect(
            os.path.join(directory, SQLITE_FILE), timeout=600.0, isolation_level=None
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")

    key = staticmethod(key_text)

    def get(self, key: str) -> bytes:
        value: bytes = self.conn.execute(SQLITE_GET, (key,)).fetchone()[0]
        return value

    def put(self, key: str, value: bytes) -> None:
        self.conn.execute(SQLITE_PUT, (key, value))

    def close(self) -> None:
        self.conn.close()


class LmdbStore:
    """lmdb with its durable defaults (``sync`` and ``metasync``): a put is a write txn."""

    name = "lmdb"

    @staticmethod
    def load() -> None:
        import lmdb  # noqa: F401

    def __init__(self, directory: str, writer: bool) -> None:
        import lmdb

        self.env = lmdb.open(os.path.join(directory, LMDB_DIR), map_size=LMDB_MAP_SIZE)

    @staticmethod
    def key(index: int) -> bytes:
        return key_text(index).encode()

    def get(self, key: bytes) -> bytes:
        with self.env.begin() as txn:
            value: bytes = txn.get(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key, value)

    def close(self) -> None:
        self.env.close()


class RawLog:
    """The baseline of small commits: ``os.write`` of key and value, then ``os.fdatasync``,
    appending to a file in the same directory. Writes only."""

    name = "raw write+fdatasync"

    @staticmethod
    def load() -> None:
        pass

    def __init__(self, directory: str, writer: bool) -> None:
        if not writer:
            raise ValueError("the raw log is only written")
        path = os.path.join(directory, RAW_FILE)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    @staticmethod
    def key(index: int) -> bytes:
        return key_text(index).encode()

    def get(self, key: bytes) -> bytes:
        raise NotImplementedError("the raw log is only written")

    def put(self, key: bytes, value: bytes) -> None:
        os.write(self.fd, key + value)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


Store = HotcopyStore | SqliteStore | LmdbStore | RawLog
STORES: dict[str, type[Store]] = {
    store.name: store for store in (HotcopyStore, SqliteStore, LmdbStore, RawLog)
}


def peak_rss_mib() -> float:
    """This process's peak RSS as the kernel counts it (``VmHWM``).

    Not ``ru_maxrss``: Linux carries it over fork and exec (see bench_storage.peak_rss_mib),
    so a child of a large parent would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> int:
    """``open SYSTEM DIR KEY_INDEX`` or ``import SYSTEM``: print one JSON object."""
    action, system = argv[0], argv[1]
    store_class = STORES[system]
    store_class.load()  # the import is not timed
    if action == "import":
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return 0
    directory, index = argv[2], int(argv[3])
    began = time.perf_counter()
    store = store_class(directory, writer=False)
    value = store.get(store.key(index))  # type: ignore[arg-type]
    seconds = time.perf_counter() - began
    peak = peak_rss_mib()
    store.close()
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "value_bytes": len(value)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
