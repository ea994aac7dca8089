"""The knowledge base of trained models, found again by task similarity (see :mod:`.store`).

Example:
    >>> import tempfile, numpy as np
    >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
    >>> kb.add({"w": np.ones(1, np.float32)}, representation=np.zeros(3)).id
    1
"""

from __future__ import annotations

from metaml.kb.store import SCHEMA_VERSION, Entry, KnowledgeBase, Neighbor, Problem

__all__ = ["SCHEMA_VERSION", "Entry", "KnowledgeBase", "Neighbor", "Problem"]
