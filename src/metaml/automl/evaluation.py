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

from collections.abc import Callable, Mapping

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
    kb: MetaKnowledge, methods: Mapping[str, Callable[[int], list[Recommender]]]
) -> dict[str, np.ndarray]:
    """``{method: (datasets, candidates)}`` best-so-far normalised scores.

    ``methods[name](i)`` returns fresh recommenders for test dataset ``i``; several (random
    orders, shuffles) are averaged.
    """
    norm = normalised_scores(kb.scores)
    n, c = kb.scores.shape
    out = {m: np.zeros((n, c)) for m in methods}
    families = np.array(kb.families)
    for i in range(n):
        train = kb.subset(np.flatnonzero(families != families[i]))
        for name, make in methods.items():
            curves = [best_so_far(rec.fit(train), kb, i, norm) for rec in make(i)]
            out[name][i] = np.mean(curves, axis=0)
    return out
