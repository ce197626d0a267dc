"""scripts/bench_peers.py measures every figure of issue 18 for hotcopy, sqlite3 and lmdb, and
leaves nothing behind. The figures themselves are never asserted: only that they are there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

h = storage_helpers()
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_peers.py"
SYSTEMS = ("hotcopy", "sqlite3", "lmdb")
# The JSON names of the figures (schema version 1); each has a value per system and round.
AMOUNTS = (
    "open_first_get_ms",
    "open_peak_rss_mib",
    "import_peak_rss_mib",
    "gets_per_s",
    "gets_per_s_with_writer",
    "writer_commits_per_s_during_gets",
    "writers4_commits_per_s",
    "commits_per_s",
)


def _on_tmpfs(path: Path) -> bool:
    real, best, fstype = str(path.resolve()), "", ""
    for part in psutil.disk_partitions(all=True):
        inside = real == part.mountpoint or real.startswith(part.mountpoint.rstrip("/") + "/")
        if inside and len(part.mountpoint) >= len(best):
            best, fstype = part.mountpoint, part.fstype
    return fstype in ("tmpfs", "ramfs")


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is in memory: the script refuses tmpfs (fsync would be free)."""
    if not _on_tmpfs(tmp_path):
        yield tmp_path
        return
    place = Path(tempfile.mkdtemp(prefix=".test-bench-peers-", dir=REPO))
    try:
        yield place
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_quick_run_reports_every_figure_for_every_system(disk_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--rounds", "1", "--dir", str(disk_dir)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    work = Path(report["dir"])
    try:
        assert report["version"] == 1
        assert report["rounds"] == 1 and report["keys"] == 2_000
        figures, ratios = report["figures"], report["ratios"]
        for figure in AMOUNTS:
            for system in SYSTEMS:
                rounds = figures[figure][system]["rounds"]
                assert len(rounds) == 1, (figure, system)
                assert all(value > 0 for value in rounds), (figure, system, rounds)
                assert figures[figure][system]["median"] > 0, (figure, system)
            assert ratios[figure]["hotcopy/sqlite3"] > 0, figure
            assert ratios[figure]["hotcopy/lmdb"] > 0, figure
        assert figures["commits_per_s"]["raw write+fdatasync"]["median"] > 0
        assert ratios["commits_per_s"]["hotcopy/raw write+fdatasync"] > 0
        for system in SYSTEMS:
            (share,) = figures["writers4_min_share"][system]["rounds"]
            assert 0 <= share <= 1, (system, share)  # a fairness: sqlite3's can be 0
            (counts,) = figures["writers4_counts"][system]
            assert len(counts) == 4 and sum(counts) > 0, (system, counts)
        assert not work.exists()
        assert h.coordinators_of(work) == []
    finally:
        for process in h.coordinators_of(work):
            process.kill()
