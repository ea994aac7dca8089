"""Dataset meta-features: a tabular classification task as a fixed-length vector of numbers.

Four groups, named after pymfe's features where they overlap (same definitions, so a value
can be checked against pymfe; ``.mean``/``.sd`` summarise per-attribute or per-fold values,
``sd`` with ``ddof=1`` as pymfe does):

- ``general``: ``nr_inst``, ``nr_attr``, ``nr_class``, ``nr_num``, ``nr_cat``, ``nr_bin``,
  ``attr_to_inst``, ``inst_to_attr``, ``cat_to_num``, ``num_to_cat``, ``freq_class.mean/sd``,
  and (not in pymfe) ``missing_ratio`` (missing cells), ``missing_rows_ratio``, ``cat_ratio``.
- ``statistical`` (numeric columns): ``skewness`` and ``kurtosis`` (pymfe's default method 3:
  ``m3/s**3`` and ``m4/s**4 - 3`` with the sample standard deviation ``s``), ``cor`` (absolute
  Pearson correlation of attribute pairs), ``nr_cor_attr`` (share of pairs with ``|cor| >= 0.5``),
  ``eigenvalues`` (of the covariance matrix) and, as in auto-sklearn, ``pca_95`` (share of
  principal components needed for 95% of the variance of the standardised data),
  ``pca_skewness_first`` and ``pca_kurtosis_first`` (of the data projected on the first one).
- ``info-theory``: numeric columns discretised as pymfe does (equal-frequency bins,
  ``int(n ** (1/3))`` of them), categorical ones as they are; ``attr_ent``, ``class_ent``,
  ``joint_ent``, ``mut_inf`` (bits), ``eq_num_attr = class_ent / mean(mut_inf)`` and
  ``ns_ratio = (sum(attr_ent) - sum(mut_inf)) / sum(mut_inf)``.
- ``landmarking``: accuracy of 1-NN (``one_nn``), a decision stump (``best_node``), Gaussian naive
  Bayes (``naive_bayes``) and LDA (``linear_discr``) by stratified 10-fold cross-validation
  without shuffling (pymfe's defaults), on at most ``landmark_max_rows`` rows.

Robustness (no NaN or infinity ever comes out; each case has a test):

- constant columns have skewness and kurtosis 0, correlation 0 with every other column, and are
  left out of PCA and the landmarkers;
- missing values: skewness and kurtosis use the observed values, correlation, covariance, PCA
  and landmarkers the column median (or most frequent category), the information-theoretic
  features count "missing" as one more value;
- a single row per class: the landmarkers still run (a class absent from a training fold is
  simply never predicted); a training fold with one class, or with no more rows than classes
  for LDA, predicts its majority class; LDA on classes without spread (every row of a class
  identical) predicts the nearest class mean, its limit;
- a group with nothing to describe (no numeric column for ``statistical``) gives 0s, and
  ``mut_inf`` is floored at ``1e-4`` bits inside the two ratios that divide by it.

Example:
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> mf = metafeatures(X, y)
    >>> mf["nr_inst"], mf["nr_class"], round(mf["class_ent"], 4)
    (150.0, 3.0, 1.585)
    >>> list(mf) == metafeature_names()
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from metaml.errors import UserError, unknown_name_error

GROUPS: dict[str, tuple[str, ...]] = {
    "general": (
        "nr_inst",
        "nr_attr",
        "nr_class",
        "nr_num",
        "nr_cat",
        "nr_bin",
        "attr_to_inst",
        "inst_to_attr",
        "cat_to_num",
        "num_to_cat",
        "freq_class.mean",
        "freq_class.sd",
        "missing_ratio",
        "missing_rows_ratio",
        "cat_ratio",
    ),
    "statistical": (
        "skewness.mean",
        "skewness.sd",
        "kurtosis.mean",
        "kurtosis.sd",
        "cor.mean",
        "cor.sd",
        "nr_cor_attr",
        "eigenvalues.mean",
        "eigenvalues.sd",
        "pca_95",
        "pca_skewness_first",
        "pca_kurtosis_first",
    ),
    "info-theory": (
        "attr_ent.mean",
        "attr_ent.sd",
        "class_ent",
        "joint_ent.mean",
        "joint_ent.sd",
        "mut_inf.mean",
        "mut_inf.sd",
        "eq_num_attr",
        "ns_ratio",
    ),
    "landmarking": (
        "one_nn.mean",
        "one_nn.sd",
        "best_node.mean",
        "best_node.sd",
        "naive_bayes.mean",
        "naive_bayes.sd",
        "linear_discr.mean",
        "linear_discr.sd",
    ),
}
ALL_GROUPS = tuple(GROUPS)
MIN_MUT_INF = 1e-4  # bits; the floor inside eq_num_attr and ns_ratio
_MAX_ONE_HOT = 20  # most frequent categories one-hot encoded per column for the landmarkers


def metafeature_names(groups: Sequence[str] = ALL_GROUPS) -> list[str]:
    """The names :func:`metafeatures` returns for ``groups``, in order.

    Example:
        >>> metafeature_names(["general"])[:3]
        ['nr_inst', 'nr_attr', 'nr_class']
    """
    return [name for group in _check_groups(groups) for name in GROUPS[group]]


def metafeatures(
    X: Any,
    y: Any,
    groups: Sequence[str] = ALL_GROUPS,
    landmark_folds: int = 10,
    landmark_max_rows: int | None = 5000,
    random_state: int = 0,
) -> dict[str, float]:
    """Meta-features of the classification task ``(X, y)``: ``{name: value}``, all finite.

    ``X`` is a 2-D numeric array or a pandas DataFrame (object, string, category and boolean
    columns are categorical); ``y`` holds the labels.

    Example:
        >>> import numpy as np
        >>> X = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
        >>> mf = metafeatures(X, ["a", "a", "b", "b"], groups=["general", "statistical"])
        >>> mf["nr_attr"], mf["skewness.mean"], mf["freq_class.mean"]
        (2.0, 0.0, 0.5)
    """
    groups = _check_groups(groups)
    data = _Prepared.from_xy(X, y)
    out: dict[str, float] = {}
    if "general" in groups:
        out.update(_general(data))
    if "statistical" in groups:
        out.update(_statistical(data))
    if "info-theory" in groups:
        out.update(_info_theory(data))
    if "landmarking" in groups:
        out.update(_landmarking(data, landmark_folds, landmark_max_rows, random_state))
    result = {name: float(out[name]) for name in metafeature_names(groups)}
    bad = [k for k, v in result.items() if not math.isfinite(v)]
    assert not bad, f"non-finite meta-features {bad}"  # a bug here, never the user's data
    return result


def _check_groups(groups: Sequence[str]) -> list[str]:
    if isinstance(groups, str):
        groups = [groups]
    for group in groups:
        if group not in GROUPS:
            raise unknown_name_error("meta-feature group", group, GROUPS)
    return [g for g in ALL_GROUPS if g in groups]


class _Prepared:
    """The task split once into what every group needs."""

    def __init__(
        self,
        numeric: np.ndarray,
        categorical: np.ndarray,
        y: np.ndarray,
        n_classes: int,
    ) -> None:
        self.numeric = numeric  # (n, p_num) float, NaN = missing
        self.categorical = categorical  # (n, p_cat) int codes, -1 = missing
        self.y = y  # (n,) int codes 0..K-1
        self.n_classes = n_classes
        self.n = len(y)
        # Median-imputed numeric matrix (an all-missing column becomes 0).
        med = np.zeros(numeric.shape[1])
        for j in range(numeric.shape[1]):
            col = numeric[:, j]
            observed = col[~np.isnan(col)]
            med[j] = np.median(observed) if observed.size else 0.0
        self.imputed = np.where(np.isnan(numeric), med, numeric)

    @classmethod
    def from_xy(cls, X: Any, y: Any) -> _Prepared:
        y_arr = np.asarray(y)
        if y_arr.ndim != 1:
            raise UserError(f"y must be one label per row, got shape {y_arr.shape}")
        numeric, categorical = _split_columns(X)
        n = numeric.shape[0] if numeric.size or numeric.shape[0] else categorical.shape[0]
        if n != len(y_arr):
            raise UserError(f"X has {n} rows but y has {len(y_arr)} labels")
        if n == 0 or numeric.shape[1] + categorical.shape[1] == 0:
            raise UserError(f"meta-features need at least one row and one column, got {n} rows")
        _, y_codes = np.unique(
            y_arr.astype(str) if y_arr.dtype == object else y_arr, return_inverse=True
        )
        return cls(numeric, categorical, y_codes.astype(np.int64), int(y_codes.max()) + 1)


def _split_columns(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """(numeric float matrix with NaN, categorical int-code matrix with -1 for missing)."""
    if hasattr(X, "columns") and hasattr(X, "dtypes"):  # a pandas DataFrame, imported lazily
        from metaml.data.tabular import categorical_columns, require

        pd = require("pandas")
        cats = set(categorical_columns(X))
        num_cols = [c for c in X.columns if c not in cats]
        numeric = X[num_cols].to_numpy(dtype=float, na_value=np.nan) if num_cols else None
        codes = [pd.factorize(X[c], use_na_sentinel=True)[0] for c in X.columns if c in cats]
        n = len(X)
        categorical = np.stack(codes, axis=1) if codes else np.zeros((n, 0), dtype=np.int64)
        if numeric is None:
            numeric = np.zeros((n, 0))
        return numeric.astype(float), categorical.astype(np.int64)
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise UserError(f"X must be 2-D (rows, columns), got shape {arr.shape}")
    try:
        numeric = arr.astype(float)
    except (TypeError, ValueError):
        raise UserError(
            "X has non-numeric values; pass a pandas DataFrame so categorical columns are known"
        ) from None
    return numeric, np.zeros((arr.shape[0], 0), dtype=np.int64)


def _sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _general(d: _Prepared) -> dict[str, float]:
    n, p_num, p_cat = d.n, d.numeric.shape[1], d.categorical.shape[1]
    p = p_num + p_cat
    missing = np.concatenate([np.isnan(d.numeric), d.categorical < 0], axis=1)
    distinct = [np.unique(c[~np.isnan(c)]).size for c in d.numeric.T]
    distinct += [np.unique(c[c >= 0]).size for c in d.categorical.T]
    freq = np.bincount(d.y, minlength=d.n_classes) / n
    return {
        "nr_inst": n,
        "nr_attr": p,
        "nr_class": d.n_classes,
        "nr_num": p_num,
        "nr_cat": p_cat,
        "nr_bin": sum(1 for k in distinct if k == 2),
        "attr_to_inst": p / n,
        "inst_to_attr": n / p,
        "cat_to_num": p_cat / p_num if p_num else 0.0,
        "num_to_cat": p_num / p_cat if p_cat else 0.0,
        "freq_class.mean": _mean(freq),
        "freq_class.sd": _sd(freq),
        "missing_ratio": float(missing.mean()),
        "missing_rows_ratio": float(missing.any(axis=1).mean()),
        "cat_ratio": p_cat / p,
    }


def _moments(col: np.ndarray) -> tuple[float, float]:
    """pymfe's method-3 skewness and kurtosis of the observed values; (0, 0) when constant."""
    v = col[~np.isnan(col)]
    n = v.size
    if n < 2:
        return 0.0, 0.0
    c = v - v.mean()
    m2 = float(np.mean(c**2))
    if m2 <= 1e-24 * max(1.0, float(np.mean(v**2))):
        return 0.0, 0.0
    m3, m4 = float(np.mean(c**3)), float(np.mean(c**4))
    shrink = (n - 1) / n
    return m3 / m2**1.5 * shrink**1.5, m4 / m2**2 * shrink**2 - 3.0


