"""The ``metaml`` command line.

Every user mistake raises :class:`metaml.UserError`; :func:`main` prints it in one or two
lines and exits with status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from metaml import __version__
from metaml.automl.cli import automl_app
from metaml.errors import UserError
from metaml.kb.cli import kb_app

app = typer.Typer(
    name="metaml",
    help="Meta-learning: train on many tasks, learn a new one from a few examples.\n\n"
    "Example: metaml train configs/maml-sinusoid.yaml --set train.steps=2000",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(
    help="List the known datasets or describe one.\n\nExample: metaml datasets show omniglot-small"
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(automl_app, name="automl")
app.add_typer(kb_app, name="kb")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.steps=500 (repeatable)."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOption = Annotated[
    str | None, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metaml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Meta-learning: train on many tasks, learn a new one from a few examples."""


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run config, e.g. configs/maml-sinusoid.yaml.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where to write the run (default runs/<name>).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    set_: SetOption = None,
    device: DeviceOption = None,
    quiet: QuietOption = False,
) -> None:
    """Meta-train a learner from a config into a run directory.

    Examples:

      metaml train configs/maml-sinusoid.yaml --set train.steps=2000

      metaml train --resume runs/maml-sinusoid --set train.steps=4000
    """
    from metaml import runs
    from metaml.config import load_config

    overrides = list(set_ or []) + ([f"device={device}"] if device else [])
    if resume is not None:
        if config is not None:
            raise UserError("give either a CONFIG or --resume DIR, not both")
        runs.resume(resume, overrides, quiet=quiet)
        return
    if config is None:
        raise UserError(
            "no config given; use metaml train configs/maml-sinusoid.yaml (see configs/)"
        )
    runs.train(load_config(config, overrides), run_dir, quiet=quiet)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by metaml train.")],
    dataset: Annotated[
        str | None, typer.Option(help="Evaluate on another dataset (name or spec).")
    ] = None,
    root: Annotated[str | None, typer.Option(help="Folder holding the dataset's files.")] = None,
    ways: Annotated[int | None, typer.Option(help="Classes per episode.")] = None,
    shots: Annotated[int | None, typer.Option(help="Support examples per class.")] = None,
    queries: Annotated[int | None, typer.Option(help="Query examples per class.")] = None,
    episodes: Annotated[
        int | None, typer.Option(help="Test episodes (default: the config's, 600).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Test-time adaptation steps.")] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    classifier: Annotated[
        str | None,
        typer.Option(
            help="Evaluate the run's backbone as features with a centroid or logreg classifier."
        ),
    ] = None,
    task_threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Episodes adapted at once, one per thread (gradient-based learners; "
            "default: the run's algorithm.task_threads). Same scores; on a CPU, one per core.",
        ),
    ] = None,
    device: DeviceOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a trained run on fixed, seeded test episodes, with a 95% confidence interval.

    The result is also saved under RUN_DIR/eval/ for metaml report.

    Example: metaml eval runs/maml-sinusoid --steps 10 --episodes 600 --task-threads 2
    """
    from metaml import runs
    from metaml.algorithms.features import FeatureClassifier, feature_extractor
    from metaml.evaluate import evaluate
    from metaml.report import resolve_test_steps, save_eval

    overrides = [
        f"data.{k}={v}"
        for k, v in dict(dataset=dataset, root=root, queries=queries).items()
        if v is not None
    ]
    cfg = runs.read_config(run_dir, overrides + ([f"device={device}"] if device else []))
    learner = runs.load_learner(run_dir, checkpoint=checkpoint, device=cfg.device)
    if classifier is not None:
        learner = FeatureClassifier(feature_extractor(learner), classifier)  # type: ignore[arg-type]
    test = runs.build_samplers(cfg, eval_ways=ways, eval_shots=shots).test
    test_steps = steps if steps is not None else resolve_test_steps(cfg)
    if task_threads is not None and cfg.threads is None:
        runs.share_cores(task_threads)
    result = evaluate(
        learner, test, episodes or cfg.eval.episodes, steps=test_steps, progress=not quiet,
        task_threads=task_threads,
    )  # fmt: skip
    dataset_name = cfg.data.dataset + (f"+{classifier}" if classifier else "")
    save_eval(
        run_dir,
        result,
        dataset=dataset_name,
        ways=test.ways if test.task_type == "classification" else 1,
        shots=test.shots,
        queries=test.queries,
        steps=test_steps,
        checkpoint=checkpoint,
    )
    if json_:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"{run_dir}: {result.summary()}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for report.html/.md (default: the run, or runs' parent/report)."),
    ] = None,
    episodes: Annotated[
        int, typer.Option(help="Test episodes for evaluations the report must compute.")
    ] = 600,
    shots: Annotated[
        str, typer.Option(help="Shot counts for the accuracy-against-shots plot, e.g. 1,5.")
    ] = "1,5",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: QuietOption = False,
) -> None:
    """Write report.html and report.md: config, training curves, evaluations with CIs, samples.

    Example: metaml report runs/protonet-omniglot runs/maml-omniglot --out runs/compare
    """
    from metaml.report import write_report

    try:
        shot_counts = tuple(int(k) for k in shots.split(","))
    except ValueError:
        raise UserError(f"--shots {shots!r} must be comma-separated integers, e.g. 1,5") from None
    html, md = write_report(
        run_dirs,
        out,
        episodes=episodes,
        shots=shot_counts,
        device=device,
        progress=not quiet,
        checkpoint=checkpoint,
    )
    typer.echo(f"wrote {html} and {md}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory trained on images.")],
    support: Annotated[
        Path, typer.Option(help="Folder with one subfolder of 1 to K images per class.")
    ],
    query: Annotated[Path, typer.Option(help="Folder of images to label.")],
    out: Annotated[
        Path | None, typer.Option(help="Write a CSV (file,label,probability) instead of printing.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Adaptation steps (default: the run's).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Learn your classes from a few images each, then label new images.

    Example: metaml predict runs/protonet-omniglot --support my_support --query my_queries --out preds.csv
    """
    from metaml.predict import predict_folder, write_predictions

    predictions = predict_folder(
        run_dir, support, query, steps=steps, checkpoint=checkpoint, device=device
    )
    if out is not None:
        write_predictions(predictions, out)
        typer.echo(f"wrote {len(predictions)} predictions to {out}")
        return
    typer.echo("file,label,probability")
    for p in predictions:
        typer.echo(f"{p.file},{p.label},{p.probability:.4f}")


