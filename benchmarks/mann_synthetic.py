"""Does MANN leave its plateau? A cheap check on synthetic episodes, before hours on Omniglot.

Each episode draws 5 new classes, each a random Gaussian prototype in 400 dimensions (the size
of a 20x20 image), and shows 10 noisy instances of each (prototype + 0.5 x standard normal
noise) in a shuffled 50-step sequence, the label one step late, as in Santoro et al. (2016).
Classes never repeat across episodes, so a prediction above chance after the first instance
can only come from binding images to labels in memory within the episode. The task is easier
than Omniglot (no within-class shape variation to learn), so a variant that does not leave the
plateau here will not on Omniglot either.

It trains each variant of the paper's network (controller 200, memory 128 x 40, 4 heads,
Adam 1e-3, batch 16, gradient clip 10, one torch thread) for ``--iterations`` batches and
prints the accuracy by instance (mean over the last 100 batches) every 100 batches.

Run: ``python -m benchmarks.mann_synthetic [--iterations 1500] [--variants paper,key_strength]
[--record]`` (``--record`` appends the table to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import append_section, machine
from metaml.algorithms.mann import MANN, accuracy_by_instance

VARIANTS = {"paper": {}, "key_strength": {"key_strength": True}}
WAYS, INSTANCES, DIM, NOISE, BATCH = 5, 10, 400, 0.5, 16
REPORTED = (1, 2, 5, 10)  # instances shown in the table


def synthetic_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``x (B, 50, 400)`` and labels ``y (B, 50)`` of new Gaussian classes.

    Example:
        >>> x, y = synthetic_batch(torch.Generator().manual_seed(0))
        >>> tuple(x.shape), sorted(y[0].tolist()) == sorted(list(range(5)) * 10)
        ((16, 50, 400), True)
    """
    prototypes = torch.randn(BATCH, WAYS, DIM, generator=generator)
    labels = torch.arange(WAYS).repeat(INSTANCES)
    y = torch.stack(
        [labels[torch.randperm(len(labels), generator=generator)] for _ in range(BATCH)]
    )
    x = prototypes.gather(1, y[..., None].expand(-1, -1, DIM))
    return x + NOISE * torch.randn(x.shape, generator=generator), y


def train_variant(options: dict[str, bool], iterations: int, seed: int) -> list[torch.Tensor]:
    """Train one variant; the accuracy by instance ``(10,)`` of every batch, in order."""
    torch.manual_seed(seed)
    net = MANN(ways=WAYS, input_shape=(DIM,), **options)  # the paper's sizes by default
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    history, started = [], time.perf_counter()
    for iteration in range(1, iterations + 1):
        x, y = synthetic_batch(generator)
        logits, _ = net(x, y)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
        history.append(accuracy_by_instance(logits.detach(), y).nanmean(0))
        if iteration % 100 == 0:
            recent = torch.stack(history[-100:]).mean(0)
            shown = " ".join(f"{k}:{recent[k - 1]:.2f}" for k in REPORTED)
            print(f"  {iteration:5d} {time.perf_counter() - started:6.0f}s  {shown}", flush=True)
    return history


def first_crossing(history: list[torch.Tensor], instance: int, level: float) -> int | None:
    """The first batch (a multiple of 100) whose last-100 mean at ``instance`` exceeds ``level``."""
    for end in range(100, len(history) + 1, 100):
        if torch.stack(history[end - 100 : end]).mean(0)[instance - 1] > level:
            return end
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--variants", default="paper,key_strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.variants.split(","):
        print(f"{name}:", flush=True)
        started = time.process_time()
        history = train_variant(VARIANTS[name], args.iterations, args.seed)
        final = torch.stack(history[-100:]).mean(0) * 100
        crossing = first_crossing(history, 5, 0.5)
        cells = " | ".join(f"{final[k - 1]:.1f}" for k in REPORTED)
        rows.append(
            f"| {name} | {args.iterations} | {(time.process_time() - started) / 60:.1f} | "
            f"{cells} | {crossing or 'not reached'} |"
        )
    table = "\n".join(
        [
            "| variant | batches of 16 | CPU min | 1st | 2nd | 5th | 10th | 5th > 50% at batch |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.record:
        append_section(
            "MANN on synthetic episodes",
            "Accuracy (%) by instance, mean over the last 100 training batches, of MANN variants "
            "on synthetic episodes (5 new Gaussian classes per episode, 400 dimensions, noise "
            f"0.5, 10 instances each; seed {args.seed}). Chance after the 1st instance is 20%. "
            f"Machine: {machine()}. Run: `python -m benchmarks.mann_synthetic "
            f"--iterations {args.iterations} --variants {args.variants}`.\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
