"""The meta-training loop.

One step, in order::

    batch = train_sampler.batch(step).to(device)     # step = updates done so far
    loss, metrics = learner.meta_loss(batch)        # NaN/inf here -> TrainingDiverged
    loss.backward(); clip; set lr; optimizer.step()  # meta_loss under bf16 autocast if asked
    step += 1
    hard task selection: fold the batch's query errors into the tracker; every
    tracker_every steps, set the sampler's class weights from it
    log every log_every, validate every val_every (and at train.steps), checkpoint every
    checkpoint_every (and when fit returns)

Step ``s`` (1-based, the number of optimizer updates done) trains on ``train_sampler.batch(s - 1)``
and the sampler is a pure function of ``(seed, index)``, so the step number *is* the sampler
position. The learning rate is computed from the step (no scheduler state), validation runs
under a forked RNG (it never moves the training random stream), and a checkpoint stores the
weights, Adam's moments and step counters, every global RNG, and the training sampler's task
selection (class weights and the hard-selection tracker's error rates). Together these make a run
stopped at any checkpoint and resumed bitwise identical, on the same device and thread count,
to a run that never stopped.

Resuming is explicit: ``Trainer(...).resume().fit()``. A fresh :meth:`Trainer.fit` refuses a
run directory that already holds a checkpoint, so a typo in a run name cannot silently
continue (or clobber) another run.

Example:
    >>> # trainer = Trainer(learner, train_sampler, val_sampler, cfg.train, Path("runs/a"), "cpu")
    >>> # summary = trainer.fit()                      # a new run
    >>> # summary = Trainer(...same arguments...).resume().fit()   # after a crash
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer
from tqdm.auto import tqdm

from metaml.algorithms.base import MetaLearner
from metaml.config import TrainConfig
from metaml.device import has_fast_bf16
from metaml.engine.checkpoint import (
    checkpoint_dir,
    discard_after,
    latest_checkpoint,
    load_checkpoint,
    remove_temporary_files,
    require_checkpoint,
    save_checkpoint,
)
from metaml.engine.logging import MetricsLogger
from metaml.errors import UserError
from metaml.evaluate import evaluate
from metaml.tasks import Task, TaskBatch


class BatchSampler(Protocol):
    """What the trainer needs from a training sampler (``metaml.EpisodeSampler`` fits)."""

    seed: int

    def batch(self, index: int) -> TaskBatch: ...


class ClassTracker(Protocol):
    """What ``hard`` task selection needs (``metaml.taskrep.HardClassTracker`` fits)."""

    error: Any

    def observe(self, classes: Tensor, query_y: Tensor, logits: Tensor) -> None: ...

    def weights(self) -> Any: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class EpisodeSource(Protocol):
    """What validation needs from a sampler: fixed, seeded episodes."""

    seed: int

    def episode(self, index: int) -> Task: ...


class TrainingDiverged(UserError):
    """The loss, gradient or weights became NaN or infinite; no checkpoint of them was written.

    ``step`` is the step at which it happened; ``last_good`` the JSON of the newest checkpoint
    (``None`` when none was written yet).

    Example:
        >>> str(TrainingDiverged("loss", float("nan"), 37, None, None)).split(";")[0]
        'loss became nan at step 37'
    """

    def __init__(
        self, what: str, value: float, step: int, last_good: Path | None, grad_clip: float | None
    ):
        self.step = step
        self.last_good = last_good
        good = f"the last good checkpoint is {last_good.stem}" if last_good else "no checkpoint yet"
        clip = "train.grad_clip" if grad_clip else "set train.grad_clip"
        super().__init__(f"{what} became {value} at step {step}; {good}; lower train.lr or {clip}")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier for the update after ``step`` updates out of ``total``.

    ``constant`` is 1; ``linear`` decays from 1 to 0; ``cosine`` follows half a cosine from 1 to 0.

    Example:
        >>> lr_factor("linear", 50, 100), lr_factor("cosine", 50, 100), lr_factor("constant", 9, 10)
        (0.5, 0.5, 1.0)
    """
    progress = min(step / total, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(params: Sequence[Tensor], config: TrainConfig) -> Optimizer:
    """The optimizer ``config.optimizer`` names (SGD is plain: no momentum).

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(2))]
        >>> type(make_optimizer(p, TrainConfig(optimizer="adamw"))).__name__
        'AdamW'
    """
    if config.optimizer == "adam":
        return Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether a validation ``value`` beats ``best``: higher accuracy, lower anything else (mse).

    Example:
        >>> is_better("accuracy", 0.9, 0.8), is_better("mse", 0.9, 0.8), is_better("mse", 1.0, None)
        (True, False, True)
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if metric == "accuracy" else value < best


def _selection_mode(sampler: object) -> str:
    """The sampler's ``task_selection`` (``"uniform"`` for samplers without one)."""
    return str(getattr(sampler, "task_selection", "uniform"))


def _hard_selection_tracker(
    learner: MetaLearner, sampler: object, tracker: ClassTracker | None
) -> ClassTracker | None:
    """The tracker of ``hard`` selection (a default one if none is given), checked; else None."""
    mode = _selection_mode(sampler)
    if mode != "hard":
        if tracker is not None:
            raise UserError(
                f"a tracker drives task_selection='hard'; the training sampler's is {mode!r}"
            )
        return None
    if not getattr(learner, "exposes_query_outputs", False):
        raise UserError(
            f"task_selection='hard' reads the learner's query outputs during meta-training; "
            f"{type(learner).__name__} does not expose them: use ProtoNet, Reptile or a MAML-family "
            "learner, or task_selection='uniform' or 'nearest'"
        )
    num_classes = int(getattr(sampler, "num_classes", 0))
    if tracker is None:
        from metaml.taskrep.selection import HardClassTracker  # lazy: taskrep is heavier

        return HardClassTracker(num_classes)
    if len(tracker.error) != num_classes:
        raise UserError(
            f"the tracker follows {len(tracker.error)} classes, the sampler draws from {num_classes}; "
            "build it with HardClassTracker(sampler.num_classes)"
        )
    return tracker


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class Trainer:
    """Meta-train ``learner`` on ``train_sampler`` batches; validate on ``val_sampler`` episodes.

    Writes ``RUN_DIR/metrics.jsonl`` (see :mod:`metaml.engine.logging`) and
    ``RUN_DIR/checkpoints/`` (see :mod:`metaml.engine.checkpoint`), including
    ``best.safetensors``/``best.json`` for the best validation score. ``metric_name`` picks
    which of ``meta_loss``'s metrics the progress bar shows next to the loss (default: the
    first one that is not ``loss``). ``device`` defaults to where the learner's parameters are.

    With a training sampler whose ``task_selection`` is ``"hard"``, ``tracker`` (default: a
    :class:`~metaml.taskrep.HardClassTracker` with its default options) folds in each batch's
    query errors per dataset class, read from ``learner.meta_loss_with_outputs`` (the outputs the
    meta-loss computed anyway: no extra forward pass), and every ``tracker_every`` steps the
    sampler's class weights are set from it. Both are saved with every checkpoint.

    Example:
        >>> # summary = Trainer(learner, train, val, TrainConfig(steps=1000), Path("runs/a")).fit()
        >>> # summary["step"], summary["best_value"]
    """

    def __init__(
        self,
        learner: MetaLearner,
        train_sampler: BatchSampler,
        val_sampler: EpisodeSource | None,
        config: TrainConfig,
        run_dir: str | Path,
        device: torch.device | str | None = None,
        quiet: bool = False,
        metric_name: str | None = None,
        tracker: ClassTracker | None = None,
        tracker_every: int = 10,
    ):
        self.learner = learner
        self.train_sampler = train_sampler
        self.val_sampler = val_sampler
        self.config = config
        self.run_dir = Path(run_dir)
        if device is None:
            device = next(learner.parameters()).device
        self.device = torch.device(device)
        self.quiet = quiet
        self.metric_name = metric_name
        self.params = [p for p in learner.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config)
        self.metrics = MetricsLogger(self.run_dir / "metrics.jsonl")
        self.step = 0  # optimizer updates done == index of the next training batch
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.elapsed = 0.0  # training seconds before this process (from the checkpoint)
        self.last_loss: float | None = None
        self._resumed = False
        self.tracker = _hard_selection_tracker(learner, train_sampler, tracker)
        if tracker_every < 1:
            raise UserError(f"tracker_every must be >= 1; got {tracker_every}")
        self.tracker_every = tracker_every
        if config.precision == "bf16" and not has_fast_bf16(self.device):
            warnings.warn(
                f"train.precision is bf16, but {self.device} has no bf16 units: torch emulates "
                "them, and training runs several times slower than in fp32 (8.5x for conv4 "
                "MAML on an AVX2 CPU). Use train.precision=fp32 here.",
                RuntimeWarning,
                stacklevel=2,
            )

    # --- public API ----------------------------------------------------------------------

    def resume(self) -> Trainer:
        """Load the newest good checkpoint of ``run_dir``; :meth:`fit` then continues from it.

        Raises :class:`UserError` when the run has no checkpoint.

        Example:
            >>> # Trainer(learner, train, val, cfg, Path("runs/a")).resume().fit()
        """
        path = require_checkpoint(self.run_dir)
        state = load_checkpoint(path, self.learner, self.optimizer)
        seed = getattr(self.train_sampler, "seed", None)
        if state.sampler_seed is not None and seed != state.sampler_seed:
            raise UserError(
                f"{path.name} was trained with sampler seed {state.sampler_seed}, "
                f"not {seed}; resume with the run's own config.yaml"
            )
        self._restore_selection(state.selection, path)
        self.step = state.step
        self.best = state.best
        self.elapsed = float(state.metadata.get("elapsed", 0.0))
        self._resumed = True
        self._say(f"resuming {self.run_dir} from {path.stem}")
        return self

    def fit(self, steps: int | None = None) -> dict[str, Any]:
        """Train until ``steps`` updates are done (default ``config.steps``); return a summary.

        The learning-rate schedule always spans ``config.steps``, so ``fit(30)`` followed by
        ``resume().fit()`` equals one ``fit()``. The summary holds ``step``, ``loss`` (the last
        one), ``best_metric``, ``best_value``, ``best_step`` and ``checkpoint`` (JSON path).

        Example:
            >>> # Trainer(learner, train, val, TrainConfig(steps=100), Path("runs/a")).fit()["step"]
            >>> # 100
        """
        target = self.config.steps if steps is None else steps
        if target > self.config.steps:
            raise UserError(
                f"fit(steps={target}) is beyond train.steps={self.config.steps}; raise train.steps"
            )
        self._prepare_run_dir()
        self.learner.train()
        start_clock = time.perf_counter() - self.elapsed
        bar = tqdm(
            total=target, initial=self.step, desc="train", disable=self.quiet, dynamic_ncols=True
        )
        try:
            while self.step < target:
                metrics = self._train_step()
                self.elapsed = time.perf_counter() - start_clock
                self._after_step(metrics, bar)
                bar.update(1)
            if not self._has_checkpoint_at(self.step):
                self._save_checkpoint()
        finally:
            bar.close()
            self.metrics.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Where the run stands: step, last loss, best validation score and its step."""
        best = self.best or {}
        latest = latest_checkpoint(self.run_dir)
        return {
            "step": self.step,
            "loss": self.last_loss,
            "best_metric": best.get("metric"),
            "best_value": best.get("value"),
            "best_step": best.get("step"),
            "checkpoint": str(latest) if latest else None,
        }

    # --- one step ------------------------------------------------------------------------

    def _train_step(self) -> dict[str, float]:
        """One meta-update on batch ``self.step``; returns the learner's metrics plus loss/lr."""
        batch = self.train_sampler.batch(self.step).to(self.device)
        # bf16: matmuls and convolutions in bfloat16 (forward and backward), weights, optimizer
        # state and the loss in float32. Only worth it where the CPU or GPU has bf16 units.
        outputs: Tensor | None = None
        with torch.autocast(self.device.type, torch.bfloat16, self.config.precision == "bf16"):
            if self.tracker is None:
                loss, metrics = self.learner.meta_loss(batch)
            else:
                loss, metrics, outputs = self.learner.meta_loss_with_outputs(batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise self._diverged("loss", loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        record = {k: float(v) for k, v in metrics.items()}
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip).item()
            if not math.isfinite(norm):
                raise self._diverged("gradient norm", norm)
            record["grad_norm"] = norm
        lr = self.config.lr * lr_factor(self.config.scheduler, self.step, self.config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        self.last_loss = loss_value
        if outputs is not None:
            self._observe(batch, outputs)
        return {**record, "loss": loss_value, "lr": lr}

    def _observe(self, batch: TaskBatch, outputs: Tensor) -> None:
        """Hard selection: fold the batch's query errors in; refresh the class weights on time."""
        assert self.tracker is not None
        if batch.classes is None:
            raise UserError("task_selection='hard' needs batches that carry their classes")
        self.tracker.observe(batch.classes, batch.query_y, outputs.float())
        if self.step % self.tracker_every == 0:
            # Batch `step` (the next one) is the first drawn with the new weights; the
            # checkpoint saved after this step holds them, so a resume draws it alike.
            cast(Any, self.train_sampler).set_class_weights(self.tracker.weights())

    def _after_step(self, metrics: dict[str, float], bar: tqdm[Any]) -> None:
        """Log, validate and checkpoint when their intervals (or the end of training) come up."""
        step, cfg = self.step, self.config
        record: dict[str, Any] = {}
        if step % cfg.log_every == 0:
            record.update(metrics)
            bar.set_postfix(self._postfix(metrics), refresh=False)
        if self.val_sampler is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            record.update(self._validate())
        if record:
            self.metrics.log({"step": step, **record, "time": round(self.elapsed, 3)})
        if step % cfg.checkpoint_every == 0:
            self._save_checkpoint()

    def _validate(self) -> dict[str, float]:
        """Score ``val_tasks`` fixed episodes; save ``best`` when the score improves."""
        assert self.val_sampler is not None
        # Validation may draw random numbers (adapt, dropout); fork so training's stream is
        # the same whether or not (and however often) we validate.
        with torch.random.fork_rng(devices=_cuda_indices(self.device)):
            sampler = cast(Any, self.val_sampler)  # any object with .seed and .episode(i)
            result = evaluate(self.learner, sampler, self.config.val_tasks, device=self.device)
        self.learner.train()
        if is_better(result.metric, result.mean, (self.best or {}).get("value")):
            self.best = {"metric": result.metric, "value": result.mean, "step": self.step}
            self._save_checkpoint(name="best")
        return {f"val_{result.metric}": result.mean, f"val_{result.metric}_ci95": result.ci95}

    # --- checkpoints ---------------------------------------------------------------------

    def _save_checkpoint(self, name: str | None = None) -> Path:
        """Save the current state, refusing non-finite weights (they would poison a resume)."""
        self._check_finite_weights()
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.learner,
            self.optimizer,
            sampler_position=self.step,
            sampler_seed=getattr(self.train_sampler, "seed", None),
            best=self.best,
            metadata={
                "elapsed": self.elapsed,
                "learner": type(self.learner).__name__,
                "task_type": self.learner.task_type,
                "train": self.config.model_dump(mode="json"),
                "torch": torch.__version__,
            },
            name=name,
            keep=self.config.keep_checkpoints if name is None else None,
            selection=self._selection_state(),
        )

    def _selection_state(self) -> dict[str, Any] | None:
        """The training sampler's task selection and the tracker, as JSON; None when uniform."""
        if _selection_mode(self.train_sampler) == "uniform":
            return None  # checkpoints of uniform runs stay as they always were
        state: dict[str, Any] = cast(Any, self.train_sampler).selection_state()
        state["tracker"] = None if self.tracker is None else self.tracker.state()
        return state

    def _restore_selection(self, saved: dict[str, Any] | None, path: Path) -> None:
        """Put the sampler's class weights and the tracker back as the checkpoint holds them."""
        mode = _selection_mode(self.train_sampler)
        saved_mode = (saved or {}).get("task_selection", "uniform")
        if saved_mode != mode:
            raise UserError(
                f"{path.name} was trained with task_selection={saved_mode}, not {mode}; "
                "resume with the run's own config.yaml"
            )
        if saved is None:
            return
        cast(Any, self.train_sampler).load_selection_state(saved)
        if self.tracker is not None:
            self.tracker.load_state(saved.get("tracker") or {})

    def _check_finite_weights(self) -> None:
        for name, tensor in self.learner.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
                raise self._diverged(f"weight {name!r}", bad)

    def _has_checkpoint_at(self, step: int) -> bool:
        return (checkpoint_dir(self.run_dir) / f"step-{step}.json").exists()

    def _prepare_run_dir(self) -> None:
        """Refuse to start over an existing run; drop what a resumed run will redo."""
        if not self._resumed and self.step == 0 and (latest := latest_checkpoint(self.run_dir)):
            raise UserError(
                f"run directory {str(self.run_dir)!r} already has a checkpoint ({latest.stem}); "
                "resume it with metaml train --resume DIR, or train into a new directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_temporary_files(self.run_dir)
        # Checkpoints and metric lines after our step are from a future this run will rewrite
        # (or were corrupt); keeping them would mix two histories.
        discard_after(self.run_dir, self.step)
        self.metrics.truncate_after(self.step)
        if self.step == 0:  # a best checkpoint left by an earlier, abandoned start
            for suffix in (".json", ".safetensors"):
                (checkpoint_dir(self.run_dir) / f"best{suffix}").unlink(missing_ok=True)

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        # A bad loss or gradient comes before self.step += 1: report the step being taken.
        step = self.step + 1 if what in ("loss", "gradient norm") else self.step
        last_good = latest_checkpoint(self.run_dir)
        return TrainingDiverged(what, value, step, last_good, self.config.grad_clip)

    # --- output --------------------------------------------------------------------------

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        shown = {"loss": f"{metrics['loss']:.4f}"}
        own = [k for k in metrics if k not in ("loss", "lr", "grad_norm")]
        name = self.metric_name or next(iter(own), None)
        if name is not None and name in metrics:
            shown[name] = f"{metrics[name]:.4f}"
        return shown

    def _say(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)
