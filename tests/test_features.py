"""Feature extraction and FeatureClassifier against SimpleShot in numpy and sklearn by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, train_synthetic
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from metaml import runs
from metaml.algorithms import create_learner
from metaml.algorithms.features import FeatureClassifier, embed, feature_extractor
from metaml.algorithms.protonet import ProtoNet
from metaml.config import load_config
from metaml.errors import UserError
from metaml.nn import create_backbone
from metaml.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")


def simpleshot(support: np.ndarray, support_y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """SimpleShot (Wang et al. 2019) by hand: centre on the support mean, L2-normalise, and
    score each class by minus the squared distance to its mean normalised support feature."""
    center = support.mean(axis=0)
    s = support - center
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    q = query - center
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    scores = np.zeros((len(q), support_y.max() + 1))
    for c in range(support_y.max() + 1):
        mean = s[support_y == c].mean(axis=0)
        for i in range(len(q)):
            scores[i, c] = -np.sum((q[i] - mean) ** 2)
    return scores


def features_by_hand(backbone: nn.Module, x: Tensor) -> np.ndarray:
    backbone.eval()
    with torch.no_grad():
        out: Tensor = backbone.forward_features(x)  # type: ignore[operator]
    return out.double().numpy()


def episode(seed: int = 0, ways: int = 4, shots: int = 3, queries: int = 5, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots)
    support_y = support_y[torch.randperm(len(support_y), generator=g)]  # not class-major
    centers = 2 * torch.randn(ways, dim, generator=g)
    support_x = centers[support_y] + torch.randn(len(support_y), dim, generator=g)
    query_y = torch.arange(ways).repeat_interleave(queries)
    query_x = centers[query_y] + torch.randn(len(query_y), dim, generator=g)
    return support_x, support_y, query_x, query_y


def test_centroid_equals_simpleshot_in_numpy() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("mlp", in_shape=(6,), num_outputs=0, hidden=(16,))
    support_x, support_y, query_x, _ = episode()
    predict = FeatureClassifier(backbone, "centroid").adapt(support_x, support_y)
    with torch.no_grad():
        got = predict(query_x).double().numpy()
    expected = simpleshot(
        features_by_hand(backbone, support_x),
        support_y.numpy(),
        features_by_hand(backbone, query_x),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_logreg_equals_sklearn_fitted_by_hand() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("mlp", in_shape=(6,), num_outputs=0, hidden=(16,))
    support_x, support_y, query_x, _ = episode(seed=1)
    predict = FeatureClassifier(backbone, "logreg").adapt(support_x, support_y)
    with torch.no_grad():
        got = predict(query_x).double().numpy()
    s = features_by_hand(backbone, support_x)
    q = features_by_hand(backbone, query_x)
    model = LogisticRegression(max_iter=1000, C=1.0)
    model.fit(s / np.linalg.norm(s, axis=1, keepdims=True), support_y.numpy())
    expected = model.predict_log_proba(q / np.linalg.norm(q, axis=1, keepdims=True))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("classifier", ["centroid", "logreg"])
def test_classifiers_separate_separable_classes(classifier: str) -> None:
    torch.manual_seed(0)
    identity = create_backbone("mlp", in_shape=(6,), num_outputs=0, hidden=())  # features = x
    support_x, support_y, query_x, query_y = episode(seed=2)
    predict = FeatureClassifier(identity, classifier).adapt(support_x, support_y)  # type: ignore[arg-type]
    with torch.no_grad():
        accuracy = (predict(query_x).argmax(1) == query_y).float().mean().item()
    assert accuracy > 0.8  # chance 0.25


def test_feature_extractor_finds_the_backbone_of_each_learner() -> None:
    backbone = create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,))
    assert feature_extractor(ProtoNet(backbone)) is backbone
    maml = create_learner(load_config(None, ["algorithm.name=maml"]), (1,), "regression", ways=1)
    assert feature_extractor(maml) is maml.model  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="Linear has no backbone"):
        feature_extractor(nn.Linear(2, 2))


def test_embed_batches_eval_mode_and_leaves_the_backbone_as_it_was() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=0, hidden=4)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.rand(7, 1, 28, 28)
    got = embed(backbone, x, batch_size=3)  # batches of 3, 3, 1
    assert backbone.training
    for key, value in before.items():
        assert torch.equal(value, backbone.state_dict()[key]), key
    expected = features_by_hand(backbone, x)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_feature_classifier_rejects_bad_use() -> None:
    backbone = create_backbone("mlp", in_shape=(2,), num_outputs=0, hidden=(8,))
    with pytest.raises(UserError, match="unknown classifier 'knn'"):
        FeatureClassifier(backbone, "knn")  # type: ignore[arg-type]
    batch = TaskBatch(
        torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2)
    )
    with pytest.raises(UserError, match="not trained"):
        FeatureClassifier(backbone).meta_loss(batch)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ProtoNet run on a synthetic npz image dataset of 20 classes."""
    return train_synthetic(tmp_path_factory.mktemp("features-run"), ["algorithm.name=protonet"])


def test_cli_eval_with_the_centroid_classifier(
    protonet_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        ["eval", str(protonet_run), "--classifier", "centroid", "--episodes", "6", "--json",
         "--quiet"], capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    # Each episode's accuracy, from the run's test episodes and SimpleShot by hand.
    backbone = feature_extractor(runs.load_learner(protonet_run, device="cpu"))
    test = runs.build_samplers(runs.read_config(protonet_run)).test
    expected = []
    for i in range(6):
        task = test.episode(i)
        scores = simpleshot(
            features_by_hand(backbone, task.support_x),
            task.support_y.numpy(),
            features_by_hand(backbone, task.query_x),
        )
        expected.append(float((scores.argmax(1) == task.query_y.numpy()).mean()))
    assert result["scores"] == pytest.approx(expected)
    assert result["metric"] == "accuracy" and result["mean"] == pytest.approx(np.mean(expected))
    saved = list((protonet_run / "eval").glob("*centroid*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["scores"] == result["scores"]


def test_cli_eval_rejects_an_unknown_classifier(
    protonet_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["eval", str(protonet_run), "--classifier", "knn", "--episodes", "2", "--quiet"], capsys
    )
    assert code == 2
    assert "unknown classifier 'knn'" in err and "Traceback" not in err
