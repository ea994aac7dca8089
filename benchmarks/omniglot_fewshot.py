"""Few-shot accuracy on held-out Omniglot-small alphabets, every method on the same episodes.

Trains (or finishes training) the runs of the given configs, then evaluates each on the same
fixed test episodes of every setting (default 5-way 1-shot, 5-way 5-shot, 20-way 1-shot),
optionally adds the nearest-centroid feature classifier on the first run's backbone, and reports
accuracy with 95% CIs, paired differences against the first method, the training cost and a
figure of the training curves.

Run:
    python -m benchmarks.omniglot_fewshot --configs protonet,baseline,baselinepp --steps 1000
    python -m benchmarks.omniglot_fewshot --configs maml,fomaml --steps maml=200,fomaml=500 \
        --settings 5x1,5x5 --no-features --curves benchmarks/gbml_curves.png
    python -m benchmarks.omniglot_fewshot --configs maml,maml@bf16 --settings 5x1 --no-features

``NAME@bf16`` trains ``configs/NAME-omniglot.yaml`` under bf16 autocast
(``train.precision=bf16``) as its own run, ``NAME-omniglot-bf16``: the same seed, tasks and
test episodes as ``NAME``, so the paired difference is the precision's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import append_section, machine
from metaml import runs
from metaml.algorithms.base import MetaLearner
from metaml.algorithms.features import FeatureClassifier, feature_extractor
from metaml.config import load_config
from metaml.engine import latest_checkpoint
from metaml.evaluate import Result, compare, evaluate
from metaml.io import atomic_write_json


def parse_steps(text: str, names: list[str]) -> dict[str, int]:
    """``"500"`` -> 500 steps for every config; ``"maml=200,anil=500"`` -> steps per config."""
    if "=" not in text:
        return {name: int(text) for name in names}
    steps = {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    missing = [n for n in names if n not in steps]
    if missing:
        raise SystemExit(f"--steps names no step count for {', '.join(missing)}")
    return steps


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"5x1,20x1"`` -> [(5, 1), (20, 1)]: (ways, shots) pairs."""
    return [(int(w), int(s)) for w, s in (item.split("x") for item in text.split(","))]


