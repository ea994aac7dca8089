"""The knowledge base of trained models, found again by task similarity (see :mod:`.store`).

Names are imported lazily, so that ``metaml --help`` (which registers ``metaml kb``) stays fast.

Example:
    >>> import tempfile, numpy as np
    >>> from metaml.kb import KnowledgeBase
    >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
    >>> kb.add({"w": np.ones(1, np.float32)}, representation=np.zeros(3)).id
    1
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaml.kb.store import SCHEMA_VERSION, Entry, KnowledgeBase, Neighbor, Problem
    from metaml.kb.warmstart import WarmStart

_EXPORTS = {
    "SCHEMA_VERSION": "metaml.kb.store",
    "Entry": "metaml.kb.store",
    "KnowledgeBase": "metaml.kb.store",
    "Neighbor": "metaml.kb.store",
    "Problem": "metaml.kb.store",
    "WarmStart": "metaml.kb.warmstart",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metaml.kb' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = ["SCHEMA_VERSION", "Entry", "KnowledgeBase", "Neighbor", "Problem", "WarmStart"]
