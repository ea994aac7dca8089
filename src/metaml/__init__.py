"""metaml: meta-learning for PyTorch and scikit-learn.

Train on many related tasks so that a new task is learned from a handful of examples.
The public API is re-exported flat and imported lazily, so ``metaml --help`` stays fast.

Example:
    >>> import metaml
    >>> sampler = metaml.EpisodeSampler(metaml.data.load("sinusoid"), shots=5, queries=10, seed=0)
    >>> sampler.episode(0).support_x.shape
    torch.Size([5, 1])
"""

from __future__ import annotations

import importlib
from typing import Any

from metaml.errors import UserError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "data": "metaml",
    "Task": "metaml.tasks",
    "TaskBatch": "metaml.tasks",
    "EpisodeSampler": "metaml.tasks",
    "RunConfig": "metaml.config",
    "load_config": "metaml.config",
    "resolve_device": "metaml.device",
    "reuse_cpu_memory": "metaml.device",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metaml' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (
        importlib.import_module(f"metaml.{name}")
        if module == "metaml"
        else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["UserError", "__version__", *_EXPORTS]
