"""``metaml kb``: create, fill, search and check a knowledge base from the command line.

A task is given as a dataset and its classes (``--classes a,b,c`` or a whole ``--group``); its
support set is ``--shots`` examples of each class, drawn with ``--seed``.

Example:
    >>> # metaml kb init kb/ && metaml kb add kb/ runs/protonet-greek --group Greek
    >>> # metaml kb warm-start kb/ --dataset omniglot-small --group Latin --strategy model-based
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from metaml.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from metaml.kb.store import Entry, KnowledgeBase
    from metaml.tasks import Task

kb_app = typer.Typer(
    help="A knowledge base of trained models, found again by task similarity.\n\n"
    "Example: metaml kb query kb/ --dataset omniglot-small --group Latin -k 3",
    no_args_is_help=True,
)

KBPath = Annotated[Path, typer.Argument(help="The knowledge base folder (made by metaml kb init).")]
EntryArg = Annotated[str, typer.Argument(help="An entry id, or a uid prefix of 6+ characters.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DatasetOption = Annotated[
    str | None, typer.Option(help="The task's dataset (name or spec; default: the run's).")
]
RootOption = Annotated[str | None, typer.Option(help="Folder holding the dataset's files.")]
ClassesOption = Annotated[
    str | None, typer.Option(help="The task's classes, comma-separated names.")
]
GroupOption = Annotated[
    str | None, typer.Option(help="Use every class of this group (alphabet) as the task.")
]
ShotsOption = Annotated[int, typer.Option(help="Support examples per class.")]
SeedOption = Annotated[int, typer.Option(help="Seed of the support examples drawn.")]


def _open(path: Path) -> KnowledgeBase:
    from metaml.kb.store import KnowledgeBase

    return KnowledgeBase(path)


def _support_task(
    dataset: str | None,
    root: str | None,
    classes: str | None,
    group: str | None,
    shots: int,
    seed: int,
) -> tuple[Task, str, list[str]]:
    """The support set of the named classes: ``shots`` examples of each, drawn with ``seed``."""
    from metaml.data import ClassDataset, load
    from metaml.tasks import EpisodeSampler

    if dataset is None:
        raise UserError("give the task's --dataset, e.g. --dataset omniglot-small")
    if (classes is None) == (group is None):
        raise UserError("give the task's --classes a,b,c or a --group, one of the two")
    source = load(dataset, root=root)
    if not isinstance(source, ClassDataset):
        raise UserError(
            f"{dataset} is a task family; the knowledge base stores image classification tasks"
        )
    if group is not None:
        if group not in source.groups:
            raise UserError(
                f"no group {group!r} in {dataset}{did_you_mean(group, source.groups)}; "
                f"see metaml datasets show {dataset}"
            )
        ids = [c for c, g in enumerate(source.class_groups) if g == group]
    else:
        assert classes is not None
        index = {name: c for c, name in enumerate(source.class_names)}
        ids = []
        for name in (n.strip() for n in classes.split(",") if n.strip()):
            if name not in index:
                raise UserError(f"no class {name!r} in {dataset}{did_you_mean(name, index)}")
            ids.append(index[name])
    subset = source.subset_classes(ids)
    # One episode over all the chosen classes; its query set is unused (one example per class).
    task = EpisodeSampler(subset, ways=len(ids), shots=shots, queries=1, seed=seed).episode(0)
    return task, dataset, [source.class_names[c] for c in ids]


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--{what} {item!r} must be key=value, e.g. --{what} alphabet=Greek")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _line(entry: Entry, distance: float | None = None) -> str:
    near = "" if distance is None else f"  distance {distance:.4f}"
    return (
        f"{entry.id:>5}  {entry.name:<24} {entry.dataset:<16} {entry.ways:>3}-way {entry.shots}-shot"
        f"  {entry.created}{near}"
    )


@kb_app.command("init")
def init(
    path: KBPath,
    input_shape: Annotated[
        str, typer.Option(help="Image shape C,H,W of the tasks, for the task encoder.")
    ] = "1,28,28",
    seed: Annotated[int, typer.Option(help="Seed of the reference backbone's weights.")] = 0,
    fisher: Annotated[
        bool, typer.Option(help="Add the diagonal Fisher block (Task2Vec-style) to task vectors.")
    ] = False,
    from_run: Annotated[
        Path | None, typer.Option(help="Use this trained run's backbone as the reference.")
    ] = None,
) -> None:
    """Create a knowledge base folder and fix its task encoder.

    Example: metaml kb init kb/ --input-shape 1,28,28
    """
    from metaml.kb.store import DB_FILE, KnowledgeBase
    from metaml.taskrep import TaskEncoder

    if (path / DB_FILE).exists():
        raise UserError(f"{path} already holds a knowledge base; use it, or choose another folder")
    try:
        shape = tuple(int(s) for s in input_shape.split(","))
    except ValueError:
        raise UserError(f"--input-shape {input_shape!r} must be C,H,W, e.g. 1,28,28") from None
    encoder = (
        TaskEncoder.from_run(from_run, fisher=fisher)
        if from_run is not None
        else TaskEncoder(input_shape=shape, seed=seed, fisher=fisher)
    )
    kb = KnowledgeBase(path, create=True, encoder=encoder)
    typer.echo(f"created {kb.path} (schema {kb.schema_version}, {encoder.dim}-d task vectors)")


@kb_app.command("add")
def add(
    path: KBPath,
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by metaml train.")],
    dataset: DatasetOption = None,
    root: RootOption = None,
    classes: ClassesOption = None,
    group: GroupOption = None,
    shots: ShotsOption = 5,
    seed: SeedOption = 0,
    name: Annotated[
        str | None, typer.Option(help="Entry name (default: the run's folder).")
    ] = None,
    meta: Annotated[
        list[str] | None, typer.Option(help="Free metadata key=value (repeatable).")
    ] = None,
    metric: Annotated[
        list[str] | None, typer.Option(help="A metric key=value, e.g. acc=0.93 (repeatable).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
) -> None:
    """Store a trained run as the model of a task (the classes it was trained on, or a related task).

    Example: metaml kb add kb/ runs/protonet-greek --dataset omniglot-small --group Greek
    """
    from metaml import runs

    kb = _open(path)
    if dataset is None and root is None:
        data = runs.read_config(run_dir).data
        dataset, root = data.dataset, data.root
    task, dataset, class_names = _support_task(dataset, root, classes, group, shots, seed)
    entry = kb.add(
        run_dir, task, name=name, dataset=dataset, classes=class_names,
        metadata={**({"group": group} if group else {}), **_pairs(meta, "meta")},
        metrics=_pairs(metric, "metric"), checkpoint=checkpoint,
    )  # fmt: skip
    typer.echo(
        f"added entry {entry.id} ({entry.name}, {entry.ways}-way {entry.shots}-shot) to {path}"
    )


@kb_app.command("list")
def list_(
    path: KBPath,
    dataset: Annotated[str | None, typer.Option(help="Only entries of this dataset.")] = None,
    json_: JsonOption = False,
) -> None:
    """List the entries, oldest first.

    Example: metaml kb list kb/
    """
    entries = _open(path).entries(dataset)
    if json_:
        typer.echo(json.dumps([e.summary() for e in entries]))
        return
    for entry in entries:
        typer.echo(_line(entry))
    typer.echo(f"{len(entries)} entries")


@kb_app.command("show")
def show(path: KBPath, entry: EntryArg, json_: JsonOption = False) -> None:
    """Show one entry: its task, model, metrics and weights file.

    Example: metaml kb show kb/ 3
    """
    found = _open(path).get(entry)
    info = found.summary()
    if json_:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        typer.echo(f"{key:<20} {value}")


@kb_app.command("query")
def query(
    path: KBPath,
    dataset: DatasetOption = None,
    root: RootOption = None,
    classes: ClassesOption = None,
    group: GroupOption = None,
    shots: ShotsOption = 5,
    seed: SeedOption = 0,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 5,
    metric: Annotated[str, typer.Option(help="euclidean or cosine.")] = "euclidean",
    json_: JsonOption = False,
) -> None:
    """The stored tasks nearest a new task, nearest first.

    Example: metaml kb query kb/ --dataset omniglot-small --group Latin -k 3
    """
    kb = _open(path)
    task, _, _ = _support_task(dataset, root, classes, group, shots, seed)
    neighbors = kb.nearest(task, k=k, metric=metric)  # type: ignore[arg-type]
    if json_:
        typer.echo(json.dumps([{**n.entry.summary(), "distance": n.distance} for n in neighbors]))
        return
    for n in neighbors:
        typer.echo(_line(n.entry, n.distance))


@kb_app.command("warm-start")
def warm_start(
    path: KBPath,
    dataset: DatasetOption = None,
    root: RootOption = None,
    classes: ClassesOption = None,
    group: GroupOption = None,
    shots: ShotsOption = 5,
    seed: SeedOption = 0,
    strategy: Annotated[str, typer.Option(help="nearest, model-based or random.")] = "nearest",
    k: Annotated[int, typer.Option("-k", help="Candidates scored by model-based.")] = 5,
    steps: Annotated[
        int | None, typer.Option(help="Adaptation steps when scoring (default: the model's).")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(help="Write the chosen model as a run directory (for eval, predict)."),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Choose the stored model a new task starts from; optionally export it as a run directory.

    Example: metaml kb warm-start kb/ --dataset omniglot-small --group Latin --strategy model-based --export runs/latin-start
    """
    kb = _open(path)
    task, _, _ = _support_task(dataset, root, classes, group, shots, seed)
    ws = kb.warm_start(task, strategy, k=k, steps=steps, seed=seed)  # type: ignore[arg-type]
    if export is not None:
        _export(ws.entry, ws.learner, export)
    if json_:
        typer.echo(json.dumps({"strategy": strategy, "entry": ws.entry.summary(),
                               "scores": ws.scores, "export": str(export) if export else None}))  # fmt: skip
        return
    typer.echo(f"{strategy}: entry {ws.entry.id} ({ws.entry.name})")
    for entry_id, score in ws.scores.items():
        typer.echo(f"  candidate {entry_id}: support loss {score:.4f}")
    if export is not None:
        typer.echo(f"exported to {export}")


