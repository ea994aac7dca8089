"""Prototypical Networks (Snell et al., 2017, "Prototypical Networks for Few-shot Learning").

Each class is represented by the mean embedding of its support examples (its prototype); a query
is classified by a softmax over negative distances to the prototypes. Meta-training minimises the
query cross-entropy, so the backbone learns an embedding in which this works.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor
from metaml.nn.backbones import channels_last_input
from metaml.tasks import TaskBatch


class ProtoNet(MetaLearner):
    """Prototypical network on a backbone's ``forward_features``.

    ``distance="euclidean"`` uses the squared Euclidean distance (the paper's choice);
    ``"cosine"`` uses cosine similarity scaled by a learned temperature. ``adapt`` computes the
    prototypes once; BatchNorm runs in eval mode there (running statistics from meta-training).

    Example:
        >>> from metaml.nn import create_backbone
        >>> net = ProtoNet(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)))
        >>> predict = net.adapt(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
        >>> predict(torch.randn(3, 2)).shape
        torch.Size([3, 2])
    """

    task_type = "classification"

    def __init__(self, backbone: nn.Module, distance: Literal["euclidean", "cosine"] = "euclidean"):
        super().__init__()
        self.backbone = backbone
        self.distance = distance
        # Cosine similarities lie in [-1, 1]; a learned scale lets the softmax become confident.
        self.scale = nn.Parameter(torch.tensor(10.0)) if distance == "cosine" else None

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``(n, d)`` of inputs ``(n, ...)`` (in the backbone's fastest layout:
        :func:`~metaml.nn.channels_last_input`)."""
        x = channels_last_input(self.backbone, x)
        features: Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return features.flatten(1)

    def logits(self, prototypes: Tensor, queries: Tensor) -> Tensor:
        """Class scores ``(..., q, ways)`` from prototypes ``(..., ways, d)`` and queries ``(..., q, d)``."""
        if self.distance == "cosine":
            assert self.scale is not None
            return (
                self.scale
                * F.normalize(queries, dim=-1)
                @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
            )
        # Not cdist's default: beyond 25 rows it expands |q|^2 - 2 q.p + |p|^2, which loses
        # most digits when features share a large offset (ReLU features do): an error of 0.02
        # on squared distances of 0.005 in float32.
        distances = torch.cdist(queries, prototypes, compute_mode="donot_use_mm_for_euclid_dist")
        return -distances.pow(2)

    exposes_query_outputs = True

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Query cross-entropy of all tasks, embedded in one forward pass."""
        loss, metrics, _ = self.meta_loss_with_outputs(batch)
        return loss, metrics

    def meta_loss_with_outputs(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`meta_loss` and the query logits ``(B, Q, ways)``, detached.

        Example:
            >>> from metaml.nn import create_backbone
            >>> net = ProtoNet(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)))
            >>> y = torch.tensor([[0, 1]])
            >>> net.meta_loss_with_outputs(TaskBatch(torch.randn(1, 2, 2), y, torch.randn(1, 2, 2), y))[2].shape
            torch.Size([1, 2, 2])
        """
        tasks, n_support = batch.support_y.shape
        n_query = batch.query_y.shape[1]
        # (B, S, ...) and (B, Q, ...) -> one (B*(S+Q), ...) batch through the backbone.
        inputs = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        embeddings = self.embed(inputs)
        support = embeddings[: tasks * n_support].view(tasks, n_support, -1)  # (B, S, d)
        query = embeddings[tasks * n_support :].view(tasks, n_query, -1)  # (B, Q, d)
        prototypes = class_means(support, batch.support_y)  # (B, ways, d)
        logits = self.logits(prototypes, query)  # (B, Q, ways)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        acc = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}, logits.detach()

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Compute the prototypes of the support set; ``steps`` is ignored (no inner loop).

        The backbone runs in eval mode here and in the predictor, whatever the learner's mode:
        BatchNorm uses its running statistics and never updates them.
        """
        with torch.no_grad(), _eval_mode(self.backbone):
            prototypes = class_means(self.embed(support_x)[None], support_y[None])[0]

        def predict(query_x: Tensor) -> Tensor:
            with _eval_mode(self.backbone):
                return self.logits(prototypes, self.embed(query_x))

        return predict


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block, then restore its mode."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def class_means(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Per-class mean embeddings ``(B, ways, d)`` from ``(B, n, d)`` embeddings and ``(B, n)`` labels.

    Example:
        >>> class_means(torch.tensor([[[1.0], [3.0], [5.0]]]), torch.tensor([[0, 0, 1]])).tolist()
        [[[2.0], [5.0]]]
    """
    ways = int(labels.max().item()) + 1
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)  # (B, n, ways)
    sums = one_hot.transpose(1, 2) @ embeddings  # (B, ways, d)
    return sums / one_hot.sum(1).unsqueeze(-1)
