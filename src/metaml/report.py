"""Run reports: ``report.html`` (self-contained) and ``report.md`` for one run or several.

A report shows what a reader needs to trust a run: its config, its training curves, its test
evaluations with 95% confidence intervals, how the metric grows with the number of shots, a few
test episodes with the adapted learner's predictions, and, for several runs, paired comparisons
on the episodes they share.

Evaluations are kept in ``RUN_DIR/eval/<dataset>-<ways>way-<shots>shot-<steps>steps.json``
(:func:`save_eval`, :func:`load_evals`), so ``metaml eval`` and the report reuse each other's work.

Example:
    >>> # html, md = write_report([Path("runs/maml-sinusoid")])
    >>> # html, md = write_report([Path("runs/maml"), Path("runs/protonet")], Path("runs/cmp"))
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from metaml.config import RunConfig
from metaml.device import resolve_device
from metaml.errors import UserError
from metaml.io import atomic_write, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from metaml.algorithms.base import MetaLearner
    from metaml.evaluate import Result
    from metaml.tasks import Task

EVAL_DIR = "eval"
METRICS_FILE = "metrics.jsonl"
HTML_FILE = "report.html"
MD_FILE = "report.md"
BY_INSTANCE_PNG = "by-instance.png"  # written into a MANN run by benchmarks.mann_instances
# Keys that identify the test episodes of a saved evaluation: two runs' evaluations with equal
# keys saw the same episodes, so they can be compared pair by pair.
EVAL_KEY = ("dataset", "ways", "shots", "queries", "seed", "episodes")
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
_MAX_SHOWN_WAYS = 10
_MAX_SHOWN_SHOTS = 5
_MAX_SHOWN_QUERIES = 4


# --------------------------------------------------------------------------- saved evaluations


def eval_filename(dataset: str, ways: int, shots: int, steps: int | None) -> str:
    """The file name of a saved evaluation, e.g. ``omniglot-5way-1shot-10steps.json``.

    ``steps=None`` (the learner's own default) is written as ``default``.

    Example:
        >>> eval_filename("sinusoid", 1, 5, 10)
        'sinusoid-1way-5shot-10steps.json'
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
    return f"{safe}-{ways}way-{shots}shot-{'default' if steps is None else steps}steps.json"


def save_eval(
    run_dir: str | Path,
    result: Result,
    *,
    dataset: str,
    ways: int,
    shots: int,
    queries: int,
    steps: int | None,
    checkpoint: str,
) -> Path:
    """Save ``result`` as ``RUN_DIR/eval/<dataset>-<ways>way-<shots>shot-<steps>steps.json``.

    The JSON holds the result's fields (``mean``, ``ci95``, ``scores``, ``metric``, ``seed``,
    ``info``), ``episodes``, and the keyword arguments. Written atomically; an evaluation with the
    same name is replaced.

    Example:
        >>> import tempfile
        >>> from metaml.evaluate import Result
        >>> r = Result.from_scores([0.5, 0.7], "accuracy", seed=0)
        >>> p = save_eval(tempfile.mkdtemp(), r, dataset="omniglot", ways=5, shots=1,
        ...               queries=15, steps=10, checkpoint="best")
        >>> p.name
        'omniglot-5way-1shot-10steps.json'
    """
    record = {
        **result.to_dict(),
        "episodes": len(result.scores),
        "dataset": dataset,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "steps": steps,
        "checkpoint": checkpoint,
    }
    path = Path(run_dir) / EVAL_DIR / eval_filename(dataset, ways, shots, steps)
    atomic_write_json(path, record)
    return path


def load_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations saved in ``RUN_DIR/eval/``, sorted by dataset, ways, steps and shots.

    Unreadable files are skipped with a warning (a report should not die on one bad file).

    Example:
        >>> import tempfile
        >>> load_evals(tempfile.mkdtemp())
        []
    """
    records = []
    for path in sorted((Path(run_dir) / EVAL_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            _check_eval(record)
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"skipping unreadable evaluation {path}: {exc}", stacklevel=2)
            continue
        record.setdefault("episodes", len(record["scores"]))
        records.append(record)
    return sorted(records, key=lambda r: (r["dataset"], r["ways"], str(r["steps"]), r["shots"]))


def _check_eval(record: Any) -> None:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key in ("mean", "ci95", "scores", "metric", "seed", "dataset", "ways", "shots", "steps"):
        if key not in record:
            raise KeyError(key)


def eval_result(record: dict[str, Any]) -> Result:
    """A saved evaluation (a :func:`load_evals` record) as a :class:`~metaml.evaluate.Result`.

    Example:
        >>> eval_result({"mean": 0.5, "ci95": 0.1, "scores": [0.4, 0.6], "metric": "accuracy",
        ...              "seed": 1}).episodes
        2
    """
    from metaml.evaluate import Result

    return Result(
        mean=float(record["mean"]),
        ci95=float(record["ci95"]),
        scores=[float(s) for s in record["scores"]],
        metric=str(record["metric"]),
        seed=int(record["seed"]),
        info=dict(record.get("info") or {}),
    )


def resolve_test_steps(cfg: RunConfig) -> int:
    """The number of test-time adaptation steps a run uses (0 for ProtoNet: no steps).

    ``eval.steps`` wins; then the algorithm's ``test_inner_steps``, ``inner_steps`` or
    ``finetune_steps``. Use it as the ``steps`` of :func:`save_eval` so files are named alike.

    Example:
        >>> from metaml.config import load_config
        >>> resolve_test_steps(load_config(None, ["algorithm.name=reptile"]))
        5
    """
    if cfg.eval.steps is not None:
        return cfg.eval.steps
    for name in ("test_inner_steps", "inner_steps", "finetune_steps"):
        value = getattr(cfg.algorithm, name, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------- formatting


def format_score(mean: float, ci95: float, metric: str) -> str:
    """A result for people: accuracy as a percent with 2 decimals, MSE with 3, both ± 95% CI.

    Example:
        >>> format_score(0.97123, 0.0041, "accuracy"), format_score(0.12345, 0.0042, "mse")
        ('97.12% ± 0.41', '0.123 ± 0.004')
    """
    if metric == "accuracy":
        return f"{100 * mean:.2f}% ± {100 * ci95:.2f}"
    return f"{mean:.3f} ± {ci95:.3f}"


def format_diff(mean: float, ci95: float, metric: str) -> str:
    """A paired difference: accuracy in percentage points, MSE with 3 decimals.

    Example:
        >>> format_diff(0.012, 0.008, "accuracy"), format_diff(-0.0123, 0.004, "mse")
        ('+1.20 pp ± 0.80', '-0.012 ± 0.004')
    """
    if metric == "accuracy":
        return f"{100 * mean:+.2f} pp ± {100 * ci95:.2f}"
    return f"{mean:+.3f} ± {ci95:.3f}"


# --------------------------------------------------------------------------- the report model


@dataclass
class _Plot:
    """One plot of the report: its PNG bytes, file name beside report.md, title and caption."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class _Run:
    label: str
    run_dir: Path
    cfg: RunConfig
    config_text: str
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    samples: list[_Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Report:
    title: str
    runs: list[_Run]
    figures: list[_Plot]
    comparisons: list[dict[str, Any]]


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    episodes: int = 600,
    sample_episodes: int = 3,
    shots: Sequence[int] = (1, 5),
    device: str = "auto",
    progress: bool = True,
    checkpoint: str = "best",
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for one run or several; return their paths.

    One run's report goes into its directory, several runs' into ``out_dir`` (default: the
    first run's parent ``/ "report"``). Missing test evaluations at each of ``shots`` are
    computed on ``episodes`` fixed test episodes and saved with :func:`save_eval`; a run without
    a checkpoint (or whose data cannot be loaded) is reported from its saved files alone.

    Example:
        >>> # html, md = write_report(["runs/maml-sinusoid"], episodes=200, shots=(1, 5, 10))
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("no run directory given; pass one or more folders written by metaml train")
    out = _output_dir(dirs, out_dir)
    device = str(resolve_device(device))  # "auto" -> "cuda" or "cpu", for tensors' .to()
    runs = _read_runs(dirs)
    for run in runs:
        _add_evaluations(run, tuple(shots), episodes, sample_episodes, device, progress, checkpoint)
    report = _Report(
        title=", ".join(r.label for r in runs),
        runs=runs,
        figures=_summary_figures(runs),
        comparisons=_comparisons(runs),
    )
    return _write_outputs(report, out)


def _output_dir(dirs: list[Path], out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    return dirs[0] if len(dirs) == 1 else dirs[0].parent / "report"


def _read_runs(dirs: list[Path]) -> list[_Run]:
    from metaml.engine.logging import read_metrics
    from metaml.runs import CONFIG_FILE, read_config

    labels = _unique_labels(dirs)
    return [
        _Run(
            label=label,
            run_dir=d,
            cfg=read_config(d),
            config_text=(d / CONFIG_FILE).read_text(encoding="utf-8"),
            metrics=read_metrics(d / METRICS_FILE),
            evals=load_evals(d),
        )
        for label, d in zip(labels, dirs, strict=True)
    ]


def _unique_labels(dirs: list[Path]) -> list[str]:
    """Run labels are folder names; a name used twice gets its parent folder as well."""
    names = [d.resolve().name for d in dirs]
    return [
        f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for d, n in zip(dirs, names, strict=True)
    ]


# --------------------------------------------------------------------------- evaluation


def _add_evaluations(
    run: _Run,
    shots: tuple[int, ...],
    episodes: int,
    sample_episodes: int,
    device: str,
    progress: bool,
    checkpoint: str,
) -> None:
    """Evaluate the run at each shot count that has no saved evaluation; draw sample episodes."""
    from metaml import runs as runs_module

    try:
        learner = runs_module.load_learner(run.run_dir, checkpoint, device)
        data = runs_module.build_samplers(run.cfg)
    except UserError as exc:
        run.notes.append(f"No new evaluations or sample episodes: {exc}")
        return
    for k in shots:
        if _saved_eval(run, k) is not None:
            continue
        try:
            _evaluate_at(run, learner, k, episodes, device, progress, checkpoint)
        except UserError as exc:  # e.g. more shots than the test classes have examples
            run.notes.append(f"No {k}-shot evaluation: {exc}")
    run.evals = load_evals(run.run_dir)
    if sample_episodes > 0:
        run.samples = _sample_figures(run, learner, data.test, sample_episodes, device)


def _eval_ways(cfg: RunConfig, task_type: str) -> int:
    # A regression task has one output, whatever ``data.ways`` says.
    return cfg.data.ways if task_type == "classification" else 1


def _saved_eval(run: _Run, shots: int) -> dict[str, Any] | None:
    cfg = run.cfg
    for record in run.evals:
        if (
            record["dataset"] == cfg.data.dataset
            and record["shots"] == shots
            and record["steps"] == resolve_test_steps(cfg)
            and record.get("seed") == cfg.eval.seed
        ):
            return record
    return None


def _evaluate_at(
    run: _Run,
    learner: MetaLearner,
    shots: int,
    episodes: int,
    device: str,
    progress: bool,
    checkpoint: str,
) -> None:
    from metaml.evaluate import evaluate
    from metaml.runs import build_samplers

    sampler = build_samplers(run.cfg, eval_shots=shots).test
    steps = resolve_test_steps(run.cfg)
    result = evaluate(learner, sampler, episodes, steps=steps, device=device, progress=progress)
    save_eval(
        run.run_dir,
        result,
        dataset=run.cfg.data.dataset,
        ways=_eval_ways(run.cfg, learner.task_type),
        shots=shots,
        queries=run.cfg.data.queries,
        steps=steps,
        checkpoint=checkpoint,
    )


def _comparisons(runs: list[_Run]) -> list[dict[str, Any]]:
    """Paired differences between runs on every set of test episodes they share."""
    from metaml.evaluate import compare

    if len(runs) < 2:
        return []
    groups = _paired_groups(runs)
    rows = []
    for key, records in sorted(groups.items(), key=lambda item: _sort_key(item[0])):
        metric = next(iter(records.values()))[1]["metric"]
        if len(records) < 2 or any(r["metric"] != metric for _, r in records.values()):
            continue
        results = {label: eval_result(r) for label, (_, r) in records.items()}
        for c in compare(results):
            if records[c.a][0] != records[c.b][0]:  # only pairs of different runs
                rows.append({**dict(zip(EVAL_KEY, key, strict=True)), "metric": metric, "cmp": c})
    return rows


def _paired_groups(
    runs: list[_Run],
) -> dict[tuple[Any, ...], dict[str, tuple[str, dict[str, Any]]]]:
    """Evaluations grouped by the test episodes they used: ``key -> label -> (run, record)``.

    Adaptation steps are a property of the method, not of the episodes, so they are not part
    of the key; a run evaluated at several step counts on the same episodes gets one entry per
    count, labelled ``run @ N steps``.
    """
    groups: dict[tuple[Any, ...], dict[str, tuple[str, dict[str, Any]]]] = {}
    for run in runs:
        by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for record in run.evals:
            by_key.setdefault(tuple(record.get(k) for k in EVAL_KEY), []).append(record)
        for key, records in by_key.items():
            for record in records:
                label = run.label if len(records) == 1 else f"{run.label} @ {record['steps']} steps"
                groups.setdefault(key, {})[label] = (run.label, record)
    return groups


# --------------------------------------------------------------------------- plots


def _sort_key(key: tuple[Any, ...]) -> tuple[str, ...]:
    # Shots and steps sort as numbers (1, 5, 10), not as text (1, 10, 5); None sorts first.
    return tuple("" if v is None else f"{v:012d}" if isinstance(v, int) else str(v) for v in key)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _summary_figures(runs: list[_Run]) -> list[_Plot]:
    figures = []
    if any(r.metrics for r in runs):
        figures.append(_curves_figure(runs))
    if any(r.evals for r in runs):
        figures.append(_shots_figure(runs))
    return figures + _by_instance_figures(runs)


def _by_instance_figures(runs: list[_Run]) -> list[_Plot]:
    """MANN's accuracy by instance, where ``benchmarks.mann_instances`` left it in the run."""
    return [
        _Plot(
            name=f"report-{_file_stem(run.label)}-by-instance.png",
            title=f"Accuracy by instance: {run.label}",
            caption=(
                "Accuracy on the k-th presentation of a class within an episode "
                "(Santoro et al. 2016, Table 1), written by benchmarks.mann_instances."
            ),
            png=(run.run_dir / BY_INSTANCE_PNG).read_bytes(),
        )
        for run in runs
        if (run.run_dir / BY_INSTANCE_PNG).is_file()
    ]


def _instance_plots(report: _Report) -> list[_Plot]:
    return [f for f in report.figures if f.name.endswith("-by-instance.png")]


def _file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


def _metric_keys(records: list[dict[str, Any]]) -> tuple[str | None, str | None, str | None]:
    """The train metric, validation metric and its CI keys present in the metrics records."""
    keys = {k for r in records for k in r}
    train = next((k for k in ("acc", "accuracy", "mse") if k in keys), None)
    val_keys = sorted(k for k in keys if k.startswith("val_") and not k.endswith("_ci95"))
    preferred: list[str] = ["val_acc", "val_accuracy", "val_mse", "val_mean"]
    preferred = [k for k in preferred if k in keys]
    # Prefer the task metric; val_loss only when nothing else was validated.
    candidates = preferred or [k for k in val_keys if k != "val_loss"] or val_keys
    val = candidates[0] if candidates else None
    ci = next((k for k in (f"{val}_ci95", "val_ci95") if val and k in keys), None)
    return train, val, ci


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records if "step" in r and _is_number(r.get(key))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average: raw meta-batch losses are noisy, the trend is what matters.

    The span grows with the number of points, so short runs are not smoothed out of shape.
    """
    span = max(2, len(values) // 15)
    alpha = 2.0 / (span + 1)
    out = np.empty_like(values)
    acc = values[0] if len(values) else 0.0
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def _is_accuracy_key(key: str | None) -> bool:
    return key is not None and ("acc" in key)


def _curves_figure(runs: list[_Run]) -> _Plot:
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_loss, ax_train, ax_val = fig.subplots(1, 3)
    for i, run in enumerate(runs):
        color = _COLORS[i % len(_COLORS)]
        train_key, val_key, ci_key = _metric_keys(run.metrics)
        _plot_noisy(ax_loss, run.metrics, "loss", color, run.label)
        if train_key:
            _plot_noisy(ax_train, run.metrics, train_key, color, run.label)
        if val_key:
            _plot_val(ax_val, run.metrics, val_key, ci_key, color, run.label)
    keys = [_metric_keys(r.metrics) for r in runs]
    train_name = next((k[0] for k in keys if k[0]), None)
    val_name = next((k[1] for k in keys if k[1]), None)
    _style(ax_loss, "training loss", "meta-training step", "loss (meta-batch)")
    _style(
        ax_train,
        f"training {_metric_name(train_name)}",
        "meta-training step",
        _axis_label(train_name),
    )
    _style(
        ax_val, f"validation {_metric_name(val_name)}", "meta-training step", _axis_label(val_name)
    )
    for ax in (ax_loss, ax_train, ax_val):
        _legend_if_several(ax, len(runs))
    caption = (
        "Left and middle: the meta-training loss and metric on each logged meta-batch (faint: raw, "
        "solid: moving average). Right: the metric on the validation episodes with its 95% "
        "confidence band; the best checkpoint is the one at the best validation point."
    )
    return _Plot("report-curves.png", "Training curves", caption, _png(fig))


def _plot_noisy(ax: Axes, records: list[dict[str, Any]], key: str, color: str, label: str) -> None:
    steps, values = _series(records, key)
    if not len(steps):
        return
    scale = 100.0 if _is_accuracy_key(key) else 1.0
    ax.plot(steps, scale * values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, scale * _smooth(values), color=color, linewidth=1.8, label=label)


def _plot_val(
    ax: Axes, records: list[dict[str, Any]], key: str, ci_key: str | None, color: str, label: str
) -> None:
    steps, values = _series(records, key)
    if not len(steps):
        return
    scale = 100.0 if _is_accuracy_key(key) else 1.0
    ax.plot(steps, scale * values, "o-", color=color, linewidth=1.8, markersize=4, label=label)
    if ci_key is None:
        return
    ci_steps, ci = _series([r for r in records if _is_number(r.get(key))], ci_key)
    if len(ci_steps) == len(steps):
        low, high = scale * (values - ci), scale * (values + ci)
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)


def _metric_name(key: str | None) -> str:
    if key is None:
        return "metric"
    return "accuracy" if _is_accuracy_key(key) else key.removeprefix("val_")


def _axis_label(key: str | None) -> str:
    return "accuracy (%)" if _is_accuracy_key(key) else _metric_name(key)


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not ax.has_data():
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def _legend_if_several(ax: Axes, n_runs: int) -> None:
    if n_runs > 1 and ax.has_data():
        ax.legend(fontsize=8)


def _shots_figure(runs: list[_Run]) -> _Plot:
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    metric = "accuracy"
    for i, run in enumerate(runs):
        points = _shot_points(run)
        if not points:
            continue
        metric = points[0]["metric"]
        scale = 100.0 if metric == "accuracy" else 1.0
        k = np.array([p["shots"] for p in points], dtype=float)
        mean = scale * np.array([p["mean"] for p in points])
        ci = scale * np.array([p["ci95"] for p in points])
        color = _COLORS[i % len(_COLORS)]
        ax.errorbar(k, mean, yerr=ci, fmt="o-", color=color, capsize=4, label=run.label)
        ax.fill_between(k, mean - ci, mean + ci, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    shot_values = sorted({p["shots"] for r in runs for p in _shot_points(r)})
    ax.set_xticks(shot_values, [str(s) for s in shot_values])
    ax.minorticks_off()
    xlabel = "shots (examples per class)" if metric == "accuracy" else "shots (support points)"
    _style(ax, f"test {metric} against shots", xlabel, _axis_label(metric))
    _legend_if_several(ax, len(runs))
    better = "higher" if metric == "accuracy" else "lower"
    unit = "support examples per class" if metric == "accuracy" else "support points"
    caption = (
        f"Mean test {metric} ({better} is better) over the fixed test episodes at each number of "
        f"{unit}, with 95% confidence intervals (bars and band)."
    )
    return _Plot("report-shots.png", f"Test {metric} against shots", caption, _png(fig))


def _shot_points(run: _Run) -> list[dict[str, Any]]:
    """The run's saved evaluations on its own dataset, ways and test steps, one per shot count."""
    cfg = run.cfg
    points = [
        r
        for r in run.evals
        if r["dataset"] == cfg.data.dataset
        and r["steps"] == resolve_test_steps(cfg)
        and r.get("seed") == cfg.eval.seed
    ]
    if points and points[0]["metric"] == "accuracy":
        points = [r for r in points if r["ways"] == cfg.data.ways]
    return sorted({r["shots"]: r for r in points}.values(), key=lambda r: r["shots"])


# --------------------------------------------------------------------------- sample episodes


def _sample_figures(
    run: _Run, learner: MetaLearner, sampler: Any, count: int, device: str
) -> list[_Plot]:
    tasks = [sampler.episode(i).to(device) for i in range(count)]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.label)
    if learner.task_type == "classification":
        if tasks[0].support_x.ndim != 4:
            run.notes.append("Sample episodes are drawn only for image inputs (C, H, W).")
            return []
        caption = (
            "Each row is one class of the episode: its support images on the left, then query "
            "images of that class titled with the predicted class (green: right, red: wrong)."
        )
        return [
            _Plot(
                f"report-samples-{safe}-{i}.png",
                f"test episode {i}",
                caption,
                _png(_classification_episode(task, learner)),
            )
            for i, task in enumerate(tasks)
        ]
    if tasks[0].support_x.ndim != 2 or tasks[0].support_x.shape[-1] != 1:
        run.notes.append("Sample episodes are drawn only for 1-D regression inputs.")
        return []
    caption = (
        f"{count} test episodes, {tasks[0].support_x.shape[0]} support points each. Black dots: "
        "the support set the learner adapted to; grey crosses: the query points (samples of the "
        "true function); blue line: the adapted predictor over x in [-5, 5]."
    )
    png = _png(_regression_episodes(tasks, learner))
    return [_Plot(f"report-samples-{safe}.png", f"test episodes 0 to {count - 1}", caption, png)]


def _predict(learner: MetaLearner, task: Task, x: torch.Tensor) -> torch.Tensor:
    # adapt may need gradients (MAML's inner loop); only the prediction runs without them.
    predictor = learner.adapt(task.support_x, task.support_y)
    with torch.no_grad():
        return predictor(x).detach().cpu()


def _regression_episodes(tasks: list[Task], learner: MetaLearner) -> Figure:
    fig = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=True))
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    for i, (ax, task) in enumerate(zip(axes, tasks, strict=True)):
        curve = _predict(learner, task, grid.to(task.support_x.device))
        qx, qy = task.query_x.cpu(), task.query_y.cpu()
        sx, sy = task.support_x.cpu(), task.support_y.cpu()
        ax.plot(qx[:, 0], qy[:, 0], "x", color="grey", label="query (true)")
        ax.plot(grid[:, 0], curve[:, 0], "-", color=_COLORS[0], linewidth=2, label="adapted")
        ax.plot(sx[:, 0], sy[:, 0], "o", color="black", markersize=6, label="support")
        ax.set_title(f"episode {i}")
        ax.set_xlabel("x")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize=8, loc="best")
    return fig