def _export(entry: Entry, learner: Any, run_dir: Path) -> None:
    """A run directory (config, model.json, one checkpoint) holding the entry's model."""
    from metaml.engine import latest_checkpoint
    from metaml.engine.checkpoint import save_checkpoint
    from metaml.io import atomic_write_json, atomic_write_text
    from metaml.runs import CONFIG_FILE, SPEC_FILE

    if latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run; choose another --export folder")
    assert entry.config is not None and entry.model_spec is not None
    atomic_write_text(run_dir / CONFIG_FILE, entry.config)
    atomic_write_json(run_dir / SPEC_FILE, entry.model_spec)
    save_checkpoint(run_dir, 0, learner, metadata={"kb_entry": entry.uid})


@kb_app.command("remove")
def remove(path: KBPath, entry: EntryArg) -> None:
    """Delete an entry and its weights file.

    Example: metaml kb remove kb/ 3
    """
    found = _open(path).remove(entry)
    typer.echo(f"removed entry {found.id} ({found.name})")


@kb_app.command("verify")
def verify(path: KBPath) -> None:
    """Check every weights file against its sha256; exit status 1 when any is missing or corrupt.

    Example: metaml kb verify kb/
    """
    kb = _open(path)
    for name in kb.swept:
        typer.echo(f"removed orphan file {name} (left by an interrupted add or remove)")
    problems = kb.verify()
    for p in problems:
        typer.echo(f"entry {p.entry_id}: {p.kind}: {p.detail}")
    if problems:
        typer.echo(
            f"{len(problems)} of {len(kb)} entries have a problem; remove them with "
            f"metaml kb remove {path} ID",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"ok: {len(kb)} entries, every weights file present and matching its sha256")
