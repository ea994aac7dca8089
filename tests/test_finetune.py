"""Baseline / Baseline++: pre-training on global labels, a fresh head fitted on frozen features."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from metaml.algorithms.finetune import Baseline, CosineHead, make_head
from metaml.data import ClassDataset
from metaml.errors import UserError
from metaml.evaluate import evaluate
from metaml.nn import create_backbone
from metaml.nn.backbones import Backbone
from metaml.tasks import EpisodeSampler, TaskBatch


class Linear(Backbone):
    """``forward_features(x) = W x.flatten() + b``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.num_features = out_features
        self.reset_head(0)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


pytestmark = pytest.mark.usefixtures("one_thread")


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"


# -- pre-training loss --------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_meta_loss_is_cross_entropy_on_global_classes(head: str) -> None:
    g = torch.Generator().manual_seed(0)
    net = Baseline(Linear(4, 3), num_classes=7, head=head)  # type: ignore[arg-type]
    tasks, ways, shots, queries = 2, 3, 2, 2
    support_y = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])  # any order
    query_y = torch.tensor([[2, 1, 0, 0, 1, 2], [0, 0, 1, 1, 2, 2]])
    classes = torch.tensor([[6, 2, 4], [1, 5, 3]])  # task label -> dataset class
    batch = TaskBatch(
        torch.randn(tasks, ways * shots, 4, generator=g),
        support_y,
        torch.randn(tasks, ways * queries, 4, generator=g),
        query_y,
        classes=classes,
    )
    w = net.backbone.linear.weight.detach().double()
    b = net.backbone.linear.bias.detach().double()
    losses, correct = [], 0
    for t in range(tasks):
        for x_set, y_set in ((batch.support_x, support_y), (batch.query_x, query_y)):
            for x, y in zip(x_set[t], y_set[t].tolist(), strict=True):
                feature = w @ x.double() + b
                if head == "linear":
                    cw = net.classifier.weight.detach().double()
                    logits = (cw @ feature + net.classifier.bias.detach().double()).tolist()
                else:
                    cw = net.classifier.weight.detach().double()
                    logits = [
                        10.0 * float(feature @ cw[c] / (feature.norm() * cw[c].norm()))
                        for c in range(7)
                    ]
                target = int(classes[t, y])
                losses.append(math.log(sum(math.exp(v) for v in logits)) - logits[target])
                correct += int(int(np.argmax(logits)) == target)
    loss, metrics = net.meta_loss(batch)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert metrics["acc"] == pytest.approx(correct / len(losses))


def test_meta_loss_needs_class_labels() -> None:
    net = Baseline(Linear(2, 2), num_classes=3)
    batch = TaskBatch(
        torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2)
    )
    with pytest.raises(UserError, match="class"):
        net.meta_loss(batch)


def test_cosine_head_is_scaled_cosine_similarity() -> None:
    head = CosineHead(3, 2)
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]])
    w = head.weight.detach()
    expected = [[10.0 * float(xi @ wc) / float(xi.norm() * wc.norm()) for wc in w] for xi in x]
    torch.testing.assert_close(head(x).detach(), torch.tensor(expected))
    assert isinstance(make_head("linear", 3, 2), nn.Linear)
    assert isinstance(make_head("cosine", 3, 2), CosineHead)


# -- adaptation ---------------------------------------------------------------------------------


def task(seed: int = 0, ways: int = 3, shots: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ways, 1, 28, 28, generator=g)
    support_y = torch.arange(ways).repeat_interleave(shots)
    support_x = centers[support_y] + 0.3 * torch.randn(len(support_y), 1, 28, 28, generator=g)
    query_x = centers.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * ways, 1, 28, 28, generator=g)
    return support_x, support_y, query_x


@pytest.mark.parametrize("finetune_all", [False, True])
def test_adapt_never_changes_the_model(finetune_all: bool) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=0, hidden=8)
    net = Baseline(backbone, num_classes=10, finetune_steps=10, finetune_all=finetune_all)
    net.train()  # BatchNorm running statistics must not move either
    before = state(net)
    support_x, support_y, query_x = task()
    predict = net.adapt(support_x, support_y)
    with torch.no_grad():
        logits = predict(query_x)
    assert logits.shape == (6, 3)
    assert_same_state(before, net)
    assert net.training and net.backbone.training
    assert all(p.grad is None for p in net.parameters())


