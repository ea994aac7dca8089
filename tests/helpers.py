"""Helpers shared by several test modules (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import pytest

from metaml.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``metaml ARGS`` in-process; return (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
