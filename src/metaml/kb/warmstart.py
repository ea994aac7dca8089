"""Warm start: pick the stored model a new task starts from, instead of one global initialisation.

Strategies (:meth:`KnowledgeBase.warm_start <metaml.kb.KnowledgeBase.warm_start>`):

``nearest``
    the entry whose task representation is nearest the new task's (top-1);
``model-based``
    the ``k`` nearest entries, each loaded and scored on the new task's support set by
    :func:`support_score`; the lowest held-out loss wins (ties: the nearer entry);
``random``
    a uniformly random entry, drawn with ``seed``: the control that shows whether choosing helps.

The chosen learner is returned as is; adapting it to the task (``learner.adapt``) is the caller's
usual next step.

Example:
    >>> # ws = kb.warm_start(task, "model-based", k=5)
    >>> # predictor = ws.learner.adapt(task.support_x, task.support_y)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metaml.errors import UserError

if TYPE_CHECKING:
    from metaml.algorithms.base import MetaLearner
    from metaml.kb.store import Entry, KnowledgeBase, Metric
    from metaml.tasks import Task

Strategy = Literal["nearest", "model-based", "random"]
STRATEGIES: tuple[str, ...] = ("nearest", "model-based", "random")


@dataclass
class WarmStart:
    """The chosen entry and its learner; ``scores`` maps each candidate's id to its support score.

    Example:
        >>> # ws = kb.warm_start(task); ws.entry.name, ws.learner
    """

    strategy: str
    entry: Entry
    learner: MetaLearner
    scores: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def _held_out_loss(predictor_logits: Tensor, target: Tensor) -> float:
    return float(F.cross_entropy(predictor_logits.float(), target).item())


def support_score(
    learner: MetaLearner,
    support_x: Tensor,
    support_y: Tensor,
    steps: int | None = None,
    max_folds: int | None = None,
) -> float:
    """Mean held-out cross-entropy of ``learner`` on a support set (lower is better).

    Leave-one-out: for each support example whose class has another example, adapt on the
    others and score the left-out one; ``max_folds`` caps the number of folds (examples spread
    over the classes, in support order: the first example of each class, then the second, ...)
    for large support sets. In a 1-shot task no example can be left out without
    losing its class, so the learner is adapted on the whole support set and scored on it
    (a resubstitution loss: a weaker signal, documented in docs/kb.md).

    Example:
        >>> from metaml.nn import create_backbone
        >>> from metaml.algorithms.protonet import ProtoNet
        >>> net = ProtoNet(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)))
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
        >>> support_score(net, x, y) >= 0
        True
    """
    if learner.task_type != "classification":
        raise UserError(
            "model-based warm start scores classification learners; use strategy nearest"
        )
    counts = torch.bincount(support_y)
    folds = [i for i in range(len(support_y)) if counts[support_y[i]] > 1]
    if max_folds is not None:
        # round-robin over classes: the n-th example of every class before any (n+1)-th
        rank = {i: int((support_y[:i] == support_y[i]).sum()) for i in folds}
        folds = sorted(folds, key=lambda i: (rank[i], i))[:max_folds]
    if not folds:
        predictor = learner.adapt(support_x, support_y, steps=steps)
        with torch.no_grad():
            return _held_out_loss(predictor(support_x), support_y)
    losses = []
    for i in folds:
        keep = torch.arange(len(support_y)) != i
        predictor = learner.adapt(support_x[keep], support_y[keep], steps=steps)
        with torch.no_grad():
            losses.append(_held_out_loss(predictor(support_x[i : i + 1]), support_y[i : i + 1]))
    return float(np.mean(losses))


def choose(
    kb: KnowledgeBase,
    task: Task,
    strategy: str,
    *,
    k: int = 5,
    steps: int | None = None,
    seed: int = 0,
    metric: Metric = "euclidean",
    device: str = "cpu",
    max_folds: int | None = None,
) -> WarmStart:
    """The warm start of ``task`` by ``strategy``; see :meth:`KnowledgeBase.warm_start`.

    Example:
        >>> # choose(kb, task, "random", seed=3).entry.id
    """
    if strategy not in STRATEGIES:
        from metaml.errors import did_you_mean

        raise UserError(
            f"unknown warm-start strategy {strategy!r}{did_you_mean(strategy, STRATEGIES)}; "
            f"use one of {', '.join(STRATEGIES)}"
        )
    if len(kb) == 0:
        raise UserError(f"{kb.path} is empty; add trained models with metaml kb add first")
    if strategy == "random":
        entries = kb.entries()
        rng = np.random.default_rng(seed)
        entry = entries[int(rng.integers(len(entries)))]
        return WarmStart(strategy, entry, kb.load_learner(entry, device=device))
    neighbors = kb.nearest(task, k=1 if strategy == "nearest" else k, metric=metric)
    if strategy == "nearest":
        entry = neighbors[0].entry
        return WarmStart(strategy, entry, kb.load_learner(entry, device=device))
    best: tuple[float, int] | None = None
    scores: dict[int, float] = {}
    chosen: tuple[Entry, MetaLearner] | None = None
    sx, sy = task.support_x.to(device), task.support_y.to(device)
    for rank, neighbor in enumerate(neighbors):
        learner = kb.load_learner(neighbor.entry, device=device)
        score = support_score(learner, sx, sy, steps=steps, max_folds=max_folds)
        scores[neighbor.entry.id] = score
        if best is None or (score, rank) < best:
            best, chosen = (score, rank), (neighbor.entry, learner)
    assert chosen is not None
    return WarmStart(strategy, chosen[0], chosen[1], scores)
