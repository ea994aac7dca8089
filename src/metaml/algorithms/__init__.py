"""Meta-learners, created from a run config by :func:`create_learner`.

Every learner implements :class:`~metaml.algorithms.base.MetaLearner`: ``meta_loss(batch)`` for
training and ``adapt(support_x, support_y)`` for use.
"""

from __future__ import annotations

import inspect
from typing import Any

from metaml.algorithms.base import MetaLearner, Predictor, TaskType
from metaml.algorithms.gbml import ANIL, FOMAML, MAML, MetaSGD
from metaml.algorithms.protonet import ProtoNet
from metaml.algorithms.reptile import Reptile
from metaml.config import RunConfig
from metaml.nn import create_backbone

LEARNERS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "metasgd": MetaSGD,
    "anil": ANIL,
    "reptile": Reptile,
    "protonet": ProtoNet,
}
# Metric-based learners embed; the others adapt a network whose head outputs the task's targets.
_EMBEDDING_LEARNERS = {"protonet"}


def create_learner(cfg: RunConfig, input_shape: tuple[int, ...], task_type: TaskType, ways: int) -> MetaLearner:
    """Build the learner a run config describes, for inputs of ``input_shape``.

    Gradient-based learners get a backbone whose head has ``ways`` outputs (1 for regression)
    and BatchNorm that always uses the current batch's statistics, as the original MAML does.

    Example:
        >>> from metaml.config import load_config
        >>> learner = create_learner(load_config(None), (1,), "regression", ways=1)
        >>> type(learner).__name__
        'MAML'
    """
    name = cfg.algorithm.name
    options: dict[str, Any] = dict(cfg.model.backbone_options)
    if name in _EMBEDDING_LEARNERS:
        backbone = create_backbone(cfg.model.backbone, in_shape=input_shape, num_outputs=0, **options)
    else:
        outputs = ways if task_type == "classification" else 1
        if "track_running_stats" in inspect.signature(_backbone_factory(cfg.model.backbone)).parameters:
            options.setdefault("track_running_stats", False)
        backbone = create_backbone(cfg.model.backbone, in_shape=input_shape, num_outputs=outputs, **options)
    kwargs = cfg.algorithm.model_dump(exclude={"name"})
    if name in _EMBEDDING_LEARNERS:
        return LEARNERS[name](backbone, **kwargs)
    return LEARNERS[name](backbone, task_type=task_type, **kwargs)


def _backbone_factory(name: str) -> Any:
    from metaml.nn.backbones import backbone_factory

    return backbone_factory(name)


__all__ = ["ANIL", "FOMAML", "LEARNERS", "MAML", "MetaLearner", "MetaSGD", "Predictor", "ProtoNet", "Reptile", "create_learner"]
