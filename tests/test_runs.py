"""Runs: a trained run loads and predicts without its training data (model.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metaml import runs
from metaml.config import load_config
from metaml.predict import predict_folder


def _npz_dataset(path: Path, classes: int = 8, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (classes * per_class, 16, 16), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    np.savez(path, images=images, labels=labels)
    return path


def test_run_loads_and_predicts_after_its_data_is_gone(tmp_path: Path) -> None:
    data = _npz_dataset(tmp_path / "toy.npz")
    cfg = load_config(
        None,
        [f"data.dataset=npz:{data}", "data.split_by=class", "data.split_fractions=[0.5, 0.25, 0.25]",
         "data.ways=2", "data.shots=1", "data.queries=2", "model.backbone=conv4", "algorithm.name=protonet",
         "train.steps=2", "train.val_every=2", "train.val_tasks=2", "train.checkpoint_every=2"],
    )  # fmt: skip
    run_dir = runs.train(cfg, tmp_path / "run", quiet=True)
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["input_shape"] == [1, 16, 16] and spec["task_type"] == "classification"
    assert spec["preprocess"]["image_size"] == [16, 16] and spec["preprocess"]["channels"] == 1
    before = runs.load_learner(run_dir, device="cpu")
    data.unlink()
    after = runs.load_learner(run_dir, device="cpu")
    for (name, a), (_, b) in zip(
        before.state_dict().items(), after.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for folder, count in (("support/a", 1), ("support/b", 1), ("query", 3)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((20, 20), 60 * i, dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png"
            )
    predictions = predict_folder(run_dir, tmp_path / "support", tmp_path / "query", device="cpu")
    assert [p.file for p in predictions] == ["0.png", "1.png", "2.png"]
    assert all(p.label in ("a", "b") and 0.5 <= p.probability <= 1.0 for p in predictions)


def test_train_queries_shape_only_the_training_episodes(tmp_path: Path) -> None:
    data = _npz_dataset(tmp_path / "d.npz", classes=12, per_class=8)
    cfg = load_config(
        None,
        [
            f"data.dataset=npz:{data}",
            "data.split_by=class",
            "data.split_fractions=[0.5, 0.25, 0.25]",
            "data.ways=2",
            "data.queries=5",
            "data.train_queries=2",
        ],
    )
    samplers = runs.build_samplers(cfg)
    assert samplers.train.episode(0).query_x.shape[0] == 2 * 2
    assert samplers.val.episode(0).query_x.shape[0] == 2 * 5
    assert samplers.test.episode(0).query_x.shape[0] == 2 * 5


def test_low_memory_and_compile_reach_the_learner_from_the_config() -> None:
    from metaml.algorithms import create_learner

    cfg = load_config(
        None, ["algorithm.name=maml", "algorithm.low_memory=true", "algorithm.compile=true"]
    )
    learner = create_learner(cfg, (1,), "regression", ways=1)
    assert learner.low_memory is True and learner.use_compile is True  # type: ignore[attr-defined]
    default = create_learner(load_config(None, ["algorithm.name=anil"]), (1,), "regression", ways=1)
    assert default.low_memory is False and default.use_compile is False  # type: ignore[attr-defined]
