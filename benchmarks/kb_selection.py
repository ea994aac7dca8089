"""Does biasing meta-training toward the classes nearest the target tasks help?

ProtoNet (conv4, 28x28, no rotations) is meta-trained on Omniglot-small's training alphabets
with the classes of each episode drawn

- ``uniform``: as always;
- ``nearest``: with :func:`metaml.taskrep.nearest_class_weights` toward a target task set made of
  the first example of every class of the held-out test alphabets (class identities only; the
  examples are never trained on), at two temperatures;
- ``hard``: adaptively, by :class:`metaml.taskrep.HardClassTracker` (moving-average error rate of
  each class on the training queries, decay 0.9, weights refreshed every 10 steps).

Each condition runs the library's ``Trainer`` (Adam, lr 0.001, one episode per step; ``hard`` as
``data.task_selection: hard`` does in ``metaml train``: the errors of every training step's
queries, before its update) for ``--steps`` steps from the same initialisation and seed, and is
evaluated
on the same ``--episodes`` 5-way 1-shot episodes of the held-out alphabets; accuracy ± 95% CI and
the paired difference to uniform, for ``--seeds`` training seeds.

Run: flock /tmp/metaml-heavy.lock python -m benchmarks.kb_selection --record
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import OMNIGLOT, append_section, held_out_alphabets, machine
from metaml.algorithms import create_learner
from metaml.algorithms.base import MetaLearner
from metaml.config import TrainConfig, load_config
from metaml.engine import Trainer
from metaml.evaluate import compare, evaluate
from metaml.taskrep import HardClassTracker, nearest_class_weights
from metaml.tasks import EpisodeSampler

CONDITIONS: dict[str, dict[str, float] | None] = {
    "uniform": None,
    "hard": None,
    "nearest (temperature 0.1)": {"temperature": 0.1, "uniform_mix": 0.1},
    "nearest (temperature 0.03)": {"temperature": 0.03, "uniform_mix": 0.1},
}


def fit(
    learner: MetaLearner, sampler: EpisodeSampler, steps: int, tracker: HardClassTracker | None
) -> None:
    """Meta-train with the library's Trainer (Adam 0.001); with a tracker, ``hard`` selection
    refreshes the class weights from the learner's query errors every 10 steps."""
    train = TrainConfig(steps=steps, lr=0.001, log_every=steps, val_every=steps,
                        checkpoint_every=steps, keep_checkpoints=1)  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(learner, sampler, None, train, run_dir, "cpu", quiet=True, tracker=tracker,
                tracker_every=10).fit()  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot", default=OMNIGLOT)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    started = time.process_time()
    train, test, train_names, test_names = held_out_alphabets(args.omniglot)  # as kb_warmstart
    index, _ = test.padded_class_index()
    target_x = test.images[torch.from_numpy(index[:, 0])].float() / 255  # first example per class
    target_y = torch.arange(test.num_classes)
    cfg = load_config(None, ["algorithm.name=protonet", "model.backbone=conv4", "train.lr=0.001"])
    test_sampler = EpisodeSampler(test, ways=5, shots=1, queries=15, seed=1234)
    rows: dict[str, list[Any]] = {c: [] for c in CONDITIONS}
    diffs: dict[str, list[Any]] = {c: [] for c in CONDITIONS if c != "uniform"}
    shares: dict[str, float] = {}
    for seed in range(args.seeds):
        results = {}
        for name, options in CONDITIONS.items():
            weights = None
            if options is not None:
                weights = nearest_class_weights(
                    train, target_x, target_y,
                    temperature=options["temperature"], uniform_mix=options["uniform_mix"],
                )  # fmt: skip
            if weights is not None:
                top = np.argsort(-weights)[: max(1, len(weights) // 10)]
                shares[name] = float(
                    weights[top].sum()
                )  # share of draws on the nearest 10% of classes
            selection = (
                "uniform" if name == "uniform" else ("hard" if name == "hard" else "nearest")
            )
            sampler = EpisodeSampler(train, ways=5, shots=1, queries=15, seed=seed,
                                     task_selection=selection, class_weights=weights)  # fmt: skip
            torch.manual_seed(seed)
            learner = create_learner(cfg, train.shape, "classification", ways=5)
            fit(
                learner,
                sampler,
                args.steps,
                HardClassTracker(sampler.num_classes) if name == "hard" else None,
            )
            if name == "hard":
                p = sampler.class_weights
                assert p is not None
                shares[name] = float(np.sort(p)[::-1][: max(1, len(p) // 10)].sum())
            results[name] = evaluate(learner, test_sampler, args.episodes)
            rows[name].append((results[name].mean * 100, results[name].ci95 * 100))
            print(
                f"seed {seed} {name}: {results[name].summary()} at {time.process_time() - started:.0f} CPU s",
                flush=True,
            )
        for comparison in compare(results):
            if comparison.a == "uniform":
                diffs[comparison.b].append((comparison.mean_diff * 100, comparison.ci95 * 100))
    total = time.process_time() - started
    print(json.dumps({"rows": rows, "diffs": diffs, "shares": shares}), flush=True)
    if args.record:
        append_section("Task selection during meta-training: uniform, nearest, hard",
                       report(args, train_names, test_names, rows, diffs, shares, total))  # fmt: skip


def report(args: Any, train_names: list[str], test_names: list[str], rows: dict[str, list[Any]],
           diffs: dict[str, list[Any]], shares: dict[str, float], total: float) -> str:  # fmt: skip
    seeds = range(args.seeds)
    lines = [
        f"`python -m benchmarks.kb_selection --record`: ProtoNet (conv4, 5-way 1-shot, {args.steps} steps, lr 0.001)",
        f"meta-trained on {', '.join(train_names)}; evaluated on the same {args.episodes} 5-way 1-shot episodes of",
        f"the held-out {', '.join(test_names)}. nearest: classes drawn by `nearest_class_weights` toward one",
        "example of every held-out class (uniform_mix 0.1). hard: HardClassTracker (decay 0.9, uniform_mix 0.1),",
        "weights refreshed every 10 steps from every step's query errors (the Trainer's `data.task_selection: hard`);",
        "its share is at the end of training. Adam, one episode per step. Accuracy in % ± 95% CI; one column per training seed.",
        f"Total CPU time {total:.0f} s. Machine: {machine()}.",
        "",
        "| class selection | share of draws on the nearest 10% of classes | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name, r in rows.items():
        share = f"{shares[name]:.2f}" if name in shares else "0.10"
        lines.append(
            f"| {name} | {share} | " + " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in r) + " |"
        )
    for name, d in diffs.items():
        lines.append(
            f"| {name} − uniform (paired) | | "
            + " | ".join(f"{m:+.2f} ± {c:.2f}" for m, c in d)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
