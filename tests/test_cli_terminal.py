"""The command line as an operator sees it in a real pseudo-terminal (stdlib ``pty``), its
screen rendered by a terminal emulator (pyte): progress bars whose last frame is exact and
which never wrap, notices while a command waits, no stray blank lines (issue 17)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path

import pyte
import pytest
from hotcopy.storage import Repository
from hotcopy.workers._progress import human_bytes

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

PROGRAM = [sys.executable, "-m", "hotcopy.workers"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _env(**extra: str) -> dict[str, str]:
    skip = ("HOTCOPY_FAULT", "HOTCOPY_LOG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(extra)
    return env


class Terminal:
    """``hotcopy ARGS`` with stderr on a pseudo-terminal of ``columns`` x ``rows`` (stdout on a
    pipe, so that what the program prints can be told from what it draws)."""

    def __init__(
        self, *args: object, columns: int = 60, rows: int = 24, env: dict[str, str] | None = None
    ) -> None:
        self.columns, self.rows = columns, rows
        self.controller, tty = pty.openpty()
        try:
            fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
            self.proc = subprocess.Popen(
                [*PROGRAM, *map(str, args)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=tty,
                env=env or _env(),
            )
        except BaseException:
            os.close(self.controller)
            raise
        finally:
            os.close(tty)
        self.data = b""
        self._eof = False

    def _read(self, timeout: float) -> None:
        if self._eof or not select.select([self.controller], [], [], timeout)[0]:
            return
        try:
            chunk = os.read(self.controller, 65536)
        except OSError:  # EIO: the program closed its side
            chunk = b""
        self._eof = not chunk
        self.data += chunk

    def expect(self, text: bytes, timeout: float = 30.0) -> None:
        """Read the terminal until ``text`` shows (the program's own pace: no sleeping)."""
        deadline = time.monotonic() + timeout
        while text not in self.data:
            if self._eof or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never showed; the terminal got {self.data!r}")
            self._read(0.1)

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Read until the program exits; its exit status and stdout."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self._read(0.1)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode()
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1.0)), out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        os.close(self.controller)

    def screen(self) -> list[str]:
        """The terminal's non-blank lines as a person sees them after the program ran."""
        screen = pyte.Screen(self.columns, self.rows)
        pyte.ByteStream(screen).feed(self.data)
        return [line.rstrip() for line in screen.display if line.strip()]

    def frames(self) -> list[str]:
        """Every line or redraw written, escape sequences removed."""
        text = ANSI.sub(b"", self.data).decode(errors="replace")
        return [frame for frame in re.split(r"[\r\n]+", text) if frame.strip()]


@contextlib.contextmanager
def terminal(*args: object, **options: object) -> Iterator[Terminal]:
    term = Terminal(*args, **options)  # type: ignore[arg-type]
    try:
        yield term
    finally:
        term.close()


def run_in_terminal(*args: object, **options: object) -> tuple[int, str, Terminal]:
    with terminal(*args, **options) as term:
        code, out = term.finish()
    return code, out, term


def _fill(root: Path, prefixes: Sequence[str], size: int) -> None:
    with Repository.init(root) as repo:
        for name in prefixes:
            with repo.open_prefix(name, "rw") as px:
                px["blob"] = os.urandom(size)
                px.commit()


def _last_bar(term: Terminal, label: str) -> str:
    bars = [line for line in term.screen() if line.startswith(label)]
    assert bars, term.screen()
    return bars[-1]


def _bytes_of(summary: str) -> int:
    found = re.search(r"\((\d+) bytes\)", summary)
    assert found, summary
    return int(found.group(1))


# -- progress ---------------------------------------------------------------------------------


