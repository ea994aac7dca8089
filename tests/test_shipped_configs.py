"""Every shipped config trains for two steps and evaluates, on the real data it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaml import runs
from metaml.config import load_config
from metaml.evaluate import evaluate

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# Small episodes keep this a smoke test of each config's pipeline, not a training run.
TINY = [
    "train.steps=2",
    "train.val_every=2",
    "train.val_tasks=2",
    "train.checkpoint_every=2",
    "data.meta_batch_size=2",
    "data.queries=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_and_evaluates(path: Path, tmp_path: Path, omniglot_root: Path) -> None:
    cfg = load_config(path, TINY)
    if cfg.data.dataset.startswith("omniglot"):
        cfg = load_config(path, [*TINY, f"data.root={omniglot_root}"])
    run_dir = runs.train(cfg, tmp_path / cfg.name, quiet=True)
    learner = runs.load_learner(run_dir, device="cpu")
    result = evaluate(learner, runs.build_samplers(cfg).test, episodes=2)
    assert len(result.scores) == 2
    assert (
        all(0.0 <= s <= 1.0 for s in result.scores)
        if result.metric == "accuracy"
        else result.mean >= 0
    )


def test_the_demo_pins_the_execution_mode_so_its_figures_reproduce() -> None:
    from metaml.demo import demo_configs

    maml = [c for c in demo_configs(60, "cpu") if c.algorithm.name == "maml"]
    assert [getattr(c.algorithm, "vectorize", None) for c in maml] == ["loop"]
