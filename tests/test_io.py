"""Atomic writes leave the old file or the new one, with the mode open() would give."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from metaml import io


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_atomic_write_gives_the_mode_open_would(tmp_path: Path) -> None:
    # By hand: a file made by open() under the same umask.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = tmp_path / "atomic.txt"
    io.atomic_write_text(written, "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~io._UMASK


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    io.atomic_write_text(target, "old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
