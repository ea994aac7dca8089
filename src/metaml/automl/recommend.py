"""Recommenders: rank the candidate configurations of the meta-knowledge for a new dataset.

All of them are fitted on a :class:`~metaml.automl.knowledge.MetaKnowledge` (the training
datasets only) and return a ranking of its candidate configurations with a predicted score:

- :class:`NearestDatasets` -- auto-sklearn's warm start: the best configuration of each of the
  nearest training datasets (L1 distance between normalised meta-features), nearest first;
  predicted score = that configuration's mean normalised score over the ``k`` nearest.
- :class:`MetaModel` -- a random forest regressor that predicts a configuration's normalised
  score (0 = worst candidate on that dataset, 1 = best) or its rank among the candidates of
  that dataset (``target="rank"``) from the dataset's meta-features and the configuration's
  encoding; candidates ranked by prediction.
- :class:`StaticPortfolio` -- ignores meta-features: a greedy portfolio that maximises the
  mean over training datasets of the best normalised score among the chosen configurations.
- :class:`LocalPortfolio` -- the same greedy portfolio, built on the ``k`` nearest training
  datasets only (``k=1``: the nearest dataset's order; ``k=None``: the static portfolio).
- :class:`ActiveTesting` -- adaptive: after each evaluation on the new dataset it weights the
  training datasets by how well their scores agree with the ones observed so far (pairs of
  configurations in the same order) and proposes the configuration that most raises the
  weighted mean best score (Leite, Brazdil & Vanschoren 2012, "active testing").
- :class:`InnerCV` -- chooses a recommender's setting (e.g. that ``k``) by leave-one-family-out
  over the training datasets only.
- :class:`RandomOrder` and :class:`SingleDefault` -- the baselines.

Meta-features are normalised by a signed ``log1p`` (counts and ratios span orders of magnitude)
followed by standardisation with the training datasets' mean and standard deviation.

Example:
    >>> import numpy as np
    >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
    >>> cands = candidate_configurations(8)
    >>> kb = MetaKnowledge(["a", "b"], ["a", "b"], ["f"], np.array([[0.0], [10.0]]), cands,
    ...                    np.array([np.linspace(0.5, 0.9, 8), np.linspace(0.9, 0.5, 8)]),
    ...                    np.zeros((2, 8)), {})
    >>> NearestDatasets(k=1).fit(kb).rank(np.array([9.0]))[0].config.algorithm
    'logreg'
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metaml.automl.knowledge import MetaKnowledge
from metaml.automl.portfolio import ALGORITHMS, Configuration
from metaml.errors import UserError, unknown_name_error


@dataclass(frozen=True)
class Recommendation:
    """A configuration, its predicted (normalised) score and why it was chosen.

    Example:
        >>> from metaml.automl.portfolio import default_configuration
        >>> Recommendation(default_configuration("knn"), 0.9, "nearest: iris").score
        0.9
    """

    config: Configuration
    score: float
    source: str


def normalised_scores(scores: np.ndarray) -> np.ndarray:
    """Per dataset (row): 0 = worst evaluated configuration, 1 = best; NaN stays NaN.

    Example:
        >>> normalised_scores(np.array([[0.5, 0.7, 0.9], [0.6, 0.6, 0.6]])).round(3).tolist()
        [[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]
    """
    lo = np.nanmin(scores, axis=1, keepdims=True)
    hi = np.nanmax(scores, axis=1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(np.isnan(scores), np.nan, out)


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Per dataset (row): the rank of each evaluated configuration scaled to 0 (worst) .. 1
    (best), ties sharing their mean rank; NaN stays NaN, a single value is 1.

    Unlike :func:`normalised_scores` one failing configuration does not squash the others
    together near 1, so a model fitted on ranks spends itself on the order among the good
    configurations.

    Example:
        >>> rank_scores(np.array([[0.5, np.nan, 0.9, 0.89], [0.6, 0.6, 0.7, 0.5]])).tolist()
        [[0.0, nan, 1.0, 0.5], [0.5, 0.5, 1.0, 0.0]]
    """
    from scipy.stats import rankdata

    out = np.full(np.shape(scores), np.nan)
    for i, row in enumerate(np.asarray(scores, dtype=float)):
        ok = ~np.isnan(row)
        if ok.sum() == 1:
            out[i, ok] = 1.0
        elif ok.any():
            out[i, ok] = (rankdata(row[ok]) - 1) / (ok.sum() - 1)
    return out


class MetaFeatureScaler:
    """Signed ``log1p`` then standardisation with the training rows' mean and deviation.

    Example:
        >>> s = MetaFeatureScaler().fit(np.array([[0.0, 5.0], [2.0, 5.0]]))
        >>> s.transform(np.array([[1.0, 5.0]])).round(3).tolist()
        [[0.262, 0.0]]
    """

    def fit(self, mf: np.ndarray) -> MetaFeatureScaler:
        """Learn the mean and deviation of the transformed training meta-features."""
        t = self._log(mf)
        self.mean_ = np.nanmean(t, axis=0)
        std = np.nanstd(t, axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0)
        return self

    def transform(self, mf: np.ndarray) -> np.ndarray:
        """Scale meta-features (rows); missing values become the mean (0)."""
        z = (self._log(mf) - self.mean_) / self.std_
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    @staticmethod
    def _log(mf: np.ndarray) -> np.ndarray:
        mf = np.asarray(mf, dtype=float)
        return np.sign(mf) * np.log1p(np.abs(mf))


def _as_vector(metafeatures: Mapping[str, float] | np.ndarray, names: Sequence[str]) -> np.ndarray:
    if isinstance(metafeatures, Mapping):
        missing = [n for n in names if n not in metafeatures]
        if missing:
            raise UserError(
                f"meta-features missing {missing[:5]}; compute them with metafeatures()"
            )
        return np.array([metafeatures[n] for n in names], dtype=float)
    vec = np.asarray(metafeatures, dtype=float).ravel()
    if vec.size != len(names):
        raise UserError(f"expected {len(names)} meta-features, got {vec.size}")
    return vec


class Recommender:
    """The interface: ``fit(knowledge)`` then ``rank(metafeatures, n)``.

    Example:
        >>> issubclass(NearestDatasets, Recommender)
        True
    """

    name = "recommender"
    adaptive = False
    """True when :meth:`propose` depends on the scores observed so far (else it follows
    :meth:`rank`)."""

    def fit(self, kb: MetaKnowledge) -> Recommender:
        """Learn from the training datasets of ``kb``."""
        self.kb_ = kb
        self.normalised_ = normalised_scores(kb.scores)
        return self

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """The candidates, best first (at most ``n``)."""
        raise NotImplementedError

    def propose(
        self, metafeatures: Mapping[str, float] | np.ndarray, observed: Mapping[str, float]
    ) -> Recommendation | None:
        """The next candidate to evaluate, given the scores ``observed`` so far on the new
        dataset (``{configuration key: balanced accuracy}``); None when all are observed.

        The default takes the first unobserved candidate of :meth:`rank`; adaptive
        recommenders override it.
        """
        return next((r for r in self.rank(metafeatures) if r.config.key not in observed), None)


def evaluate_in_order(
    rec: Recommender,
    metafeatures: Mapping[str, float] | np.ndarray,
    evaluate: Callable[[Recommendation], float | None],
    budget: int,
) -> Iterator[tuple[Recommendation, float]]:
    """Evaluate up to ``budget`` candidates of the fitted ``rec`` one by one, each chosen
    after the scores of the ones before (for an adaptive recommender); yields each
    recommendation with its score. ``evaluate`` returning None (it could not, e.g. out of
    time) ends the loop.

    Example:
        >>> import numpy as np
        >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
        >>> cands = candidate_configurations(8)
        >>> kb = MetaKnowledge(["a"], ["a"], ["f"], np.zeros((1, 1)), cands,
        ...                    np.linspace(0.5, 0.9, 8)[None], np.zeros((1, 8)), {})
        >>> rec = StaticPortfolio().fit(kb)
        >>> [round(score, 2) for _, score in evaluate_in_order(rec, [0.0], lambda c: 0.7, 2)]
        [0.7, 0.7]
    """
    observed: dict[str, float] = {}
    ranked = iter([] if rec.adaptive else rec.rank(metafeatures, budget))
    while len(observed) < budget:
        if rec.adaptive:
            nxt = rec.propose(metafeatures, observed)
        else:
            nxt = next((r for r in ranked if r.config.key not in observed), None)
        if nxt is None or nxt.config.key in observed:  # nothing new to evaluate
            return
        score = evaluate(nxt)
        if score is None:
            return
        observed[nxt.config.key] = score
        yield nxt, score


def evaluation_order(
    rec: Recommender, kb: MetaKnowledge, i: int, budget: int, scores: np.ndarray | None = None
) -> list[int]:
    """The candidates (column indices) the fitted ``rec`` would evaluate on dataset ``i`` of
    ``kb``, in order, with the stored scores as the evaluations (a missing score reads as 0,
    below every real one); ``scores`` (one per candidate) replaces dataset ``i``'s stored row,
    e.g. by one repeat's measurement of it.

    Example:
        >>> import numpy as np
        >>> from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
        >>> cands = candidate_configurations(8)
        >>> kb = MetaKnowledge(["a", "b"], ["a", "b"], ["f"], np.zeros((2, 1)), cands,
        ...                    np.array([np.linspace(0.5, 0.9, 8)] * 2), np.zeros((2, 8)), {})
        >>> evaluation_order(StaticPortfolio().fit(kb.subset([0])), kb, 1, 3)  # then ties
        [7, 0, 1]
    """
    index = {c.key: j for j, c in enumerate(kb.configurations)}
    row = kb.scores[i] if scores is None else scores

    def stored(rec: Recommendation) -> float:
        return float(np.nan_to_num(row[index[rec.config.key]], nan=0.0))

    return [
        index[r.config.key] for r, _ in evaluate_in_order(rec, kb.metafeatures[i], stored, budget)
    ]


class NearestDatasets(Recommender):
    """auto-sklearn's warm start: the best configuration of each nearest training dataset.

    ``shuffle_seed`` permutes the training datasets' meta-features among them first (the
    control that shows whether the meta-features matter).

    Example:
        >>> NearestDatasets(k=5).k
        5
    """

    name = "nearest"

    def __init__(self, k: int = 10, shuffle_seed: int | None = None) -> None:
        self.k = k
        self.shuffle_seed = shuffle_seed

    def fit(self, kb: MetaKnowledge) -> NearestDatasets:
        """Scale the training meta-features."""
        super().fit(kb)
        mf = kb.metafeatures
        if self.shuffle_seed is not None:
            mf = mf[np.random.default_rng(self.shuffle_seed).permutation(len(mf))]
        self.scaler_ = MetaFeatureScaler().fit(mf)
        self.train_ = self.scaler_.transform(mf)
        return self

    def neighbours(self, metafeatures: Mapping[str, float] | np.ndarray) -> np.ndarray:
        """Indices of the training datasets, nearest first (L1 on normalised meta-features)."""
        z = self.scaler_.transform(_as_vector(metafeatures, self.kb_.metafeature_names)[None])[0]
        dist = np.abs(self.train_ - z).sum(axis=1)
        return np.argsort(dist, kind="stable")

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """Best configuration of the nearest dataset, then of the next, ... (no repeats); the
        remaining candidates follow by mean normalised score over the ``k`` nearest."""
        order = self.neighbours(metafeatures)
        near = order[: self.k]
        with np.errstate(invalid="ignore"):
            mean_near = np.nanmean(self.normalised_[near], axis=0)
        mean_near = np.nan_to_num(mean_near, nan=0.0)
        chosen: list[int] = []
        sources: dict[int, str] = {}
        for i in order:
            row = self.kb_.scores[i]
            if np.all(np.isnan(row)):
                continue
            j = int(np.nanargmax(row))
            if j not in sources:
                chosen.append(j)
                sources[j] = f"nearest: best on {self.kb_.names[i]}"
        rest = [j for j in np.argsort(-mean_near, kind="stable") if j not in sources]
        out = [
            Recommendation(self.kb_.configurations[j], float(mean_near[j]), sources[j])
            for j in chosen
        ]
        out += [
            Recommendation(self.kb_.configurations[j], float(mean_near[j]), "nearest: mean of k")
            for j in rest
        ]
        return out[:n]


def encode_configuration(config: Configuration) -> dict[str, float]:
    """Numbers for the meta-model: one-hot algorithm, log10 of log-scaled parameters, the
    index of a categorical choice; parameters of other algorithms are absent.

    Example:
        >>> from metaml.automl.portfolio import default_configuration
        >>> encode_configuration(default_configuration("logreg"))["logreg:C"]
        0.0
    """
    algo = ALGORITHMS[config.algorithm]
    out = {f"algorithm={a}": float(a == config.algorithm) for a in ALGORITHMS}
    for param, spec in algo.space.items():
        value = config.params[param]
        key = f"{config.algorithm}:{param}"
        if spec[0] == "cat":
            out[key] = float(list(spec[1]).index(value))
        else:
            out[key] = math.log10(value) if spec[3] else float(value)
    return out


class MetaModel(Recommender):
    """A random forest that predicts a configuration's normalised score (``target=
    "normalised"``) or its scaled rank among the dataset's candidates (``"rank"``,
    :func:`rank_scores`) from the dataset's meta-features and the configuration; candidates
    ranked by the prediction. ``n_jobs`` workers fit the forest (-1: every core).

    ``weight_by_repeats=True`` weighs each training dataset by the number of cross-validations
    its scores average (:meth:`MetaKnowledge.repeats`): a mean of ``r`` repeats has ``1/r``
    the noise variance of one, so a knowledge that joins repeated and single measurements
    (``metaml automl merge --all-datasets``) does not let the noisier datasets count as much.

    Example:
        >>> MetaModel(n_estimators=50).n_estimators
        50
    """

    name = "meta-model"

    def __init__(
        self,
        n_estimators: int = 200,
        random_state: int = 0,
        target: str = "normalised",
        n_jobs: int = -1,
        weight_by_repeats: bool = False,
    ) -> None:
        if target not in ("normalised", "rank"):
            raise UserError(f"target must be 'normalised' or 'rank', got {target!r}")
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.target = target
        self.n_jobs = n_jobs
        self.weight_by_repeats = weight_by_repeats

    def fit(self, kb: MetaKnowledge) -> MetaModel:
        """Fit the forest on every (training dataset, evaluated configuration) pair."""
        from sklearn.ensemble import RandomForestRegressor

        super().fit(kb)
        self.scaler_ = MetaFeatureScaler().fit(kb.metafeatures)
        z = self.scaler_.transform(kb.metafeatures)
        encodings = [encode_configuration(c) for c in kb.configurations]
        self.columns_ = sorted({k for e in encodings for k in e})
        self.config_matrix_ = np.array(
            [[e.get(k, -10.0) for k in self.columns_] for e in encodings]
        )  # -10: "not this algorithm's parameter", below every log10 value in the spaces
        y = rank_scores(kb.scores) if self.target == "rank" else self.normalised_
        rows, cols = np.nonzero(~np.isnan(y))
        features = np.hstack([z[rows], self.config_matrix_[cols]])
        self.sample_weight_ = self._row_weights(kb, rows)
        self.forest_ = RandomForestRegressor(
            n_estimators=self.n_estimators,
            min_samples_leaf=3,
            max_features=0.5,
            n_jobs=self.n_jobs,  # the same trees whatever the number of workers
            random_state=self.random_state,
        ).fit(features, y[rows, cols], sample_weight=self.sample_weight_)
        # Predicting 64 rows is cheap, and one worker sums the trees in a fixed order, so ties
        # between candidates break the same way on every run.
        self.forest_.set_params(n_jobs=1)
        return self

    def _row_weights(self, kb: MetaKnowledge, rows: np.ndarray) -> np.ndarray | None:
        """Per training row, its dataset's number of repeats; None when unweighted or when
        every dataset has as many (the same trees as unweighted, without rounding drift)."""
        if not self.weight_by_repeats:
            return None
        repeats = kb.repeats()
        return None if np.all(repeats == repeats[0]) else repeats[rows].astype(float)

    def predict(self, metafeatures: Mapping[str, float] | np.ndarray) -> np.ndarray:
        """Predicted normalised score (or scaled rank) of every candidate configuration."""
        vec = _as_vector(metafeatures, self.kb_.metafeature_names)
        z = self.scaler_.transform(vec[None])
        features = np.hstack([np.repeat(z, len(self.config_matrix_), axis=0), self.config_matrix_])
        return np.asarray(self.forest_.predict(features))

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """Candidates by predicted normalised score, best first."""
        pred = self.predict(metafeatures)
        order = np.argsort(-pred, kind="stable")
        return [
            Recommendation(self.kb_.configurations[j], float(pred[j]), "meta-model")
            for j in order[:n]
        ]


def greedy_portfolio(
    norm: np.ndarray, n: int | None = None, first: Sequence[int] = ()
) -> list[int]:
    """Columns (candidates) in greedy order: each step adds the one that most raises the mean,
    over rows (datasets), of the best normalised score among those chosen (NaN counts as 0, ties
    go to the lower index); after ``n`` steps (counting ``first``) the rest follow by mean
    score. ``first``: columns chosen already, kept at the front.

    Example:
        >>> greedy_portfolio(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]]))
        [1, 0, 2]
        >>> greedy_portfolio(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]), first=[2])
        [2, 0, 1]
    """
    norm = np.nan_to_num(np.asarray(norm, dtype=float), nan=0.0)
    steps = norm.shape[1] if n is None else min(n, norm.shape[1])
    order = [int(j) for j in first]
    best = norm[:, order].max(axis=1) if order else np.zeros(len(norm))
    remaining = np.setdiff1d(np.arange(norm.shape[1]), order)
    for _ in range(steps - len(order)):
        values = np.maximum(best[:, None], norm[:, remaining]).mean(axis=0)
        pick = int(remaining[int(np.argmax(values))])
        order.append(pick)
        best = np.maximum(best, norm[:, pick])
        remaining = remaining[remaining != pick]
    # Past the greedy steps the order only fills the list; mean score is a cheap fair choice.
    rest = remaining[np.argsort(-norm[:, remaining].mean(axis=0), kind="stable")]
    return order + [int(j) for j in rest]


class StaticPortfolio(Recommender):
    """A greedy portfolio that ignores meta-features (auto-sklearn 2.0's): each step adds the
    configuration that most raises the mean, over training datasets, of the best normalised
    score among those chosen.

    Example:
        >>> StaticPortfolio().name
        'static portfolio'
    """

    name = "static portfolio"

    def fit(self, kb: MetaKnowledge) -> StaticPortfolio:
        """Compute the greedy order once."""
        super().fit(kb)
        self.order_ = greedy_portfolio(self.normalised_)
        self.mean_score_ = np.nanmean(self.normalised_, axis=0)
        return self

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """The greedy order (the same for every dataset)."""
        return [
            Recommendation(self.kb_.configurations[j], float(self.mean_score_[j]), self.name)
            for j in self.order_[:n]
        ]


class LocalPortfolio(Recommender):
    """The greedy portfolio of :class:`StaticPortfolio`, built on the ``k`` nearest training
    datasets (L1 on normalised meta-features, as :class:`NearestDatasets`).

    ``k`` moves between the two: ``k=1`` ranks by the nearest dataset's own scores,
    ``k=None`` (all datasets) is the static portfolio. A small ``k`` trusts the meta-features,
    a large one averages out the noise of single datasets; :class:`InnerCV` chooses it.
    The predicted score is the mean normalised score over the ``k`` nearest.

    Example:
        >>> LocalPortfolio(k=5).k
        5
    """

    name = "local portfolio"

    def __init__(self, k: int | None = 10, shuffle_seed: int | None = None) -> None:
        self.k = k
        self.shuffle_seed = shuffle_seed

    def fit(self, kb: MetaKnowledge) -> LocalPortfolio:
        """Scale the training meta-features (as :class:`NearestDatasets`)."""
        super().fit(kb)
        self.nearest_ = NearestDatasets(shuffle_seed=self.shuffle_seed).fit(kb)
        return self

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """The greedy order on the ``k`` nearest datasets (at most ``n``)."""
        near = self.nearest_.neighbours(metafeatures)[: self.k]
        norm = self.normalised_[near]
        with np.errstate(invalid="ignore"):
            mean_near = np.nan_to_num(np.nanmean(norm, axis=0), nan=0.0)
        source = f"local portfolio: {len(near)} nearest"
        return [
            Recommendation(self.kb_.configurations[j], float(mean_near[j]), source)
            for j in greedy_portfolio(norm, n)[:n]
        ]


class ActiveTesting(Recommender):
    """Adaptive warm start: the scores observed on the new dataset pick the training datasets
    that resemble it (active testing, Leite, Brazdil & Vanschoren 2012).

    Each training dataset ``d`` gets the log-weight ``beta * (concordant - discordant) / m``
    over the pairs of the ``m`` configurations observed so far: a pair is concordant when
    ``d``'s scores order the two as the new dataset's do. The next configuration is the one
    that most raises the weighted mean, over training datasets, of the best normalised score
    among the observed configurations and it (the greedy step of :class:`StaticPortfolio`).

    Before any observation the weights are equal, so the first proposal is the static
    portfolio's, unless ``start`` (a recommender fitted with it, e.g. :class:`MetaModel`, which
    reads the meta-features) gives the first one. ``beta=0`` keeps the weights equal (the
    static portfolio); ``beta=None`` chooses it from ``grid`` by :class:`InnerCV` on the
    training datasets (``budget`` evaluations, without ``start``, whose refits would cost a
    meta-model per inner fold). :meth:`rank` is the order before any score; :meth:`propose`
    is the adaptive one.

    Example:
        >>> ActiveTesting(beta=3.0).adaptive
        True
    """

    name = "active testing"
    adaptive = True

    def __init__(
        self,
        beta: float | None = None,
        start: Recommender | None = None,
        grid: Sequence[float] = (0.0, 1.0, 3.0, 10.0),
        budget: int = 5,
    ) -> None:
        for value in (beta, *grid) if beta is not None else tuple(grid):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(
                    f"beta must be a finite number >= 0 (or None: chosen by inner CV from "
                    f"grid), got {value!r}"
                )
        self.beta = beta
        self.start = start
        self.grid = grid
        self.budget = budget

    def fit(self, kb: MetaKnowledge) -> ActiveTesting:
        """Keep the training datasets' normalised scores (a missing score as 0, the worst),
        choose ``beta`` when it is None, fit ``start``."""
        super().fit(kb)
        self.filled_ = np.nan_to_num(self.normalised_, nan=0.0)
        self.index_ = {c.key: j for j, c in enumerate(kb.configurations)}
        if self.beta is None:
            inner = InnerCV(lambda b: ActiveTesting(beta=b), self.grid, self.budget).fit(kb)
            self.beta_ = float(inner.chosen_)
        else:
            self.beta_ = float(self.beta)
        # A copy: fitting must not change the recommender the caller passed in.
        self.start_ = None if self.start is None else copy.deepcopy(self.start).fit(kb)
        return self

    def weights(self, observed: Mapping[str, float]) -> np.ndarray:
        """The training datasets' weights (summing to 1) given the ``observed`` scores."""
        cols = [self.index_[k] for k in observed if k in self.index_]
        log_w = np.zeros(len(self.filled_))
        if len(cols) >= 2 and self.beta_ > 0:
            new = np.array([observed[self.kb_.configurations[j].key] for j in cols])
            with np.errstate(invalid="ignore"):  # -inf - -inf: two failures, a tie
                new_order = np.nan_to_num(np.sign(new[:, None] - new[None, :]), nan=0.0)
            train = self.filled_[:, cols]
            train_order = np.sign(train[:, :, None] - train[:, None, :])
            agreement = (new_order[None] * train_order).sum(axis=(1, 2)) / 2  # each pair once
            log_w = self.beta_ * agreement / len(cols)
        w = np.exp(log_w - log_w.max())
        return np.asarray(w / w.sum())

    def _start(self, metafeatures: Mapping[str, float] | np.ndarray) -> Recommendation | None:
        if self.start_ is None:
            return None
        top = self.start_.rank(metafeatures, 1)[0]
        return Recommendation(top.config, top.score, f"active testing: {self.start_.name} first")

    def propose(
        self, metafeatures: Mapping[str, float] | np.ndarray, observed: Mapping[str, float]
    ) -> Recommendation | None:
        """The configuration that most raises the weighted mean best score (``start``'s first
        when nothing is observed); its predicted score is its weighted mean normalised score."""
        first = self._start(metafeatures) if not observed else None
        if first is not None:
            return first
        w = self.weights(observed)
        seen = [self.index_[k] for k in observed if k in self.index_]
        remaining = np.setdiff1d(np.arange(self.filled_.shape[1]), seen)
        if len(remaining) == 0:
            return None
        best = self.filled_[:, seen].max(axis=1) if seen else np.zeros(len(w))
        gain = w @ np.maximum(best[:, None], self.filled_[:, remaining])
        # Ties go to the lower index, as in greedy_portfolio; the tolerance absorbs the
        # rounding that differs between columns of the product.
        j = int(remaining[int(np.flatnonzero(gain >= gain.max() - 1e-12)[0])])
        m = len(observed)
        source = f"active testing: after {m} evaluation{'' if m == 1 else 's'}"
        return Recommendation(self.kb_.configurations[j], float(w @ self.filled_[:, j]), source)

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """The order before any score: ``start``'s first, then the static portfolio's greedy
        order from there."""
        first = self._start(metafeatures)
        head = [] if first is None else [self.index_[first.config.key]]
        mean = self.filled_.mean(axis=0)
        out = [] if first is None else [first]
        out += [
            Recommendation(self.kb_.configurations[j], float(mean[j]), "active testing: no scores")
            for j in greedy_portfolio(self.normalised_, n, first=head)[len(head) :]
        ]
        return out[:n]


def mean_best_so_far(
    rec: Recommender, kb: MetaKnowledge, i: int, norm: np.ndarray, budget: int
) -> float:
    """Mean over b = 1..``budget`` of the best normalised score of dataset ``i`` among the
    first b evaluations of the fitted ``rec`` (:func:`evaluation_order`; a missing score
    counts as 0).

    Example:
        >>> mean_best_so_far.__name__
        'mean_best_so_far'
    """
    ranked = evaluation_order(rec, kb, i, budget)
    best = np.maximum.accumulate(np.nan_to_num(norm[i, ranked], nan=0.0))
    padded = np.concatenate([best, np.full(budget - len(best), best[-1])])
    return float(padded.mean())


class InnerCV(Recommender):
    """Chooses a setting of a recommender by leave-one-family-out over the training datasets
    only, then refits with it on all of them (nested cross-validation when the evaluation
    leaves datasets out too).

    The criterion is the mean over inner test datasets of :func:`mean_best_so_far` with
    ``budget`` evaluations (5 by default, the warm start of ``metaml automl fit``: it rewards
    a good first recommendation and a good first five). Ties go to the earlier grid value.

    Example:
        >>> rec = InnerCV(lambda k: LocalPortfolio(k=k), [1, 5, None])
        >>> rec.grid
        [1, 5, None]
    """

    def __init__(
        self, make: Callable[[Any], Recommender], grid: Sequence[Any], budget: int = 5
    ) -> None:
        self.make = make
        self.grid = list(grid)
        self.budget = budget

    @property
    def name(self) -> str:  # type: ignore[override]
        """The wrapped recommender's name and ``(inner CV)``."""
        return f"{self.make(self.grid[0]).name} (inner CV)"

    def fit(self, kb: MetaKnowledge) -> InnerCV:
        """Score every grid value on the training datasets, keep the best, refit on all."""
        super().fit(kb)
        self.cv_scores_ = [self._inner_score(value, kb) for value in self.grid]
        self.chosen_ = self.grid[int(np.argmax(self.cv_scores_))]
        self.best_ = self.make(self.chosen_).fit(kb)
        return self

    def _inner_score(self, value: Any, kb: MetaKnowledge) -> float:
        families = np.array(kb.families)
        results = []
        for i in range(len(kb.names)):
            train = np.flatnonzero(families != families[i])
            if len(train) == 0:
                continue
            rec = self.make(value).fit(kb.subset(train))
            results.append(mean_best_so_far(rec, kb, i, self.normalised_, self.budget))
        return float(np.mean(results)) if results else 0.0

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        """Whether the wrapped recommender is (before fitting: with the first setting)."""
        best = getattr(self, "best_", None)
        return (best if best is not None else self.make(self.grid[0])).adaptive

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """The ranking of the recommender with the chosen setting."""
        return self.best_.rank(metafeatures, n)

    def propose(
        self, metafeatures: Mapping[str, float] | np.ndarray, observed: Mapping[str, float]
    ) -> Recommendation | None:
        """The next proposal of the recommender with the chosen setting."""
        return self.best_.propose(metafeatures, observed)


class RandomOrder(Recommender):
    """Random search over the candidates: a random order, different for every ``seed``.

    Example:
        >>> RandomOrder(seed=3).seed
        3
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """A random permutation of the candidates."""
        order = np.random.default_rng(self.seed).permutation(len(self.kb_.configurations))
        return [Recommendation(self.kb_.configurations[j], math.nan, self.name) for j in order[:n]]


class SingleDefault(Recommender):
    """One configuration for every dataset (by default the random forest's defaults).

    Example:
        >>> SingleDefault().algorithm
        'random_forest'
    """

    name = "default"

    def __init__(self, algorithm: str = "random_forest") -> None:
        self.algorithm = algorithm

    def rank(
        self, metafeatures: Mapping[str, float] | np.ndarray, n: int | None = None
    ) -> list[Recommendation]:
        """Just the default configuration of ``algorithm``."""
        from metaml.automl.portfolio import default_configuration

        cfg = default_configuration(self.algorithm)
        if cfg not in self.kb_.configurations:
            raise UserError(f"the meta-knowledge has no default {self.algorithm} configuration")
        return [Recommendation(cfg, math.nan, self.name)][:n]


LOCAL_K_GRID: tuple[int | None, ...] = (1, 3, 5, 10, 20, 40, None)
"""The ``k`` that :func:`local_portfolio` chooses from: the nearest dataset alone ... all."""


def local_portfolio(grid: Sequence[int | None] = LOCAL_K_GRID, budget: int = 5) -> InnerCV:
    """A :class:`LocalPortfolio` whose ``k`` is chosen by inner leave-one-family-out over the
    training datasets (:class:`InnerCV`, ``budget`` evaluations).

    Example:
        >>> local_portfolio().grid[-1] is None
        True
    """
    return InnerCV(lambda k: LocalPortfolio(k=k), grid, budget=budget)


def active_testing(**kwargs: Any) -> ActiveTesting:
    """What ``--method active`` builds: :class:`ActiveTesting` whose first proposal is the
    :class:`MetaModel`'s and whose ``beta`` is chosen by inner CV.

    Example:
        >>> active_testing().start.name
        'meta-model'
    """
    return ActiveTesting(start=MetaModel(), **kwargs)


RECOMMENDERS: dict[str, Any] = {
    "nearest": NearestDatasets,
    "meta-model": MetaModel,
    "static": StaticPortfolio,
    "local": local_portfolio,
    "active": active_testing,
}


def make_recommender(name: str, **kwargs: Any) -> Recommender:
    """A recommender by name: ``nearest``, ``meta-model``, ``static``, ``local``
    (:func:`local_portfolio`) or ``active`` (:func:`active_testing`, adaptive).

    Example:
        >>> make_recommender("nearest", k=3).k
        3
    """
    if name not in RECOMMENDERS:
        raise unknown_name_error("recommender", name, RECOMMENDERS)
    rec: Recommender = RECOMMENDERS[name](**kwargs)
    return rec
