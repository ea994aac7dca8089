"""Shared helpers of the benchmarks: machine description and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch

from metaml.data import ClassDataset, load
from metaml.device import cpu_model, has_fast_bf16

RESULTS = Path(__file__).with_name("RESULTS.md")
OMNIGLOT = str(Path(__file__).resolve().parents[2] / "shared/data/omniglot")


def machine() -> str:
    """CPU model, cores, torch version and threads, for the record of a measurement."""
    # "AMD EPYC" names both an AVX2-only Zen 3 and an AVX-512 Zen 4 with bf16 units
    units = "bf16 units" if has_fast_bf16("cpu") else "no bf16 units"
    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_model()} ({isa}, {units}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def append_section(title: str, body: str) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    stamp = datetime.date.today().isoformat()
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {title} ({stamp})\n\n{body.rstrip()}\n")


def held_out_alphabets(
    root: str, test_alphabets: int = 2
) -> tuple[ClassDataset, ClassDataset, list[str], list[str]]:
    """Omniglot-small split by alphabet: ``(train, test, train_names, test_names)``.

    The alphabets are shuffled with seed 0 and the first ``test_alphabets`` held out, so every
    benchmark that calls this tests on the same alphabets.
    """
    ds = load("omniglot-small", root=root)
    assert isinstance(ds, ClassDataset)
    alphabets = list(np.random.default_rng(0).permutation(ds.groups))
    test_names, train_names = alphabets[:test_alphabets], alphabets[test_alphabets:]
    groups = np.asarray(ds.class_groups)
    train = ds.subset_classes(np.flatnonzero(np.isin(groups, train_names)))
    test = ds.subset_classes(np.flatnonzero(np.isin(groups, test_names)))
    return train, test, train_names, test_names