def _nonconstant(Z: np.ndarray) -> np.ndarray:
    spread = Z.max(axis=0) - Z.min(axis=0) if Z.shape[0] else np.zeros(Z.shape[1])
    scale = np.maximum(1.0, np.abs(Z).max(axis=0)) if Z.shape[0] else np.ones(Z.shape[1])
    return spread > 1e-12 * scale


def _statistical(d: _Prepared) -> dict[str, float]:
    names = GROUPS["statistical"]
    out = dict.fromkeys(names, 0.0)
    p = d.numeric.shape[1]
    if p == 0:
        return out
    moments = np.array([_moments(col) for col in d.numeric.T])  # (p, 2)
    out["skewness.mean"], out["skewness.sd"] = _mean(moments[:, 0]), _sd(moments[:, 0])
    out["kurtosis.mean"], out["kurtosis.sd"] = _mean(moments[:, 1]), _sd(moments[:, 1])

    Z = d.imputed
    keep = _nonconstant(Z)
    if p >= 2:
        # Correlation of standardised columns; a constant column correlates 0 with the rest.
        Zs = np.zeros_like(Z)
        if keep.any():
            zk = Z[:, keep] - Z[:, keep].mean(axis=0)
            Zs[:, keep] = zk / np.sqrt(np.mean(zk**2, axis=0))
        corr = np.clip(np.abs(Zs.T @ Zs) / d.n, 0.0, 1.0)
        pairs = corr[np.tril_indices(p, k=-1)]
        out["cor.mean"], out["cor.sd"] = _mean(pairs), _sd(pairs)
        out["nr_cor_attr"] = float(np.mean(pairs >= 0.5))
    if d.n >= 2:
        eig = np.linalg.eigvalsh(np.atleast_2d(np.cov(Z, rowvar=False)))
        out["eigenvalues.mean"], out["eigenvalues.sd"] = _mean(eig), _sd(eig)
    if keep.any() and d.n >= 2:
        zk = Z[:, keep] - Z[:, keep].mean(axis=0)
        zk = zk / zk.std(axis=0)
        _, s, vt = np.linalg.svd(zk, full_matrices=False)
        var = s**2 / np.sum(s**2)
        out["pca_95"] = float(np.searchsorted(np.cumsum(var), 0.95) + 1) / p
        first = zk @ vt[0]
        skew, kurt = _moments(first)
        out["pca_skewness_first"], out["pca_kurtosis_first"] = skew, kurt
    return out


