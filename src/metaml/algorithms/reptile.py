"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

Per task ``i``: ``φ_i`` = ``inner_steps`` of SGD or Adam on the support set, from ``θ``.
Outer update: ``θ ← θ + ε · mean_i(φ_i − θ)``.

The update is expressed as a loss so that Reptile runs in the standard trainer: ``meta_loss``
returns a surrogate whose gradient w.r.t. ``θ`` is exactly ``θ − mean_i φ_i``. One step of
``torch.optim.SGD(lr=ε)`` then gives ``θ − ε(θ − φ̄) = θ + ε(φ̄ − θ)``, Reptile's interpolation.
(With Adam as the outer optimizer, Adam is applied to the Reptile direction, as the paper's
"Reptile with Adam" variant.) The *value* of the returned loss is the mean query loss at the
adapted parameters, so logs show a meaningful number.

Example:
    >>> from metaml.nn import create_backbone
    >>> from metaml.tasks import TaskBatch
    >>> reptile = Reptile(create_backbone("mlp"), task_type="regression", inner_steps=3)
    >>> batch = TaskBatch(*(torch.randn(4, 10, 1) for _ in range(4)))
    >>> loss, metrics = reptile.meta_loss(batch)
    >>> loss.backward(); sorted(metrics)
    ['loss', 'mse']
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor, TaskType, task_score
from metaml.algorithms.gbml import task_loss
from metaml.errors import UserError
from metaml.functional import (
    Params,
    adam_init,
    adam_step,
    functional_call,
    inner_gradients,
    map_tasks,
    sgd_step,
    use_batch_statistics_,
)
from metaml.tasks import TaskBatch

__all__ = ["Reptile"]

#: Reptile's inner Adam uses β1 = 0 (Nichol et al. 2018, §6: momentum hurt in the inner loop).
INNER_ADAM_BETAS = (0.0, 0.999)


