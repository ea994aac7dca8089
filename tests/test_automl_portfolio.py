"""The portfolio: every configuration builds a pipeline that fits; spaces are Optuna's."""

from __future__ import annotations

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
optuna = pytest.importorskip("optuna")

from collections.abc import Iterator  # noqa: E402

from sklearn.svm import SVC  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from metaml.automl.portfolio import (  # noqa: E402
    ALGORITHMS,
    Configuration,
    ScaledGammaSVC,
    default_configuration,
    make_pipeline,
    sample_configurations,
    suggest_configuration,
)
from metaml.errors import UserError  # noqa: E402


@pytest.fixture(autouse=True)
def _one_openmp_thread() -> Iterator[None]:
    # HistGradientBoosting's OpenMP threads fight over a busy machine (12 s instead of 0.2 s).
    with threadpool_limits(1):
        yield


def _mixed_frame(n: int = 60) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], n // 3)
    X = pd.DataFrame(
        {
            "x1": rng.normal(size=n) + (y == "b"),
            "x2": rng.normal(size=n),
            "cat": rng.choice(["u", "v", None], size=n),
        }
    )
    X.loc[[3, 7], "x2"] = np.nan
    return X, y


def test_portfolio_has_the_eight_algorithms() -> None:
    assert sorted(ALGORITHMS) == sorted(
        [
            "logreg",
            "linear_svm",
            "rbf_svm",
            "knn",
            "random_forest",
            "extra_trees",
            "hist_gb",
            "mlp",
        ]
    )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_default_configuration_fits_mixed_data_with_missing_values(name: str) -> None:
    X, y = _mixed_frame()
    cfg = default_configuration(name)
    # Every default lies in its space, so it can be enqueued in an Optuna study.
    assert Configuration.from_optuna_params(cfg.optuna_params()) == cfg
    pipe = make_pipeline(cfg, X).fit(X, y)
    assert set(pipe.predict(X)) <= {"a", "b", "c"}


def test_sampled_configurations_are_in_space_and_round_trip() -> None:
    configs = sample_configurations(40, seed=3)
    assert len(set(configs)) == 40
    assert [c.algorithm for c in configs[:8]] == list(ALGORITHMS)
    for cfg in configs:
        cfg.optuna_params()  # raises if outside the space
        assert Configuration.from_json(cfg.to_json()) == cfg
    assert sample_configurations(40, seed=3) == configs
    assert sample_configurations(40, seed=4) != configs


def test_enqueued_configuration_comes_back_from_the_study() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    wanted = sample_configurations(5, seed=0)[4]
    study.enqueue_trial(wanted.optuna_params())
    assert suggest_configuration(study.ask()) == wanted
    # Then the sampler explores the conditional space.
    seen = {suggest_configuration(study.ask()).algorithm for _ in range(40)}
    assert len(seen) >= 6


def test_scaled_gamma_svc_with_factor_one_is_sklearn_scale() -> None:
    X, y = _mixed_frame()
    Xn = X[["x1"]].to_numpy()
    ours = ScaledGammaSVC(C=2.0, gamma_scale=1.0).fit(Xn, y)
    ref = SVC(C=2.0, gamma="scale").fit(Xn, y)
    np.testing.assert_allclose(ours.decision_function(Xn), ref.decision_function(Xn), atol=1e-8)
    assert ours.gamma_ == pytest.approx(1.0 / Xn.var())


def test_configuration_errors_name_the_fix() -> None:
    with pytest.raises(UserError, match="did you mean 'knn'"):
        default_configuration("knnn")
    with pytest.raises(UserError, match="missing"):
        Configuration("knn", {"n_neighbors": 3})
    with pytest.raises(UserError, match="outside the search space"):
        Configuration("knn", {"n_neighbors": 500, "weights": "uniform", "p": 2}).optuna_params()
