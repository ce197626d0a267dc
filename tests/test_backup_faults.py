"""Backups that meet faults: a copy worker SIGKILLed mid-copy, a prefix that can never be copied,
a whole ``hotcopy backup`` run interrupted with SIGINT, damage found by ``hotcopy verify``, and a
restore SIGKILLed midway.

The mid-copy kill uses storage's test-only fault hook: ``HOTCOPY_FAULT=copy:after-step`` with
``HOTCOPY_FAULT_ONCE_FILE`` makes the first worker (across all processes) to reach that step
SIGKILL itself, once. The hook reads the environment at import, so only processes started after
the variable is set (the pool's workers) are armed; this test process is not.

The SIGINT test holds an ``exclusive`` lease on one prefix, so that prefix's copy job waits for
its snapshot lease: the run is provably mid-backup (the other prefixes' files are there, this
one's is not) when the interrupt arrives, with no timing guess.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from hotcopy.storage import CorruptFileError, DestinationExists, Repository, RepositoryNotFound
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
from hotcopy.workers._backup import INLINE_BELOW
from hotcopy.workers._catalog import MANIFEST
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

WAIT = 30.0


def dump_repo(root: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    with Repository(root) as repo:
        found = {}
        for name in repo.prefixes():
            with repo.open_prefix(name, "r") as px:
                found[name] = (px.seq, {key: px[key] for key in px})
        return found


def fill(root: Path, name: str, records: int, size: int = 64) -> None:
    with Repository.init(root) as repo, repo.open_prefix(name, "rw") as px:
        for i in range(records):
            px[f"{name}-{i:04d}"] = os.urandom(size)
            if i % 32 == 31:
                px.commit()
        px["last"] = name
        px.commit()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Bounded wait on an observable outcome (a file appearing, a process ending)."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        while not predicate():
            if stop.wait(0.01):
                return predicate()
        return True
    finally:
        timer.cancel()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}


# -- a worker killed mid-copy ---------------------------------------------------------------------


@pytest.mark.crash
def test_a_worker_killed_mid_copy_is_replaced_and_its_job_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    fill(root, "big", 256, 4096)  # ~1 MiB: 16+ steps of 64 KiB
    fill(root, "small", 10)
    state = dump_repo(root)
    once = tmp_path / "fault-fired"
    monkeypatch.setenv("HOTCOPY_FAULT", "copy:after-step")
    monkeypatch.setenv("HOTCOPY_FAULT_AFTER", "4")  # the 4th step of a worker: inside big's copy
    monkeypatch.setenv("HOTCOPY_FAULT_ONCE_FILE", str(once))
    pool = CopyWorkerPool(2)  # its workers inherit the armed environment
    try:
        result = backup(root, dest, step=64 << 10, executor=pool)
        replaced = pool.replaced
    finally:
        pool.terminate()
    assert once.exists(), "the fault never fired: the test showed nothing"
    assert replaced >= 1
    assert result.retries >= 1
    assert result.failed == {}
    assert sorted(result.prefixes) == ["big", "small"]
    # The dead worker's temp file was swept by the retry; only finished files remain.
    assert sorted(os.listdir(result.path)) == ["MANIFEST.json", "big.hc", "small.hc"]
    assert Catalog(dest).verify() == []
    monkeypatch.delenv("HOTCOPY_FAULT")
    restore(dest, tmp_path / "out")
    assert dump_repo(tmp_path / "out") == state


# -- a prefix that fails every time ---------------------------------------------------------------


def _corrupt_header(root: Path, name: str) -> None:
    with open(root / f"{name}.hc", "r+b") as file:
        file.seek(0)
        magic = file.read(1)
        file.seek(0)
        file.write(bytes([magic[0] ^ 0xFF]))


def test_a_prefix_that_always_fails_is_reported_and_the_others_are_backed_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    for name in ("a", "bad", "c", "d"):
        fill(root, name, 5)
    healthy = dump_repo(root)
    del healthy["bad"]
    _corrupt_header(root, "bad")

    result = backup(root, dest, jobs=2, retries=2)
    assert sorted(result.failed) == ["bad"]
    assert "CorruptFileError" in result.failed["bad"]
    assert result.retries == 2  # both further attempts went to the failing prefix
    assert sorted(result.prefixes) == ["a", "c", "d"]
    assert not result.complete
    manifest = Catalog(dest).load(result.id)
    assert not manifest.complete and sorted(manifest.failed) == ["bad"]
    assert sorted(manifest.entries) == ["a", "c", "d"]

    # A partial backup is never restored by default; by its id, what it holds.
    with pytest.raises(BackupNotFound, match="no complete"):
        restore(dest, tmp_path / "out")
    restored = restore(dest, tmp_path / "out", at=result.id, allow_partial=True)
    assert restored.id == result.id and sorted(restored.missing) == ["bad"]
    assert dump_repo(tmp_path / "out") == healthy
    with pytest.raises(BackupError, match="bad failed"):
        restore(dest, tmp_path / "out2", ["bad"], at=result.id, allow_partial=True)

    capsys.readouterr()
    status = main(["backup", str(root), str(dest)])
    err = capsys.readouterr().err
    assert status == 3  # partial: the others are backed up
    assert err.startswith("hotcopy: error: backup") and "partial" in err
    assert "'bad'" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


# -- SIGINT of a whole run ------------------------------------------------------------------------

# The CLI as a program. SIGINT is set back to Python's default handler first: a test runner
# started in the background by a non-interactive shell passes SIGINT on as ignored.
_CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from hotcopy.workers import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.crash
@pytest.mark.timeout(90)
@pytest.mark.parametrize("copier", ["inline", "workers"])
def test_sigint_of_a_backup_run_leaves_an_incomplete_backup_and_no_worker(
    tmp_path: Path, copier: str
) -> None:
    """``inline``: a small run, copied in the CLI's own process; ``workers``: a run big enough
    (past ``INLINE_BELOW``) to be copied by two copy-worker processes."""
    root, dest = tmp_path / "repo", tmp_path / "backups"
    names = ["b", "c", "d", "z-held"]  # the held one last: an inline run copies the rest first
    for name in names:
        fill(root, name, 20)
    if copier == "workers":
        fill(root, "big", INLINE_BELOW // (1 << 20) + 1, 1 << 20)
    before = backup(root, dest, names)
    state_before = dump_repo(root)
    for name in names:
        fill(root, name, 3)  # later commits: a restore of the wrong backup would show them
    copied = {f"{name}.hc" for name in dump_repo(root) if name != "z-held"}

    cli: subprocess.Popen[str] | None = None
    workers: list[psutil.Process] = []
    runs: list[Path] = []  # the backup's directory
    staged: list[Path] = []  # the work directory its pieces are copied into

    def copying() -> bool:
        runs[:] = [p for p in dest.iterdir() if p.name[0].isdigit() and p.name != before.id]
        staged[:] = list(dest.glob(".staging*/*"))
        return bool(runs and staged) and copied <= set(os.listdir(staged[0]))

    with Repository(root) as repo, repo.leases.lease("z-held", "exclusive"):
        try:
            cli = subprocess.Popen(
                [sys.executable, "-c", _CLI, "backup", str(root), str(dest), "--jobs", "2"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            assert wait_until(lambda: copying() or cli.poll() is not None)
            assert cli.poll() is None and copying(), "the run never got to copying"
            assert "z-held.hc" not in os.listdir(staged[0])  # still waiting for its lease
            workers = psutil.Process(cli.pid).children(recursive=True)
            assert len(workers) == (2 if copier == "workers" else 0)
            cli.send_signal(signal.SIGINT)
            _, stderr = cli.communicate(timeout=WAIT)
        finally:
            if cli is not None and cli.poll() is None:
                cli.kill()
                cli.communicate()
            for worker in workers:
                if worker.is_running():
                    worker.kill()
    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert wait_until(lambda: not any(worker.is_running() for worker in workers))

    (run,) = runs
    # The run records itself as incomplete (an absent manifest would also never be picked,
    # but the interrupt path promises this record).
    manifest = json.loads((run / MANIFEST).read_text())
    assert manifest["complete"] is False
    assert manifest["interrupted"] is True
    assert "z-held" not in manifest["prefixes"]
    catalog = Catalog(dest)
    assert [m.id for m in catalog.manifests()] == [before.id]
    with pytest.raises(BackupError, match="--allow-partial"):
        catalog.pick(run.name)
    restored = restore(dest, tmp_path / "out")
    assert restored.id == before.id
    assert dump_repo(tmp_path / "out") == {name: state_before[name] for name in names}
    assert prune(dest, 1).removed == [run.name]


# -- hotcopy verify of a backup directory ---------------------------------------------------------


def _chain(tmp_path: Path) -> tuple[Path, Any, Any]:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    fill(root, "p", 64, 256)
    full = backup(root, dest, jobs=1)
    fill(root, "p", 8, 256)
    delta = backup(root, dest, jobs=1, incremental=True)
    assert delta.prefixes["p"]["kind"] == "delta" and delta.prefixes["p"]["bytes"] > 0
    return dest, full, delta


def _flip_middle(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size // 2)
        byte = file.read(1)
        file.seek(size // 2)
        file.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize(
    ("damage", "target"),
    [
        ("flip", "full"),
        ("flip", "delta"),
        ("remove", "delta"),
    ],
)
def test_verify_of_a_backup_directory_finds_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, target: str
) -> None:
    dest, full, delta = _chain(tmp_path)
    capsys.readouterr()
    assert main(["verify", str(dest)]) == 0
    capsys.readouterr()

    victim = Path(full.path) / "p.hc" if target == "full" else Path(delta.path) / "p.hc-delta"
    if damage == "flip":
        _flip_middle(victim)
    else:
        victim.unlink()

    # Exit 3 (partial) while the full backup still restores; 1 when the full is damaged.
    assert main(["verify", str(dest), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False
    assert any(victim.name in problem for problem in report["problems"]), report
    expected = "missing" if damage == "remove" else "checksum"
    assert any(expected in problem for problem in report["problems"]), report
    assert captured.err.startswith("hotcopy: error:") and len(captured.err.splitlines()) == 1
    # A restore through the damaged piece refuses before creating anything: a missing one is
    # seen in the catalog, a damaged one by its checksum.
    with pytest.raises(CorruptFileError if damage == "flip" else CatalogError):
        restore(dest, tmp_path / "out", at=delta.id)
    assert not (tmp_path / "out" / "p.hc").exists()


def test_verify_catches_a_flipped_byte_anywhere_in_a_backup_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest, full, delta = _chain(tmp_path)
    for path in (Path(full.path) / "p.hc", Path(delta.path) / "p.hc-delta"):
        size = path.stat().st_size
        for offset in sorted({0, 8, 63, 64, size // 3, size // 2, size - 1}):
            original = path.read_bytes()
            damaged = bytearray(original)
            damaged[offset] ^= 0x80
            path.write_bytes(bytes(damaged))
            capsys.readouterr()
            # Damage found is an error (1), whether another backup still restores or not.
            assert main(["verify", str(dest)]) == 1, (path.name, offset)
            assert path.name in capsys.readouterr().out
            path.write_bytes(original)
            assert main(["verify", str(dest)]) == 0


def test_verify_reports_a_manifest_of_the_wrong_shape_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest, full, delta = _chain(tmp_path)
    manifest = Path(delta.path) / MANIFEST
    text = manifest.read_text()
    assert text.count('"complete"') == 1
    manifest.write_text(text.replace('"complete"', '"compleTe"'))  # valid JSON, a damaged key
    capsys.readouterr()
    assert main(["verify", str(dest)]) == 1  # a problem, though the undamaged backup restores
    captured = capsys.readouterr()
    assert delta.id in captured.out and "field 'complete' is missing" in captured.out
    assert captured.err.startswith("hotcopy: error:") and len(captured.err.splitlines()) == 1
    # The undamaged backup is still restorable by id.
    assert restore(dest, tmp_path / "out", at=full.id).id == full.id


def test_verify_catches_a_flipped_digit_in_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest, full, delta = _chain(tmp_path)
    manifest = Path(delta.path) / MANIFEST
    data = json.loads(manifest.read_text())
    seq = data["prefixes"]["p"]["seq"]
    text = manifest.read_text()
    needle = f'"seq": {seq}'
    assert text.count(needle) == 1
    manifest.write_text(text.replace(needle, f'"seq": {seq ^ 1}'))  # one bit of one digit
    with pytest.raises(CatalogError, match="checksum"):
        restore(dest, tmp_path / "out", at=delta.id)  # the manifest's own checksum refuses it
    assert restore(dest, tmp_path / "older").id == full.id  # and the default passes it over
    capsys.readouterr()
    assert main(["verify", str(dest)]) == 1  # a problem, though the undamaged backup restores


def test_a_refused_restore_can_be_retried_without_force(tmp_path: Path) -> None:
    dest, _, delta = _chain(tmp_path)
    piece = Path(delta.path) / "p.hc-delta"
    original = piece.read_bytes()
    _flip_middle(piece)
    target = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="nothing restored"):
        restore(dest, target)
    piece.write_bytes(original)  # the damage is repaired (say, from another copy)
    assert restore(dest, target).id == delta.id


# -- a restore killed midway ----------------------------------------------------------------------


def _restore_killed_in_third_step(source: Path, target: Path) -> None:
    """``hotcopy restore SOURCE TARGET`` in a process that SIGKILLs itself in its third copy
    step."""
    env = {**_env(), "HOTCOPY_FAULT": "copy:after-step", "HOTCOPY_FAULT_AFTER": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _CLI, "restore", str(source), str(target)],
        env=env,
        cwd=target.parent,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == -signal.SIGKILL, f"the fault never fired: {done.stderr}"


@pytest.mark.crash
@pytest.mark.parametrize("root_was", ["absent", "empty"])
def test_a_restore_killed_midway_leaves_root_as_it_was(tmp_path: Path, root_was: str) -> None:
    """Restored prefixes are not fsynced one by one (the staging directory is synced once,
    then renamed): a restore killed after some prefixes must still leave nothing in ROOT."""
    root, dest, target = tmp_path / "repo", tmp_path / "backups", tmp_path / "out"
    for name in ("a", "b", "c", "d"):
        fill(root, name, 40)
    state = dump_repo(root)
    backup(root, dest, jobs=1)
    if root_was == "empty":
        target.mkdir()
    # Each prefix is one copy step: killed inside the third prefix, two are restored by then.
    _restore_killed_in_third_step(dest, target)
    if root_was == "empty":
        # Built inside ROOT (kept for its owner, mode and file system): what the dead restore
        # left there is its staging directory alone, and ROOT holds no repository.
        assert [name[: len(".restoring.")] for name in os.listdir(target)] == [".restoring."]
        with pytest.raises(RepositoryNotFound):
            Repository(target)
    else:
        assert not os.path.lexists(target)
        assert [p.name for p in tmp_path.glob(".out.restoring*")], "the staging was left"
    assert restore(dest, target).prefixes == {name: seq for name, (seq, _) in state.items()}
    assert dump_repo(target) == state
    assert not list(tmp_path.glob(".out.restoring*")), "the dead restore's staging was not swept"
    assert not list(target.glob(".restoring*")), "the dead restore's staging was not swept"


# -- a restore of one .hc copy -------------------------------------------------------------------


@pytest.mark.parametrize("root_was", ["absent", "empty"])
def test_a_refused_restore_of_one_copy_leaves_root_as_it_was(
    tmp_path: Path, root_was: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hotcopy restore COPY.hc ROOT`` of a damaged copy says "nothing restored"; ROOT must
    then hold nothing either, not an empty repository that an application would open as the
    restored one."""
    root, target = tmp_path / "repo", tmp_path / "out"
    fill(root, "p", 40)
    with Repository(root) as repo:
        repo.copy_prefix(tmp_path / "p.hc", "p")
    _flip_middle(tmp_path / "p.hc")
    if root_was == "empty":
        target.mkdir()
    assert main(["restore", str(tmp_path / "p.hc"), str(target)]) == 1
    assert "nothing restored" in capsys.readouterr().err
    if root_was == "empty":
        assert os.listdir(target) == []
    else:
        assert not os.path.lexists(target)
    assert not list(tmp_path.glob(".out.restoring*")), "the staging directory was left"


