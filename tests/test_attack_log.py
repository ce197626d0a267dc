"""Adversarial tests of the log (issue 13 review): each test here failed on the code it was
written against and shows one defect; see the docstring of each.

Real processes and real files throughout; processes are stopped with real SIGSTOP (directly or
at a fault point, ``HOTCOPY_FAULT_SIGNAL=STOP``), damage is made by flipping bytes. Where a test
waits for a child it polls state the child exposes (its journal, ``/proc``), never sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import CorruptFileError, Repository
from hotcopy.storage import _format as fmt
from hotcopy.workers import main as cli
from hotcopy_test_support import storage_helpers

h = storage_helpers()

TTL = 1.0
BOUND = TTL + 1.0  # the longest a successor may wait for a stopped holder (README, Fencing)
BIG = 1 << 40  # a checkpoint threshold no test reaches: keeps commits in the WAL


# -- helpers -------------------------------------------------------------------------------


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)  # polling state a child exposes; not synchronising by time


def _is_stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def _has_open(pid: int, name: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                return True
        except OSError:
            continue
    return False


def _journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _popen(code: str, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
    full_env = dict(os.environ)
    for name in ("HOTCOPY_FAULT", "HOTCOPY_FAULT_AFTER", "HOTCOPY_FAULT_SIGNAL"):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code, *args], env=full_env, **kw)


def _batches(path: Path) -> list[fmt.Batch]:
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = fmt.FileReader(fd, fmt.HEADER_SIZE, len(data))
        found = []
        while reader.pos < len(data):
            if fmt.peek_is_trailer(reader):
                if fmt.read_trailer(reader) is None:
                    break
                continue
            batch = fmt.read_batch(reader, load_values=True)
            if batch is None:
                break
            found.append(batch)
        return found
    finally:
        os.close(fd)


def _value_offset(batch: fmt.Batch) -> int:
    op = batch.ops[0]
    return op.offset + fmt.OP_SIZE + len(op.key.encode()) + 2


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = cli(["verify", str(path)])
    out = capsys.readouterr()
    return status, out.out + out.err


# -- a fenced writer's late append, read through a descriptor on the replaced WAL -----------

STALE_WRITER = r"""
import json, os, sys
from hotcopy.coordinator import LeaseFenced
from hotcopy.storage import Repository

root, journal, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

def note(**entry):
    os.write(fd, (json.dumps(entry) + "\n").encode())
    os.fsync(fd)

with Repository(root, lease_ttl=float(sys.argv[4]), checkpoint_bytes=1 << 40) as repo:
    px = repo.open_prefix("p", "rw")
    for i in range(1, n + 2):
        px[f"a{i}"] = i
        try:
            seq = px.commit()
        except LeaseFenced:
            note(fenced=f"a{i}")
            break
        if i == n or i > n:
            note(acked=f"a{i}", seq=seq)
"""

OPENER = r"""
import json, sys
from hotcopy.storage import Repository

def view(px):
    return {"seq": px.seq, "keys": sorted(k for k in px.keys() if not k[1:].isdigit()
                                          or int(k[1:]) > int(sys.argv[2]))}

with Repository(sys.argv[1], lease_ttl=float(sys.argv[3])) as repo:
    px = repo.open_prefix("p", "rw")  # opening takes no lease
    print(json.dumps(view(px)), flush=True)
    sys.stdin.readline()
    print(json.dumps(view(px)), flush=True)  # following what the others did since
    if sys.argv[4] == "compact":
        px.compact()
    else:
        px["c"] = "acknowledged"
        px.commit()
    print(json.dumps(view(px)), flush=True)
"""

SUCCESSOR = r"""
import json, sys, time
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[3]), lease_timeout=60) as repo:
    px = repo.open_prefix("p", "rw")
    began = time.monotonic()
    if sys.argv[2] == "checkpoint":
        seq = px.checkpoint().seq
    else:
        px[sys.argv[2]] = "acknowledged"
        seq = px.commit()
    print(json.dumps({"seq": seq, "waited": time.monotonic() - began}))
