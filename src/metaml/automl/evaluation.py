"""Leave-one-dataset-out evaluation of recommenders on a meta-knowledge matrix.

For every dataset, each recommender is fitted on the *other* datasets, leaving out the test
dataset's whole family (copies and splits never leak), and ranks the candidate configurations
for the test dataset from its meta-features. The figure of merit after ``b`` evaluations is the
best normalised balanced accuracy (0 = worst candidate on that dataset, 1 = best) among the
first ``b`` configurations, read from the dataset's stored scores.

Example:
    >>> import numpy as np
    >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
    >>> from metaml.automl.recommend import StaticPortfolio
    >>> c = candidate_configurations(8)
    >>> kb = MetaKnowledge(["a", "b", "c"], ["a", "b", "c"], ["f"], np.zeros((3, 1)), c,
    ...                    np.tile(np.linspace(0.5, 0.9, 8), (3, 1)), np.zeros((3, 8)), {})
    >>> leave_one_dataset_out(kb, {"static": lambda i: [StaticPortfolio()]})["static"][:, 0]
    array([1., 1., 1.])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from metaml.automl.knowledge import MetaKnowledge
from metaml.automl.recommend import Recommender, evaluation_order, normalised_scores


def best_so_far(rec: Recommender, kb: MetaKnowledge, i: int, norm: np.ndarray) -> np.ndarray:
    """Best normalised score of dataset ``i`` among the first b evaluations, b = 1..C (an
    adaptive recommender sees the stored scores of those before, :func:`evaluation_order`).

    Example:
        >>> best_so_far.__name__
        'best_so_far'
    """
    ranked = evaluation_order(rec, kb, i, len(kb.configurations))
    values = np.nan_to_num(norm[i, ranked], nan=0.0)  # a missing score counts as the worst
    best = np.maximum.accumulate(values)
    full = np.full(len(kb.configurations), best[-1])
    full[: len(best)] = best
    return full


def leave_one_dataset_out(
    kb: MetaKnowledge,
    methods: Mapping[str, Callable[[int], list[Recommender]]],
    test: Sequence[int] | None = None,
    n_jobs: int = 1,
    train_on: MetaKnowledge | None = None,
) -> dict[str, np.ndarray]:
    """``{method: (tests, candidates)}`` best-so-far normalised scores.

    ``methods[name](i)`` returns fresh recommenders for test dataset ``i``; several (random
    orders, shuffles) are averaged. ``test`` lists the datasets held out in turn (default: all;
    every other dataset outside the test dataset's family still trains); rows come in its
    order. ``n_jobs`` runs test datasets in parallel (joblib; build each :class:`MetaModel`
    with ``n_jobs=1`` then, or the workers' forests share the cores). ``train_on`` (default
    ``kb``) is the knowledge the recommenders learn from, less the test dataset's family:
    another one over some of ``kb``'s candidates (an older, smaller knowledge) is judged on
    ``kb``'s scores.
    """
    from joblib import Parallel, delayed

    source = kb if train_on is None else train_on
    extra = {c.key for c in source.configurations} - {c.key for c in kb.configurations}
    if extra:
        raise ValueError(f"train_on has {len(extra)} candidates kb lacks")
    if source.metafeature_names != kb.metafeature_names:
        raise ValueError("train_on describes datasets by other meta-features than kb")
    rows = range(len(kb.names)) if test is None else list(test)
    norm = normalised_scores(kb.scores)
    per_row = Parallel(n_jobs=n_jobs)(
        delayed(_hold_out)(kb, source, methods, i, norm) for i in rows
    )
    return {m: np.array([curves[m] for curves in per_row]) for m in methods}


def _hold_out(
    kb: MetaKnowledge,
    source: MetaKnowledge,
    methods: Mapping[str, Callable[[int], list[Recommender]]],
    i: int,
    norm: np.ndarray,
) -> dict[str, np.ndarray]:
    families = np.array(source.families)
    train = source.subset(np.flatnonzero(families != kb.families[i]))
    return {
        name: np.mean([best_so_far(rec.fit(train), kb, i, norm) for rec in make(i)], axis=0)
        for name, make in methods.items()
    }
