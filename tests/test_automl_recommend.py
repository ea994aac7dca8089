"""Recommenders on a synthetic meta-knowledge whose right answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
from metaml.automl.recommend import (
    InnerCV,
    LocalPortfolio,
    MetaFeatureScaler,
    MetaModel,
    NearestDatasets,
    RandomOrder,
    SingleDefault,
    StaticPortfolio,
    greedy_portfolio,
    local_portfolio,
    make_recommender,
    normalised_scores,
    rank_scores,
)
from metaml.errors import UserError

CANDS = candidate_configurations(8)


def _clustered_kb(n: int = 40, seed: int = 0) -> MetaKnowledge:
    """Two kinds of dataset: meta-feature 0 near -3 (candidate 2 wins) or +3 (candidate 5)."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 2
    mf = np.column_stack(
        [np.where(kind == 0, -3.0, 3.0) + rng.normal(0, 0.3, n), rng.normal(size=n)]
    )
    scores = 0.6 + 0.05 * rng.random((n, 8))
    scores[kind == 0, 2] = 0.9
    scores[kind == 1, 5] = 0.9
    names = [f"d{i}" for i in range(n)]
    return MetaKnowledge(names, names, ["f0", "f1"], mf, CANDS, scores, np.zeros((n, 8)), {})


def test_normalised_scores_by_hand() -> None:
    s = np.array([[0.5, np.nan, 0.9, 0.7]])
    np.testing.assert_allclose(normalised_scores(s), [[0.0, np.nan, 1.0, 0.5]])


def test_scaler_standardises_the_training_rows() -> None:
    mf = np.random.default_rng(0).lognormal(size=(50, 3))
    z = MetaFeatureScaler().fit(mf).transform(mf)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1)


def test_nearest_recommends_the_best_of_the_nearest_dataset() -> None:
    kb = _clustered_kb()
    rec = NearestDatasets(k=5).fit(kb)
    first = rec.rank(np.array([-3.1, 0.0]))
    assert first[0].config == CANDS[2]
    assert first[0].source.startswith("nearest: best on d")
    assert rec.rank(np.array([2.9, 0.0]))[0].config == CANDS[5]
    # Every candidate appears once.
    assert sorted(r.config.key for r in first) == sorted(c.key for c in CANDS)
    # Mapping input (named meta-features) gives the same ranking.
    assert rec.rank({"f0": -3.1, "f1": 0.0}, n=3) == first[:3]
    with pytest.raises(UserError, match="missing"):
        rec.rank({"f0": 1.0})


def test_shuffled_meta_features_lose_the_signal() -> None:
    kb = _clustered_kb()
    hits = 0
    for seed in range(20):
        rec = NearestDatasets(k=1, shuffle_seed=seed).fit(kb)
        hits += rec.rank(np.array([-3.1, 0.0]))[0].config == CANDS[2]
    assert hits < 18  # chance is about half; the real meta-features get it right every time


def test_meta_model_ranks_by_the_cluster() -> None:
    kb = _clustered_kb()
    model = MetaModel(n_estimators=50).fit(kb)
    assert model.rank(np.array([-3.0, 0.5]))[0].config == CANDS[2]
    assert model.rank(np.array([3.0, -0.5]))[0].config == CANDS[5]
    pred = model.predict(np.array([-3.0, 0.5]))
    assert pred.shape == (8,) and pred[2] > 0.8 and pred[5] < 0.5


def test_static_portfolio_greedy_order_by_hand() -> None:
    names = ["a", "b", "c"]
    scores = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    kb = MetaKnowledge(
        names, names, ["f"], np.zeros((3, 1)), CANDS[:3], scores, np.zeros((3, 3)), {}
    )
    order = [r.config for r in StaticPortfolio().fit(kb).rank(np.zeros(1))]
    # mean best after 1: c0 1/3, c1 2/3, c2 1/2 -> c1; then c0 reaches 1 -> c0; then c2.
    assert order == [CANDS[1], CANDS[0], CANDS[2]]


def test_baselines() -> None:
    kb = _clustered_kb()
    perm = RandomOrder(seed=1).fit(kb).rank(np.zeros(2))
    assert sorted(r.config.key for r in perm) == sorted(c.key for c in CANDS)
    assert [r.config for r in RandomOrder(seed=1).fit(kb).rank(np.zeros(2))] == [
        r.config for r in perm
    ]
    assert SingleDefault().fit(kb).rank(np.zeros(2))[0].config.algorithm == "random_forest"
    with pytest.raises(UserError, match="did you mean 'nearest'"):
        make_recommender("neares")


