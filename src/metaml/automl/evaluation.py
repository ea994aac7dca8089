"""Leave-one-dataset-out evaluation of recommenders on a meta-knowledge matrix.

For every dataset, each recommender is fitted on the *other* datasets, leaving out the test
dataset's whole family (copies and splits never leak), and ranks the candidate configurations
for the test dataset from its meta-features. The figure of merit after ``b`` evaluations is the
best normalised balanced accuracy (0 = worst candidate on that dataset, 1 = best) among the
first ``b`` configurations, read from the dataset's stored scores.

That figure reads the same noisy scores the search chose by, so the more a method evaluates,
the more it gains from the luckiest of its scores. With ``repeats`` (independent measurements
of the same datasets: builds with other split seeds) the search instead reads one repeat's
scores, returns the best configuration it saw, and that one is judged on the other repeats'
mean (:func:`judged_so_far`): what a user's search would return, scored on data it did not
choose by.

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

import warnings
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


def judged_so_far(
    rec: Recommender, kb: MetaKnowledge, i: int, seen: np.ndarray, judged: np.ndarray
) -> np.ndarray:
    """The judged score of what the search returns after b = 1..C evaluations: on dataset
    ``i``, the fitted ``rec`` reads the scores ``seen`` (one per candidate, as a real search
    measures them once), returns the best of its first b by them (the first on ties), and that
    configuration scores ``judged`` (normalised scores of another measurement; a missing one
    counts as 0).

    Example:
        >>> import numpy as np
        >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
        >>> from metaml.automl.recommend import StaticPortfolio
        >>> c = candidate_configurations(8)[:3]
        >>> kb = MetaKnowledge(["a", "b"], ["a", "b"], ["f"], np.zeros((2, 1)), c,
        ...                    np.array([[0.9, 0.8, 0.7], [0.5, 0.6, 0.7]]), np.zeros((2, 3)), {})
        >>> rec = StaticPortfolio().fit(kb.subset([0]))  # evaluates 0, then 1, then 2
        >>> judged_so_far(rec, kb, 1, np.array([0.5, 0.8, 0.6]), np.array([0.0, 0.5, 1.0]))
        array([0. , 0.5, 0.5])
    """
    ranked = evaluation_order(rec, kb, i, len(kb.configurations), scores=seen)
    seen_in_order = np.nan_to_num(seen[ranked], nan=-np.inf)  # a failure is never returned
    returned = np.zeros(len(ranked), dtype=int)
    for b in range(1, len(ranked)):
        better = seen_in_order[b] > seen_in_order[returned[b - 1]]
        returned[b] = b if better else returned[b - 1]
    values = np.nan_to_num(judged[np.asarray(ranked)[returned]], nan=0.0)
    full = np.full(len(kb.configurations), values[-1])
    full[: len(values)] = values
    return full


def aligned_repeats(kb: MetaKnowledge, repeats: Sequence[MetaKnowledge]) -> np.ndarray:
    """``(repeats, datasets, candidates)`` raw scores of ``kb``'s datasets and candidates, in
    ``kb``'s order, from independent measurements of them (at least two).

    Example:
        >>> import numpy as np
        >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
        >>> c = candidate_configurations(8)[:2]
        >>> kb = MetaKnowledge(["a"], ["a"], ["f"], np.zeros((1, 1)), c,
        ...                    np.array([[0.6, 0.8]]), np.zeros((1, 2)), {})
        >>> aligned_repeats(kb, [kb, kb]).shape
        (2, 1, 2)
    """
    if len(repeats) < 2:
        raise ValueError(f"judging on repeats needs at least two of them, got {len(repeats)}")
    out = []
    for r, rep in enumerate(repeats):
        missing = sorted(set(kb.names) - set(rep.names))
        columns = {c.key: j for j, c in enumerate(rep.configurations)}
        lacking = [c.key for c in kb.configurations if c.key not in columns]
        if missing or lacking:
            raise ValueError(
                f"repeat {r} lacks {len(missing)} of the datasets (e.g. {missing[:3]}) and "
                f"{len(lacking)} of the candidates: build it on the same datasets and candidates"
            )
        position = {name: row for row, name in enumerate(rep.names)}
        rows = [position[n] for n in kb.names]
        out.append(rep.scores[np.ix_(rows, [columns[c.key] for c in kb.configurations])])
    return np.stack(out)


def leave_one_dataset_out(
    kb: MetaKnowledge,
    methods: Mapping[str, Callable[[int], list[Recommender]]],
    test: Sequence[int] | None = None,
    n_jobs: int = 1,
    train_on: MetaKnowledge | None = None,
    repeats: Sequence[MetaKnowledge] | None = None,
) -> dict[str, np.ndarray]:
    """``{method: (tests, candidates)}`` best-so-far normalised scores.

    ``methods[name](i)`` returns fresh recommenders for test dataset ``i``; several (random
    orders, shuffles) are averaged. ``test`` lists the datasets held out in turn (default: all;
    every other dataset outside the test dataset's family still trains); rows come in its
    order. ``n_jobs`` runs test datasets in parallel (joblib; build each :class:`MetaModel`
    with ``n_jobs=1`` then, or the workers' forests share the cores). ``train_on`` (default
    ``kb``) is the knowledge the recommenders learn from, less the test dataset's family:
    another one over some of ``kb``'s candidates (an older, smaller knowledge) is judged on
    ``kb``'s scores. ``repeats`` (independent measurements of ``kb``'s datasets, at least
    two) judges on held-out measurements instead (:func:`judged_so_far`): each repeat in turn is
    the one the search reads, the mean of the others the judge, and the curves are averaged.
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
    measured = None if repeats is None else aligned_repeats(kb, repeats)
    per_row = Parallel(n_jobs=n_jobs)(
        delayed(_hold_out)(kb, source, methods, i, norm, measured) for i in rows
    )
    return {m: np.array([curves[m] for curves in per_row]) for m in methods}


def _hold_out(
    kb: MetaKnowledge,
    source: MetaKnowledge,
    methods: Mapping[str, Callable[[int], list[Recommender]]],
    i: int,
    norm: np.ndarray,
    measured: np.ndarray | None,
) -> dict[str, np.ndarray]:
    families = np.array(source.families)
    train = source.subset(np.flatnonzero(families != kb.families[i]))
    pairs = None if measured is None else _seen_and_judge(measured[:, i])

    def curve(rec: Recommender) -> np.ndarray:
        if pairs is None:
            return best_so_far(rec, kb, i, norm)
        return np.mean([judged_so_far(rec, kb, i, seen, judge) for seen, judge in pairs], axis=0)

    return {
        name: np.mean([curve(rec.fit(train)) for rec in make(i)], axis=0)
        for name, make in methods.items()
    }


def _seen_and_judge(row: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each repeat of one dataset's scores (``(repeats, candidates)``): its raw scores and
    the normalised mean of the others."""
    pairs = []
    for r in range(len(row)):
        others = np.delete(row, r, axis=0)
        with warnings.catch_warnings():  # a candidate that failed in every other repeat
            warnings.simplefilter("ignore", RuntimeWarning)
            judge = np.nanmean(others, axis=0)
        pairs.append((row[r], normalised_scores(judge[None])[0]))
    return pairs
