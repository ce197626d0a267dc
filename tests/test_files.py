"""The one way data files are opened and created: regular files only, no link followed, no FIFO
hang, no file of an untrusted user written, exact modes; and the places they live in."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotcopy.coordinator import UnsafePlace
from hotcopy.storage import NotRegularFile
from hotcopy.storage._files import (
    make_directory,
    open_dir,
    open_regular,
    open_regular_at,
    read_regular,
    refuse_unsafe_place,
)


def test_a_regular_file_opens_and_reads(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    fd = open_regular(tmp_path / "f")
    try:
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)
    assert read_regular(tmp_path / "f") == b"data"


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match="a FIFO"):
        open_regular(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match="a FIFO"):
        open_regular(tmp_path / "fifo", os.O_RDWR)


def test_links_sockets_directories_and_devices_are_refused(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_regular(tmp_path / "link")
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_regular(tmp_path / "link", os.O_RDWR | os.O_CREAT)
    assert (tmp_path / "target").read_bytes() == b"secret"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(NotRegularFile, match="socket"):
            open_regular(tmp_path / "sock")
    with pytest.raises(NotRegularFile, match="directory"):
        open_regular(tmp_path)
    with pytest.raises(NotRegularFile, match="device"):
        open_regular("/dev/null")


# -- creating, writing, and the places they happen in ---------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o077], ids=oct)
def test_created_files_and_directories_get_exactly_their_policy_mode(
    tmp_path: Path, mask: int
) -> None:
    with umask(mask):
        os.close(open_regular(tmp_path / "f", os.O_RDWR | os.O_CREAT))
        assert make_directory(tmp_path / "a" / "b")
        assert not make_directory(tmp_path / "a" / "b")  # there already
        with pytest.raises(FileExistsError):
            make_directory(tmp_path / "a", exist_ok=False)
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o2770)  # shared with its group on purpose (root's group 0 here)
        os.close(open_regular(shared / "f", os.O_RDWR | os.O_CREAT))
        make_directory(shared / "d")
    assert [_mode(tmp_path / "f"), _mode(tmp_path / "a"), _mode(tmp_path / "a" / "b")] == [
        0o600,
        0o700,
        0o700,
    ]
    assert [_mode(shared / "f"), _mode(shared / "d")] == [0o660, 0o2770]


def test_a_group_readable_directory_without_set_group_id_is_not_shared(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o750)
    os.close(open_regular(tmp_path / "d" / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    assert _mode(tmp_path / "d" / "f") == 0o600
    with pytest.raises(FileExistsError):
        open_regular(tmp_path / "d" / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def test_only_plain_names_are_opened_relative_to_a_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("sub/f", "..", ".", ""):
            with pytest.raises(ValueError, match="plain file name"):
                open_regular_at(fd, name)
        (tmp_path / "link").symlink_to(tmp_path / "sub" / "f")
        with pytest.raises(NotRegularFile, match="symbolic link"):
            open_regular_at(fd, "link", os.O_RDWR | os.O_CREAT)
    finally:
        os.close(fd)


def test_a_file_of_an_untrusted_user_is_read_but_never_written(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    (tmp_path / "theirs").write_bytes(b"their data")
    os.chown(tmp_path / "theirs", 65534, 65534)
    os.close(open_regular(tmp_path / "theirs"))  # reading: its content is checked elsewhere
    for flags in (os.O_RDWR, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(PermissionError, match="uid 65534"):
            open_regular(tmp_path / "theirs", flags)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    (shared / "members").write_bytes(b"a member's")
    os.chown(shared / "members", 65534, 0)  # made there by a member of the directory's group
    os.close(open_regular(shared / "members", os.O_RDWR))


@pytest.mark.parametrize(
    ("mode", "fine"),
    [(0o700, True), (0o755, True), (0o1777, True), (0o777, False), (0o775, False)],
    ids=oct,
)
def test_a_place_is_refused_if_a_directory_on_the_way_is_not_safe(
    tmp_path: Path, mode: int, fine: bool
) -> None:
    (tmp_path / "way" / "place").mkdir(parents=True, mode=0o700)
    (tmp_path / "way").chmod(mode)
    if fine:
        refuse_unsafe_place(tmp_path / "way" / "place")
    else:
        with pytest.raises(UnsafePlace, match="way"):
            refuse_unsafe_place(tmp_path / "way" / "place")
    refuse_unsafe_place(tmp_path / "nowhere")  # missing: for the caller to report


def test_a_runtime_directory_is_never_a_link_and_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePlace, match="symlink"):
        open_dir(tmp_path / "link", create=True)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose").chmod(0o755)
    os.close(open_dir(tmp_path / "loose"))
    assert _mode(tmp_path / "loose") == 0o700
