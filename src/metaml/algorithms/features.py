"""Feature extraction: a meta-learned backbone as a fixed embedding, plus a scikit-learn classifier.

Any trained learner's backbone can be exported (:func:`feature_extractor`) and used to embed
images; :class:`FeatureClassifier` fits a scikit-learn classifier on the support embeddings of
each task, which is a strong and cheap few-shot baseline (Tian et al. 2020; Wang et al. 2019,
"SimpleShot").
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor
from metaml.errors import UserError
from metaml.tasks import TaskBatch

ClassifierKind = Literal["logreg", "centroid"]


def feature_extractor(learner: nn.Module) -> nn.Module:
    """The backbone of a trained learner: a module with ``forward_features(x) -> (n, d)``.

    Example:
        >>> from metaml.nn import create_backbone
        >>> from metaml.algorithms.protonet import ProtoNet
        >>> net = ProtoNet(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)))
        >>> feature_extractor(net) is net.backbone
        True
    """
    for name in ("backbone", "model"):
        module = getattr(learner, name, None)
        if isinstance(module, nn.Module) and hasattr(module, "forward_features"):
            return module
    raise UserError(
        f"{type(learner).__name__} has no backbone with forward_features to extract features from"
    )


@torch.no_grad()
def embed(backbone: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Embeddings ``(n, d)`` of ``x`` in eval mode, computed in batches.

    Example:
        >>> from metaml.nn import create_backbone
        >>> embed(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)), torch.randn(5, 2)).shape
        torch.Size([5, 8])
    """
    training = backbone.training
    backbone.eval()
    try:
        forward_features = backbone.forward_features
        assert callable(forward_features)
        parts = [
            forward_features(x[i : i + batch_size]).flatten(1) for i in range(0, len(x), batch_size)
        ]
    finally:
        backbone.train(training)
    return torch.cat(parts)


class FeatureClassifier(MetaLearner):
    """Embed with a frozen backbone, then fit a scikit-learn classifier on each support set.

    ``classifier="logreg"``: L2-normalised features, multinomial logistic regression.
    ``classifier="centroid"``: SimpleShot's nearest centroid: features centred on the support
    mean, L2-normalised, and each query assigned to the nearest class mean (scores are negative
    squared distances). Not trainable: build it from a trained run's backbone.

    Example:
        >>> from metaml.nn import create_backbone
        >>> clf = FeatureClassifier(create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,)), "centroid")
        >>> predict = clf.adapt(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
        >>> predict(torch.randn(3, 2)).shape
        torch.Size([3, 2])
    """

    task_type = "classification"

    def __init__(self, backbone: nn.Module, classifier: ClassifierKind = "centroid"):
        super().__init__()
        if classifier not in ("logreg", "centroid"):
            raise UserError(f"unknown classifier {classifier!r}; use logreg or centroid")
        self.backbone = backbone
        self.classifier = classifier

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Not trainable: the backbone comes from another, trained learner."""
        raise UserError(
            "FeatureClassifier is not trained itself; train ProtoNet, MAML or the baseline, then wrap its backbone"
        )

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Fit the classifier on the support embeddings; ``steps`` is ignored."""
        support = embed(self.backbone, support_x)
        labels = support_y.cpu().numpy()
        if self.classifier == "centroid":
            return self._centroid(support, support_y)
        model = LogisticRegression(max_iter=1000, C=1.0)
        model.fit(_l2(support).cpu().numpy(), labels)

        def predict(query_x: Tensor) -> Tensor:
            proba = model.predict_log_proba(_l2(embed(self.backbone, query_x)).cpu().numpy())
            return torch.from_numpy(proba.astype(np.float32)).to(query_x.device)

        return predict

    def _centroid(self, support: Tensor, support_y: Tensor) -> Predictor:
        center = support.mean(0, keepdim=True)
        ways = int(support_y.max().item()) + 1
        normed = _l2(support - center)
        means = torch.stack([normed[support_y == c].mean(0) for c in range(ways)])  # (ways, d)

        def predict(query_x: Tensor) -> Tensor:
            query = _l2(embed(self.backbone, query_x) - center)
            return -torch.cdist(query, means).pow(2)

        return predict


def _l2(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1)
