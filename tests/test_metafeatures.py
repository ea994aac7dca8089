"""Meta-features checked against independent computations (scipy, sklearn, hand counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_iris
from sklearn.metrics import mutual_info_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from metaml.errors import UserError
from metaml.taskrep.metafeatures import (
    GROUPS,
    discretize,
    metafeature_names,
    metafeatures,
)


def _all_finite(mf: dict[str, float]) -> None:
    assert list(mf) == metafeature_names()
    bad = {k: v for k, v in mf.items() if not math.isfinite(v)}
    assert not bad


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    X, y = load_iris(return_X_y=True)
    return X, y, metafeatures(X, y)


def test_general_matches_hand_counts(iris: tuple[np.ndarray, np.ndarray, dict[str, float]]) -> None:
    _, _, mf = iris
    assert (mf["nr_inst"], mf["nr_attr"], mf["nr_class"]) == (150, 4, 3)
    assert (mf["nr_num"], mf["nr_cat"], mf["nr_bin"]) == (4, 0, 0)
    assert mf["attr_to_inst"] == pytest.approx(4 / 150)
    assert mf["freq_class.mean"] == pytest.approx(1 / 3)
    assert mf["freq_class.sd"] == 0.0
    assert mf["class_ent"] == pytest.approx(math.log2(3))


def test_statistical_matches_scipy(iris: tuple[np.ndarray, np.ndarray, dict[str, float]]) -> None:
    X, _, mf = iris
    n = len(X)
    # pymfe's method 3 rescales scipy's biased estimates by the sample standard deviation.
    skew = stats.skew(X, axis=0) * ((n - 1) / n) ** 1.5
    kurt = (stats.kurtosis(X, axis=0) + 3) * ((n - 1) / n) ** 2 - 3
    assert mf["skewness.mean"] == pytest.approx(skew.mean())
    assert mf["skewness.sd"] == pytest.approx(skew.std(ddof=1))
    assert mf["kurtosis.mean"] == pytest.approx(kurt.mean())
    pairs = np.abs(np.corrcoef(X, rowvar=False))[np.tril_indices(4, k=-1)]
    assert mf["cor.mean"] == pytest.approx(pairs.mean())
    assert mf["nr_cor_attr"] == pytest.approx(np.mean(pairs >= 0.5))
    eig = np.linalg.eigvalsh(np.cov(X, rowvar=False))
    assert mf["eigenvalues.mean"] == pytest.approx(eig.mean())
    # Standardised iris: the first two components explain ~95.8% of the variance.
    assert mf["pca_95"] == pytest.approx(2 / 4)


def test_information_theory_matches_sklearn_mutual_info(
    iris: tuple[np.ndarray, np.ndarray, dict[str, float]],
) -> None:
    X, y, mf = iris
    bins = int(150 ** (1 / 3))
    cols = [discretize(X[:, j], bins) for j in range(4)]
    mi = np.array([mutual_info_score(c, y) / math.log(2) for c in cols])
    ent = np.array([stats.entropy(np.bincount(c), base=2) for c in cols])
    assert mf["mut_inf.mean"] == pytest.approx(mi.mean())
    assert mf["attr_ent.mean"] == pytest.approx(ent.mean())
    assert mf["ns_ratio"] == pytest.approx((ent.sum() - mi.sum()) / mi.sum())
    assert mf["eq_num_attr"] == pytest.approx(math.log2(3) / mi.mean())


def test_landmarking_matches_cross_val_score(
    iris: tuple[np.ndarray, np.ndarray, dict[str, float]],
) -> None:
    X, y, mf = iris
    scores = cross_val_score(KNeighborsClassifier(1), X, y, cv=StratifiedKFold(10))
    assert mf["one_nn.mean"] == pytest.approx(scores.mean())
    assert mf["one_nn.sd"] == pytest.approx(scores.std(ddof=1))
    # Iris's stump separates setosa only: exactly 2/3 in every stratified fold.
    assert mf["best_node.mean"] == pytest.approx(2 / 3)


def test_constant_columns_give_no_nan() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=40), np.full(40, 3.0), np.zeros(40)])
    y = np.repeat([0, 1], 20)
    mf = metafeatures(X, y)
    _all_finite(mf)
    # Skewness of the one varying column (method 3) averaged with two zeros.
    skew = stats.skew(X[:, 0]) * (39 / 40) ** 1.5
    assert mf["skewness.mean"] == pytest.approx(skew / 3)
    # Only the pair (0, 1), (0, 2), (1, 2): all involve a constant column -> 0.
    assert mf["cor.mean"] == 0.0
    all_constant = metafeatures(np.ones((10, 2)), np.repeat([0, 1], 5))
    _all_finite(all_constant)
    assert all_constant["one_nn.mean"] == pytest.approx(0.5)  # majority class, balanced


def test_missing_values_give_no_nan_and_are_counted() -> None:
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    num = rng.normal(size=30)
    num[[0, 5, 9]] = np.nan
    X = pd.DataFrame(
        {
            "num": num,
            "cat": rng.choice(["a", "b", None], size=30),
            "empty": np.full(30, np.nan),
        }
    )
    y = np.repeat(["u", "v", "w"], 10)
    mf = metafeatures(X, y)
    _all_finite(mf)
    cells = X.isna().to_numpy()
    assert mf["missing_ratio"] == pytest.approx(cells.mean())
    assert mf["missing_rows_ratio"] == pytest.approx(cells.any(axis=1).mean())
    assert (mf["nr_num"], mf["nr_cat"]) == (2, 1)
    observed = num[~np.isnan(num)]
    n = observed.size
    skew = stats.skew(observed) * ((n - 1) / n) ** 1.5
    assert mf["skewness.mean"] == pytest.approx(skew / 2)  # the all-missing column counts 0


def test_one_row_per_class_gives_no_nan() -> None:
    X = np.arange(12, dtype=float).reshape(4, 3)
    X[:, 2] = [1.0, 0.0, 1.0, 0.0]
    mf = metafeatures(X, ["a", "b", "c", "d"])
    _all_finite(mf)
    assert mf["nr_class"] == 4
    assert mf["nr_bin"] == 1
    assert mf["class_ent"] == pytest.approx(2.0)
    # Each test row's class is absent from its training fold: never predicted right.
    assert mf["one_nn.mean"] == 0.0
    single = metafeatures(np.array([[1.0, 2.0]]), ["a"])
    _all_finite(single)


def test_categorical_columns_counted_by_hand() -> None:
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(
        {
            "colour": ["r", "g", "b", "r", "g", "b", "r", "r"],
            "flag": [True, False, True, False, True, False, True, False],
            "x": [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.4, 0.6],
        }
    )
    y = ["p", "q", "p", "q", "p", "q", "p", "q"]
    mf = metafeatures(X, y, groups=["general", "info-theory"])
    assert (mf["nr_cat"], mf["nr_num"], mf["nr_bin"]) == (2, 1, 1)
    # flag == (y == "p"): its mutual information with the class is one full bit.
    h_colour = stats.entropy([4, 2, 2], base=2)
    h_flag = 1.0
    h_x = 1.0  # int(8 ** (1 / 3)) == 2 equal-frequency bins of 4 rows
    assert mf["attr_ent.mean"] == pytest.approx((h_x + h_colour + h_flag) / 3)
    mi_colour = mutual_info_score(X["colour"], y) / math.log(2)
    mi_x = mutual_info_score(discretize(X["x"].to_numpy(), 2), y) / math.log(2)
    assert mf["mut_inf.mean"] == pytest.approx((mi_x + mi_colour + 1.0) / 3)


def test_groups_and_errors() -> None:
    assert metafeature_names(["landmarking"]) == list(GROUPS["landmarking"])
    with pytest.raises(UserError, match="did you mean 'landmarking'"):
        metafeatures(np.ones((4, 1)), [0, 0, 1, 1], groups=["landmarkin"])
    with pytest.raises(UserError, match="3 labels"):
        metafeatures(np.ones((4, 1)), [0, 0, 1])
    with pytest.raises(UserError, match="DataFrame"):
        metafeatures(np.array([["a"], ["b"]], dtype=object), [0, 1])


def test_agrees_with_pymfe_where_names_overlap(
    iris: tuple[np.ndarray, np.ndarray, dict[str, float]],
) -> None:
    mfe = pytest.importorskip("pymfe.mfe")
    X, y, mf = iris
    ref = mfe.MFE(
        groups=["general", "statistical", "info-theory", "landmarking"],
        summary=["mean", "sd"],
        random_state=0,
    )
    names, values = ref.fit(X, y).extract(suppress_warnings=True)
    shared = [k for k in names if k in mf]
    assert len(shared) >= 30
    for k, v in zip(names, values, strict=True):
        if k in mf and math.isfinite(v):  # pymfe gives NaN where ours is documented as 0
            # pymfe adds 1e-8 to joint probabilities, hence the tolerance.
            assert mf[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_classes_without_spread_give_no_nan() -> None:
    # Every row of a class is the same point: LDA's within-class scatter is zero.
    X = np.r_[np.zeros((10, 2)), np.ones((10, 2))]
    mf = metafeatures(X, [0] * 10 + [1] * 10)
    _all_finite(mf)
    assert mf["linear_discr.mean"] == 1.0
    assert mf["one_nn.mean"] == 1.0