def test_finetune_all_tunes_a_copy_of_the_backbone() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=0, hidden=8)
    frozen = Baseline(backbone, num_classes=10, finetune_steps=10, finetune_lr=0.05)
    tuned = Baseline(copy.deepcopy(backbone), num_classes=10, finetune_steps=10,
                     finetune_lr=0.05, finetune_all=True)  # fmt: skip
    support_x, support_y, query_x = task()
    with torch.no_grad():
        a = frozen.adapt(support_x, support_y)(query_x)
        b = tuned.adapt(support_x, support_y)(query_x)
    assert not torch.allclose(a, b)  # the backbone did move, on its copy


@pytest.mark.parametrize("finetune_all", [False, True])
def test_adapt_is_deterministic_and_leaves_the_global_rng_alone(finetune_all: bool) -> None:
    torch.manual_seed(0)
    net = Baseline(Linear(28 * 28, 8), num_classes=5, finetune_steps=20, finetune_all=finetune_all)
    support_x, support_y, query_x = task()
    rng = torch.get_rng_state()
    with torch.no_grad():
        first = net.adapt(support_x, support_y)(query_x)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # a different global stream changes nothing
    with torch.no_grad():
        second = net.adapt(support_x, support_y)(query_x)
    assert torch.equal(first, second)


def test_adapt_fits_the_support_set_and_the_head_kind_matters() -> None:
    torch.manual_seed(0)
    backbone = Linear(28 * 28, 16)
    support_x, support_y, _ = task(ways=4, shots=3)
    for head in ("linear", "cosine"):
        net = Baseline(backbone, num_classes=5, head=head, finetune_steps=100)  # type: ignore[arg-type]
        with torch.no_grad():
            logits = net.adapt(support_x, support_y)(support_x)
            untrained = net.adapt(support_x, support_y, steps=0)(support_x)
        assert (logits.argmax(-1) == support_y).all(), head
        assert not torch.allclose(logits, untrained)
        if head == "cosine":
            assert logits.abs().max() <= 10.0 + 1e-4  # scale * cosine


def test_cosine_head_ignores_the_feature_scale_and_linear_does_not() -> None:
    # Baseline++ classifies by direction only: doubling every feature changes nothing,
    # step by step, while Baseline's linear head sees different inputs.
    torch.manual_seed(0)
    backbone = Linear(28 * 28, 8)
    doubled = copy.deepcopy(backbone)
    with torch.no_grad():
        doubled.linear.weight.mul_(2)
        doubled.linear.bias.mul_(2)
    support_x, support_y, query_x = task()
    out = {}
    for head in ("linear", "cosine"):
        for name, b in (("x1", backbone), ("x2", doubled)):
            net = Baseline(b, num_classes=5, head=head, finetune_steps=20)  # type: ignore[arg-type]
            with torch.no_grad():
                out[head, name] = net.adapt(support_x, support_y)(query_x)
    torch.testing.assert_close(out["cosine", "x1"], out["cosine", "x2"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["linear", "x1"], out["linear", "x2"], atol=1e-3)


# -- learning -----------------------------------------------------------------------------------


def noisy_codes(num_classes: int = 20, per_class: int = 20, seed: int = 0) -> ClassDataset:
    """Each class is a random +-1 code on the first 16 of 64 pixels; the rest is loud noise."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, size=(num_classes, 16)) * 2 - 1
    targets = np.repeat(np.arange(num_classes), per_class)
    images = rng.normal(128, 80, size=(len(targets), 64))
    images[:, :16] = 128 + 60 * codes[targets] + rng.normal(0, 20, size=(len(targets), 16))
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    return ClassDataset(torch.from_numpy(images), torch.from_numpy(targets),
                        [f"c{c:02d}" for c in range(num_classes)])  # fmt: skip


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_pretraining_then_adapting_beats_chance_on_held_out_classes(head: str) -> None:
    torch.manual_seed(0)
    train, _, test = noisy_codes().split("class", (0.6, 0.1, 0.3), seed=0)
    train_sampler = EpisodeSampler(train, ways=5, shots=1, queries=5, meta_batch_size=4, seed=0)
    test_sampler = EpisodeSampler(test, ways=5, shots=1, queries=5, seed=1)
    backbone = create_backbone("mlp", in_shape=(1, 8, 8), num_outputs=0, hidden=(32,))
    net = Baseline(backbone, num_classes=train_sampler.num_classes, head=head,  # type: ignore[arg-type]
                   finetune_steps=30, finetune_lr=0.1)  # fmt: skip
    before = evaluate(net, test_sampler, episodes=30).mean
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(150):
        loss, _ = net.meta_loss(train_sampler.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(net, test_sampler, episodes=30).mean
    # chance is 0.2; measured: linear 0.31 -> 0.78, cosine 0.23 -> 0.59
    assert before < 0.4
    assert after > 0.45 and after > before + 0.2
