"""What an operator expects of the command line (issue 17): errors that name the real problem,
``--version``, ``-q``/``-v`` and ``HOTCOPY_LOG``, distinct exit codes documented in ``--help``
and the README, examples in every subcommand's help, and ``--json`` outputs with a version."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hotcopy.storage import Repository
from hotcopy.workers import main
from hotcopy.workers._cli import build_parser

pytestmark = pytest.mark.timeout(60)

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def call(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``hotcopy ARGS`` in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys: pytest.CaptureFixture[str], *args: object, code: int = 1) -> str:
    """The one error line of a command that must exit ``code``."""
    done = call(capsys, *args)
    assert done[0] == code, done
    (line,) = done[2].splitlines()
    assert line.startswith("hotcopy: error: ")
    return line


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        for name in ("users", "blobs"):
            with repo.open_prefix(name, "rw") as px:
                px["k"] = "v" * 3000
                px.commit()
    return root


def _damage(root: Path, name: str) -> None:
    """Flip a byte inside the first committed batch of ``name``'s main file."""
    with Repository(root) as repo:
        repo.open_prefix(name, "rw").checkpoint()
    with open(root / f"{name}.hc", "r+b") as f:
        f.seek(72)
        byte = f.read(1)[0]
        f.seek(72)
        f.write(bytes([byte ^ 0x01]))


# -- errors that point the right way -----------------------------------------------------------


