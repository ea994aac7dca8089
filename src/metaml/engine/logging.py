"""Training metrics as JSON lines: ``RUN_DIR/metrics.jsonl``, one object per logged step.

Each line holds ``step`` and whatever was measured at that step: the training ``loss``, the
learner's own metrics (``acc``, ``mse``, ...), ``lr``, ``time`` (seconds of training so far)
and, on validation steps, ``val_<metric>`` and ``val_<metric>_ci95``. Lines are appended and
flushed one at a time, so a killed run loses at most the line it was writing; readers skip such
a torn line, and a resumed run first drops every line after the step it resumes from.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> with MetricsLogger(path) as log:
    ...     log.log({"step": 1, "loss": 0.5})
    ...     log.log({"step": 2, "loss": 0.25})
    >>> [r["loss"] for r in read_metrics(path)]
    [0.5, 0.25]
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from metaml.io import atomic_write_text


class MetricsLogger:
    """Append JSON records to a ``.jsonl`` file, flushing after each one.

    Example:
        >>> import tempfile, pathlib
        >>> log = MetricsLogger(pathlib.Path(tempfile.mkdtemp()) / "m.jsonl")
        >>> log.log({"step": 10, "loss": 1.0})
        >>> log.truncate_after(5)
        0
        >>> log.close()
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record as a line and flush it to the OS."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drop records after ``step`` (and torn lines); return how many stay."""
        self.close()
        return truncate_metrics(self.path, step)

    def close(self) -> None:
        """Close the file; a later :meth:`log` reopens it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, in order; a missing file gives ``[]``, torn lines are skipped.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
        >>> _ = p.write_text('{"step": 1}\\n{"step": 2, "lo')
        >>> read_metrics(p)
        [{'step': 1}]
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed process
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Rewrite ``path`` (atomically) without records after ``step``; return how many stay.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
        >>> _ = p.write_text('{"step": 1}\\n{"step": 2}\\n')
        >>> truncate_metrics(p, 1), read_metrics(p)
        (1, [{'step': 1}])
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)