def discretize(col: np.ndarray, num_bins: int) -> np.ndarray:
    """pymfe's equal-frequency discretisation of one numeric column; NaN becomes its own bin.

    Example:
        >>> discretize(np.array([1.0, 2.0, 3.0, 4.0, np.nan]), 2).tolist()
        [0, 0, 1, 1, 2]
    """
    out = np.full(col.shape, -1, dtype=np.int64)
    observed = ~np.isnan(col)
    v = col[observed]
    if v.size:
        divs = np.quantile(v, np.linspace(0, 1, num_bins + 1)[1:])
        divs = np.unique(divs[np.append(True, np.diff(divs) > 1e-8)])
        out[observed] = np.digitize(v, divs, right=True)
    out[~observed] = out.max() + 1 if v.size else 0
    return out


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def _info_theory(d: _Prepared) -> dict[str, float]:
    num_bins = max(1, int(d.n ** (1 / 3)))
    columns = [discretize(c, num_bins) for c in d.numeric.T]
    columns += [np.where(c < 0, c.max() + 1, c) for c in d.categorical.T]
    class_ent = _entropy(np.bincount(d.y))
    attr_ent, joint_ent, mut_inf = [], [], []
    for c in columns:
        _, codes = np.unique(c, return_inverse=True)
        h_x = _entropy(np.bincount(codes))
        joint = codes * d.n_classes + d.y
        h_xy = _entropy(np.bincount(joint))
        attr_ent.append(h_x)
        joint_ent.append(h_xy)
        mut_inf.append(max(0.0, h_x + class_ent - h_xy))
    a, j, m = np.array(attr_ent), np.array(joint_ent), np.array(mut_inf)
    return {
        "attr_ent.mean": _mean(a),
        "attr_ent.sd": _sd(a),
        "class_ent": class_ent,
        "joint_ent.mean": _mean(j),
        "joint_ent.sd": _sd(j),
        "mut_inf.mean": _mean(m),
        "mut_inf.sd": _sd(m),
        "eq_num_attr": class_ent / max(_mean(m), MIN_MUT_INF),
        "ns_ratio": (float(a.sum()) - float(m.sum())) / max(float(m.sum()), MIN_MUT_INF),
    }


