"""Episode sampling speed: 5-way 1-shot 15-query Omniglot episodes gathered as float tensors.

Run from the repository root::

    python -m benchmarks.sampling [--root ../shared/data/omniglot] [--episodes 2000] [--runs 7]

It loads ``omniglot-small`` (28x28, from the decoded-data cache after the first load), pins
torch to one thread, draws one warm-up run and then ``--runs`` timed runs of ``--episodes``
episodes each, and reports the median episodes/s with the machine it ran on. The result is
appended as a row of the ``## Sampling`` table in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from metaml.data import ClassDataset, load
from metaml.device import cpu_model
from metaml.io import atomic_write_text
from metaml.tasks import EpisodeSampler

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Sampling"
TABLE_HEADER = (
    "| date | episode | options | episodes/s (median) | runs | cold load s | cached load s "
    "| CPU | cores | torch | threads | load avg |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
INTRO = (
    "Episodes per second drawn by `EpisodeSampler.episode` from `omniglot-small` (28x28,\n"
    "uint8 in memory, gathered as float32), median of timed runs after a warm-up, one torch\n"
    "thread. Load times: `metaml.data.load('omniglot-small')` decoding the zips (cold) and\n"
    "from the decoded-data cache. Run: `python -m benchmarks.sampling`.\n\n"
)


def time_load(root: str | None) -> tuple[ClassDataset, float, float]:
    """Seconds to load omniglot-small cold (decoding the zips) and from the decoded cache."""
    start = time.perf_counter()
    ds = load("omniglot-small", root=root, cache=False)
    cold = time.perf_counter() - start
    load("omniglot-small", root=root)  # make sure the cache is filled
    start = time.perf_counter()
    ds = load("omniglot-small", root=root)
    cached = time.perf_counter() - start
    assert isinstance(ds, ClassDataset)
    return ds, cold, cached


def episodes_per_second(sampler: EpisodeSampler, episodes: int, runs: int) -> list[float]:
    """Rates of ``runs`` timed runs of ``episodes`` episodes each, after one warm-up run.

    Episodes are dropped as soon as they are drawn, as a training loop does, so the timing
    measures sampling, not memory growth.
    """
    rates = []
    for run in range(runs + 1):
        first = run * episodes
        start = time.perf_counter()
        for i in range(first, first + episodes):
            sampler.episode(i)
        elapsed = time.perf_counter() - start
        if run > 0:  # run 0 is the warm-up
            rates.append(episodes / elapsed)
    return rates


def append_row(row: str) -> None:
    """Add ``row`` to the end of the ``## Sampling`` table, creating the file or section."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{INTRO}{TABLE_HEADER}{row}\n"
    else:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt == -1 else nxt + 1
        section = text[start:end].rstrip("\n") + f"\n{row}\n"
        text = text[:start] + section + ("\n" + text[end:] if nxt != -1 else "")
    atomic_write_text(RESULTS, text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print, and record the sampling speed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding the Omniglot zips")
    parser.add_argument("--episodes", type=int, default=2000, help="episodes per timed run")
    parser.add_argument("--runs", type=int, default=7, help="timed runs (median reported)")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    ds, cold, cached = time_load(args.root)
    results = {}
    for label, extras in [("plain", False), ("rotations+within_group", True)]:
        sampler = EpisodeSampler(
            ds, ways=5, shots=1, queries=15, seed=0, rotations=extras, within_group=extras
        )
        rates = episodes_per_second(sampler, args.episodes, args.runs)
        results[label] = rates
        print(
            f"5-way 1-shot 15-query, {label}: median {statistics.median(rates):.0f} episodes/s "
            f"(min {min(rates):.0f}, max {max(rates):.0f}, {args.runs} runs x {args.episodes})"
        )
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cold_load_s": cold,
        "cached_load_s": cached,
        # Other processes on the machine slow the run down; the 1-minute load says how much.
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }
    print(f"omniglot-small load: cold {cold:.2f} s, cached {cached:.3f} s")
    cpu, cores, threads = info["cpu"], info["cores"], info["threads"]
    print(f"machine: {cpu}, {cores} cores, torch {torch.__version__}, threads {threads}")
    print(f"1-minute load average during the run: {info['load_avg']:.1f}")
    if not args.no_record:
        date = datetime.now(UTC).strftime("%Y-%m-%d")
        for label, rates in results.items():
            append_row(
                f"| {date} | 5-way 1-shot 15-query | {label} | {statistics.median(rates):.0f} | "
                f"{args.runs} x {args.episodes} | {cold:.2f} | {cached:.3f} | {info['cpu']} | "
                f"{info['cores']} | {info['torch']} | {info['threads']} | {info['load_avg']:.1f} |"
            )
        print(f"recorded in {RESULTS}")
    return {"rates": results, **info}


if __name__ == "__main__":
    main()
