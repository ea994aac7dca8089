"""Task selection: weighted class draws in EpisodeSampler and the nearest-class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IdDataset

from metaml.data import ClassDataset
from metaml.errors import UserError
from metaml.taskrep import TaskEncoder, class_prototypes, nearest_class_weights
from metaml.tasks import EpisodeSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_is_the_default_and_unchanged(id_dataset: IdDataset) -> None:
    ds = id_dataset.dataset
    default = EpisodeSampler(ds, ways=3, shots=1, queries=2, seed=5)
    explicit = EpisodeSampler(ds, ways=3, shots=1, queries=2, seed=5, task_selection="uniform")
    for i in range(20):
        a, b = default.episode(i), explicit.episode(i)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)  # type: ignore[arg-type]


def test_one_way_draws_follow_the_weights(id_dataset: IdDataset) -> None:
    """With ways=1 a class is drawn with probability exactly its weight: check the frequencies."""
    ds = id_dataset.dataset
    weights = np.arange(1, ds.num_classes + 1, dtype=np.float64)  # class c has weight c + 1
    sampler = EpisodeSampler(
        ds, ways=1, shots=1, queries=1, seed=0, task_selection="nearest", class_weights=weights
    )
    n = 2000
    counts = np.bincount(
        [int(sampler.episode(i).classes[0]) for i in range(n)], minlength=ds.num_classes
    )  # type: ignore[index]
    expected = n * weights / weights.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 36.1, (chi2, counts)  # 99.9% quantile of chi-square with 13 degrees of freedom


def test_weighted_draws_prefer_heavy_classes_and_respect_groups(id_dataset: IdDataset) -> None:
    ds = id_dataset.dataset
    weights = np.ones(ds.num_classes)
    heavy = [c for c, g in enumerate(ds.class_groups) if g == "g3"]  # the 5-class group
    weights[heavy] = 50.0
    s = EpisodeSampler(
        ds, ways=3, shots=1, queries=1, seed=1, task_selection="nearest", class_weights=weights
    )
    drawn = np.concatenate([s.episode(i).classes.numpy() for i in range(300)])  # type: ignore[union-attr]
    assert np.isin(drawn, heavy).mean() > 0.8
    grouped = EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=1, within_group=True,
                             task_selection="nearest", class_weights=weights)  # fmt: skip
    groups = np.asarray(ds.class_groups)
    picks = [grouped.episode(i).classes.numpy() for i in range(300)]  # type: ignore[union-attr]
    assert all(len(set(groups[p])) == 1 for p in picks)
    assert np.mean([groups[p[0]] == "g3" for p in picks]) > 0.8
    again = EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=1, within_group=True,
                           task_selection="nearest", class_weights=weights)  # fmt: skip
    assert all(
        torch.equal(grouped.episode(i).support_x, again.episode(i).support_x) for i in range(10)
    )


def test_bad_selection_arguments(id_dataset: IdDataset) -> None:
    ds = id_dataset.dataset
    with pytest.raises(UserError, match="14 positive weights"):
        EpisodeSampler(ds, ways=2, task_selection="nearest", shots=1, queries=1)
    with pytest.raises(UserError, match="positive weights"):
        EpisodeSampler(
            ds, ways=2, shots=1, queries=1, task_selection="nearest", class_weights=np.zeros(14)
        )
    with pytest.raises(UserError, match="unknown task_selection"):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hardest")
    with pytest.raises(UserError, match="drop them"):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, class_weights=np.ones(14))


def _bars() -> ClassDataset:
    """4 classes of 16x16 images: a bright bar at row 2, 6, 10 or 14, 5 noisy copies each."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 30, size=(20, 1, 16, 16), dtype=np.uint8)
    for i in range(20):
        images[i, 0, 2 + 4 * (i // 5)] = 255
    return ClassDataset(torch.from_numpy(images), torch.arange(20) // 5, "abcd")


def test_nearest_weights_favour_the_target_class_and_match_numpy() -> None:
    ds = _bars()
    encoder = TaskEncoder(input_shape=(1, 16, 16))
    target_x = ds.images[15:18].float() / 255  # three examples of class d
    w = nearest_class_weights(ds, target_x, torch.zeros(3, dtype=torch.long), encoder=encoder,
                              temperature=0.5, uniform_mix=0.2)  # fmt: skip
    assert int(w.argmax()) == 3 and w.sum() == pytest.approx(1.0) and (w >= 0.2 / 4 - 1e-12).all()
    protos = class_prototypes(ds, encoder)
    feats = encoder.backbone.forward_features(target_x).detach().numpy().astype(np.float64)  # type: ignore[operator]
    d = np.linalg.norm(protos - feats.mean(0), axis=1)
    soft = np.exp(-d / (0.5 * np.median(d)))
    np.testing.assert_allclose(w, 0.8 * soft / soft.sum() + 0.05, rtol=1e-5)
    rotated = class_prototypes(ds, encoder, rotations=True)
    np.testing.assert_allclose(rotated[::4], protos, rtol=1e-6)
    turned = encoder.backbone.forward_features(
        torch.rot90(ds.images[:5].float() / 255, 1, dims=(-2, -1))
    )  # type: ignore[operator]
    np.testing.assert_allclose(rotated[1], turned.detach().numpy().mean(0), rtol=1e-4, atol=1e-6)


def test_hard_selection_starts_uniform_and_follows_set_weights(id_dataset: IdDataset) -> None:
    ds = id_dataset.dataset
    s = EpisodeSampler(ds, ways=1, shots=1, queries=1, seed=2, task_selection="hard")
    assert s.class_weights is not None
    np.testing.assert_allclose(s.class_weights, np.full(ds.num_classes, 1 / ds.num_classes))
    weights = np.full(ds.num_classes, 1e-6)
    weights[7] = 1.0
    s.set_class_weights(weights)
    drawn = [int(s.episode(i).classes[0]) for i in range(200)]  # type: ignore[index]
    assert np.mean(np.array(drawn) == 7) > 0.99
    with pytest.raises(UserError, match="apply to task_selection"):
        EpisodeSampler(ds, ways=1, shots=1, queries=1).set_class_weights(weights)


def test_hard_tracker_is_a_moving_average_of_error_rates() -> None:
    from metaml.taskrep import HardClassTracker

    tracker = HardClassTracker(5, decay=0.5, uniform_mix=0.2)
    classes = torch.tensor([[3, 1], [4, 3]])  # two 2-way episodes
    query_y = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    # predicted labels: episode 0 gets one of class 3's two queries wrong, all of class 1's;
    # episode 1 gets class 4 right and one of class 3's queries wrong
    predicted = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]])
    logits = torch.nn.functional.one_hot(predicted, 2).float()
    tracker.observe(classes, query_y, logits)
    error = np.ones(5)
    for c, rate in ((3, 0.5), (1, 1.0), (4, 0.0), (3, 0.5)):  # in the order observe folds them
        error[c] = 0.5 * error[c] + 0.5 * rate
    np.testing.assert_allclose(tracker.error, error)
    np.testing.assert_allclose(tracker.weights(), 0.8 * error / error.sum() + 0.2 / 5)