def _no_within_class_spread(X: np.ndarray, y: np.ndarray) -> bool:
    centred = X.copy()
    for k in np.unique(y):
        centred[y == k] -= X[y == k].mean(axis=0)
    return bool(np.abs(centred).max() <= 1e-12 * max(1.0, float(np.abs(X).max())))


def _landmark_matrix(d: _Prepared) -> np.ndarray:
    """Numeric columns (median-imputed) and one-hot categories, constant columns removed."""
    blocks = [d.imputed]
    for c in d.categorical.T:
        values, counts = np.unique(c, return_counts=True)
        top = values[np.argsort(-counts, kind="stable")[:_MAX_ONE_HOT]]
        blocks.append((c[:, None] == top[None, :]).astype(float))
    L = np.concatenate(blocks, axis=1) if blocks else np.zeros((d.n, 0))
    return L[:, _nonconstant(L)]


def _landmarking(
    d: _Prepared, folds: int, max_rows: int | None, random_state: int
) -> dict[str, float]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    L, y = _landmark_matrix(d), d.y
    if max_rows is not None and d.n > max_rows:
        rng = np.random.default_rng(random_state)
        # Stratified subsample: the same share of every class, at least one row each.
        idx = []
        for k in range(d.n_classes):
            rows = np.flatnonzero(y == k)
            take = max(1, round(len(rows) * max_rows / d.n))
            idx.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
        sel = np.sort(np.concatenate(idx))
        L, y = L[sel], y[sel]
    models: dict[str, Any] = {
        "one_nn": lambda: KNeighborsClassifier(n_neighbors=1),
        "best_node": lambda: DecisionTreeClassifier(max_depth=1, random_state=random_state),
        "naive_bayes": lambda: GaussianNB(),
        "linear_discr": lambda: LinearDiscriminantAnalysis(),
    }
    # Stratified folds as pymfe, with no more folds than the largest class has rows; when
    # every class has a single row, plain (leave-one-out style) folds.
    largest = int(np.bincount(y).max())
    stratified = largest >= 2
    n_splits = min(folds, largest if stratified else len(y))
    scores: dict[str, list[float]] = {name: [] for name in models}
    if n_splits < 2:
        return {f"{name}.{s}": 0.0 for name in models for s in ("mean", "sd")}
    with warnings.catch_warnings():
        # Fewer rows in a class than folds, collinear columns: expected on small real data.
        warnings.simplefilter("ignore")
        cv = StratifiedKFold(n_splits) if stratified else KFold(n_splits)
        splits = list(cv.split(L, y))
        for train, test in splits:
            classes = np.unique(y[train])
            for name, make in models.items():
                # LDA needs more rows than classes to estimate the shared covariance.
                lda_cannot = name == "linear_discr" and len(train) <= len(classes)
                if len(classes) == 1 or L.shape[1] == 0 or lda_cannot:
                    # Nothing to learn from: predict the (majority) training class.
                    pred = np.full(len(test), np.bincount(y[train]).argmax())
                elif name == "linear_discr" and _no_within_class_spread(L[train], y[train]):
                    # LDA's limit when every class is a single point: the nearest class mean
                    # (scikit-learn's LDA fails on a zero within-class scatter).
                    means = np.stack([L[train][y[train] == k].mean(axis=0) for k in classes])
                    dist = ((L[test][:, None, :] - means[None]) ** 2).sum(axis=2)
                    pred = classes[dist.argmin(axis=1)]
                else:
                    pred = make().fit(L[train], y[train]).predict(L[test])
                scores[name].append(float(np.mean(pred == y[test])))
    out: dict[str, float] = {}
    for name, values in scores.items():
        arr = np.array(values)
        out[f"{name}.mean"], out[f"{name}.sd"] = _mean(arr), _sd(arr)
    return out
