"""Recommend configurations for a new dataset and run a search warm-started with them.

:func:`recommend` computes the dataset's meta-features and ranks the meta-knowledge's
candidates with a recommender. :func:`warm_started_search` is an Optuna study (TPE) whose
first trials are the recommendations (enqueued), so the sampler starts from what worked on
similar datasets; with an :class:`AdaptiveWarmStart` each of those first trials is proposed
after the scores of the ones before (:class:`~metaml.automl.recommend.ActiveTesting`). It
stops at a time budget or a number of trials, then refits the best configuration on all rows.
:func:`save_model` writes the fitted pipeline with skops (no pickle) and :func:`load_model`
reads it back, trusting only scikit-learn's and metaml's types.

Example:
    >>> from metaml.data.tabular import load_rdataset
    >>> iris = load_rdataset("datasets", "iris", "Species")
    >>> recs = recommend(iris.X, iris.y, n=3)
    >>> len(recs)
    3
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metaml.automl.knowledge import MetaKnowledge, cross_validate
from metaml.automl.portfolio import Configuration, make_pipeline, suggest_configuration
from metaml.automl.recommend import (
    Recommendation,
    Recommender,
    evaluate_in_order,
    make_recommender,
)
from metaml.errors import UserError

if TYPE_CHECKING:
    import optuna

    from metaml.data.tabular import TabularTask

_FITTED: dict[tuple[str, str], Recommender] = {}


def _content_key(kb: MetaKnowledge) -> str:
    import hashlib

    h = hashlib.sha256()
    for arr in (kb.metafeatures, kb.scores):
        h.update(np.ascontiguousarray(arr, dtype=float).tobytes())
    # info too: its max_rows decides how a new dataset is described (dataset_metafeatures).
    info = json.dumps(kb.info, sort_keys=True, default=str)
    h.update(json.dumps([kb.names, [c.key for c in kb.configurations], info]).encode())
    return h.hexdigest()


def fitted_recommender(
    knowledge: MetaKnowledge | str | Path | None = None, method: str = "nearest"
) -> Recommender:
    """A recommender fitted on ``knowledge`` (the shipped file when None), cached per process.

    Example:
        >>> fitted_recommender(method="nearest").name
        'nearest'
    """
    if isinstance(knowledge, MetaKnowledge):
        key = (_content_key(knowledge), method)
        if key not in _FITTED:
            _FITTED[key] = make_recommender(method).fit(knowledge)
        return _FITTED[key]
    key = (str(Path(knowledge).resolve()) if knowledge is not None else "shipped", method)
    if key not in _FITTED:
        kb = MetaKnowledge.load(knowledge)
        _FITTED[key] = make_recommender(method).fit(kb)
    return _FITTED[key]


def dataset_metafeatures(
    X: Any, y: Any, knowledge: MetaKnowledge, random_state: int = 0
) -> dict[str, float]:
    """Meta-features of ``(X, y)`` computed as ``knowledge``'s were: on a stratified subsample
    of at most its ``max_rows`` rows.

    The knowledge describes each training dataset by such a subsample, so a larger new
    dataset described whole would sit outside the range the recommenders learned (its row
    count, for one); its landmarks would also cost more.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(600, 3)), np.repeat([0, 1], 300)
        >>> kb = MetaKnowledge.load()
        >>> kb.info["max_rows"], dataset_metafeatures(X, y, kb)["nr_inst"]
        (200, 200.0)
    """
    from metaml.automl.corpus import stratified_subsample
    from metaml.taskrep.metafeatures import metafeatures

    max_rows = knowledge.info.get("max_rows")
    labels = np.asarray(y)
    if isinstance(max_rows, int) and len(labels) > max_rows:
        keep = stratified_subsample(labels, max_rows, random_state)
        X = X.iloc[keep] if hasattr(X, "iloc") else np.asarray(X)[keep]
        labels = labels[keep]
    return metafeatures(X, labels, random_state=random_state)


def recommend(
    X: Any,
    y: Any,
    knowledge: MetaKnowledge | str | Path | None = None,
    method: str = "nearest",
    n: int | None = 10,
    random_state: int = 0,
) -> list[Recommendation]:
    """Ranked configurations for the dataset ``(X, y)``, best first, with predicted scores.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(60, 3)), np.repeat([0, 1], 30)
        >>> recommend(X, y, method="static", n=2)[0].source
        'static portfolio'
    """
    rec = fitted_recommender(knowledge, method)
    return rec.rank(dataset_metafeatures(X, y, rec.kb_, random_state), n)


@dataclass
class AdaptiveWarmStart:
    """Warm start from an adaptive recommender: ``n`` trials, each proposed by the fitted
    ``recommender`` after the scores of the trials before.

    Example:
        >>> from metaml.automl.recommend import ActiveTesting
        >>> AdaptiveWarmStart(ActiveTesting(), {}, n=5).n
        5
    """

    recommender: Recommender
    metafeatures: Mapping[str, float] | np.ndarray
    n: int = 5


def warm_start(
    X: Any,
    y: Any,
    knowledge: MetaKnowledge | str | Path | None = None,
    method: str = "nearest",
    n: int = 5,
    random_state: int = 0,
) -> list[Recommendation] | AdaptiveWarmStart:
    """What :func:`warm_started_search` starts from: the first ``n`` recommendations, or, for
    an adaptive recommender (``method="active"``), an :class:`AdaptiveWarmStart`.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(60, 3)), np.repeat([0, 1], 30)
        >>> type(warm_start(X, y, method="active")).__name__
        'AdaptiveWarmStart'
    """
    rec = fitted_recommender(knowledge, method)
    mf = dataset_metafeatures(X, y, rec.kb_, random_state)
    return AdaptiveWarmStart(rec, mf, n) if rec.adaptive else rec.rank(mf, n)


@dataclass
class Trial:
    """One evaluated configuration of a search.

    Example:
        >>> from metaml.automl.portfolio import default_configuration
        >>> Trial(default_configuration("knn"), 0.8, "random", 0.1).score
        0.8
    """

    config: Configuration
    score: float
    source: str
    seconds: float


@dataclass
class SearchResult:
    """The outcome of :func:`warm_started_search`: the trials, the best, the refitted pipeline.

    Example:
        >>> SearchResult([], None).best is None
        True
    """

    trials: list[Trial]
    pipeline: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Trial | None:
        """The trial with the highest cross-validated balanced accuracy."""
        return max(self.trials, key=lambda t: t.score) if self.trials else None

    def report(self) -> dict[str, Any]:
        """A JSON-serialisable summary: the best trial and every trial in order."""
        best = self.best
        return {
            **self.info,
            "best": None
            if best is None
            else {**best.config.to_json(), "score": best.score, "source": best.source},
            "trials": [
                {**t.config.to_json(), "score": t.score, "source": t.source, "seconds": t.seconds}
                for t in self.trials
            ],
        }

    def markdown(self) -> str:
        """The report as a Markdown table, best first."""
        lines = [
            f"# AutoML report: {self.info.get('data', '')}",
            "",
            f"{len(self.trials)} configurations evaluated by {self.info.get('folds')}-fold "
            f"balanced accuracy in {self.info.get('seconds', 0):.0f} s.",
            "",
            "| rank | score | algorithm | parameters | source |",
            "|---|---|---|---|---|",
        ]
        for i, t in enumerate(sorted(self.trials, key=lambda t: -t.score), 1):
            params = ", ".join(f"{k}={v}" for k, v in sorted(t.config.params.items()))
            lines.append(f"| {i} | {t.score:.4f} | {t.config.algorithm} | {params} | {t.source} |")
        return "\n".join(lines) + "\n"


def warm_started_search(
    task: TabularTask,
    recommendations: Sequence[Recommendation] | AdaptiveWarmStart,
    budget_s: float | None = 60.0,
    n_trials: int | None = None,
    folds: int = 5,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
) -> SearchResult:
    """Evaluate the recommendations first, then let Optuna's TPE continue, until ``budget_s``
    seconds or ``n_trials`` trials; refit the best configuration on all rows.

    ``recommendations`` is a ranked list (all enqueued at once) or an
    :class:`AdaptiveWarmStart` (each of its trials proposed after the scores of those before).

    Example:
        >>> from metaml.data.tabular import load_rdataset
        >>> iris = load_rdataset("datasets", "iris", "Species")
        >>> res = warm_started_search(iris, recommend(iris.X, iris.y, n=2), n_trials=3, folds=3)
        >>> len(res.trials), res.best.score > 0.9
        (3, True)
    """
    from threadpoolctl import threadpool_limits

    from metaml.data.tabular import require

    opt = require("optuna", "metaml automl fit")
    if budget_s is None and n_trials is None:
        raise UserError("give a time budget or a number of trials")
    opt.logging.set_verbosity(opt.logging.WARNING)
    n_warm = (
        recommendations.n
        if isinstance(recommendations, AdaptiveWarmStart)
        else len(recommendations)
    )
    study = opt.create_study(
        direction="maximize",
        sampler=opt.samplers.TPESampler(seed=seed, n_startup_trials=max(5, n_warm)),
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None,
    )
    sources: dict[str, str] = {}
    if not isinstance(recommendations, AdaptiveWarmStart):
        for rec in recommendations:
            if rec.config.key not in sources:
                sources[rec.config.key] = rec.source
                study.enqueue_trial(rec.config.optuna_params())
    trials: list[Trial] = []

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest_configuration(trial)
        start = time.perf_counter()
        try:
            score, _ = cross_validate(cfg, task, folds=folds, seed=seed)
        except Exception as exc:  # a configuration that cannot fit: chance, with the reason
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:300])
            score = 1.0 / task.n_classes
        trials.append(
            Trial(cfg, score, sources.get(cfg.key, "search (TPE)"), time.perf_counter() - start)
        )
        return score

    start = time.perf_counter()
    with threadpool_limits(1):
        if isinstance(recommendations, AdaptiveWarmStart):
            _adaptive_trials(study, objective, recommendations, trials, sources, n_trials, budget_s)
        left_s = None if budget_s is None else budget_s - (time.perf_counter() - start)
        left_trials = None if n_trials is None else n_trials - len(trials)
        if (left_s is None or left_s > 0) and (left_trials is None or left_trials > 0):
            study.optimize(objective, n_trials=left_trials, timeout=left_s, gc_after_trial=False)
        if not trials:
            raise UserError(f"no configuration finished within {budget_s} s; raise --budget")
        best = max(trials, key=lambda t: t.score)
        pipeline = make_pipeline(best.config, task.X, random_state=seed).fit(task.X, task.y)
    info = {
        "data": task.name,
        "target": task.target,
        "rows": len(task.y),
        "features": task.X.shape[1],
        "classes": task.n_classes,
        "folds": folds,
        "seconds": round(time.perf_counter() - start, 2),
        "budget_s": budget_s,
        "seed": seed,
    }
    return SearchResult(trials, pipeline, info)


def _adaptive_trials(
    study: optuna.Study,
    objective: Any,
    warm: AdaptiveWarmStart,
    trials: list[Trial],
    sources: dict[str, str],
    n_trials: int | None,
    budget_s: float | None,
) -> None:
    """Run the warm start's trials one at a time, each proposed from the scores so far."""
    start = time.perf_counter()

    def one_trial(rec: Recommendation) -> float | None:
        left_s = None if budget_s is None else budget_s - (time.perf_counter() - start)
        if left_s is not None and left_s <= 0:
            return None
        sources[rec.config.key] = rec.source
        study.enqueue_trial(rec.config.optuna_params())
        done = len(trials)
        study.optimize(objective, n_trials=1, timeout=left_s, gc_after_trial=False)
        return trials[-1].score if len(trials) > done else None

    budget = warm.n if n_trials is None else min(warm.n, n_trials)
    # Scores go back keyed by the proposal, whatever configuration Optuna hands the objective.
    for _ in evaluate_in_order(warm.recommender, warm.metafeatures, one_trial, budget):
        pass


