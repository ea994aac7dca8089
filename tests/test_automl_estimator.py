"""MetaLearnedClassifier passes scikit-learn's estimator checks; search, skops and CLI fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("optuna")
pytest.importorskip("skops")
pd = pytest.importorskip("pandas")

from helpers import run_cli  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from metaml.automl.estimator import MetaLearnedClassifier  # noqa: E402
from metaml.automl.knowledge import MetaKnowledge, candidate_configurations  # noqa: E402
from metaml.automl.portfolio import default_configuration  # noqa: E402
from metaml.automl.recommend import ActiveTesting  # noqa: E402
from metaml.automl.search import (  # noqa: E402
    AdaptiveWarmStart,
    dataset_metafeatures,
    load_model,
    recommend,
    save_model,
    warm_start,
    warm_started_search,
)
from metaml.data.tabular import from_dataframe  # noqa: E402
from metaml.errors import UserError  # noqa: E402
from metaml.taskrep.metafeatures import metafeature_names, metafeatures  # noqa: E402


def _knowledge(best: str = "logreg") -> MetaKnowledge:
    """Six made-up training datasets on which ``best``'s default is always the best."""
    cands = candidate_configurations(8)
    rng = np.random.default_rng(0)
    names = [f"d{i}" for i in range(6)]
    mf = rng.normal(size=(6, len(metafeature_names())))
    scores = 0.5 + 0.3 * rng.random((6, 8))
    scores[:, [c.algorithm for c in cands].index(best)] = 0.95
    return MetaKnowledge(names, names, metafeature_names(), mf, cands, scores, np.zeros((6, 8)), {})


KB = _knowledge()


@pytest.fixture(autouse=True)
def _one_openmp_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


@parametrize_with_checks([MetaLearnedClassifier(knowledge=KB, n_evaluations=1)])
def test_sklearn_estimator_checks(estimator: Any, check: Callable[[Any], None]) -> None:
    check(estimator)


def test_fit_cross_validates_the_recommendations() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 3))
    y = (X[:, 0] + 0.2 * rng.normal(size=80) > 0).astype(int)
    clf = MetaLearnedClassifier(knowledge=KB, method="static", n_evaluations=3, cv=3).fit(X, y)
    assert len(clf.evaluated_) == 3
    assert clf.evaluated_["logreg"] > 0.8
    assert clf.best_config_.algorithm == max(clf.evaluated_, key=clf.evaluated_.get)
    assert clf.score(X, y) > 0.8


def test_recommend_puts_the_known_best_first() -> None:
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(40, 2)), np.repeat([0, 1], 20)
    for method in ("nearest", "static", "meta-model"):
        recs = recommend(X, y, knowledge=KB, method=method, n=3)
        assert recs[0].config == default_configuration("logreg"), method


def test_search_evaluates_recommendations_first_and_saves_with_skops(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"a": rng.normal(size=90), "c": rng.choice(["u", "v"], size=90)})
    frame["t"] = np.where(frame["a"] > 0, "pos", "neg")
    task = from_dataframe(frame, target="t", name="toy")
    recs = recommend(task.X, task.y, knowledge=KB, n=2)
    result = warm_started_search(task, recs, budget_s=None, n_trials=4, folds=3)
    assert [t.config for t in result.trials[:2]] == [r.config for r in recs]
    assert all(t.source == "search (TPE)" for t in result.trials[2:])
    assert result.best is not None and result.best.score > 0.9
    save_model(result.pipeline, tmp_path / "m.skops")
    loaded = load_model(tmp_path / "m.skops")
    np.testing.assert_array_equal(loaded.predict(task.X), result.pipeline.predict(task.X))
    with pytest.raises(UserError, match="no model file"):
        load_model(tmp_path / "none.skops")


def _toy_task(seed: int = 3) -> Any:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=90), "c": rng.choice(["u", "v"], size=90)})
    frame["t"] = np.where(frame["a"] + 0.5 * rng.normal(size=90) > 0, "pos", "neg")
    return from_dataframe(frame, target="t", name="toy")


def test_adaptive_warm_start_proposes_from_the_scores_so_far() -> None:
    task = _toy_task()
    rec = ActiveTesting(beta=3.0).fit(KB)
    mf = np.zeros(len(KB.metafeature_names))
    result = warm_started_search(
        task, AdaptiveWarmStart(rec, mf, n=3), budget_s=None, n_trials=4, folds=3
    )
    assert len(result.trials) == 4
    assert [t.source for t in result.trials[:3]] == [
        "active testing: after 0 evaluations",
        "active testing: after 1 evaluation",
        "active testing: after 2 evaluations",
    ]
    assert result.trials[3].source == "search (TPE)"
    # Replayed by hand: each warm-start trial is the proposal given the trials before it.
    for k in range(3):
        seen = {t.config.key: t.score for t in result.trials[:k]}
        proposal = rec.propose(mf, seen)
        assert proposal is not None and proposal.config == result.trials[k].config
    # A spent time budget stops before the first trial.
    with pytest.raises(UserError, match="no configuration finished"):
        warm_started_search(task, AdaptiveWarmStart(rec, mf, n=3), budget_s=1e-9, folds=3)
    # The trial limit cuts the warm start short.
    short = warm_started_search(
        task, AdaptiveWarmStart(rec, mf, n=3), budget_s=None, n_trials=2, folds=3
    )
    assert len(short.trials) == 2
    assert isinstance(warm_start(task.X, task.y, knowledge=KB, method="active"), AdaptiveWarmStart)
    assert isinstance(warm_start(task.X, task.y, knowledge=KB, method="static", n=2), list)


