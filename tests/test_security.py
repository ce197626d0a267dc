"""Issue 15, as another local user would try it: private by default, unsafe places refused, no
planted link followed, only our own dead temps swept, no FIFO hang.

The attacks that need a second real uid create a throwaway user (and group) with ``useradd``
when running as root (CI does) and act as it from a forked child that drops its privileges:
the interpreter under ``/root`` need not be readable by it, since everything it runs is
imported before the switch. Repositories such a user must reach live under a world-traversable
directory in ``/tmp`` (pytest's own ``tmp_path`` is 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import io
import json
import multiprocessing
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hotcopy.coordinator._process import ProcessIdentity, is_alive
from hotcopy.storage import FileLeases, Repository, verify_file
from hotcopy.workers import main
from hotcopy_test_support import storage_helpers

run_python = storage_helpers().run_python

pytestmark = pytest.mark.timeout(120)

PROGRAM = [sys.executable, "-m", "hotcopy.workers"]
CTX = multiprocessing.get_context("fork")
NOBODY = 65534  # a uid that is neither ours nor root's, for ownership without a login
TEMP_MARK = ".hotcopy-tmp-"  # what storage/_durable.py names its temps with


def hotcopy(
    *args: object, umask: int = -1, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``hotcopy ARGS`` as a program of this (first) user; killed and reaped after ``timeout``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTCOPY_FAULT")}
    result = subprocess.run(
        [*PROGRAM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        umask=umask,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one error line of a command that had to fail; it names each of ``words``."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hotcopy: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- walking what hotcopy created ------------------------------------------------------------


def modes_under(*tops: Path) -> dict[Path, os.stat_result]:
    """``lstat`` of each of ``tops`` and of everything under them."""
    found = {}
    for top in tops:
        found[top] = os.lstat(top)
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(directory, name)
                found[path] = os.lstat(path)
    return found


def assert_modes(
    found: dict[Path, os.stat_result], file_mode: int, dir_mode: int, gid: int | None = None
) -> None:
    """Every directory of ``found`` has ``dir_mode``, everything else ``file_mode`` (and
    ``gid``)."""
    wrong = []
    for path, st in sorted(found.items()):
        want = dir_mode if stat.S_ISDIR(st.st_mode) else file_mode
        if stat.S_IMODE(st.st_mode) != want or (gid is not None and st.st_gid != gid):
            wrong.append(f"{path} {oct(stat.S_IMODE(st.st_mode))} gid {st.st_gid}")
    assert not wrong, "\n".join(wrong)


# -- a second real user -----------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def need_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second real user (CI runs as root)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} to create a throwaway user or group")


@contextlib.contextmanager
def throwaway_group() -> Iterator[str]:
    name = f"hctg-{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True, timeout=30)


@contextlib.contextmanager
def throwaway_user(*groups: str) -> Iterator[User]:
    name = f"hctu-{secrets.token_hex(4)}"
    command = ["useradd", "--system", "--no-create-home", "--user-group"]
    if groups:
        command += ["--groups", ",".join(groups)]
    subprocess.run([*command, name], check=True, capture_output=True, timeout=30)
    try:
        entry = pwd.getpwnam(name)
        groups_of = tuple(os.getgrouplist(name, entry.pw_gid))
        yield User(name, entry.pw_uid, entry.pw_gid, groups_of)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False, capture_output=True, timeout=30)


def _as_user_child(pipe: Connection, user: User, action: Callable[[], Any]) -> None:
    try:
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)
        pipe.send(("ok", action()))
    except BaseException as err:  # reported to the test, which decides
        pipe.send(("error", f"{type(err).__name__}: {err}"))


def as_user(user: User, action: Callable[[], Any]) -> Any:
    """Run ``action`` in a forked child as ``user``; its result, or ``("error", text)``."""
    ours, theirs = CTX.Pipe()
    child = CTX.Process(target=_as_user_child, args=(theirs, user, action))
    try:
        child.start()
        assert ours.poll(60), "the child acting as another user did not report"
        status, value = ours.recv()
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(5)
    return value if status == "ok" else ("error", value)


def cli(*args: object) -> Callable[[], tuple[int, str, str]]:
    """An action running ``hotcopy ARGS`` in-process (for :func:`as_user`)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(arg) for arg in args])
        return code, out.getvalue(), err.getvalue()

    return run