@app.command()
def features(
    run_dir: Annotated[Path, typer.Argument(help="A run directory trained on images.")],
    images: Annotated[Path, typer.Option(help="Folder of images to embed.")],
    out: Annotated[Path, typer.Option(help="Output file: .npy, .csv or .parquet.")],
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: QuietOption = False,
) -> None:
    """Embed images with a run's meta-learned backbone (a feature extractor).

    Example: metaml features runs/protonet-omniglot --images my_images --out features.npy
    """
    from metaml.predict import export_features

    matrix = export_features(
        run_dir, images, out, checkpoint=checkpoint, device=device, progress=not quiet
    )
    typer.echo(f"wrote {matrix.shape[0]} x {matrix.shape[1]} features to {out}")


@datasets_app.callback(invoke_without_command=True)
def datasets_list(ctx: typer.Context) -> None:
    """List the known datasets and the specs accepted wherever a dataset name is."""
    if ctx.invoked_subcommand is not None:
        return
    from metaml.data import list_datasets

    for entry in list_datasets():
        typer.echo(f"{entry['name']:<18} {entry['kind']:<14} {entry['description']}")
    typer.echo("\nSpecs: folder:PATH  zip:PATH  idx:IMAGES[,LABELS]  npz:PATH")


@datasets_app.command("show")
def datasets_show(
    name: Annotated[
        str, typer.Argument(help="A dataset name or spec, e.g. omniglot-small or folder:my_images.")
    ],
    root: Annotated[str | None, typer.Option(help="Folder holding the dataset's files.")] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print JSON with classes, groups, examples, shape.")
    ] = False,
) -> None:
    """Describe a dataset: classes, groups, examples per class and image shape.

    Example: metaml datasets show omniglot-small1 --root ../shared/data/omniglot --json
    """
    from metaml.data import ClassDataset, load

    source = load(name, root=root)
    info: dict[str, Any]
    if isinstance(source, ClassDataset):
        info = source.describe()
    else:
        info = {
            "kind": "task family",
            "task_type": source.task_type,
            "input_shape": list(source.input_shape),
        }
    if json_:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        typer.echo(f"{key:<12} {value}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo's runs and report.")] = Path(
        "runs/demo"
    ),
    steps: Annotated[
        int | None,
        typer.Option(help="ProtoNet meta-training steps (MAML gets a sixth); default 600."),
    ] = None,
    episodes: Annotated[int, typer.Option(help="Test episodes for each figure.")] = 600,
    omniglot: Annotated[
        Path | None,
        typer.Option(help="Folder of the Omniglot zips: also evaluate on real handwriting."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: QuietOption = False,
) -> None:
    """Meta-train ProtoNet and MAML on the bundled glyph corpus, evaluate with 95% CIs, write a report.

    Example: metaml demo --omniglot ../shared/data/omniglot
    """
    from metaml.demo import run_demo

    run_demo(out, steps=steps, episodes=episodes, device=device, quiet=quiet, omniglot=omniglot)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``metaml`` console script: user errors exit with status 2.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        metaml 0.1.0
    """
    try:
        app(args=argv, prog_name="metaml", standalone_mode=True)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
