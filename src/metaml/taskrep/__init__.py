"""Task representations: a task's support set -> a fixed-length vector (see :mod:`.encoder`).

Example:
    >>> import torch
    >>> enc = TaskEncoder(input_shape=(1, 16, 16))
    >>> enc.encode(torch.rand(4, 1, 16, 16), torch.tensor([0, 0, 1, 1])).shape == (enc.dim,)
    True
"""

from __future__ import annotations

from metaml.taskrep.encoder import TaskEncoder, prototype_summary
from metaml.taskrep.selection import (
    HardClassTracker,
    class_examples,
    class_prototypes,
    nearest_class_weights,
)

__all__ = [
    "HardClassTracker",
    "TaskEncoder",
    "class_examples",
    "class_prototypes",
    "nearest_class_weights",
    "prototype_summary",
]
