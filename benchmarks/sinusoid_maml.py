"""Reproduce the MAML paper's sinusoid regression (Finn et al. 2017, section 5.1).

40-40 ReLU MLP, K = 5 and 10 support points, meta-batch 25, inner lr 0.01, one inner step in
training, Adam 1e-3; test on 600 fixed tasks after 0, 1, 5 and 10 adaptation steps, with 95%
CIs, against the same network without meta-training on the same tasks.

Run: python -m benchmarks.sinusoid_maml [--steps 70000] [--episodes 600]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import append_section, machine
from metaml import runs
from metaml.config import load_config
from metaml.engine import latest_checkpoint
from metaml.evaluate import Result, compare, evaluate

PAPER_5_SHOT = {1: 0.67, 5: 0.38, 10: 0.35}
TEST_STEPS = (0, 1, 5, 10)


def train_run(shots: int, steps: int, out: Path) -> Path:
    """Train (or finish training) the K-shot run and return its directory."""
    overrides = [f"name=maml-sinusoid-{shots}shot", f"data.shots={shots}", f"train.steps={steps}"]
    run_dir = out / f"maml-sinusoid-{shots}shot"
    if latest_checkpoint(run_dir) is not None:
        runs.resume(run_dir, [f"train.steps={steps}"], quiet=True)
    else:
        runs.train(load_config("configs/maml-sinusoid.yaml", overrides), run_dir, quiet=True)
    return run_dir


def evaluate_run(run_dir: Path, episodes: int) -> dict[str, dict[int, Result]]:
    """MSE after each number of test steps, for the meta-trained and the untrained network."""
    cfg = runs.read_config(run_dir)
    trained = runs.load_learner(run_dir, checkpoint="last", device="cpu")
    torch.manual_seed(cfg.seed)
    untrained = runs.build_learner(cfg, runs.build_samplers(cfg).train)
    test = runs.build_samplers(cfg).test
    return {
        name: {k: evaluate(learner, test, episodes, steps=k) for k in TEST_STEPS}
        for name, learner in (("MAML", trained), ("no meta-training", untrained))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    rows, figure = [], plt.figure(figsize=(6, 4))
    for shots in (5, 10):
        started = time.perf_counter()
        run_dir = train_run(shots, args.steps, args.out)
        seconds = time.perf_counter() - started
        results = evaluate_run(run_dir, args.episodes)
        for name, by_steps in results.items():
            means = [by_steps[k].mean for k in TEST_STEPS]
            cis = [by_steps[k].ci95 for k in TEST_STEPS]
            plt.errorbar(
                TEST_STEPS, means, yerr=cis, marker="o", capsize=3, label=f"{name}, K={shots}"
            )
            rows.append(
                f"| {shots} | {name} | "
                + " | ".join(f"{m:.3f} ± {c:.3f}" for m, c in zip(means, cis, strict=True))
                + " |"
            )
        diffs = [
            compare({"untrained": results["no meta-training"][k], "maml": results["MAML"][k]})[0]
            for k in TEST_STEPS
        ]
        rows.append(
            f"| {shots} | paired MAML − untrained | "
            + " | ".join(f"{d.mean_diff:+.3f} ± {d.ci95:.3f}" for d in diffs)
            + " |"
        )
        print(f"K={shots}: trained in {seconds:.0f} s; " + "; ".join(rows[-3:]))
    plt.plot(
        list(PAPER_5_SHOT),
        list(PAPER_5_SHOT.values()),
        "k*",
        markersize=10,
        label="MAML paper, K=5",
    )
    plt.xlabel("adaptation steps at test time")
    plt.ylabel(f"test MSE ({args.episodes} tasks, 95% CI)")
    plt.yscale("log")
    plt.legend(fontsize=8)
    plt.title("Sinusoid regression: MSE after adaptation")
    plt.tight_layout()
    figure.savefig(Path(__file__).with_name("sinusoid_maml.png"), dpi=120)
    table = (
        "| K | learner | "
        + " | ".join(f"{k} steps" for k in TEST_STEPS)
        + " |\n|---|---|"
        + "---|" * len(TEST_STEPS)
        + "\n"
        + "\n".join(rows)
    )
    append_section(
        "MAML sinusoid (paper setting)",
        f"{args.steps} meta-training steps per run, {args.episodes} test tasks, test MSE ± 95% CI. "
        f"Paper (K=5): 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps. Machine: {machine()}.\n\n{table}\n\n"
        "![curve](sinusoid_maml.png)",
    )


if __name__ == "__main__":
    main()
