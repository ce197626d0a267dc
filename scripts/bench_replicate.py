"""Benchmark continuous replication (``hotcopy replicate``) against issue 20's targets.

Figures are percentiles and ratios from one run (the machine is shared):

- replication lag: one writer process commits at full speed (a few small values a commit) while
  ``hotcopy replicate ROOT TARGET --interval 1s`` runs as its own process; the lag of a commit
  is the time a log object holding it was first seen in TARGET minus the time the writer's
  commit returned (both wall clock: they are taken in different processes). This process lists
  the target every --poll-ms (a directory with ``os.scandir``, a bucket with ListObjectsV2), so
  a lag is an upper bound, late by at most one poll and one listing. Split by the time each
  object's header says its commits were read: waiting for a pass, then writing. Target:
  p99 <= 1.5 s, into a directory and into a bucket of a local S3 API server (moto's, a child
  process). Every commit must also be in the target's log after the replicator stopped;
- the writer's commit rate with the replicator running / without it: rounds run back to back
  in pairs (order flipped each round), the target listed in both; the median of the pairs'
  ratios (target: >= 0.9x);
- restore of a prefix to arbitrary commits of a 24-hour history (a fake clock: snapshots
  and shipped commits spread over a day) / restore of its newest snapshot (target: <= 2x),
  both from a directory replica. --snapshots 3 (every 6 h) makes long roll forwards, harder
  than the hourly snapshots of the replicator's default; the commit just before the newest
  snapshot, the longest, is timed too.

    python scripts/bench_replicate.py [--quick] [--targets dir,s3] [--seconds 6] [--rounds 4]
                                      [--snapshot-interval S] [--mib 32] [--commits 3000]
                                      [--json FILE] [--dir DIR] [--keep]

By default the replicator takes no snapshot while timed (its interval is 1 h);
--snapshot-interval shows what its snapshots (and the switches to them) add to the lag.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from hotcopy.storage import Repository
from hotcopy.workers import restore
from hotcopy.workers._replicate import Replicator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _s3server import S3Server

PREFIX = "p"
OBJECT_NAME = re.compile(r"(\d{20})-(\d{20})")  # a log object's name (temps do not match)
LOG_MAGIC = b"HCREPLOG1\n"  # a log object starts with it, then its JSON header line

WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from hotcopy.storage import Repository
    root, prefix, seconds, keys, value_bytes, out_file = sys.argv[1:7]
    seconds, keys, value_bytes = float(seconds), int(keys), int(value_bytes)
    value = os.urandom(value_bytes // 2 + 1).hex()[:value_bytes]
    journal = []  # (seq, wall-clock time its commit returned)
    with Repository(root) as repo, repo.open_prefix(prefix, "rw") as px:
        n = 0
        cpu = os.times()
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            for _ in range(keys):
                n += 1
                px[f"k{n % 1000:04d}"] = value
            seq = px.commit()
            journal.append((seq, time.time()))
        elapsed = time.perf_counter() - began
        now = os.times()
    cpu = now.user + now.system - cpu.user - cpu.system
    with open(out_file, "w") as f:
        json.dump({"elapsed": elapsed, "cpu": cpu, "journal": journal}, f)
    """
)


# -- targets: a directory or a bucket, listed from this process -----------------------------------


