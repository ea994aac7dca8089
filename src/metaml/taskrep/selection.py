"""Class weights for task selection: bias meta-training toward the classes nearest a target.

:func:`nearest_class_weights` gives each class of a training dataset a weight that falls with
the distance from its prototype (mean embedding under the reference backbone of a
:class:`~metaml.taskrep.TaskEncoder`) to the nearest prototype of a target task set; passed to
``EpisodeSampler(..., task_selection="nearest", class_weights=w)``, episodes are drawn mostly
from those classes.

Example:
    >>> import torch
    >>> from metaml.data import ClassDataset
    >>> images = (torch.arange(8) * 30).to(torch.uint8).view(8, 1, 1, 1).expand(8, 1, 16, 16)
    >>> ds = ClassDataset(images.contiguous(), torch.arange(8) // 2, "abcd")
    >>> w = nearest_class_weights(ds, images[6:8].float() / 255, torch.tensor([0, 0]))
    >>> int(w.argmax()), round(float(w.sum()), 6)
    (3, 1.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from metaml.algorithms.features import embed
from metaml.algorithms.protonet import class_means
from metaml.errors import UserError
from metaml.taskrep.encoder import TaskEncoder

if TYPE_CHECKING:
    from metaml.data import ClassDataset


def class_prototypes(
    dataset: ClassDataset, encoder: TaskEncoder, rotations: bool = False, per_class: int = 20
) -> np.ndarray:
    """Mean embedding of each class ``(num_classes * (4 if rotations else 1), d)``.

    Up to ``per_class`` examples of each class are used (the first ones, deterministic); with
    ``rotations`` row ``c * 4 + r`` is class ``c`` turned ``r`` quarter turns, as in
    :class:`~metaml.tasks.EpisodeSampler`.

    Example:
        >>> from metaml.data import ClassDataset
        >>> ds = ClassDataset(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.arange(4) % 2, "ab")
        >>> class_prototypes(ds, TaskEncoder(input_shape=(1, 16, 16)), rotations=True).shape
        (8, 64)
    """
    index, counts = dataset.padded_class_index()
    rows = [index[c, : min(int(counts[c]), per_class)] for c in range(dataset.num_classes)]
    flat = np.concatenate(rows)
    labels = torch.from_numpy(np.repeat(np.arange(dataset.num_classes), [len(r) for r in rows]))
    x = dataset.images[torch.from_numpy(flat)].float().div_(255)  # (n, C, H, W)
    turns = range(4) if rotations else range(1)
    protos = []
    for r in turns:
        features = embed(encoder.backbone, torch.rot90(x, r, dims=(-2, -1)) if r else x)
        protos.append(class_means(features[None], labels[None])[0])  # (num_classes, d)
    stacked = torch.stack(protos, dim=1)  # (num_classes, turns, d): row c*4+r after flatten
    return stacked.flatten(0, 1).numpy().astype(np.float64)


def class_examples(dataset: ClassDataset, per_class: int = 1) -> tuple[Tensor, Tensor]:
    """The first ``per_class`` examples of every class as float ``x`` in [0, 1] and class ids ``y``.

    A deterministic target task set for :func:`nearest_class_weights` (e.g. one example of every
    test class); classes with fewer examples give all they have.

    Example:
        >>> from metaml.data import ClassDataset
        >>> ds = ClassDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.arange(6) % 3, "abc")
        >>> x, y = class_examples(ds, per_class=2)
        >>> tuple(x.shape), y.tolist()
        ((6, 1, 2, 2), [0, 0, 1, 1, 2, 2])
    """
    index, counts = dataset.padded_class_index()
    taken = np.minimum(counts, per_class)  # (num_classes,)
    flat = np.concatenate([index[c, : taken[c]] for c in range(dataset.num_classes)])
    y = torch.from_numpy(np.repeat(np.arange(dataset.num_classes), taken))
    return dataset.images[torch.from_numpy(flat)].float().div_(255), y


def nearest_class_weights(
    dataset: ClassDataset,
    target_x: Tensor,
    target_y: Tensor,
    *,
    encoder: TaskEncoder | None = None,
    rotations: bool = False,
    temperature: float = 0.1,
    uniform_mix: float = 0.1,
) -> np.ndarray:
    """Sampling weights (summing to 1) of ``dataset``'s classes, highest for those nearest the target.

    ``target_x``/``target_y``: the target task set's examples and class labels (e.g. the support
    sets of the tasks to be solved, stacked). With ``d_c`` the distance from class ``c``'s
    prototype to the nearest target prototype, and ``m`` the median of the ``d_c``, the weight is
    ``(1 - uniform_mix) * softmax(-d_c / (temperature * m)) + uniform_mix / num_classes``: every
    class keeps a floor, so meta-training still sees all classes now and then.

    Example:
        >>> # w = nearest_class_weights(train_ds, target.support_x, target.support_y)
        >>> # EpisodeSampler(train_ds, task_selection="nearest", class_weights=w)
    """
    if not 0 <= uniform_mix <= 1 or temperature <= 0:
        raise UserError(
            f"need 0 <= uniform_mix <= 1 and temperature > 0; got {uniform_mix}, {temperature}"
        )
    encoder = encoder or TaskEncoder(input_shape=dataset.shape)
    protos = class_prototypes(dataset, encoder, rotations)  # (C, d)
    _, labels = torch.unique(target_y, return_inverse=True)
    target = class_means(embed(encoder.backbone, target_x.float())[None], labels[None])[0]
    t = target.numpy().astype(np.float64)  # (T, d)
    distance = np.sqrt(((protos[:, None, :] - t[None]) ** 2).sum(-1)).min(1)  # (C,)
    scale = temperature * max(float(np.median(distance)), 1e-12)
    logits = -distance / scale
    soft = np.exp(logits - logits.max())
    soft /= soft.sum()
    return (1 - uniform_mix) * soft + uniform_mix / len(soft)


class HardClassTracker:
    """Per-class error rates of the learner during meta-training, as ``hard`` sampling weights.

    :meth:`observe` takes the classes of a batch of episodes and the learner's query logits; each
    class's error rate (share of its queries misclassified) is folded into an exponential moving
    average (``decay``). Classes never seen keep error 1, so they are tried early. :meth:`weights`
    is ``(1 - uniform_mix) * err / sum(err) + uniform_mix / num_classes``, to pass to
    :meth:`EpisodeSampler.set_class_weights <metaml.tasks.EpisodeSampler.set_class_weights>`.
    ``error`` (a plain array) is the state to save for an exact resume.

    Example:
        >>> t = HardClassTracker(4, decay=0.0, uniform_mix=0.0)
        >>> logits = torch.tensor([[[5.0, 0.0], [5.0, 0.0]]])  # (B=1, Q=2, ways=2): both say label 0
        >>> t.observe(torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), logits)
        >>> t.weights().round(3).tolist()  # class 2 right, class 3 wrong, 0 and 1 unseen (error 1)
        [0.333, 0.333, 0.0, 0.333]
    """

    def __init__(self, num_classes: int, decay: float = 0.9, uniform_mix: float = 0.1) -> None:
        if num_classes < 1 or not 0 <= decay < 1 or not 0 <= uniform_mix <= 1:
            raise UserError(
                f"need num_classes >= 1, 0 <= decay < 1, 0 <= uniform_mix <= 1; got {num_classes}, {decay}, {uniform_mix}"
            )
        self.decay, self.uniform_mix = float(decay), float(uniform_mix)
        self.error = np.ones(num_classes)

    @torch.no_grad()
    def observe(self, classes: Tensor, query_y: Tensor, logits: Tensor) -> None:
        """Fold in one batch: ``classes (B, ways)``, ``query_y (B, Q)``, ``logits (B, Q, ways)``.

        Tasks are folded in batch order, so a class drawn by two tasks of the batch gets two
        updates, the second task's last.

        Example:
            >>> t = HardClassTracker(3, decay=0.5)
            >>> t.observe(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
            >>> t.error.tolist()  # class 0 right: 0.5 * 1 + 0.5 * 0; class 1 wrong: stays 1
            [0.5, 1.0, 1.0]
        """
        ways = classes.shape[1]
        wrong = (logits.argmax(-1) != query_y).double()  # (B, Q)
        one_hot = torch.nn.functional.one_hot(query_y.long(), ways).double()  # (B, Q, ways)
        counts = one_hot.sum(1)  # (B, ways) queries per label
        misses = (one_hot * wrong[..., None]).sum(1)  # (B, ways) misclassified queries per label
        # Sums of 0/1 values are exact, so rate equals the per-label mean of `wrong` bit for bit.
        rates = (misses / counts.clamp(min=1)).cpu().numpy()
        seen = (counts > 0).cpu().numpy()
        ids = classes.cpu().numpy()
        for b in range(ids.shape[0]):  # sequential: classes may repeat across tasks
            for label in range(ways):
                if seen[b, label]:
                    c = ids[b, label]
                    self.error[c] = self.decay * self.error[c] + (1 - self.decay) * rates[b, label]

    def state(self) -> dict[str, list[float]]:
        """The error rates as plain JSON, for a checkpoint (:meth:`load_state` restores them exactly).

        Example:
            >>> HardClassTracker(2).state()
            {'error': [1.0, 1.0]}
        """
        return {"error": [float(e) for e in self.error]}

    def load_state(self, state: dict[str, list[float]]) -> None:
        """Restore what :meth:`state` returned.

        Example:
            >>> t = HardClassTracker(2)
            >>> t.load_state({"error": [0.25, 0.5]})
            >>> t.weights().tolist()
            [0.35, 0.65]
        """
        error = np.asarray(state.get("error", []), dtype=np.float64)
        if error.shape != self.error.shape or not np.isfinite(error).all() or (error < 0).any():
            raise UserError(
                f"saved hard-selection state holds {error.size} error rates for {self.error.size} "
                "classes; resume with the run's own config and data"
            )
        self.error = error

    def weights(self) -> np.ndarray:
        """Sampling weights (summing to 1), highest for the classes the learner gets wrong most.

        Example:
            >>> HardClassTracker(2).weights().tolist()
            [0.5, 0.5]
        """
        total = self.error.sum()
        share = self.error / total if total > 0 else np.full(len(self.error), 1 / len(self.error))
        return (1 - self.uniform_mix) * share + self.uniform_mix / len(self.error)
