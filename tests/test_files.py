"""The one way data files are opened: regular files only, no link followed, no FIFO hang."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hotcopy.storage import NotRegularFile
from hotcopy.storage._files import open_regular, read_regular


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
