"""Episodic evaluation with honest statistics.

Every method evaluated with the same sampler (same dataset split, shape and seed) sees the same
episodes, so results can be compared pair by pair (:func:`compare`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metaml.algorithms.base import MetaLearner
from metaml.errors import UserError
from metaml.threads import check_task_threads, map_in_threads

if TYPE_CHECKING:
    from metaml.tasks import EpisodeSampler, Task

Z95 = 1.96
# What, besides the seed and the count, fixes which episodes a result was computed on.
_EPISODE_KEYS = ("ways", "shots", "queries")


@dataclass
class Result:
    """Scores of one learner on fixed episodes: mean, 95% CI half-width, per-episode scores.

    ``metric`` is ``"accuracy"`` (higher is better) or ``"mse"`` (lower is better).

    Example:
        >>> r = Result.from_scores([0.5, 0.7, 0.6], metric="accuracy", seed=0)
        >>> round(r.mean, 3), round(r.ci95, 3)
        (0.6, 0.113)
    """

    mean: float
    ci95: float
    scores: list[float]
    metric: str
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_scores(scores: list[float], metric: str, seed: int, **info: Any) -> Result:
        """Summarise per-episode scores: mean and 1.96 * std / sqrt(n) (sample std, ddof=1)."""
        mean, ci = mean_ci95(scores)
        return Result(
            mean=mean, ci95=ci, scores=list(map(float, scores)), metric=metric, seed=seed, info=info
        )

    @property
    def episodes(self) -> int:
        """How many episodes the scores cover."""
        return len(self.scores)

    def summary(self) -> str:
        """One line for people, e.g. ``accuracy 97.12% ± 0.41 (600 episodes)``."""
        if self.metric == "accuracy":
            return f"accuracy {100 * self.mean:.2f}% ± {100 * self.ci95:.2f} ({self.episodes} episodes)"
        return f"{self.metric} {self.mean:.4f} ± {self.ci95:.4f} ({self.episodes} episodes)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def mean_ci95(scores: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (0 for a single score).

    Example:
        >>> mean_ci95([1.0, 1.0])
        (1.0, 0.0)
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to summarise")
    if values.size == 1:
        return float(values[0]), 0.0
    return float(values.mean()), float(Z95 * values.std(ddof=1) / math.sqrt(values.size))


def evaluate(
    learner: MetaLearner,
    sampler: EpisodeSampler,
    episodes: int = 600,
    steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    task_threads: int | None = None,
) -> Result:
    """Adapt ``learner`` to episodes ``0..episodes-1`` of ``sampler`` and score each query set.

    ``task_threads`` episodes are adapted at once, one per thread (default: the learner's own
    ``task_threads``, which the gradient-based learners have, else 1); the scores are the same
    as one at a time, in episode order. Episodes are drawn on the calling thread.

    Example:
        >>> from metaml.data import load
        >>> from metaml.tasks import EpisodeSampler
        >>> import metaml
        >>> # result = evaluate(learner, EpisodeSampler(load("sinusoid"), shots=5, queries=10), 100)
    """
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    threads = _task_threads(learner, task_threads)
    metric = "accuracy" if learner.task_type == "classification" else "mse"

    def score(task: Task) -> float:
        predictor = learner.adapt(task.support_x, task.support_y, steps=steps)
        with torch.no_grad():
            outputs = predictor(task.query_x)
        return learner.score(outputs, task.query_y)

    def scores_in_threads(tasks: list[Task]) -> Iterator[float]:
        return map_in_threads(lambda j: score(tasks[j]), len(tasks), threads, learner.parameters())

    was_training = learner.training
    learner.eval()
    scores: list[float] = []
    chunk = 1 if threads == 1 else 8 * threads  # episodes drawn ahead of the threads
    try:
        with tqdm(total=episodes, desc="evaluate", disable=not progress, leave=False) as bar:
            for start in range(0, episodes, chunk):
                tasks = [
                    sampler.episode(i).to(device)
                    for i in range(start, min(start + chunk, episodes))
                ]
                for value in scores_in_threads(tasks):
                    scores.append(value)
                    bar.update()
    finally:
        learner.train(was_training)
    # The episodes' shape goes with the seed: compare() pairs only results on the same episodes.
    shape = {"shots": sampler.shots, "queries": sampler.queries}
    if sampler.task_type == "classification":  # a task family ignores ways
        shape["ways"] = sampler.ways
    return Result.from_scores(scores, metric=metric, seed=sampler.seed, steps=steps, **shape)


def _task_threads(learner: MetaLearner, task_threads: int | None) -> int:
    own = getattr(learner, "task_threads", None)
    if task_threads is None:
        return 1 if own is None else int(own)
    if task_threads > 1 and own is None:
        raise UserError(
            f"{type(learner).__name__} does not adapt on task threads (only the gradient-based "
            "learners do); evaluate it with task_threads=1"
        )
    return check_task_threads(task_threads, learner)


@dataclass
class Comparison:
    """The paired difference of two results on the same episodes (``b - a``)."""

    a: str
    b: str
    mean_diff: float
    ci95: float
    significant: bool

    def summary(self) -> str:
        """One line, e.g. ``maml - protonet: +1.20 ± 0.80 (significant)``."""
        verdict = "significant" if self.significant else "not significant"
        return f"{self.b} - {self.a}: {self.mean_diff:+.4f} ± {self.ci95:.4f} ({verdict} at 95%)"


def compare(results: dict[str, Result]) -> list[Comparison]:
    """Paired differences between every pair of results evaluated on the same episodes.

    A difference is significant when its 95% CI excludes zero. Results must share the metric,
    the sampler seed, the number of episodes and (when recorded in ``info``, as :func:`evaluate`
    does) the episodes' ways, shots and queries; otherwise a ``ValueError`` says which differs.

    Example:
        >>> a = Result.from_scores([0.5, 0.6, 0.7], "accuracy", seed=0)
        >>> b = Result.from_scores([0.6, 0.7, 0.8], "accuracy", seed=0)
        >>> compare({"a": a, "b": b})[0].significant
        True
    """
    names = list(results)
    out = []
    for i, name_a in enumerate(names):
        for name_b in names[i + 1 :]:
            ra, rb = results[name_a], results[name_b]
            if ra.metric != rb.metric:
                raise ValueError(
                    f"{name_a!r} and {name_b!r} have different metrics ({ra.metric}/{rb.metric}); "
                    "compare results of the same kind of task"
                )
            shape = [k for k in _EPISODE_KEYS if k in ra.info and k in rb.info]
            if (ra.seed, ra.episodes, *(ra.info[k] for k in shape)) != (
                rb.seed, rb.episodes, *(rb.info[k] for k in shape)
            ):  # fmt: skip
                differ = ", ".join(
                    f"{k} {a}/{b}"
                    for k, a, b in [
                        ("seeds", ra.seed, rb.seed),
                        ("episodes", ra.episodes, rb.episodes),
                        *((k, ra.info[k], rb.info[k]) for k in shape),
                    ]
                    if a != b
                )
                raise ValueError(
                    f"{name_a!r} and {name_b!r} were not evaluated on the same episodes "
                    f"({differ}); evaluate both with one sampler"
                )
            diffs = np.asarray(rb.scores) - np.asarray(ra.scores)
            mean, ci = mean_ci95(diffs)
            out.append(Comparison(name_a, name_b, mean, ci, significant=abs(mean) > ci))
    return out