def test_each_misleading_diagnosis_names_the_real_problem(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    copies = tmp_path / "copies"
    copies.mkdir()
    line = error(capsys, "restore", copies / "users.hc", tmp_path / "r8")
    assert f"{copies / 'users.hc'}: no such file or directory" in line
    assert "backup directory" not in line.split("(")[0]
    assert not (tmp_path / "r8").exists()

    line = error(capsys, "copy", root, "blobs", copies)
    assert f"{copies} is a directory: give a file name inside it" in line
    assert "remove" not in line and list(copies.iterdir()) == []

    script = tmp_path / "populate.py"
    script.write_text("print('hello')\n")
    code, out, err = call(capsys, "verify", script)
    assert (code, out) == (1, "")
    assert err == f"hotcopy: error: {script} is not a hotcopy file: give a .hc file, a " \
        "repository or a backup directory\n"  # fmt: skip
    assert "DAMAGED" not in err
    line = error(capsys, "restore", script, root, "--prefix", "users", "--force")
    assert "is not a hotcopy file" in line


def test_a_copy_whose_first_byte_flipped_is_reported_damaged_not_foreign(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    """A flipped bit in a copy's magic is damage like any other: its header's checksum shows
    the file is a hotcopy main file. ``verify`` and ``restore`` say so, with the offset."""
    copy = tmp_path / "users-copy"  # no .hc: the header, not the name, tells
    assert call(capsys, "copy", root, "users", copy)[0] == 0
    with open(copy, "r+b") as f:
        first = f.read(1)[0]
        f.seek(0)
        f.write(bytes([first ^ 0x04]))
    line = error(capsys, "verify", copy)
    assert "damaged at offset 0" in line and "magic" in line, line
    assert "not a hotcopy file" not in line
    line = error(capsys, "restore", copy, tmp_path / "restored", "--prefix", "users")
    assert "not a hotcopy file" not in line and "magic" in line, line
    assert not (tmp_path / "restored").exists()


def test_init_refuses_a_directory_that_holds_anything_but_a_repository(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    assert call(capsys, "backup", root, backups)[0] == 0
    before = sorted(os.listdir(backups))
    line = error(capsys, "init", backups)
    assert f"{backups} is a backup directory, not a repository" in line
    assert sorted(os.listdir(backups)) == before  # no hotcopy.json slipped in
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    assert "is not empty and holds no repository" in error(capsys, "init", other)
    assert os.listdir(other) == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in error(capsys, "init", tmp_path / "file")
    assert call(capsys, "init", root)[0] == 0  # a repository: opened, as before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert call(capsys, "init", empty)[0] == 0 and (empty / "hotcopy.json").is_file()


def test_force_is_spelled_as_the_flag_in_every_message_that_needs_it(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    assert call(capsys, "backup", root, backups)[0] == 0
    assert call(capsys, "copy", root, "users", tmp_path / "users.hc")[0] == 0
    for args in (
        ("restore", backups, root),
        ("restore", tmp_path / "users.hc", root, "--prefix", "users"),
    ):
        line = error(capsys, *args)
        assert "--force" in line and not re.search(r"(?<!-)\bforce\b", line), line


# -- exit codes --------------------------------------------------------------------------------


def test_partial_results_exit_3_everywhere_and_errors_exit_1(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    assert call(capsys, "backup", root, backups)[0] == 0
    _damage(root, "blobs")
    line = error(capsys, "backup", root, backups, code=3)
    assert "partial" in line and "1 of 2 prefixes not backed up: 'blobs'" in line
    partial = json.loads(call(capsys, "backups", backups, "--json")[1])["backups"][-1]
    assert partial["status"] == "partial"
    line = error(
        capsys, "restore", backups, tmp_path / "r", "--at", partial["id"], "--allow-partial",
        code=3,
    )  # fmt: skip
    assert "blobs" in line and (tmp_path / "r" / "users.hc").exists()
    assert "1 of 2 prefixes damaged" in error(capsys, "verify", root, code=1)
    assert "'blobs'" in error(capsys, "ls", root, code=1)
    error(capsys, "verify", root / "blobs.hc", code=1)  # one file: nothing partial about it
    piece = backups / partial["id"] / "users.hc"
    data = bytearray(piece.read_bytes())
    data[-40] ^= 0xFF
    piece.write_bytes(bytes(data))
    assert "problem(s)" in error(capsys, "verify", backups, code=1)  # though the first restores
    assert call(capsys, "get", root, "users", "nope")[0] == 1
    assert call(capsys, "get", root)[0] == 2


def test_exit_codes_are_documented_in_help_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "--help")
    assert code == 0
    for text in ("0    ok", "1    error", "2    usage", "3    partial", "130  interrupted"):
        assert text in out
    for text in ("| 0 | ok", "| 1 | error", "| 2 | usage", "| 3 | partial"):
        assert text in README


# -- help, version, verbosity ------------------------------------------------------------------


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "name")
    return dict(action.choices)  # type: ignore[arg-type]


def test_every_subcommand_has_examples_and_documented_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = _subcommands()
    assert {"init", "put", "get", "ls", "copy", "backup", "restore", "verify", "status"} <= set(
        names
    )
    for name, parser in names.items():
        text = parser.format_help()  # type: ignore[attr-defined]
        assert "examples:\n  hotcopy " + name in text, name
        assert "3    partial" in text, name
        for action in parser._actions:  # type: ignore[attr-defined]
            assert action.help, f"{name} {action.dest} has no help"


# -- --json ------------------------------------------------------------------------------------

JSON_KEYS = {
    "ls": {"version", "prefixes"},
    "copy": {"version", "path", "prefix", "kind", "seq", "size", "crc32", "seconds", "waited"},
    "backup": {"version", "id", "path", "complete", "bytes", "seconds", "waited", "prefixes"},
    "restore": {"version", "id", "root", "prefixes", "bytes", "seconds", "missing"},
    "backups": {"version", "catalog", "repository_id", "lineage", "backups"},
    "prune": {"version", "dry_run", "backups", "removed", "trimmed", "kept", "left"},
    "verify": {"version", "ok", "files"},
    "verify-catalog": {"version", "ok", "backups", "found", "restorable", "problems", "notes"},
    "salvage": {"version", "prefix", "damaged", "kept", "lost", "moved_aside"},
    "status": {"version", "root", "coordinator", "leases", "waiters"},
}


def test_every_json_output_has_a_version_and_is_documented_in_the_readme(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    commands = {
        "ls": ("ls", root),
        "copy": ("copy", root, "users", tmp_path / "u.hc"),
        "backup": ("backup", root, backups),
        "restore": ("restore", backups, tmp_path / "restored"),
        "backups": ("backups", backups),
        "prune": ("prune", backups, "--keep-last", "1", "--dry-run"),
        "verify": ("verify", root),
        "verify-catalog": ("verify", backups),
        "salvage": ("salvage", root, "users"),
        "status": ("status", root),
    }
    for name, args in commands.items():
        code, out, err = call(capsys, *args, "--json")
        assert (code, err) == (0, ""), (name, err)
        payload = json.loads(out)
        assert payload["version"] == 1, name
        assert JSON_KEYS[name] <= payload.keys(), (name, payload.keys())
        command = name.split("-")[0]
        assert f"`hotcopy {command}" in README and f"{command} --json" in README, name
