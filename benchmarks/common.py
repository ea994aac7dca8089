"""Shared helpers of the benchmarks: machine description and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """CPU model, cores, torch version and threads, for the record of a measurement."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def append_section(title: str, body: str) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    stamp = datetime.date.today().isoformat()
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {title} ({stamp})\n\n{body.rstrip()}\n")