def _trusted_type(name: str) -> bool:
    return name.startswith(("sklearn.", "numpy.", "metaml.", "builtins.", "scipy.")) or name in {
        "collections.OrderedDict",
    }


def save_model(pipeline: Any, path: str | Path) -> None:
    """Write a fitted pipeline with skops (no pickle), atomically.

    Example:
        >>> import tempfile, pathlib
        >>> from sklearn.linear_model import LogisticRegression
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.skops"
        >>> save_model(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), p)
        >>> load_model(p).predict([[0.9]]).tolist()
        [1]
    """
    from metaml.data.tabular import require
    from metaml.io import atomic_write

    sio = require("skops.io", "saving a model")

    def write(tmp: str) -> None:
        sio.dump(pipeline, tmp)

    atomic_write(path, write)


def load_model(path: str | Path) -> Any:
    """Read a model written by :func:`save_model`; types outside scikit-learn, numpy, scipy
    and metaml are refused with a :class:`UserError`, never loaded."""
    from metaml.data.tabular import require

    sio = require("skops.io", "loading a model")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no model file at {path}")
    untrusted = sio.get_untrusted_types(file=path)
    refused = [t for t in untrusted if not _trusted_type(t)]
    if refused:
        raise UserError(f"{path} holds types metaml does not trust: {', '.join(refused)}")
    return sio.load(path, trusted=untrusted)


def write_report(result: SearchResult, out: str | Path) -> None:
    """Write ``report.json`` and ``report.md`` into the folder ``out``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_report(SearchResult([], None, {"data": "x"}), d)
        >>> sorted(p.name for p in d.iterdir())
        ['report.json', 'report.md']
    """
    from metaml.io import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(result.report(), indent=2) + "\n")
    atomic_write_text(out / "report.md", result.markdown())