class Reptile(MetaLearner):
    """Reptile: move the initialisation towards each task's adapted weights (see module doc).

    Args:
        model: a network with a head producing the task's outputs.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        inner_lr, inner_steps: the inner optimizer's rate and number of steps.
        test_inner_steps: steps in :meth:`adapt` (default ``inner_steps``).
        inner_optimizer: ``"sgd"`` or ``"adam"`` (β1 = 0, bias-corrected, fresh per task).
        inner_batch_size: minibatch of the support set per inner step (default: all of it);
            batches cycle through random permutations shared by the tasks of a meta-batch.
        batched: adapt all tasks of a meta-batch at once with ``vmap`` (else a Python loop).

    BatchNorm layers are switched to batch statistics, so the support set is normalised with
    its own statistics while adapting and each query batch with its own when predicting.

    Example:
        >>> from metaml.nn import create_backbone
        >>> reptile = Reptile(create_backbone("mlp"), task_type="regression", inner_optimizer="sgd")
        >>> reptile.adapt(torch.randn(10, 1), torch.randn(10, 1))(torch.randn(3, 1)).shape
        torch.Size([3, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: TaskType = "classification",
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        test_inner_steps: int | None = None,
        inner_optimizer: Literal["sgd", "adam"] = "adam",
        inner_batch_size: int | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise UserError(
                f"task_type must be 'classification' or 'regression', got {task_type!r}"
            )
        if inner_optimizer not in ("sgd", "adam"):
            raise UserError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if (
            not inner_lr > 0
            or inner_steps < 1
            or (inner_batch_size is not None and inner_batch_size < 1)
        ):
            raise UserError(
                f"need inner_lr > 0, inner_steps >= 1 and inner_batch_size >= 1, got "
                f"{inner_lr}, {inner_steps}, {inner_batch_size}"
            )
        self.model = use_batch_statistics_(model)
        self.task_type = task_type
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.test_inner_steps = test_inner_steps
        self.inner_optimizer = inner_optimizer
        self.inner_batch_size = inner_batch_size
        self.batched = batched

    def _minibatches(self, n: int, steps: int, device: torch.device) -> list[Tensor] | None:
        """Support indices for each inner step, cycling through random permutations."""
        size = self.inner_batch_size
        if size is None or size >= n:
            return None
        epochs = -(-steps * size // n)  # ceil
        order = torch.cat([torch.randperm(n, device=device) for _ in range(epochs)])
        return [order[i * size : (i + 1) * size] for i in range(steps)]

    def _adapt_task(
        self, sx: Tensor, sy: Tensor, steps: int, batches: list[Tensor] | None
    ) -> Params:
        """``φ``: the model parameters after ``steps`` inner optimizer steps on one support set."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        state = adam_init(params)
        for step in range(steps):
            x, y = (sx, sy) if batches is None else (sx[batches[step]], sy[batches[step]])

            def loss_at(p: Params, _: int, x: Tensor = x, y: Tensor = y) -> Tensor:
                return task_loss(self.task_type, functional_call(self.model, p, (x,)), y)

            grads = inner_gradients(loss_at, params, step)
            if self.inner_optimizer == "adam":
                params, state = adam_step(params, grads, state, self.inner_lr, INNER_ADAM_BETAS)
            else:
                params = sgd_step(params, grads, self.inner_lr)
        return params

    exposes_query_outputs = True

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """A surrogate with gradient ``θ − mean_i φ_i`` and value = mean query loss at ``φ_i``.

        Example:
            >>> from metaml.nn import create_backbone
            >>> r = Reptile(create_backbone("mlp"), task_type="regression", batched=False)
            >>> r.meta_loss(TaskBatch(*(torch.randn(2, 5, 1) for _ in range(4))))[1]["loss"] > 0
            True
        """
        loss, metrics, _ = self.meta_loss_with_outputs(batch)
        return loss, metrics

    def meta_loss_with_outputs(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`meta_loss` and the query outputs ``(B, Q, outputs)`` at each task's ``φ_i``.

        Example:
            >>> from metaml.nn import create_backbone
            >>> r = Reptile(create_backbone("mlp"), task_type="regression", batched=False)
            >>> r.meta_loss_with_outputs(TaskBatch(*(torch.randn(2, 5, 1) for _ in range(4))))[2].shape
            torch.Size([2, 5, 1])
        """
        batches = self._minibatches(
            batch.support_x.shape[1], self.inner_steps, batch.support_x.device
        )

        def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor, Tensor]:
            phi = self._adapt_task(sx, sy, self.inner_steps, batches)
            outputs = functional_call(self.model, phi, (qx,))
            return phi, task_loss(self.task_type, outputs, qy), outputs

        tensors = [batch.support_x, batch.support_y, batch.query_x, batch.query_y]
        with torch.no_grad():
            # phis: name -> (B, *shape); losses (B,); outputs (B, Q, outputs)
            phis, losses, outputs = map_tasks(task, tensors, "vmap" if self.batched else "loop")
        theta = dict(self.model.named_parameters())
        surrogate = torch.stack(
            [(p * (p.detach() - phis[n].mean(0))).sum() for n, p in theta.items()]
        ).sum()
        query_loss = losses.mean()
        loss = query_loss + surrogate - surrogate.detach()  # value: query loss; grad: θ − φ̄
        metric = "acc" if self.task_type == "classification" else "mse"
        score = task_score(self.task_type, outputs.flatten(0, 1), batch.query_y.flatten(0, 1))
        return loss, {"loss": query_loss.item(), metric: score}, outputs

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Run the inner optimizer on the support set; returns ``query_x -> outputs``.

        ``steps`` defaults to ``test_inner_steps`` (else ``inner_steps``); no graph is built.

        Example:
            >>> from metaml.nn import create_backbone
            >>> r = Reptile(create_backbone("mlp"), task_type="regression")
            >>> r.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=2)(torch.randn(4, 1)).shape
            torch.Size([4, 1])
        """
        if steps is None:
            steps = self.inner_steps if self.test_inner_steps is None else self.test_inner_steps
        with torch.no_grad():
            batches = self._minibatches(support_x.shape[0], steps, support_x.device)
            phi = self._adapt_task(support_x, support_y, steps, batches)

        def predict(query_x: Tensor) -> Tensor:
            return functional_call(self.model, phi, (query_x,))

        return predict