def readable_by_them(paths: list[Path]) -> Callable[[], list[str]]:
    """An action returning which of ``paths`` it could read (files) or list (directories)."""

    def attempt() -> list[str]:
        read = []
        for path in paths:
            try:
                if path.is_dir():
                    os.listdir(path)
                else:
                    path.read_bytes()
            except OSError:
                continue
            read.append(str(path))
        return read

    return attempt


def _conftest() -> Any:
    wanted = str(Path(__file__).with_name("conftest.py"))
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == wanted:
            return module
    raise RuntimeError("tests/conftest.py is not loaded")


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory other users can reach (not its content: each test decides)."""
    base = Path(tempfile.mkdtemp(prefix="hotcopy-security-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        conftest = _conftest()
        conftest.stop_coordinators(base)
        conftest.remove_segments(base)
        shutil.rmtree(base)


def file_leases_repo(root: Path) -> Repository:
    return Repository.init(root, leases=FileLeases(root / ".hotcopy"))


def repository(root: Path, umask: int = -1) -> Path:
    """A repository of this user with a prefix ``p`` holding ``k``."""
    hotcopy("init", root, umask=umask)
    hotcopy("put", root, "p", "k", "v", umask=umask)
    return root


def sticky_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o1777)  # sticky and world-writable, as /tmp
    return path


# -- 1. private by default ---------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_everything_hotcopy_creates_is_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    root = tmp_path / "made" / "by" / "init"
    copy, backups, restored = tmp_path / "copy.hc", tmp_path / "backups", tmp_path / "restored"
    hotcopy("init", root, umask=umask)
    hotcopy("put", root, "p", "k", "v1", umask=umask)
    hotcopy("put", root, "q", "k", "v1", umask=umask)
    hotcopy("copy", root, "p", copy, umask=umask)
    hotcopy("backup", root, backups, umask=umask)
    hotcopy("put", root, "p", "k", "v2", umask=umask)
    hotcopy("backup", root, backups, "--incremental", umask=umask)
    hotcopy("restore", backups, restored, umask=umask)
    hotcopy("put", restored, "r", "k", "later", umask=umask)  # files created later, too
    hotcopy("restore", copy, root, "--prefix", "p2", umask=umask)
    with (
        Repository(root, leases=FileLeases(root / ".hotcopy")) as repo,
        repo.open_prefix("f", "rw") as prefix,
    ):
        prefix["k"] = "v"
        prefix.commit()
    found = modes_under(tmp_path / "made", copy, backups, restored)
    assert {".hotcopy", "p.hc", "p.hc-wal"} <= {path.name for path in found}
    assert_modes(found, 0o600, 0o700)


# -- 2. unsafe places --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o2777], ids=oct)
def test_a_root_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "repo"
    file_leases_repo(root).close()
    root.chmod(mode)
    with pytest.raises(PermissionError, match="chmod"):
        Repository(root, leases=FileLeases(root / ".hotcopy"))
    refused(hotcopy("get", root, "p", "k", check=False), str(root), "chmod")
    refused(hotcopy("init", root, check=False), "chmod")


def test_a_root_of_another_user_is_refused_even_to_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another uid")
    root = tmp_path / "repo"
    file_leases_repo(root).close()
    os.chown(root, NOBODY, -1)
    with pytest.raises(PermissionError, match=f"uid {NOBODY}"):
        Repository(root, leases=FileLeases(root / ".hotcopy"))
    refused(hotcopy("ls", root, check=False), f"uid {NOBODY}")


@pytest.mark.multiprocess
def test_a_catalog_others_can_write_or_own_is_refused(tmp_path: Path) -> None:
    root, backups = repository(tmp_path / "repo"), tmp_path / "backups"
    hotcopy("backup", root, backups)
    backups.chmod(0o777)
    refused(hotcopy("backup", root, backups, check=False), str(backups), "chmod")
    refused(hotcopy("restore", backups, tmp_path / "r1", check=False), "chmod")
    assert not (tmp_path / "r1").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o777)
    fresh.chmod(0o777)
    refused(hotcopy("backup", root, fresh, check=False), "chmod")
    assert list(fresh.iterdir()) == []
    if os.geteuid() == 0:
        backups.chmod(0o700)
        os.chown(backups, NOBODY, -1)
        refused(hotcopy("restore", backups, tmp_path / "r2", check=False), f"uid {NOBODY}")
        refused(hotcopy("prune", backups, "--keep", "1", check=False), f"uid {NOBODY}")


# -- 3. links we did not make --------------------------------------------------------------------


def _plant(locks: Path, victim: Path, created: Path) -> None:
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "p.w").symlink_to(victim)
    (locks / "p.a").symlink_to(created)


def _give(path: Path, uid: int) -> None:
    for directory, dirs, files in os.walk(path):
        os.lchown(directory, uid, -1)
        for name in dirs + files:
            os.lchown(Path(directory, name), uid, -1)


@pytest.mark.parametrize(
    "where", ["links-in-our-locks", "foreign-locks-dir", "locks-is-a-link", "runtime-is-a-link"]
)
def test_planted_lock_links_are_never_followed(tmp_path: Path, where: str) -> None:
    """The issue's attack: FileLeases over an attacker-controlled ``.hotcopy/locks``."""
    if where != "links-in-our-locks" and os.geteuid() != 0:
        pytest.skip("needs root to make files of another uid")
    root, attacker = tmp_path / "repo", tmp_path / "attacker"
    victim, created = tmp_path / "victim-secret", tmp_path / "created-by-victim"
    victim.write_bytes(b"root-only secret\n")
    victim.chmod(0o600)
    file_leases_repo(root).close()
    runtime = root / ".hotcopy"
    shutil.rmtree(runtime)
    if where == "links-in-our-locks":
        _plant(runtime / "locks", victim, created)
    elif where == "foreign-locks-dir":
        _plant(runtime / "locks", victim, created)
        _give(runtime / "locks", NOBODY)
    elif where == "locks-is-a-link":
        _plant(attacker, victim, created)
        runtime.mkdir(mode=0o700)
        (runtime / "locks").symlink_to(attacker)
        _give(attacker, NOBODY)
    else:
        _plant(attacker / "locks", victim, created)
        runtime.symlink_to(attacker)
        _give(attacker, NOBODY)
    with (
        pytest.raises(OSError),  # refused, whichever check sees it first
        Repository(root, leases=FileLeases(runtime)) as repo,
    ):
        prefix = repo.open_prefix("p", "rw")
        prefix["k"] = "v"
        prefix.commit()
        repo.copy_prefix(tmp_path / "copy.hc", "p")  # a snapshot lease: p.a
    assert victim.read_bytes() == b"root-only secret\n"
    assert not created.exists()


