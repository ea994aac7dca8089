"""Tasks: a support set and a query set drawn from one problem.

``Task`` is one episode; ``TaskBatch`` stacks ``B`` episodes of the same shape so that a
meta-learner can process them together (``support_x`` is ``(B, N*K, ...)``). Labels are
remapped to ``0..N-1`` inside each task.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from metaml.errors import UserError

if TYPE_CHECKING:
    from metaml.data.class_dataset import ClassDataset


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
    classes: Tensor | None = None  # (N,) dataset class id of each task label; None for regression

    def to(self, device: torch.device | str) -> Task:
        """The same task on ``device``."""
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        sx, sy, qx, qy = (t.to(device, non_blocking=True) for t in tensors)
        classes = None if self.classes is None else self.classes.to(device)
        return Task(sx, sy, qx, qy, classes=classes)


@dataclass(frozen=True)
class TaskBatch:
    """``B`` tasks stacked: ``support_x (B, N*K, ...)``, ``support_y (B, N*K)``, ``query_x``, ...

    Example:
        >>> z = torch.zeros
        >>> tasks = [Task(z(5, 1), z(5, 1), z(10, 1), z(10, 1))] * 3
        >>> batch = TaskBatch.stack(tasks)
        >>> batch.support_x.shape, len(batch)
        (torch.Size([3, 5, 1]), 3)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor | None = None  # (B, N) dataset class id of each task label; None for regression

    @staticmethod
    def stack(tasks: list[Task]) -> TaskBatch:
        """Stack tasks of equal shape into one batch."""
        classes = [t.classes for t in tasks if t.classes is not None]
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
            classes=torch.stack(classes) if len(classes) == len(tasks) else None,
        )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, index: int) -> Task:
        """The ``index``-th task of the batch."""
        classes = None if self.classes is None else self.classes[index]
        return Task(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            classes,
        )

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch on ``device``."""
        return TaskBatch(
            self.support_x.to(device, non_blocking=True),
            self.support_y.to(device, non_blocking=True),
            self.query_x.to(device, non_blocking=True),
            self.query_y.to(device, non_blocking=True),
            classes=None if self.classes is None else self.classes.to(device),
        )


# -- task sources and the episode sampler ------------------------------------------------------


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks that draws whole tasks itself (e.g. sinusoid regression).

    Example:
        >>> import numpy as np
        >>> from metaml.data.sinusoid import Sinusoid
        >>> fam: TaskFamily = Sinusoid()
        >>> fam.sample(np.random.default_rng(0), shots=5, queries=10).query_x.shape
        torch.Size([10, 1])
    """

    @property
    def task_type(self) -> str:
        """``"regression"`` or ``"classification"``."""
        ...

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(1,)``."""
        ...

    def sample(self, rng: np.random.Generator, shots: int, queries: int) -> Task:
        """One task with ``shots`` support and ``queries`` query examples, drawn with ``rng``."""
        ...


Augment = Callable[[Tensor, np.random.Generator], Tensor]

# Above this many examples in the largest class, a sort over every example of the chosen
# classes costs more than one ``rng.choice`` per class.
_VECTORIZED_MAX_EXAMPLES = 256


class EpisodeSampler:
    """Episodes drawn from a :class:`~metaml.data.ClassDataset` or a :class:`TaskFamily`.

    Episode ``i`` is a pure function of ``(seed, i)`` (its generator is seeded with
    ``SeedSequence([seed, i])``), so resuming at a position, evaluating several methods on the
    same episodes, and splitting episodes across ranks need no sampler state.

    Classification episodes (``ways``-way ``shots``-shot, ``queries`` per class):

    - ``ways`` distinct classes are drawn; the order they are drawn in is their label
      ``0..ways-1`` (a random class order per episode);
    - each class gets ``shots + queries`` distinct examples: the first ``shots`` are support,
      the rest query, so support and query never share an example;
    - both sets are class-major: ``support_y = [0]*shots + [1]*shots + ...``, likewise query;
    - ``support_x`` is float32 ``(ways*shots, C, H, W)`` in ``[0, 1]``;
    - ``classes[j]`` is the class behind label ``j``, in ``0..num_classes-1``: the dataset's
      class index, or ``class * 4 + quarter_turns`` with ``rotations``;
    - ``within_group``: all classes of an episode come from one group (alphabet), the group
      drawn with probability proportional to its number of classes among those with at least
      ``ways`` classes;
    - ``rotations``: each class rotated by 0/90/180/270 degrees is a distinct class
      (the Omniglot convention), rotated counterclockwise on the gathered images only
      (``np.rot90``, identical to ``torch.rot90(x, k, dims=(-2, -1))``; no dataset copy);
    - ``augment(x, rng)`` is applied to the gathered support and then the query tensor with
      the episode's generator, so augmented episodes stay reproducible.
    - ``task_selection="uniform"`` (the default) draws the ``ways`` classes uniformly;
      ``"nearest"`` draws them with probabilities proportional to ``class_weights`` (one positive
      weight per class, times 4 with ``rotations``), e.g. from
      :func:`metaml.taskrep.nearest_class_weights` to bias meta-training toward the classes
      nearest a target task set; ``"hard"`` draws them by weights that start uniform and that
      the training loop updates with :meth:`set_class_weights` from the learner's confusions
      (:class:`metaml.taskrep.HardClassTracker`). With ``within_group`` the group is drawn with
      probability proportional to its classes' total weight, then its classes by weight.

    For a task family (regression) ``ways`` is ignored: ``shots`` and ``queries`` are the
    numbers of support and query points.

    Example:
        >>> import torch
        >>> from metaml.data import ClassDataset
        >>> ds = ClassDataset(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40) % 8,
        ...                   [f"c{i}" for i in range(8)])
        >>> sampler = EpisodeSampler(ds, ways=3, shots=1, queries=2, meta_batch_size=4, seed=7)
        >>> t = sampler.episode(0)
        >>> tuple(t.support_x.shape), t.support_y.tolist(), t.query_y.tolist()
        ((3, 1, 4, 4), [0, 1, 2], [0, 0, 1, 1, 2, 2])
        >>> batch = sampler.batch(1)  # episodes 4..7
        >>> tuple(batch.query_x.shape), torch.equal(batch.task(0).query_x,
        ...                                             sampler.episode(4).query_x)
        ((4, 6, 1, 4, 4), True)
    """

    def __init__(
        self,
        source: ClassDataset | TaskFamily,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 1,
        seed: int = 0,
        *,
        within_group: bool = False,
        rotations: bool = False,
        augment: Augment | None = None,
        task_selection: str = "uniform",
        class_weights: np.ndarray | None = None,
    ) -> None:
        from metaml.data.class_dataset import ClassDataset  # lazy: metaml.data imports us

        for name, value in [("ways", ways), ("shots", shots), ("queries", queries),
                            ("meta_batch_size", meta_batch_size)]:  # fmt: skip
            if not isinstance(value, int | np.integer) or value < 1:
                raise UserError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise UserError(f"seed must be a non-negative integer; got {seed!r}")
        self.source = source
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.meta_batch_size, self.seed = int(meta_batch_size), int(seed)
        self.within_group, self.rotations, self.augment = within_group, rotations, augment
        self.task_selection = task_selection
        self._class_p: np.ndarray | None = None  # drawing probabilities; None = uniform
        self._dataset: ClassDataset | None = source if isinstance(source, ClassDataset) else None
        if self._dataset is not None:
            self.task_type = "classification"
            self.input_shape: tuple[int, ...] = self._dataset.shape
            self._prepare_classes(self._dataset)
            self._prepare_selection(task_selection, class_weights)
        else:
            if task_selection != "uniform":
                raise UserError(
                    f"task_selection={task_selection!r} needs a class dataset; a task family draws its own tasks"
                )
            if not isinstance(source, TaskFamily):
                raise UserError(
                    f"source must be a ClassDataset or a TaskFamily; got {type(source).__name__}"
                )
            self.task_type = source.task_type
            self.input_shape = tuple(source.input_shape)

    # -- setup and validation ---------------------------------------------------------------

    def _prepare_classes(self, ds: ClassDataset) -> None:
        self._rot = 4 if self.rotations else 1
        if self.rotations and ds.shape[1] != ds.shape[2]:
            raise UserError(
                f"rotations need square images; got {ds.shape[1]}x{ds.shape[2]} "
                "(pass image_size= to resize, or rotations=False)"
            )
        self._images_np = ds.images.numpy()  # shares memory with the dataset's tensor
        self._index, self._counts = ds.padded_class_index()
        # Sampling works on "virtual" classes: base class c rotated by r is c * 4 + r.
        n_virtual = ds.num_classes * self._rot
        if self.ways > n_virtual:
            extra = "" if self.rotations else " or rotations=True"
            raise UserError(
                f"ways={self.ways} but the dataset has {n_virtual} classes"
                f"{' (with rotations)' if self.rotations else ''}; use ways={n_virtual} or "
                f"fewer{extra}"
            )
        # Labels are the same in every episode (class-major, 0..ways-1): build them once.
        self._support_y = torch.arange(self.ways).repeat_interleave(self.shots)
        self._query_y = torch.arange(self.ways).repeat_interleave(self.queries)
        self._group_classes: list[np.ndarray] = []
        if self.within_group:
            self._prepare_groups(ds)
        self._check_examples(ds)

    def _check_examples(self, ds: ClassDataset) -> None:
        """Every class must hold ``shots + queries`` examples: any class may be drawn."""
        need = self.shots + self.queries
        short = int(np.argmin(self._counts))
        if self._counts[short] < need:
            have = int(self._counts[short])
            if have < 2:
                fix = "add examples to that class or remove it"
            elif have > self.shots:
                fix = f"e.g. queries={have - self.shots}"
            else:
                fix = f"e.g. shots={have - 1}, queries=1"
            raise UserError(
                f"shots + queries = {need} but class {ds.class_names[short]!r} has only "
                f"{have} examples; use at most {have} in total ({fix})"
            )

    def _prepare_selection(self, selection: str, weights: np.ndarray | None) -> None:
        if selection == "uniform":
            if weights is not None:
                raise UserError(
                    "class_weights are used by task_selection='nearest' or 'hard'; drop them or set it"
                )
            return
        if selection not in ("nearest", "hard"):
            raise UserError(f"unknown task_selection {selection!r}; use uniform, nearest or hard")
        if weights is None and selection == "hard":  # no confusions seen yet: start uniform
            weights = np.ones(len(self._counts) * self._rot)
        self.set_class_weights(weights)

    @property
    def class_weights(self) -> np.ndarray | None:
        """The class-drawing probabilities of ``nearest``/``hard`` selection (a copy), or None.

        Save them with a checkpoint to resume ``hard`` selection exactly.

        Example:
            >>> import torch
            >>> from metaml.data import ClassDataset
            >>> ds = ClassDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8) % 4, "abcd")
            >>> EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hard").class_weights.tolist()
            [0.25, 0.25, 0.25, 0.25]
        """
        return None if self._class_p is None else self._class_p.copy()

    def set_class_weights(self, weights: np.ndarray | None) -> None:
        """Replace the class weights of ``nearest``/``hard`` selection (normalised to sum to 1).

        Episodes drawn afterwards use the new weights: episode ``i`` is a pure function of
        ``(seed, i, weights)``. ``hard`` selection calls this as the learner's confusions change
        (see :class:`metaml.taskrep.HardClassTracker`).

        Example:
            >>> import torch
            >>> from metaml.data import ClassDataset
            >>> ds = ClassDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8) % 4, "abcd")
            >>> s = EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hard")
            >>> s.set_class_weights(np.array([1.0, 1.0, 1.0, 5.0]))
            >>> s.class_weights.tolist()
            [0.125, 0.125, 0.125, 0.625]
        """
        if self.task_selection not in ("nearest", "hard") or self._dataset is None:
            raise UserError(
                "class weights apply to task_selection='nearest' or 'hard' on a class dataset"
            )
        n_virtual = len(self._counts) * self._rot
        w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if w is None or len(w) != n_virtual or not np.isfinite(w).all() or (w <= 0).any():
            got = "none" if w is None else f"{len(w)} (min {w.min() if len(w) else 'n/a'})"
            raise UserError(
                f"task_selection={self.task_selection!r} needs class_weights: {n_virtual} positive weights, one per "
                f"class{' and rotation' if self.rotations else ''}; got {got} (see metaml.taskrep.nearest_class_weights)"
            )
        self._use_probabilities(w / w.sum())

    def selection_state(self) -> dict[str, Any]:
        """The task selection as plain JSON: ``{"task_selection", "class_weights"}`` (a list or None).

        A checkpoint stores it and :meth:`load_selection_state` restores it bit for bit (JSON
        keeps every digit of a float64), so ``hard`` selection resumes exactly.

        Example:
            >>> import torch
            >>> from metaml.data import ClassDataset
            >>> ds = ClassDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8) % 4, "abcd")
            >>> EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hard").selection_state()
            {'task_selection': 'hard', 'class_weights': [0.25, 0.25, 0.25, 0.25]}
        """
        weights = None if self._class_p is None else [float(v) for v in self._class_p]
        return {"task_selection": self.task_selection, "class_weights": weights}

    def load_selection_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`selection_state` returned, exactly (no renormalisation).

        Example:
            >>> import torch
            >>> from metaml.data import ClassDataset
            >>> ds = ClassDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8) % 4, "abcd")
            >>> a = EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hard")
            >>> a.set_class_weights(np.array([1.0, 2.0, 3.0, 7.0]))
            >>> b = EpisodeSampler(ds, ways=2, shots=1, queries=1, task_selection="hard")
            >>> b.load_selection_state(a.selection_state())
            >>> bool((a.class_weights == b.class_weights).all())
            True
        """
        saved = state.get("task_selection")
        if saved != self.task_selection:
            raise UserError(
                f"the saved task selection is {saved!r}, this sampler's {self.task_selection!r}; "
                "resume with the run's own config (data.task_selection)"
            )
        weights = state.get("class_weights")
        if weights is None:
            return
        self.set_class_weights(np.asarray(weights, dtype=np.float64))  # validates
        self._use_probabilities(np.asarray(weights, dtype=np.float64))  # the saved bits

    def _use_probabilities(self, p: np.ndarray) -> None:
        """Draw classes with probabilities ``p`` (already validated and normalised)."""
        self._class_p = p
        if self._group_classes:
            totals = np.array([self._class_p[c].sum() for c in self._group_classes])
            self._group_cdf = np.cumsum(totals) / totals.sum()

    def _prepare_groups(self, ds: ClassDataset) -> None:
        groups = np.asarray(ds.class_groups)
        sizes = {}
        for g in ds.groups:
            base = np.flatnonzero(groups == g)
            virtual = (base[:, None] * self._rot + np.arange(self._rot)).reshape(-1)
            sizes[g] = len(virtual)
            if len(virtual) >= self.ways:
                self._group_classes.append(virtual)
        if not self._group_classes:
            largest = max(sizes, key=lambda g: sizes[g])
            raise UserError(
                f"within_group=True needs a group with at least ways={self.ways} classes; "
                f"the largest, {largest!r}, has {sizes[largest]}; use ways={sizes[largest]} "
                "or fewer, or within_group=False"
            )
        weights = np.array([len(c) for c in self._group_classes], dtype=np.float64)
        self._group_cdf = np.cumsum(weights) / weights.sum()

    # -- sampling -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Distinct classes episodes draw from (times 4 with ``rotations``); 0 for a task family.

        Example:
            >>> import torch
            >>> from metaml.data import ClassDataset
            >>> images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.arange(6) % 3, "abc")
            >>> EpisodeSampler(ds, ways=2, shots=1, queries=1, rotations=True).num_classes
            12
        """
        return len(self._counts) * self._rot if self._dataset is not None else 0

    @property
    def output_dim(self) -> int:
        """Outputs per example: ``ways`` for classification, the family's for regression.

        Example:
            >>> from metaml.data import Sinusoid
            >>> EpisodeSampler(Sinusoid(), shots=10, queries=10).output_dim
            1
        """
        if self._dataset is not None:
            return self.ways
        return int(getattr(self.source, "output_dim", 1))

    def rng(self, index: int) -> np.random.Generator:
        """The generator of episode ``index``: seeded with ``SeedSequence([seed, index])``.

        Example:
            >>> from metaml.data import Sinusoid
            >>> s = EpisodeSampler(Sinusoid(), seed=3)
            >>> s.rng(5).random() == s.rng(5).random()
            True
        """
        if index < 0:
            raise UserError(f"episode index must be >= 0; got {index}")
        return np.random.default_rng([self.seed, int(index)])

    def episode(self, index: int) -> Task:
        """Episode ``index``: a pure function of ``(seed, index)``.

        Example:
            >>> from metaml.data import Sinusoid
            >>> s = EpisodeSampler(Sinusoid(), shots=5, queries=5, seed=1)
            >>> torch.equal(s.episode(3).support_y, s.episode(3).support_y)
            True
        """
        rng = self.rng(index)
        if self._dataset is None:
            task = self.source.sample(rng, self.shots, self.queries)  # type: ignore[union-attr]
        else:
            task = self._classification_episode(rng)
        if self.augment is not None:
            task = Task(
                self.augment(task.support_x, rng), task.support_y,
                self.augment(task.query_x, rng), task.query_y, classes=task.classes,
            )  # fmt: skip
        return task

    def batch(self, index: int) -> TaskBatch:
        """Batch ``index``: episodes ``index*B .. index*B + B - 1`` stacked (B = meta_batch_size).

        Example:
            >>> from metaml.data import Sinusoid
            >>> s = EpisodeSampler(Sinusoid(), shots=5, queries=5, meta_batch_size=4)
            >>> s.batch(0).support_x.shape
            torch.Size([4, 5, 1])
        """
        first = index * self.meta_batch_size
        return TaskBatch.stack([self.episode(first + j) for j in range(self.meta_batch_size)])

    def batches(self, start: int = 0) -> Iterator[TaskBatch]:
        """Batches ``start, start+1, ...`` forever (a trainer resumes at its saved position).

        Example:
            >>> from metaml.data import Sinusoid
            >>> s = EpisodeSampler(Sinusoid(), shots=5, queries=5)
            >>> it = s.batches(start=10)
            >>> torch.equal(next(it).query_y, s.batch(10).query_y)
            True
        """
        for index in itertools.count(start):
            yield self.batch(index)

    def __iter__(self) -> Iterator[TaskBatch]:
        return self.batches()

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.task_type}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, meta_batch_size={self.meta_batch_size}, seed={self.seed}"
            f"{', within_group' if self.within_group else ''}"
            f"{', rotations' if self.rotations else ''})"
        )

    def _choose_classes(self, rng: np.random.Generator) -> np.ndarray:
        """``ways`` distinct virtual class ids, in label order."""
        if self._class_p is not None:
            return self._choose_weighted(rng, self._class_p)
        if self._group_classes:
            # inverse-CDF draw: the same distribution as rng.choice(p=...), several times faster
            g = int(np.searchsorted(self._group_cdf, rng.random(), side="right"))
            group = self._group_classes[min(g, len(self._group_classes) - 1)]
            return rng.choice(group, size=self.ways, replace=False)
        return rng.choice(len(self._counts) * self._rot, size=self.ways, replace=False)

    def _choose_weighted(self, rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
        """``ways`` distinct virtual class ids drawn with probabilities ``p`` (task_selection)."""
        candidates = np.arange(len(p))
        if self._group_classes:
            g = int(np.searchsorted(self._group_cdf, rng.random(), side="right"))
            candidates = self._group_classes[min(g, len(self._group_classes) - 1)]
        q = p[candidates] / p[candidates].sum()
        return candidates[rng.choice(len(candidates), size=self.ways, replace=False, p=q)]

    def _choose_examples(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        """``(ways, shots+queries)`` distinct example indices of each base class, random order."""
        need = self.shots + self.queries
        counts = self._counts[base]  # (ways,)
        width = self._index.shape[1]
        if width <= _VECTORIZED_MAX_EXAMPLES:
            # A random key per slot, padding pushed last: the first `need` slots of the argsort
            # are a uniformly random ordered draw without replacement, for all classes at once.
            keys = rng.random((len(base), width))  # (ways, width)
            keys[np.arange(width)[None, :] >= counts[:, None]] = 2.0
            slots = np.argsort(keys, axis=1)[:, :need]  # (ways, need)
        else:
            slots = np.stack([rng.choice(int(n), size=need, replace=False) for n in counts])
        return self._index[base[:, None], slots]  # (ways, need)

    def _classification_episode(self, rng: np.random.Generator) -> Task:
        classes = self._choose_classes(rng)  # (ways,) virtual ids; position = label
        base, rot = classes // self._rot, classes % self._rot
        examples = self._choose_examples(rng, base)  # (ways, shots+queries)
        # One gather for support and query: support rows first (class-major), then query rows.
        flat = np.concatenate(
            [examples[:, : self.shots].ravel(), examples[:, self.shots :].ravel()]
        )
        # The gather and the rotations run in numpy on uint8: ndarray.take is ~10x faster than
        # torch advanced indexing for a few rows, and np.rot90 is a free strided view.
        x_u8 = self._images_np.take(flat, axis=0)  # (ways*(shots+queries), C, H, W) uint8
        if self.rotations:
            per_row = np.concatenate([np.repeat(rot, self.shots), np.repeat(rot, self.queries)])
            _rotate_rows(x_u8, per_row)
        x = torch.from_numpy(x_u8).float().div_(255)  # float32 in [0, 1]
        n_support = self.ways * self.shots
        # Fresh label tensors per task: a caller may modify a task in place.
        return Task(
            x[:n_support], self._support_y.clone(), x[n_support:], self._query_y.clone(),
            classes=torch.from_numpy(classes.astype(np.int64)),
        )  # fmt: skip


def _rotate_rows(x: np.ndarray, quarter_turns: np.ndarray) -> None:
    """Rotate row ``i`` of ``x (n, C, H, W)`` by ``quarter_turns[i]`` * 90 degrees, in place."""
    for r in (1, 2, 3):
        rows = np.flatnonzero(quarter_turns == r)
        if len(rows):
            x[rows] = np.rot90(x[rows], r, axes=(-2, -1))
