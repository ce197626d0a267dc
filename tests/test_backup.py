"""Bulk backup, restore to a point, retention, and their CLI: each checked against what the
repository held at the backup's cut, reconstructed independently of the code under test.

The hot test runs two writer processes that journal every acknowledged commit (prefix, seq,
ops) to an fsynced file of their own; the state of a prefix at commit S is the replay of its
journal entries with seq <= S. Contiguous seqs in the journal prove it has every commit.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hotcopy.coordinator import ProcessIdentity
from hotcopy.storage import PrefixNotFound, Repository
from hotcopy.workers import (
    BackupError,
    BackupNotFound,
    Catalog,
    CatalogError,
    CopyWorkerPool,
    backup,
    main,
    prune,
    restore,
)
from hotcopy.workers._backup import BATCH_BYTES, BATCH_PREFIXES, INLINE_BELOW, _batches

pytestmark = [pytest.mark.timeout(60)]

GRACE = 5.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}


def dump_repo(root: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """Every prefix of the repository at ``root``: (commit seq, contents)."""
    with Repository(root) as repo:
        found = {}
        for name in repo.prefixes():
            with repo.open_prefix(name, "r") as px:
                found[name] = (px.seq, {key: px[key] for key in px})
        return found


def commit(root: Path, name: str, changes: dict[str, Any]) -> int:
    """Commit ``changes`` (None deletes) to prefix ``name``; return the commit seq."""
    with Repository(root) as repo, repo.open_prefix(name, "rw") as px:
        for key, value in changes.items():
            if value is None:
                del px[key]
            else:
                px[key] = value
        return px.commit()


def backup_files(path: Path) -> dict[str, int]:
    return {entry.name: entry.stat().st_size for entry in os.scandir(path)}


# -- hot backup of 60 prefixes under 2 writers ----------------------------------------------------

_WRITER = r"""
import json, os, random, sys, threading, time
from hotcopy.storage import Repository

