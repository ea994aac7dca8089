"""The leave-one-dataset-out benchmark script on a tiny synthetic meta-knowledge."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import automl_loo
from metaml.automl.knowledge import MetaKnowledge, candidate_configurations

CANDS = candidate_configurations(10)


def _kb(n: int, configs: int = 10, seed: int = 0) -> MetaKnowledge:
    rng = np.random.default_rng(seed)
    names = [f"d{i}" for i in range(n)]
    mf = rng.normal(size=(n, 2))
    scores = 0.5 + 0.4 * rng.random((n, configs))
    return MetaKnowledge(
        names, names, ["f0", "f1"], mf, CANDS[:configs], scores, np.zeros((n, configs)), {}
    )


def test_evaluate_table_and_summary() -> None:
    kb = _kb(6)
    results = automl_loo.evaluate(kb, trees=5)
    assert set(automl_loo.RECOMMENDER_NAMES) <= set(results)
    for name, curves in results.items():
        assert curves.shape == (6, 10)
        assert (np.diff(curves, axis=1) >= -1e-12).all()  # best so far never drops
        if not name.startswith("default"):
            np.testing.assert_allclose(curves[:, -1], 1.0)  # every candidate tried: the best
    table = automl_loo.table(results)
    assert table.count("\n") == len(results) + 1
    summary = automl_loo._summary(results, 10)
    assert summary.count("first recommendation median") == len(automl_loo.RECOMMENDER_NAMES)
    regret = automl_loo.regret_summary(kb, results)
    assert regret.count("after 5, median") == len(automl_loo.RECOMMENDER_NAMES)


def test_raw_regret_by_hand() -> None:
    kb = _kb(3, configs=4)
    kb.scores = np.array([[0.5, 0.6, 0.7, 0.9], [0.8, 0.8, 0.8, 0.8], [0.2, 0.4, 0.6, 0.6]])
    curves = np.array([[0.5, 0.75, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0]])
    # Best after 2: 0.8 (0.1 below 0.9), 0.8 (none below), 0.4 (0.2 below 0.6).
    np.testing.assert_allclose(automl_loo.raw_regret(kb, curves, 2), [0.1, 0.0, 0.2])


def test_versus_old_uses_only_the_new_datasets() -> None:
    new = _kb(8)
    old = new.subset(np.arange(4))
    old = MetaKnowledge(
        old.names, old.families, old.metafeature_names, old.metafeatures,
        CANDS[:6], old.scores[:, :6], old.fit_times[:, :6], {},
    )  # fmt: skip
    results = automl_loo.evaluate(new, trees=5)
    text = automl_loo.versus_old(new, old, results, trees=5)
    assert text.startswith("4 datasets new in `kb`")
    assert text.count("\n| ") == len(automl_loo.recommenders()) + 1  # header and one per method
    assert automl_loo.versus_old(new, new, results) == "no datasets new in `kb`."
    with pytest.raises(ValueError, match="candidates the new one lacks"):
        automl_loo.versus_old(old, new, results)


def test_a_larger_knowledge_is_compared_on_the_held_out_datasets_of_a_smaller_one() -> None:
    new = _kb(8)
    old_rows = [1, 3, 6]
    old = new.subset(old_rows)
    test = automl_loo.held_out_rows(new, old)
    assert test == old_rows
    results = automl_loo.evaluate(new, trees=5, test=test, n_jobs=2)
    assert all(curves.shape == (3, 10) for curves in results.values())
    text = automl_loo.versus_old(new, old, results, test, on="test", trees=5)
    assert text.startswith("3 test datasets")
    # The static portfolio by hand: each test dataset is judged on the greedy portfolio of
    # the other old datasets ("old"), or of all 7 other datasets ("new"; each its own family).
    from metaml.automl.recommend import StaticPortfolio, evaluation_order, normalised_scores

    norm = normalised_scores(new.scores)

    def first_choice(i: int, train: list[int]) -> float:
        rec = StaticPortfolio().fit(new.subset([j for j in train if j != i]))
        return float(norm[i, evaluation_order(rec, new, i, 1)[0]])

    before = [first_choice(i, old_rows) for i in test]
    after = [first_choice(i, list(range(8))) for i in test]
    np.testing.assert_allclose(results["static portfolio"][:, 0], after)
    row = next(line for line in text.splitlines() if line.startswith("| static portfolio"))
    cells = row.split(" | ")
    assert cells[1] == f"{np.median(before):.3f} ({np.mean(before):.3f})"
    assert cells[2].startswith(f"{np.median(after):.3f} ({np.mean(after):.3f})")
    with pytest.raises(ValueError, match="'new' or 'test'"):
        automl_loo.versus_old(new, old, results, test, on="tests")
    with pytest.raises(ValueError, match="one row per test dataset"):
        automl_loo.versus_old(new, old, results, [0, 1], on="test")


def test_repeat_weighting_compares_the_meta_model_weighted_and_not() -> None:
    kb = _kb(8)
    kb.info = {
        "dataset_split_seeds": {n: [0, 1, 2] if i < 3 else [0] for i, n in enumerate(kb.names)}
    }
    old = kb.subset([0, 1, 2])
    text = automl_loo.repeat_weighting(kb, [0, 4, 6], old=old, old_name="`old`", trees=5)
    assert text.startswith("8 training datasets by number of repeats: 5 with 1, 3 with 3.")
    rows = [line for line in text.splitlines() if line.startswith("| meta-model")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| meta-model",
        "| meta-model, weighted by repeats",
        "| meta-model fitted on `old`",
    ]
    # The weighted row's first recommendations by hand: fit on the 7 others, take the top.
    from metaml.automl.recommend import MetaModel, evaluation_order, normalised_scores

    norm = normalised_scores(kb.scores)
    firsts = []
    for i in (0, 4, 6):
        model = MetaModel(n_estimators=5, n_jobs=1, weight_by_repeats=True)
        model.fit(kb.subset([j for j in range(8) if j != i]))
        firsts.append(norm[i, evaluation_order(model, kb, i, 1)[0]])
    assert rows[1].split(" | ")[1].startswith(f"{np.median(firsts):.3f} [")


def test_main_judged_on_repeats_records_its_own_section_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.common

    kb = dataclasses.replace(_kb(5), info={"max_rows": 200})
    kb.save(tmp_path / "kb.json.gz")
    repeats = []
    for seed in (1, 2):
        noise = np.random.default_rng(seed).normal(0, 0.02, kb.scores.shape)
        repeats.append(tmp_path / f"r{seed}.json.gz")
        repeat = dataclasses.replace(kb, scores=kb.scores + noise, info={"max_rows": 1000})
        repeat.save(repeats[-1])
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(benchmarks.common, "RESULTS", results)
    monkeypatch.setattr(automl_loo, "HERE", tmp_path)
    argv = ["automl_loo", "--knowledge", str(tmp_path / "kb.json.gz"), "--record"]
    monkeypatch.setattr(sys, "argv", [*argv, "--judge-repeats", *map(str, repeats)])
    automl_loo.main()
    text = results.read_text()
    assert "(kb.json.gz), judged on held-out repeats (2 in all) of at most 1000 rows" in text
    assert "returns the best configuration it saw" in text
    assert "The repeats score on at most 1000 rows; the knowledge that trains, on 200." in text
    assert f"--judge-repeats {repeats[0]} {repeats[1]} --record`" in text
    assert (tmp_path / "automl_loo_judged.png").exists()
    assert not (tmp_path / "automl_loo.png").exists()  # the plain run's plot is left alone
    monkeypatch.setattr(sys, "argv", [*argv, "--judge-repeats", str(repeats[0]), "--weighting"])
    with pytest.raises(SystemExit):
        automl_loo.main()