def reference_observe(tracker: object, classes: torch.Tensor, query_y: torch.Tensor,
                      logits: torch.Tensor) -> None:  # fmt: skip
    """The first, loop-per-label HardClassTracker.observe, kept as the reference."""
    wrong = (logits.argmax(-1) != query_y).double()
    for b in range(classes.shape[0]):
        for label, c in enumerate(classes[b].tolist()):
            mask = query_y[b] == label
            if mask.any():
                rate = float(wrong[b][mask].mean())
                tracker.error[c] = tracker.decay * tracker.error[c] + (1 - tracker.decay) * rate  # type: ignore[attr-defined]


def test_vectorised_observe_equals_the_loop_bit_for_bit() -> None:
    from metaml.taskrep import HardClassTracker

    gen = torch.Generator().manual_seed(0)
    fast, slow = HardClassTracker(9, decay=0.7), HardClassTracker(9, decay=0.7)
    for _ in range(20):
        classes = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(6)])  # (6, 4)
        query_y = torch.randint(0, 4, (6, 7), generator=gen)  # some labels get no query
        logits = torch.randn(6, 7, 4, generator=gen)
        fast.observe(classes, query_y, logits)
        reference_observe(slow, classes, query_y, logits)
    assert np.array_equal(fast.error, slow.error) and len(set(fast.error.tolist())) > 3


def test_selection_state_restores_exactly_through_json(id_dataset: IdDataset) -> None:
    import json

    from metaml.taskrep import HardClassTracker

    ds = id_dataset.dataset
    a = EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=3, within_group=True,
                       task_selection="hard")  # fmt: skip
    a.set_class_weights(np.random.default_rng(0).random(ds.num_classes) + 0.1)
    b = EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=3, within_group=True,
                       task_selection="hard")  # fmt: skip
    b.load_selection_state(json.loads(json.dumps(a.selection_state())))
    assert np.array_equal(a.class_weights, b.class_weights)  # type: ignore[arg-type]
    assert all(torch.equal(a.episode(i).classes, b.episode(i).classes) for i in range(50))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="resume with the run's own config"):
        EpisodeSampler(ds, ways=2, shots=1, queries=1).load_selection_state(a.selection_state())
    tracker = HardClassTracker(ds.num_classes)
    tracker.error[:3] = [0.1, 0.2, 1 / 3]
    again = HardClassTracker(ds.num_classes)
    again.load_state(json.loads(json.dumps(tracker.state())))
    assert np.array_equal(again.error, tracker.error)
    with pytest.raises(UserError, match="error rates for"):
        HardClassTracker(3).load_state(tracker.state())