root, journal_path, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
names = [f"p{i:02d}" for i in range(count)]
commits = 0
with Repository(root) as repo, open(journal_path, "a") as journal:
    while not stop.is_set():
        px = repo.open_prefix(rng.choice(names), "rw")
        px.begin()  # hold the write lease: the keys seen are those the commit builds on
        ops = []
        for _ in range(rng.randint(1, 3)):
            key = f"k{rng.randrange(12)}"
            roll = rng.random()
            if roll < 0.2 and key in px:
                del px[key]
                ops.append([key, "d", None])
            elif roll < 0.35:
                value = rng.randbytes(rng.randrange(1, 40))
                px[key] = value
                ops.append([key, "b", value.hex()])
            else:
                value = {"w": seed, "n": commits, "s": "x" * rng.randrange(60)}
                px[key] = value
                ops.append([key, "j", value])
        seq = px.commit()
        line = {"p": px.name, "s": seq, "t": time.monotonic(), "ops": ops}
        journal.write(json.dumps(line) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
        commits += 1
        if commits == 20:
            print("ready", flush=True)
print(commits, flush=True)
"""


def _read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the writer said nothing in time"
    return proc.stdout.readline().strip()


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(GRACE)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _finish(proc: subprocess.Popen[str]) -> None:
    """Tell a writer to stop (EOF on its stdin) and check it exits cleanly."""
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.close()
    status = proc.wait(30)
    assert status == 0, proc.stderr.read()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            _reap(proc)


def _replay(entries: list[dict[str, Any]], upto: int) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for entry in sorted(entries, key=lambda e: e["s"]):
        if entry["s"] > upto:
            break
        for key, kind, value in entry["ops"]:
            if kind == "d":
                state.pop(key, None)
            else:
                state[key] = bytes.fromhex(value) if kind == "b" else value
    return state


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("copier", ["default", "workers"])
def test_hot_backup_of_60_prefixes_restores_each_exactly_at_its_cut(
    tmp_path: Path, children: list[subprocess.Popen[str]], copier: str
) -> None:
    """``default``: ``backup(jobs=2)`` as a caller writes it (a run this small is copied in
    the calling process); ``workers``: the same run on two copy-worker processes."""
    root, dest, out = tmp_path / "repo", tmp_path / "backups", tmp_path / "restored"
    count = 60
    journal: dict[str, list[dict[str, Any]]] = {f"p{i:02d}": [] for i in range(count)}
    with Repository.init(root) as repo:
        for name in journal:
            with repo.open_prefix(name, "rw") as px:
                px["k0"] = {"initial": name}
                seq = px.commit()
            journal[name].append({"p": name, "s": seq, "ops": [["k0", "j", {"initial": name}]]})
    journals = [tmp_path / f"journal{w}.jsonl" for w in range(2)]
    for w, path in enumerate(journals):
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(root), str(path), str(w + 1), str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
        )
    for proc in children:
        assert _read_line(proc) == "ready"

    began = time.monotonic()
    if copier == "workers":
        with CopyWorkerPool(2) as pool:
            result = backup(root, dest, executor=pool)
            assert pool.replaced == 0
    else:
        result = backup(root, dest, jobs=2)
    ended = time.monotonic()

    for proc in children:
        _finish(proc)

    entries = [json.loads(line) for path in journals for line in path.read_text().splitlines()]
    for entry in entries:
        journal[entry["p"]].append(entry)
    for name, items in journal.items():  # every acknowledged commit is in the journal, once
        assert sorted(e["s"] for e in items) == list(range(1, len(items) + 1)), name
    during = [e for e in entries if began < e["t"] < ended]
    assert len(during) >= 5, "the writers were not committing while the backup ran"

    assert result.complete and result.failed == {}
    assert sorted(result.prefixes) == sorted(journal)
    manifest = Catalog(dest).load(result.id)
    assert manifest.complete and not manifest.interrupted
    cuts = {name: entry.seq for name, entry in manifest.entries.items()}
    assert cuts == {name: info["seq"] for name, info in result.prefixes.items()}
    assert any(cuts[name] < len(items) for name, items in journal.items()), (
        "no prefix was committed to after its cut: the test shows nothing"
    )

    restored = restore(dest, out)
    assert restored.id == result.id
    assert restored.prefixes == cuts
    got = dump_repo(out)
    assert sorted(got) == sorted(journal)
    for name, items in journal.items():
        seq, contents = got[name]
        assert seq == cuts[name], name
        assert contents == _replay(items, cuts[name]), name


_LOCKSTEP = r"""
import sys, threading
from hotcopy.storage import Repository
root, names = sys.argv[1], sys.argv[2].split(",")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
n = 0
with Repository(root) as repo:
    prefixes = [repo.open_prefix(name, "rw") for name in names]
    while not stop.is_set():
        n += 1
        for px in prefixes:  # in name order: at any instant n(c0) >= n(c1) >= ... >= n(c0) - 1
            px["n"] = n
            px.commit()
        if n == 10:
            print("ready", flush=True)
print(n, flush=True)
"""


@pytest.mark.multiprocess
def test_a_consistent_backup_cuts_every_prefix_at_one_instant(
    tmp_path: Path, children: list[subprocess.Popen[str]], pool: CopyWorkerPool
) -> None:
    root, dest, out = tmp_path / "repo", tmp_path / "backups", tmp_path / "restored"
    names = [f"c{i}" for i in range(8)]
    _init(root)
    for name in names:
        commit(root, name, {"n": 0})
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKSTEP, str(root), ",".join(names)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    children.append(proc)
    assert _read_line(proc) == "ready"
    results = [backup(root, dest, consistent=True, executor=pool) for _ in range(3)]
    _finish(proc)
    for number, result in enumerate(results):
        assert Catalog(dest).load(result.id).consistent
        target = out / str(number)
        restore(dest, target, at=result.id)
        values = [contents["n"] for _, contents in (dump_repo(target)[n] for n in names)]
        assert values[0] >= 10
        assert values == sorted(values, reverse=True) and values[0] - values[-1] <= 1, values


def _init(root: Path) -> Path:
    Repository.init(root).close()
    return root


# -- chains: full -> delta -> delta ---------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[CopyWorkerPool]:
    """One real pool for a test's many backups (a pool per backup costs its start-up each time)."""
    workers = CopyWorkerPool(2)
    try:
        yield workers
    finally:
        workers.terminate()


@pytest.fixture
def repo_root(tmp_path: Path) -> Path:
    """A repository with a large prefix ``big`` (~260 KB) and a small one ``small``."""
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        with repo.open_prefix("big", "rw") as px:
            for i in range(64):
                px[f"k{i:02d}"] = os.urandom(4096)
                if i % 16 == 15:
                    px.commit()
        with repo.open_prefix("small", "rw") as px:
            px["a"] = 1
            px.commit()
    return root


def test_a_chain_of_deltas_restores_each_backup_exactly(
    repo_root: Path, tmp_path: Path, pool: CopyWorkerPool
) -> None:
    dest = tmp_path / "backups"
    states = []
    results = []
    for step in range(3):
        if step:
            commit(repo_root, "big", {f"k{step:02d}": {"changed": step}, f"k{step + 10}": None})
            commit(repo_root, "big", {"new": b"\x00\xff" * step})
            commit(repo_root, "small", {"a": step, f"s{step}": [step]})
        states.append(dump_repo(repo_root))
        results.append(backup(repo_root, dest, incremental=True, executor=pool))

    full, first, second = results
    assert {info["kind"] for info in full.prefixes.values()} == {"full"}
    for delta in (first, second):
        assert {info["kind"] for info in delta.prefixes.values()} == {"delta"}
        assert delta.prefixes["big"]["bytes"] * 20 < full.prefixes["big"]["bytes"]
        assert delta.bytes * 20 < full.bytes
    catalog = Catalog(dest)
    chain = [link.id for link, _ in catalog.chain(catalog.load(second.id), "big")]
    assert chain == [full.id, first.id, second.id]
    assert catalog.load(second.id).entries["big"].base == first.id
    # What the results say was written is what is on disk.
    for result in results:
        sizes = backup_files(Path(result.path))
        assert result.bytes == sum(size for name, size in sizes.items() if name != "MANIFEST.json")

    for number, (result, state) in enumerate(zip(results, states, strict=True)):
        target = tmp_path / f"at{number}"
        restored = restore(dest, target, at=result.id)
        assert restored.id == result.id
        assert dump_repo(target) == state
        assert restored.prefixes == {name: seq for name, (seq, _) in state.items()}

    # An ISO time picks the newest backup at or before it.
    created = [catalog.load(result.id).created for result in results]
    for number in range(2):
        between = (created[number] + created[number + 1]) / 2
        moment = datetime.fromtimestamp(between).astimezone().isoformat()
        assert restore(dest, tmp_path / f"iso{number}", at=moment).id == results[number].id
        assert dump_repo(tmp_path / f"iso{number}") == states[number]
    later = datetime.fromtimestamp(created[-1] + 60).astimezone().isoformat()
    assert catalog.pick(later).id == second.id
    earlier = datetime.fromtimestamp(created[0] - 60).astimezone().isoformat()
    with pytest.raises(BackupNotFound):
        restore(dest, tmp_path / "too-early", at=earlier)
    assert not (tmp_path / "too-early").exists()
    with pytest.raises(CatalogError, match="neither a backup id"):
        catalog.pick("yesterday")
    assert catalog.verify() == []


def test_prune_keeps_what_kept_backups_need_and_removes_the_rest(
    repo_root: Path, tmp_path: Path, pool: CopyWorkerPool
) -> None:
    dest = tmp_path / "backups"
    kinds = [True, True, False, True, True]  # incremental? -> full, delta, full, delta, delta
    results, states = [], []
    for number, incremental in enumerate(kinds):
        if number:
            commit(repo_root, "big", {f"k{number:02d}": number})
            commit(repo_root, "small", {"a": -number})
        states.append(dump_repo(repo_root))
        results.append(backup(repo_root, dest, incremental=incremental, executor=pool))
    ids = [result.id for result in results]
    assert [r.prefixes["big"]["kind"] for r in results] == [
        "full",
        "delta",
        "full",
        "delta",
        "delta",
    ]
    # A run that died before its manifest: swept.
    dead = dest / "hotcopy_backup_1000000000_000000"
    dead.mkdir()
    (dead / "big.hc").write_bytes(b"partial")

    # keep=2 keeps ids[3], ids[4] and the full copy ids[2] their chain starts from.
    assert prune(dest, 2).removed == [dead.name, ids[0], ids[1]]
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(ids[2:])
    # keep=1 keeps ids[4], whose chain needs ids[2] and ids[3]: nothing goes.
    assert prune(dest, 1).removed == []
    for number in (2, 3, 4):
        target = tmp_path / f"r{number}"
        restore(dest, target, at=ids[number])
        assert dump_repo(target) == states[number]
    for number in (0, 1):
        with pytest.raises(BackupNotFound):
            restore(dest, tmp_path / f"gone{number}", at=ids[number])
    assert Catalog(dest).verify() == []

    # A new full copy frees the old chain.
    states.append(dump_repo(repo_root))
    last = backup(repo_root, dest, executor=pool)
    assert prune(dest, 1).removed == ids[2:]
    restore(dest, tmp_path / "last")
    assert dump_repo(tmp_path / "last") == states[-1]
    with pytest.raises(ValueError):
        prune(dest, 0)
    assert [m.id for m in Catalog(dest).manifests()] == [last.id]


def test_max_deltas_before_full_bounds_every_chain(
    repo_root: Path, tmp_path: Path, pool: CopyWorkerPool
) -> None:
    dest = tmp_path / "backups"
    kinds = []
    for number in range(7):
        commit(repo_root, "small", {"a": number})
        result = backup(repo_root, dest, incremental=True, max_deltas_before_full=2, executor=pool)
        kinds.append(result.prefixes["small"]["kind"])
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    catalog = Catalog(dest)
    for manifest in catalog.manifests():
        assert len(catalog.chain(manifest, "small")) <= 3
    restore(dest, tmp_path / "out")
    assert dump_repo(tmp_path / "out") == dump_repo(repo_root)


def test_after_compaction_the_next_incremental_backup_of_that_prefix_is_full(
    repo_root: Path, tmp_path: Path, pool: CopyWorkerPool
) -> None:
    dest = tmp_path / "backups"
    backup(repo_root, dest, incremental=True, executor=pool)
    with Repository(repo_root) as repo, repo.open_prefix("big", "rw") as px:
        for i in range(32):
            del px[f"k{i:02d}"]
        px.commit()
        px.compact()
        px["after"] = "compaction"
        px.commit()
    commit(repo_root, "small", {"b": 2})
    state = dump_repo(repo_root)
    result = backup(repo_root, dest, incremental=True, executor=pool)
    assert result.prefixes["big"]["kind"] == "full"
    assert result.prefixes["small"]["kind"] == "delta"
    entry = Catalog(dest).load(result.id).entries["big"]
    assert entry.base is None and entry.start == 0
    restore(dest, tmp_path / "out")
    assert dump_repo(tmp_path / "out") == state
    # The chain goes on from the new full copy.
    commit(repo_root, "big", {"later": 1})
    assert (
        backup(repo_root, dest, incremental=True, executor=pool).prefixes["big"]["kind"] == "delta"
    )


# -- refusals -------------------------------------------------------------------------------------


def test_prefixes_go_to_the_workers_in_bounded_batches_that_keep_every_worker_busy() -> None:
    names = [f"p{n:04d}" for n in range(1000)]
    sizes = dict.fromkeys(names, 1 << 20)
    sizes["p0003"] = 100 << 20  # larger than a batch: alone
    batches = _batches(names, sizes, workers=2)
    assert [name for batch in batches for name in batch] == names  # each once, in order
    assert ["p0003"] in batches
    assert all(len(batch) <= BATCH_PREFIXES for batch in batches)
    assert all(sum(sizes[n] for n in batch) <= BATCH_BYTES for batch in batches if len(batch) > 1)
    few = [f"q{n}" for n in range(20)]
    assert len(_batches(few, dict.fromkeys(few, 1), workers=2)) >= 8  # 4 per worker
    one_worker = [few[:BATCH_PREFIXES], few[BATCH_PREFIXES:]]  # only the limits apply
    assert _batches(few, dict.fromkeys(few, 1), workers=1) == one_worker
    assert _batches(["only"], {"only": 1}, workers=4) == [["only"]]


def test_backup_refuses_an_unknown_prefix_before_writing_anything(
    repo_root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "backups"
    with pytest.raises(PrefixNotFound, match="nope"):
        backup(repo_root, dest, ["small", "nope"])
    assert not dest.exists()


def test_a_backup_directory_belongs_to_one_repository(repo_root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    backup(repo_root, dest)
    other = tmp_path / "other"
    commit(_init(other), "x", {"a": 1})
    with pytest.raises(CatalogError, match="holds backups of repository"):
        backup(other, dest)
    assert len(Catalog(dest).backup_ids()) == 1


def test_the_next_run_sweeps_what_a_killed_run_left_behind(repo_root: Path, tmp_path: Path) -> None:
    """A run killed before its manifest left its work directory (half a copy in it) and the
    directory of the backup it claimed: the next run removes the work directory, and temps
    in the claimed directory whose writer is gone, but not one whose writer lives."""
    dest = tmp_path / "backups"
    backup(repo_root, dest)
    killed = subprocess.run(  # a run killed before its manifest: its process is gone
        [sys.executable, "-c", _CLAIM_A_BACKUP, str(dest)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    backup_id, work = killed[0], Path(killed[1])
    (work / "big.hc.hotcopy-tmp-1-2-0badf00d").write_bytes(b"half a copy")
    dead_pid = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    me = ProcessIdentity.current()
    dead = dest / backup_id / f"big.hc.hotcopy-tmp-{dead_pid}-12345-0badf00d"
    alive = dest / backup_id / f"small.hc.hotcopy-tmp-{me.pid}-{me.start_ticks}-cafef00d"
    for temp in (dead, alive):
        temp.write_bytes(b"half a copy")
    backup(repo_root, dest, incremental=True)
    assert not work.parent.exists()  # the work directory, whole
    assert not dead.exists()  # its writer is gone: litter
    assert alive.exists()  # its writer lives (it could still rename it into place)
    assert len(Catalog(dest).manifests()) == 2  # the killed run is never taken for a backup


_CLAIM_A_BACKUP = """
import sys, time
from hotcopy.workers import Catalog
backup_id, work = Catalog(sys.argv[1]).new_backup(time.time())
print(backup_id, work)
"""


def test_restore_needs_an_empty_root_or_force(repo_root: Path, tmp_path: Path) -> None:
    dest, target = tmp_path / "backups", tmp_path / "target"
    state = dump_repo(repo_root)
    backup(repo_root, dest)
    commit(_init(target), "small", {"a": "other", "extra": True})
    before = dump_repo(target)
    with pytest.raises(BackupError, match="not empty"):
        restore(dest, target)
    assert dump_repo(target) == before
    restore(dest, target, force=True)
    assert dump_repo(target) == state

    subset = tmp_path / "subset"
    assert sorted(restore(dest, subset, ["small"]).prefixes) == ["small"]
    assert dump_repo(subset) == {"small": state["small"]}
    with pytest.raises(BackupError, match="does not hold"):
        restore(dest, tmp_path / "x", ["missing"])
    with pytest.raises(CatalogError, match="not a hotcopy backup directory"):
        restore(tmp_path / "nowhere", tmp_path / "y")


# -- the CLI --------------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_backup_json_restore_at_force_and_prune(
    repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backups"
    commit(repo_root, "third", {"t": 3})
    first_state = dump_repo(repo_root)
    status, out, err = _cli(capsys, "backup", repo_root, dest, "--json")
    assert (status, err) == (0, "")
    assert len(out.splitlines()) == 1
    first = json.loads(out)
    assert sorted(first["prefixes"]) == ["big", "small", "third"]
    for info in first["prefixes"].values():
        assert info["kind"] == "full" and info["bytes"] > 0
    assert first["bytes"] == sum(info["bytes"] for info in first["prefixes"].values())
    on_disk = backup_files(dest / first["id"])
    assert first["bytes"] == sum(size for name, size in on_disk.items() if name != "MANIFEST.json")

    commit(repo_root, "small", {"a": "changed"})
    commit(repo_root, "third", {"t": None})
    status, out, _ = _cli(
        capsys, "backup", repo_root, dest, "--prefix", "small", "--prefix", "third", "--json"
    )
    assert status == 0
    second = json.loads(out)
    assert sorted(second["prefixes"]) == ["small", "third"]
    assert sorted(Catalog(dest).load(second["id"]).entries) == ["small", "third"]

    status, out, _ = _cli(capsys, "backup", repo_root, dest, "--incremental", "--json")
    assert status == 0
    third = json.loads(out)
    assert {info["kind"] for info in third["prefixes"].values()} == {"delta"}

    # restore --at the first backup into an empty directory
    target = tmp_path / "restored"
    target.mkdir()
    status, out, err = _cli(capsys, "restore", dest, target, "--at", first["id"])
    assert status == 0, err
    assert first["id"] in out
    assert dump_repo(target) == first_state

    # a non-empty ROOT needs --force
    status, out, err = _cli(capsys, "restore", dest, target)
    assert status == 1
    assert err.startswith("hotcopy: error:") and len(err.splitlines()) == 1
    assert "--force" in err and "Traceback" not in err
    assert dump_repo(target) == first_state
    status, _, err = _cli(capsys, "restore", dest, target, "--force")
    assert status == 0, err
    latest = dump_repo(repo_root)
    assert dump_repo(target) == latest

    status, _, err = _cli(capsys, "restore", dest, tmp_path / "r2", "--at", "not-a-time")
    assert status == 1 and err.startswith("hotcopy: error:")

    # prune --keep 1: the third (incremental) backup's chain needs the first (full) one for big.
    status, out, _ = _cli(capsys, "prune", dest, "--keep", "1", "--json")
    assert status == 0
    removed = json.loads(out)["removed"]
    assert first["id"] not in removed
    assert set(removed) <= {second["id"]}
    assert [m.id for m in Catalog(dest).manifests()][-1] == third["id"]
    with pytest.raises(SystemExit) as usage:
        _cli(capsys, "prune", dest, "--keep", "0")
    assert usage.value.code == 2


def test_cli_backup_as_a_program_prints_one_json_object(repo_root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    proc = subprocess.run(
        [sys.executable, "-m", "hotcopy.workers", "backup", str(repo_root), str(dest), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar off a terminal
    report = json.loads(proc.stdout)
    assert {"id", "bytes", "prefixes"} <= set(report)
    assert {name: info["kind"] for name, info in report["prefixes"].items()} == {
        "big": "full",
        "small": "full",
    }
    assert Catalog(dest).pick(None).id == report["id"]


def test_a_restore_by_copy_workers_rebuilds_every_prefix_and_refuses_a_damaged_piece(
    tmp_path: Path,
) -> None:
    # Above INLINE_BELOW bytes a restore with --jobs 2 goes to two copy workers.
    root, dest = tmp_path / "repo", tmp_path / "bk"
    Repository.init(root).close()
    value = os.urandom(1 << 20)
    for p in range(6):
        commit(root, f"p{p}", {f"k{i}": value[i:] + value[:i] for i in range(6)})
        commit(root, f"p{p}", {"last": p})
    first = backup(root, dest, jobs=2)
    commit(root, "p0", {"later": True})
    backup(root, dest, jobs=2, incremental=True)  # p0 a delta, the others unchanged deltas
    pieces = Catalog(dest).scan().pieces(first.id, "p0", checksums=False)
    assert sum(piece.size for piece in pieces) * 6 > INLINE_BELOW
    result = restore(dest, tmp_path / "new", jobs=2)
    assert dump_repo(tmp_path / "new") == dump_repo(root)
    assert result.prefixes == {name: seq for name, (seq, _) in dump_repo(root).items()}

    piece = dest / first.id / "p3.hc"
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0x01
    piece.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="p3"):
        restore(dest, tmp_path / "again", jobs=2)
    assert not (tmp_path / "again").exists()


def test_a_backup_into_a_repository_is_refused(repo_root: Path, tmp_path: Path) -> None:
    """A catalog is never made in a repository (itself or another): its files would mix with
    the repository's (it was, and the backup went on)."""
    other = tmp_path / "other"
    Repository.init(other).close()
    before = sorted(os.listdir(other))
    for place in (other, repo_root):
        with pytest.raises(CatalogError, match="is a hotcopy repository"):
            backup(repo_root, place)
    assert sorted(os.listdir(other)) == before
    assert not (repo_root / "hotcopy-backups.json").exists()


def test_a_backup_into_a_directory_holding_other_files_is_refused(
    repo_root: Path, tmp_path: Path
) -> None:
    """A catalog is made only in an empty directory (as ``borg init`` does): a backup into
    a home directory, or a project's, made one among the user's files and went on."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(CatalogError, match="not empty"):
        backup(repo_root, home)
    assert os.listdir(home) == ["notes.txt"]
    (home / "notes.txt").unlink()
    (home / "hotcopy-backups.json.bak").write_text("{}")  # named like the marker: not it
    with pytest.raises(CatalogError, match="not empty"):
        backup(repo_root, home)
    backup(repo_root, tmp_path / "fresh")  # an empty or missing directory is made a catalog
    (tmp_path / "made").mkdir()
    backup(repo_root, tmp_path / "made")
    backup(repo_root, tmp_path / "made")  # and a catalog stays one
    (tmp_path / "disk" / "lost+found").mkdir(parents=True)  # a new file system's mount point
    backup(repo_root, tmp_path / "disk")
    (tmp_path / "made" / "hotcopy-backups.json").unlink()  # a catalog that lost its marker
    with pytest.raises(CatalogError, match="its marker is gone"):
        backup(repo_root, tmp_path / "made")