"""

N_STALE = 20000  # enough batches that reading the WAL takes a fresh opener a while


def _late_append(tmp_path: Path, successor: str, then: str) -> dict[str, Any]:
    """Writer A is stopped just before its WAL write (commit N+1) and its lease expires.
    Process R opens the prefix and is stopped while it reads the WAL, holding a descriptor on
    it. B takes the lease, fences (the WAL is replaced) and does ``successor`` ("b": commits
    key b; "checkpoint": only that). A is continued: its append lands in the replaced WAL and
    its commit is refused with LeaseFenced. R is continued, prints its view, follows, prints
    it again, does ``then`` ("compact", or "commit": commits key c) and prints it a third
    time."""
    root = tmp_path / "repo"
    Repository.init(root).close()
    journal = tmp_path / "a.journal"
    env = {
        "HOTCOPY_FAULT": "commit:before-wal-write",
        "HOTCOPY_FAULT_AFTER": str(N_STALE + 1),
        "HOTCOPY_FAULT_SIGNAL": "STOP",
    }
    writer = _popen(STALE_WRITER, str(root), str(journal), str(N_STALE), str(TTL), env=env)
    opener = None
    try:
        _wait_for(lambda: _is_stopped(writer.pid), 120, "writer A stopping before commit N+1")
        opener = _popen(
            OPENER,
            str(root),
            str(N_STALE),
            str(TTL),
            then,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: _has_open(opener.pid, "p.hc-wal"), 60, "R opening the WAL")
        os.kill(opener.pid, signal.SIGSTOP)  # R is reading the WAL now
        _wait_for(lambda: _is_stopped(opener.pid), 10, "R stopping")
        result = h.run_python(SUCCESSOR, str(root), successor, str(TTL), timeout=90)
        assert result.returncode == 0, result.stderr
        b_seq = json.loads(result.stdout)["seq"]
        os.kill(writer.pid, signal.SIGCONT)
        _wait_for(lambda: any("fenced" in e for e in _journal(journal)), 60, "A's refusal")
        assert writer.wait(30) == 0
        os.kill(opener.pid, signal.SIGCONT)
        assert opener.stdin is not None and opener.stdout is not None
        first = json.loads(opener.stdout.readline())
        opener.stdin.write("\n")
        opener.stdin.flush()
        followed = json.loads(opener.stdout.readline())
        final = json.loads(opener.stdout.readline())
        assert opener.wait(30) == 0
    finally:
        for proc in (writer, opener):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                h.reap_popen(proc)
        if opener is not None:
            for pipe in (opener.stdin, opener.stdout):
                if pipe is not None:
                    pipe.close()
    assert {"fenced": f"a{N_STALE + 1}"} in _journal(journal)
    return {"root": root, "b_seq": b_seq, "first": first, "followed": followed, "final": final}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_fenced_writers_late_append_never_reaches_a_process_that_opened_the_old_wal(
    tmp_path: Path,
) -> None:
    """(See ``_late_append``.) R reads on through its descriptor on the replaced WAL: it
    takes A's refused batch as commit N+1, then skips B's acknowledged commit N+1 as already
    applied (``Log._deliver``: ``batch.seq <= self._seq``). R never sees ``b``, shows
    ``a{N+1}``, and when R compacts, the prefix durably loses B's acknowledged commit and
    holds A's refused one."""
    found = _late_append(tmp_path, "b", "compact")
    fenced_key = f"a{N_STALE + 1}"
    assert found["b_seq"] == N_STALE + 1
    with Repository(found["root"]) as repo:
        px = repo.open_prefix("p", "r")
        after = {"b": "b" in px, fenced_key: fenced_key in px}
    views = {key: found[key] for key in ("first", "followed", "final")}
    assert (found["followed"]["keys"], found["final"]["keys"], after) == (
        ["b"],
        ["b"],
        {"b": True, fenced_key: False},
    ), f"a process saw the refused commit {fenced_key} instead of the acknowledged b: {views}"
    assert found["first"]["keys"] in ([], ["b"]), views


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_fenced_writers_late_append_never_makes_another_writer_damage_the_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(See ``_late_append``.) B only fences (a checkpoint: the new WAL continues from commit
    N). R has taken A's refused batch as commit N+1, so its next commit, acknowledged, is
    numbered N+2 and appended first in a WAL that continues from N: every opener now refuses
    the prefix as damaged ("commit N+2 where commit N+1 belongs")."""
    found = _late_append(tmp_path, "checkpoint", "commit")
    assert found["b_seq"] == N_STALE
    status, output = _verify(found["root"], capsys)
    assert (status, found["final"]["seq"]) == (0, N_STALE + 1), output


# -- salvage ---------------------------------------------------------------------------------


def test_salvage_never_writes_over_whole_segments_it_does_not_account_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older raw copy of the WAL is put back (an operator's accident). Its boundary is a
    real boundary of the main file, so the whole, valid segments after it (commits 8-15,
    acknowledged and checkpointed) read as "an unfinished checkpoint that does not match the
    WAL". Salvage then treats the main file as intact (damage offset >= the WAL's base_len,
    ``Log.salvage``), pwrites the old WAL's batches at base_len over those segments in place,
    moves only the WAL aside and reports no commit lost."""
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 16):
            px[f"k{i}"] = i
            px.commit()
            if i == 4:
                px.checkpoint()
            if i == 7:
                old_wal = (root / "p.hc-wal").read_bytes()
            if i in (10, 15):
                px.checkpoint()
    main_before = (root / "p.hc").read_bytes()
    (root / "p.hc-wal").write_bytes(old_wal)
    status, output = _verify(root, capsys)
    assert status == 1, output
    capsys.readouterr()
    assert cli(["salvage", str(root), "p", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with Repository(root) as repo:
        present = {key for key in repo.open_prefix("p", "r")}
    lost = set(range(result["lost"][0], result["lost"][1] + 1)) if result["lost"] else set()
    unaccounted = [i for i in range(1, 16) if f"k{i}" not in present and i not in lost]
    preserved = any(path.read_bytes() == main_before for path in root.iterdir() if path.is_file())
    assert (unaccounted, preserved) == ([], True), (
        f"commits {unaccounted} are neither kept nor reported lost; the main file they were "
        f"in {'was' if preserved else 'was not'} kept aside ({result})"
    )


def test_salvage_repairs_a_damaged_value_in_the_main_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped value byte in a checkpointed segment: verify calls it damage (exit 1), but
    salvage opens the log without reading values (``scan`` reads keys only), finds "no
    damage" and changes nothing; the prefix never verifies again."""
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 7):
            px[f"k{i}"] = f"value {i}"
            px.commit()
            if i in (3, 6):
                px.checkpoint()
    first = _batches(root / "p.hc")[1]  # commit 2, in the first segment
    h.flip_byte(root / "p.hc", _value_offset(first))
    status, output = _verify(root, capsys)
    assert status == 1, output
    capsys.readouterr()
    assert cli(["salvage", str(root), "p"]) == 0
    salvaged = capsys.readouterr().out
    status, output = _verify(root, capsys)
    assert status == 0, f"salvage said: {salvaged}\nverify after salvage: {output}"


def test_salvage_of_a_main_file_with_a_damaged_header_does_what_its_error_advises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte in the main file's header: verify and open say "run `hotcopy salvage`",
    and salvage fails with that very message (``Log._load`` raises before ``tolerant``
    applies), so the advice loops."""
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 7):
            px[f"k{i}"] = i
            px.commit()
            if i == 3:
                px.checkpoint()
    h.flip_byte(root / "p.hc", 100)
    status, output = _verify(root, capsys)
    assert status == 1 and "hotcopy salvage" in output, output
    capsys.readouterr()
    try:
        salvage_status = cli(["salvage", str(root), "p"])
    except CorruptFileError as err:  # the CLI may let it through
        salvage_status = f"raised: {err}"
    salvage_output = capsys.readouterr()
    status, output = _verify(root, capsys)
    assert (salvage_status, status) == (0, 0), (salvage_status, salvage_output, output)


# -- the last batch: damage, not a torn tail -------------------------------------------------


@pytest.mark.parametrize("where", ["key", "value"])
def test_a_flipped_byte_in_the_last_whole_wal_batch_is_damage_not_a_torn_tail(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten acknowledged commits in the WAL; one byte of commit 10's key or value flips. The
    batch is whole (its header checks, its full length is there, not zeros): not "an
    incomplete last batch". Yet verify calls it a torn tail (exit 0), the prefix opens at
    commit 9, and the next writer truncates it and hands out sequence 10 a second time
    (``Log._check_wal_tail``: only a valid batch *after* it makes it damage)."""
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 11):
            px[f"key{i}"] = f"value {i}"
            assert px.commit() == i
    wal = root / "p.hc-wal"
    last = _batches(wal)[-1]
    assert last.seq == 10
    op = last.ops[0]
    offset = op.offset + fmt.OP_SIZE + (1 if where == "key" else len(op.key.encode()) + 2)
    h.flip_byte(wal, offset, 0x01)
    damaged = wal.read_bytes()
    status, output = _verify(root, capsys)
    with Repository(root) as repo:
        try:
            px = repo.open_prefix("p", "rw")
            px["next"] = 1
            reused = px.commit() == 10
        except CorruptFileError:
            reused = False
    assert (status, reused, wal.read_bytes()[: len(damaged.rstrip(b"\0"))]) == (
        1,
        False,
        damaged.rstrip(b"\0"),
    ), f"acknowledged commit 10 was taken for a torn tail: {output}"


