"""``MetaLearnedClassifier``: a scikit-learn classifier that picks its own algorithm and
hyperparameters from the meta-knowledge.

``fit`` computes the training data's meta-features, asks a recommender for the
``n_evaluations`` most promising configurations, cross-validates them (when there is more than
one, and enough rows) and refits the best on all rows. It passes scikit-learn's estimator
checks (``parametrize_with_checks``).

Example:
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MetaLearnedClassifier(n_evaluations=2, cv=3).fit(X, y)
    >>> clf.score(X, y) > 0.9, clf.best_config_.algorithm in clf.evaluated_
    (True, True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from metaml.automl.knowledge import MetaKnowledge


def _pipeline_has(method: str) -> Any:
    def check(self: MetaLearnedClassifier) -> bool:
        check_is_fitted(self)
        return hasattr(self.pipeline_, method)

    return check


class MetaLearnedClassifier(ClassifierMixin, BaseEstimator):
    """A classifier whose configuration is recommended from similar datasets.

    Parameters:
        knowledge: a :class:`MetaKnowledge`, a path to a meta-knowledge file, or None for
            the shipped one.
        method: ``"nearest"``, ``"meta-model"``, ``"static"``, ``"local"`` or ``"active"``
            (adaptive: each configuration chosen after the scores of those before).
        n_evaluations: recommended configurations to cross-validate (1: take the first).
        cv: folds of that cross-validation.
        random_state: seed of the folds and of the chosen estimator.

    Attributes (after ``fit``): ``classes_``, ``n_features_in_``, ``best_config_``,
    ``evaluated_`` (``{algorithm: score}``), ``pipeline_``.

    Example:
        >>> MetaLearnedClassifier(method="static").get_params()["method"]
        'static'
    """

    def __init__(
        self,
        knowledge: MetaKnowledge | str | Path | None = None,
        method: str = "nearest",
        n_evaluations: int = 5,
        cv: int = 3,
        random_state: int | None = 0,
    ) -> None:
        self.knowledge = knowledge
        self.method = method
        self.n_evaluations = n_evaluations
        self.cv = cv
        self.random_state = random_state

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # the pipelines impute
        return tags

    def fit(self, X: Any, y: Any) -> MetaLearnedClassifier:
        """Recommend, cross-validate the recommendations, refit the best on all rows."""
        from threadpoolctl import threadpool_limits

        from metaml.automl.knowledge import cross_validate
        from metaml.automl.portfolio import make_pipeline
        from metaml.automl.recommend import Recommendation, evaluate_in_order
        from metaml.automl.search import dataset_metafeatures, fitted_recommender
        from metaml.data.tabular import TabularTask

        if not isinstance(self.n_evaluations, int) or self.n_evaluations < 1:
            raise ValueError(f"n_evaluations must be a positive int, got {self.n_evaluations!r}")
        if not isinstance(self.cv, int) or self.cv < 2:
            raise ValueError(f"cv must be an int >= 2, got {self.cv!r}")
        X, y = validate_data(self, X, y, ensure_all_finite="allow-nan", dtype="numeric")
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        frame = self._frame(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        with threadpool_limits(1):
            recommender = fitted_recommender(self.knowledge, self.method)
            mf = dataset_metafeatures(X, y, recommender.kb_, seed)
            smallest = int(np.unique(y, return_counts=True)[1].min())
            self.evaluated_: dict[str, float] = {}
            if self.n_evaluations > 1 and smallest >= 2 and len(self.classes_) > 1:
                task = TabularTask(frame, y, "fit", "y")

                def cv_score(rec: Recommendation) -> float:
                    try:
                        return cross_validate(rec.config, task, folds=self.cv, seed=seed)[0]
                    except ValueError:
                        return -np.inf  # cannot fit these rows; the others can

                steps = list(evaluate_in_order(recommender, mf, cv_score, self.n_evaluations))
                for rec, score in steps:
                    self.evaluated_[rec.config.algorithm] = max(
                        score, self.evaluated_.get(rec.config.algorithm, -np.inf)
                    )
                best = max(steps, key=lambda step: step[1])[0].config
            else:
                best = recommender.rank(mf, 1)[0].config
                self.evaluated_[best.algorithm] = float("nan")
            self.best_config_ = best
            self.pipeline_ = make_pipeline(best, frame, random_state=seed).fit(frame, y)
        return self

    def _frame(self, X: np.ndarray) -> Any:
        from metaml.data.tabular import require

        pd = require("pandas", "MetaLearnedClassifier")
        return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])

    def _checked(self, X: Any) -> Any:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, ensure_all_finite="allow-nan", dtype="numeric")
        return self._frame(X)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels.

        Example:
            >>> import numpy as np
            >>> X = np.r_[np.zeros((10, 2)), np.ones((10, 2))]
            >>> clf = MetaLearnedClassifier(n_evaluations=3, cv=2).fit(X, [0] * 10 + [1] * 10)
            >>> clf.predict([[1.0, 1.0]]).tolist()
            [1]
        """
        frame = self._checked(X)
        return np.asarray(self.pipeline_.predict(frame))

    @available_if(_pipeline_has("predict_proba"))
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (when the chosen classifier has them)."""
        frame = self._checked(X)
        return np.asarray(self.pipeline_.predict_proba(frame))

    @available_if(_pipeline_has("decision_function"))
    def decision_function(self, X: Any) -> np.ndarray:
        """Decision function (when the chosen classifier has one)."""
        frame = self._checked(X)
        return np.asarray(self.pipeline_.decision_function(frame))
