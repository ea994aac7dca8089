"""MAML's meta-gradients against the `higher` library (test-only dependency)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from metaml.algorithms.gbml import MAML
from metaml.nn import create_backbone
from metaml.tasks import TaskBatch

higher = pytest.importorskip("higher")


def _higher_meta_gradient(
    model: torch.nn.Module, batch: TaskBatch, lr: float, steps: int
) -> list[torch.Tensor]:
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    model.zero_grad()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        for i in range(len(batch)):
            with higher.innerloop_ctx(
                model, inner, copy_initial_weights=False, track_higher_grads=True
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
                losses.append(F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i]))
    torch.stack(losses).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("steps", "vectorize"), [(1, "vmap"), (2, "vmap"), (2, "loop")])
def test_maml_conv4_matches_higher(steps: int, vectorize: str) -> None:
    torch.manual_seed(0)
    # BatchNorm with batch statistics on both sides (track_running_stats=False)
    model = create_backbone(
        "conv4", in_shape=(1, 28, 28), num_outputs=5, hidden=8, track_running_stats=False
    ).double()
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(
        torch.randn(2, 5, 1, 28, 28, generator=g, dtype=torch.float64),  # 5-way 1-shot
        torch.arange(5).repeat(2, 1),
        torch.randn(2, 10, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(5).repeat(2, 2),
    )
    learner = MAML(model, inner_lr=0.4, inner_steps=steps, vectorize=vectorize)
    learner.zero_grad()
    learner.meta_loss(batch)[0].backward()
    ours = [p.grad.clone() for p in model.parameters()]
    theirs = _higher_meta_gradient(model, batch, 0.4, steps)
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs, strict=True):
        # conv biases before BatchNorm have a zero gradient up to rounding: compare absolutely
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-9 * max(1.0, b.abs().max().item()), msg=name
        )
