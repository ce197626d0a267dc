"""The stress checker passes a sound build and catches deliberately broken ones.

A checker that cannot fail proves nothing: each broken build (a test-only switch,
HOTCOPY_TEST_BREAK, read by storage) must be reported as a violation with exit status 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

STRESS = Path(__file__).resolve().parent.parent / "scripts" / "stress.py"


def _run(tmp_path: Path, *extra: str, seconds: str = "4") -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [
            sys.executable,
            str(STRESS),
            "--root",
            str(tmp_path / "work"),
            "--duration",
            seconds,
            "--writers",
            "3",
            "--readers",
            "1",
            "--copiers",
            "1",
            "--backup-interval",
            "1.5",
            "--chaos",
            "--chaos-interval",
            "0.5",
            "--seed",
            "7",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_sound_build_survives_chaos_with_no_violation(tmp_path: Path) -> None:
    code, result = _run(tmp_path, seconds="8")
    assert result["violations"] == 0, result["violation_details"]
    assert code == 0
    # Not vacuous: commits were made and checked, and at least one copy or backup was too
    # (on a loaded machine chaos may kill the copier before its first copy lands).
    assert result["acknowledged_commits"] > 0
    assert result["snapshots_verified"] + result["backups_verified"] > 0
    assert result["processes_killed"] + result["processes_stopped"] > 0
    # The replicator (into moto, by default) ran under chaos and its replica was restored.
    assert result["replica"] == "s3"
    assert result["replica_restores_verified"] > 0


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("broken", "symptoms"),
    [
        # A lost acknowledged commit shows as a writer's last one missing (it was its last
        # before the stop) or as a hole below its last (the writer went on after a restart).
        # Or as damage: the late write lands where another writer's commit already is.
        ("ack-before-write", ("acknowledged", "missing=[", "damaged")),
        ("copy-without-checkpoint", ("copy_prefix said",)),
        # Two writers inside at once: seen by the overlap detector, or by what their
        # interleaved appends do (damage, a reader's broken invariant, a process failing).
        (
            "lease-granted-twice",
            ("lease overlap", "damaged", "without its record", "went back from", "exited"),
        ),
        # A backup piece damaged after the run: listed restorable (sizes), refused by restore.
        ("backup-bit-rot", ("called restorable and does not restore",)),
        # A log object of the replica damaged after the run: its check and the restores that
        # read it (the latest does) refuse it.
        ("replica-rot", ("replica: ", "replica latest does not restore")),
    ],
)
def test_a_broken_build_is_reported(tmp_path: Path, broken: str, symptoms: tuple[str, ...]) -> None:
    # Long enough that, on a loaded machine, writers start and meet well within the run.
    replicate = "dir" if broken == "replica-rot" else "none"
    code, result = _run(tmp_path, "--break", broken, "--replicate", replicate, seconds="6")
    assert code == 1
    details = result["violation_details"]
    assert result["violations"] > 0
    assert any(symptom in detail for detail in details for symptom in symptoms), details
