"""Meta-learners, created from a run config by :func:`create_learner`.

Every learner implements :class:`~metaml.algorithms.base.MetaLearner`: ``meta_loss(batch)`` for
training and ``adapt(support_x, support_y)`` for use.
"""

from __future__ import annotations

from metaml.algorithms.base import MetaLearner, Predictor, TaskType
from metaml.algorithms.finetune import Baseline
from metaml.algorithms.gbml import ANIL, FOMAML, MAML, MetaSGD
from metaml.algorithms.mann import MANN
from metaml.algorithms.protonet import ProtoNet
from metaml.algorithms.reptile import Reptile
from metaml.config import RunConfig
from metaml.errors import UserError
from metaml.nn import create_backbone

LEARNERS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "metasgd": MetaSGD,
    "anil": ANIL,
    "reptile": Reptile,
    "protonet": ProtoNet,
    "baseline": Baseline,
    "mann": MANN,
}
# Metric-based learners embed; the others adapt a network whose head outputs the task's targets.
_EMBEDDING_LEARNERS = {"protonet", "baseline"}


def create_learner(
    cfg: RunConfig,
    input_shape: tuple[int, ...],
    task_type: TaskType,
    ways: int,
    num_classes: int = 0,
) -> MetaLearner:
    """Build the learner a run config describes, for inputs of ``input_shape``.

    Gradient-based learners get a backbone whose head has ``ways`` outputs (1 for regression);
    metric learners and the baseline get the bare backbone (features), the baseline with a
    ``num_classes``-way pre-training head.

    Example:
        >>> from metaml.config import load_config
        >>> learner = create_learner(load_config(None), (1,), "regression", ways=1)
        >>> type(learner).__name__
        'MAML'
    """
    name = cfg.algorithm.name
    kwargs = cfg.algorithm.model_dump(exclude={"name"})
    if name == "mann":  # reads the flattened input itself: no backbone
        return MANN(None, task_type=task_type, ways=ways, input_shape=input_shape, **kwargs)
    if name in _EMBEDDING_LEARNERS:
        backbone = create_backbone(
            cfg.model.backbone, in_shape=input_shape, num_outputs=0, **cfg.model.backbone_options
        )
        if name == "baseline":
            if task_type != "classification" or num_classes < 2:
                raise UserError(
                    "the baseline pre-trains a classifier; it needs a class dataset, not a task family"
                )
            return Baseline(backbone, num_classes=num_classes, **kwargs)
        return LEARNERS[name](backbone, **kwargs)
    outputs = ways if task_type == "classification" else 1
    model = create_backbone(
        cfg.model.backbone, in_shape=input_shape, num_outputs=outputs, **cfg.model.backbone_options
    )
    return LEARNERS[name](model, task_type=task_type, **kwargs)


__all__ = [
    "ANIL",
    "FOMAML",
    "LEARNERS",
    "MAML",
    "Baseline",
    "MetaLearner",
    "MetaSGD",
    "Predictor",
    "ProtoNet",
    "Reptile",
    "create_learner",
]
