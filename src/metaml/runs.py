"""Runs: from a config to a trained learner in a run directory, and back.

``train(cfg)`` builds the data, the samplers and the learner, and meta-trains into a run
directory; ``resume(run_dir)`` continues it; ``load_learner(run_dir)`` returns the trained
learner ready to ``adapt``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from metaml.algorithms import create_learner
from metaml.algorithms.base import MetaLearner
from metaml.config import RunConfig, apply_override, config_from_dict
from metaml.data import ClassDataset, load
from metaml.device import resolve_device, reuse_cpu_memory
from metaml.engine import Trainer, latest_checkpoint, load_checkpoint
from metaml.errors import UserError
from metaml.io import atomic_write_json, atomic_write_text
from metaml.tasks import EpisodeSampler, TaskFamily

if TYPE_CHECKING:
    from metaml.taskrep.selection import HardClassTracker

CONFIG_FILE = "config.yaml"


SPEC_FILE = "model.json"
_PREPROCESS_KEYS = ("image_size", "channels", "invert", "resample")


@dataclass
class RunData:
    """The three samplers of a run, and the image preprocessing of its data (None for task families)."""

    train: EpisodeSampler
    val: EpisodeSampler
    test: EpisodeSampler
    preprocess: dict[str, Any] | None = None

    def model_spec(self) -> dict[str, Any]:
        """What rebuilding the learner needs, saved as ``model.json`` so a run loads without its data."""
        return {
            "input_shape": list(self.train.input_shape),
            "task_type": self.train.task_type,
            "ways": self.train.ways,
            "num_classes": self.train.num_classes,
            "preprocess": self.preprocess,
        }


def build_samplers(
    cfg: RunConfig,
    eval_ways: int | None = None,
    eval_shots: int | None = None,
    *,
    selection: bool = False,
) -> RunData:
    """Load the config's dataset, split it, and build seeded samplers for each split.

    Class datasets are split by group or class (``data.split_by``); task families such as
    ``sinusoid`` have no split, so each sampler gets its own seed instead. With ``selection``
    (what training does) the training sampler draws classes by ``data.task_selection``; without
    it uniformly, since evaluation never draws from it and ``nearest`` weights cost a pass of
    every training class through the reference backbone. Validation and test always draw
    uniformly.

    Example:
        >>> from metaml.config import load_config
        >>> data = build_samplers(load_config(None, ["data.shots=5"]))
        >>> data.train.episode(0).support_x.shape
        torch.Size([5, 1])
    """
    d = cfg.data
    options = {"image_size": d.image_size} if d.image_size else {}
    source: ClassDataset | TaskFamily = load(d.dataset, root=d.root, **options)
    splits: tuple[ClassDataset | TaskFamily, ...] = (source, source, source)
    if isinstance(source, ClassDataset):
        splits = source.split(d.split_by, d.split_fractions, d.split_seed)

    def sampler(
        split: int,
        ways: int,
        shots: int,
        seed: int,
        meta_batch_size: int = 1,
        queries: int = d.queries,
        **choice: Any,
    ) -> EpisodeSampler:
        return EpisodeSampler(
            splits[split], ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
            seed=seed, within_group=d.within_group, rotations=d.rotations, **choice,
        )  # fmt: skip

    return RunData(
        train=sampler(
            0,
            d.train_ways or d.ways,
            d.shots,
            cfg.seed,
            d.meta_batch_size,
            d.train_queries or d.queries,
            **(_task_selection(cfg, splits) if selection else {}),
        ),
        val=sampler(1, d.ways, d.shots, cfg.seed + 1),
        test=sampler(2, eval_ways or d.ways, eval_shots or d.shots, cfg.eval.seed),
        preprocess=image_preprocessing(source) if isinstance(source, ClassDataset) else None,
    )


def _task_selection(
    cfg: RunConfig, splits: tuple[ClassDataset | TaskFamily, ...]
) -> dict[str, Any]:
    """The training sampler's ``task_selection`` and ``class_weights`` arguments for the config."""
    d = cfg.data
    if d.task_selection == "uniform":
        return {}
    train = splits[0]
    if not isinstance(train, ClassDataset):
        raise UserError(
            f"data.task_selection={d.task_selection} chooses among a class dataset's classes; "
            f"{d.dataset!r} is a task family that draws its own tasks: set data.task_selection=uniform"
        )
    if d.task_selection == "hard":
        return {"task_selection": "hard"}  # weights start uniform; the trainer's tracker moves them
    from metaml.taskrep.selection import class_examples, nearest_class_weights  # lazy: heavier

    o = d.selection
    target_x, target_y = class_examples(_selection_target(cfg, splits), o.target_examples or 1)
    # options left unset take nearest_class_weights' own defaults (one place holds them)
    chosen = {k: v for k in ("temperature", "uniform_mix") if (v := getattr(o, k)) is not None}
    try:
        weights = nearest_class_weights(train, target_x, target_y, rotations=d.rotations, **chosen)
    except UserError as exc:  # e.g. images too small for the reference conv4
        raise UserError(
            f"data.task_selection=nearest compares classes with a reference conv4: {exc}"
        ) from None
    return {"task_selection": "nearest", "class_weights": weights}


