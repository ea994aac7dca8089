"""The interface every meta-learner implements.

Training, evaluation, the CLI and the knowledge base talk to this and nothing else:

* ``meta_loss(batch) -> (loss, metrics)``: the outer loss on a :class:`~metaml.tasks.TaskBatch`;
  the trainer calls ``loss.backward()`` and steps its optimizer on ``learner.parameters()``.
* ``adapt(support_x, support_y, steps=None) -> predictor``: learn one task from its support set;
  the predictor maps query inputs to logits ``(n, ways)`` (classification) or outputs
  ``(n, d)`` (regression).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from metaml.errors import UserError
from metaml.tasks import TaskBatch

Predictor = Callable[[Tensor], Tensor]
TaskType = Literal["classification", "regression"]


class MetaLearner(nn.Module, ABC):
    """Base class of meta-learners.

    Subclasses set ``task_type`` and implement :meth:`meta_loss` and :meth:`adapt`.

    Example:
        >>> class Mean(MetaLearner):
        ...     task_type = "regression"
        ...     def meta_loss(self, batch):
        ...         raise NotImplementedError
        ...     def adapt(self, support_x, support_y, steps=None):
        ...         m = support_y.mean(0)
        ...         return lambda x: m.expand(x.shape[0], -1)
        >>> Mean().adapt(torch.zeros(3, 1), torch.ones(3, 1))(torch.zeros(2, 1)).tolist()
        [[1.0], [1.0]]
    """

    task_type: TaskType = "classification"
    #: Whether :meth:`meta_loss_with_outputs` works (``hard`` task selection needs it).
    exposes_query_outputs: bool = False

    @abstractmethod
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """The meta-training loss on a batch of tasks and metrics to log (``loss``, ``acc``/``mse``)."""

    def meta_loss_with_outputs(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`meta_loss` plus the query outputs ``(B, Q, ways)`` it computed, detached.

        The trainer's ``hard`` task selection reads each class's query errors from them at no
        extra cost. Learners that override this set ``exposes_query_outputs = True``.

        Example:
            >>> # loss, metrics, outputs = protonet.meta_loss_with_outputs(batch)
            >>> # outputs.argmax(-1) == batch.query_y   # which queries were right
        """
        raise UserError(
            f"{type(self).__name__} does not expose its query outputs during meta-training, which "
            "task_selection='hard' needs; use ProtoNet, Reptile or a MAML-family learner, or another task_selection"
        )

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Learn one task from its support set and return a predictor for its queries."""

    def score(self, outputs: Tensor, targets: Tensor) -> float:
        """The task metric: accuracy for classification, mean squared error for regression.

        Example:
            >>> class L(MetaLearner):
            ...     def meta_loss(self, batch): ...
            ...     def adapt(self, sx, sy, steps=None): ...
            >>> L().score(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
            0.5
        """
        return task_score(self.task_type, outputs, targets)


def task_score(task_type: TaskType, outputs: Tensor, targets: Tensor) -> float:
    """Accuracy (classification) or MSE (regression) of ``outputs`` against ``targets``.

    Example:
        >>> task_score("regression", torch.tensor([[1.0]]), torch.tensor([[3.0]]))
        4.0
    """
    with torch.no_grad():
        if task_type == "classification":
            return (outputs.argmax(-1) == targets).float().mean().item()
        return torch.mean((outputs - targets) ** 2).item()