def _classification_episode(task: Task, learner: MetaLearner) -> Figure:
    if task.support_x.ndim != 4:
        raise UserError("sample episodes need image inputs (C, H, W)")
    predicted = _predict(learner, task, task.query_x).argmax(-1)
    sy, qy = task.support_y.cpu(), task.query_y.cpu()
    ways = min(int(sy.max()) + 1, _MAX_SHOWN_WAYS)
    shots = min(int((sy == 0).sum()), _MAX_SHOWN_SHOTS)
    queries = min(int((qy == 0).sum()), _MAX_SHOWN_QUERIES)
    cols = shots + 1 + queries  # a narrow blank column separates support from queries
    ratios = [1.0] * shots + [0.3] + [1.0] * queries
    fig = Figure(figsize=(0.85 * (cols - 0.7), 0.95 * ways + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(ways, cols, squeeze=False, width_ratios=ratios))
    for ax in axes.flat:
        ax.axis("off")
    for c in range(ways):
        support = task.support_x[sy == c][:shots].cpu()
        for j, image in enumerate(support):
            _show(axes[c, j], image)
        axes[c, 0].set_title(f"class {c}", fontsize=8, loc="left", pad=2)
        query_index = (qy == c).nonzero().flatten()[:queries]
        for j, q in enumerate(query_index.tolist()):
            ax = axes[c, shots + 1 + j]
            _show(ax, task.query_x[q].cpu())
            right = int(predicted[q]) == c
            color = "#1a7f37" if right else "#d62728"
            ax.set_title(f"→ {int(predicted[q])}", fontsize=8, color=color, pad=2, weight="bold")
    hidden = "" if ways == int(sy.max()) + 1 else f" (first {ways} classes shown)"
    fig.suptitle(f"support  |  queries → predicted class{hidden}", fontsize=8)
    return fig


def _show(ax: Axes, image: torch.Tensor) -> None:
    """Show a (C, H, W) image; each image is rescaled to [0, 1] since inputs may be normalised."""
    array = image.float().numpy()
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=1)  # as the model sees it, not restyled
    else:
        ax.imshow(np.transpose(array[:3], (1, 2, 0)))
    ax.axis("off")


