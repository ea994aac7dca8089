"""The portfolio: eight scikit-learn classifiers, each with a hyperparameter space.

A :class:`Configuration` is an algorithm name and its hyperparameters; :func:`make_pipeline`
turns it into a scikit-learn ``Pipeline`` (the preprocessing of
:func:`metaml.data.tabular.make_preprocessor`, then the classifier). Spaces are Optuna
distributions (:func:`search_space`), so Optuna samples them and stores them; in one study the
algorithm is a categorical choice and each algorithm's parameters are named
``"<algorithm>:<param>"`` (a conditional space, see :func:`suggest_configuration`). Every default configuration lies
inside its space, so it can be enqueued in a study: the SVM's ``gamma_scale`` multiplies
scikit-learn's ``gamma="scale"``, the forests' ``max_features`` is a choice that includes
``"sqrt"``.

=================  ===============================================  ==========================
name               estimator                                        searched
=================  ===============================================  ==========================
``logreg``         LogisticRegression                               C, class_weight
``linear_svm``     LinearSVC                                        C, class_weight
``rbf_svm``        SVC(kernel="rbf")                                C, gamma_scale, class_weight
``knn``            KNeighborsClassifier                             n_neighbors, weights, p
``random_forest``  RandomForestClassifier(100 trees)                max_features, min_samples_leaf, criterion, class_weight
``extra_trees``    ExtraTreesClassifier(100 trees)                  max_features, min_samples_leaf, criterion, class_weight
``hist_gb``        HistGradientBoostingClassifier                   learning_rate, max_leaf_nodes, min_samples_leaf, l2_regularization, class_weight
``mlp``            MLPClassifier (one hidden layer, early stopping)  hidden_units, alpha, learning_rate_init
=================  ===============================================  ==========================

Example:
    >>> cfg = default_configuration("random_forest")
    >>> cfg.algorithm, cfg.params["min_samples_leaf"]
    ('random_forest', 1)
    >>> sorted(search_space("knn"))
    ['n_neighbors', 'p', 'weights']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from metaml.errors import UserError, unknown_name_error

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from optuna.distributions import BaseDistribution
    from sklearn.pipeline import Pipeline

# One parameter: ("float"|"int", low, high, log) or ("cat", choices).
_Spec = tuple[Any, ...]


@dataclass(frozen=True)
class Algorithm:
    """A portfolio member: how to build it, its search space and its default parameters.

    Example:
        >>> ALGORITHMS["knn"].defaults["n_neighbors"]
        5
    """

    name: str
    description: str
    build: Callable[[dict[str, Any], int], Any]
    space: dict[str, _Spec]
    defaults: dict[str, Any] = field(default_factory=dict)


def _class_weight(value: str) -> str | None:
    return None if value == "none" else value


def _logreg(p: dict[str, Any], seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=p["C"], class_weight=_class_weight(p["class_weight"]), max_iter=1000, random_state=seed
    )


def _linear_svm(p: dict[str, Any], seed: int) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(
        C=p["C"], class_weight=_class_weight(p["class_weight"]), max_iter=5000, random_state=seed
    )


def _rbf_svm(p: dict[str, Any], seed: int) -> Any:
    return ScaledGammaSVC(
        C=p["C"],
        gamma_scale=p["gamma_scale"],
        class_weight=_class_weight(p["class_weight"]),
        random_state=seed,
    )


def _knn(p: dict[str, Any], seed: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=p["n_neighbors"], weights=p["weights"], p=p["p"])


def _forest(kind: str) -> Callable[[dict[str, Any], int], Any]:
    def build(p: dict[str, Any], seed: int) -> Any:
        from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

        cls = RandomForestClassifier if kind == "random_forest" else ExtraTreesClassifier
        return cls(
            n_estimators=100,
            max_features=p["max_features"],
            min_samples_leaf=p["min_samples_leaf"],
            criterion=p["criterion"],
            class_weight=_class_weight(p["class_weight"]),
            n_jobs=1,
            random_state=seed,
        )

    return build


def _hist_gb(p: dict[str, Any], seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        learning_rate=p["learning_rate"],
        max_leaf_nodes=p["max_leaf_nodes"],
        min_samples_leaf=p["min_samples_leaf"],
        l2_regularization=p["l2_regularization"],
        class_weight=_class_weight(p["class_weight"]),
        random_state=seed,
    )


def _mlp(p: dict[str, Any], seed: int) -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=(p["hidden_units"],),
        alpha=p["alpha"],
        learning_rate_init=p["learning_rate_init"],
        max_iter=200,
        early_stopping=True,
        random_state=seed,
    )


_CW = ("cat", ("none", "balanced"))
_FOREST_SPACE: dict[str, _Spec] = {
    "max_features": ("cat", ("sqrt", "log2", 0.1, 0.25, 0.5, 0.75, 1.0)),
    "min_samples_leaf": ("int", 1, 20, True),
    "criterion": ("cat", ("gini", "entropy")),
    "class_weight": _CW,
}
_FOREST_DEFAULTS = {
    "max_features": "sqrt",
    "min_samples_leaf": 1,
    "criterion": "gini",
    "class_weight": "none",
}

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm(
            "logreg",
            "logistic regression (L2)",
            _logreg,
            {"C": ("float", 1e-4, 1e4, True), "class_weight": _CW},
            {"C": 1.0, "class_weight": "none"},
        ),
        Algorithm(
            "linear_svm",
            "linear support vector machine",
            _linear_svm,
            {"C": ("float", 1e-4, 1e2, True), "class_weight": _CW},
            {"C": 1.0, "class_weight": "none"},
        ),
        Algorithm(
            "rbf_svm",
            "support vector machine, RBF kernel",
            _rbf_svm,
            {
                "C": ("float", 1e-3, 1e3, True),
                "gamma_scale": ("float", 1e-3, 1e2, True),
                "class_weight": _CW,
            },
            {"C": 1.0, "gamma_scale": 1.0, "class_weight": "none"},
        ),
        Algorithm(
            "knn",
            "k nearest neighbours",
            _knn,
            {
                "n_neighbors": ("int", 1, 50, True),
                "weights": ("cat", ("uniform", "distance")),
                "p": ("cat", (1, 2)),
            },
            {"n_neighbors": 5, "weights": "uniform", "p": 2},
        ),
        Algorithm(
            "random_forest",
            "random forest, 100 trees",
            _forest("random_forest"),
            _FOREST_SPACE,
            _FOREST_DEFAULTS,
        ),
        Algorithm(
            "extra_trees",
            "extremely randomised trees, 100 trees",
            _forest("extra_trees"),
            _FOREST_SPACE,
            _FOREST_DEFAULTS,
        ),
        Algorithm(
            "hist_gb",
            "histogram gradient boosting",
            _hist_gb,
            {
                "learning_rate": ("float", 0.01, 1.0, True),
                "max_leaf_nodes": ("int", 3, 127, True),
                "min_samples_leaf": ("int", 1, 100, True),
                "l2_regularization": ("float", 1e-6, 10.0, True),
                "class_weight": _CW,
            },
            {
                "learning_rate": 0.1,
                "max_leaf_nodes": 31,
                "min_samples_leaf": 20,
                "l2_regularization": 1e-6,  # sklearn's 0 is outside the log scale
                "class_weight": "none",
            },
        ),
        Algorithm(
            "mlp",
            "multi-layer perceptron, one hidden layer, early stopping",
            _mlp,
            {
                "hidden_units": ("int", 16, 256, True),
                "alpha": ("float", 1e-6, 1e-1, True),
                "learning_rate_init": ("float", 1e-4, 1e-1, True),
            },
            {"hidden_units": 100, "alpha": 1e-4, "learning_rate_init": 1e-3},
        ),
    ]
}


def get_algorithm(name: str) -> Algorithm:
    """The portfolio member called ``name``; an unknown name suggests the closest.

    Example:
        >>> get_algorithm("mlp").description
        'multi-layer perceptron, one hidden layer, early stopping'
    """
    if name not in ALGORITHMS:
        raise unknown_name_error("algorithm", name, ALGORITHMS)
    return ALGORITHMS[name]


@dataclass(frozen=True)
class Configuration:
    """An algorithm of the portfolio and its hyperparameters (JSON-serialisable values).

    Example:
        >>> c = Configuration("knn", {"n_neighbors": 3, "weights": "distance", "p": 1})
        >>> Configuration.from_json(c.to_json()) == c
        True
        >>> c.key
        'knn{"n_neighbors":3,"p":1,"weights":"distance"}'
    """

    algorithm: str
    params: Mapping[str, Any]

    def __post_init__(self) -> None:
        algo = get_algorithm(self.algorithm)
        missing = sorted(set(algo.space) - set(self.params))
        unknown = sorted(set(self.params) - set(algo.space))
        if missing or unknown:
            raise UserError(
                f"configuration of {self.algorithm!r}: missing {missing}, unknown {unknown}; "
                f"expected {sorted(algo.space)}"
            )

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Configuration) and self.key == other.key

    @property
    def key(self) -> str:
        """A canonical string: the algorithm and its sorted parameters as compact JSON."""
        return self.algorithm + json.dumps(dict(self.params), sort_keys=True, separators=(",", ":"))

    def to_json(self) -> dict[str, Any]:
        """``{"algorithm": ..., "params": {...}}``."""
        return {"algorithm": self.algorithm, "params": dict(self.params)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Configuration:
        """The inverse of :meth:`to_json`."""
        return cls(str(obj["algorithm"]), dict(obj["params"]))

    def optuna_params(self) -> dict[str, Any]:
        """The flat ``{"algorithm": ..., "<algorithm>:<param>": ...}`` of a conditional study.

        A value outside the space raises a :class:`UserError`.
        """
        out: dict[str, Any] = {"algorithm": self.algorithm}
        space = get_algorithm(self.algorithm).space
        for name, value in self.params.items():
            if not _in_space(space[name], value):
                raise UserError(f"{self.key}: {name}={value!r} is outside the search space")
            out[f"{self.algorithm}:{name}"] = value
        return out

    @classmethod
    def from_optuna_params(cls, params: Mapping[str, Any]) -> Configuration:
        """The inverse of :meth:`optuna_params`."""
        algorithm = str(params["algorithm"])
        prefix = f"{algorithm}:"
        return cls(
            algorithm,
            {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)},
        )


def default_configuration(name: str) -> Configuration:
    """The algorithm with scikit-learn's default hyperparameters (fixed ones aside).

    Example:
        >>> default_configuration("hist_gb").params["learning_rate"]
        0.1
    """
    return Configuration(name, dict(get_algorithm(name).defaults))


def search_space(name: str) -> dict[str, BaseDistribution]:
    """The Optuna distributions of ``name``'s hyperparameters.

    Example:
        >>> search_space("logreg")["C"]
        FloatDistribution(high=10000.0, log=True, low=0.0001, step=None)
    """
    from metaml.data.tabular import require

    dist = require("optuna.distributions", "the AutoML search space")
    out: dict[str, BaseDistribution] = {}
    for param, spec in get_algorithm(name).space.items():
        if spec[0] == "float":
            out[param] = dist.FloatDistribution(spec[1], spec[2], log=spec[3])
        elif spec[0] == "int":
            out[param] = dist.IntDistribution(spec[1], spec[2], log=spec[3])
        else:
            out[param] = dist.CategoricalDistribution(spec[1])
    return out


def suggest_configuration(
    trial: optuna.Trial, algorithms: list[str] | None = None
) -> Configuration:
    """Ask an Optuna trial for a configuration of the conditional portfolio space.

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        >>> suggest_configuration(study.ask(), ["knn"]).algorithm
        'knn'
    """
    names = algorithms or list(ALGORITHMS)
    algorithm = str(trial.suggest_categorical("algorithm", names))
    params: dict[str, Any] = {}
    for param, spec in get_algorithm(algorithm).space.items():
        name = f"{algorithm}:{param}"
        if spec[0] == "float":
            params[param] = trial.suggest_float(name, spec[1], spec[2], log=spec[3])
        elif spec[0] == "int":
            params[param] = trial.suggest_int(name, spec[1], spec[2], log=spec[3])
        else:
            params[param] = trial.suggest_categorical(name, spec[1])
    return Configuration(algorithm, params)


def _in_space(spec: _Spec, value: Any) -> bool:
    if spec[0] == "cat":
        return any(value == c and type(value) is type(c) for c in spec[1])
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if spec[0] == "int" and not float(value).is_integer():
        return False
    return bool(spec[1] <= value <= spec[2])


def sample_configurations(
    n: int, seed: int = 0, algorithms: list[str] | None = None
) -> list[Configuration]:
    """``n`` configurations drawn at random from the portfolio space (algorithms in turn),
    reproducibly from ``seed``; the candidate set the meta-knowledge evaluates.

    Example:
        >>> [c.algorithm for c in sample_configurations(3, seed=1)]
        ['logreg', 'linear_svm', 'rbf_svm']
    """
    names = algorithms or list(ALGORITHMS)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        algo = get_algorithm(names[i % len(names)])
        params: dict[str, Any] = {}
        for param, spec in algo.space.items():
            if spec[0] == "cat":
                params[param] = spec[1][int(rng.integers(len(spec[1])))]
                continue
            lo, hi, log = spec[1], spec[2], spec[3]
            if log:
                u = float(
                    np.exp(rng.uniform(np.log(lo), np.log(hi + (1 if spec[0] == "int" else 0))))
                )
            else:
                u = float(rng.uniform(lo, hi + (1 if spec[0] == "int" else 0)))
            params[param] = min(int(u), hi) if spec[0] == "int" else float(f"{u:.4g}")
        out.append(Configuration(algo.name, params))
    return out


def make_estimator(config: Configuration, random_state: int = 0) -> Any:
    """The bare classifier of ``config`` (no preprocessing).

    Example:
        >>> make_estimator(default_configuration("knn"))
        KNeighborsClassifier()
    """
    return get_algorithm(config.algorithm).build(dict(config.params), random_state)


def make_pipeline(config: Configuration, X: pd.DataFrame, random_state: int = 0) -> Pipeline:
    """Preprocessing for ``X``'s columns (impute, one-hot, scale) followed by ``config``'s
    classifier, as one scikit-learn Pipeline.

    Example:
        >>> import pandas as pd
        >>> X = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "c": ["u", "v", "u", "v"]})
        >>> pipe = make_pipeline(default_configuration("logreg"), X).fit(X, [0, 1, 0, 1])
        >>> pipe.predict(X).tolist()
        [0, 1, 0, 1]
    """
    from sklearn.pipeline import Pipeline

    from metaml.data.tabular import make_preprocessor

    return Pipeline(
        [
            ("preprocess", make_preprocessor(X)),
            ("classifier", make_estimator(config, random_state)),
        ]
    )


class ScaledGammaSVC(ClassifierMixin, BaseEstimator):
    """``SVC(kernel="rbf")`` with ``gamma = gamma_scale / (n_features * X.var())``: scikit-learn's
    ``gamma="scale"`` times a factor, so the default (1.0) and the search share one scale.

    Example:
        >>> X = np.array([[0.0], [0.1], [1.0], [1.1]])
        >>> ScaledGammaSVC().fit(X, [0, 0, 1, 1]).predict([[0.05], [1.05]]).tolist()
        [0, 1]
    """

    def __init__(
        self,
        C: float = 1.0,
        gamma_scale: float = 1.0,
        class_weight: str | None = None,
        random_state: int | None = None,
    ) -> None:
        self.C = C
        self.gamma_scale = gamma_scale
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> ScaledGammaSVC:
        """Fit the SVC with the scaled gamma."""
        from sklearn.svm import SVC

        X, y = validate_data(self, X, y)
        var = float(np.var(X))
        self.gamma_ = self.gamma_scale / (X.shape[1] * var) if var > 0 else self.gamma_scale
        self.svc_ = SVC(
            C=self.C,
            gamma=self.gamma_,
            class_weight=self.class_weight,
            random_state=self.random_state,
        ).fit(X, y)
        self.classes_ = self.svc_.classes_
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The SVC's decision function."""
        check_is_fitted(self)
        return np.asarray(self.svc_.decision_function(validate_data(self, X, reset=False)))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels."""
        check_is_fitted(self)
        return np.asarray(self.svc_.predict(validate_data(self, X, reset=False)))
