"""Stress and chaos test of hotcopy: writers, readers, copiers and backups at full speed while
processes are killed and stopped at random; then independent checks of what survived.

Writers commit transactions that prove themselves: writer w's n-th transaction on its prefix
writes the record ``w<w>/<n>`` and the counter ``w<w>/last = n`` together, and after commit()
returns appends ``n`` (with the commit's number and the time) to its own fsynced journal.
Every check at the end is against those journals and that rule, not against hotcopy's own
bookkeeping:

- every acknowledged commit is in the live repository (records 1..n and a counter >= n);
- every copy and every backup restores and holds, for each writer, exactly records 1..last;
- readers never saw a counter without its record, or a counter go backwards;
- no two writers were ever inside the write lease of one prefix at once (an O_EXCL marker);
- no commit waited longer than the promised bound for its lease, though holders and the
  coordinator were killed and stopped around it (a dead holder's lease is freed in time);
- no temp file is left behind;
- damage is never silently dropped: every few seconds a byte is flipped in a snapshot of a live
  prefix's files (a WAL batch with whole batches after it, or a checkpointed segment), and
  both `verify` and opening the prefix must report it;
- with --replicate, `hotcopy replicate` ships every commit to a replica (a directory, or a
  bucket of a moto S3 server started for the run) and is killed and stopped like the other
  roles. The replica verifies, and restores of it (the latest; at random times of the run; a
  prefix at a random commit it holds) hold, for each writer, exactly records 1..last, that
  commit's state by the journals' commit numbers, nothing committed after the time asked for,
  and every commit acknowledged an interval (and some slack) before it; the latest after a
  clean stop holds every commit.

With --chaos, some stops outlast the writers' lease TTL (2 s by default), so a writer stopped
inside a commit loses its lease while its successor fences it: its commit must then be
refused or ordered before the successor's, never lost or applied late.

    python scripts/stress.py --duration 60 --chaos --json
    python scripts/stress.py --break ack-before-write --chaos   # a broken build must fail
    python scripts/stress.py --duration 60 --chaos --replicate dir   # or s3 (default), none

Exit status 0 only when no violation was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROLES = ("writer", "reader", "copier", "backup")
LEASE_BOUND_S = 5.0  # no commit waits longer for its write lease (holders die, stop, restart)
LONG_STOPS = 0.3  # the share of chaos stops that outlast the writers' lease TTL
REPLICA_INTERVAL_S = 1.0  # `hotcopy replicate --interval`: a commit is shipped within this
SNAPSHOT_INTERVAL_S = 5.0  # `hotcopy replicate --snapshot-interval`: a few generations a run
# What a pass may take beyond the interval (its reads and writes, a snapshot switch, a loaded
# machine's scheduling): commits acknowledged longer ago than interval + slack must be shipped.
REPLICA_SLACK_S = 2.0
TIME_RESTORES = 4  # restores of the replica at random times of the run
SEQ_RESTORES = 2  # restores of one prefix of the replica at a random commit it holds


# ---------------------------------------------------------------------------------------------
# roles (each runs in its own process: `stress.py --role ROLE --work DIR --index I ...`)


def _stop_requested(work: Path) -> bool:
    return (work / "stop").exists()


def _append_fsynced(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # a torn last line was never acknowledged


def prefix_of(writer: int, prefixes: int) -> str:
    return f"s{writer % prefixes}"


def role_writer(work: Path, index: int, prefixes: int, lease_ttl: float) -> None:
    from hotcopy.coordinator._errors import LeaseError
    from hotcopy.storage import Repository, TransactionConflict

    journal = work / f"journal-{index}.log"
    name = prefix_of(index, prefixes)
    marker = work / "markers" / name
    key = f"w{index}"
    with Repository.init(work / "repo", lease_ttl=lease_ttl) as repo:
        px = repo.open_prefix(name, "rw")
        acknowledged = [int(line.split()[0]) for line in _read_lines(journal)]
        n = max([px.get(f"{key}/last", 0), *acknowledged])
        began = None  # when the first attempt at commit n started: retries keep waiting
        while not _stop_requested(work):
            n += 1
            began = began or time.monotonic()
            try:
                # `with px.transaction()`, spelled out to keep the number commit() returns:
                # px.seq after it is the view's, past this commit if the writer was stopped
                # after it while others committed (the replica checks need this commit's).
                px.begin()
                try:
                    token = px._lease.token if px._lease else 0
                    _enter_marker(marker, work, token)
                    # Give the other writers of this prefix the CPU while we are inside: a
                    # lease granted twice then shows as an overlap within seconds, not by luck.
                    os.sched_yield()
                    px[f"{key}/{n}"] = {"n": n, "pad": "x" * 64}
                    px[f"{key}/last"] = n
                    _leave_marker(marker, token)
                except BaseException:
                    px.rollback()
                    raise
                seq = px.commit()
            except (TransactionConflict, LeaseError):
                n -= 1  # refused before anything was written: try the same n again
                continue
            _append_fsynced(journal, f"{n} {seq} {time.monotonic() - began:.6f} {time.time():.6f}")
            began = None


def _enter_marker(marker: Path, work: Path, token: int) -> None:
    """Overlap detector: one file per prefix (hard-linked in, so O_EXCL-like) while the write
    lease is held.

    The file names the holder's pid and lease token, so that a violation says which grants
    overlapped (a token's high bits name the coordinator generation that granted it). A holder
    still inside whose lease is no longer granted was stopped past its TTL and fenced: no
    overlap (the journals show whether its commit was then refused or ordered before ours). The
    same for one that enters after its own lease was taken from it while it was stopped.
    """
    mine = marker.with_name(f"{marker.name}.{os.getpid()}")
    mine.write_text(f"{os.getpid()} {token}")
    while True:
        try:
            os.link(mine, marker)  # atomic, with its content: never seen empty
        except FileExistsError:
            try:
                holder, holder_token = (int(x) for x in marker.read_text().split())
            except FileNotFoundError:
                continue  # just removed
            if _pid_alive(holder) and (holder_token == 0 or _granted(work, holder_token)):
                if token and not _granted(work, token):
                    # We were stopped past our TTL before entering, and fenced: the holder
                    # came after us. Our commit must now be refused (the journals check it).
                    mine.unlink()
                    return
                _append_fsynced(
                    work / "violations.log",
                    f"lease overlap on {marker.name}: pid {os.getpid()} (token {token}) entered "
                    f"while pid {holder} (token {holder_token}) was inside, at {time.time():.3f}",
                )
                mine.unlink()
                return
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()  # left by a killed holder, or one fenced while stopped
            continue
        mine.unlink()
        return


def _granted(work: Path, token: int) -> bool:
    """Whether the lease of ``token`` is still granted (the coordinator's shared memory)."""
    from hotcopy.coordinator import read_status

    return any(lease.token == token for lease in read_status(work / "repo").leases)


def _leave_marker(marker: Path, token: int) -> None:
    """Remove the marker if it is still ours (a successor of a fenced holder replaced it)."""
    with contextlib.suppress(FileNotFoundError):
        if marker.read_text() == f"{os.getpid()} {token}":
            marker.unlink()


_PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose, and so is a process that is exiting (SIGKILLed): it
    # closes its files, and with them its coordinator connection (which frees its leases),
    # before it becomes a zombie, and runs no more code of its own meanwhile.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    state, flags = fields[0], int(fields[6])
    return state not in ("Z", "X") and not flags & _PF_EXITING


def role_reader(work: Path, index: int, prefixes: int, writers: int) -> None:
    from hotcopy.storage import PrefixNotFound, Repository

    seen: dict[int, int] = {}
    checks = 0
    with Repository.init(work / "repo") as repo:
        while not _stop_requested(work):
            w = random.randrange(writers)
            try:
                px = repo.open_prefix(prefix_of(w, prefixes), "r")
            except PrefixNotFound:
                continue
            last = px.get(f"w{w}/last", 0)
            if last and f"w{w}/{last}" not in px:
                _append_fsynced(
                    work / "violations.log", f"reader {index}: w{w}/last={last} without its record"
                )
            if last < seen.get(w, 0):
                _append_fsynced(
                    work / "violations.log",
                    f"reader {index}: w{w}/last went back from {seen[w]} to {last}",
                )
            seen[w] = max(seen.get(w, 0), last)
            checks += 1
            if checks % 50 == 0:
                _append_fsynced(work / f"reader-{index}.log", str(checks))


def role_copier(work: Path, index: int, prefixes: int) -> None:
    from hotcopy.storage import Repository

    out = work / "copies"
    number = len(_read_lines(work / f"copies-{index}.log"))
    with Repository.init(work / "repo") as repo:
        while not _stop_requested(work):
            name = f"s{random.randrange(prefixes)}"
            if not repo.prefix_path(name).exists():
                continue
            number += 1
            dest = out / f"c{index}-{number}-{name}.hc"
            if dest.exists():
                continue  # a copy finished by a copier killed before it could log it
            result = repo.copy_prefix(dest, name, 1 << 20)
            _append_fsynced(
                work / f"copies-{index}.log",
                json.dumps(
                    {
                        "path": dest.name,
                        "prefix": name,
                        "seq": result.seq,
                        "bytes": result.length,
                        "seconds": result.seconds,
                    }
                ),
            )


def role_backup(work: Path, interval: float) -> None:
    from hotcopy.workers import BackupError, backup, prune

    incremental = False
    runs = 0
    while not _stop_requested(work):
        try:
            result = backup(work / "repo", work / "backups", jobs=2, incremental=incremental)
            line = {"id": result.id, "complete": result.complete, "failed": result.failed}
        except BackupError as err:  # nothing could be copied: the run leaves nothing
            line = {"id": None, "error": str(err)}
        _append_fsynced(work / "backups.log", json.dumps(line))
        incremental = True
        runs += 1
        if runs % 4 == 0:  # retention under chaos too: a prune killed midway must be harmless
            report = prune(work / "backups", 3)
            _append_fsynced(work / "backups.log", json.dumps({"pruned": report.removed}))
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not _stop_requested(work):
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# the supervisor


@dataclass
class Proc:
    role: str
    index: int
    popen: subprocess.Popen[bytes]
    stopped: bool = False


@dataclass
class Supervisor:
    args: argparse.Namespace
    work: Path
    rng: random.Random
    procs: list[Proc] = field(default_factory=list)
    killed: int = 0
    stopped: int = 0
    coordinator_kills: int = 0
    damages: int = 0
    target: str | None = None  # the replica, when a replicator runs
    replicator_starts: list[float] = field(default_factory=list)  # wall clock of each start
    replicator_exit: int | None = None  # its status after the SIGTERM that ends the run
    writers_stopped: float = 0.0  # wall clock of the stop file

    def command(self, role: str, index: int) -> list[str]:
        a = self.args
        if role == "replicator":
            assert self.target is not None
            # -P: the working directory must not shadow any module the replicator imports.
            return [
                *(sys.executable, "-P", "-m", "hotcopy.workers", "replicate"),
                *(str(self.work / "repo"), self.target, "--json"),
                *("--interval", f"{REPLICA_INTERVAL_S:g}s"),
                *("--snapshot-interval", f"{SNAPSHOT_INTERVAL_S:g}s"),
            ]
        return [
            sys.executable,
            __file__,
            "--role",
            role,
            "--work",
            str(self.work),
            "--index",
            str(index),
            "--prefixes",
            str(a.prefixes),
            "--writers",
            str(a.writers),
            "--backup-interval",
            str(a.backup_interval),
            "--lease-ttl",
            str(a.lease_ttl),
        ]

    def start(self, role: str, index: int) -> Proc:
        env = dict(os.environ)
        if self.args.broken:
            env["HOTCOPY_TEST_BREAK"] = self.args.broken
        log = open(self.work / "logs" / f"{role}-{index}.log", "ab")  # noqa: SIM115
        popen = subprocess.Popen(
            self.command(role, index), stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL
        )
        log.close()
        proc = Proc(role, index, popen)
        self.procs.append(proc)
        if role == "replicator":
            self.replicator_starts.append(time.time())
        return proc

    def start_all(self) -> None:
        a = self.args
        for role, count in (("writer", a.writers), ("reader", a.readers), ("copier", a.copiers)):
            for i in range(count):
                self.start(role, i)
        if a.backup_interval > 0:
            self.start("backup", 0)
        if self.target is not None:
            self.start("replicator", 0)

    def chaos_step(self) -> None:
        if self.rng.random() < 0.15 and self.kill_coordinator():
            return
        alive = [p for p in self.procs if p.popen.poll() is None and not p.stopped]
        if not alive:
            return
        victim = self.rng.choice(alive)
        if self.rng.random() < 0.7:
            victim.popen.kill()
            victim.popen.wait()
            self.killed += 1
            self.event("kill", victim)
            self.procs.remove(victim)
            self.start(victim.role, victim.index)
        else:
            victim.popen.send_signal(signal.SIGSTOP)
            self.event("stop", victim)
            victim.stopped = True
            self.stopped += 1
            if self.rng.random() < LONG_STOPS:  # its lease expires: it is fenced meanwhile
                pause = self.rng.uniform(self.args.lease_ttl + 0.2, self.args.lease_ttl + 1.5)
            else:
                pause = self.rng.uniform(0.05, 1.0)
            time.sleep(pause)
            victim.popen.send_signal(signal.SIGCONT)
            self.event("cont", victim)
            victim.stopped = False

    def inject_damage(self) -> list[str]:
        """Flip one byte in a snapshot of a live prefix's files; it must be reported.

        The snapshot is taken under the prefix's write lease (so it is a state the prefix was
        in) into a scratch repository of the same id. The byte is in a WAL batch that whole
        batches follow, or in the main file's durable segments: damage either way, never a
        torn tail. Returns violations (damage neither `verify` nor an open reported).
        """
        from hotcopy.storage import CorruptFileError, FileLeases, Repository
        from hotcopy.storage import _format as fmt
        from hotcopy.storage._verify import verify_prefix

        root, scratch = self.work / "repo", self.work / "damage"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        with Repository(root) as repo:
            names = repo.prefixes()
            if not names:
                return []
            name = self.rng.choice(names)
            with repo.leases.lease(name, "write", timeout=10, ttl=10):
                for suffix in (".hc", ".hc-wal"):
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(root / f"{name}{suffix}", scratch / f"{name}{suffix}")
            shutil.copyfile(root / "hotcopy.json", scratch / "hotcopy.json")
        before = verify_prefix(scratch, name)
        if not before.ok:
            return [f"live prefix {name} is damaged: {before.summary()}"]
        wal, main = scratch / f"{name}.hc-wal", scratch / f"{name}.hc"
        batches = _whole_batches(wal, fmt)
        in_wal = len(batches) >= 2 and self.rng.random() < 0.5
        if in_wal:
            batch = self.rng.choice(batches[:-1])
            at, target = batch.offset + self.rng.randrange(batch.size), wal
        else:
            header = fmt.unpack_wal_header(wal.read_bytes()[: fmt.HEADER_SIZE])
            first = fmt.unpack_main_header(main.read_bytes()[: fmt.HEADER_SIZE]).size
            if header.base_len <= first:
                return []  # nothing checkpointed yet
            at, target = self.rng.randrange(first, header.base_len), main
        with open(target, "r+b") as file:
            file.seek(at)
            byte = file.read(1)[0]
            file.seek(at)
            file.write(bytes([byte ^ (1 << self.rng.randrange(8))]))
        self.damages += 1
        problems = []
        if verify_prefix(scratch, name).ok:
            problems.append(f"damage at {target.name}:{at} not reported by verify")
        if in_wal:
            try:
                with Repository(scratch, leases=FileLeases(scratch / ".hotcopy")) as repo:
                    repo.open_prefix(name, "r")
                problems.append(f"damage at {target.name}:{at} opened as a valid prefix")
            except CorruptFileError:
                pass
        return problems

    def kill_coordinator(self) -> bool:
        """SIGKILL the repository's coordinator; its clients start and elect a successor."""
        try:
            pid = int((self.work / "repo" / ".hotcopy" / "coordinator.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            return False
        self.coordinator_kills += 1
        self.event("kill", None, pid)
        return True

    def event(self, action: str, proc: Proc | None, pid: int = 0) -> None:
        """One line per signal sent, so that a violation can be read against what chaos did."""
        who = f"{proc.role} {proc.index} pid {proc.popen.pid}" if proc else f"coordinator pid {pid}"
        with open(self.work / "chaos.log", "a") as log:
            log.write(f"{time.time():.6f} {action} {who}\n")

    def restart_crashed(self) -> list[str]:
        """Processes that exited on their own are failures of the code under test."""
        problems = []
        for proc in list(self.procs):
            code = proc.popen.poll()
            if code is not None:
                problems.append(f"{proc.role} {proc.index} exited with {code} unprompted")
                self.procs.remove(proc)
                self.start(proc.role, proc.index)
        return problems

    def stop_all(self) -> list[str]:
        """Stop every role at the stop file; then the replicator as an operator would, with
        SIGTERM once the writers are gone (it ships what is left and exits 0). Returns
        violations (a replicator that does not stop)."""
        (self.work / "stop").touch()
        self.writers_stopped = time.time()
        for proc in self.procs:
            if proc.stopped:
                proc.popen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        roles = [proc for proc in self.procs if proc.role != "replicator"]
        for proc in roles:
            try:
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        problems = []
        for proc in self.procs:
            if proc.role == "replicator":
                proc.popen.terminate()
                try:
                    self.replicator_exit = proc.popen.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    problems.append("the replicator did not stop within 60 s of SIGTERM")
                    proc.popen.kill()
                    proc.popen.wait()
        return problems


def _whole_batches(wal: Path, fmt: Any) -> list[Any]:
    data = wal.read_bytes()
    header = fmt.unpack_wal_header(data[: fmt.HEADER_SIZE])
    fd = os.open(wal, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, header.size, len(data))
        found = []
        while (batch := fmt.read_batch(reader, load_values=False)) is not None:
            found.append(batch)
        return found
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# the checks


def prefix_state(px: Any) -> dict[str, Any]:
    """What the checks need of a prefix: every key, and the value of each writer's counter
    (records are checked by key; reading every value would only cost time)."""
    return {key: (px[key] if key.endswith("/last") else None) for key in px}


def check_prefix_state(state: dict[str, Any], writers: list[int], where: str) -> list[str]:
    """Each writer's records are exactly 1..last on this state."""
    records: dict[int, set[int]] = {w: set() for w in writers}
    for key in state:
        head, _, tail = key.partition("/")
        if tail != "last" and head[1:].isdigit() and int(head[1:]) in records:
            records[int(head[1:])].add(int(tail))
    problems = []
    for w in writers:
        last = state.get(f"w{w}/last") or 0
        if records[w] != set(range(1, last + 1)):
            missing = sorted(set(range(1, last + 1)) - records[w])[:5]
            extra = sorted(records[w] - set(range(1, last + 1)))[:5]
            found = (f"missing={missing}" if missing else "", f"beyond={extra}" if extra else "")
            problems.append(f"{where}: w{w} last={last} " + " ".join(filter(None, found)))
    return problems


def writers_of(name: str, writers: int, prefixes: int) -> list[int]:
    return [w for w in range(writers) if prefix_of(w, prefixes) == name]


def _tokens_by_seq(root: Path, name: str) -> list[tuple[int, int]]:
    """``(lease token, commit)`` of each commit of the prefix, in commit order (main file's
    segments, then the WAL): with fencing, tokens never go down along the commits."""
    from hotcopy.storage import _format as fmt

    found: dict[int, int] = {}
    main, wal = root / f"{name}.hc", root / f"{name}.hc-wal"
    # A main file is whole segments (batches, then their index and trailer): read by segment.
    with open(main, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        start = fmt.unpack_main_header(file.read(fmt.HEADER_SIZE)).size
        reader = fmt.FileReader(file.fileno(), start, size)
        while reader.pos < size and (segment := fmt.read_segment(reader, load_values=False)):
            for batch in segment.batches:
                found.setdefault(batch.seq, batch.token)
    with contextlib.suppress(FileNotFoundError), open(wal, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        start = fmt.unpack_wal_header(file.read(fmt.HEADER_SIZE)).size
        reader = fmt.FileReader(file.fileno(), start, size)
        while batch := fmt.read_batch(reader, load_values=False):
            found.setdefault(batch.seq, batch.token)
    return [(found[seq], seq) for seq in sorted(found)]


def _stop_windows(chaos_log: Path, role: str = "writer") -> dict[int, list[tuple[float, float]]]:
    """Each writer's (or other role's) stopped intervals (wall clock), from the chaos log."""
    windows: dict[int, list[tuple[float, float]]] = {}
    stopped_at: dict[int, float] = {}
    for line in _read_lines(chaos_log):
        moment, action, *who = line.split()
        if who[0] != role:
            continue
        index = int(who[1])
        if action == "stop":
            stopped_at[index] = float(moment)
        elif action == "cont" and index in stopped_at:
            windows.setdefault(index, []).append((stopped_at.pop(index), float(moment)))
    return windows


def _overlaps(windows: list[tuple[float, float]], start: float, end: float) -> bool:
    return any(begin < end and start < until for begin, until in windows)


def rot_a_backup(catalog: Path) -> None:
    """Flip one bit in the middle of the largest piece of the catalog."""
    pieces = [p for p in catalog.glob("*/*.hc*") if p.is_file() and p.stat().st_size]
    if pieces:
        piece = max(pieces, key=lambda p: p.stat().st_size)
        with open(piece, "r+b") as file:
            file.seek(piece.stat().st_size // 2)
            byte = file.read(1)[0]
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte ^ 0x10]))


def final_checks(sup: Supervisor) -> dict[str, Any]:
    from hotcopy.storage import CorruptFileError, FileLeases, Repository, verify_file
    from hotcopy.workers import Catalog, restore

    a, work = sup.args, sup.work
    violations = _read_lines(work / "violations.log")
    acknowledged = 0
    latencies: list[float] = []
    stops = _stop_windows(work / "chaos.log")
    journals: dict[int, list[tuple[int, int, float]]] = {}  # writer -> (n, commit, acked at)
    with Repository(work / "repo") as repo:
        states = {}
        live_seqs = {}
        for name in repo.prefixes():
            try:
                px = repo.open_prefix(name, "r")
                states[name] = prefix_state(px)
                live_seqs[name] = px.seq
            except CorruptFileError as err:
                violations.append(f"live {name} is damaged: {err}")
        for w in range(a.writers):
            name = prefix_of(w, a.prefixes)
            rows = [line.split() for line in _read_lines(work / f"journal-{w}.log")]
            journals[w] = [(int(row[0]), int(row[1]), float(row[3])) for row in rows]
            acknowledged += len(rows)
            latencies += [float(row[2]) for row in rows]
            # Every writer waits for the write lease inside its commit: a lease that outlived
            # a killed or stopped holder (or a coordinator that did not come back) shows as
            # a commit that waited past the bound, whoever the holder was.
            violations += [
                f"writer {w} waited {float(row[2]):.1f} s for commit {row[0]} on prefix {name} "
                f"(acknowledged at {float(row[3]):.3f})"
                for row in rows
                if float(row[2]) > LEASE_BOUND_S
                # ...unless it was the one stopped: that is its own pause, not a lease's.
                and not _overlaps(stops.get(w, []), float(row[3]) - float(row[2]), float(row[3]))
            ]
            if not rows:
                continue
            last_ack = max(int(row[0]) for row in rows)
            state = states.get(name, {})
            if state.get(f"w{w}/last", 0) < last_ack:
                violations.append(
                    f"live {name}: w{w} acknowledged {last_ack}, repository has "
                    f"{state.get(f'w{w}/last', 0)}"
                )
        for name, state in states.items():
            violations += check_prefix_state(state, writers_of(name, a.writers, a.prefixes), name)
            tokens = _tokens_by_seq(work / "repo", name)
            late = [seq for seq in range(1, len(tokens)) if tokens[seq] < tokens[seq - 1]]
            violations += [
                f"live {name}: commit {tokens[seq][1]} (lease token {tokens[seq][0]}) follows a "
                f"commit of a newer lease (token {tokens[seq - 1][0]}): a fenced writer's "
                "commit landed late"
                for seq in late[:5]
            ]

    # Copies: each standalone copy holds exactly its claimed commit, consistently.
    snapshots = 0
    copy_bytes = 0
    copy_seconds = 0.0
    scratch = work / "scratch"
    for c in range(a.copiers):
        last_seq: dict[str, int] = {}
        for line in _read_lines(work / f"copies-{c}.log"):
            entry = json.loads(line)
            path = work / "copies" / entry["path"]
            report = verify_file(path)
            if not report.ok:
                violations.append(f"copy {path.name}: {report.error} at {report.offset}")
                continue
            if report.seq != entry["seq"]:
                violations.append(
                    f"copy {path.name}: holds commit {report.seq}, copy_prefix said {entry['seq']}"
                )
            if entry["seq"] < last_seq.get(entry["prefix"], 0):
                violations.append(f"copy {path.name}: went back in time")
            last_seq[entry["prefix"]] = entry["seq"]
            shutil.rmtree(scratch, ignore_errors=True)
            try:
                # A private scratch repository needs no coordinator: kernel file locks do.
                scratch.mkdir(parents=True)
                with Repository.init(scratch, leases=FileLeases(scratch / ".hotcopy")) as repo:
                    repo.restore_prefix(path, entry["prefix"])
                    px = repo.open_prefix(entry["prefix"], "r")
                    state = prefix_state(px)
            except Exception as err:
                violations.append(f"copy {path.name} does not restore: {err}")
                continue
            violations += check_prefix_state(
                state, writers_of(entry["prefix"], a.writers, a.prefixes), f"copy {path.name}"
            )
            snapshots += 1
            copy_bytes += entry["bytes"]
            copy_seconds += entry["seconds"]

    # Backups: the catalog verifies, and every backup that `hotcopy backups` calls restorable
    # restores, consistently: one that is called restorable and does not is a violation.
    backups = 0
    if (work / "backups").exists():
        catalog = Catalog(work / "backups")
        view = catalog.scan()
        violations += [
            f"backup catalog: {problem}" for problem in view.check(checksums=True).problems
        ]
        for row in view.listing()["backups"]:
            if not row["restorable"]:
                continue
            shutil.rmtree(scratch, ignore_errors=True)
            manifest = view.manifest(row["id"])
            try:
                restore(
                    work / "backups",
                    scratch,
                    at=row["id"],
                    allow_partial=row["status"] == "partial",
                )
            except Exception as err:
                violations.append(
                    f"backup {row['id']} is called restorable and does not restore: {err}"
                )
                continue
            with Repository(scratch, leases=FileLeases(scratch / ".hotcopy")) as repo:
                if sorted(repo.prefixes()) != sorted(manifest.entries):
                    violations.append(f"backup {row['id']}: restores other prefixes than it holds")
                for name in repo.prefixes():
                    px = repo.open_prefix(name, "r")
                    state = prefix_state(px)
                    if px.seq != manifest.entries[name].seq:
                        violations.append(f"backup {row['id']}/{name}: wrong commit restored")
                    violations += check_prefix_state(
                        state, writers_of(name, a.writers, a.prefixes), f"backup {row['id']}"
                    )
            backups += 1

    replica: dict[str, Any] = {"replica": a.replicate}
    if sup.target is not None:
        live = Live(states, live_seqs, journals)
        problems, counts = check_replica(sup, live, scratch)
        violations += problems
        replica.update(counts)

    # No litter: temps of dead processes are swept on open (and a killed backup run's at the
    # next run, here by the same call); none may survive that.
    shutil.rmtree(scratch, ignore_errors=True)
    Repository(work / "repo").close()
    if (work / "backups").exists():
        Catalog(work / "backups").sweep_abandoned()
    if sup.target is not None:
        replica_catalog = Catalog(sup.target)
        with replica_catalog.locked():  # an object store's sweep wants it; a directory's not
            replica_catalog.sweep_abandoned()
    for directory in (work / "repo", work / "copies", work / "backups", work / "replica"):
        if directory.exists():
            from hotcopy.storage._durable import sweep_stale_temps

            sweep_stale_temps(directory)
            for found in directory.rglob("*.hotcopy-tmp-*"):
                violations.append(f"temp file left behind: {found}")

    latencies.sort()
    return {
        "violations": len(violations),
        "violation_details": violations[:50],
        "acknowledged_commits": acknowledged,
        "snapshots_verified": snapshots,
        "backups_verified": backups,
        "processes_killed": sup.killed,
        "processes_stopped": sup.stopped,
        "coordinator_restarts": sup.coordinator_kills,
        "damage_injected_and_reported": sup.damages,
        "commit_latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "commit_latency_p99_ms": (
            1000 * latencies[int(len(latencies) * 0.99)] if latencies else None
        ),
        "copy_throughput_mib_s": copy_bytes / (1 << 20) / copy_seconds if copy_seconds else None,
        **replica,
    }


# ---------------------------------------------------------------------------------------------
# the replica


@dataclass
class Live:
    """What the replica is checked against: the live repository's final state and commit of
    each prefix, and each writer's journal of ``(n, commit, acknowledged at)``."""

    states: dict[str, dict[str, Any]]
    seqs: dict[str, int]
    journals: dict[int, list[tuple[int, int, float]]]

    def last(self, name: str, w: int) -> int:
        return int(self.states.get(name, {}).get(f"w{w}/last") or 0)


@dataclass
class Restored:
    """A restore of the replica, read back: each prefix's state and commit."""

    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)

    def last(self, name: str, w: int) -> int:
        return int(self.states.get(name, {}).get(f"w{w}/last") or 0)


def restore_replica(
    target: str, scratch: Path, where: str, **how: Any
) -> tuple[Restored | None, list[str]]:
    """Restore the replica into ``scratch`` (``how``: restore()'s ``prefixes``, ``at``,
    ``at_seq``) and read it back; every restored prefix must verify. None when it does not
    restore (a violation: each restore asked for is one the replica holds)."""
    from hotcopy.storage import FileLeases, Repository
    from hotcopy.storage._verify import verify_prefix
    from hotcopy.workers import restore

    shutil.rmtree(scratch, ignore_errors=True)
    try:
        result = restore(target, scratch, **how)
    except Exception as err:
        return None, [f"{where} does not restore: {type(err).__name__}: {err}"]
    problems = []
    restored = Restored()
    with Repository(scratch, leases=FileLeases(scratch / ".hotcopy")) as repo:
        if sorted(repo.prefixes()) != sorted(result.prefixes):
            problems.append(f"{where}: restores {repo.prefixes()}, said {sorted(result.prefixes)}")
        for name in repo.prefixes():
            report = verify_prefix(scratch, name)
            if not report.ok:
                problems.append(f"{where}: {name} does not verify: {report.summary()}")
                continue
            px = repo.open_prefix(name, "r")
            restored.states[name] = prefix_state(px)
            restored.seqs[name] = px.seq
            if px.seq != result.prefixes[name]:
                problems.append(f"{where}: {name} at commit {px.seq}, said {result.prefixes[name]}")
    return restored, problems


def check_restored(restored: Restored, where: str, live: Live, a: argparse.Namespace) -> list[str]:
    """Each writer's records are exactly 1..last, nothing the live repository lacks, and just
    what the prefix's commit holds by the journals: every acknowledged commit at or below it,
    none above it."""
    problems = []
    for name, state in restored.states.items():
        seq, writers = restored.seqs[name], writers_of(name, a.writers, a.prefixes)
        problems += check_prefix_state(state, writers, f"{where} {name}")
        if seq > live.seqs.get(name, 0):
            problems.append(
                f"{where}: {name} at commit {seq}, the live one at {live.seqs.get(name)}"
            )
        for w in writers:
            last = restored.last(name, w)
            if last > live.last(name, w):
                problems.append(f"{where}: w{w}/{last} was never committed")
            below = [(n, s) for n, s, _ in live.journals[w] if s <= seq]
            above = [(n, s) for n, s, _ in live.journals[w] if s > seq]
            if below and last < max(below)[0]:
                n, s = max(below)
                problems.append(
                    f"{where}: {name} at commit {seq} has w{w}/last={last}, not w{w}/{n} "
                    f"(acknowledged as commit {s})"
                )
            if above and last >= min(above)[0]:
                n, s = min(above)
                problems.append(
                    f"{where}: {name} at commit {seq} has w{w}/last={last}, but w{w}/{n} was "
                    f"acknowledged as commit {s}"
                )
    return problems


def check_replica(sup: Supervisor, live: Live, scratch: Path) -> tuple[list[str], dict[str, Any]]:
    """The replica verifies; its latest restore holds every commit acknowledged an interval
    (and slack) before the writers stopped, and every commit after a clean stop; restores at
    random times of the run and of one prefix at random commits hold what they must (see
    :func:`check_restored`). Returns violations and counts."""
    from hotcopy.workers import Catalog
    from hotcopy.workers._replica_log import GENERATIONS_DIR, LOG_DIR, LogObject, _switched

    a, target = sup.args, sup.target
    assert target is not None
    began = time.monotonic()
    problems: list[str] = []
    catalog = Catalog(target)
    view = catalog.scan()
    problems += [f"replica: {problem}" for problem in view.check(checksums=True).problems]
    switches = sorted(
        moment
        for name in catalog.place.listing(GENERATIONS_DIR)
        if (moment := _switched(catalog, name.rsplit("/", 1)[-1])) is not None
    )
    objects = [obj for obj in map(LogObject.parse, catalog.place.listing(LOG_DIR)) if obj]
    counts: dict[str, Any] = {
        "replicator_starts": len(sup.replicator_starts),
        "replicator_exit": sup.replicator_exit,
        "replica_generations": len(switches),
        "replica_log_objects": len(objects),
        "replica_restores_verified": 0,
        "replica_lag_checks": 0,
    }
    verified = 0

    def restored_and_checked(where: str, **how: Any) -> Restored | None:
        nonlocal verified
        restored, found = restore_replica(target, scratch, where, **how)
        problems.extend(found)
        if restored is None:
            return None
        problems.extend(check_restored(restored, where, live, a))
        verified += not found
        return restored

    # The latest: every commit acknowledged an interval (and slack) before the writers
    # stopped; after a clean stop (SIGTERM: it ships what is left), every commit.
    cutoff = sup.writers_stopped - REPLICA_INTERVAL_S - REPLICA_SLACK_S
    latest = restored_and_checked("replica latest")
    if latest is not None:
        problems += _lag_problems(latest, "replica latest", live, a, cutoff)
        counts["replica_lag_checks"] += 1
        if sup.replicator_exit == 0:
            problems += [
                f"replica latest after a clean stop: {name} at commit "
                f"{latest.seqs.get(name, 0)}, the live one at {seq}"
                for name, seq in sorted(live.seqs.items())
                if latest.seqs.get(name, 0) != seq
            ]

    # At random times: nothing committed after the time; every commit acknowledged an
    # interval (and slack) before it, when the replicator was running undisturbed meanwhile;
    # never less than at an earlier time, nor more than the latest.
    if not switches:
        problems.append("replica: the replicator never switched to a snapshot")
    # Only times when a snapshot was in use: under chaos on a loaded machine the first switch
    # may come after the writers stopped, and a time before it has nothing to restore.
    in_use = bool(switches) and switches[0] < sup.writers_stopped
    moments = sorted(
        sup.rng.uniform(switches[0], sup.writers_stopped) for _ in range(TIME_RESTORES * in_use)
    )
    stops = _stop_windows(sup.work / "chaos.log", "replicator").get(0, [])
    earlier: tuple[str, Restored] | None = None
    for moment in moments:
        at = datetime.fromtimestamp(moment, UTC).isoformat()
        moment = datetime.fromisoformat(at).timestamp()
        where = f"replica at {at}"
        restored = restored_and_checked(where, at=at)
        if restored is None:
            continue
        for name in restored.states:
            for w in writers_of(name, a.writers, a.prefixes):
                after = [(n, t) for n, _, t in live.journals[w] if t > moment]
                if after and restored.last(name, w) > min(after)[0]:
                    n, t = min(after)
                    problems.append(
                        f"{where}: has w{w}/{restored.last(name, w)}, committed after that time "
                        f"(w{w}/{n} was acknowledged only {t - moment:.3f} s after it)"
                    )
        if _undisturbed(moment, sup.replicator_starts, switches, stops):
            problems += _lag_problems(
                restored, where, live, a, moment - REPLICA_INTERVAL_S - REPLICA_SLACK_S
            )
            counts["replica_lag_checks"] += 1
        if latest is not None:
            problems += [
                f"{where}: {name} at commit {seq}, after the latest's {latest.seqs.get(name, 0)}"
                for name, seq in restored.seqs.items()
                if seq > latest.seqs.get(name, 0)
            ]
        if earlier is not None:
            problems += [
                f"{where}: {name} at commit {restored.seqs.get(name, 0)}, before its commit "
                f"{seq} {earlier[0].removeprefix('replica ')}"
                for name, seq in earlier[1].seqs.items()
                if restored.seqs.get(name, 0) < seq
            ]
        earlier = (where, restored)
    counts["replica_time_restores"] = len(moments)

    # One prefix at a random commit of a log object: that commit exactly.
    seq_restores = 0
    for _ in range(SEQ_RESTORES * bool(objects)):
        obj = sup.rng.choice(objects)
        seq = sup.rng.randint(obj.first, obj.last)
        where = f"replica {obj.prefix} at commit {seq} (in {obj.name})"
        restored = restored_and_checked(where, prefixes=[obj.prefix], at_seq=seq)
        seq_restores += 1
        if restored is not None and restored.seqs.get(obj.prefix) != seq:
            problems.append(f"{where}: restored commit {restored.seqs.get(obj.prefix)}")
    counts["replica_seq_restores"] = seq_restores
    counts["replica_restores_verified"] = verified
    counts["replica_checks_s"] = round(time.monotonic() - began, 1)
    return problems, counts


def _lag_problems(
    restored: Restored, where: str, live: Live, a: argparse.Namespace, cutoff: float
) -> list[str]:
    """Every commit acknowledged before ``cutoff`` is in ``restored``."""
    problems = []
    for w, rows in live.journals.items():
        due = [(n, t) for n, _, t in rows if t < cutoff]
        name = prefix_of(w, a.prefixes)
        if due and restored.last(name, w) < max(due)[0]:
            n, t = max(due)
            problems.append(
                f"{where}: lacks w{w}/{n} (has {restored.last(name, w)}), acknowledged "
                f"{cutoff - t + REPLICA_INTERVAL_S + REPLICA_SLACK_S:.1f} s before; at most "
                f"{REPLICA_INTERVAL_S + REPLICA_SLACK_S:g} s may be unshipped"
            )
    return problems


def _undisturbed(
    moment: float, starts: list[float], switches: list[float], stops: list[tuple[float, float]]
) -> bool:
    """Whether the replicator running at ``moment`` had shipped from its first snapshot for
    an interval (and slack) by then, and was not stopped meanwhile: then nothing acknowledged
    an interval (and slack) before ``moment`` may be missing at ``moment``."""
    began = max((start for start in starts if start <= moment), default=None)
    first = min(
        (switch for switch in switches if began is not None and switch > began), default=None
    )
    window = REPLICA_INTERVAL_S + REPLICA_SLACK_S
    if first is None or first > moment - window:
        return False
    return not _overlaps(stops, moment - window - REPLICA_INTERVAL_S, moment)


def rot_a_replica(target: str) -> None:
    """Flip one bit near the end (in the commits) of the newest log object of the replica."""
    from hotcopy.workers import Catalog
    from hotcopy.workers._replica_log import LOG_DIR, LogObject

    catalog = Catalog(target)
    objects = [obj for obj in map(LogObject.parse, catalog.place.listing(LOG_DIR)) if obj]
    if objects:
        obj = max(objects, key=lambda obj: (obj.generation, obj.last))
        data = bytearray(catalog.place.read(obj.name, obj.name, 1 << 30) or b"")
        data[-5] ^= 0x10
        catalog.place.write(obj.name, bytes(data))


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto S3 server as a child process on a free port of 127.0.0.1: its endpoint URL.

    Started from ``/``, so that nothing in the working directory shadows a module it imports;
    terminated, a grace period, then killed, and always reaped.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto exited at start: see {log}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto did not answer within 30 s: see {log}")
            time.sleep(0.02)  # polling a child's listening socket: there is no event to wait on
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def use_s3_server(endpoint: str) -> str:
    """Point this process and its children at ``endpoint`` with dummy credentials (and no
    ~/.aws files), and make a bucket there: the replica's URL."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="hotcopy-stress"
    )
    return "s3://hotcopy-stress/replica"


def stop_coordinator(root: Path) -> None:
    """SIGTERM the repository's coordinator (a clean exit removes its shared memory)."""
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        os.kill(int((root / ".hotcopy" / "coordinator.pid").read_text().split()[0]), signal.SIGTERM)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--copiers", type=int, default=1)
    parser.add_argument("--prefixes", type=int, default=2)
    parser.add_argument("--backup-interval", type=float, default=5.0, help="0: no backups")
    parser.add_argument("--chaos", action="store_true", help="SIGKILL/SIGSTOP processes")
    parser.add_argument("--chaos-interval", type=float, default=1.0)
    parser.add_argument(
        "--lease-ttl", type=float, default=2.0, help="the writers' lease TTL (seconds)"
    )
    parser.add_argument(
        "--damage-interval",
        type=float,
        default=3.0,
        help="with --chaos: seconds between damage injections into snapshots (0: none)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--break",
        dest="broken",
        choices=(
            "ack-before-write",
            "copy-without-checkpoint",
            "lease-granted-twice",
            "backup-bit-rot",
            "replica-rot",
        ),
        help="run a deliberately broken build (test-only switch): the checks must fail; "
        "backup-bit-rot flips a byte of a backup piece before the checks (the listing, which "
        "reads sizes, still calls it restorable); replica-rot flips one in the replica's "
        "newest log object (needs --replicate)",
    )
    parser.add_argument(
        "--replicate",
        choices=("s3", "dir", "none"),
        default="s3",
        help="run `hotcopy replicate` into a bucket of a moto S3 server started for the run (s3, "
        "the default) or a directory, under chaos too, and check restores of it (adds a few "
        "seconds of checks)",
    )
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.broken == "replica-rot" and args.replicate == "none":
        parser.error("--break replica-rot needs --replicate s3 or dir")

    if args.role is not None:
        random.seed(os.getpid() ^ int(time.time() * 1000))
        if args.role == "writer":
            role_writer(args.work, args.index, args.prefixes, args.lease_ttl)
        elif args.role == "reader":
            role_reader(args.work, args.index, args.prefixes, args.writers)
        elif args.role == "copier":
            role_copier(args.work, args.index, args.prefixes)
        else:
            role_backup(args.work, args.backup_interval)
        return 0

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    work = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="hotcopy-stress-"))
    for sub in ("logs", "markers", "copies"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    from hotcopy.storage import Repository

    Repository.init(work / "repo").close()
    sup = Supervisor(args, work, random.Random(seed))
    unprompted: list[str] = []
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.replicate == "s3":
            sup.target = use_s3_server(stack.enter_context(moto_server(work / "logs" / "moto.log")))
        elif args.replicate == "dir":
            sup.target = str(work / "replica")
        try:
            sup.start_all()
            next_chaos = began + args.chaos_interval
            next_damage = began + args.damage_interval
            while time.monotonic() - began < args.duration:
                time.sleep(0.05)
                unprompted += sup.restart_crashed()
                if args.chaos and time.monotonic() >= next_chaos:
                    sup.chaos_step()
                    next_chaos = time.monotonic() + sup.rng.uniform(0.2, 2 * args.chaos_interval)
                if args.chaos and args.damage_interval > 0 and time.monotonic() >= next_damage:
                    unprompted += sup.inject_damage()
                    next_damage = time.monotonic() + args.damage_interval
        finally:
            unprompted += sup.stop_all()
        if args.broken == "backup-bit-rot":
            rot_a_backup(work / "backups")
        if args.broken == "replica-rot" and sup.target is not None:
            rot_a_replica(sup.target)
        results = final_checks(sup)
    stop_coordinator(work / "repo")
    results["violation_details"] = unprompted + results["violation_details"]
    results["violations"] += len(unprompted)
    results.update(seed=seed, duration_s=round(time.monotonic() - began, 1), work=str(work))
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            if key != "violation_details":
                print(f"{key:>24}: {value}")
        for detail in results["violation_details"]:
            print(f"  VIOLATION {detail}")
    if not args.keep and results["violations"] == 0:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
