"""Tasks: a support set and a query set drawn from one problem.

``Task`` is one episode; ``TaskBatch`` stacks ``B`` episodes of the same shape so that a
meta-learner can process them together (``support_x`` is ``(B, N*K, ...)``). Labels are
remapped to ``0..N-1`` inside each task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Task:
    """One episode: ``support_x (N*K, ...)``, ``support_y (N*K,)``, ``query_x``, ``query_y``.

    Example:
        >>> t = Task(torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(10, 1), torch.zeros(10, 1))
        >>> t.support_x.shape[0], t.query_x.shape[0]
        (5, 10)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> Task:
        """The same task on ``device``."""
        return Task(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.support_x, self.support_y, self.query_x, self.query_y)


@dataclass(frozen=True)
class TaskBatch:
    """``B`` tasks stacked: ``support_x (B, N*K, ...)``, ``support_y (B, N*K)``, ``query_x``, ``query_y``.

    Example:
        >>> tasks = [Task(torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(10, 1), torch.zeros(10, 1))] * 3
        >>> batch = TaskBatch.stack(tasks)
        >>> batch.support_x.shape, len(batch)
        (torch.Size([3, 5, 1]), 3)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @staticmethod
    def stack(tasks: list[Task]) -> TaskBatch:
        """Stack tasks of equal shape into one batch."""
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
        )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, index: int) -> Task:
        """The ``index``-th task of the batch."""
        return Task(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch on ``device``."""
        return TaskBatch(
            self.support_x.to(device, non_blocking=True),
            self.support_y.to(device, non_blocking=True),
            self.query_x.to(device, non_blocking=True),
            self.query_y.to(device, non_blocking=True),
        )
