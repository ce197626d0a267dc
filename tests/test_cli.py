"""The ``hotcopy`` command line, run as a real program: exit status 0 ok, 1 error with exactly one
``hotcopy: error: ...`` line on stderr and no traceback, 2 usage; ``--json`` prints one JSON
object; no progress bar unless stderr is a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotcopy.storage import Repository, verify_file
from hotcopy.workers import main

pytestmark = pytest.mark.timeout(30)

PROGRAM = [sys.executable, "-m", "hotcopy.workers"]


def run_program(*args: object, stderr: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``hotcopy ARGS`` as a program; stdout and stderr as bytes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}
    return subprocess.run(
        [*PROGRAM, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        timeout=30,
        check=False,
        env=env,
    )


class Cli:
    """``hotcopy ARGS`` through ``main(argv)`` in this process (a program start costs ~0.3 s;
    what only a real process shows -- no traceback, the exit status, a terminal -- is checked by
    the tests that use :func:`run_program`). An exception escaping ``main`` fails the test."""

    def __init__(self, capture: pytest.CaptureFixture[bytes]) -> None:
        self._capture = capture

    def run(self, *args: object) -> subprocess.CompletedProcess[bytes]:
        self._capture.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's usage errors and --help
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = self._capture.readouterr()
        return subprocess.CompletedProcess(["hotcopy", *map(str, args)], code, out, err)

    def ok(self, *args: object) -> str:
        """Run a command that must succeed, silent on stderr; return its stdout."""
        return _check_ok(self.run(*args))

    def fails(self, *args: object) -> str:
        """Run a command that must fail with exit 1 and one error line; return that line."""
        return _check_fails(self.run(*args))

    def usage_error(self, *args: object) -> str:
        return _check_usage_error(self.run(*args))


def _check_ok(done: subprocess.CompletedProcess[bytes]) -> str:
    assert (done.returncode, done.stderr) == (0, b""), done
    return done.stdout.decode()


def _check_fails(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 1, done
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("hotcopy: error: "), lines
    assert b"Traceback" not in done.stderr + done.stdout
    return lines[0]


def _check_damage_found(done: subprocess.CompletedProcess[bytes]) -> str:
    """Exit 1 (damage found is an error, whatever else is sound) and one error line."""
    assert done.returncode == 1, done
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hotcopy: error: "), done.stderr
    return lines[0]


def _check_usage_error(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 2, done
    assert b"Traceback" not in done.stderr
    assert b"usage: hotcopy" in done.stderr
    return done.stderr.decode()


@pytest.fixture
def cli(capsysbinary: pytest.CaptureFixture[bytes]) -> Cli:
    return Cli(capsysbinary)


@pytest.fixture
def root(tmp_path: Path, cli: Cli) -> Path:
    root = tmp_path / "repo"
    assert f"repository {root}" in cli.ok("init", root)
    assert (root / "hotcopy.json").is_file()
    return root


def _sizes(root: Path, name: str) -> int:
    return sum((root / f"{name}{suffix}").stat().st_size for suffix in (".hc", ".hc-wal"))


# -- init, put, get ---------------------------------------------------------------------------


def test_put_and_get_round_trip_strings_json_and_bytes(cli: Cli, root: Path) -> None:
    assert cli.ok("init", root).startswith("repository")  # init of an existing repository: fine
    assert cli.ok("put", root, "users", "name", "alice smith") == "1\n"
    assert cli.ok("put", root, "users", "age", "3") == "2\n"  # without --json: the string "3"
    assert (
        cli.ok("put", root, "users", "profile", '{"age": 3, "tags": ["a", "b"]}', "--json") == "3\n"
    )
    assert cli.ok("put", root, "users", "quoted", '"a string"', "--json") == "4\n"
    assert cli.ok("put", root, "users", "nothing", "null", "--json") == "5\n"

    assert cli.ok("get", root, "users", "name") == "alice smith\n"  # str: printed raw
    assert cli.ok("get", root, "users", "age") == "3\n"
    assert json.loads(cli.ok("get", root, "users", "profile")) == {"age": 3, "tags": ["a", "b"]}
    assert cli.ok("get", root, "users", "quoted") == "a string\n"
    assert cli.ok("get", root, "users", "nothing") == "null\n"
    with Repository(root) as repo, repo.open_prefix("users", "rw") as px:
        assert px["age"] == "3" and px["profile"] == {"age": 3, "tags": ["a", "b"]}
        px["blob"] = b"\x00\xff\n\x80raw"
        px["list"] = [1, 2.5, None, "x"]
        px.commit()
    blob = cli.run("get", root, "users", "blob")
    assert (blob.returncode, blob.stdout, blob.stderr) == (0, b"\x00\xff\n\x80raw", b"")
    assert json.loads(cli.ok("get", root, "users", "list")) == [1, 2.5, None, "x"]


def test_errors_are_one_line_with_exit_1_and_no_traceback(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    cli.ok("put", root, "users", "name", "alice")
    assert "'missing'" in cli.fails("get", root, "users", "missing")
    assert "nope" in cli.fails("get", root, "nope", "name")  # no such prefix
    assert "invalid prefix name" in cli.fails("put", root, "../escape", "k", "v")
    assert "invalid prefix name" in cli.fails("get", root, ".hidden", "k")
    assert not (tmp_path / "escape.hc").exists()
    assert "JSON" in cli.fails("put", root, "users", "k", "{not json", "--json")
    assert "not a hotcopy repository" in cli.fails("get", tmp_path / "elsewhere", "users", "k")
    assert cli.ok("get", root, "users", "name") == "alice\n"  # nothing changed by the failures


def test_put_refuses_values_that_are_not_json_text_in_one_line(cli: Cli, root: Path) -> None:
    deep = "[" * 60_000 + "]" * 60_000  # once a RecursionError traceback
    assert "deeper than 512 levels" in cli.fails("put", root, "p", "k", deep, "--json")
    just_over = "[" * 513 + "]" * 513
    assert "deeper than 512 levels" in cli.fails("put", root, "p", "k", just_over, "--json")
    for text in ("NaN", "[1, Infinity]", '{"a": -Infinity}'):
        assert "not a JSON number" in cli.fails("put", root, "p", "k", text, "--json")
    assert "lone surrogate U+D800" in cli.fails("put", root, "p", "k", '"\\ud800"', "--json")
    # Arguments that are not UTF-8 reach Python as lone surrogates (surrogateescape).
    assert "lone surrogate U+DCFF" in cli.fails("put", root, "p", "k", "v\udcff")
    assert "key 'k\\udcff'" in cli.fails("put", root, "p", "k\udcff", "v")
    assert "'k'" in cli.fails("get", root, "p", "k")  # nothing was stored
    at_limit = "[" * 512 + "]" * 512
    assert cli.ok("put", root, "p", "k", at_limit, "--json") == "1\n"
    assert json.loads(cli.ok("get", root, "p", "k")) == json.loads(at_limit)


def test_usage_errors_exit_2(cli: Cli) -> None:
    cli.usage_error()
    cli.usage_error("frobnicate")
    cli.usage_error("get", "root-only")
    cli.usage_error("copy", "r", "p", "d", "--step-size", "0")
    cli.usage_error("copy", "r", "p", "d", "--step-size", "many")
    cli.usage_error("ls", "r", "--no-such-option")
    for rate in ("0", "-5", "fast", "inf"):
        cli.usage_error("copy", "r", "p", "d", "--rate-limit", rate)
        cli.usage_error("backup", "r", "b", "--rate-limit", rate)


def test_copy_and_backup_take_a_rate_limit(cli: Cli, root: Path, tmp_path: Path) -> None:
    cli.ok("put", root, "p", "k", json.dumps("x" * 5000))
    assert "commit 1" in cli.ok("copy", root, "p", tmp_path / "a.hc", "--rate-limit", "0.5")
    assert verify_file(tmp_path / "a.hc").seq == 1
    assert "(complete)" in cli.ok("backup", root, tmp_path / "bk", "--rate-limit", "100")


# -- ls ---------------------------------------------------------------------------------------


def test_ls_lists_prefixes_with_size_seq_and_keys(cli: Cli, root: Path) -> None:
    assert cli.ok("ls", root) == "no prefixes\n"
    assert json.loads(cli.ok("ls", root, "--json")) == {"version": 1, "prefixes": []}
    cli.ok("put", root, "beta", "k", "v")
    cli.ok("put", root, "alpha", "k1", "v")
    cli.ok("put", root, "alpha", "k2", "v")
    listing = json.loads(cli.ok("ls", root, "--json"))
    ok = {"damaged": False, "error": None}
    assert listing == {
        "version": 1,
        "prefixes": [
            {"prefix": "alpha", "bytes": _sizes(root, "alpha"), "seq": 2, "keys": 2, **ok},
            {"prefix": "beta", "bytes": _sizes(root, "beta"), "seq": 1, "keys": 1, **ok},
        ],
    }
    header, *rows = cli.ok("ls", root).splitlines()
    assert header.split() == ["PREFIX", "BYTES", "SEQ", "KEYS"]
    assert [row.split() for row in rows] == [
        ["alpha", str(_sizes(root, "alpha")), "2", "2"],
        ["beta", str(_sizes(root, "beta")), "1", "1"],
    ]


def test_ls_lists_every_prefix_and_marks_the_damaged_ones_with_exit_1(cli: Cli, root: Path) -> None:
    names = ("a", "flipped", "header", "torn", "z")  # as listed: sorted
    for name in names:
        cli.ok("put", root, name, "k", "v")
    with Repository(root) as repo:
        for name in names:
            repo.open_prefix(name, "rw").checkpoint()
    with open(root / "flipped.hc", "r+b") as f:  # a flipped byte in the batch header's seq
        f.seek(72)
        byte = f.read(1)[0]
        f.seek(72)
        f.write(bytes([byte ^ 0x01]))
    os.truncate(root / "torn.hc", (root / "torn.hc").stat().st_size - 10)  # inside a segment
    os.truncate(root / "header.hc", 30)  # inside the file header
    damaged = {name: verify_file(root / f"{name}.hc") for name in names[1:4]}
    assert not any(report.ok for report in damaged.values())

    done = cli.run("ls", root)
    line = _check_damage_found(done)
    assert "3 of 5 prefixes are damaged" in line and "'flipped'" in line
    header, *rows = done.stdout.decode().splitlines()
    assert header.split() == ["PREFIX", "BYTES", "SEQ", "KEYS"]
    assert [row.split()[0] for row in rows] == list(names)
    assert rows[0].split() == ["a", str(_sizes(root, "a")), "1", "1"]
    assert rows[4].split() == ["z", str(_sizes(root, "z")), "1", "1"]
    for row, (name, report) in zip(rows[1:4], damaged.items(), strict=True):
        assert row.split()[:4] == [name, str(_sizes(root, name)), "-", "-"]
        assert row.endswith(report.summary()) and f"DAMAGED at offset {report.offset}" in row

    done = cli.run("ls", root, "--json")
    _check_damage_found(done)
    listing = {row["prefix"]: row for row in json.loads(done.stdout)["prefixes"]}
    assert list(listing) == list(names)
    for name in ("a", "z"):
        assert listing[name] == {
            "prefix": name, "bytes": _sizes(root, name), "seq": 1, "keys": 1,
            "damaged": False, "error": None,
        }  # fmt: skip
    for name, report in damaged.items():
        row = listing[name]
        assert (row["damaged"], row["seq"], row["keys"]) == (True, None, None)
        assert row["error"] == report.summary()
        assert f"{root / name}.hc: DAMAGED at offset {report.offset}" in row["error"]
    assert "exit status is 1" in " ".join(cli.ok("ls", "--help").split())


# -- copy and restore -------------------------------------------------------------------------


def test_copy_writes_a_verified_copy_and_reports_it(cli: Cli, root: Path, tmp_path: Path) -> None:
    for i in range(5):
        cli.ok("put", root, "p", f"k{i}", json.dumps({"i": i, "pad": "x" * 2000}), "--json")
    text = cli.ok("copy", root, "p", tmp_path / "a.hc", "--step-size", "1000")
    assert "commit 5" in text and str(tmp_path / "a.hc") in text
    assert verify_file(tmp_path / "a.hc").seq == 5

    result = json.loads(cli.ok("copy", root, "p", tmp_path / "b.hc", "--json"))
    data = (tmp_path / "b.hc").read_bytes()
    assert result["path"] == str(tmp_path / "b.hc") and result["prefix"] == "p"
    assert (result["seq"], result["length"], result["crc32"]) == (5, len(data), zlib.crc32(data))
    assert isinstance(result["file_id"], str) and isinstance(result["seconds"], float)
    assert verify_file(tmp_path / "b.hc").ok

    assert "exists" in cli.fails("copy", root, "p", tmp_path / "b.hc")
    assert (tmp_path / "b.hc").read_bytes() == data
    assert "own main file" in cli.fails("copy", root, "p", root / "p.hc")
    assert "does not exist" in cli.fails("copy", root, "nope", tmp_path / "c.hc")
    assert "does not exist" in cli.fails("copy", root, "p", tmp_path / "no-dir" / "c.hc")
    assert "invalid prefix name" in cli.fails("copy", root, "a/b", tmp_path / "c.hc")
    assert sorted(os.listdir(tmp_path)) == ["a.hc", "b.hc", "repo"]


def test_restore_of_a_copy_needs_force_to_replace_a_prefix(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    cli.ok("put", root, "p", "k", "copied")
    cli.ok("copy", root, "p", tmp_path / "p.hc")
    cli.ok("put", root, "p", "k", "newer")
    cli.ok("put", root, "p", "extra", "newer")

    other = tmp_path / "other"
    assert "restored" in cli.ok("restore", tmp_path / "p.hc", other, "--prefix", "q")
    assert cli.ok("get", other, "q", "k") == "copied\n"

    assert "force" in cli.fails("restore", tmp_path / "p.hc", root, "--prefix", "p")
    assert cli.ok("get", root, "p", "k") == "newer\n"
    cli.ok("restore", tmp_path / "p.hc", root, "--prefix", "p", "--force")
    assert cli.ok("get", root, "p", "k") == "copied\n"
    assert "'extra'" in cli.fails("get", root, "p", "extra")
    assert cli.ok("put", root, "p", "k", "after") == "2\n"  # commits go on from the copy's commit

    damaged = bytearray((tmp_path / "p.hc").read_bytes())
    damaged[-40] ^= 0x10
    (tmp_path / "bad.hc").write_bytes(bytes(damaged))
    assert "damaged" in cli.fails("restore", tmp_path / "bad.hc", root, "--prefix", "p", "--force")
    assert cli.ok("get", root, "p", "k") == "after\n"
    assert "missing.hc" in cli.fails("restore", tmp_path / "missing.hc", root, "--prefix", "p")
    assert "invalid prefix name" in cli.fails(
        "restore", tmp_path / "p.hc", root, "--prefix", "../x"
    )
    assert not (tmp_path / "x.hc").exists()


# -- verify -----------------------------------------------------------------------------------


def test_verify_a_copy_a_repository_and_a_damaged_file(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    for i in range(3):
        cli.ok("put", root, "p", f"k{i}", "value")
    cli.ok("put", root, "q", "k", "value")
    cli.ok("copy", root, "p", tmp_path / "p.hc")

    assert "ok" in cli.ok("verify", tmp_path / "p.hc")
    report = json.loads(cli.ok("verify", tmp_path / "p.hc", "--json"))
    assert report["ok"] is True and [f["seq"] for f in report["files"]] == [3]
    text = cli.ok("verify", root)
    assert "2 file(s) checked, 0 damaged" in text
    report = json.loads(cli.ok("verify", root, "--json"))
    assert report["ok"] is True and len(report["files"]) == 2

    data = bytearray((tmp_path / "p.hc").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "p.hc").write_bytes(bytes(data))
    offset = verify_file(tmp_path / "p.hc").offset
    assert offset is not None
    line = cli.fails("verify", tmp_path / "p.hc")
    assert f"offset {offset}" in line and str(tmp_path / "p.hc") in line
    done = cli.run("verify", tmp_path / "p.hc", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["files"][0]["offset"] == offset
    assert "no such file" in cli.fails("verify", tmp_path / "nothing-here")

    cli.ok("put", root, "q", "k2", "value")
    with Repository(root) as repo, repo.open_prefix("q", "rw") as px:
        px.checkpoint()
    live = bytearray((root / "q.hc").read_bytes())
    live[-10] ^= 0x04
    (root / "q.hc").write_bytes(bytes(live))
    offset = verify_file(root / "q.hc").offset
    line = _check_damage_found(cli.run("verify", root))  # p is sound: q alone is damaged
    assert f"offset {offset}" in line and "q.hc" in line


def test_verify_accepts_a_repository_restored_by_replacing_a_main_file(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    cli.ok("put", root, "p", "k", "copied")
    cli.ok("copy", root, "p", tmp_path / "p.hc")
    cli.ok("put", root, "p", "k", "newer")  # in the WAL, which goes stale below
    os.replace(tmp_path / "p.hc", root / "p.hc")
    # A WAL of another main file is ignored by design (invariant 3): not damage.
    assert "1 file(s) checked, 0 damaged" in cli.ok("verify", root)
    assert json.loads(cli.ok("verify", root, "--json"))["ok"] is True
    assert cli.ok("get", root, "p", "k") == "copied\n"


# -- as a real program -----------------------------------------------------------------------


@pytest.mark.multiprocess
def test_the_program_exits_0_1_2_prints_raw_bytes_and_never_a_traceback(
    root: Path, tmp_path: Path
) -> None:
    with Repository(root) as repo, repo.open_prefix("p", "rw") as px:
        px["blob"] = b"\x00\xff\n\x80raw"
        px["text"] = "caf\u00e9"
        px.commit()
    blob = run_program("get", root, "p", "blob")
    assert (blob.returncode, blob.stdout, blob.stderr) == (0, b"\x00\xff\n\x80raw", b"")
    assert _check_ok(run_program("get", root, "p", "text")) == "caf\u00e9\n"
    assert "'missing'" in _check_fails(run_program("get", root, "p", "missing"))
    assert "invalid prefix name" in _check_fails(run_program("get", root, "../p", "k"))
    _check_fails(run_program("verify", tmp_path / "nothing-here"))
    _check_usage_error(run_program("get", root))
    _check_usage_error(run_program())
    # The installed entry point is the same program.
    script = Path(sys.executable).with_name("hotcopy")
    if script.exists():
        done = subprocess.run(
            [script, "get", root, "p", "text"], capture_output=True, timeout=30, check=False
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "caf\u00e9\n".encode(), b"")


# -- progress bar -----------------------------------------------------------------------------


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    controller, tty = pty.openpty()
    try:
        yield controller, tty
    finally:
        os.close(controller)
        os.close(tty)


def _drain(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0.1)[0]:  # the program has exited: all is buffered
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: nothing more on a pty
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.multiprocess
def test_copy_shows_a_progress_bar_only_on_a_terminal(
    cli: Cli, root: Path, tmp_path: Path, terminal: tuple[int, int]
) -> None:
    cli.ok("put", root, "p", "k", "x" * 50_000)
    # Not a terminal (a pipe): stderr stays empty (checked by _check_ok).
    _check_ok(run_program("copy", root, "p", tmp_path / "piped.hc", "--step-size", "4096"))
    controller, tty = terminal
    done = run_program("copy", root, "p", tmp_path / "tty.hc", "--step-size", "4096", stderr=tty)
    assert done.returncode == 0, done
    assert verify_file(tmp_path / "tty.hc").ok
    drawn = _drain(controller)
    assert b"copy p" in drawn and b"100%" in drawn, drawn