# --------------------------------------------------------------------------- output


def _write_outputs(report: _Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    for fig in [*report.figures, *(f for r in report.runs for f in r.samples)]:
        _write_bytes(out / fig.name, fig.png)
    html_path, md_path = out / HTML_FILE, out / MD_FILE
    atomic_write_text(html_path, _render_html(report))
    atomic_write_text(md_path, _render_markdown(report))
    return html_path, md_path


def _write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    atomic_write(path, write)


_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin-bottom: .1em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
.sub { color: #666; margin-top: 0; }
.note { color: #555; font-size: .92em; max-width: 60em; }
.warn { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .93em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; }
th { background: #f3f4f6; text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.yes { color: #1a7f37; font-weight: 600; }
.no { color: #777; }
img { max-width: 100%; height: auto; display: block; margin: .4em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-weight: 600; font-size: .92em; }
details { margin: .5em 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: .8em; overflow-x: auto;
      font-size: .85em; line-height: 1.35; }
footer { color: #888; font-size: .85em; margin-top: 3em; }
"""


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # columns to right-align


def _summary_table(report: _Report) -> _Table:
    headers = ["run", "algorithm", "dataset", "ways", "shots", "steps trained"]
    headers += ["best validation", "test at training shots"]
    rows = []
    for run in report.runs:
        d = run.cfg.data
        steps = max((r["step"] for r in run.metrics if _is_number(r.get("step"))), default=0)
        ways = str(d.ways) if _run_metric(run) != "mse" else "–"
        row = [run.label, run.cfg.algorithm.name, d.dataset, ways, str(d.shots), str(steps)]
        rows.append([*row, _best_validation(run), _test_at_training_shots(run)])
    return _Table(headers, rows, numeric={3, 4, 5, 6, 7})


def _test_at_training_shots(run: _Run) -> str:
    record = next((r for r in _shot_points(run) if r["shots"] == run.cfg.data.shots), None)
    if record is None:
        return "–"
    return f"{record['metric']} {format_score(record['mean'], record['ci95'], record['metric'])}"


def _run_metric(run: _Run) -> str:
    if run.evals:
        return str(run.evals[0]["metric"])
    train, _, _ = _metric_keys(run.metrics)
    return "mse" if train == "mse" else "accuracy"


def _best_validation(run: _Run) -> str:
    _, key, ci_key = _metric_keys(run.metrics)
    records = [r for r in run.metrics if key and _is_number(r.get(key))]
    if not key or not records:
        return "–"
    higher = _is_accuracy_key(key)
    best = (max if higher else min)(records, key=lambda r: r[key])
    metric = "accuracy" if higher else "mse"
    ci = float(best.get(ci_key, 0.0)) if ci_key else 0.0
    return f"{metric} {format_score(best[key], ci, metric)} (step {best.get('step', '?')})"


def _eval_table(report: _Report) -> _Table:
    headers = ["run", "dataset", "ways", "shots", "queries", "adapt steps", "checkpoint"]
    headers += ["episodes"]
    headers += ["seed", "result (mean ± 95% CI)"]
    rows = []
    for run in report.runs:
        for r in run.evals:
            steps = "default" if r["steps"] is None else str(r["steps"])
            ways = "–" if r["metric"] == "mse" else str(r["ways"])
            queries = str(r.get("queries", "?"))
            row = [run.label, r["dataset"], ways, str(r["shots"]), queries, steps]
            row += [str(r.get("checkpoint", "?")), str(r["episodes"]), str(r["seed"])]
            rows.append([*row, f"{r['metric']} {format_score(r['mean'], r['ci95'], r['metric'])}"])
    return _Table(headers, rows, numeric={2, 3, 4, 5, 7, 8, 9})


def _comparison_table(report: _Report) -> _Table:
    headers = ["dataset", "ways", "shots", "queries", "episodes", "pair (b − a)", "difference"]
    headers += ["significant at 95%", "better"]
    rows = []
    for row in report.comparisons:
        c, metric = row["cmp"], row["metric"]
        better = _better(c, metric) if c.significant else "–"
        ways = "–" if metric == "mse" else str(row["ways"])
        cells = [row["dataset"], ways, str(row["shots"]), str(row["queries"]), str(row["episodes"])]
        cells += [f"{c.b} − {c.a}", format_diff(c.mean_diff, c.ci95, metric)]
        rows.append([*cells, "yes" if c.significant else "no", better])
    return _Table(headers, rows, numeric={1, 2, 3, 4, 6})


def _better(c: Any, metric: str) -> str:
    # For MSE lower is better, so a negative difference b − a favours b.
    b_wins = c.mean_diff > 0 if metric == "accuracy" else c.mean_diff < 0
    return str(c.b if b_wins else c.a)


_EVAL_NOTE = (
    "Each result is the mean over fixed, seeded test episodes (the same episodes for every run "
    "with the same seed) with a 95% confidence interval, 1.96 × standard error. Accuracy is in "
    "percent; MSE is on the regression targets (lower is better)."
)
_COMPARE_NOTE = (
    "Paired differences on the same test episodes (b − a, accuracy in percentage points). "
    "A difference is significant when its 95% confidence interval excludes zero; pairing "
    "removes the episode-to-episode variation both runs share, so it detects smaller "
    "differences than comparing the two intervals above."
)


def _subtitle(report: _Report) -> str:
    algorithms = ", ".join(sorted({r.cfg.algorithm.name for r in report.runs}))
    datasets = ", ".join(sorted({r.cfg.data.dataset for r in report.runs}))
    return f"{algorithms} on {datasets} · generated {datetime.now():%Y-%m-%d %H:%M}"


def _render_html(report: _Report) -> str:
    """The report as one self-contained HTML page (inline CSS, PNGs as base64, no scripts)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>metaml report: {e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>metaml report: {e(report.title)}</h1>",
        f'<p class="sub">{e(_subtitle(report))}</p>',
        "<h2>Overview</h2>",
        _html_table(_summary_table(report)),
        *(_html_config(run) for run in report.runs),
        *_html_notes(report),
    ]
    figures = {f.name: f for f in report.figures}
    if "report-curves.png" in figures:
        parts += ["<h2>Training curves</h2>", _html_figure(figures["report-curves.png"])]
    parts += ["<h2>Test evaluations</h2>", *_html_table_or(_eval_table(report), "No evaluations.")]
    parts.append(f'<p class="note">{e(_EVAL_NOTE)}</p>')
    if "report-shots.png" in figures:
        f = figures["report-shots.png"]
        parts += [f"<h2>{e(f.title)}</h2>", _html_figure(f)]
    for f in _instance_plots(report):
        parts += [f"<h2>{e(f.title)}</h2>", _html_figure(f)]
    if len(report.runs) > 1:
        none = (
            "The runs share no test episodes (same dataset, ways, shots, queries, seed, episodes)."
        )
        parts += ["<h2>Comparison</h2>", *_html_table_or(_comparison_table(report), none)]
        parts.append(f'<p class="note">{e(_COMPARE_NOTE)}</p>')
    samples = [f for run in report.runs for f in run.samples]
    if samples:
        parts.append("<h2>Sample test episodes</h2>")
        for run in (r for r in report.runs if r.samples):
            parts += [f"<h3>{e(run.label)}</h3>", *_html_gallery(run.samples)]
    parts.append("<footer>Written by <code>metaml report</code>.</footer></body></html>")
    return "\n".join(parts) + "\n"


def _html_table(table: _Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            cls = "num" if i in table.numeric else {"yes": "yes", "no": "no"}.get(cell, "")
            cells.append(f'<td class="{cls}">{e(cell)}</td>' if cls else f"<td>{e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_gallery(samples: list[_Plot]) -> list[str]:
    """Sample episodes side by side (they are narrow), one caption per kind of plot."""
    items = []
    for f in samples:
        data = base64.b64encode(f.png).decode("ascii")
        title = html.escape(f.title)
        items.append(
            f"<figure><figcaption>{title}</figcaption>"
            f'<img src="data:image/png;base64,{data}" alt="{title}"></figure>'
        )
    captions = dict.fromkeys(f.caption for f in samples)
    notes = [f'<p class="note">{html.escape(c)}</p>' for c in captions]
    return ['<div class="gallery">', *items, "</div>", *notes]


def _html_table_or(table: _Table, empty: str) -> list[str]:
    return [_html_table(table)] if table.rows else [f"<p>{html.escape(empty)}</p>"]


def _html_figure(fig: _Plot) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    alt = html.escape(fig.title)
    caption = html.escape(fig.caption)
    return f'<img src="data:image/png;base64,{data}" alt="{alt}"><p class="note">{caption}</p>'


def _html_config(run: _Run) -> str:
    e = html.escape
    return (
        f"<details><summary>Configuration of {e(run.label)} ({e(str(run.run_dir))})</summary>"
        f"<pre>{e(run.config_text)}</pre></details>"
    )


def _html_notes(report: _Report) -> list[str]:
    notes = [f"{run.label}: {n}" for run in report.runs for n in run.notes]
    return [f'<p class="warn">{html.escape(n)}</p>' for n in notes]


def _render_markdown(report: _Report) -> str:
    """The report as Markdown; plots are the PNG files written beside ``report.md``."""
    lines = [f"# metaml report: {report.title}", "", _subtitle(report), "", "## Overview", ""]
    lines += [*_md_table(_summary_table(report)), ""]
    for run in report.runs:
        lines += [f"<details><summary>Configuration of {run.label}</summary>", "", "```yaml"]
        lines += [run.config_text.rstrip(), "```", "", "</details>", ""]
    lines += [f"> **Note** {run.label}: {n}" for run in report.runs for n in run.notes]
    figures = {f.name: f for f in report.figures}
    if "report-curves.png" in figures:
        lines += ["", "## Training curves", "", *_md_figure(figures["report-curves.png"])]
    lines += ["", "## Test evaluations", ""]
    lines += _md_table(_eval_table(report)) or ["No evaluations."]
    lines += ["", _EVAL_NOTE]
    if "report-shots.png" in figures:
        f = figures["report-shots.png"]
        lines += ["", f"## {f.title}", "", *_md_figure(f)]
    for f in _instance_plots(report):
        lines += ["", f"## {f.title}", "", *_md_figure(f)]
    if len(report.runs) > 1:
        lines += ["", "## Comparison", ""]
        lines += _md_table(_comparison_table(report)) or ["The runs share no test episodes."]
        lines += ["", _COMPARE_NOTE]
    if any(run.samples for run in report.runs):
        lines += ["", "## Sample test episodes"]
        for run in (r for r in report.runs if r.samples):
            lines += ["", f"### {run.label}", ""]
            lines += [f"![{run.label}: {f.title}]({f.name})" for f in run.samples]
            lines += ["", run.samples[0].caption]
    return "\n".join(lines) + "\n"


def _md_table(table: _Table) -> list[str]:
    if not table.rows:
        return []

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---:" if i in table.numeric else "---" for i in range(len(table.headers))]
    return [row(table.headers), "| " + " | ".join(rule) + " |", *(row(r) for r in table.rows)]


def _md_figure(fig: _Plot) -> list[str]:
    return [f"![{fig.title}]({fig.name})", "", fig.caption]
