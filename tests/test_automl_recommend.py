"""Recommenders on a synthetic meta-knowledge whose right answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import four_kinds_knowledge

from metaml.automl.knowledge import MetaKnowledge, candidate_configurations
from metaml.automl.recommend import (
    ActiveTesting,
    InnerCV,
    LocalPortfolio,
    MetaFeatureScaler,
    MetaModel,
    NearestDatasets,
    RandomOrder,
    Recommendation,
    SingleDefault,
    StaticPortfolio,
    active_testing,
    evaluate_in_order,
    evaluation_order,
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
    model = MetaModel(n_estimators=50, n_jobs=2).fit(kb)
    assert model.rank(np.array([-3.0, 0.5]))[0].config == CANDS[2]
    assert model.rank(np.array([3.0, -0.5]))[0].config == CANDS[5]
    pred = model.predict(np.array([-3.0, 0.5]))
    assert pred.shape == (8,) and pred[2] > 0.8 and pred[5] < 0.5
    # Two workers grow the same trees as one: the same predictions, bit for bit.
    one = MetaModel(n_estimators=50, n_jobs=1).fit(kb).predict(np.array([-3.0, 0.5]))
    np.testing.assert_array_equal(one, pred)


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
    # Holding out only some datasets, in parallel, gives their rows of the full run, in the
    # order asked (random orders seeded by the test dataset make every row different).
    methods = {"nearest": lambda i: [NearestDatasets(k=1)], "random": lambda i: [RandomOrder(i)]}
    full = leave_one_dataset_out(alone, methods)
    held = leave_one_dataset_out(alone, methods, test=[5, 2], n_jobs=2)
    assert not np.array_equal(full["random"][5], full["random"][2])
    for name in methods:
        np.testing.assert_array_equal(held[name], full[name][[5, 2]])
    # Training on another knowledge needs kb's candidates and meta-features.
    nine = np.hstack([scores, scores[:, :1]])
    more = MetaKnowledge(
        names, names, ["f"], mf, candidate_configurations(9), nine, np.zeros((n, 9)), {}
    )
    with pytest.raises(ValueError, match="1 candidates kb lacks"):
        leave_one_dataset_out(alone, methods, train_on=more)
    other = MetaKnowledge(names, names, ["g"], mf, CANDS, scores, np.zeros((n, 8)), {})
    with pytest.raises(ValueError, match="other meta-features"):
        leave_one_dataset_out(alone, methods, train_on=other)


def test_greedy_portfolio_stops_after_n_steps_and_fills_by_mean() -> None:
    norm = np.array([[1.0, 0.0, 0.5, 0.9], [0.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0]])
    # Greedy: c1 (2/3); then c0 and c3 both reach 1 -> c0 (lower index); then c2, c3.
    assert greedy_portfolio(norm) == [1, 0, 2, 3]
    # One greedy step, then by mean score: c2 (0.5), c0 (1/3), c3 (0.3).
    assert greedy_portfolio(norm, n=1) == [1, 2, 0, 3]
    assert greedy_portfolio(np.array([[np.nan, 0.2]])) == [1, 0]  # NaN counts as 0
    # c3 chosen already (best 0.9, 0, 0): then c1 (mean 0.967), c0 (1.0), c2.
    assert greedy_portfolio(norm, first=[3]) == [3, 1, 0, 2]


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


def _disagreeing_repeats_kb() -> MetaKnowledge:
    """Six datasets the meta-features cannot tell apart: two measured four times rank
    candidate 0 first and 1 last, four measured once the other way round."""
    scores = np.full((6, 8), 0.5)
    scores[:2, 0], scores[:2, 1] = 0.9, 0.1
    scores[2:, 0], scores[2:, 1] = 0.1, 0.9
    names = [f"d{i}" for i in range(6)]
    seeds = {n: [0, 1, 2, 3] if i < 2 else [0] for i, n in enumerate(names)}
    mf = np.ones((6, 2))
    info = {"split_seeds": [0, 1, 2, 3], "dataset_split_seeds": seeds}
    return MetaKnowledge(names, names, ["f0", "f1"], mf, CANDS, scores, np.zeros((6, 8)), info)


def test_meta_model_weighs_datasets_by_their_repeats() -> None:
    kb = _disagreeing_repeats_kb()
    assert kb.repeats().tolist() == [4, 4, 1, 1, 1, 1]
    plain = MetaModel(n_estimators=100).fit(kb)
    weighted = MetaModel(n_estimators=100, weight_by_repeats=True).fit(kb)
    # By count, four datasets against two put candidate 1 first; by weight, 8 against 4
    # cross-validations put candidate 0 first.
    assert plain.sample_weight_ is None
    assert plain.rank(np.ones(2))[0].config == CANDS[1]
    assert weighted.rank(np.ones(2))[0].config == CANDS[0]
    pred = weighted.predict(np.ones(2))
    assert pred[0] > 0.5 > pred[1]
    # One weight per (dataset, candidate) row, the dataset's number of repeats.
    np.testing.assert_array_equal(weighted.sample_weight_, np.repeat([4, 4, 1, 1, 1, 1], 8))
    # Equal repeats everywhere: no weights, so exactly the unweighted forest.
    even = _clustered_kb()
    np.testing.assert_array_equal(
        MetaModel(n_estimators=20, weight_by_repeats=True).fit(even).predict(np.zeros(2)),
        MetaModel(n_estimators=20).fit(even).predict(np.zeros(2)),
    )


def test_meta_model_on_ranks() -> None:
    kb = _clustered_kb()
    model = MetaModel(n_estimators=50, target="rank").fit(kb)
    assert model.rank(np.array([-3.0, 0.5]))[0].config == CANDS[2]
    assert model.rank(np.array([3.0, -0.5]))[0].config == CANDS[5]
    with pytest.raises(UserError, match="target must be"):
        MetaModel(target="ranks")


def _hidden_kinds_kb(seed: int = 0) -> MetaKnowledge:
    """Two kinds of dataset that the meta-features do not show (they are noise): on kind 0
    (24 datasets) candidate 0 beats candidate 1 and candidate 2 is best; on kind 1 (16)
    candidate 1 beats candidate 0 and candidate 5 is best."""
    rng = np.random.default_rng(seed)
    kind = np.r_[np.zeros(24, int), np.ones(16, int)]
    scores = 0.6 + 0.05 * rng.random((40, 8))
    scores[:, 0] = np.where(kind == 0, 0.8, 0.7)
    scores[:, 1] = np.where(kind == 0, 0.7, 0.8)
    scores[kind == 0, 2] = 0.9
    scores[kind == 1, 5] = 0.9
    names = [f"d{i}" for i in range(40)]
    mf = rng.normal(size=(40, 2))
    return MetaKnowledge(names, names, ["f0", "f1"], mf, CANDS, scores, np.zeros((40, 8)), {})


def test_active_testing_weights_by_hand() -> None:
    scores = np.array([[0.1, 0.5, 0.9, 0.0], [0.9, 0.5, 0.1, 0.0], [0.5, 0.1, 0.9, 0.0]])
    cands = CANDS[:4]
    kb = MetaKnowledge(["a", "b", "c"], ["a", "b", "c"], ["f"], np.zeros((3, 1)), cands,
                       scores, np.zeros((3, 4)), {})  # fmt: skip
    rec = ActiveTesting(beta=2.0).fit(kb)
    observed = {cands[0].key: 0.6, cands[1].key: 0.7, cands[2].key: 0.8}  # order 0 < 1 < 2
    # Pairs (0,1), (0,2), (1,2): dataset a orders all three as observed (+3), b none (-3),
    # c two of three (+1); log-weight = beta * (concordant - discordant) / 3 observed.
    expected = np.exp(2.0 * np.array([3.0, -3.0, 1.0]) / 3)
    np.testing.assert_allclose(rec.weights(observed), expected / expected.sum())
    # One observation orders nothing: equal weights.
    np.testing.assert_allclose(rec.weights({cands[0].key: 0.6}), np.full(3, 1 / 3))
    # Only candidate 3 is left; its predicted score is its weighted mean normalised score.
    nxt = rec.propose(np.zeros(1), observed)
    assert nxt is not None and nxt.config == cands[3]
    assert nxt.score == pytest.approx(0.0)
    assert rec.propose(np.zeros(1), {**observed, cands[3].key: 0.1}) is None


def test_active_testing_follows_the_observed_order() -> None:
    kb = _hidden_kinds_kb()
    rec = ActiveTesting(beta=3.0).fit(kb)
    looks_like_0 = {CANDS[0].key: 0.75, CANDS[1].key: 0.70}
    looks_like_1 = {CANDS[0].key: 0.70, CANDS[1].key: 0.75}
    first = rec.propose(np.zeros(2), looks_like_1)
    assert first is not None and first.config == CANDS[5]
    assert first.source == "active testing: after 2 evaluations"
    second = rec.propose(np.zeros(2), looks_like_0)
    assert second is not None and second.config == CANDS[2]
    # Without adapting (beta=0) the majority kind's best comes next either way.
    static = ActiveTesting(beta=0.0).fit(kb)
    for observed in (looks_like_0, looks_like_1):
        nxt = static.propose(np.zeros(2), observed)
        assert nxt is not None and nxt.config == CANDS[2]


def test_active_testing_without_adapting_is_the_static_portfolio() -> None:
    kb = _hidden_kinds_kb(seed=3)
    static = [r.config for r in StaticPortfolio().fit(kb).rank(np.zeros(2))]
    fitted = ActiveTesting(beta=0.0).fit(kb)
    order = evaluation_order(fitted, kb, 0, len(CANDS))
    assert [CANDS[j] for j in order] == static
    assert [r.config for r in ActiveTesting(beta=5.0).fit(kb).rank(np.zeros(2))] == static
    with pytest.raises(UserError, match="beta must be a finite number >= 0"):
        ActiveTesting(beta=-1.0)


def test_evaluate_in_order_feeds_back_the_scores() -> None:
    kb = four_kinds_knowledge()
    new_kind_2 = {CANDS[0]: 0.75, CANDS[1]: 0.7, CANDS[6]: 0.8, CANDS[4]: 0.9}
    calls: list[object] = []

    def evaluate(proposal: Recommendation) -> float:
        calls.append(proposal.config)
        return new_kind_2.get(proposal.config, 0.6)

    rec = ActiveTesting(beta=3.0).fit(kb)
    steps = list(evaluate_in_order(rec, np.zeros(2), evaluate, budget=4))
    assert [r.config for r, _ in steps] == calls and len(calls) == 4
    # Replayed by hand: each step is the proposal given the scores of the steps before.
    for k, (r, score) in enumerate(steps):
        seen = {s.config.key: v for s, v in steps[:k]}
        proposal = rec.propose(np.zeros(2), seen)
        assert proposal is not None and proposal.config == r.config
        assert score == new_kind_2.get(r.config, 0.6)
    # A ranking recommender is evaluated in its own order, and a budget past the candidates
    # stops when they run out.
    static = StaticPortfolio().fit(kb)
    steps = list(evaluate_in_order(static, np.zeros(2), lambda c: 0.5, budget=20))
    assert [r.config for r, _ in steps] == [r.config for r in static.rank(np.zeros(2))]
    # An evaluation that returns None (it could not run) ends the loop there.
    scores = iter([0.7, 0.6, None, 0.9])
    steps = list(evaluate_in_order(rec, np.zeros(2), lambda c: next(scores), budget=4))
    assert [score for _, score in steps] == [0.7, 0.6]


def test_active_testing_adapts_where_the_static_portfolio_cannot() -> None:
    from metaml.automl.evaluation import leave_one_dataset_out

    kb = four_kinds_knowledge()
    rec = ActiveTesting().fit(kb)  # beta None: chosen by inner CV on these datasets
    inner = InnerCV(lambda b: ActiveTesting(beta=b), rec.grid).fit(kb)
    assert rec.beta_ == inner.chosen_ and rec.beta_ > 0  # adapting wins the inner CV
    res = leave_one_dataset_out(
        kb, {"active": lambda i: [ActiveTesting(beta=3.0)], "static": lambda i: [StaticPortfolio()]}
    )
    # After 4 evaluations the static order has found the best on 19 of 44 datasets;
    # choosing the 4th from the probes' order finds it on more.
    found = {name: int((curves[:, 3] == 1.0).sum()) for name, curves in res.items()}
    assert found["static"] == 19 and found["active"] > 25
    with pytest.raises(UserError, match="finite number >= 0"):
        ActiveTesting(beta=float("inf"))
    with pytest.raises(UserError, match="finite number >= 0"):
        ActiveTesting(grid=(0.0, float("nan")))


def test_active_testing_from_a_start_recommender() -> None:
    kb = _hidden_kinds_kb()
    knn = CANDS.index(next(c for c in CANDS if c.algorithm == "knn"))
    rec = ActiveTesting(beta=3.0, start=SingleDefault("knn")).fit(kb)
    first = rec.propose(np.zeros(2), {})
    assert first is not None and first.config == CANDS[knn]
    assert first.source == "active testing: default first"
    # The order before any score: the start's, then the greedy portfolio from there.
    expected = greedy_portfolio(normalised_scores(kb.scores), first=[knn])
    assert [r.config for r in rec.rank(np.zeros(2))] == [CANDS[j] for j in expected]
    assert len(rec.rank(np.zeros(2), n=3)) == 3
    # After one score the start has had its say: the weighted greedy step follows.
    nxt = rec.propose(np.zeros(2), {CANDS[knn].key: 0.6})
    assert nxt is not None and nxt.source == "active testing: after 1 evaluation"
    # Fitting used a copy: the start passed in stays unfitted.
    start = SingleDefault("knn")
    ActiveTesting(start=start).fit(kb)
    assert not hasattr(start, "kb_")
    shipped = make_recommender("active")
    assert isinstance(shipped, ActiveTesting) and isinstance(shipped.start, MetaModel)
    assert active_testing(grid=[0.0, 2.0]).grid == [0.0, 2.0]
