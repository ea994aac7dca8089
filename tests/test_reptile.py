"""Reptile against the hand-computed interpolation θ + ε(mean φ − θ)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaml.algorithms.reptile import Reptile
from metaml.errors import UserError
from metaml.nn import create_backbone
from metaml.tasks import TaskBatch


def _batch(tasks: int = 3, n: int = 6, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        *(torch.randn(tasks, n, d, generator=g, dtype=torch.float64) for d in (2, 1, 2, 1))
    )


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1).double()


def test_sgd_update_equals_hand_computed_interpolation() -> None:
    model, lr, steps, eps = _linear(), 0.1, 3, 0.5
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    batch = _batch()
    # φ by hand: MSE loss (1/n)Σ(xw^T + b − y)^2 has gradients (2/n) r^T x and (2/n) Σ r
    phis = []
    for i in range(len(batch)):
        w, b = w0.clone(), b0.clone()
        x, y = batch.support_x[i], batch.support_y[i]
        for _ in range(steps):
            r = x @ w.T + b - y  # (n, 1)
            w, b = w - lr * 2 * r.T @ x / len(x), b - lr * 2 * r.sum(0) / len(x)
        phis.append((w, b))
    mean_w = torch.stack([p[0] for p in phis]).mean(0)
    mean_b = torch.stack([p[1] for p in phis]).mean(0)

    learner = Reptile(
        model, task_type="regression", inner_lr=lr, inner_steps=steps, inner_optimizer="sgd"
    )
    opt = torch.optim.SGD(learner.parameters(), lr=eps)
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 + eps * (mean_w - w0))
    torch.testing.assert_close(model.bias.detach(), b0 + eps * (mean_b - b0))
    # the loss value is the query MSE at the adapted weights
    query = torch.stack(
        [
            ((batch.query_x[i] @ w.T + b - batch.query_y[i]) ** 2).mean()
            for i, (w, b) in enumerate(phis)
        ]
    )
    assert metrics["loss"] == pytest.approx(query.mean().item())
    assert loss.item() == pytest.approx(query.mean().item())


def test_adam_inner_loop_matches_torch_adam_with_beta1_zero() -> None:
    model = _linear()
    learner = Reptile(
        model, task_type="regression", inner_lr=0.05, inner_steps=4, inner_optimizer="adam"
    )
    sx, sy, qx = (
        torch.randn(6, 2, dtype=torch.float64),
        torch.randn(6, 1, dtype=torch.float64),
        torch.randn(3, 2, dtype=torch.float64),
    )
    twin = _linear()
    opt = torch.optim.Adam(twin.parameters(), lr=0.05, betas=(0.0, 0.999))
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(sx), sy).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(learner.adapt(sx, sy)(qx), twin(qx))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_equals_serial(optimizer: str) -> None:
    torch.manual_seed(0)
    # A conv bias right before BatchNorm has a zero gradient up to rounding noise, which Adam
    # would blow up to ±lr; so the Adam case runs without BatchNorm.
    norm = "batch" if optimizer == "sgd" else "none"
    model = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=3, hidden=4, norm=norm)
    batch = TaskBatch(
        torch.randn(2, 6, 1, 28, 28),
        torch.arange(3).repeat(2, 2),
        torch.randn(2, 6, 1, 28, 28),
        torch.arange(3).repeat(2, 2),
    )
    learner = Reptile(
        model, inner_lr=0.01, inner_steps=3, inner_optimizer=optimizer, inner_batch_size=3
    )
    grads = {}
    for batched in (True, False):
        learner.batched = batched
        learner.zero_grad()
        torch.manual_seed(1)  # the same support minibatches
        learner.meta_loss(batch)[0].backward()
        grads[batched] = [p.grad.clone() for p in learner.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_minibatches_cycle_through_permutations() -> None:
    learner = Reptile(_linear(), task_type="regression", inner_batch_size=4)
    batches = learner._minibatches(10, 5, torch.device("cpu"))
    assert batches is not None and len(batches) == 5
    assert sorted(torch.cat(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))
    assert learner._minibatches(3, 5, torch.device("cpu")) is None  # batch >= support: full batch


def test_adapt_builds_no_graph_and_metrics() -> None:
    learner = Reptile(create_backbone("mlp"), task_type="regression", test_inner_steps=7)
    out = learner.adapt(torch.randn(5, 1), torch.randn(5, 1))(torch.randn(2, 1))
    assert out.shape == (2, 1)
    _, metrics = Reptile(create_backbone("conv4", num_outputs=5, hidden=4)).meta_loss(
        TaskBatch(
            torch.randn(2, 5, 1, 28, 28),
            torch.arange(5).repeat(2, 1),
            torch.randn(2, 5, 1, 28, 28),
            torch.arange(5).repeat(2, 1),
        )
    )
    assert set(metrics) == {"loss", "acc"}


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="inner_optimizer"):
        Reptile(_linear(), inner_optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="inner_steps"):
        Reptile(_linear(), inner_steps=0)