def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make files of another uid")
    root = tmp_path / "repo"
    file_leases_repo(root).close()
    locks = root / ".hotcopy" / "locks"
    locks.mkdir(exist_ok=True)
    (locks / "p.w").write_bytes(b"\xff" * 8)  # the attacker's fencing token
    os.chown(locks / "p.w", NOBODY, -1)
    with (
        Repository(root, leases=FileLeases(root / ".hotcopy")) as repo,
        pytest.raises(PermissionError, match=f"uid {NOBODY}"),
    ):
        repo.leases.lease("p", "write")


# -- 6. temps are ours or left alone ------------------------------------------------------------


def _dead_identity() -> tuple[int, int]:
    """(pid, start ticks) of a process that has exited."""
    child = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, timeout=30, check=True)
    return int(child.stdout), 1


@pytest.mark.multiprocess
def test_a_copy_sweeps_only_its_own_dead_temps(public: Path) -> None:
    need_root_and("useradd", "userdel")
    root, shared = repository(public / "repo"), sticky_dir(public / "shared")
    pid, ticks = _dead_identity()
    me = ProcessIdentity.current()
    theirs = [
        "thesis.txt.tmp-1-1-deadbeef",  # the file
        f"thesis.txt{TEMP_MARK}{pid}-{ticks}-deadbeef",  # even in our format
        f"c.hc{TEMP_MARK}{pid}-{ticks}-deadbeef",  # even of our destination
    ]
    with throwaway_user() as stranger:

        def plant() -> None:
            for name in theirs:
                (shared / name).write_bytes(b"their work")

        assert as_user(stranger, plant) is None
        mine_dead = shared / f"c.hc{TEMP_MARK}{pid}-{ticks}-0badf00d"
        mine_live = shared / f"c.hc{TEMP_MARK}{me.pid}-{me.start_ticks}-0badf00d"
        mine_link = shared / f"d.hc{TEMP_MARK}{pid}-{ticks}-0badf00d"
        mine_unlike = shared / "notes.txt.tmp-1-1-deadbeef"  # the old pattern: not ours
        for path in (mine_dead, mine_live, mine_unlike):
            path.write_bytes(b"x")
        mine_link.symlink_to(shared / "nowhere")
        hotcopy("copy", root, "p", shared / "c.hc")
        left = {path.name for path in shared.iterdir()}
        assert set(theirs) <= left
        assert {mine_live.name, mine_link.name, mine_unlike.name, "c.hc"} <= left
        assert mine_dead.name not in left  # ours, provably abandoned: swept


