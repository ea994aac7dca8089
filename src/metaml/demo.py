"""``metaml demo``: the main job on data that needs no download.

Meta-trains MAML on the sinusoid task family (the MAML paper's regression setting), then
evaluates 5-shot adaptation on 600 fixed test tasks against the same network without
meta-training, with 95% confidence intervals and paired differences.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metaml import runs
from metaml.config import RunConfig, config_from_dict
from metaml.evaluate import Result, compare, evaluate
from metaml.io import atomic_write_json

DEMO_STEPS = 3000
TEST_STEPS = (1, 5, 10)


def demo_config(steps: int, device: str) -> RunConfig:
    """The demo's MAML run: the paper's 40-40 ReLU MLP, K=10, meta-batch 25, inner lr 0.01.

    Example:
        >>> demo_config(10, "cpu").data.meta_batch_size
        25
    """
    return config_from_dict(
        {
            "name": "demo-maml-sinusoid",
            "device": device,
            "threads": 1,
            "data": {"dataset": "sinusoid", "shots": 10, "queries": 10, "meta_batch_size": 25},
            "model": {"backbone": "mlp", "backbone_options": {"hidden": [40, 40]}},
            "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
            "train": {
                "steps": steps,
                "lr": 1e-3,
                "val_every": max(steps // 5, 1),
                "val_tasks": 100,
                "checkpoint_every": max(steps // 5, 1),
                "log_every": max(steps // 100, 1),
            },
            "eval": {"episodes": 600},
        }
    )


def run_demo(
    out: Path,
    steps: int | None = None,
    episodes: int = 600,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Result]:
    """Train, evaluate and print the demo table; results are saved to ``out/results.json``.

    Example:
        >>> # run_demo(Path("runs/demo"), steps=200, episodes=100)
    """
    cfg = demo_config(steps or DEMO_STEPS, device)
    run_dir = out / cfg.name
    if (run_dir / "checkpoints").exists():
        runs.resume(run_dir, [f"train.steps={cfg.train.steps}"], quiet=quiet)
    else:
        runs.train(cfg, run_dir, quiet=quiet)
    trained = runs.load_learner(run_dir, checkpoint="last", device=device)
    torch.manual_seed(cfg.seed)
    untrained = runs.build_learner(cfg, runs.build_samplers(cfg).train).to(
        next(trained.parameters()).device
    )
    test = runs.build_samplers(cfg, eval_shots=5).test
    results: dict[str, Result] = {}
    for steps_at_test in TEST_STEPS:
        for label, learner in (("MAML", trained), ("no meta-training", untrained)):
            name = f"{label}, {steps_at_test} step{'s' if steps_at_test > 1 else ''}"
            results[name] = evaluate(
                learner, test, episodes, steps=steps_at_test, progress=not quiet
            )
    _print_table(results, episodes)
    atomic_write_json(
        out / "results.json",
        {k: {"mean": r.mean, "ci95": r.ci95, "episodes": r.episodes} for k, r in results.items()},
    )
    return results


def _print_table(results: dict[str, Result], episodes: int) -> None:
    print(
        f"\nSinusoid regression, 5-shot, {episodes} test tasks (MSE, lower is better; ± is the 95% CI)"
    )
    print(f"{'learner':<34}{'MSE':>10}{'± 95% CI':>12}")
    for name, result in results.items():
        print(f"{name:<34}{result.mean:>10.3f}{result.ci95:>12.3f}")
    print("MAML paper, 5-shot: 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps")
    for steps_at_test in TEST_STEPS:
        suffix = f"{steps_at_test} step{'s' if steps_at_test > 1 else ''}"
        pair = {k: results[k] for k in (f"no meta-training, {suffix}", f"MAML, {suffix}")}
        print("paired: " + compare(pair)[0].summary())
