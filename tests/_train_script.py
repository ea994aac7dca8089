"""A tiny learner, sampler and training script for the engine tests.

Imported by ``tests/test_trainer.py`` and ``tests/test_checkpoint.py``; run as a script by the
SIGKILL test::

    python tests/_train_script.py RUN_DIR --kill-at 37 --threads 2

The learner is a one-step MAML on the head of a small MLP with dropout (so training draws random
numbers and a resume must restore the RNG), trained with Adam (so optimizer state matters). The
sampler draws random linear-regression tasks; batch ``i`` is a pure function of ``(seed, i)``.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor
from metaml.config import TrainConfig
from metaml.engine import Trainer
from metaml.tasks import Task, TaskBatch

DIM = 4


class ToySampler:
    """Random linear tasks ``y = x @ w + noise``; ``nan_at``/``kill_at`` sabotage one batch."""

    task_type = "regression"

    def __init__(self, seed: int, meta_batch_size: int = 2, shots: int = 5, queries: int = 10):
        self.seed = seed
        self.meta_batch_size = meta_batch_size
        self.shots = shots
        self.queries = queries
        self.nan_at: int | None = None
        self.kill_at: int | None = None

    def episode(self, index: int) -> Task:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        w = torch.randn(DIM, 1, generator=gen)
        x = torch.randn(self.shots + self.queries, DIM, generator=gen)
        y = x @ w + 0.1 * torch.randn(self.shots + self.queries, 1, generator=gen)
        s = self.shots
        return Task(x[:s], y[:s], x[s:], y[s:])

    def batch(self, index: int) -> TaskBatch:
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash between two checkpoints
        first = index * self.meta_batch_size
        batch = TaskBatch.stack([self.episode(first + j) for j in range(self.meta_batch_size)])
        if index == self.nan_at:
            return TaskBatch(
                batch.support_x, batch.support_y, batch.query_x, batch.query_y * torch.nan
            )
        return batch


class ToyLearner(MetaLearner):
    """MLP features with dropout; one inner SGD step on the linear head; query MSE."""

    task_type = "regression"

    def __init__(self, hidden: int = 16, inner_lr: float = 0.1, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 1)
        self.inner_lr = inner_lr

    def _adapted_head(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        w, b = self.head.weight, self.head.bias
        loss = F.mse_loss(F.linear(features, w, b), targets)
        grad_w, grad_b = torch.autograd.grad(loss, (w, b), create_graph=self.training)
        return w - self.inner_lr * grad_w, b - self.inner_lr * grad_b

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses = []
        for i in range(len(batch)):
            task = batch.task(i)
            w, b = self._adapted_head(self.body(task.support_x), task.support_y)
            losses.append(F.mse_loss(F.linear(self.body(task.query_x), w, b), task.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"mse": loss.item()}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        with torch.enable_grad():
            w, b = self._adapted_head(self.body(support_x), support_y)
        w, b = w.detach(), b.detach()
        return lambda x: F.linear(self.body(x), w, b)


def toy_config(**overrides: object) -> TrainConfig:
    """A 60-step Adam config that logs, validates and checkpoints often."""
    base: dict[str, object] = {
        "steps": 60,
        "optimizer": "adam",
        "lr": 0.01,
        "log_every": 3,
        "val_every": 15,
        "val_tasks": 8,
        "checkpoint_every": 10,
        "keep_checkpoints": 2,
    }
    return TrainConfig.model_validate({**base, **overrides})


def make_trainer(run_dir: Path, config: TrainConfig | None = None, **sabotage: int) -> Trainer:
    """A trainer over a freshly seeded toy learner (the same initial weights every time)."""
    torch.manual_seed(0)
    train = ToySampler(seed=1)
    for name, value in sabotage.items():
        setattr(train, name, value)
    return Trainer(
        ToyLearner(), train, ToySampler(seed=2), config or toy_config(), run_dir, "cpu", quiet=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--kill-at", type=int, default=None, help="SIGKILL itself at this batch index"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kill = {} if args.kill_at is None else {"kill_at": args.kill_at}
    make_trainer(args.run_dir, **kill).fit()


if __name__ == "__main__":
    main()