# -- holders of other leases than a writer's, stopped -------------------------------------

COPIER = r"""
import sys
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[4])) as repo:
    if sys.argv[2] == "copy":
        repo.copy_prefix(sys.argv[3], "p")
    else:
        repo.restore_prefix(sys.argv[3], "p", force=True)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("role", "point"),
    [("copy", "checkpoint:before-main-write"), ("restore", "copy:after-step")],
)
def test_a_stopped_copy_or_restore_keeps_writers_waiting_no_longer_than_the_ttl(
    tmp_path: Path, role: str, point: str
) -> None:
    """``Repository(root, lease_ttl=1.0)``; a copy stopped in the checkpoint of its cut (it
    holds the write lease), or a restore stopped while it copies (it holds the exclusive
    lease). Another writer must get the lease within TTL + 1 s; it waits ~30 s, because the
    copy's cut, restore, salvage and backup cuts take their leases with
    ``ttl=DEFAULT_LEASE_TTL`` instead of the repository's ``lease_ttl``."""
    root = tmp_path / "repo"
    with Repository.init(root, lease_ttl=TTL) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(5):
            px[f"k{i}"] = i
            px.commit()
        source = tmp_path / "copy.hc"
        repo.copy_prefix(source, "p")
        px["k5"] = 5
        px.commit()  # something in the WAL for the copy's checkpoint
    target = tmp_path / "copy2.hc" if role == "copy" else source
    env = {"HOTCOPY_FAULT": point, "HOTCOPY_FAULT_SIGNAL": "STOP"}
    holder = _popen(COPIER, str(root), role, str(target), str(TTL), env=env)
    try:
        _wait_for(lambda: holder.poll() is not None or _is_stopped(holder.pid), 30, "the stop")
        assert holder.poll() is None, "the holder ended without reaching its fault point"
        result = h.run_python(SUCCESSOR, str(root), "b", str(TTL), timeout=90)
        assert result.returncode == 0, result.stderr
        waited = json.loads(result.stdout)["waited"]
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        h.reap_popen(holder)
    assert waited < BOUND, f"a writer waited {waited:.1f} s for a stopped {role} (TTL {TTL} s)"


