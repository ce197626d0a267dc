"""The README's demo leaves nothing behind: no coordinator, no temporary directory (issue 17)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

h = storage_helpers()
DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_the_demo_stops_the_coordinators_it_started_and_removes_its_directory() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--writers", "2", "--seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    found = re.search(r"^repository (\S+)/repo:", done.stdout, re.MULTILINE)
    assert found, done.stdout
    work = Path(found.group(1))
    try:
        assert not work.exists()
        assert h.coordinators_of(work) == []
    finally:
        for process in h.coordinators_of(work):
            process.kill()