@pytest.mark.crash
def test_a_restore_of_one_copy_killed_midway_leaves_root_as_it_was(tmp_path: Path) -> None:
    """Killed inside its third copy step (a copy of 4 MiB steps), the restore of one copy into a
    new ROOT leaves no ROOT; the next restore sweeps what the dead one left."""
    root, target = tmp_path / "repo", tmp_path / "out"
    fill(root, "p", 1000, size=20_000)  # 20 MB: five steps
    state = dump_repo(root)
    with Repository(root) as repo:
        repo.copy_prefix(tmp_path / "p.hc", "p")
    _restore_killed_in_third_step(tmp_path / "p.hc", target)
    assert not os.path.lexists(target)
    assert main(["restore", str(tmp_path / "p.hc"), str(target)]) == 0
    assert dump_repo(target) == state
    assert not list(tmp_path.glob(".out.restoring*")), "the dead restore's staging was not swept"


def test_a_restore_into_an_empty_mount_point_writes_on_that_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ROOT is the mount point of a new disk: the restore (of a copy, or of a backup) must
    write on that disk, not build beside ROOT on the parent's, which it could fill, and then
    fail to rename onto a mount point."""
    root = tmp_path / "repo"
    fill(root, "p", 40)
    state = dump_repo(root)
    backup(root, tmp_path / "backups")
    with Repository(root) as repo:
        repo.copy_prefix(tmp_path / "p.hc", "p")
    disks = [(tmp_path / "p.hc", tmp_path / "disk1"), (tmp_path / "backups", tmp_path / "disk2")]
    for source, mount in disks:
        with storage_helpers().tmpfs(mount, "size=8m"):
            assert main(["restore", str(source), str(mount)]) == 0, capsys.readouterr().err
            assert os.stat(mount / "p.hc").st_dev == os.stat(mount).st_dev
            assert dump_repo(mount) == state
            assert not [name for name in os.listdir(tmp_path) if "restoring" in name]


def test_two_restores_into_one_empty_root_never_mix_their_repositories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restore into an existing empty ROOT moves its repository in file by file; a second
    restore doing the same at once would mix the two (one's marker, the other's prefix files,
    and each one's rollback removing the other's). The second is refused while the first holds
    ROOT (as a running restore does, here held by the test), and ROOT stays as it was."""
    root, target = tmp_path / "repo", tmp_path / "out"
    fill(root, "p", 40)
    with Repository(root) as repo:
        repo.copy_prefix(tmp_path / "p.hc", "p")
    target.mkdir()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["restore", str(tmp_path / "p.hc"), str(target)]) == 1
        assert "another restore" in capsys.readouterr().err
        assert os.listdir(target) == []
    finally:
        os.close(fd)
    assert main(["restore", str(tmp_path / "p.hc"), str(target)]) == 0
    assert dump_repo(target) == dump_repo(root)


