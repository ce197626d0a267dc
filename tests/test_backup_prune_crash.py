"""A prune SIGKILLed at random instants never leaves a backup that looks usable and is not.

The catalog has chains that restart at different backups (compactions of different prefixes),
a partial backup, a backup of another prefix, a run that died before its manifest and a
backup with a damaged manifest, so that ``prune --keep-last 1`` trims, removes and sweeps.
Storage's fault hook (``HOTCOPY_FAULT=prune:step``, ``HOTCOPY_FAULT_AFTER=k``) SIGKILLs the
prune after its k-th durable step; every step is an instant at which the catalog on disk can
differ, so choosing k at random (and every k at least once) covers every instant that
matters. After each kill: every backup still listed as complete or partial restores exactly
what it held when it was taken, ``verify`` finds nothing but the damage planted before, and a
finishing prune leaves the catalog an uninterrupted prune leaves.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository
from hotcopy.workers import Catalog, backup, list_backups, prune, restore
from hotcopy.workers._catalog import MANIFEST
from hotcopy.workers._retention import FAULT_POINT
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.crash, pytest.mark.timeout(400)]

h = storage_helpers()
ITERATIONS = 60
DAMAGED = "19700101T000001.500000Z"  # a backup whose manifest was damaged before the prune
PRUNE = (
    "import sys; from hotcopy.workers import prune; "
    "r = prune(sys.argv[1], 1); print(len(r.removed), flush=True)"
)


def commit(root: Path, name: str, value: int) -> None:
    with Repository.init(root) as repo, repo.open_prefix(name, "rw") as px:
        px["v"] = value
        px[f"k{value}"] = "x" * value
        px.commit()
        px.checkpoint()


def build(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The template catalog, and what each backup held (by id, by prefix)."""
    root, dest = tmp_path / "repo", tmp_path / "template"
    held: dict[str, dict[str, Any]] = {}
    step = 0

    def take(names: list[str], changed: list[str] | None = None) -> str:
        nonlocal step
        step += 1
        for name in names if changed is None else changed:
            commit(root, name, step)
        state = h.dump_repository(root, names if changed is None else changed)
        result = backup(root, dest, names, jobs=1, incremental=True)
        held[result.id] = {name: state[name] for name in result.prefixes}
        return result.id

    abc = ["a", "b", "c"]
    take(["d"])  # a backup of another prefix, which no later one holds
    take(abc)  # a, b, c full
    take(abc)  # deltas
    _compact(root, "a")
    take(abc)  # a full; b, c deltas
    original = (root / "c.hc").read_bytes()
    h.flip_byte(root / "c.hc", 0, 0xFF)  # its magic: any copy of it fails
    partial = take(abc, ["a", "b"])  # c fails: partial
    assert not Catalog(dest).load(partial).complete
    (root / "c.hc").write_bytes(original)
    take(abc)  # deltas (c continues from before the failure)
    _compact(root, "b")
    take(abc)  # b full
    take(abc)  # deltas: the backup keep-last 1 keeps
    catalog = Catalog(dest)
    dead = _claimed(catalog, 0.5)  # a run that died before its manifest (in 1970)
    (dead / "a.hc").write_bytes(b"half a copy")
    damaged = _claimed(catalog, 1.5)
    assert damaged.name == DAMAGED
    (damaged / MANIFEST).write_text('{"format": 2, "id": ')
    return dest, held


def _claimed(catalog: Catalog, moment: float) -> Path:
    """The directory of a backup a run claimed at ``moment`` (its work directory gone)."""
    backup_id, work = catalog.new_backup(moment)
    shutil.rmtree(work.parent)
    return Path(catalog.where) / backup_id


def _compact(root: Path, name: str) -> None:
    with Repository(root) as repo, repo.open_prefix(name, "rw") as px:
        px.compact()


def shape(dest: Path) -> dict[str, Any]:
    """The catalog as a prune leaves it: each backup's status and the prefixes it holds."""
    return {
        row["id"]: (row["status"], row["full"], row["delta"], row["restorable"])
        for row in list_backups(dest)["backups"]
    }


def check(dest: Path, held: dict[str, dict[str, Any]], scratch: Path) -> list[str]:
    """What is wrong with the catalog after a killed prune (empty: nothing)."""
    wrong = []
    for row in list_backups(dest)["backups"]:
        if row["status"] == "unfinished":
            continue
        if row["status"] == "invalid":
            if row["id"] != DAMAGED:  # the one planted before
                wrong.append(f"{row['id']} became invalid: {row['problem']}")
            continue
        if not row["restorable"]:
            wrong.append(f"{row['id']} is {row['status']} and not restorable: {row['problem']}")
            continue
        target = scratch / row["id"]
        result = restore(dest, target, at=row["id"], allow_partial=row["status"] == "partial")
        got = h.dump_repository(target, kernel_locks=True)
        want = {name: held[row["id"]][name] for name in result.prefixes}
        if got != want:
            wrong.append(f"{row['id']} restores {sorted(got)} other than it held")
        shutil.rmtree(target)
    wrong += [p for p in Catalog(dest).verify() if not p.startswith(DAMAGED)]
    return wrong


def test_a_prune_killed_at_any_instant_leaves_every_backup_usable_or_gone(
    tmp_path: Path,
) -> None:
    template, held = build(tmp_path)
    reference = tmp_path / "reference"
    shutil.copytree(template, reference)
    report = prune(reference, 1)
    assert report.trimmed and report.removed, "the catalog gives prune nothing to do"
    expected = shape(reference)
    assert check(reference, held, tmp_path / "scratch") == []

    # How many durable steps an uninterrupted prune takes: the first k that never fires.
    steps = 0
    while True:
        work = tmp_path / "count"
        shutil.copytree(template, work)
        status = _run_prune(work, steps + 1)
        shutil.rmtree(work)
        if status == 0:
            break
        assert status == -signal.SIGKILL, status
        steps += 1
    assert steps >= 10, steps

    rng = random.Random(14)
    instants = list(range(1, steps + 1))
    instants += [rng.randint(1, steps) for _ in range(ITERATIONS - len(instants))]
    rng.shuffle(instants)
    for number, instant in enumerate(instants):
        work = tmp_path / f"run{number}"
        shutil.copytree(template, work)
        assert _run_prune(work, instant) == -signal.SIGKILL, instant
        wrong = check(work, held, tmp_path / "scratch")
        assert wrong == [], (instant, wrong)
        prune(work, 1)  # finishes the job
        assert shape(work) == expected, instant
        assert check(work, held, tmp_path / "scratch") == []
        assert sorted(os.listdir(work)) == sorted(os.listdir(reference))
        shutil.rmtree(work)


def _run_prune(dest: Path, after: int) -> int:
    env = {"HOTCOPY_FAULT": FAULT_POINT, "HOTCOPY_FAULT_AFTER": str(after)}
    done = h.run_python(PRUNE, str(dest), env=env)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode
