"""Episodic evaluation: CIs and paired differences by hand, and which episodes evaluate uses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor
from metaml.data import ClassDataset, Sinusoid
from metaml.evaluate import Result, compare, evaluate, mean_ci95
from metaml.tasks import EpisodeSampler, TaskBatch


def ci_by_hand(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))  # sample std, ddof=1
    return mean, 1.96 * std / math.sqrt(n)


def test_mean_ci95_is_196_sample_std_over_sqrt_n() -> None:
    scores = [0.2, 0.9, 0.55, 0.4, 0.75, 0.6, 0.1]
    mean, ci = mean_ci95(scores)
    expected_mean, expected_ci = ci_by_hand(scores)
    assert mean == pytest.approx(expected_mean, rel=1e-12)
    assert ci == pytest.approx(expected_ci, rel=1e-12)
    # two values a and b: std = |a - b| / sqrt(2), so ci = 1.96 * |a - b| / 2
    assert mean_ci95([0.0, 1.0]) == pytest.approx((0.5, 0.98))
    assert mean_ci95([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="no scores"):
        mean_ci95([])


def test_result_from_scores_and_summary() -> None:
    result = Result.from_scores([0.5, 0.75, 1.0], metric="accuracy", seed=3, steps=2)
    mean, ci = ci_by_hand([0.5, 0.75, 1.0])
    assert (result.mean, result.ci95) == pytest.approx((mean, ci))
    assert result.episodes == 3 and result.seed == 3 and result.info == {"steps": 2}
    assert result.summary() == f"accuracy 75.00% ± {100 * ci:.2f} (3 episodes)"
    mse = Result.from_scores([1.0, 3.0], metric="mse", seed=0)
    assert mse.summary() == f"mse 2.0000 ± {1.96 * math.sqrt(2) / math.sqrt(2):.4f} (2 episodes)"
    assert result.to_dict()["scores"] == [0.5, 0.75, 1.0]


def test_compare_uses_paired_differences() -> None:
    # b is a little better than a on every episode while episodes vary a lot: paired, the
    # difference is clearly significant; unpaired CIs (about +-0.25) would overlap.
    a = [0.2, 0.9, 0.5, 0.4, 0.8, 0.3]
    b = [0.25, 0.93, 0.56, 0.44, 0.83, 0.36]
    c = [0.3, 0.8, 0.5, 0.5, 0.7, 0.3]
    results = {k: Result.from_scores(v, "accuracy", seed=1) for k, v in dict(a=a, b=b, c=c).items()}
    comparisons = compare(results)
    assert [(x.a, x.b) for x in comparisons] == [("a", "b"), ("a", "c"), ("b", "c")]
    for cmp, (first, second) in zip(comparisons, [(a, b), (a, c), (b, c)], strict=True):
        mean, ci = ci_by_hand([y - x for x, y in zip(first, second, strict=True)])
        assert cmp.mean_diff == pytest.approx(mean)
        assert cmp.ci95 == pytest.approx(ci)
        assert cmp.significant == (abs(mean) > ci)
    ab = comparisons[0]
    assert ab.significant and ab.mean_diff == pytest.approx(0.045)
    assert ci_by_hand(a)[1] > 0.2  # what an unpaired test would have to beat
    assert not comparisons[1].significant  # a vs c: differences of both signs
    assert "b - a: +0.0450" in ab.summary() and "(significant at 95%)" in ab.summary()


def test_compare_identical_results_is_not_significant() -> None:
    r = Result.from_scores([0.4, 0.6, 0.8], "accuracy", seed=0)
    [cmp] = compare({"x": r, "y": r})
    assert cmp.mean_diff == 0 and cmp.ci95 == 0 and not cmp.significant


@pytest.mark.parametrize(
    "other",
    [
        Result.from_scores([0.5, 0.6, 0.7], "accuracy", seed=1),  # another seed
        Result.from_scores([0.5, 0.6], "accuracy", seed=0),  # fewer episodes
        Result.from_scores([0.5, 0.6, 0.7], "mse", seed=0),  # another metric
        Result.from_scores([0.5, 0.6, 0.7], "accuracy", seed=0, ways=5, shots=5),  # other shots
    ],
)
def test_compare_refuses_results_on_different_episodes(other: Result) -> None:
    base = Result.from_scores([0.4, 0.5, 0.6], "accuracy", seed=0, ways=5, shots=1)
    with pytest.raises(ValueError, match="'base' and 'other'"):
        compare({"base": base, "other": other})


def test_compare_ignores_steps_which_belong_to_the_method() -> None:
    a = Result.from_scores([0.4, 0.5, 0.6], "accuracy", seed=0, steps=1, ways=5, shots=1)
    b = Result.from_scores([0.5, 0.5, 0.7], "accuracy", seed=0, steps=10, ways=5, shots=1)
    [cmp] = compare({"a": a, "b": b})
    assert cmp.mean_diff == pytest.approx(0.2 / 3)


# -- evaluate -----------------------------------------------------------------------------------


class Recorder(MetaLearner):
    """Predicts the label of the support example nearest to each query (1-NN), and records
    every task it is given and the mode it was in."""

    task_type = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # evaluate reads the device from a parameter
        self.seen: list[tuple[Tensor, Tensor]] = []
        self.modes: list[bool] = []
        self.steps: list[int | None] = []

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        self.seen.append((support_x.clone(), support_y.clone()))
        self.modes.append(self.training)
        self.steps.append(steps)

        def predict(query_x: Tensor) -> Tensor:
            d = torch.cdist(query_x.flatten(1), support_x.flatten(1))  # (q, s)
            nearest = support_y[d.argmin(1)]
            return nn.functional.one_hot(nearest, int(support_y.max()) + 1).float()

        return predict


def noisy_dataset() -> ClassDataset:
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(10).repeat_interleave(6)
    base = torch.randint(0, 256, (10, 1, 4, 4), generator=g)
    noise = torch.randint(-90, 91, (60, 1, 4, 4), generator=g)
    images = (base[targets] + noise).clamp(0, 255).to(torch.uint8)
    return ClassDataset(images, targets, [f"c{c}" for c in range(10)])


def test_evaluate_uses_episodes_0_to_n_minus_1_and_scores_each() -> None:
    sampler = EpisodeSampler(noisy_dataset(), ways=4, shots=1, queries=3, seed=5)
    learner = Recorder()
    learner.train()
    result = evaluate(learner, sampler, episodes=7, steps=3)
    assert len(learner.seen) == 7 and result.episodes == 7
    expected = []
    for i, (support_x, support_y) in enumerate(learner.seen):
        task = sampler.episode(i)
        assert torch.equal(support_x, task.support_x) and torch.equal(support_y, task.support_y)
        # 1-NN accuracy of this episode, by hand
        correct = 0
        for q, y in zip(task.query_x, task.query_y.tolist(), strict=True):
            dists = [float(((q - s) ** 2).sum()) for s in task.support_x]
            correct += int(task.support_y[dists.index(min(dists))] == y)
        expected.append(correct / len(task.query_y))
    assert result.scores == pytest.approx(expected)
    assert min(expected) > 0 and max(expected) <= 1 and len(set(expected)) > 1
    assert (result.mean, result.ci95) == pytest.approx(ci_by_hand(expected))
    assert result.metric == "accuracy" and result.seed == 5
    assert result.info == {"steps": 3, "ways": 4, "shots": 1, "queries": 3}
    assert learner.steps == [3] * 7
    assert learner.modes == [False] * 7 and learner.training  # eval mode inside, restored after


def test_evaluate_is_deterministic() -> None:
    sampler = EpisodeSampler(noisy_dataset(), ways=3, shots=2, queries=2, seed=0)
    first, second = evaluate(Recorder(), sampler, episodes=5), evaluate(Recorder(), sampler, 5)
    assert first.scores == second.scores
    # and another seed gives other episodes
    other = Recorder()
    evaluate(other, EpisodeSampler(noisy_dataset(), ways=3, shots=2, queries=2, seed=1), 5)
    again = Recorder()
    evaluate(again, sampler, 5)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other.seen, again.seen, strict=True))


class Zero(MetaLearner):
    task_type = "regression"

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        return lambda x: torch.zeros(x.shape[0], 1)


def test_evaluate_regression_reports_mse() -> None:
    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=8, seed=2)
    result = evaluate(Zero(), sampler, episodes=4)
    expected = [float((sampler.episode(i).query_y ** 2).mean()) for i in range(4)]
    assert result.metric == "mse" and result.scores == pytest.approx(expected)
    assert "ways" not in result.info  # a task family has no ways