def test_estimator_with_the_adaptive_recommender(monkeypatch: pytest.MonkeyPatch) -> None:
    import metaml.automl.knowledge as knowledge
    from metaml.automl.search import fitted_recommender

    task = _toy_task(seed=5)
    X = task.X.assign(c=(task.X["c"] == "u").astype(float)).to_numpy()
    scored: list[tuple[Any, float]] = []
    real = knowledge.cross_validate

    def counted(config: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(config, *args, **kwargs)
        scored.append((config, out[0]))
        return out

    monkeypatch.setattr(knowledge, "cross_validate", counted)
    clf = MetaLearnedClassifier(knowledge=KB, method="active", n_evaluations=3, cv=3)
    clf.fit(X, task.y)
    assert len(scored) == 3
    # Each configuration is the recommender's proposal given the scores before it.
    rec, mf = fitted_recommender(KB, "active"), metafeatures(X, task.y, random_state=0)
    for k, (config, _) in enumerate(scored):
        proposal = rec.propose(mf, {c.key: v for c, v in scored[:k]})
        assert proposal is not None and proposal.config == config
    assert 1 <= len(clf.evaluated_) <= 3
    assert clf.best_config_.algorithm == max(clf.evaluated_, key=clf.evaluated_.get)
    assert clf.score(X, task.y) > 0.7


def test_cli_recommend_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    KB.save(tmp_path / "kb.json.gz")
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"id": range(60), "x": rng.normal(size=60)})
    frame["label"] = np.where(frame["x"] > 0, "yes", "no")
    frame.to_csv(tmp_path / "d.csv", index=False)
    base = [str(tmp_path / "d.csv"), "--target", "label", "--drop", "id"]
    base += ["--knowledge", str(tmp_path / "kb.json.gz")]
    code, out, err = run_cli(["automl", "recommend", *base, "--n", "2"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split()[2] == "logreg"
    run = tmp_path / "run"
    args = ["automl", "fit", *base, "--trials", "2", "--budget", "60", "--folds", "3"]
    code, out, err = run_cli([*args, "--out", str(run)], capsys)
    assert code == 0, err
    assert (run / "model.skops").is_file() and (run / "report.md").is_file()
    model = load_model(run / "model.skops")
    assert set(model.predict(frame.drop(columns=["id", "label"]))) <= {"yes", "no"}
    code, _, err = run_cli(["automl", "fit", *base, "--budget", "0"], capsys)
    assert code == 2 and "--budget" in err
    args += ["--method", "active", "--warm", "2", "--out", str(tmp_path / "active")]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = (tmp_path / "active" / "report.json").read_text()
    assert "active testing: meta-model first" in report
    assert "active testing: after 1 evaluation" in report


def _large_imbalanced(n: int = 300) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(6)
    frame = pd.DataFrame({"a": rng.normal(size=n), "c": rng.choice(["u", "v", "w"], size=n)})
    return frame, np.where(np.arange(n) < n // 5, "rare", "common")


def test_new_datasets_are_described_by_the_knowledge_s_row_budget() -> None:
    from sklearn.model_selection import train_test_split

    X, y = _large_imbalanced()
    kb50 = replace(KB, info={"max_rows": 50})
    # By hand: the stratified 50-row subsample the builds score, described by metafeatures().
    keep, _ = train_test_split(np.arange(300), train_size=50, stratify=y, random_state=3)
    keep = np.sort(keep)
    expected = metafeatures(X.iloc[keep], y[keep], random_state=3)
    assert dataset_metafeatures(X, y, kb50, random_state=3) == expected
    assert expected["nr_inst"] == 50.0
    # Stratified: the classes keep their shares (1 in 5 "rare"), so their spread is the whole's.
    whole = metafeatures(X, y, random_state=3)
    assert expected["freq_class.sd"] == pytest.approx(whole["freq_class.sd"])
    # Arrays are cut the same way; a dataset within the budget, or a knowledge without one,
    # is described whole.
    arr = np.random.default_rng(7).normal(size=(300, 2))
    assert dataset_metafeatures(arr, y, kb50)["nr_inst"] == 50.0
    assert dataset_metafeatures(arr[:40], y[:40], kb50)["nr_inst"] == 40.0
    assert dataset_metafeatures(X, y, KB)["nr_inst"] == 300.0


def test_recommend_and_fit_describe_the_subsample(monkeypatch: pytest.MonkeyPatch) -> None:
    import metaml.taskrep.metafeatures as mf_module

    seen: list[int] = []
    real = mf_module.metafeatures

    def recorded(X: Any, y: Any, **kwargs: Any) -> dict[str, float]:
        seen.append(len(y))
        return real(X, y, **kwargs)

    monkeypatch.setattr(mf_module, "metafeatures", recorded)
    X, y = _large_imbalanced()
    kb50 = replace(KB, info={"max_rows": 50})
    # KB first: a twin with the same scores but no row budget must not share its fit.
    recommend(X, y, knowledge=KB, method="static", n=1)
    recommend(X, y, knowledge=kb50, method="static", n=1)
    warm_start(X, y, knowledge=kb50, method="static", n=1)
    MetaLearnedClassifier(knowledge=kb50, method="static", n_evaluations=1).fit(
        X[["a"]].to_numpy(), y
    )
    assert seen == [300, 50, 50, 50]
