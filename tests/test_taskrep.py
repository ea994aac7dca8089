"""Task representations: shape, determinism, the blocks against hand computations, meaning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from metaml.errors import UserError
from metaml.taskrep import TaskEncoder, prototype_summary
from metaml.tasks import EpisodeSampler

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """A backbone whose features are ``W x`` (no bias): simple enough to differentiate by hand."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def _support(seed: int = 0, ways: int = 3, shots: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(ways * shots, 1, 16, 16, generator=g), torch.arange(ways).repeat_interleave(
        shots
    )


def test_vector_shape_and_determinism_across_encoders() -> None:
    x, y = _support()
    state = torch.get_rng_state()
    first, second = TaskEncoder(input_shape=(1, 16, 16)), TaskEncoder(input_shape=(1, 16, 16))
    assert torch.equal(state, torch.get_rng_state()), "building an encoder moved the global RNG"
    v = first.encode(x, y)
    assert v.shape == (first.dim,) == (128,) and v.dtype == np.float32
    assert np.array_equal(v, second.encode(x, y))
    assert not np.array_equal(v, TaskEncoder(input_shape=(1, 16, 16), seed=1).encode(x, y))
    with_fisher = TaskEncoder(input_shape=(1, 16, 16), fisher=True)
    w = with_fisher.encode(x, y)
    assert w.shape == (with_fisher.dim,) == (192,)
    assert np.array_equal(w[:128], v), "the Fisher block must not change the other blocks"
    assert np.array_equal(w, with_fisher.encode(x, y))


def test_mean_and_spread_blocks_match_numpy() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    v = TaskEncoder(Linear(weight), input_shape=(6,)).encode(x, y)
    features = x.numpy().astype(np.float64) @ weight.numpy().T.astype(np.float64)  # (6, 4)
    prototypes = np.stack([features[y.numpy() == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(v[:4], prototypes.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v[4:], prototypes.std(0), rtol=1e-5, atol=1e-6)
    mean, spread = prototype_summary(torch.from_numpy(features), y)
    np.testing.assert_allclose(mean.numpy(), prototypes.mean(0), rtol=1e-12)
    np.testing.assert_allclose(spread.numpy(), prototypes.std(0), rtol=1e-12)


def test_vector_ignores_label_names_and_example_order() -> None:
    x, y = _support(seed=3)
    enc = TaskEncoder(input_shape=(1, 16, 16))
    relabelled = torch.tensor([2, 0, 1])[y]  # the same classes under other labels
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(enc.encode(x, y), enc.encode(x, relabelled), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        enc.encode(x, y), enc.encode(x[order], y[order]), rtol=1e-5, atol=1e-6
    )


def test_fisher_block_matches_the_hand_derived_gradient() -> None:
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    v = TaskEncoder(Linear(weight), input_shape=(5,), fisher=True).encode(x, y)
    W, X, labels = weight.double().numpy(), x.double().numpy(), y.numpy()
    F = X @ W.T  # (n, d) features
    P = np.stack([F[labels == c].mean(0) for c in range(3)])  # fixed prototypes
    total = np.zeros_like(W)
    for f, xi, yi in zip(F, X, labels, strict=True):
        logits = -((f - P) ** 2).sum(1)
        s = np.exp(logits - logits.max())
        s /= s.sum()
        # loss = -log softmax(logits)[yi]; d logits_c / d f = -2 (f - p_c); d f / d W = outer(., x)
        d_f = sum((s[c] - (c == yi)) * (-2.0) * (f - P[c]) for c in range(3))
        total += np.outer(d_f, xi) ** 2
    per_channel = (total / len(X)).sum(1)
    np.testing.assert_allclose(v[6:], per_channel / per_channel.sum(), rtol=1e-4, atol=1e-7)
    assert abs(float(v[6:].sum()) - 1.0) < 1e-5


def test_normalize_gives_unit_blocks() -> None:
    x, y = _support()
    v = TaskEncoder(input_shape=(1, 16, 16), normalize=True, fisher=True).encode(x, y)
    norms = [np.linalg.norm(v[:64]), np.linalg.norm(v[64:128]), np.linalg.norm(v[128:])]
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_spec_round_trip_and_bad_input() -> None:
    enc = TaskEncoder(input_shape=(1, 16, 16), seed=5, fisher=True)
    again = TaskEncoder.from_spec(enc.spec())
    x, y = _support()
    assert np.array_equal(enc.encode(x, y), again.encode(x, y))
    with pytest.raises(UserError, match="input"):
        enc.encode(torch.rand(2, 1, 20, 20), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="support_y"):
        enc.encode(x, y[:-1])
    with pytest.raises(UserError, match="cannot rebuild"):
        TaskEncoder.from_spec({"backbone": "mystery"})


@pytest.mark.slow
def test_same_group_tasks_are_nearer_on_glyphs() -> None:
    """Tasks of one script are nearer each other than tasks of others (the retrieval benchmark, small)."""
    from metaml.data import ClassDataset, load

    ds = load("glyphs")
    assert isinstance(ds, ClassDataset)
    groups = np.asarray(ds.class_groups)
    names, sizes = np.unique(groups, return_counts=True)
    chosen = names[np.argsort(-sizes, kind="stable")[:6]]  # the 6 largest scripts
    ds = ds.subset_classes(np.flatnonzero(np.isin(groups, chosen)))
    sampler = EpisodeSampler(ds, ways=5, shots=5, queries=1, within_group=True, seed=0)
    enc = TaskEncoder(input_shape=ds.shape)
    tasks = [sampler.episode(i) for i in range(60)]
    labels = np.array([ds.class_groups[int(t.classes[0])] for t in tasks])  # type: ignore[index]
    vectors = np.stack([enc.encode_task(t) for t in tasks])
    d = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :5]
    precision = (labels[nearest] == labels[:, None]).mean()
    chance = np.mean([(labels == g).sum() - 1 for g in labels]) / (len(labels) - 1)
    assert precision > 2 * chance, (precision, chance)