SNAPSHOT_HOLDER = r"""
import sys
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[3])) as repo:
    repo.copy_prefix(sys.argv[2], "p", page_io_step_size=4096)
"""

COMPACTOR = r"""
import json, sys, time
from hotcopy.storage import Repository

with Repository(sys.argv[1], lease_ttl=float(sys.argv[2]), lease_timeout=15) as repo:
    px = repo.open_prefix("p", "rw")
    began = time.monotonic()
    try:
        px.compact()
        outcome = "compacted"
    except Exception as err:
        outcome = type(err).__name__
    print(json.dumps({"outcome": outcome, "waited": time.monotonic() - began}))
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_stopped_copy_does_not_keep_a_compaction_waiting_for_ever(tmp_path: Path) -> None:
    """A copy stopped while it streams holds its ``snapshot`` lease with no TTL at all
    (``_copy.copy_prefix``: ``repo.leases.lease(prefix, "snapshot", timeout=...)``), so a
    compaction (or a restore, or salvage: ``exclusive``) waits until its own timeout. The
    copy needs no lease to stay right: it reads through its own descriptor on a file that
    is replaced, never edited, before its cut."""
    root = tmp_path / "repo"
    with Repository.init(root, lease_ttl=TTL) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(50):
            px[f"k{i}"] = "x" * 1000
            px.commit()
    env = {"HOTCOPY_FAULT": "copy:after-step", "HOTCOPY_FAULT_SIGNAL": "STOP"}
    copier = _popen(SNAPSHOT_HOLDER, str(root), str(tmp_path / "copy.hc"), str(TTL), env=env)
    try:
        _wait_for(lambda: copier.poll() is not None or _is_stopped(copier.pid), 30, "the stop")
        assert copier.poll() is None, "the copy ended without reaching its fault point"
        result = h.run_python(COMPACTOR, str(root), str(TTL), timeout=60)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
    finally:
        if copier.poll() is None:
            os.kill(copier.pid, signal.SIGCONT)
        h.reap_popen(copier)
    assert outcome["outcome"] == "compacted" and outcome["waited"] < BOUND, outcome


def test_a_damaged_value_names_its_file_and_offset_when_it_is_read(tmp_path: Path) -> None:
    """README, Damage: "the error names the file and offset" and "a damaged value raises
    when it is read". It raises ``value checksum mismatch`` and nothing else
    (``_format.read_op_value``, re-raised unchanged by ``Log.read_value``): the message names
    neither the file nor the offset, nor the way out."""
    root = tmp_path / "repo"
    with Repository.init(root, checkpoint_bytes=BIG) as repo:
        px = repo.open_prefix("p", "rw")
        for i in range(1, 4):
            px[f"k{i}"] = f"value {i}"
            px.commit()
        px.checkpoint()
    second = _batches(root / "p.hc")[1]
    h.flip_byte(root / "p.hc", _value_offset(second))
    with Repository(root) as repo:
        px = repo.open_prefix("p", "r")
        with pytest.raises(CorruptFileError) as caught:
            px["k2"]
    message = str(caught.value)
    assert "p.hc" in message and "offset" in message and "salvage" in message, message
