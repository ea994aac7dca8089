"""The fine-tuning baseline every few-shot paper must beat: Baseline and Baseline++.

Chen et al. 2019, "A Closer Look at Few-shot Classification": pre-train the backbone with ordinary
supervised learning on all training classes, then, for each new task, fit a fresh classifier
head on the support set with the backbone frozen. ``head="linear"`` is *Baseline*;
``head="cosine"`` is *Baseline++* (cosine similarity to learned class weight vectors, scaled).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaml.algorithms.base import MetaLearner, Predictor
from metaml.errors import UserError
from metaml.tasks import TaskBatch

HeadKind = Literal["linear", "cosine"]


class CosineHead(nn.Module):
    """Baseline++'s classifier: ``scale * cos(x, w_c)`` for each class weight ``w_c``.

    Example:
        >>> CosineHead(4, 3)(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.01)
        # Cosines lie in [-1, 1]; the paper's fixed scale lets the softmax become confident.
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def make_head(kind: HeadKind, in_features: int, num_classes: int) -> nn.Module:
    """A linear (Baseline) or cosine (Baseline++) classifier head.

    Example:
        >>> make_head("linear", 8, 5)
        Linear(in_features=8, out_features=5, bias=True)
    """
    return (
        nn.Linear(in_features, num_classes)
        if kind == "linear"
        else CosineHead(in_features, num_classes)
    )


class Baseline(MetaLearner):
    """Supervised pre-training on all training classes; a new head fitted per task.

    ``meta_loss`` treats every example of the batch's episodes as an ordinary labelled example of
    its dataset class (``batch.classes`` maps task labels back to dataset classes), so the usual
    trainer does plain supervised pre-training. ``adapt`` fits a fresh head on the frozen support
    embeddings with SGD (momentum 0.9, weight decay 1e-3, mini-batches of 4, as in the paper);
    ``finetune_all=True`` fine-tunes the backbone too. BatchNorm stays in eval mode (running
    statistics from pre-training) during adaptation: a support set of 5 images is too small for
    batch statistics. Each adaptation is seeded, so evaluation is deterministic.

    Example:
        >>> from metaml.nn import create_backbone
        >>> net = Baseline(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)), num_classes=10)
        >>> predict = net.adapt(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), steps=5)
        >>> predict(torch.randn(3, 2)).shape
        torch.Size([3, 2])
    """

    task_type = "classification"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: HeadKind = "linear",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_batch_size: int = 4,
        finetune_all: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head_kind: HeadKind = head
        self.num_features = int(backbone.num_features)  # type: ignore[arg-type]
        self.classifier = make_head(head, self.num_features, num_classes)
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.finetune_all = finetune_all

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features ``(n, d)``."""
        features: Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return features.flatten(1)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy over all training classes on every example of the batch."""
        if batch.classes is None:
            raise UserError(
                "the baseline pre-trains on class labels; use a class dataset, not a regression task family"
            )
        inputs = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        local = torch.cat([batch.support_y, batch.query_y], dim=1)  # (B, S+Q) task labels
        targets = torch.gather(batch.classes, 1, local)  # (B, S+Q) dataset classes
        support_targets, query_targets = (
            targets[:, : batch.support_y.shape[1]],
            targets[:, batch.support_y.shape[1] :],
        )
        targets = torch.cat([support_targets.flatten(), query_targets.flatten()])
        logits = self.classifier(self.embed(inputs))
        loss = F.cross_entropy(logits, targets)
        acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Fit a fresh head (and, with ``finetune_all``, the backbone) on the support set."""
        steps = self.finetune_steps if steps is None else steps
        ways = int(support_y.max().item()) + 1
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            head = make_head(self.head_kind, self.num_features, ways).to(support_x.device)
        backbone_params = {k: v.detach().clone() for k, v in self.backbone.named_parameters()}
        buffers = dict(self.backbone.named_buffers())
        trainable = list(head.parameters()) + (
            list(backbone_params.values()) if self.finetune_all else []
        )
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(trainable, lr=self.finetune_lr, momentum=0.9, weight_decay=1e-3)
        was_training = self.backbone.training
        self.backbone.eval()

        def embed(x: Tensor) -> Tensor:
            return backbone_features(self.backbone, backbone_params, buffers, x)

        try:
            frozen = None if self.finetune_all else embed(support_x).detach()
            with torch.enable_grad():
                for _ in range(steps):
                    pick = torch.randperm(len(support_y), generator=generator)[
                        : self.finetune_batch_size
                    ].to(support_x.device)
                    features = frozen[pick] if frozen is not None else embed(support_x[pick])
                    loss = F.cross_entropy(head(features), support_y[pick])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            self.backbone.train(was_training)
        head.requires_grad_(False)
        for p in backbone_params.values():
            p.requires_grad_(False)

        def predict(query_x: Tensor) -> Tensor:
            training = self.backbone.training
            self.backbone.eval()
            try:
                return head(embed(query_x))
            finally:
                self.backbone.train(training)

        return predict


def backbone_features(
    backbone: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
) -> Tensor:
    """``backbone.forward_features(x)`` computed with ``params`` in place of the backbone's own.

    Example:
        >>> from metaml.nn import create_backbone
        >>> net = create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,))
        >>> params = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
        >>> backbone_features(net, params, {}, torch.randn(3, 2)).abs().sum().item()
        0.0
    """
    wrapped = _ForwardFeatures(backbone)
    state = {f"m.{k}": v for k, v in {**params, **buffers}.items()}
    out: Tensor = functional_call(wrapped, state, (x,))
    return out.flatten(1)


class _ForwardFeatures(nn.Module):
    """Wraps a backbone so that ``functional_call`` runs its ``forward_features``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.m = backbone

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.m.forward_features(x)  # type: ignore[operator]
        return out
