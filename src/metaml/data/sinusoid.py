"""Sinusoid regression, the toy task family of the MAML paper (Finn et al., 2017, sec. 5.1).

Each task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; a learner sees ``shots`` points and is scored on
``queries`` more from the same curve.

Example:
    >>> import numpy as np
    >>> task = Sinusoid().sample(np.random.default_rng(0), shots=10, queries=5)
    >>> tuple(task.support_x.shape), tuple(task.query_y.shape)
    ((10, 1), (5, 1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from metaml.errors import UserError
from metaml.tasks import Task


@dataclass(frozen=True)
class SinusoidParams:
    """The parameters of one sinusoid task.

    Example:
        >>> SinusoidParams(amplitude=2.0, phase=0.0).amplitude
        2.0
    """

    amplitude: float
    phase: float


@dataclass(frozen=True)
class Sinusoid:
    """The MAML sinusoid task family (a :class:`~metaml.tasks.TaskFamily`).

    ``x`` and ``y`` are float32 ``(n, 1)``. The ranges are configurable for ablations; the
    defaults are the paper's.

    Example:
        >>> import numpy as np
        >>> fam = Sinusoid()
        >>> fam.task_type, fam.input_shape, fam.output_dim
        ('regression', (1,), 1)
        >>> t = fam.sample(np.random.default_rng(1), shots=5, queries=10)
        >>> bool(t.support_y.abs().max() <= 5.0)
        True
    """

    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    @property
    def task_type(self) -> str:
        """Always ``"regression"``."""
        return "regression"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One scalar input: ``(1,)``."""
        return (1,)

    @property
    def output_dim(self) -> int:
        """One scalar output."""
        return 1

    def __post_init__(self) -> None:
        for name in ("amplitude_range", "phase_range", "x_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise UserError(f"{name} must be (low, high) with low <= high; got {(lo, hi)}")

    def sample_params(self, rng: np.random.Generator) -> SinusoidParams:
        """Draw one task's amplitude and phase.

        Example:
            >>> import numpy as np
            >>> p = Sinusoid().sample_params(np.random.default_rng(0))
            >>> 0.1 <= p.amplitude <= 5.0 and 0 <= p.phase <= 3.1416
            True
        """
        return SinusoidParams(
            amplitude=float(rng.uniform(*self.amplitude_range)),
            phase=float(rng.uniform(*self.phase_range)),
        )

    def points(
        self, params: SinusoidParams, rng: np.random.Generator, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` points ``(x, y)`` of the task ``params``, each float32 ``(n, 1)``.

        Example:
            >>> import numpy as np
            >>> x, y = Sinusoid().points(SinusoidParams(1.0, 0.0), np.random.default_rng(0), 3)
            >>> bool(torch.allclose(y, torch.sin(x)))
            True
        """
        x = rng.uniform(*self.x_range, size=(n, 1)).astype(np.float32)
        y = (params.amplitude * np.sin(x - params.phase)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    def sample(self, rng: np.random.Generator, shots: int, queries: int) -> Task:
        """A task: ``shots`` support points and ``queries`` query points of one sinusoid.

        Example:
            >>> import numpy as np
            >>> Sinusoid().sample(np.random.default_rng(0), 5, 5).support_x.dtype
            torch.float32
        """
        params = self.sample_params(rng)
        x, y = self.points(params, rng, shots + queries)
        return Task(x[:shots], y[:shots], x[shots:], y[shots:])