class DirectoryTarget:
    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self.path = path

    def names(self, under: str) -> list[str]:
        """Every file below ``under`` (two levels at most: ``<generation>/<object>``)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.path / under):
                if entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        found += [f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path)]
                else:
                    found.append(entry.name)
        return found

    def head(self, name: str, size: int) -> bytes:
        with open(self.path / name, "rb") as f:
            return f.read(size)


class BucketTarget:
    def __init__(self, client: Any, bucket: str, path: str) -> None:
        self.location = f"s3://{bucket}/{path}"
        self._client, self._bucket, self._path = client, bucket, path

    def names(self, under: str) -> list[str]:
        start = f"{self._path}/{under}/"
        pages = self._client.get_paginator("list_objects_v2")
        return [
            str(item["Key"])[len(start) :]
            for page in pages.paginate(Bucket=self._bucket, Prefix=start)
            for item in page.get("Contents", ())
        ]

    def head(self, name: str, size: int) -> bytes:
        key = f"{self._path}/{name}"
        answer = self._client.get_object(Bucket=self._bucket, Key=key, Range=f"bytes=0-{size - 1}")
        return bytes(answer["Body"].read())


Target = DirectoryTarget | BucketTarget


class Watcher(threading.Thread):
    """Lists ``log/<PREFIX>`` of a target every ``period`` s; records when each log object was
    first seen (wall clock, once the listing that showed it had returned)."""

    def __init__(self, target: Target, period: float) -> None:
        super().__init__(name="bench-watcher", daemon=True)
        self.target, self.period = target, period
        self.seen: dict[str, float] = {}
        self.listing_s: list[float] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        under = f"log/{PREFIX}"
        while not self._halt.is_set():
            began = time.perf_counter()
            try:
                names = self.target.names(under)
            except Exception:  # a listing that failed is retried at the next poll
                self.errors += 1
                names = []
            now = time.time()
            self.listing_s.append(time.perf_counter() - began)
            for name in names:
                if name not in self.seen and OBJECT_NAME.fullmatch(name.rsplit("/", 1)[-1]):
                    self.seen[name] = now
            self._halt.wait(self.period)

    def objects(self) -> list[tuple[int, int, float, str]]:
        """(first, last, first seen, name) of every log object seen, by first commit."""
        found = []
        for name, seen in list(self.seen.items()):
            match = OBJECT_NAME.fullmatch(name.rsplit("/", 1)[-1])
            assert match is not None
            found.append((int(match[1]), int(match[2]), seen, name))
        return sorted(found)

    def covers(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last, _, _ in self.objects())

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- processes ---------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """Terminate, a grace period, then kill; always reaped. Its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, *procs: Any) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a child exited with {proc.returncode} first")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.01)  # a child's progress shows only in files: nothing to wait on


def duration(seconds: float) -> str:
    """As the issue writes it (``1s``) where it can; a fraction of a second as a number."""
    return f"{seconds:g}s" if seconds.is_integer() else f"{seconds:g}"