@pytest.mark.multiprocess
def test_a_restore_leaves_another_users_staging_lookalike(public: Path) -> None:
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    hotcopy("backup", root, backups)
    shared = sticky_dir(public / "shared")
    pid, ticks = _dead_identity()
    lookalikes = [".r.restoring.tmp-1-1-deadbeef", f".r.restoring{TEMP_MARK}{pid}-{ticks}-deadbeef"]
    with throwaway_user() as stranger:

        def plant() -> None:
            for name in lookalikes:
                (shared / name).mkdir()
                (shared / name / "their-file").write_bytes(b"their work")

        assert as_user(stranger, plant) is None
        hotcopy("restore", backups, shared / "r")
        for name in lookalikes:
            assert (shared / name / "their-file").read_bytes() == b"their work"


# -- a second user: no reading, no planting ---------------------------------------------------


@pytest.mark.multiprocess
def test_another_user_reads_nothing_of_a_repository_its_backups_or_restores(public: Path) -> None:
    need_root_and("useradd", "userdel")
    root, backups, restored = public / "repo", public / "backups", public / "restored"
    hotcopy("init", root)
    hotcopy("put", root, "p", "secret", "root's secret")
    hotcopy("backup", root, backups)
    hotcopy("restore", backups, restored)
    paths = sorted(modes_under(root, backups, restored))
    with throwaway_user() as stranger:
        assert as_user(stranger, readable_by_them(paths)) == []
        code, out, _ = as_user(stranger, cli("get", root, "p", "secret"))
        assert code == 1 and "root's secret" not in out


