"""Few-shot accuracy on held-out Omniglot-small alphabets, every method on the same episodes.

Trains (or finishes training) the runs of the given configs, then evaluates each on the same
fixed test episodes (5-way 1-shot, 5-way 5-shot, 20-way 1-shot), adds the nearest-centroid
feature classifier on the first run's backbone, and reports accuracy with 95% CIs and paired
differences against the first method.

Run: python -m benchmarks.omniglot_fewshot --configs protonet,baseline,baselinepp --steps 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import append_section, machine
from metaml import runs
from metaml.algorithms.base import MetaLearner
from metaml.algorithms.features import FeatureClassifier, feature_extractor
from metaml.config import load_config
from metaml.engine import latest_checkpoint
from metaml.evaluate import Result, compare, evaluate

SETTINGS = ((5, 1), (5, 5), (20, 1))


def train_run(config: str, steps: int, out: Path, root: str | None) -> Path:
    """Train (or finish) ``configs/<config>-omniglot.yaml`` for ``steps`` steps."""
    cfg = load_config(
        f"configs/{config}-omniglot.yaml",
        [f"train.steps={steps}"] + ([f"data.root={root}"] if root else []),
    )
    run_dir = out / cfg.name
    started = time.perf_counter()
    if latest_checkpoint(run_dir) is not None:
        runs.resume(run_dir, [f"train.steps={steps}"], quiet=True)
    else:
        runs.train(cfg, run_dir, quiet=True)
    print(f"{cfg.name}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def evaluate_all(
    learners: dict[str, MetaLearner], run_dir: Path, episodes: int
) -> dict[tuple[int, int], dict[str, Result]]:
    """Every learner on the same test episodes of each (ways, shots) setting."""
    cfg = runs.read_config(run_dir)
    table = {}
    for ways, shots in SETTINGS:
        test = runs.build_samplers(cfg, eval_ways=ways, eval_shots=shots).test
        table[(ways, shots)] = {
            name: evaluate(learner, test, episodes) for name, learner in learners.items()
        }
        print(
            f"{ways}-way {shots}-shot: "
            + ", ".join(f"{n} {r.summary()}" for n, r in table[(ways, shots)].items()),
            flush=True,
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="protonet,baseline,baselinepp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--root", default=None, help="folder of the Omniglot zips")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = args.configs.split(",")
    run_dirs = {name: train_run(name, args.steps, args.out, args.root) for name in names}
    learners = {name: runs.load_learner(d, device="cpu") for name, d in run_dirs.items()}
    learners[f"{names[0]} features + centroid"] = FeatureClassifier(
        feature_extractor(learners[names[0]]), "centroid"
    )
    table = evaluate_all(learners, run_dirs[names[0]], args.episodes)
    header = "| setting | " + " | ".join(learners) + " |\n|---|" + "---|" * len(learners)
    lines = [header]
    for (ways, shots), results in table.items():
        lines.append(
            f"| {ways}-way {shots}-shot | "
            + " | ".join(f"{100 * r.mean:.2f} ± {100 * r.ci95:.2f}" for r in results.values())
            + " |"
        )
    diffs = []
    for (ways, shots), results in table.items():
        first = names[0]
        for other in list(results)[1:]:
            d = compare({first: results[first], other: results[other]})[0]
            verdict = "significant" if d.significant else "not significant"
            diffs.append(
                f"| {ways}-way {shots}-shot | {other} − {first} | {100 * d.mean_diff:+.2f} ± {100 * d.ci95:.2f} pp | {verdict} |"
            )
    append_section(
        "Omniglot-small few-shot accuracy (held-out alphabets)",
        f"Each run trained {args.steps} steps from its config in configs/ (conv4, rotations as classes, "
        f"alphabets split 60/15/25 with seed 0); accuracy in % ± 95% CI over the same {args.episodes} test "
        f"episodes for every method. Machine: {machine()}.\n\n"
        + "\n".join(lines)
        + "\n\nPaired differences (same episodes):\n\n| setting | difference | mean ± 95% CI | |\n|---|---|---|---|\n"
        + "\n".join(diffs),
    )


if __name__ == "__main__":
    main()