def train_run(
    config: str, steps: int, out: Path, root: str | None, overrides: list[str]
) -> tuple[Path, float]:
    """Train (or finish) ``configs/<config>-omniglot.yaml``; returns the run and its CPU seconds.

    ``config`` may end in ``@bf16``: the same config trained under bf16 autocast, as its own run.
    """
    every = [
        f"train.val_every={max(steps // 5, 1)}",
        f"train.checkpoint_every={max(steps // 5, 1)}",
    ]
    settings = [f"train.steps={steps}", *every, *overrides]
    config, _, precision = config.partition("@")
    path = f"configs/{config}-omniglot.yaml"
    if precision:
        name = load_config(path).name
        settings += [f"train.precision={precision}", f"name={name}-{precision}"]
    cfg = load_config(path, settings + ([f"data.root={root}"] if root else []))
    run_dir = out / cfg.name
    started, cpu = time.perf_counter(), time.process_time()
    if latest_checkpoint(run_dir) is not None:
        runs.resume(run_dir, settings, quiet=True)
    else:
        runs.train(cfg, run_dir, quiet=True)
    cpu_seconds = _recorded_cpu(run_dir, time.process_time() - cpu)
    print(f"{cfg.name}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir, cpu_seconds


def _recorded_cpu(run_dir: Path, spent_now: float) -> float:
    # A resumed run adds this process's CPU time to what earlier processes recorded.
    record = run_dir / "cpu_seconds.json"
    total = spent_now + (json.loads(record.read_text())["cpu_seconds"] if record.exists() else 0.0)
    record.write_text(json.dumps({"cpu_seconds": total}))
    return total


def evaluate_all(
    learners: dict[str, MetaLearner],
    run_dir: Path,
    episodes: int,
    settings: list[tuple[int, int]],
    cache: Path,
) -> dict[tuple[int, int], dict[str, Result]]:
    """Every learner on the same test episodes of each (ways, shots) setting.

    Each result is kept as JSON in ``cache``, so an interrupted benchmark (or one whose methods
    were evaluated in separate processes) does not evaluate a method twice.
    """
    cfg = runs.read_config(run_dir)
    table = {}
    for ways, shots in settings:
        test = runs.build_samplers(cfg, eval_ways=ways, eval_shots=shots).test
        table[(ways, shots)] = {
            name: _cached_evaluate(
                learner, test, episodes, cache / f"{name}-{ways}w{shots}s-{episodes}.json"
            )
            for name, learner in learners.items()
        }
        print(
            f"{ways}-way {shots}-shot: "
            + ", ".join(f"{n} {r.summary()}" for n, r in table[(ways, shots)].items()),
            flush=True,
        )
    return table


def _cached_evaluate(learner: MetaLearner, test: Any, episodes: int, path: Path) -> Result:
    if path.exists():
        return Result(**json.loads(path.read_text()))
    result = evaluate(learner, test, episodes)
    atomic_write_json(path, result.to_dict())
    return result


def plot_curves(run_dirs: dict[str, Path], path: Path) -> None:
    """Training loss and validation accuracy (with its 95% CI) of each run against steps."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run_dir in run_dirs.items():
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_accuracy" in r]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=name, lw=1)
        steps = [r["step"] for r in val]
        acc = torch.tensor([100 * r["val_accuracy"] for r in val])
        ci = torch.tensor([100 * r.get("val_accuracy_ci95", 0.0) for r in val])
        (line,) = val_ax.plot(steps, acc, marker="o", ms=3, label=name)
        val_ax.fill_between(steps, acc - ci, acc + ci, color=line.get_color(), alpha=0.15)
    loss_ax.set(xlabel="meta-training step", ylabel="training loss", title="Training loss")
    val_ax.set(
        xlabel="meta-training step", ylabel="accuracy (%)", title="Validation 5-way accuracy"
    )
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="protonet,baseline,baselinepp")
    parser.add_argument("--steps", default="1000", help="N, or name=N,name=N per config")
    parser.add_argument("--settings", default="5x1,5x5,20x1", help="ways x shots, comma-separated")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--features", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", action="append", default=[], help="override for every config")
    parser.add_argument("--curves", type=Path, default=None, help="write the training curves here")
    parser.add_argument("--title", default="Omniglot-small few-shot accuracy (held-out alphabets)")
    parser.add_argument("--root", default=None, help="folder of the Omniglot zips")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--eval-only", default=None, help="evaluate only these methods (cached)")
    parser.add_argument(
        "--train-only", action="store_true", help="train, evaluate nothing (one process per run)"
    )
    parser.add_argument(
        "--print-only", action="store_true", help="print, do not append to RESULTS.md"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    steps = parse_steps(args.steps, names)
    settings = parse_settings(args.settings)
    trained = {
        name: train_run(
            name, steps[name], args.out, args.root, [f"threads={args.threads}", *args.set]
        )
        for name in names
    }
    run_dirs = {name: run_dir for name, (run_dir, _) in trained.items()}
    if args.train_only:
        return
    if args.curves:
        plot_curves(run_dirs, args.curves)
    learners = {name: runs.load_learner(d, device="cpu") for name, d in run_dirs.items()}
    if args.features:
        learners[f"{names[0]} features + centroid"] = FeatureClassifier(
            feature_extractor(learners[names[0]]), "centroid"
        )
    if args.eval_only:
        learners = {name: learners[name] for name in args.eval_only.split(",")}
    table = evaluate_all(learners, run_dirs[names[0]], args.episodes, settings, args.out / "evals")
    if args.eval_only:
        return
    section = _section(args, names, steps, trained, table)
    if args.print_only:
        print(section)
    else:
        append_section(args.title, section)


def _section(
    args: argparse.Namespace,
    names: list[str],
    steps: dict[str, int],
    trained: dict[str, tuple[Path, float]],
    table: dict[tuple[int, int], dict[str, Result]],
) -> str:
    methods = list(next(iter(table.values())))
    lines = ["| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for (ways, shots), results in table.items():
        lines.append(
            f"| {ways}-way {shots}-shot | "
            + " | ".join(f"{100 * r.mean:.2f} ± {100 * r.ci95:.2f}" for r in results.values())
            + " |"
        )
    cost = [f"| {name} | {steps[name]} | {trained[name][1] / 60:.1f} |" for name in names]
    diffs = []
    for (ways, shots), results in table.items():
        first = names[0]
        for other in list(results)[1:]:
            d = compare({first: results[first], other: results[other]})[0]
            verdict = "significant" if d.significant else "not significant"
            diffs.append(
                f"| {ways}-way {shots}-shot | {other} − {first} | {100 * d.mean_diff:+.2f} ± {100 * d.ci95:.2f} pp | {verdict} |"
            )
    overrides = f" with `{' '.join(args.set)}`" if args.set else ""
    curves = (
        f"\n\nTraining curves: `{args.curves}`.\n\n![curves]({args.curves.name})"
        if args.curves
        else ""
    )
    return (
        f"Each run trained from its config in configs/{overrides} (conv4, rotations as classes, "
        f"alphabets split 60/15/25 with seed 0), {args.threads} torch thread(s); accuracy in % ± 95% CI "
        f"over the same {args.episodes} test episodes for every method. Machine: {machine()}.\n\n"
        + "\n".join(lines)
        + "\n\nTraining cost (process CPU time of training, validation included):\n\n"
        + "| method | steps | CPU minutes |\n|---|---|---|\n"
        + "\n".join(cost)
        + "\n\nPaired differences (same episodes):\n\n| setting | difference | mean ± 95% CI | |\n|---|---|---|---|\n"
        + "\n".join(diffs)
        + curves
    )


if __name__ == "__main__":
    main()