@pytest.mark.multiprocess
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_another_user_cannot_plant_files_in_a_repository(public: Path, umask: int) -> None:
    """Under umask 000 ROOT was 0777: a planted prefix was read as the victim's own."""
    need_root_and("useradd", "userdel")
    victim, forged = repository(public / "victim", umask), public / "forged"
    with throwaway_user() as stranger:
        forged.mkdir()
        os.chown(forged, stranger.uid, stranger.gid)

        def plant() -> list[str]:
            # Kernel locks: a coordinator started by this user could not run the interpreter
            # under /root.
            with file_leases_repo(forged) as repo, repo.open_prefix("q", "rw") as prefix:
                prefix["k"] = "forged"
                prefix.commit()
            done = []
            for name in ("q.hc", "q.hc-wal"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(forged / name, victim / name)
                    done.append(name)
            with contextlib.suppress(OSError):
                os.symlink(forged / "q.hc", victim / "r.hc")
                done.append("r.hc")
            return done

        assert as_user(stranger, plant) == []
    assert hotcopy("get", victim, "q", "k", check=False).stdout != "forged\n"


@pytest.mark.multiprocess
def test_another_users_links_and_directories_in_a_shared_place_are_refused(public: Path) -> None:
    """In a sticky world-writable directory (a /tmp, a /shared) another user got first."""
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    hotcopy("backup", root, backups)
    shared, secret = sticky_dir(public / "shared"), public / "secret"
    secret.write_bytes(b"root-only secret\n")
    secret.chmod(0o600)
    with throwaway_user() as stranger:

        def plant() -> None:
            (shared / "c.hc").symlink_to(secret)
            (shared / "theirs").mkdir()
            (shared / "r").symlink_to(shared / "theirs")
            (shared / "bk").mkdir()

        assert as_user(stranger, plant) is None
        refused(hotcopy("copy", root, "p", shared / "c.hc", check=False), "exists")
        refused(hotcopy("restore", backups, shared / "r", "--force", check=False), "belongs to")
        refused(hotcopy("backup", root, shared / "bk", check=False), "belongs to")
        refused(hotcopy("init", shared / "r", check=False), "belongs to")
    assert secret.read_bytes() == b"root-only secret\n"
    assert list((shared / "theirs").iterdir()) == [] and list((shared / "bk").iterdir()) == []


# -- sharing with a group, explicitly ---------------------------------------------------------


@pytest.mark.multiprocess
def test_a_member_of_the_group_reads_and_writes_a_shared_repository(public: Path) -> None:
    need_root_and("useradd", "userdel", "groupadd", "groupdel")
    root = public / "team"
    with (
        throwaway_group() as group,
        throwaway_user(group) as member,
        throwaway_user() as stranger,
    ):
        gid = grp.getgrnam(group).gr_gid
        hotcopy("init", root, "--group", group, umask=0o022)
        hotcopy("put", root, "p", "k", "by the owner", umask=0o000)
        assert as_user(member, cli("get", root, "p", "k"))[:2] == (0, "by the owner\n")
        assert as_user(member, cli("put", root, "p", "k2", "by a member"))[0] == 0
        assert as_user(member, cli("put", root, "q", "k", "a member's prefix"))[0] == 0
        assert hotcopy("get", root, "p", "k2").stdout == "by a member\n"
        assert hotcopy("get", root, "q", "k").stdout == "a member's prefix\n"
        hotcopy("put", root, "q", "k", "the owner again")
        found = modes_under(root)
        assert_modes(found, 0o660, 0o2770, gid)
        assert {st.st_uid for st in found.values()} == {0, member.uid}
        assert as_user(stranger, readable_by_them(sorted(found))) == []
        assert as_user(stranger, cli("get", root, "p", "k"))[0] == 1
        # A backup of it is private to its owner again unless shared the same way.
        hotcopy("backup", root, public / "backups")
        assert_modes(modes_under(public / "backups"), 0o600, 0o700)


def test_a_restore_into_an_empty_root_keeps_its_owner_mode_and_group(public: Path) -> None:
    """An operator prepares an empty ROOT for the team (group, setgid 2770) or for a service
    user (owned by it, in a directory it may not write) and restores into it. The restore
    must fill that directory, not build a new one beside it: one beside replaced ROOT with a
    private directory of the restoring user, or could not be made at all."""
    need_root_and("useradd", "userdel", "groupadd", "groupdel")
    source = public / "source"
    hotcopy("init", source)
    hotcopy("put", source, "p", "k", "v")
    hotcopy("copy", source, "p", public / "p.hc")
    (public / "p.hc").chmod(0o644)
    with throwaway_group() as group, throwaway_user() as service:
        gid = grp.getgrnam(group).gr_gid
        team = public / "team"
        team.mkdir()
        os.chown(team, -1, gid)
        team.chmod(0o2770)
        hotcopy("restore", public / "p.hc", team, umask=0o022)
        assert_modes(modes_under(team), 0o660, 0o2770, gid)
        assert hotcopy("get", team, "p", "k").stdout == "v\n"
        srv = public / "srv"  # the service's ROOT; srv itself is root's, 0755
        (srv / "app").mkdir(parents=True)
        srv.chmod(0o755)
        os.chown(srv / "app", service.uid, service.gid)
        # The same restore once here first: the child inherits every module it needs (this
        # interpreter's files may be where the other user cannot read them).
        assert cli("restore", public / "p.hc", public / "warm")()[0] == 0
        done = as_user(service, cli("restore", public / "p.hc", srv / "app"))
        assert done[0] == 0, done
        assert {st.st_uid for st in modes_under(srv / "app").values()} == {service.uid}
        # (Its own coordinator would need this interpreter, which it may not run here.)
        assert verify_file(srv / "app" / "p.hc").ok
        assert (srv / "app" / "hotcopy.json").is_file()


def test_init_group_needs_a_group_that_exists(tmp_path: Path) -> None:
    refused(hotcopy("init", tmp_path / "r", "--group", "no-such-group-hc", check=False), "group")
    assert not (tmp_path / "r").exists()


# -- 7. FIFOs ------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_a_fifo_is_refused_at_once_by_verify_and_restore(tmp_path: Path) -> None:
    root, backups = repository(tmp_path / "repo"), tmp_path / "backups"
    hotcopy("backup", root, backups)
    fifo = tmp_path / "fifo.hc"
    os.mkfifo(fifo)
    refused(hotcopy("verify", fifo, check=False, timeout=20), "FIFO")
    api = run_python(
        "import sys\n"
        "from hotcopy.storage import Repository\n"
        "with Repository(sys.argv[1]) as repo:\n"
        "    try:\n"
        "        repo.restore_prefix(sys.argv[2], 'p2')\n"
        "    except OSError as err:\n"
        "        print(err)\n",
        str(root),
        str(fifo),
        timeout=20,
    )
    assert "FIFO" in api.stdout, api.stderr
    (piece,) = backups.glob("*/p.hc")
    piece.unlink()
    os.mkfifo(piece)
    refused(hotcopy("restore", backups, tmp_path / "restored", check=False, timeout=20), "FIFO")
    wal = root / "p.hc-wal"
    wal.unlink()
    os.mkfifo(wal)
    assert "FIFO" in hotcopy("verify", root, check=False, timeout=20).stderr


def test_a_link_in_a_repository_is_not_taken_for_a_prefix(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with file_leases_repo(root) as repo, repo.open_prefix("p", "rw") as prefix:
        prefix["k"] = "v"
        prefix.commit()
    (root / "q.hc").symlink_to(root / "p.hc")
    with Repository(root, leases=FileLeases(root / ".hotcopy")) as repo:
        assert repo.prefixes() == ["p"]


def _is_alive_as_nobody_under_hidepid(identities: list[ProcessIdentity]) -> list[bool]:
    """``is_alive`` of each, asked by uid 65534 in a mount namespace of its own whose /proc is
    mounted ``hidepid=2``: a forked child, so hotcopy is imported before the switch (the test
    venv may be unreadable to that user)."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read_fd)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            subprocess.run(["mount", "-t", "proc", "-o", "hidepid=2", "proc", "/proc"], check=True)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_fd, json.dumps([is_alive(i) for i in identities]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as answers:
        data = answers.read()
    _, status = os.waitpid(child, 0)
    assert status == 0, "the checking child failed"
    return [bool(answer) for answer in json.loads(data)]


@pytest.mark.timeout(60)
def test_a_process_that_proc_hides_from_another_user_is_never_taken_for_dead() -> None:
    """Under ``hidepid=2`` (systemd's ProtectProc=invisible) another user's process is absent
    from /proc: a coordinator dropping its connection, or a run breaking its bucket lock, on
    that absence would take a live holder's lease. Checked beside a process that really is
    gone."""
    need_root_and("mount")
    live = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    try:
        live_id = ProcessIdentity.of(live.pid)
        assert live_id is not None
        gone_id = live_id._replace(pid=gone.pid, start_ticks=1)
        assert _is_alive_as_nobody_under_hidepid([live_id, gone_id]) == [True, False]
    finally:
        live.kill()
        live.wait(10)


def _give_away(paths: list[Path], mode: int) -> None:
    for path in paths:
        os.chown(path, 0, 0)
        path.chmod(mode)


def _backup_dirs(catalog: Path) -> list[str]:
    return sorted(path.name for path in catalog.iterdir() if path.is_dir())


def _give_to(catalog: Path, user: User) -> None:
    for path in [catalog, *catalog.rglob("*")]:
        os.lchown(path, user.uid, user.gid)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", [0o755, 0o711], ids=oct)
def test_a_backup_its_user_may_not_remove_never_stops_a_prune(public: Path, mode: int) -> None:
    """A member of a catalog's group made directories named like backups that this user may
    not change (0755), nor list (0711), nor enter (0700), or an old backup's directory became
    another user's. Prune must leave those in place, with every backup they link to, say why,
    and prune the rest; prune and backup went on failing with EACCES at every run, after
    prune had removed a manifest, and a base was removed under a backup left in place."""
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    for value in ("v1", "v2", "v3", "v4"):
        hotcopy("put", root, "p", "k", value)
        hotcopy("backup", root, backups, *(["--incremental"] if value == "v3" else []))
    ids = _backup_dirs(backups)
    assert len(ids) == 4
    # The same prune once here first: the child inherits every module it needs (this
    # interpreter's files may be where the other user cannot read them).
    shutil.copytree(backups, public / "warm", symlinks=True)
    assert cli("prune", public / "warm", "--keep-last", "1")()[0] == 0
    unfinished = backups / "20000101T000000.000000Z"  # pieces, no manifest
    shutil.copytree(backups / ids[0], unfinished)
    (unfinished / "MANIFEST.json").unlink()
    closed = backups / "20000102T000000.000000Z"
    closed.mkdir()
    with throwaway_user() as owner:
        _give_to(backups, owner)
        # ids[2] is an incremental (ids[1] its base); ids[3] the one kept.
        _give_away([backups / ids[2], backups / ids[3], unfinished], mode)
        _give_away([closed], 0o700)
        for _ in range(2):
            code, out, err = as_user(owner, cli("prune", backups, "--keep-last", "1"))
            assert code == 0, (out, err)
            assert ids[2] in out and "permission denied" in out, out
            assert "left 3 in place" in out, out
            assert _backup_dirs(backups) == [unfinished.name, closed.name, *ids[1:]]
            code, out, err = as_user(owner, cli("verify", backups))
            assert code == 0, (out, err)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", [0o755, 0o711, 0o1777], ids=oct)
def test_a_backup_prune_may_not_trim_is_left_whole(public: Path, mode: int) -> None:
    """A backup kept only as the base of one prefix is trimmed (its manifest rewritten
    without the others); in a directory this user may not write, it is left whole. In a
    sticky one it is trimmed, and a piece it may not remove is said to stay (it stayed
    for good, and no report said so)."""
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    hotcopy("put", root, "q", "k", "v1")
    hotcopy("backup", root, backups)  # p and q: trimmed to p below
    hotcopy("put", root, "q", "k", "v2")
    hotcopy("backup", root, backups, "--prefix", "q")
    hotcopy("put", root, "p", "k", "v2")
    hotcopy("backup", root, backups, "--incremental", "--prefix", "p")
    ids = _backup_dirs(backups)
    assert "trim" in hotcopy("prune", backups, "--keep-last", "1", "--dry-run").stdout
    shutil.copytree(backups, public / "warm", symlinks=True)
    assert cli("prune", public / "warm", "--keep-last", "1")()[0] == 0
    trimmed = backups / ids[0]
    with throwaway_user() as owner:
        _give_to(backups, owner)
        _give_away([trimmed], mode)
        if mode & stat.S_ISVTX:
            os.chown(trimmed / "q.hc", 0, 0)  # the piece it drops: not this user's to remove
        code, said, err = as_user(owner, cli("prune", backups, "--keep-last", "1"))
        assert code == 0, (said, err)
        assert ids[0] in said and "permission denied" in said, said
        assert _backup_dirs(backups) == [ids[0], ids[2]]
        code, out, err = as_user(owner, cli("verify", backups))
        assert code == 0, (out, err)
        code, out, err = as_user(owner, cli("backups", backups, "--json"))
        listed = {b["id"]: b for b in json.loads(out)["backups"]}
        if mode & stat.S_ISVTX:
            assert listed[ids[0]]["prefixes"] == 1 and "'q.hc'" in said, (listed[ids[0]], said)
            assert (trimmed / "q.hc").exists()
        else:
            assert listed[ids[0]]["prefixes"] == 2, listed[ids[0]]  # p and q: whole


@pytest.mark.multiprocess
@pytest.mark.parametrize("unreadable", ["base", "incremental"])
def test_a_backup_prune_may_not_read_keeps_its_chain(public: Path, unreadable: str) -> None:
    """A backup directory this user may not read (another member's 0700 one, or one made by
    a `sudo hotcopy backup`) was taken for a run that never finished: prune removed the base
    of an incremental in it, or an incremental of its own whose base it was, as unrestorable.
    Such a backup is left, with every backup older than it and every one linking through it."""
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    kinds = ["full", "full", "incremental", "full"][: 4 if unreadable == "incremental" else 3]
    for number, kind in enumerate(kinds):
        hotcopy("put", root, "p", "k", f"v{number}")
        hotcopy("backup", root, backups, *(["--incremental"] if kind == "incremental" else []))
    ids = _backup_dirs(backups)
    shutil.copytree(backups, public / "warm", symlinks=True)
    assert cli("prune", public / "warm", "--keep-last", "1")()[0] == 0
    closed = backups / (ids[2] if unreadable == "incremental" else ids[1])
    with throwaway_user() as owner:
        _give_to(backups, owner)
        _give_away([closed], 0o700)
        code, out, err = as_user(owner, cli("prune", backups, "--keep-last", "1"))
        assert code == 0, (out, err)
        assert f"{closed.name}  leave" in out and "may not read" in out, out
        assert _backup_dirs(backups) == ids, out  # nothing it may link to, or that links to it
        code, out, err = as_user(owner, cli("verify", backups))
        assert closed.name in out + err and "may not read" in out + err, (out, err)
        _give_to(backups, owner)  # readable again: every chain whole
        code, out, err = as_user(owner, cli("verify", backups))
        assert code == 0, (out, err)
        assert json.loads(as_user(owner, cli("backups", backups, "--json"))[1])["backups"][-1][
            "restorable"
        ]


@pytest.mark.multiprocess
def test_a_backup_prune_may_not_read_named_in_the_future_protects_nothing(public: Path) -> None:
    """An unreadable directory named like a backup made in 2999 cannot be the newer end of
    any chain yet: it must not keep every backup for good (it did, for as long as it stood)."""
    need_root_and("useradd", "userdel")
    root, backups = repository(public / "repo"), public / "backups"
    for number in range(3):
        hotcopy("put", root, "p", "k", f"v{number}")
        hotcopy("backup", root, backups)
    ids = _backup_dirs(backups)
    shutil.copytree(backups, public / "warm", symlinks=True)
    assert cli("prune", public / "warm", "--keep-last", "1")()[0] == 0
    future = backups / "29991231T235959.999999Z"
    future.mkdir()
    with throwaway_user() as owner:
        _give_to(backups, owner)
        _give_away([future], 0o700)
        code, out, err = as_user(owner, cli("prune", backups, "--keep-last", "1"))
        assert code == 0, (out, err)
        assert _backup_dirs(backups) == [ids[-1], future.name], out