def _selection_target(
    cfg: RunConfig, splits: tuple[ClassDataset | TaskFamily, ...]
) -> ClassDataset:
    """The dataset whose classes ``nearest`` selection steers toward (``data.selection.target``)."""
    d, target = cfg.data, cfg.data.selection.target
    if target == "test":
        dataset = splits[2]
    else:
        assert target is not None  # config validation requires it for nearest
        options = {"image_size": d.image_size} if d.image_size else {}
        dataset = load(target, root=d.selection.target_root, **options)
    train = splits[0]
    assert isinstance(train, ClassDataset)
    if not isinstance(dataset, ClassDataset) or dataset.shape != train.shape:
        got = dataset.shape if isinstance(dataset, ClassDataset) else "a task family"
        raise UserError(
            f"data.selection.target={target!r} must be a class dataset of images shaped like the "
            f"training data's {train.shape}; got {got} (set data.image_size, or another target)"
        )
    return dataset


def image_preprocessing(dataset: ClassDataset) -> dict[str, Any]:
    """How a dataset's images were made (image_size, channels, invert, resample), to treat new images alike.

    Without a recorded size or channel count (npz, IDX), the images' own are used, so that a
    user's images are brought to what the network takes.

    Example:
        >>> from metaml.data import ClassDataset
        >>> ds = ClassDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
        >>> image_preprocessing(ds)["image_size"]
        [8, 8]
    """
    pre = _recorded_preprocessing(dataset.config)
    channels, height, width = dataset.shape
    if pre.get("image_size") is None:
        pre["image_size"] = [height, width]
    if pre.get("channels") is None:
        pre["channels"] = channels
    return pre


def _recorded_preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing keys of a dataset config; a concatenation's come from its parts."""
    if config.get("reader") == "concat":
        parts = [_recorded_preprocessing(part) for part in config.get("parts", [])]
        if parts and any(part != parts[0] for part in parts):
            raise UserError(
                f"the run's datasets were preprocessed differently ({parts}); predict and features need one preprocessing"
            )
        return parts[0] if parts else {}
    return {k: config[k] for k in _PREPROCESS_KEYS if k in config}


def read_model_spec(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``model.json`` (input shape, task type, ways, classes, preprocessing), or None.

    Example:
        >>> # read_model_spec("runs/protonet-omniglot")["preprocess"]["invert"]
    """
    path = Path(run_dir) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc}); delete it to rebuild from the run's data"
        ) from exc
    return spec


def train(cfg: RunConfig, run_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Meta-train ``cfg`` into ``run_dir`` (default ``runs/<name>``) and return the run directory.

    Example:
        >>> from metaml.config import load_config
        >>> # run_dir = train(load_config("configs/maml-sinusoid.yaml"))
    """
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    if latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"{run_dir} already holds a run; resume it with metaml train --resume {run_dir}, or choose another --run-dir"
        )
    torch.manual_seed(cfg.seed)
    data = build_samplers(cfg, selection=True)
    device = resolve_device(cfg.device)
    learner = build_learner(cfg, data.train).to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    atomic_write_json(run_dir / SPEC_FILE, data.model_spec())
    _fit(cfg, learner, data, run_dir, device, quiet, resume=False)
    return run_dir


def resume(
    run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), quiet: bool = False
) -> Path:
    """Continue a run from its latest checkpoint; ``overrides`` may raise ``train.steps``.

    Example:
        >>> # resume("runs/maml-sinusoid", ["train.steps=2000"])
    """
    run_dir = Path(run_dir)
    if latest_checkpoint(run_dir) is None:
        raise UserError(
            f"{run_dir} has no checkpoint to resume; start a new run with metaml train CONFIG"
        )
    cfg = read_config(run_dir, overrides)
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    data = build_samplers(cfg, selection=True)
    device = resolve_device(cfg.device)
    learner = build_learner(cfg, data.train).to(device)
    _fit(cfg, learner, data, run_dir, device, quiet, resume=True)
    return run_dir


def read_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The resolved config saved in a run directory, with optional ``key=value`` overrides.

    Example:
        >>> # read_config("runs/demo-maml").algorithm.name
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE}); give the folder metaml train wrote"
        )
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def build_learner(cfg: RunConfig, sampler: EpisodeSampler) -> MetaLearner:
    """The config's learner for tasks shaped like ``sampler``'s (also applies the config's CPU
    settings: ``threads`` and ``reuse_cpu_memory``)."""
    _apply_runtime(cfg)
    return create_learner(
        cfg,
        input_shape=sampler.input_shape,
        task_type=sampler.task_type,  # type: ignore[arg-type]
        ways=sampler.ways,
        num_classes=sampler.num_classes,
    )