def test_leave_one_dataset_out_never_learns_from_the_test_family() -> None:
    from metaml.automl.evaluation import leave_one_dataset_out

    # Pairs of copies (one family each): identical meta-features, a unique best candidate.
    n = 8
    mf = np.repeat(np.arange(n // 2, dtype=float)[:, None] * 10, 2, axis=0)
    scores = np.full((n, 8), 0.5)
    for i in range(n):
        scores[i, i // 2] = 0.9
    names = [f"d{i}" for i in range(n)]
    families = [f"f{i // 2}" for i in range(n)]
    kb = MetaKnowledge(names, families, ["f"], mf, CANDS, scores, np.zeros((n, 8)), {})
    res = leave_one_dataset_out(kb, {"nearest": lambda i: [NearestDatasets(k=1)]})
    # With the sibling left out, the nearest other family's best is wrong for every dataset.
    assert res["nearest"][:, 0].tolist() == [0.0] * n
    # If families were ignored the sibling would give the right answer (1.0) every time.
    alone = MetaKnowledge(names, names, ["f"], mf, CANDS, scores, np.zeros((n, 8)), {})
    leaky = leave_one_dataset_out(alone, {"nearest": lambda i: [NearestDatasets(k=1)]})
    assert leaky["nearest"][:, 0].tolist() == [1.0] * n
    assert (res["nearest"][:, -1] == 1.0).all()  # all candidates tried: the best is found


def test_greedy_portfolio_stops_after_n_steps_and_fills_by_mean() -> None:
    norm = np.array([[1.0, 0.0, 0.5, 0.9], [0.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0]])
    # Greedy: c1 (2/3); then c0 and c3 both reach 1 -> c0 (lower index); then c2, c3.
    assert greedy_portfolio(norm) == [1, 0, 2, 3]
    # One greedy step, then by mean score: c2 (0.5), c0 (1/3), c3 (0.3).
    assert greedy_portfolio(norm, n=1) == [1, 2, 0, 3]
    assert greedy_portfolio(np.array([[np.nan, 0.2]])) == [1, 0]  # NaN counts as 0


def test_rank_scores_by_hand() -> None:
    s = np.array([[0.5, np.nan, 0.9, 0.7], [0.6, 0.6, 0.6, 0.6], [np.nan, 0.3, np.nan, np.nan]])
    np.testing.assert_allclose(
        rank_scores(s),
        [[0.0, np.nan, 1.0, 0.5], [0.5, 0.5, 0.5, 0.5], [np.nan, 1.0] + [np.nan] * 2],
    )


def test_local_portfolio_between_nearest_and_static() -> None:
    kb = _clustered_kb()
    static = [r.config for r in StaticPortfolio().fit(kb).rank(np.zeros(2))]
    every = [r.config for r in LocalPortfolio(k=None).fit(kb).rank(np.array([-3.0, 0.0]))]
    assert every == static  # all datasets: the static portfolio, whatever the meta-features
    for k in (1, 5):
        local = LocalPortfolio(k=k).fit(kb)
        first = local.rank(np.array([-3.1, 0.0]), n=2)
        assert len(first) == 2 and first[0].config == CANDS[2]
        assert first[0].source == f"local portfolio: {k} nearest"
        assert local.rank(np.array([2.9, 0.0]))[0].config == CANDS[5]
    ranking = LocalPortfolio(k=5).fit(kb).rank(np.array([2.9, 0.0]))
    assert sorted(r.config.key for r in ranking) == sorted(c.key for c in CANDS)


def test_inner_cv_chooses_k_on_the_training_datasets_only() -> None:
    kb = _clustered_kb()
    rec = InnerCV(lambda k: LocalPortfolio(k=k), [None, 3]).fit(kb)
    # The two clusters want different candidates: the static portfolio (k=None) gets half of
    # them wrong at the first evaluation, the 3 nearest get them right.
    assert rec.chosen_ == 3
    assert rec.cv_scores_[1] > rec.cv_scores_[0]
    assert rec.name == "local portfolio (inner CV)"
    assert rec.rank(np.array([-3.1, 0.0]), n=1)[0].config == CANDS[2]
    # The same data without meta-feature signal: k=None is as good, and ties go to the first.
    flat = MetaKnowledge(
        kb.names, kb.families, kb.metafeature_names, kb.metafeatures, CANDS,
        np.tile(np.linspace(0.5, 0.9, 8), (len(kb.names), 1)), kb.fit_times, {},
    )  # fmt: skip
    assert InnerCV(lambda k: LocalPortfolio(k=k), [None, 3]).fit(flat).chosen_ is None
    assert isinstance(make_recommender("local"), InnerCV)
    assert local_portfolio(grid=[1, 2]).grid == [1, 2]


def test_meta_model_on_ranks() -> None:
    kb = _clustered_kb()
    model = MetaModel(n_estimators=50, target="rank").fit(kb)
    assert model.rank(np.array([-3.0, 0.5]))[0].config == CANDS[2]
    assert model.rank(np.array([3.0, -0.5]))[0].config == CANDS[5]
    with pytest.raises(UserError, match="target must be"):
        MetaModel(target="ranks")
