"""MAML, FOMAML, Meta-SGD and ANIL against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaml.algorithms.gbml import ANIL, FOMAML, MAML, GradientBasedLearner, MetaSGD
from metaml.errors import UserError
from metaml.nn import create_backbone
from metaml.tasks import TaskBatch


def _regression_batch(tasks: int = 3, n: int = 6, dim: int = 2, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(tasks, n, d, generator=g, dtype=torch.float64) for d in (dim, 1, dim, 1)]
    return TaskBatch(*t)


def _tiny_bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1)).double()


def _tiny_bn_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def _meta_gradient(learner: GradientBasedLearner, batch: TaskBatch) -> list[torch.Tensor]:
    learner.zero_grad()
    learner.meta_loss(batch)[0].backward()
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.parameters()
    ]


def _finite_differences(
    learner: GradientBasedLearner, batch: TaskBatch, eps: float = 1e-6
) -> list[torch.Tensor]:
    grads = []
    for p in learner.parameters():
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = learner.meta_loss(batch)[0].item()
                p.view(-1)[i] -= 2 * eps
                down = learner.meta_loss(batch)[0].item()
                p.view(-1)[i] += eps
            g.view(-1)[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maml_meta_gradient_with_batchnorm_equals_finite_differences(steps: int) -> None:
    learner = MAML(
        _tiny_bn_mlp(), task_type="regression", inner_lr=0.3, inner_steps=steps, vectorize="loop"
    )
    batch = _regression_batch()
    for a, b in zip(
        _meta_gradient(learner, batch), _finite_differences(learner, batch), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_maml_conv_batchnorm_classification_equals_finite_differences() -> None:
    learner = MAML(_tiny_bn_conv(), inner_lr=0.5, inner_steps=2, vectorize="vmap")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=torch.float64)
    q = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 2)
    batch = TaskBatch(x, y, q, y)
    got = _meta_gradient(learner, batch)  # vectorized
    learner.chooser.choice = "loop"  # finite differences are faster without vmap's overhead
    for a, b in zip(got, _finite_differences(learner, batch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_fomaml_equals_hand_written_first_order_gradient() -> None:
    model = _tiny_bn_mlp()
    learner = FOMAML(model, task_type="regression", inner_lr=0.3, inner_steps=2, vectorize="vmap")
    batch = _regression_batch()
    got = _meta_gradient(learner, batch)
    # by hand: plain autograd SGD steps on detached copies, then the query gradient at φ
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(batch)):
        phi = [p.detach().clone().requires_grad_() for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        for _ in range(2):
            loss = F.mse_loss(
                functional_call(model, dict(zip(names, phi, strict=True)), (batch.support_x[i],)),
                batch.support_y[i],
            )
            grads = torch.autograd.grad(loss, phi)
            phi = [(p - 0.3 * g).detach().requires_grad_() for p, g in zip(phi, grads, strict=True)]
        loss = F.mse_loss(
            functional_call(model, dict(zip(names, phi, strict=True)), (batch.query_x[i],)),
            batch.query_y[i],
        )
        for e, g in zip(expected, torch.autograd.grad(loss, phi), strict=True):
            e += g / len(batch)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="first-order"):
        FOMAML(_tiny_bn_mlp(), first_order=False)


CONFIGS = [
    (MAML, {}),
    (MAML, {"learn_inner_lr": True, "per_step_bn": True}),
    (MAML, {"first_order": True}),
    (MetaSGD, {}),
    (ANIL, {}),
]


@pytest.mark.parametrize(("cls", "options"), CONFIGS)
def test_vmap_and_loop_give_the_same_meta_gradients(
    cls: type[GradientBasedLearner], options: dict
) -> None:
    # float64: the loop's conv4 passes run channels-last, vmap's in the default layout, and
    # their kernels round float32 differently (~1e-4 relative on a few elements).
    torch.manual_seed(0)
    model = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=3, hidden=4).double()
    batch = TaskBatch(
        torch.randn(2, 3, 1, 28, 28, dtype=torch.float64),
        torch.arange(3).repeat(2, 1),
        torch.randn(2, 6, 1, 28, 28, dtype=torch.float64),
        torch.arange(3).repeat(2, 2),
    )
    learner = cls(model, inner_lr=0.3, inner_steps=2, vectorize="loop", **options).double()
    loop = _meta_gradient(learner, batch)
    learner.chooser.choice = "vmap"
    vmapped = _meta_gradient(learner, batch)
    assert len(loop) == len(list(learner.parameters()))
    for a, b in zip(vmapped, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_metasgd_rates_are_elementwise_and_get_gradients() -> None:
    learner = MetaSGD(_tiny_bn_mlp(), task_type="regression", inner_lr=0.25, inner_steps=2).double()
    assert learner.inner_lrs["0__weight"].shape == (1, 3, 2)
    assert torch.all(learner.inner_lrs["0__weight"] == 0.25)
    learner.meta_loss(_regression_batch())[0].backward()
    for name, rate in learner.inner_lrs.items():
        assert rate.grad is not None and rate.grad.abs().sum() > 0, name
    assert any(p is learner.inner_lrs["0__weight"] for p in learner.parameters())


def test_lslr_has_one_rate_per_step_and_tensor() -> None:
    learner = MAML(_tiny_bn_mlp(), task_type="regression", inner_steps=3, learn_inner_lr=True)
    assert {tuple(r.shape) for r in learner.inner_lrs.values()} == {(3,)}
    learner.double().meta_loss(_regression_batch())[0].backward()
    assert all(r.grad is not None and torch.all(r.grad != 0) for r in learner.inner_lrs.values())


def test_anil_adapts_only_the_head() -> None:
    model = create_backbone("mlp", in_shape=(2,), num_outputs=1, hidden=(5,))
    learner = ANIL(model, task_type="regression", inner_lr=0.5, inner_steps=3)
    sx, sy = torch.randn(6, 2), torch.randn(6, 1)
    adapted = learner.adapted_params(sx, sy)
    for name, p in model.named_parameters():
        same = torch.equal(adapted[name], p)
        assert same != name.startswith("head."), name
    qx = torch.randn(4, 2)
    expected = F.linear(model.forward_features(qx), adapted["head.weight"], adapted["head.bias"])
    torch.testing.assert_close(learner.adapt(sx, sy)(qx), expected)
    with pytest.raises(UserError, match="forward_features"):
        ANIL(nn.Linear(2, 1))


def test_adapt_builds_no_graph_and_works_under_no_grad() -> None:
    learner = MAML(
        create_backbone("mlp"),
        task_type="regression",
        inner_lr=0.1,
        inner_steps=1,
        test_inner_steps=5,
    )
    sx, sy, qx = torch.randn(5, 1), torch.randn(5, 1), torch.randn(3, 1)
    p0 = learner.adapted_params(sx, sy, steps=0)
    p5 = learner.adapted_params(sx, sy)
    assert all(not p.requires_grad for p in p5.values())
    assert not torch.equal(p0["head.weight"], p5["head.weight"])
    predict = learner.adapt(sx, sy)
    with torch.no_grad():
        inside = predict(qx)
    with torch.no_grad():
        predict_built_inside = learner.adapt(sx, sy)
        torch.testing.assert_close(predict_built_inside(qx), inside)
    # the test-time loss goes down on the support set
    before = F.mse_loss(learner.adapt(sx, sy, steps=0)(sx), sy)
    after = F.mse_loss(learner.adapt(sx, sy, steps=20)(sx), sy)
    assert after < before


def test_metrics_and_classification_accuracy() -> None:
    learner = MAML(create_backbone("conv4", num_outputs=5, hidden=4), inner_lr=0.4)
    batch = TaskBatch(
        torch.randn(2, 5, 1, 28, 28),
        torch.arange(5).repeat(2, 1),
        torch.randn(2, 10, 1, 28, 28),
        torch.arange(5).repeat(2, 2),
    )
    loss, metrics = learner.meta_loss(batch)
    assert set(metrics) == {"loss", "acc"} and 0 <= metrics["acc"] <= 1
    assert metrics["loss"] == pytest.approx(loss.item())


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="task_type"):
        MAML(nn.Linear(1, 1), task_type="ranking")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="inner_lr"):
        MAML(nn.Linear(1, 1), inner_lr=0)
    with pytest.raises(UserError, match="per_step_bn"):
        ANIL(create_backbone("mlp"), per_step_bn=True)


def _sinusoid(tasks: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    amp = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=g) * math.pi
    x = torch.rand(tasks, n, 1, generator=g) * 10 - 5
    return x, amp * torch.sin(x - phase)


def _sinusoid_batch(tasks: int, g: torch.Generator, shots: int = 10) -> TaskBatch:
    x, y = _sinusoid(tasks, 2 * shots, g)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def test_maml_learns_sinusoid_regression() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    learner = MAML(
        create_backbone("mlp"),
        task_type="regression",
        inner_lr=0.01,
        inner_steps=1,
        vectorize="vmap",
    )
    test = _sinusoid_batch(50, torch.Generator().manual_seed(99))

    def post_adaptation_mse() -> float:
        with torch.no_grad():
            return learner.meta_loss(test)[1]["mse"]

    before = post_adaptation_mse()
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(250):
        opt.zero_grad()
        learner.meta_loss(_sinusoid_batch(8, g))[0].backward()
        opt.step()
    after = post_adaptation_mse()
    assert after < 0.5 * before, (before, after)  # about 5.3 -> 1.6
