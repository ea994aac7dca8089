"""ProtoNet against hand computations (prototypes, distances, loss), and a short learning run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from metaml import runs
from metaml.algorithms.protonet import ProtoNet
from metaml.config import load_config
from metaml.data import ClassDataset
from metaml.evaluate import evaluate
from metaml.nn import create_backbone
from metaml.nn.backbones import Backbone
from metaml.tasks import EpisodeSampler, TaskBatch


class Linear(Backbone):
    """``forward_features(x) = W x.flatten() + b``: embeddings a test can compute by hand."""

    def __init__(self, in_features: int, out_features: int, offset: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        with torch.no_grad():
            self.linear.bias.add_(offset)
        self.num_features = out_features
        self.reset_head(0)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def hand_embed(net: Linear, x: Tensor) -> list[list[float]]:
    """Embeddings in float64 with explicit loops: ``e_j = sum_i W_ji x_i + b_j``."""
    w = net.linear.weight.detach().double().tolist()
    b = net.linear.bias.detach().double().tolist()
    rows = x.flatten(1).double().tolist()
    return [
        [sum(wj[i] * r[i] for i in range(len(r))) + bj for wj, bj in zip(w, b, strict=True)]
        for r in rows
    ]


def hand_logits(
    net: Linear,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    cosine_scale: float | None = None,
) -> Tensor:
    """Prototype = mean support embedding of each class; logits = -squared distance (or cosine)."""
    support = hand_embed(net, support_x)
    queries = hand_embed(net, query_x)
    labels = support_y.tolist()
    prototypes = []
    for c in range(max(labels) + 1):
        members = [e for e, y in zip(support, labels, strict=True) if y == c]
        prototypes.append([sum(col) / len(members) for col in zip(*members, strict=True)])
    out = []
    for q in queries:
        row = []
        for p in prototypes:
            if cosine_scale is None:
                row.append(-sum((qi - pi) ** 2 for qi, pi in zip(q, p, strict=True)))
            else:
                dot = sum(qi * pi for qi, pi in zip(q, p, strict=True))
                norms = math.sqrt(sum(v * v for v in q)) * math.sqrt(sum(v * v for v in p))
                row.append(cosine_scale * dot / norms)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def shuffled_labels(ways: int, shots: int, generator: torch.Generator) -> Tensor:
    """Labels ``0..ways-1`` each ``shots`` times, in a random (not class-major) order."""
    labels = torch.arange(ways).repeat_interleave(shots)
    return labels[torch.randperm(len(labels), generator=generator)]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_adapt_logits_equal_a_hand_computation(distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    # A large offset on every feature, as ReLU features have: squared distances must still be
    # exact (cdist's default matrix-product path loses most digits here).
    net = ProtoNet(Linear(6, 4, offset=30.0), distance=distance)  # type: ignore[arg-type]
    support_y = shuffled_labels(ways=3, shots=4, generator=g)
    assert support_y.tolist() != sorted(support_y.tolist())  # really not class-major
    support_x = torch.randn(12, 6, generator=g)
    query_x = torch.randn(40, 6, generator=g)
    scale = None if distance == "euclidean" else 10.0
    expected = hand_logits(net.backbone, support_x, support_y, query_x, cosine_scale=scale)
    with torch.no_grad():
        got = net.adapt(support_x, support_y)(query_x)
    assert got.shape == (40, 3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_support_order_does_not_change_the_prototypes() -> None:
    g = torch.Generator().manual_seed(1)
    net = ProtoNet(Linear(5, 3))
    support_x = torch.randn(10, 5, generator=g)
    support_y = torch.arange(5).repeat_interleave(2)  # class-major
    query_x = torch.randn(7, 5, generator=g)
    perm = torch.randperm(10, generator=g)
    with torch.no_grad():
        a = net.adapt(support_x, support_y)(query_x)
        b = net.adapt(support_x[perm], support_y[perm])(query_x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_meta_loss_equals_cross_entropy_by_hand(distance: str) -> None:
    g = torch.Generator().manual_seed(2)
    net = ProtoNet(Linear(4, 3, offset=5.0), distance=distance)  # type: ignore[arg-type]
    if net.scale is not None:
        with torch.no_grad():
            net.scale.fill_(3.0)  # not the default, so a forgotten scale shows
    ways, shots, queries, tasks = 3, 2, 4, 2
    support_y = torch.stack([shuffled_labels(ways, shots, g) for _ in range(tasks)])
    query_y = torch.stack([shuffled_labels(ways, queries, g) for _ in range(tasks)])
    batch = TaskBatch(
        torch.randn(tasks, ways * shots, 4, generator=g),
        support_y,
        torch.randn(tasks, ways * queries, 4, generator=g),
        query_y,
    )
    losses, correct = [], 0
    for b in range(tasks):
        logits = hand_logits(
            net.backbone,
            batch.support_x[b],
            batch.support_y[b],
            batch.query_x[b],
            cosine_scale=None if distance == "euclidean" else 3.0,
        ).tolist()
        for row, y in zip(logits, batch.query_y[b].tolist(), strict=True):
            log_norm = math.log(sum(math.exp(v) for v in row))
            losses.append(log_norm - row[y])
            correct += int(max(range(ways), key=lambda c: row[c]) == y)
    loss, metrics = net.meta_loss(batch)
    expected = sum(losses) / len(losses)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["acc"] == pytest.approx(correct / len(losses))
    loss.backward()  # the loss reaches the backbone (and the cosine scale)
    assert net.backbone.linear.weight.grad is not None
    assert net.backbone.linear.weight.grad.abs().sum() > 0
    if net.scale is not None:
        assert net.scale.grad is not None and net.scale.grad != 0


def test_adapt_uses_running_batchnorm_statistics_and_never_updates_them() -> None:
    torch.manual_seed(0)
    net = ProtoNet(create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=0, hidden=8))
    net.train()  # e.g. called in the middle of training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    support_x, support_y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    query_x = torch.rand(5, 1, 28, 28)
    got = net.adapt(support_x, support_y)(query_x)
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"adapt changed {key}"
    assert net.training and net.backbone.training  # mode restored
    net.eval()
    with torch.no_grad():
        expected = net.adapt(support_x, support_y)(query_x)
        # the query's logits do not depend on which other queries are in the batch
        alone = net.adapt(support_x, support_y)(query_x[:1])
    torch.testing.assert_close(got.detach(), expected)
    torch.testing.assert_close(alone, expected[:1], rtol=1e-5, atol=1e-5)


# -- learning ---------------------------------------------------------------------------------


def noisy_codes(
    num_classes: int = 20, per_class: int = 20, size: int = 8, seed: int = 0
) -> ClassDataset:
    """Each class is a random +-1 code on the first 16 pixels; the other 48 are loud noise.

    A random embedding mixes the noise in (near-chance accuracy); an embedding that learns to
    look at the 16 code pixels separates classes it never saw.
    """
    rng = np.random.default_rng(seed)
    info = 16
    codes = rng.integers(0, 2, size=(num_classes, info)) * 2 - 1
    targets = np.repeat(np.arange(num_classes), per_class)
    images = rng.normal(128, 80, size=(len(targets), size * size))
    images[:, :info] = 128 + 60 * codes[targets] + rng.normal(0, 20, size=(len(targets), info))
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(-1, 1, size, size)
    return ClassDataset(
        torch.from_numpy(images),
        torch.from_numpy(targets),
        [f"c{c:02d}" for c in range(num_classes)],
    )


def test_short_training_beats_chance_on_held_out_classes(one_thread: None) -> None:
    torch.manual_seed(0)
    train, _, test = noisy_codes().split("class", (0.6, 0.1, 0.3), seed=0)
    train_sampler = EpisodeSampler(train, ways=5, shots=1, queries=5, meta_batch_size=4, seed=0)
    test_sampler = EpisodeSampler(test, ways=5, shots=1, queries=5, seed=1)
    net = ProtoNet(create_backbone("mlp", in_shape=(1, 8, 8), num_outputs=0, hidden=(32,)))
    before = evaluate(net, test_sampler, episodes=50).mean
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(100):
        loss, _ = net.meta_loss(train_sampler.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(net, test_sampler, episodes=50).mean
    assert before < 0.5  # chance is 0.2: the noise hides the classes from a random embedding
    assert after > 0.8 and after > before + 0.3


def test_train_ways_larger_than_ways_through_runs_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    ds = noisy_codes(num_classes=30)
    data = tmp_path / "codes.npz"
    np.savez(data, images=ds.images.numpy(), labels=ds.targets.numpy())
    cfg = load_config(
        None,
        [
            f"data.dataset=npz:{data}",
            "data.split_by=class",
            "data.split_fractions=[0.6, 0.2, 0.2]",
            "data.ways=5",
            "data.train_ways=12",
            "data.shots=1",
            "data.queries=3",
            "data.meta_batch_size=2",
            "model.backbone=mlp",
            "model.backbone_options={hidden: [32]}",
            "algorithm.name=protonet",
            "train.steps=40",
            "train.lr=0.01",
            "train.val_every=20",
            "train.val_tasks=10",
            "train.checkpoint_every=20",
            "train.log_every=10",
            "device=cpu",
        ],
    )
    seen: dict[str, set[int]] = {"train": set(), "adapt": set()}
    meta_loss, adapt = ProtoNet.meta_loss, ProtoNet.adapt

    def recording_meta_loss(self: ProtoNet, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        seen["train"].add(int(batch.support_y.max()) + 1)
        return meta_loss(self, batch)

    def recording_adapt(self: ProtoNet, x: Tensor, y: Tensor, steps: int | None = None):  # type: ignore[no-untyped-def]
        seen["adapt"].add(int(y.max()) + 1)
        return adapt(self, x, y, steps)

    monkeypatch.setattr(ProtoNet, "meta_loss", recording_meta_loss)
    monkeypatch.setattr(ProtoNet, "adapt", recording_adapt)
    run_dir = runs.train(cfg, tmp_path / "run", quiet=True)

    assert seen == {"train": {12}, "adapt": {5}}  # 12-way training, 5-way validation
    assert (run_dir / "checkpoints" / "best.json").is_file()  # validation ran and was kept
    learner = runs.load_learner(run_dir, device="cpu")
    test = runs.build_samplers(runs.read_config(run_dir)).test
    assert test.ways == 5
    task = test.episode(0)
    with torch.no_grad():
        assert learner.adapt(task.support_x, task.support_y)(task.query_x).shape == (15, 5)
    assert evaluate(learner, test, episodes=30).mean > 0.5  # chance 0.2
