"""Does the glyph corpus help real handwriting? ProtoNet trained on Omniglot, glyphs, or both.

Three Prototypical Networks with the same budget (conv4, 20-way 1-shot training episodes with
5 queries per class, rotations as classes, Adam 1e-3) are trained on
(a) the Omniglot-small training alphabets, (b) the glyph corpus's training scripts, and
(c) both together, then evaluated on the *same* held-out Omniglot-small alphabets (the test
split every Omniglot benchmark here uses: split by alphabet 60/15/25, seed 0), 20-way and
5-way 1-shot, on the same fixed episodes, with paired differences against (a). The final model
of each run is evaluated (no model selection, so no Omniglot data steers run (b)).

Run: python -m benchmarks.glyph_transfer --root ../shared/data/omniglot --steps 400
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import append_section, machine
from metaml.algorithms.protonet import ProtoNet
from metaml.config import TrainConfig
from metaml.data import ClassDataset, load
from metaml.engine import Trainer
from metaml.evaluate import Result, compare, evaluate
from metaml.nn import create_backbone
from metaml.tasks import EpisodeSampler

SETTINGS = ((20, 1), (5, 1))


def sources(root: str) -> tuple[dict[str, ClassDataset], ClassDataset]:
    """The three training sets and the held-out Omniglot test alphabets."""
    omniglot = load("omniglot-small", root=root)
    assert isinstance(omniglot, ClassDataset)
    omniglot_train, _, omniglot_test = omniglot.split("group", (0.6, 0.15, 0.25), 0)
    glyphs = load("glyphs", split="train")
    assert isinstance(glyphs, ClassDataset)
    both = ClassDataset.concat([omniglot_train, glyphs])
    return {"Omniglot": omniglot_train, "glyphs": glyphs, "both": both}, omniglot_test


def train(name: str, data: ClassDataset, steps: int, out: Path) -> tuple[ProtoNet, float]:
    """A ProtoNet trained ``steps`` steps on ``data``; returns it and its CPU seconds."""
    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("conv4", in_shape=data.shape, num_outputs=0))
    sampler = EpisodeSampler(data, ways=20, shots=1, queries=5, rotations=True, seed=0)
    config = TrainConfig(
        steps=steps, lr=1e-3, log_every=max(steps // 20, 1), checkpoint_every=steps
    )
    started = time.process_time()
    Trainer(learner, sampler, None, config, out / name, device="cpu", quiet=True).fit()
    return learner, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of the Omniglot zips")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/glyph-transfer"))
    parser.add_argument(
        "--print-only", action="store_true", help="print, do not append to RESULTS.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_sets, test = sources(args.root)
    learners, cpu = {}, {}
    for name, data in train_sets.items():
        learners[name], cpu[name] = train(name, data, args.steps, args.out)
        print(f"{name}: {data.num_classes} classes, {cpu[name]:.0f} CPU s", flush=True)
    table: dict[tuple[int, int], dict[str, Result]] = {}
    for ways, shots in SETTINGS:
        sampler = EpisodeSampler(test, ways=ways, shots=shots, queries=15, rotations=True, seed=0)
        table[(ways, shots)] = {
            name: evaluate(learner, sampler, args.episodes) for name, learner in learners.items()
        }
        print(
            f"{ways}-way {shots}-shot: "
            + ", ".join(f"{n} {r.summary()}" for n, r in table[(ways, shots)].items()),
            flush=True,
        )
    section = _section(args, train_sets, cpu, table)
    print(section) if args.print_only else append_section(
        "Glyphs → Omniglot transfer (ProtoNet)", section
    )


def _section(
    args: argparse.Namespace,
    train_sets: dict[str, ClassDataset],
    cpu: dict[str, float],
    table: dict[tuple[int, int], dict[str, Result]],
) -> str:
    names = list(train_sets)
    rows = [
        "| trained on | classes | CPU min | "
        + " | ".join(f"{w}-way {s}-shot" for w, s in table)
        + " |"
    ]
    rows.append("|---|---|---|" + "---|" * len(table))
    for n in names:
        cells = [f"{100 * table[k][n].mean:.2f} ± {100 * table[k][n].ci95:.2f}" for k in table]
        rows.append(
            f"| {n} | {train_sets[n].num_classes} | {cpu[n] / 60:.1f} | " + " | ".join(cells) + " |"
        )
    diffs = ["| setting | difference | mean ± 95% CI | |", "|---|---|---|---|"]
    for (ways, shots), results in table.items():
        for other in names[1:]:
            d = compare({names[0]: results[names[0]], other: results[other]})[0]
            verdict = "significant" if d.significant else "not significant"
            diffs.append(
                f"| {ways}-way {shots}-shot | {other} − {names[0]} | {100 * d.mean_diff:+.2f} ± {100 * d.ci95:.2f} pp | {verdict} |"
            )
    return (
        f"ProtoNet (conv4), {args.steps} training steps of 20-way 1-shot episodes (5 queries, "
        f"rotations) per run; accuracy in % ± 95% CI on the same {args.episodes} episodes of the "
        f"held-out Omniglot-small alphabets (15 queries). Machine: {machine()}.\n\n"
        + "\n".join(rows)
        + "\n\nPaired differences (same episodes):\n\n"
        + "\n".join(diffs)
    )


if __name__ == "__main__":
    main()
