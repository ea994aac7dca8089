"""Property tests of EpisodeSampler on a dataset whose every image encodes its example id."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaml.tasks import EpisodeSampler

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)
indices = st.integers(0, 10**6)
# The id dataset has 14 classes (groups of 2, 3, 4, 5) and at least 6 examples per class.
ways_st = st.integers(1, 5)
shots_st = st.integers(1, 3)
queries_st = st.integers(1, 3)


def _classes_of(id_dataset: Any, x: torch.Tensor) -> list[tuple[int, int]]:
    """(class, rotation) of each image, recovered from the pixels, not from the sampler."""
    targets = id_dataset.dataset.targets
    return [(int(targets[i]), r) for i, r in id_dataset.identify(x)]


@SETTINGS
@given(ways=ways_st, shots=shots_st, queries=queries_st, seed=seeds, index=indices)
def test_shapes_and_labels(
    id_dataset: Any, ways: int, shots: int, queries: int, seed: int, index: int
) -> None:
    t = EpisodeSampler(id_dataset.dataset, ways, shots, queries, seed=seed).episode(index)
    assert t.support_x.shape == (ways * shots, 1, 5, 5)
    assert t.query_x.shape == (ways * queries, 1, 5, 5)
    assert t.support_x.dtype == torch.float32 and 0 <= t.support_x.min() <= t.support_x.max() <= 1
    assert t.support_y.dtype == torch.int64
    # class-major: label j occupies rows j*shots .. j*shots + shots - 1
    assert t.support_y.tolist() == [j for j in range(ways) for _ in range(shots)]
    assert t.query_y.tolist() == [j for j in range(ways) for _ in range(queries)]
    assert Counter(t.support_y.tolist()) == dict.fromkeys(range(ways), shots)


@SETTINGS
@given(ways=ways_st, shots=shots_st, queries=queries_st, seed=seeds, index=indices)
def test_examples_distinct_and_labels_consistent(
    id_dataset: Any, ways: int, shots: int, queries: int, seed: int, index: int
) -> None:
    t = EpisodeSampler(id_dataset.dataset, ways, shots, queries, seed=seed).episode(index)
    support_ids = [i for i, _ in id_dataset.identify(t.support_x)]
    query_ids = [i for i, _ in id_dataset.identify(t.query_x)]
    assert not set(support_ids) & set(query_ids)
    assert len(set(support_ids + query_ids)) == ways * (shots + queries)
    # every label is one class, in support and query alike; different labels, different classes
    label_class: dict[int, set[tuple[int, int]]] = {}
    for x, y in ((t.support_x, t.support_y), (t.query_x, t.query_y)):
        for cls, label in zip(_classes_of(id_dataset, x), y.tolist(), strict=True):
            label_class.setdefault(label, set()).add(cls)
    assert all(len(c) == 1 for c in label_class.values())
    assert len({next(iter(c)) for c in label_class.values()}) == ways
    assert t.classes is not None
    assert t.classes.tolist() == [next(iter(label_class[j]))[0] for j in range(ways)]


@SETTINGS
@given(ways=ways_st, shots=shots_st, queries=queries_st, seed=seeds, index=indices)
def test_episode_is_pure_function_of_seed_and_index(
    id_dataset: Any, ways: int, shots: int, queries: int, seed: int, index: int
) -> None:
    a = EpisodeSampler(id_dataset.dataset, ways, shots, queries, seed=seed)
    b = EpisodeSampler(id_dataset.dataset, ways, shots, queries, seed=seed)
    b.episode(index + 7)  # drawing other episodes first must not matter
    ta, tb = a.episode(index), b.episode(index)
    for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
        assert torch.equal(getattr(ta, name), getattr(tb, name))
    other = a.episode(index + 1)
    differs = not torch.equal(ta.support_x, other.support_x) or not torch.equal(
        ta.query_x, other.query_x
    )
    assert differs or ways * (shots + queries) <= 2  # tiny episodes may repeat by chance


@SETTINGS
@given(ways=ways_st, shots=shots_st, queries=queries_st, seed=seeds, index=indices)
def test_within_group(
    id_dataset: Any, ways: int, shots: int, queries: int, seed: int, index: int
) -> None:
    sampler = EpisodeSampler(id_dataset.dataset, ways, shots, queries, seed=seed, within_group=True)
    t = sampler.episode(index)
    groups = id_dataset.dataset.class_groups
    classes = {c for c, _ in _classes_of(id_dataset, torch.cat([t.support_x, t.query_x]))}
    assert len({groups[c] for c in classes}) == 1
    assert len(classes) == ways


@SETTINGS
@given(
    ways=st.integers(1, 8),
    shots=shots_st,
    queries=queries_st,
    seed=seeds,
    index=indices,
    within_group=st.booleans(),
)
def test_rotations(
    id_dataset: Any, ways: int, shots: int, queries: int, seed: int, index: int, within_group: bool
) -> None:
    sampler = EpisodeSampler(
        id_dataset.dataset, ways, shots, queries, seed=seed, rotations=True,
        within_group=within_group,
    )  # fmt: skip
    t = sampler.episode(index)
    support, query = _classes_of(id_dataset, t.support_x), _classes_of(id_dataset, t.query_x)
    # a label is one (class, rotation) pair, shared by its support and query examples
    pairs: dict[int, set[tuple[int, int]]] = {}
    for cls, label in zip(support + query, t.support_y.tolist() + t.query_y.tolist(), strict=True):
        pairs.setdefault(label, set()).add(cls)
    assert all(len(p) == 1 for p in pairs.values())
    assert len({next(iter(p)) for p in pairs.values()}) == ways
    assert t.classes is not None
    expected = [4 * c + r for c, r in (next(iter(pairs[j])) for j in range(ways))]
    assert t.classes.tolist() == expected
    if within_group:
        groups = id_dataset.dataset.class_groups
        assert len({groups[c] for c, _ in support + query}) == 1


@SETTINGS
@given(batch_size=st.integers(1, 4), seed=seeds, index=st.integers(0, 1000))
def test_batch_stacks_consecutive_episodes(
    id_dataset: Any, batch_size: int, seed: int, index: int
) -> None:
    sampler = EpisodeSampler(id_dataset.dataset, 3, 2, 2, meta_batch_size=batch_size, seed=seed)
    batch = sampler.batch(index)
    assert len(batch) == batch_size
    for j in range(batch_size):
        episode = sampler.episode(index * batch_size + j)
        assert torch.equal(batch.task(j).support_x, episode.support_x)
        assert torch.equal(batch.task(j).query_y, episode.query_y)