def test_incremental_backup_ends_on_a_full_exact_frame_and_never_wraps_at_60_columns(
    tmp_path: Path,
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    _fill(root, ["a", "b", "c"], 2000)
    code, _, _ = run_in_terminal("backup", root, dest)
    assert code == 0
    with Repository(root) as repo, repo.open_prefix("b", "rw") as px:
        px["more"] = "x" * 500
        px.commit()
    code, out, term = run_in_terminal("backup", root, dest, "--incremental")
    assert code == 0, term.data
    summary = out.splitlines()[-1]
    assert "(0 full, 3 delta)" in summary
    last = _last_bar(term, "backup")
    assert "100%" in last and "3/3 prefixes" in last, term.screen()
    assert f", {human_bytes(_bytes_of(summary))}, " in last  # the exact total, not an estimate
    rate = re.search(r"\(([\d.]+ \w+/s)\)", summary)
    assert rate and rate.group(1) in last  # one source for the bar's rate and the summary's
    assert term.screen() == [last]  # one line: every redraw in place, nothing wrapped
    assert all(len(frame) <= 60 for frame in term.frames()), term.frames()


def test_backup_with_two_workers_ends_on_100_percent_of_every_prefix(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    names = [f"p{i:02d}" for i in range(44)]
    _fill(root, names, 800_000)  # 35 MB: past the size below which no workers are started
    code, out, term = run_in_terminal("backup", root, dest, "--jobs", "2", columns=60)
    assert code == 0, term.data
    last = _last_bar(term, "backup")
    assert "100%" in last and "| 44/44" in last, term.screen()
    assert f", {human_bytes(_bytes_of(out))}, " in last
    assert "█" * 3 in last and "|" in last  # the bar itself is drawn, full
    assert term.screen() == [last]
    assert all(len(frame) <= 60 for frame in term.frames())


@pytest.mark.parametrize("columns", [40, 60, 120])
def test_the_bar_fits_the_terminal_width(tmp_path: Path, columns: int) -> None:
    root = tmp_path / "repo"
    _fill(root, ["a", "b"], 5000)
    code, _, term = run_in_terminal("backup", root, tmp_path / "b", columns=columns)
    assert code == 0
    assert len(term.screen()) == 1, term.screen()
    assert max(len(frame) for frame in term.frames()) <= columns
    assert "2/2" in term.screen()[0]
    # The unit's word goes first when room is short; at 60 columns whether it fits depends on
    # the rate's width ("1003.5 KiB/s" on a loaded machine).
    if columns >= 120:
        assert "2/2 prefixes" in term.screen()[0]


def test_restore_and_verify_of_directories_show_progress(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    _fill(root, ["a", "b", "c"], 20_000)
    assert run_in_terminal("backup", root, dest)[0] == 0
    code, _, term = run_in_terminal("restore", dest, tmp_path / "restored", columns=80)
    assert code == 0, term.data
    last = _last_bar(term, "restore")
    assert "100%" in last and "3/3 prefixes" in last
    assert term.screen() == [last]
    for path, unit, count in ((dest, "pieces", 3), (root, "files", 3)):
        code, _, term = run_in_terminal("verify", path, columns=80)
        assert code == 0, term.data
        last = _last_bar(term, "verify")
        assert "100%" in last and f"{count}/{count} {unit}" in last, term.screen()


def test_nothing_is_drawn_with_quiet_or_off_a_terminal(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["a"], 5000)
    code, out, term = run_in_terminal("backup", root, tmp_path / "b", "--quiet")
    assert code == 0 and term.data == b"" and "backup" in out
    code, out, term = run_in_terminal("-q", "verify", root)
    assert code == 0 and term.data == b""
    piped = subprocess.run(
        [*PROGRAM, "backup", root, tmp_path / "b"], capture_output=True, timeout=60, env=_env()
    )
    assert piped.returncode == 0 and piped.stderr == b""


def test_a_failing_command_prints_its_error_without_a_stray_blank_line(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["p"], 5000)
    (tmp_path / "taken.hc").write_bytes(b"")
    for args in (
        ("copy", root, "p", tmp_path / "taken.hc"),
        ("restore", tmp_path / "missing.hc", root),
        ("restore", tmp_path / "taken.hc", root, "--prefix", "p"),
    ):
        code, out, term = run_in_terminal(*args, columns=300)
        assert code == 1 and out == ""
        assert term.data.startswith(b"hotcopy: error: "), term.data
        assert term.data.count(b"\n") == 1, term.data
        assert len(term.screen()) == 1


# -- visible waits ----------------------------------------------------------------------------

HOLDER = """
import sys
from hotcopy.coordinator import connect
from hotcopy.workers._catalog import Catalog
place, kind, prefix = sys.argv[1:4]
if kind == "lock":
    held = Catalog(place).locked()
    held.__enter__()
else:
    held = connect(place).lease(prefix, kind)
print("held", flush=True)
sys.stdin.readline()  # until the test says so (or closes the pipe)
"""


@contextlib.contextmanager
def holding(place: Path, kind: str, prefix: str = "-") -> Iterator[subprocess.Popen[str]]:
    """A process that holds a ``kind`` lease on ``prefix`` of repository ``place`` (or, with
    ``kind="lock"``, the lock of backup directory ``place``) until released."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(place), kind, prefix, "hotcopy-test-holder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        with contextlib.suppress(BrokenPipeError, OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_a_waiting_put_says_after_a_second_who_holds_the_lease(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["orders"], 100)
    with (
        holding(root, "write", "orders") as holder,
        terminal("put", root, "orders", "x", "1", columns=300) as term,
    ):
        term.expect(b"waiting for the write lease on prefix 'orders'")
        term.expect(b"running) with a write lease for")
        release(holder)
        code, out = term.finish()
    assert (code, out) == (0, "2\n")
    (notice,) = term.screen()
    assert notice.startswith("hotcopy: waiting for the write lease on prefix 'orders', held by")
    assert f"pid {holder.pid} (" in notice and "running" in notice


def test_a_backup_waiting_for_the_catalog_lock_reports_the_wait_apart(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    _fill(root, ["a", "b"], 5000)
    assert run_in_terminal("backup", root, dest)[0] == 0
    with (
        holding(dest, "lock") as holder,
        terminal("backup", root, dest, "--json", columns=300) as term,
    ):
        term.expect(b"waiting for the lock of backup directory")
        term.expect(b"running)")
        began = time.monotonic()
        release(holder)
        code, out = term.finish()
    after_release = time.monotonic() - began
    assert code == 0, term.data
    result = json.loads(out)
    assert result["waited"] >= 1.0  # the notice came after a second of waiting
    assert result["seconds"] <= after_release + 0.5  # the backup's own time, not the wait's
    screen = term.screen()
    assert screen[0].startswith("hotcopy: waiting for the lock of backup directory")
    assert f"pid {holder.pid} (" in screen[0]
    assert "100%" in screen[-1] and "2/2 prefixes" in screen[-1]


def _run(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROGRAM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env or _env(),
    )


def _one_error(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, done
    (line,) = done.stderr.splitlines()
    assert line.startswith("hotcopy: error: ") and "Traceback" not in done.stderr
    return line


def test_timeouts_fail_naming_the_holder_and_its_state(tmp_path: Path) -> None:
    root, dest = tmp_path / "repo", tmp_path / "backups"
    _fill(root, ["orders"], 100)
    assert _run("backup", root, dest).returncode == 0
    # A commit in the WAL: a copy must checkpoint it (a settled prefix needs no write lease).
    assert _run("put", root, "orders", "y", "2").returncode == 0
    with holding(root, "write", "orders") as holder:
        os.kill(holder.pid, signal.SIGSTOP)
        line = _one_error(_run("put", root, "orders", "x", "1", "--timeout", "0.3"))
        assert "gave up after 0.3 s waiting for the write lease on prefix 'orders'" in line
        assert f"held by pid {holder.pid} (python" in line and "stopped) with a write" in line
        line = _one_error(_run("copy", root, "orders", tmp_path / "c.hc", "--timeout", "0.3"))
        assert f"held by pid {holder.pid} (" in line and not (tmp_path / "c.hc").exists()
        line = _one_error(_run("restore", dest, root, "--force", "--timeout", "0.3"))
        assert "'orders'" in line and f"held by pid {holder.pid} (" in line
    with holding(dest, "lock") as holder:
        for args in (("backup", root, dest), ("prune", dest, "--keep-last", "1")):
            line = _one_error(_run(*args, "--timeout", "0.2"))
            assert "gave up after 0.2 s waiting for the lock of backup directory" in line
            assert f"held by pid {holder.pid} (python" in line and "running)" in line


def test_a_wait_is_logged_with_v_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["orders"], 100)
    with holding(root, "write", "orders") as holder:
        done = _run("put", root, "orders", "x", "1", "--timeout", "1.5", "-v")
        assert done.returncode == 1
        first, last = done.stderr.splitlines()
        assert "INFO" in first and "waiting for the write lease on prefix 'orders'" in first
        assert f"pid {holder.pid}" in first and last.startswith("hotcopy: error: gave up")


def test_status_names_each_holders_program_and_shows_a_stopped_one(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["orders"], 100)
    with holding(root, "write", "orders") as holder:
        done = _run("status", root, "--json")
        (lease,) = json.loads(done.stdout)["leases"]
        assert lease["holder"]["state"] == "running"
        os.kill(holder.pid, signal.SIGSTOP)
        status = json.loads(_run("status", root, "--json").stdout)
        assert status["version"] == 1
        (lease,) = status["leases"]
        assert (lease["prefix"], lease["mode"], lease["pid"]) == ("orders", "write", holder.pid)
        assert lease["holder"]["state"] == "stopped"
        assert lease["holder"]["name"].startswith("python")
        assert lease["holder"]["cmdline"][-1] == "hotcopy-test-holder"
        assert lease["age"] >= 0
        table = _run("status", root).stdout.splitlines()
        assert table[1].split()[:6] == ["PREFIX", "MODE", "PID", "STATE", "HELD", "TOKEN"]
        row = table[2].split()
        assert row[:4] == ["orders", "write", str(holder.pid), "stopped"]
        assert row[-1] == "hotcopy-test-holder" and row[6].startswith("python")


def test_version_quiet_verbose_and_the_log_environment_variable(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _fill(root, ["users"], 100)
    done = _run("--version")
    assert (done.returncode, done.stdout) == (0, f"hotcopy {version('hotcopy')}\n")
    done = _run("get", root, "users", "nope", "-vv")
    assert done.returncode == 1
    assert "DEBUG" in done.stderr and "Traceback" in done.stderr  # the cause, when asked
    assert done.stderr.splitlines()[-1].startswith("hotcopy: error: key 'nope'")
    debug = _run("get", root, "users", "nope", env=_env(HOTCOPY_LOG="debug"))
    assert "DEBUG" in debug.stderr and "Traceback" in debug.stderr
    plain = _run("get", root, "users", "nope")
    assert plain.stderr == "hotcopy: error: key 'nope' not found in prefix 'users'\n"
    quiet = _run("-q", "ls", root)
    assert (quiet.returncode, quiet.stderr) == (0, "") and "users" in quiet.stdout