@pytest.mark.crash
@pytest.mark.parametrize("then", ["restore", "restore --force of another backup"])
def test_a_restore_killed_while_it_moves_into_root_leaves_nothing_the_next_one_keeps(
    tmp_path: Path, then: str
) -> None:
    """Into an existing ROOT the repository is moved in entry by entry, its marker last. A
    restore SIGKILLed after two entries left them there, unswept: the next restore was refused
    (ROOT not empty), and one with --force of another backup kept them beside its own
    (a repository mixed from two restores, found by an attack)."""
    target = tmp_path / "out"
    states = _two_backups(tmp_path)
    target.mkdir()
    _killed_while_moving(tmp_path, target, after=2)
    assert not (target / "hotcopy.json").exists()
    if then == "restore":
        assert main(["restore", str(tmp_path / "backups-a"), str(target)]) == 0
        assert dump_repo(target) == states["a"]
    else:
        assert main(["restore", "--force", str(tmp_path / "backups-b"), str(target)]) == 0
        assert dump_repo(target) == states["b"]
    assert sorted(name for name in os.listdir(target) if name.endswith(".hc")) == sorted(
        f"{prefix}.hc" for prefix in states["a" if then == "restore" else "b"]
    )
    assert not list(target.glob(".restoring*"))


def _two_backups(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Backups ``backups-a`` (prefixes p1 p2 p3) and ``backups-b`` (q1); their states."""
    states = {}
    for name, prefixes in (("a", ("p1", "p2", "p3")), ("b", ("q1",))):
        for prefix in prefixes:
            fill(tmp_path / name, prefix, 20)
        states[name] = dump_repo(tmp_path / name)
        backup(tmp_path / name, tmp_path / f"backups-{name}")
    return states


def _killed_while_moving(tmp_path: Path, target: Path, after: int) -> None:
    """A restore of backups-a into ``target`` SIGKILLed after moving ``after`` entries in."""
    env = {**_env(), "HOTCOPY_FAULT": "restore:moved", "HOTCOPY_FAULT_AFTER": str(after)}
    done = subprocess.run(
        [sys.executable, "-c", _CLI, "restore", str(tmp_path / "backups-a"), str(target)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == -signal.SIGKILL, f"the fault never fired: {done.stderr}"


def test_a_restore_never_writes_into_a_root_that_filled_while_it_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROOT was empty when the restore looked, and something (another restore, a user) put a
    file there before it built: without --force nothing may be written around it (the
    restore used to look again later, take the non-empty ROOT for one to restore into in
    place, and make a repository around the file)."""
    import hotcopy.workers._backup as backup_module

    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    real = backup_module.roll_forward

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        (target / "notes.txt").write_text("the user's")
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, "roll_forward", meanwhile)
    with pytest.raises((DestinationExists, BackupError)):
        restore(tmp_path / "backups-a", target)
    assert os.listdir(target) == ["notes.txt"]