@contextlib.contextmanager
def replicator_process(
    root: Path, target: Target, interval: float, snapshot_interval: float | None, log_file: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``hotcopy replicate`` until the block ends: SIGTERM (it ships what is left), reaped."""
    options = ["--interval", duration(interval)]
    if snapshot_interval is not None:
        options += ["--snapshot-interval", duration(snapshot_interval)]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotcopy.workers", "replicate", str(root), target.location,
             *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            # With -m the working directory comes first on sys.path: from /, none of the
            # checkout's directories (storage, workers...) can stand in for another module.
            cwd="/",
        )  # fmt: skip
    try:
        yield proc
    finally:
        code = stop_process(proc, grace=30.0)
        if code not in (0, -signal.SIGTERM):
            tail = log_file.read_text(errors="replace")[-2000:]
            print(f"the replicator exited with {code}:\n{tail}", file=sys.stderr)


def run_writer(root: Path, work: Path, seconds: float, keys: int, value_bytes: int) -> Any:
    """The writer for ``seconds``: its elapsed time and journal of (seq, acknowledged at)."""
    out = work / "writer.json"
    out.unlink(missing_ok=True)
    argv = [str(root), PREFIX, str(seconds), str(keys), str(value_bytes), str(out)]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, *argv], cwd="/")  # as above
    try:
        code = proc.wait(timeout=seconds + 120)
        if code != 0:
            raise RuntimeError(f"the writer exited with {code}")
    finally:
        stop_process(proc)
    return json.loads(out.read_text())


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far."""
    used = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            used[name] = times.user + times.system
    return used


def cpu_shares(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Cores each process kept busy over ``seconds``, on average."""
    return {name: (after[name] - before[name]) / seconds for name in before if name in after}


# -- lag and commit rate ---------------------------------------------------------------------------


def longest_stall(journal: list[tuple[int, float]]) -> float:
    """The longest time between two of the writer's commits returning."""
    return max((b[1] - a[1] for a, b in itertools.pairwise(journal)), default=0.0)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def log_objects(target: Target) -> list[tuple[int, int, str]]:
    """(first, last, name) of every log object of the target now."""
    found = []
    for name in target.names(f"log/{PREFIX}"):
        match = OBJECT_NAME.fullmatch(name.rsplit("/", 1)[-1])
        if match is not None:
            found.append((int(match[1]), int(match[2]), name))
    return sorted(found)


def read_runs(target: Target, name: str, first: int) -> list[tuple[int, int, float]]:
    """(first, last, time read) of each run of commits in a log object (its header's
    ``read``: a merged object keeps those of the objects it replaced)."""
    size = 1 << 16
    while True:
        head = target.head(f"log/{PREFIX}/{name}", size)
        if not head.startswith(LOG_MAGIC):
            return []
        line, newline, _ = head[len(LOG_MAGIC) :].partition(b"\n")
        if newline or len(head) < size:
            break
        size *= 4  # a header longer than that: read more of it
    runs = []
    for last, moment in json.loads(line)["read"]:
        runs.append((first, int(last), float(moment)))
        first = int(last) + 1
    return runs


def earliest(spans: list[tuple[int, int, float]], low: int, high: int) -> list[float]:
    """For each commit ``low``..``high``, the earliest time of the spans (first, last, time)
    that hold it (inf: none does)."""
    found = [float("inf")] * (high - low + 1)
    for first, last, moment in spans:
        for seq in range(max(first, low), min(last, high) + 1):
            found[seq - low] = min(found[seq - low], moment)
    return found


def with_replication(
    root: Path,
    target: Target,
    work: Path,
    args: argparse.Namespace,
    name: str,
    others: dict[str, int],
) -> dict[str, Any]:
    """One round with the replicator running: the writer's rate and each commit's lag."""
    watcher = Watcher(target, args.poll_ms / 1000)
    log_file = work / f"replicate-{name}.log"
    started = time.perf_counter()
    with replicator_process(root, target, args.interval, args.snapshot_interval, log_file) as proc:
        # Its first snapshot is taken, and the switch to it recorded, before it ships.
        wait_until(lambda: bool(target.names("generations")), 120, "the first snapshot", proc)
        startup_s = time.perf_counter() - started
        watcher.start()
        try:
            pids = {**others, "replicator": proc.pid}
            cpu, began = cpu_seconds(pids), time.perf_counter()
            run = run_writer(root, work, args.seconds, args.keys, args.value_bytes)
            cpu = cpu_shares(cpu, cpu_seconds(pids), time.perf_counter() - began)
            last = max(seq for seq, _ in run["journal"])
            # Stopping the replicator ships at once: first let every commit be shipped in time.
            with contextlib.suppress(RuntimeError):
                wait_until(lambda: watcher.covers(last), 10 * args.interval + 10, "the tail")
        finally:
            watcher.stop()
        stopping = time.perf_counter()
        code = stop_process(proc, grace=30.0)  # SIGTERM: it ships what is left, then exits
        stop_s = time.perf_counter() - stopping
    # Objects overlap once merged (and a snapshot's switch may copy some into the next
    # generation): a commit is durable from the first time any object holding it was seen.
    journal = run["journal"]
    low, high = journal[0][0], journal[-1][0]
    seen = earliest([(f, last, t) for f, last, t, _ in watcher.objects()], low, high)
    remaining = log_objects(target)  # after the replicator stopped: what a restore would find
    runs = [r for first, _, name in remaining for r in read_runs(target, name, first)]
    read = earliest(runs, low, high)
    kept = earliest([(first, last, 0.0) for first, last, _ in remaining], low, high)
    lags, waits, writes = [], [], []
    for seq, acked in journal:
        if seen[seq - low] != float("inf"):
            lags.append(seen[seq - low] - acked)
            if read[seq - low] != float("inf"):
                waits.append(read[seq - low] - acked)
                writes.append(seen[seq - low] - read[seq - low])
    reads = sorted({moment for _, _, moment in runs})
    return {
        "commits": len(run["journal"]),
        "rate": len(run["journal"]) / run["elapsed"],
        "lags": lags,
        "waits": waits,  # acknowledged -> read by a pass
        "writes": writes,  # read -> first seen in the target
        "pass_gaps": [b - a for a, b in itertools.pairwise(reads)],
        "objects": len(watcher.seen),
        "objects_at_end": len(remaining),
        "missing": len(journal) - len(lags),  # never seen shipped
        "missing_at_end": sum(kept[seq - low] == float("inf") for seq, _ in journal),
        "listing_s": watcher.listing_s,
        "listing_errors": watcher.errors,
        "cpu": {**cpu, "writer": run["cpu"] / run["elapsed"]},
        "stall_s": longest_stall(run["journal"]),
        "startup_s": startup_s,
        "stop_s": stop_s,
        "exit_code": code,
        "log_tail": log_file.read_text(errors="replace").splitlines()[-5:],
    }


def without_replication(
    root: Path, target: Target, work: Path, args: argparse.Namespace, others: dict[str, int]
) -> dict[str, Any]:
    """One round of the writer alone; the (idle) target listed as in a round with it."""
    watcher = Watcher(target, args.poll_ms / 1000)
    watcher.start()
    try:
        cpu, began = cpu_seconds(others), time.perf_counter()
        run = run_writer(root, work, args.seconds, args.keys, args.value_bytes)
        cpu = cpu_shares(cpu, cpu_seconds(others), time.perf_counter() - began)
    finally:
        watcher.stop()
    return {
        "commits": len(run["journal"]),
        "rate": len(run["journal"]) / run["elapsed"],
        "cpu": {**cpu, "writer": run["cpu"] / run["elapsed"]},
        "stall_s": longest_stall(run["journal"]),
    }


def bench_target(
    kind: str,
    make_target: Callable[[int], Target],
    work: Path,
    args: argparse.Namespace,
    others: dict[str, int],
) -> dict[str, Any]:
    """Rounds with and without the replicator; ``others``: processes whose CPU is accounted
    (the S3 server's)."""
    root = work / f"repo-{kind}"
    with Repository.init(root) as repo, repo.open_prefix(PREFIX, "rw") as px:
        px["seed"] = "x"
        px.commit()
    rounds_with: list[dict[str, Any]] = []
    rounds_without: list[dict[str, Any]] = []
    for n in range(args.rounds):
        # Alternated, and the order flipped each round, so that drift falls on both alike.
        first_with = n % 2 == 1
        for condition in (True, False) if first_with else (False, True):
            if condition:
                rounds_with.append(
                    with_replication(root, make_target(n), work, args, f"{kind}-{n}", others)
                )
            else:
                rounds_without.append(without_replication(root, make_target(n), work, args, others))
    lags = [lag for run in rounds_with for lag in run["lags"]]
    rate_with = statistics.median(run["rate"] for run in rounds_with)
    rate_without = statistics.median(run["rate"] for run in rounds_without)
    listing = [s for run in rounds_with for s in run["listing_s"]]
    return {
        "lag_s": spread(lags),
        "lag_p99_per_round_s": [spread(run["lags"]).get("p99") for run in rounds_with],
        "wait_for_pass_s": spread([w for run in rounds_with for w in run["waits"]]),
        "write_and_poll_s": spread([w for run in rounds_with for w in run["writes"]]),
        "pass_gap_s": spread([g for run in rounds_with for g in run["pass_gaps"]]),
        "listing_s": spread(listing),
        "listing_errors": sum(run["listing_errors"] for run in rounds_with),
        "commits": sum(run["commits"] for run in rounds_with),
        "objects": sum(run["objects"] for run in rounds_with),
        "missing": sum(run["missing"] for run in rounds_with),
        "rate_with": [run["rate"] for run in rounds_with],
        "rate_without": [run["rate"] for run in rounds_without],
        # Paired by round (run back to back): the machine's load shifts between rounds more
        # than replication moves the rate, and a pair sees the same load.
        "rate_ratios": [
            w["rate"] / wo["rate"] for w, wo in zip(rounds_with, rounds_without, strict=True)
        ],
        "rate_ratio": statistics.median(
            w["rate"] / wo["rate"] for w, wo in zip(rounds_with, rounds_without, strict=True)
        ),
        "rate_ratio_of_medians": rate_with / rate_without,
        "stall_with_s": [run["stall_s"] for run in rounds_with],
        "stall_without_s": [run["stall_s"] for run in rounds_without],
        "startup_s": [run["startup_s"] for run in rounds_with],
        "stop_s": [run["stop_s"] for run in rounds_with],
        "exit_codes": [run["exit_code"] for run in rounds_with],
        "objects_at_end": sum(run["objects_at_end"] for run in rounds_with),
        "missing_at_end": sum(run["missing_at_end"] for run in rounds_with),
        "log_tails": [run["log_tail"] for run in rounds_with],
        "cpu_with": average_cpu(rounds_with),
        "cpu_without": average_cpu(rounds_without),
    }


def average_cpu(rounds: list[dict[str, Any]]) -> dict[str, float]:
    names = {name for run in rounds for name in run["cpu"]}
    return {name: statistics.mean(run["cpu"].get(name, 0.0) for run in rounds) for name in names}


# -- restore to a commit of a history ------------------------------------------------------------


class FakeClock:
    """Wall-clock time moved by the bench: a day of history is built in seconds."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def build_history(root: Path, target: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A prefix of --mib MiB, then --commits commits over 24 hours (fake clock) shipped every
    --ship-every commits, with --snapshots snapshots spread over them (plus the first)."""
    block = os.urandom(64 << 10)
    with Repository.init(root) as repo, repo.open_prefix(PREFIX, "rw") as px:
        for i in range(args.mib * 16):
            px[f"big{i:05d}"] = block[i % 997 :] + block[: i % 997]
            if i % 16 == 15:
                px.commit()
        px.commit()
        px.checkpoint()
    day = 86400.0
    clock = FakeClock(time.time() - day)
    step = day / args.commits
    snapshot_every = max(1, args.commits // (args.snapshots + 1))
    rng = random.Random(args.seed)
    snapshots: list[tuple[str, int]] = []  # (id, the prefix's commit in it)
    began = time.perf_counter()
    with (
        Replicator(root, target, interval=1.0, snapshot_interval=10 * day, clock=clock) as rep,
        Repository(root) as repo,
        repo.open_prefix(PREFIX, "rw") as px,
    ):
        snapshots.append((rep.snapshot(), px.seq))
        for n in range(1, args.commits + 1):
            for _ in range(args.keys):
                px[f"small{rng.randrange(5000):04d}"] = os.urandom(256).hex()
            px.commit()
            clock.now += step
            if n % args.ship_every == 0:
                rep.ship()
            if n % snapshot_every == 0 and len(snapshots) <= args.snapshots:
                rep.ship()
                snapshots.append((rep.snapshot(), px.seq))
        rep.ship()
        last = px.seq
        objects = rep.status.shipped_objects
    return {
        "build_s": time.perf_counter() - began,
        "snapshots": snapshots,
        "first_seq": snapshots[0][1],
        "last_seq": last,
        "objects": objects,
        "bytes": sum(f.stat().st_size for f in root.glob("*.hc")),
    }


def timed_restore(target: Path, out: Path, **options: Any) -> tuple[float, int]:
    began = time.perf_counter()
    result = restore(target, out, [PREFIX], **options)
    seconds = time.perf_counter() - began
    shutil.rmtree(out)
    return seconds, result.prefixes[PREFIX]


def bench_restore(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    root, target = work / "history-repo", work / "history-replica"
    history = build_history(root, target, args)
    newest, newest_seq = history["snapshots"][-1]
    rng = random.Random(args.seed)
    seqs = [rng.randint(history["first_seq"] + 1, history["last_seq"]) for _ in range(args.picks)]
    # The longest roll forward: the commit just before the newest snapshot, from the one before.
    worst = newest_seq - 1
    rows = []
    snapshot_seqs = [seq for _, seq in history["snapshots"]]
    for number, seq in enumerate([*seqs, worst]):
        # Paired and alternated: the snapshot's restore timed next to each commit's.
        snapshot_times, commit_times = [], []
        for _ in range(args.repeat):
            seconds, got = timed_restore(target, work / "out-snapshot", at=newest)
            assert got == newest_seq, (got, newest_seq)
            snapshot_times.append(seconds)
            seconds, got = timed_restore(target, work / "out-commit", at_seq=seq)
            assert got == seq, (got, seq)
            commit_times.append(seconds)
        base = bisect.bisect_right(snapshot_seqs, seq) - 1  # the snapshot it rolls forward from
        snapshot_s, commit_s = statistics.median(snapshot_times), statistics.median(commit_times)
        rows.append(
            {
                "seq": seq,
                "snapshot": base,
                "replayed": seq - snapshot_seqs[base],
                "snapshot_s": snapshot_s,
                "commit_s": commit_s,
                "ratio": commit_s / snapshot_s,
                "worst": number == len(seqs),
            }
        )
    arbitrary = [row for row in rows if not row["worst"]]
    snapshot_median = statistics.median(row["snapshot_s"] for row in rows)
    return {
        **history,
        "newest_snapshot": newest,
        "repeat": args.repeat,
        "rows": rows,
        "snapshot_s": snapshot_median,
        "commit_s": statistics.median(row["commit_s"] for row in arbitrary),
        "ratio": statistics.median(row["commit_s"] for row in arbitrary) / snapshot_median,
        "max_ratio": max(row["ratio"] for row in arbitrary),
        "worst_ratio": rows[-1]["ratio"],
    }


def source_version() -> str:
    """The checkout's commit, ``+`` when it has changes (what was measured), or unknown."""
    checkout = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        changes = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if changes else "")


# -- the run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, shorter run")
    parser.add_argument("--targets", default="dir,s3", help="dir, s3 or both (default)")
    parser.add_argument("--seconds", type=float, default=6.0, help="of each writer round")
    parser.add_argument("--rounds", type=int, default=4, help="of each condition")
    parser.add_argument("--interval", type=float, default=1.0, help="the replicator's, seconds")
    parser.add_argument(
        "--snapshot-interval",
        type=float,
        default=None,
        help="the replicator's, seconds (default: its own, 1 h: no snapshot while timed)",
    )
    parser.add_argument("--poll-ms", type=float, default=20.0, help="listing period of a target")
    parser.add_argument("--keys", type=int, default=4, help="values written by each commit")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--mib", type=int, default=32, help="the restored prefix's size")
    parser.add_argument("--commits", type=int, default=3000, help="of the restore's history")
    parser.add_argument("--snapshots", type=int, default=3, help="in the history, after its first")
    parser.add_argument("--ship-every", type=int, default=10, help="commits of a shipped object")
    parser.add_argument("--picks", type=int, default=5, help="random commits restored")
    parser.add_argument("--repeat", type=int, default=3, help="timings of each restore (median)")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = min(args.seconds, 4.0), min(args.rounds, 2)
        args.mib, args.commits, args.picks = min(args.mib, 8), min(args.commits, 600), 3
    kinds = [kind for kind in args.targets.split(",") if kind]
    if not kinds or set(kinds) - {"dir", "s3"}:
        parser.error("--targets: dir, s3 or dir,s3")
    work = Path(tempfile.mkdtemp(prefix="bench-replicate-", dir=args.dir)).absolute()
    results: dict[str, Any] = {
        "interval_s": args.interval,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "keys": args.keys,
        "value_bytes": args.value_bytes,
        "poll_ms": args.poll_ms,
        "snapshot_interval_s": args.snapshot_interval,
        "targets": {},
        "load_before": os.getloadavg(),  # the machine is shared: how busy it was
        "source": source_version(),
    }
    server: S3Server | None = None
    try:
        if "dir" in kinds:
            results["targets"]["dir"] = bench_target(
                "dir", lambda n: DirectoryTarget(work / f"replica-{n}"), work, args, {}
            )
        if "s3" in kinds:
            server = S3Server(work / "moto.log")
            with contextlib.chdir("/"):  # moto runs from / too (see replicator_process)
                server.start()
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint_url  # the replicator's too
            import boto3

            client = boto3.client("s3")
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            moto = [
                child.pid
                for child in psutil.Process().children()
                if "moto.server" in " ".join(child.cmdline())
            ]
            results["targets"]["s3"] = bench_target(
                "s3",
                lambda n: BucketTarget(client, bucket, f"round-{n}"),
                work,
                args,
                {"s3 server": moto[0]} if moto else {},
            )
            results["s3_endpoint"] = server.endpoint_url
        results["restore"] = bench_restore(work, args)
        results["load_after"] = os.getloadavg()
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict[str, Any]) -> None:
    names = {"dir": "directory", "s3": "bucket (moto)"}
    print(
        f"one writer at full speed ({results['keys']} values of {results['value_bytes']} B a "
        f"commit), --interval {results['interval_s']:g}s, {results['rounds']} rounds of "
        f"{results['seconds']:g} s a condition; target listed every {results['poll_ms']:g} ms"
        + (
            f"; --snapshot-interval {results['snapshot_interval_s']:g}s"
            if results["snapshot_interval_s"] is not None
            else ""
        )
    )
    print(
        f"hotcopy {results['source']}; load average (1, 5, 15 min) before "
        + " ".join(f"{x:.2f}" for x in results["load_before"])
        + ", after "
        + " ".join(f"{x:.2f}" for x in results["load_after"])
        + f" ({os.cpu_count()} cores)"
    )
    print("  lag, acknowledged -> object seen in the target (target p99 <= 1.5 s)")
    print(
        f"  {'target':<14} {'commits':>8} {'p50':>8} {'p99':>8} {'max':>8}   missing: never seen"
        "/at end   objects: seen/at end"
    )
    for kind, row in results["targets"].items():
        lag = row["lag_s"]
        if not lag["n"]:
            print(f"  {names[kind]:<14} {row['commits']:8d}  (no commit seen shipped)")
            continue
        print(
            f"  {names[kind]:<14} {row['commits']:8d} {lag['p50']:7.3f}s {lag['p99']:7.3f}s "
            f"{lag['max']:7.3f}s   {row['missing']:16d}/{row['missing_at_end']:<6d}   "
            f"{row['objects']:13d}/{row['objects_at_end']}"
        )
    print("  of which (p50 / p99 / max)")
    parts = (
        ("wait_for_pass_s", "acknowledged -> read by a pass"),
        ("write_and_poll_s", "read -> seen (write + poll)"),
        ("pass_gap_s", "between two passes' reads"),
        ("listing_s", "one listing of the target"),
    )
    for kind, row in results["targets"].items():
        for key, label in parts:
            part = row[key]
            if part["n"]:
                print(
                    f"  {names[kind]:<14} {label:<32} {part['p50']:7.3f}s {part['p99']:7.3f}s "
                    f"{part['max']:7.3f}s"
                )
    print(
        "  writer's commit rate with / without replication, median of the rounds' ratios "
        "(target >= 0.9x)"
    )
    for kind, row in results["targets"].items():
        print(
            f"  {names[kind]:<14} {row['rate_ratio']:.2f}x  (rounds: "
            + ", ".join(
                f"{w:.0f}/{wo:.0f}={r:.2f}"
                for w, wo, r in zip(
                    row["rate_with"], row["rate_without"], row["rate_ratios"], strict=True
                )
            )
            + f"; ratio of the medians {row['rate_ratio_of_medians']:.2f}x)"
        )
    print("  the writer's longest time between two commits, rounds without / with replication")
    for kind, row in results["targets"].items():
        print(
            f"  {names[kind]:<14} "
            + " ".join(f"{s * 1000:.0f}" for s in row["stall_without_s"])
            + " / "
            + " ".join(f"{s * 1000:.0f}" for s in row["stall_with_s"])
            + " ms"
        )
    print("  cores kept busy while the writer ran (mean of rounds), without / with replication")
    for kind, row in results["targets"].items():
        busy = " ".join(
            f"{name} {row['cpu_without'].get(name, 0.0):.2f} / {share:.2f}"
            for name, share in sorted(row["cpu_with"].items())
        )
        print(f"  {names[kind]:<14} {busy}")
    print("  the replicator process: start to first snapshot / SIGTERM to exit, exit codes")
    for kind, row in results["targets"].items():
        print(
            f"  {names[kind]:<14} start "
            + " ".join(f"{s:.2f}s" for s in row["startup_s"])
            + "  stop "
            + " ".join(f"{s:.2f}s" for s in row["stop_s"])
            + f"  exit {row['exit_codes']}"
        )
        for tail in row["log_tails"]:
            for line in tail:
                if "warn" in line.lower() or "error" in line.lower():
                    print(f"    log: {line}")
    rest = results["restore"]
    print(
        f"restore of one prefix ({rest['bytes'] / (1 << 20):.0f} MiB) from a directory replica: "
        f"commits {rest['first_seq'] + 1}..{rest['last_seq']} over 24 h (fake clock), "
        f"{rest['objects']} log objects (built in {rest['build_s']:.1f} s); snapshots #0.."
        f"#{len(rest['snapshots']) - 1} at commits "
        + ", ".join(str(seq) for _, seq in rest["snapshots"])
        + f"; medians of {rest['repeat']}"
    )
    print(f"  {'commit':>8} {'from':>5} {'replayed':>9} {'to it':>8} {'newest':>8} {'ratio':>7}")
    for row in rest["rows"]:
        print(
            f"  {row['seq']:8d} {'#' + str(row['snapshot']):>5} {row['replayed']:9d} "
            f"{row['commit_s']:7.3f}s "
            f"{row['snapshot_s']:8.3f}s {row['ratio']:6.2f}x"
            + ("  (just before the newest snapshot)" if row["worst"] else "")
        )
    print(
        f"  arbitrary commit / newest snapshot (target <= 2x): median {rest['ratio']:.2f}x, "
        f"max {rest['max_ratio']:.2f}x; longest roll forward {rest['worst_ratio']:.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
