"""ClassDataset: a labelled image collection kept as one uint8 tensor, with classes and groups.

Images stay ``uint8`` in memory (a 28x28 Omniglot image is 784 bytes, not 3 KiB as float32);
they become float32 in ``[0, 1]`` only when an :class:`~metaml.tasks.EpisodeSampler` gathers
them into a task. Every class belongs to a *group* (Omniglot: its alphabet), so that splits can
keep whole groups on one side and episodes can be drawn within one group.

Example:
    >>> import torch
    >>> ds = ClassDataset(
    ...     torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 1, 2, 2]),
    ...     ["a", "b", "c"], ["g1", "g1", "g2"])
    >>> ds.num_classes, ds.shape, ds.groups
    (3, (1, 4, 4), ['g1', 'g2'])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metaml.errors import UserError


class ClassDataset:
    """Images ``(n, C, H, W)`` uint8, ``targets (n,)`` int64 in ``0..num_classes-1``, names, groups.

    ``class_names[c]`` and ``class_groups[c]`` describe class ``c``; ``config`` records how the
    data was read and preprocessed (JSON-able, saved with runs). Every class must have at least
    one example.

    Example:
        >>> import torch
        >>> images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
        >>> ds = ClassDataset(images, torch.tensor([0, 1, 1, 1]), ["x", "y"], ["", ""],
        ...                   config={"reader": "memory"})
        >>> ds.examples_per_class().tolist(), ds.class_indices(1).tolist()
        ([1, 3], [1, 2, 3])
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        class_names: Sequence[str],
        class_groups: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.class_names = [str(n) for n in class_names]
        groups = class_groups if class_groups is not None else [""] * len(self.class_names)
        self.class_groups = [str(g) for g in groups]
        self.config: dict[str, Any] = dict(config or {})
        self._validate()
        # Sampling needs "the examples of class c" thousands of times per second: sort once,
        # then every class is a contiguous slice of ``_order``.
        targets_np = self.targets.numpy()
        self._order = np.argsort(targets_np, kind="stable")
        counts = np.bincount(targets_np, minlength=self.num_classes)
        self._starts = np.concatenate([[0], np.cumsum(counts)])

    def _validate(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UserError(
                f"images must be a uint8 tensor (n, C, H, W); got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.targets.ndim != 1 or len(self.targets) != len(self.images):
            raise UserError(
                f"targets must be (n,) with n={len(self.images)}; got {tuple(self.targets.shape)}"
            )
        self.targets = self.targets.to(torch.int64)
        if len(self.class_groups) != len(self.class_names):
            raise UserError(
                f"{len(self.class_groups)} class groups for {len(self.class_names)} classes; "
                "give one group name per class"
            )
        if len(self.targets) and (
            int(self.targets.min()) < 0 or int(self.targets.max()) >= self.num_classes
        ):
            raise UserError(f"targets must lie in 0..{self.num_classes - 1}")
        counts = np.bincount(self.targets.numpy(), minlength=self.num_classes)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise UserError(
                f"class {self.class_names[empty[0]]!r} has no examples; remove it or add images"
            )

    # -- shape and counts -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes.

        Example:
            >>> ds = ClassDataset(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), torch.arange(2), "ab")
            >>> ds.num_classes
            2
        """
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image.

        Example:
            >>> ClassDataset(torch.zeros(1, 3, 8, 9, dtype=torch.uint8), torch.arange(1), "a").shape
            (3, 8, 9)
        """
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def groups(self) -> list[str]:
        """The sorted unique group names.

        Example:
            >>> ds = ClassDataset(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 1]),
            ...                   "ab", ["z", "y"])
            >>> ds.groups
            ['y', 'z']
        """
        return sorted(set(self.class_groups))

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"ClassDataset(classes={d['classes']}, groups={d['groups']}, "
            f"examples={d['examples']}, shape={tuple(d['shape'])})"
        )

    def examples_per_class(self) -> np.ndarray:
        """Number of examples of each class, ``(num_classes,)`` int64.

        Example:
            >>> images = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.tensor([1, 0, 1]), "ab")
            >>> ds.examples_per_class().tolist()
            [1, 2]
        """
        return np.diff(self._starts).astype(np.int64)

    def class_indices(self, c: int) -> np.ndarray:
        """Indices (into ``images``) of the examples of class ``c``, in dataset order.

        Example:
            >>> images = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.tensor([1, 0, 1]), "ab")
            >>> ds.class_indices(1).tolist()
            [0, 2]
        """
        return self._order[self._starts[c] : self._starts[c + 1]]

    def padded_class_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(index, counts)``: ``index[c, :counts[c]]`` are the examples of class ``c``.

        The rectangular form lets a sampler pick examples of many classes with one fancy index.
        Padding entries are ``-1``.

        Example:
            >>> images = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.tensor([1, 0, 1]), "ab")
            >>> index, counts = ds.padded_class_index()
            >>> index.tolist(), counts.tolist()
            ([[1, -1], [0, 2]], [1, 2])
        """
        counts = self.examples_per_class()
        index = np.full(
            (self.num_classes, int(counts.max()) if len(counts) else 0), -1, dtype=np.int64
        )
        for c in range(self.num_classes):
            index[c, : counts[c]] = self.class_indices(c)
        return index, counts

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: classes, groups, examples (total, per-class min/max), shape.

        Example:
            >>> images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.tensor([1, 0, 1]), "ab")
            >>> ds.describe()["examples"], ds.describe()["examples_per_class_max"]
            (3, 2)
        """
        counts = self.examples_per_class()
        return {
            "classes": self.num_classes,
            "groups": len(self.groups),
            "examples": len(self),
            "examples_per_class_min": int(counts.min()) if len(counts) else 0,
            "examples_per_class_max": int(counts.max()) if len(counts) else 0,
            "shape": list(self.shape),
        }

    # -- derived datasets -------------------------------------------------------------------

    def subset_classes(self, class_indices: Sequence[int] | np.ndarray) -> ClassDataset:
        """A dataset with only the given classes, re-indexed ``0..len(class_indices)-1`` in order.

        Example:
            >>> images = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.arange(3), "abc")
            >>> sub = ds.subset_classes([2, 0])
            >>> sub.class_names, sub.targets.tolist()
            (['c', 'a'], [1, 0])
        """
        classes = np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if len(np.unique(classes)) != len(classes):
            raise UserError("subset_classes got a class index twice; pass each class once")
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise UserError(f"class indices must lie in 0..{self.num_classes - 1}")
        keep = np.concatenate([self.class_indices(int(c)) for c in classes] or [np.zeros(0, int)])
        keep.sort()  # keep the original example order inside the subset
        new_id = np.full(self.num_classes, -1, dtype=np.int64)
        new_id[classes] = np.arange(len(classes))
        idx = torch.from_numpy(keep)
        return ClassDataset(
            self.images[idx],
            torch.from_numpy(new_id[self.targets.numpy()[keep]]),
            [self.class_names[c] for c in classes],
            [self.class_groups[c] for c in classes],
            config=self.config,
        )

    def split(
        self,
        by: Literal["group", "class"] = "group",
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
    ) -> tuple[ClassDataset, ClassDataset, ClassDataset]:
        """Split into ``(train, val, test)`` by whole groups or by classes; deterministic per seed.

        ``by="group"`` puts every class of a group on one side (no alphabet seen in meta-training
        appears at test time). Each side gets at least one unit, so at least 3 groups (or
        classes) are needed. Classes inside each side keep their original order.

        Example:
            >>> images = torch.zeros(5, 1, 1, 1, dtype=torch.uint8)
            >>> ds = ClassDataset(images, torch.arange(5), "abcde", ["g0", "g1", "g2", "g3", "g4"])
            >>> [s.num_classes for s in ds.split("group", (0.6, 0.2, 0.2), seed=0)]
            [3, 1, 1]
        """
        units = self._split_units(by)
        sizes = _split_sizes(len(units), fractions, by)
        perm = np.random.default_rng(seed).permutation(len(units))
        bounds = np.cumsum([0, *sizes])
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            chosen = {units[i] for i in perm[lo:hi]}
            if by == "group":
                classes = [c for c, g in enumerate(self.class_groups) if g in chosen]
            else:
                classes = sorted(int(c) for c in chosen)
            parts.append(self.subset_classes(classes))
        return parts[0], parts[1], parts[2]

    def _split_units(self, by: str) -> list[Any]:
        if by == "group":
            return list(self.groups)
        if by == "class":
            return list(range(self.num_classes))
        raise UserError(f"split by={by!r} is not known; use by='group' or by='class'")

    @staticmethod
    def concat(datasets: Sequence[ClassDataset], *, drop_duplicates: bool = True) -> ClassDataset:
        """Concatenate datasets of equal image shape; classes are renumbered in order.

        With ``drop_duplicates`` a class whose ``(group, name)`` already appeared in an earlier
        dataset is skipped (the two Omniglot "small" archives share the Greek and Latin
        alphabets, image for image); otherwise such a clash raises :class:`UserError`.

        Example:
            >>> images = torch.zeros(2, 1, 1, 1, dtype=torch.uint8)
            >>> a = ClassDataset(images, torch.arange(2), "ab")
            >>> b = ClassDataset(images, torch.arange(2), "bc")
            >>> ClassDataset.concat([a, b]).class_names
            ['a', 'b', 'c']
        """
        if not datasets:
            raise UserError("concat needs at least one dataset")
        shapes = {d.shape for d in datasets}
        if len(shapes) > 1:
            raise UserError(f"cannot concatenate images of different shapes {sorted(shapes)}")
        seen: set[tuple[str, str]] = set()
        images, targets = [], []
        names: list[str] = []
        groups: list[str] = []
        for d in datasets:
            keys = list(zip(d.class_groups, d.class_names, strict=True))
            fresh = [c for c, k in enumerate(keys) if k not in seen]
            if len(fresh) < len(keys) and not drop_duplicates:
                dup = next(k for k in keys if k in seen)
                raise UserError(f"class {dup[1]!r} of group {dup[0]!r} appears twice")
            seen.update(keys)
            part = d.subset_classes(fresh)
            images.append(part.images)
            targets.append(part.targets + len(names))
            names += part.class_names
            groups += part.class_groups
        config = {"reader": "concat", "parts": [d.config for d in datasets]}
        return ClassDataset(torch.cat(images), torch.cat(targets), names, groups, config=config)


def _split_sizes(n: int, fractions: Sequence[float], by: str) -> list[int]:
    """Largest-remainder allocation of ``n`` units to 3 sides, each side getting at least one."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr <= 0).any() or not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise UserError(
            f"split fractions must be 3 positive numbers summing to 1 (train, val, test); "
            f"got {tuple(fractions)}"
        )
    if n < 3:
        other = "class" if by == "group" else "group"
        raise UserError(
            f"cannot split {n} {by}(s) into train/val/test with at least one each; "
            f"use by={other!r} or a dataset with at least 3 {by}s"
        )
    raw = fr * n
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    # An empty side would make evaluation impossible: borrow from the largest side.
    while (sizes == 0).any():
        sizes[np.argmax(sizes)] -= 1
        sizes[np.argmin(sizes)] += 1
    return [int(s) for s in sizes]
