"""The meta-training engine: the training loop, checkpoints and metric logs.

Example:
    >>> from metaml.engine import Trainer, latest_checkpoint, read_metrics
    >>> # summary = Trainer(learner, train_sampler, val_sampler, cfg.train, run_dir).fit()
    >>> # summary = Trainer(learner, train_sampler, val_sampler, cfg.train, run_dir).resume().fit()
"""

from metaml.engine.checkpoint import (
    CheckpointState,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    require_checkpoint,
    save_checkpoint,
)
from metaml.engine.logging import MetricsLogger, read_metrics, truncate_metrics
from metaml.engine.trainer import Trainer, TrainingDiverged, is_better, lr_factor, make_optimizer

__all__ = [
    "CheckpointState",
    "MetricsLogger",
    "Trainer",
    "TrainingDiverged",
    "checkpoint_dir",
    "is_better",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "read_metrics",
    "require_checkpoint",
    "save_checkpoint",
    "truncate_metrics",
]