def learner_from_spec(cfg: RunConfig, spec: dict[str, Any]) -> MetaLearner:
    """The config's untrained learner for the shapes a run's ``model.json`` records.

    Example:
        >>> from metaml.config import load_config
        >>> spec = {"input_shape": [1], "task_type": "regression", "ways": 1, "num_classes": 0}
        >>> type(learner_from_spec(load_config(None), spec)).__name__
        'MAML'
    """
    return create_learner(
        cfg,
        input_shape=tuple(spec["input_shape"]),
        task_type=spec["task_type"],
        ways=spec["ways"],
        num_classes=spec["num_classes"],
    )


def load_learner(
    run_dir: str | Path, checkpoint: str = "best", device: str = "auto"
) -> MetaLearner:
    """The trained learner of a run, ready to ``adapt``: ``checkpoint`` is ``best`` or ``last``.

    ``best`` falls back to the last checkpoint when no validation ran.

    Example:
        >>> # learner = load_learner("runs/demo-protonet"); predictor = learner.adapt(sx, sy)
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    spec = read_model_spec(run_dir)
    if spec is None:  # a run written before model.json existed: rebuild the shapes from its data
        spec = build_samplers(cfg).model_spec()
    _apply_runtime(cfg)
    learner = learner_from_spec(cfg, spec)
    load_checkpoint(_checkpoint_file(run_dir, checkpoint), learner, restore_rng=False)
    return learner.to(resolve_device(device)).eval()


# torch's own choice (the physical cores it may use), read before any run config changes it.
_DEFAULT_THREADS = torch.get_num_threads()


def _apply_runtime(cfg: RunConfig) -> None:
    """The process-wide CPU settings a run asks for: torch's threads and memory reuse."""
    if cfg.reuse_cpu_memory:
        reuse_cpu_memory()
    task_threads: int = getattr(cfg.algorithm, "task_threads", 1)
    if cfg.threads is not None:
        # Small models (the sinusoid MLP) run fastest on one thread; oversubscribed threads
        # on a busy machine can make them 10-30x slower.
        torch.set_num_threads(cfg.threads)
    elif task_threads > 1:
        share_cores(task_threads)


def share_cores(task_threads: int) -> int:
    """Give each of ``task_threads`` task threads its share of torch's default intra-op thread
    count (the process's count when metaml was imported); returns the count set.

    Every task thread runs its own intra-op threads, so more would oversubscribe the CPU; with
    one task thread this restores the default.

    Example:
        >>> share_cores(1) == _DEFAULT_THREADS
        True
    """
    threads = max(1, _DEFAULT_THREADS // task_threads)
    torch.set_num_threads(threads)
    return threads


def _checkpoint_file(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in ("best", "last"):
        raise UserError(f"unknown checkpoint {checkpoint!r}; use best or last")
    best = run_dir / "checkpoints" / "best.json"
    if checkpoint == "best" and best.is_file():
        return best
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(
            f"{run_dir} has no checkpoint; train it first with metaml train CONFIG --run-dir {run_dir}"
        )
    return latest


def hard_tracker(cfg: RunConfig, sampler: EpisodeSampler) -> HardClassTracker | None:
    """The tracker of ``data.task_selection=hard`` with the config's options; None otherwise.

    Example:
        >>> from metaml.config import load_config
        >>> hard_tracker(load_config(None), build_samplers(load_config(None)).train) is None
        True
    """
    if cfg.data.task_selection != "hard":
        return None
    from metaml.taskrep.selection import HardClassTracker  # lazy: heavier

    o = cfg.data.selection
    return HardClassTracker(
        sampler.num_classes,
        decay=0.9 if o.decay is None else o.decay,
        uniform_mix=0.1 if o.uniform_mix is None else o.uniform_mix,
    )


def _fit(
    cfg: RunConfig,
    learner: MetaLearner,
    data: RunData,
    run_dir: Path,
    device: torch.device,
    quiet: bool,
    resume: bool,
) -> None:
    started = time.perf_counter()
    trainer = Trainer(
        learner, data.train, data.val, cfg.train, run_dir, device, quiet=quiet,
        tracker=hard_tracker(cfg, data.train), tracker_every=cfg.data.selection.update_every or 10,
    )  # fmt: skip
    (trainer.resume() if resume else trainer).fit()
    if not quiet:
        print(f"trained {cfg.name} in {time.perf_counter() - started:.0f} s -> {run_dir}")