def test_a_restore_sweeps_a_dead_one_only_while_it_holds_root(tmp_path: Path) -> None:
    """What a killed restore moved into ROOT is removed by the next restore, but only under
    its lock on ROOT: while another restore holds ROOT (which may have just completed its
    repository there) the sweep must not delete anything (it used to, unlocked, and wiped a
    live repository restored meanwhile)."""
    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    _killed_while_moving(tmp_path, target, after=3)
    left = sorted(os.listdir(target))
    assert len(left) == 4  # three entries and the staging directory
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DestinationExists, match="another restore"):
            restore(tmp_path / "backups-b", target)
        assert sorted(os.listdir(target)) == left
    finally:
        os.close(fd)


def test_a_dead_restores_list_never_removes_anything_outside_root(tmp_path: Path) -> None:
    """The list a killed restore leaves of what it moved into ROOT is only a list of ROOT's
    own entries: absolute paths, ``..`` and names through a link in ROOT are refused, as is
    a list that is a link (they deleted files outside ROOT)."""
    states = _two_backups(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for case in ("absolute", "parent", "through a link", "list is a link"):
        target = tmp_path / f"out-{case.replace(' ', '-')}"
        target.mkdir()
        _killed_while_moving(tmp_path, target, after=1)
        victim = outside / f"victim-{case.replace(' ', '-')}"
        victim.write_text("not the restore's")
        (staging,) = target.glob(".restoring*")
        listing = staging / ".moving"
        names = {
            "absolute": [str(victim)],
            "parent": [f"../outside/{victim.name}"],
            "through a link": [f"link/{victim.name}"],
            "list is a link": [victim.name],
        }[case]
        (target / "link").symlink_to(outside)
        listing.unlink()
        if case == "list is a link":
            decoy = tmp_path / f"decoy-{case.replace(' ', '-')}"
            decoy.write_text("".join(f"{victim.stat().st_ino} {name}\n" for name in names))
            listing.symlink_to(decoy)
        else:
            listing.write_text("".join(f"{victim.stat().st_ino} {name}\n" for name in names))
        (target / "link").unlink()
        with contextlib.suppress(BackupError, DestinationExists):
            restore(tmp_path / "backups-a", target)
        assert victim.read_text() == "not the restore's", case
        if (target / "hotcopy.json").exists():
            assert dump_repo(target) == states["a"]


@pytest.mark.parametrize("root_exists", [True, False])
def test_a_restore_never_sweeps_a_directory_renamed_to_look_like_a_dead_ones(
    tmp_path: Path, root_exists: bool
) -> None:
    """In a shared directory a group member may rename this user's directories (not remove
    them): one renamed to the name of a dead restore's staging directory must be left alone
    (the sweep removed it, with everything in it)."""
    states = _two_backups(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    target = shared / "out"
    if root_exists:
        target.mkdir()
    place, base = (target, ".restoring") if root_exists else (shared, ".out.restoring")
    private = place / "private"
    private.mkdir(mode=0o700)
    (private / "work").write_text("the user's")
    disguised = place / f"{base}.hotcopy-tmp-999999-1-deadbeef"  # no such process
    os.rename(private, disguised)
    if root_exists:
        with pytest.raises((DestinationExists, BackupError), match="not empty"):
            restore(tmp_path / "backups-a", target)
    else:
        restore(tmp_path / "backups-a", target)
        assert dump_repo(target) == states["a"]
    assert (disguised / "work").read_text() == "the user's"


def test_a_dead_restores_sweep_removes_only_the_entries_it_moved(tmp_path: Path) -> None:
    """A restore killed after its first move listed every name it was to move; a file of
    another user's put into ROOT since under one of the names it had not moved yet is not
    its to remove (the sweep removed it, then built a repository around the gap)."""
    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    _killed_while_moving(tmp_path, target, after=1)
    theirs = target / "p3.hc"
    theirs.write_text("not the restore's")
    with pytest.raises((DestinationExists, BackupError), match="not empty"):
        restore(tmp_path / "backups-a", target)
    assert theirs.read_text() == "not the restore's"
    assert not (target / "hotcopy.json").exists()


def test_the_staging_directory_of_a_restore_killed_once_complete_is_swept(
    tmp_path: Path,
) -> None:
    """A restore killed after its marker moved in left a complete repository and its staging
    directory: the next restore into that repository (--force) removes the staging directory
    (it stayed for good: a sweep ran only into an empty ROOT)."""
    states = _two_backups(tmp_path)
    whole = tmp_path / "whole"
    restore(tmp_path / "backups-a", whole)
    target = tmp_path / "out"
    target.mkdir()
    _killed_while_moving(tmp_path, target, after=len(os.listdir(whole)))
    assert dump_repo(target) == states["a"]
    assert [name for name in os.listdir(target) if name.startswith(".restoring")]
    restore(tmp_path / "backups-a", target, force=True)
    assert not [name for name in os.listdir(target) if name.startswith(".restoring")]
    assert dump_repo(target) == states["a"]


def test_a_root_given_through_a_link_is_restored_where_the_link_pointed_at_the_start(
    tmp_path: Path,
) -> None:
    """ROOT is a link to an empty directory; switched to a live repository while the
    restore runs, that repository must not be touched (the moves and their rollback went
    through the link, into the live repository)."""
    states = _two_backups(tmp_path)
    empty, live, link = tmp_path / "empty", tmp_path / "b", tmp_path / "root"
    empty.mkdir()
    link.symlink_to(empty)
    before = sorted(os.listdir(live))

    def switch(done: int, *_: int) -> None:
        if link.resolve() != live:
            tmp = tmp_path / "root.new"
            tmp.symlink_to(live)
            os.replace(tmp, link)

    restore(tmp_path / "backups-a", link, progress=switch, jobs=1)
    assert link.resolve() == live
    assert sorted(os.listdir(live)) == before
    assert dump_repo(live) == states["b"]
    assert dump_repo(empty) == states["a"]


_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> None:
    """Swap the names of two entries of one directory at once (``renameat2``), as a member
    of a shared directory may."""
    import ctypes

    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE):
        raise OSError(ctypes.get_errno(), "renameat2 RENAME_EXCHANGE failed")


def test_a_staging_directory_exchanged_for_a_real_one_never_builds_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member of a shared ROOT exchanges the restore's staging directory with a directory
    of their own as the build starts (not a link: a real directory): nothing may be built in
    theirs (the whole repository was, by path, and the restore then moved its empty staging
    directory into ROOT and reported success)."""
    import hotcopy.workers._backup as backup_module

    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    target.chmod(0o2770)
    theirs = target / "theirs"
    real = backup_module._restore_into

    def exchanged_first(*args: Any, **kwargs: Any) -> Any:
        (staging,) = [name for name in os.listdir(target) if name.startswith(".restoring")]
        theirs.mkdir()  # once ROOT was found empty
        _exchange(target / staging, theirs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, "_restore_into", exchanged_first)
    with pytest.raises((DestinationExists, BackupError, OSError)):
        restore(tmp_path / "backups-a", target, jobs=1)
    (swapped,) = [name for name in os.listdir(target) if name.startswith(".restoring")]
    assert os.listdir(target / swapped) == []  # theirs, under the staging directory's name
    assert not (target / "hotcopy.json").exists()


def test_a_work_directory_exchanged_as_it_is_made_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the ``mkdir`` of a work directory and its ``open``, a member of the shared
    directory exchanges it with a private directory of this user's: it must not be taken
    for the work directory (it was, and emptied when the work was done)."""
    from hotcopy.workers import _workdir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    private = shared / "private"
    private.mkdir(mode=0o700)
    (private / "notes").write_text("the user's")
    real_mkdir = os.mkdir

    def mkdir_then_exchanged(name: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(name, *args, **kwargs)
        if str(name).startswith(".work"):
            _exchange(shared / name, private)

    monkeypatch.setattr(os, "mkdir", mkdir_then_exchanged)
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            _workdir.WorkDirectory(shared, fd, ".work")
    finally:
        os.close(fd)
    (made,) = [name for name in os.listdir(shared) if name.startswith(".work")]
    assert (shared / made / "notes").read_text() == "the user's"


def test_a_dead_restores_sweep_never_empties_a_directory_exchanged_for_one_it_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore killed after moving ``.hotcopy`` into a shared ROOT; as the next restore's
    sweep removes it, a member exchanges its name with a private directory of this user's:
    that directory must keep what it holds (the sweep checked the inode, then removed by
    name)."""
    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    target.chmod(0o2770)
    _killed_while_moving(tmp_path, target, after=1)
    assert (target / ".hotcopy").is_dir()
    mine = target / "mine"
    mine.mkdir(mode=0o700)
    (mine / "notes").write_text("the user's")
    done: list[bool] = []

    def exchanging_first(real: Callable[..., Any]) -> Callable[..., Any]:
        # Just before the sweep opens or removes the entry: after it looked at its inode.
        def call(name: Any, *args: Any, **kwargs: Any) -> Any:
            if name == ".hotcopy" and not done and kwargs.get("dir_fd") is not None:
                done.append(True)
                _exchange(target / ".hotcopy", mine)
            return real(name, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", exchanging_first(os.open))
    monkeypatch.setattr(shutil, "rmtree", exchanging_first(shutil.rmtree))
    with contextlib.suppress(DestinationExists, BackupError):
        restore(tmp_path / "backups-a", target)
    monkeypatch.undo()
    assert done, "the sweep never opened the entry"
    kept = [p for p in target.iterdir() if (p / "notes").exists()]
    assert [p.read_text() for p in (k / "notes" for k in kept)] == ["the user's"]


def _swap_staging_for_a_link(place: Path, outside: Path) -> None:
    """What a group member may do in a shared directory: rename the restore's staging
    directory in ``place`` and put a link to ``outside`` in its place."""
    (staging,) = [name for name in os.listdir(place) if ".restoring" in name]
    os.rename(place / staging, place / "elsewhere")
    (place / staging).symlink_to(outside)
    os.lchown(place / staging, _MEMBER, _MEMBER)  # the link is the group member's


_MEMBER = 65534  # a uid of no process of this test's


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user's needs root to make")
@pytest.mark.parametrize(
    ("when", "jobs", "root_exists"),
    [
        ("build", 1, True),
        ("build", 2, True),
        ("build", 1, False),
        ("moves", 1, True),
        ("moves", 1, False),
    ],
)
def test_a_staging_directory_swapped_for_a_link_never_sends_the_restore_outside_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, jobs: int, root_exists: bool
) -> None:
    """In a directory shared with a group (ROOT, or the parent of a missing ROOT), a member
    renames the restore's staging directory and puts a link to a directory outside it in its
    place, as the build starts or once it is done: the restore must write nothing there (it
    built a whole repository through the link, or wrote its list of names there), and end
    with no repository rather than one it did not build (or with the one it built, renamed
    into place through descriptors)."""
    import hotcopy.workers._backup as backup_module

    states = _two_backups(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    target, outside = (shared / "out", tmp_path / "outside")
    if root_exists:
        target.mkdir()
        target.chmod(0o2770)
    outside.mkdir()
    (outside / "theirs").write_text("kept")
    place = target if root_exists else shared
    step = "_restore_into" if when == "build" else "sync_filesystem"
    real = getattr(backup_module, step)

    def swapped_first(*args: Any, **kwargs: Any) -> Any:
        _swap_staging_for_a_link(place, outside)
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, step, swapped_first)
    if when == "moves" and not root_exists:
        # Built, then renamed into place through descriptors: the link changed nothing.
        restore(tmp_path / "backups-a", target, jobs=jobs)
        assert dump_repo(target) == states["a"]
    else:
        with pytest.raises((DestinationExists, BackupError, OSError)):
            restore(tmp_path / "backups-a", target, jobs=jobs)
        assert not (target / "hotcopy.json").exists()
    assert sorted(os.listdir(outside)) == ["theirs"]
    assert (outside / "theirs").read_text() == "kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user's needs root to make")
@pytest.mark.parametrize("step", ["_copy_all", "_record"])
def test_a_backup_directory_swapped_for_a_link_never_sends_the_backup_outside_the_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """In a catalog shared with a group, a member puts a link to a directory outside it in
    place of the directory a running backup claimed, before its pieces are copied or before
    they are published: nothing may be written there (the copies replaced the user's files
    of the same name through the link, a live repository's main file among them)."""
    import hotcopy.workers._backup as backup_module

    root, catalog, outside = tmp_path / "repo", tmp_path / "shared", tmp_path / "outside"
    fill(root, "p1", 20)
    catalog.mkdir()
    catalog.chmod(0o2770)
    outside.mkdir()
    (outside / "p1.hc").write_text("the user's")
    real = getattr(backup_module, step)

    def swapped_first(*args: Any, **kwargs: Any) -> Any:
        (claimed,) = [name for name in os.listdir(catalog) if name[0].isdigit()]
        os.rename(catalog / claimed, catalog / "elsewhere")
        (catalog / claimed).symlink_to(outside)
        os.lchown(catalog / claimed, _MEMBER, _MEMBER)  # the link is the group member's
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, step, swapped_first)
    with pytest.raises((CatalogError, BackupError)):
        backup(root, catalog, jobs=1)
    assert sorted(os.listdir(outside)) == ["p1.hc"]
    assert (outside / "p1.hc").read_text() == "the user's"


def test_a_backup_directory_exchanged_for_its_work_directory_is_never_reported_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the pieces are moved into the backup's directory, a member of the shared catalog
    exchanges its name with the run's work directory: the run must not write its manifest
    there and report a complete backup whose pieces are elsewhere (it did, exit 0)."""
    import hotcopy.workers._places as places_module

    root, catalog = tmp_path / "repo", tmp_path / "shared"
    fill(root, "p1", 20)
    catalog.mkdir()
    catalog.chmod(0o2770)
    real = places_module.remove_work_directory

    def exchanged_first(staging: Path) -> None:
        (claimed,) = [name for name in os.listdir(catalog) if name[0].isdigit()]
        _exchange(catalog / claimed, staging.parent)
        real(staging)

    monkeypatch.setattr(places_module, "remove_work_directory", exchanged_first)
    with pytest.raises((CatalogError, BackupError)):
        backup(root, catalog, jobs=1)
    assert Catalog(catalog).manifests() == []


def test_a_restore_into_a_missing_root_never_replaces_one_made_meanwhile(tmp_path: Path) -> None:
    """ROOT was missing, and an empty directory was made there while the restore built
    beside it: it is kept as made (a rename would silently replace it, mode and owner)."""
    _two_backups(tmp_path)
    target = tmp_path / "out"

    def make_root(done: int, *_: int) -> None:
        if not target.exists():
            target.mkdir()
            target.chmod(0o2770)

    with pytest.raises(DestinationExists):
        restore(tmp_path / "backups-a", target, progress=make_root, jobs=1)
    assert os.listdir(target) == []
    assert target.stat().st_mode & 0o7777 == 0o2770


def test_restores_with_force_into_one_repository_run_side_by_side(tmp_path: Path) -> None:
    """A --force restore into a repository holds ROOT shared, only a restore that builds ROOT
    holds it alone: one --force restore must not be refused because another one is looking
    at ROOT (held shared here by the test, as a running one does)."""
    states = _two_backups(tmp_path)
    target = tmp_path / "out"
    assert restore(tmp_path / "backups-a", target).prefixes
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        restore(tmp_path / "backups-b", target, force=True)
    finally:
        os.close(fd)
    assert dump_repo(target) == {**states["a"], **states["b"]}


def test_a_file_put_into_root_while_the_restore_moves_in_is_never_taken_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something put into ROOT after the restore's last look but while it moves its entries in
    (here: while it writes its list of them) is neither kept inside the restored repository nor
    replaced by one of its files: the restore is refused and ROOT left with that alone."""
    import hotcopy.workers._backup as backup_module

    _two_backups(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    real = backup_module.write_durably

    def meanwhile(path: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == ".moving":
            (target / "notes.txt").write_text("the user's")
            (target / "p1.hc").write_text("the user's too")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(backup_module, "write_durably", meanwhile)
    with pytest.raises(DestinationExists):
        restore(tmp_path / "backups-a", target)
    assert sorted(os.listdir(target)) == ["notes.txt", "p1.hc"]
    assert (target / "p1.hc").read_text() == "the user's too"
