"""Helpers shared by several test modules (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from metaml import runs
from metaml.algorithms.gbml import ANIL, MAML, MetaSGD
from metaml.cli import main
from metaml.config import load_config
from metaml.tasks import TaskBatch

if TYPE_CHECKING:
    from metaml.automl.knowledge import MetaKnowledge


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``metaml ARGS`` in-process; return (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def synthetic_images(num_classes: int = 20, per_class: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Each class a random 6x6 pattern, each example the pattern plus noise."""
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(num_classes), per_class)
    patterns = rng.integers(0, 256, size=(num_classes, 1, 6, 6))
    noisy = patterns[targets] + rng.normal(0, 25, size=(len(targets), 1, 6, 6))
    return np.clip(noisy, 0, 255).astype(np.uint8), targets


def train_synthetic(root: Path, overrides: list[str]) -> Path:
    images, labels = synthetic_images()
    np.savez(root / "data.npz", images=images, labels=labels)
    cfg = load_config(
        None,
        [
            f"data.dataset=npz:{root / 'data.npz'}",
            "data.split_by=class",
            "data.ways=3",
            "data.shots=2",
            "data.queries=3",
            "data.meta_batch_size=2",
            "model.backbone=mlp",
            "model.backbone_options={hidden: [16]}",
            "train.steps=4",
            "train.val_every=2",
            "train.val_tasks=3",
            "train.checkpoint_every=2",
            "device=cpu",
            *overrides,
        ],
    )
    return runs.train(cfg, root / "run", quiet=True)


def four_kinds_knowledge(seed: int = 0) -> MetaKnowledge:
    """Four hidden kinds (14, 12, 10, 8 datasets; meta-features are noise): kind k's best is
    candidate 2 + k, and the three probes 0, 1, 6 are ordered differently on each kind."""
    from metaml.automl.knowledge import MetaKnowledge, candidate_configurations

    cands = candidate_configurations(8)
    rng = np.random.default_rng(seed)
    kind = np.repeat(np.arange(4), [14, 12, 10, 8])
    probes = {0: (0.8, 0.75, 0.7), 1: (0.75, 0.8, 0.7), 2: (0.75, 0.7, 0.8), 3: (0.7, 0.75, 0.8)}
    scores = 0.6 + 0.05 * rng.random((len(kind), 8))
    for i, k in enumerate(kind):
        scores[i, [0, 1, 6]] = probes[k]
        scores[i, 2 + k] = 0.9
    names = [f"d{i}" for i in range(len(kind))]
    mf = rng.normal(size=(len(kind), 2))
    return MetaKnowledge(names, names, ["f0", "f1"], mf, cands, scores, np.zeros_like(scores), {})


def conv_batch(tasks: int = 3) -> TaskBatch:
    """A float64 5-way batch of random 28x28 images: 1 shot, 2 queries per class."""
    g = torch.Generator().manual_seed(0)
    return TaskBatch(
        torch.randn(tasks, 5, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(5).repeat(tasks, 1),
        torch.randn(tasks, 10, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(5).repeat(tasks, 2),
    )


def meta_gradient(
    learner: torch.nn.Module, batch: TaskBatch
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """``meta_loss`` metrics and the meta-gradient of every trainable parameter (an unused one,
    such as the model's BatchNorm under per_step_bn, counts as 0)."""
    learner.zero_grad()
    loss, metrics = learner.meta_loss(batch)  # type: ignore[operator]
    loss.backward()
    params = [p for p in learner.parameters() if p.requires_grad]
    return metrics, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


#: (learner class, options): the gradient-based variants whose meta-gradients are compared
#: across execution paths (vmap, the per-task loop, task threads).
GRADIENT_LEARNER_CASES = [
    (MAML, {"inner_steps": 2}),
    (MAML, {"inner_steps": 2, "first_order": True}),
    (MAML, {"inner_steps": 2, "per_step_bn": True, "learn_inner_lr": True}),
    (MetaSGD, {"inner_steps": 1}),
    (ANIL, {"inner_steps": 2}),
]
