"""EpisodeSampler: validation, regression families, resumption, augmentation, sampling balance."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from metaml.data import ClassDataset, Sinusoid, load
from metaml.errors import UserError
from metaml.tasks import EpisodeSampler, TaskFamily


def _dataset(
    counts: list[int], groups: list[str] | None = None, hw: tuple[int, int] = (3, 3)
) -> ClassDataset:
    targets = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    images = torch.arange(len(targets)).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, *hw)
    names = [f"c{i}" for i in range(len(counts))]
    return ClassDataset(images.contiguous(), targets, names, groups)


# -- validation -------------------------------------------------------------------------------


def test_ways_larger_than_classes() -> None:
    ds = _dataset([5] * 4)
    with pytest.raises(UserError, match=r"ways=5 but the dataset has 4 classes.*rotations=True"):
        EpisodeSampler(ds, ways=5, shots=1, queries=1)
    assert EpisodeSampler(ds, ways=5, shots=1, queries=1, rotations=True).num_classes == 16
    with pytest.raises(UserError, match="16 classes"):
        EpisodeSampler(ds, ways=17, shots=1, queries=1, rotations=True)


def test_ways_larger_than_any_group() -> None:
    ds = _dataset([5] * 5, ["a", "a", "b", "b", "b"])
    with pytest.raises(UserError, match=r"largest, 'b', has 3"):
        EpisodeSampler(ds, ways=4, shots=1, queries=1, within_group=True)
    EpisodeSampler(ds, ways=4, shots=1, queries=1, within_group=True, rotations=True)


def test_too_few_examples_names_the_class() -> None:
    ds = _dataset([5, 3, 5])
    with pytest.raises(
        UserError, match=r"shots \+ queries = 4 but class 'c1' has only 3.*queries=2"
    ):
        EpisodeSampler(ds, ways=2, shots=1, queries=3)
    with pytest.raises(UserError, match=r"'c1' has only 3.*shots=2, queries=1"):
        EpisodeSampler(ds, ways=2, shots=3, queries=1)


@pytest.mark.parametrize("field", ["ways", "shots", "queries", "meta_batch_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_non_positive_values(field: str, value: Any) -> None:
    with pytest.raises(UserError, match=field):
        EpisodeSampler(_dataset([5] * 3), **{"ways": 2, "shots": 1, "queries": 1, field: value})


def test_rotations_need_square_images() -> None:
    with pytest.raises(UserError, match="square"):
        EpisodeSampler(_dataset([4] * 3, hw=(2, 3)), ways=2, shots=1, queries=1, rotations=True)


def test_not_a_source() -> None:
    with pytest.raises(UserError, match="ClassDataset or a TaskFamily"):
        EpisodeSampler([1, 2, 3], ways=2)  # type: ignore[arg-type]


def test_negative_index() -> None:
    with pytest.raises(UserError, match="index"):
        EpisodeSampler(_dataset([4] * 3), ways=2, shots=1, queries=1).episode(-1)


# -- regression -------------------------------------------------------------------------------


def test_task_family_sampler_ignores_ways() -> None:
    fam = Sinusoid()
    assert isinstance(fam, TaskFamily)
    s = EpisodeSampler(fam, ways=99, shots=10, queries=7, meta_batch_size=3, seed=4)
    assert (s.task_type, s.input_shape, s.output_dim) == ("regression", (1,), 1)
    b = s.batch(2)
    assert b.support_x.shape == (3, 10, 1) and b.query_y.shape == (3, 7, 1)
    assert torch.equal(b.task(1).support_x, s.episode(7).support_x)
    assert torch.equal(
        s.episode(5).query_y, EpisodeSampler(fam, shots=10, queries=7, seed=4).episode(5).query_y
    )
    assert not torch.equal(s.episode(5).query_y, s.episode(6).query_y)


# -- positions, augmentation, metadata --------------------------------------------------------


def test_batches_resume_at_position() -> None:
    s = EpisodeSampler(_dataset([6] * 8), ways=3, shots=2, queries=2, meta_batch_size=2, seed=1)
    straight = list(itertools.islice(s.batches(), 6))
    resumed = list(itertools.islice(s.batches(start=4), 2))
    for a, b in zip(straight[4:], resumed, strict=True):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_augment_is_applied_with_the_episode_rng() -> None:
    calls = []

    def noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        calls.append(x.shape)
        return x + torch.from_numpy(rng.normal(size=x.shape).astype(np.float32))

    ds = _dataset([6] * 8)
    s = EpisodeSampler(ds, ways=3, shots=2, queries=2, seed=1, augment=noise)
    plain = EpisodeSampler(ds, ways=3, shots=2, queries=2, seed=1).episode(0)
    a, b = s.episode(0), s.episode(0)
    assert calls == [(6, 1, 3, 3), (6, 1, 3, 3)] * 2  # support, then query; twice
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.allclose(a.support_x, plain.support_x)
    assert torch.equal(a.support_y, plain.support_y) and torch.equal(a.classes, plain.classes)


def test_attributes_and_repr() -> None:
    ds = _dataset([6] * 8)
    s = EpisodeSampler(ds, ways=3, shots=2, queries=2, meta_batch_size=4, seed=9, rotations=True)
    assert (s.seed, s.ways, s.shots, s.queries, s.meta_batch_size) == (9, 3, 2, 2, 4)
    assert (s.task_type, s.input_shape, s.output_dim, s.num_classes) == (
        "classification",
        (1, 3, 3),
        3,
        32,
    )
    assert "rotations" in repr(s)


def test_rotation_matches_torch_rot90() -> None:
    # An asymmetric image makes every rotation distinguishable; torch.rot90 is the reference.
    image = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3) * 20
    ds = ClassDataset(image.expand(8, 1, 3, 3).contiguous(), torch.arange(8) % 4, "abcd")
    s = EpisodeSampler(ds, ways=4, shots=1, queries=1, rotations=True)
    seen = set()
    for i in range(20):
        t = s.episode(i)
        assert t.classes is not None
        for x, cls in zip(t.support_x, t.classes.tolist(), strict=True):
            expected = torch.rot90(image[0].float() / 255, cls % 4, dims=(-2, -1))
            assert torch.equal(x, expected)
            seen.add(cls % 4)
    assert seen == {0, 1, 2, 3}


def test_large_classes_path_draws_distinct_examples() -> None:
    # More than 256 examples in a class switches to per-class rng.choice.
    ds = _dataset([300, 280, 290], hw=(1, 1))
    s = EpisodeSampler(ds, ways=3, shots=5, queries=20, seed=2)
    assert s.episode(3).query_x.shape == (60, 1, 1, 1)
    # pixel values repeat past 255, so check the drawn example indices directly
    rng = s.rng(3)
    classes = s._choose_classes(rng)
    examples = s._choose_examples(rng, classes)
    assert all(len(set(row)) == 25 for row in examples.tolist())
    assert all(
        (ds.targets[torch.from_numpy(row)] == c).all()
        for row, c in zip(examples, classes, strict=True)
    )


# -- balance ----------------------------------------------------------------------------------


def test_classes_and_labels_are_drawn_uniformly() -> None:
    ds = _dataset([4] * 10)
    s = EpisodeSampler(ds, ways=3, shots=1, queries=1, seed=0)
    picks: Counter[int] = Counter()
    first_label: Counter[int] = Counter()
    for i in range(3000):
        classes = s.episode(i).classes
        assert classes is not None
        picks.update(classes.tolist())
        first_label[int(classes[0])] += 1
    # 900 expected picks per class (sd ~28) and 300 per class as label 0 (sd ~16)
    assert all(800 < n < 1000 for n in picks.values()) and len(picks) == 10
    assert all(230 < n < 370 for n in first_label.values())


def test_groups_weighted_by_class_count() -> None:
    # group a: 2 classes (too few for 3 ways), b: 3 classes, c: 6 classes -> b 1/3, c 2/3
    ds = _dataset([4] * 11, ["a"] * 2 + ["b"] * 3 + ["c"] * 6)
    s = EpisodeSampler(ds, ways=3, shots=1, queries=1, seed=0, within_group=True)
    groups: Counter[str] = Counter()
    for i in range(1500):
        classes = s.episode(i).classes
        assert classes is not None
        groups[ds.class_groups[int(classes[0])]] += 1
    assert set(groups) == {"b", "c"}
    assert 420 < groups["b"] < 580  # 500 expected, sd ~18


# -- real data --------------------------------------------------------------------------------


def test_omniglot_episode(omniglot_root: Any) -> None:
    ds = load("omniglot-small1", root=omniglot_root)
    assert isinstance(ds, ClassDataset)
    s = EpisodeSampler(
        ds, ways=5, shots=1, queries=15, meta_batch_size=2, within_group=True, rotations=True
    )
    b = s.batch(0)
    assert b.support_x.shape == (2, 5, 1, 28, 28) and b.query_x.shape == (2, 75, 1, 28, 28)
    assert b.support_x.dtype == torch.float32 and float(b.support_x.max()) == 1.0
    assert b.classes is not None and b.classes.shape == (2, 5)
