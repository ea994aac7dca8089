"""predict and features on folders of image files: the same answers as evaluate, CSV, bad input."""

from __future__ import annotations

import csv
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, synthetic_images, train_synthetic
from PIL import Image

from metaml import runs
from metaml.algorithms.features import feature_extractor
from metaml.config import load_config
from metaml.data import ClassDataset
from metaml.errors import UserError
from metaml.evaluate import evaluate
from metaml.predict import (
    Prediction,
    export_features,
    predict_folder,
    run_preprocessing,
    write_predictions,
)
from metaml.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


def save_png(image: np.ndarray, path: Path) -> None:
    """Save a ``(1, H, W)`` uint8 image as a grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image[0])).save(path)


def write_episode(
    task: Task, class_names: list[str], where: Path, invert: bool
) -> tuple[Path, Path, dict[str, str]]:
    """Write an episode as ``support/<class>/sN.png`` and ``query/qNNN.png`` image files.

    The episode holds preprocessed images; ``invert`` undoes the run's inversion, which
    predict applies again. Returns the two folders and each query file's true class.
    """

    def to_u8(x: torch.Tensor) -> np.ndarray:
        u8 = (x * 255).round().to(torch.uint8).numpy()
        return 255 - u8 if invert else u8

    support, query = where / "support", where / "query"
    for j, (x, y) in enumerate(zip(task.support_x, task.support_y.tolist(), strict=True)):
        save_png(to_u8(x), support / class_names[y] / f"s{j}.png")
    truth = {}
    for k, (x, y) in enumerate(zip(task.query_x, task.query_y.tolist(), strict=True)):
        save_png(to_u8(x), query / f"q{k:03d}.png")
        truth[f"q{k:03d}.png"] = class_names[y]
    return support, query, truth


def accuracy(predictions: list[Prediction], truth: dict[str, str]) -> float:
    assert sorted(p.file for p in predictions) == sorted(truth)
    return sum(p.label == truth[p.file] for p in predictions) / len(truth)


# -- predict on held-out Omniglot characters equals evaluate ------------------------------------


@pytest.mark.slow
def test_predict_on_omniglot_folders_matches_evaluate(omniglot_root: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset=omniglot-small",
            f"data.root={omniglot_root}",
            "data.ways=5",
            "data.shots=1",
            "data.queries=5",
            "data.meta_batch_size=2",
            "model.backbone=conv4",
            "model.backbone_options={hidden: 16}",
            "algorithm.name=protonet",
            "train.steps=30",
            "train.val_every=30",
            "train.val_tasks=5",
            "train.checkpoint_every=30",
            "device=cpu",
        ],
    )
    run_dir = runs.train(cfg, tmp_path / "run", quiet=True)
    test = runs.build_samplers(runs.read_config(run_dir)).test
    episodes = 8
    result = evaluate(runs.load_learner(run_dir, device="cpu"), test, episodes=episodes)
    dataset = test.source
    assert isinstance(dataset, ClassDataset)
    scores = []
    for i in range(episodes):
        task = test.episode(i)
        assert task.classes is not None
        # Folders named after the held-out characters, so that their sorted order (the label
        # order predict uses) is not the episode's label order.
        names = [dataset.class_names[c].replace("/", "_") for c in task.classes.tolist()]
        support, query, truth = write_episode(task, names, tmp_path / f"ep{i}", invert=True)
        predictions = predict_folder(run_dir, support, query, device="cpu")
        assert {p.label for p in predictions} <= set(names)
        scores.append(accuracy(predictions, truth))
    # equal counts of correct queries (evaluate's scores are float32 means)
    assert scores == pytest.approx(result.scores, abs=1e-6)
    assert run_preprocessing(run_dir)["invert"] is True  # strokes are 1 on 0 once read
    assert 0.2 < result.mean < 1.0  # the run learned something, and makes mistakes to match


# -- a tiny run on synthetic images, for the fast tests -----------------------------------------


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_synthetic(tmp_path_factory.mktemp("protonet"), ["algorithm.name=protonet"])


@pytest.fixture
def folders(protonet_run: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """Episode 0 of the run's test sampler as support/ and query/ folders."""
    test = runs.build_samplers(runs.read_config(protonet_run)).test
    task = test.episode(0)
    names = ["zeta", "alpha", "mu"]  # label 0, 1, 2: not in sorted order
    return write_episode(task, names, tmp_path, invert=False)


def test_predict_folder_matches_evaluate_on_a_synthetic_run(
    protonet_run: Path, folders: tuple[Path, Path, dict[str, str]]
) -> None:
    support, query, truth = folders
    predictions = predict_folder(protonet_run, support, query, device="cpu")
    test = runs.build_samplers(runs.read_config(protonet_run)).test
    result = evaluate(runs.load_learner(protonet_run, device="cpu"), test, episodes=1)
    assert accuracy(predictions, truth) == result.scores[0]
    assert all(0 < p.probability <= 1 for p in predictions)
    assert [p.file for p in predictions] == sorted(truth)


def test_write_predictions_csv_round_trips(tmp_path: Path) -> None:
    predictions = [Prediction("a,b.png", "cat", 0.25), Prediction("c.png", 'say "hi"', 1.0)]
    out = tmp_path / "sub" / "p.csv"
    write_predictions(predictions, out)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["file", "label", "probability"],
        ["a,b.png", "cat", "0.250000"],
        ["c.png", 'say "hi"', "1.000000"],
    ]
    assert [p.name for p in out.parent.iterdir()] == ["p.csv"]  # no temporary file left


def test_cli_predict_writes_csv_or_prints(
    protonet_run: Path,
    folders: tuple[Path, Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    support, query, truth = folders
    out = tmp_path / "predictions.csv"
    args = ["predict", str(protonet_run), "--support", str(support), "--query", str(query)]
    code, stdout, err = run_cli([*args, "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"wrote {len(truth)} predictions to {out}" in stdout
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == sorted(truth)
    assert {r["label"] for r in rows} <= {"zeta", "alpha", "mu"}
    expected = predict_folder(protonet_run, support, query, device="cpu")
    assert [(r["file"], r["label"]) for r in rows] == [(p.file, p.label) for p in expected]
    assert [float(r["probability"]) for r in rows] == pytest.approx(
        [p.probability for p in expected], abs=1e-6
    )
    # the synthetic classes are easy: the labels are mostly right
    assert sum(r["label"] == truth[r["file"]] for r in rows) / len(rows) >= 0.75

    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "file,label,probability" and len(lines) == 1 + len(truth)


def test_predict_steps_default_to_the_runs_eval_steps(tmp_path: Path) -> None:
    # A baseline run fine-tunes 20 steps by default, but its config says eval.steps=0:
    # predict must adapt as metaml eval does.
    run_dir = train_synthetic(
        tmp_path, ["algorithm.name=baseline", "algorithm.finetune_steps=20", "eval.steps=0"]
    )
    test = runs.build_samplers(runs.read_config(run_dir)).test
    support, query, _ = write_episode(test.episode(0), ["a", "b", "c"], tmp_path, invert=False)
    probs = {
        steps: [p.probability for p in predict_folder(run_dir, support, query, steps=steps)]
        for steps in (None, 0, 20)
    }
    assert probs[None] == probs[0]
    assert probs[None] != pytest.approx(probs[20])


# -- bad input ----------------------------------------------------------------------------------


def test_predict_rejects_bad_folders(
    protonet_run: Path, folders: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    support, query, _ = folders
    (support / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty is empty"):
        predict_folder(protonet_run, support, query)
    (support / "empty").rmdir()

    (support / "alpha" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        predict_folder(protonet_run, support, query)
    (support / "alpha" / "broken.png").unlink()

    (query / "notes.png").write_text("hello")
    with pytest.raises(UserError, match=r"cannot read image .*notes\.png"):
        predict_folder(protonet_run, support, query)
    (query / "notes.png").unlink()

    one_class = tmp_path / "one"
    shutil.copytree(support / "mu", one_class / "mu")
    with pytest.raises(UserError, match="has 1 class; give at least two class subfolders"):
        predict_folder(protonet_run, one_class, query)

    empty_query = tmp_path / "no-queries"
    empty_query.mkdir()
    with pytest.raises(UserError, match="has no image files"):
        predict_folder(protonet_run, support, empty_query)


def test_predict_and_features_need_an_image_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(None, ["train.steps=1", "train.val_every=1", "train.val_tasks=1"])
    run_dir = runs.train(cfg, tmp_path / "sinusoid", quiet=True)
    (tmp_path / "q").mkdir()
    save_png(np.zeros((1, 4, 4), np.uint8), tmp_path / "q" / "a.png")
    with pytest.raises(UserError, match="not on images"):
        export_features(run_dir, tmp_path / "q", tmp_path / "f.npy")
    code, _, err = run_cli(
        ["predict", str(run_dir), "--support", str(tmp_path), "--query", str(tmp_path / "q")],
        capsys,
    )
    assert code == 2 and "not on images" in err and "Traceback" not in err


# -- features -----------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    images, _ = synthetic_images()
    chosen = images[[5, 0, 17, 40, 99]]
    names = ["b.png", "a.png", "e.png", "c.png", "d.png"]
    for image, name in zip(chosen, names, strict=True):
        save_png(image, tmp_path / "images" / name)
    order = np.argsort(names)  # files are read sorted by name
    return tmp_path / "images", chosen[order], [names[i] for i in order]


def features_by_hand(run_dir: Path, images: np.ndarray) -> np.ndarray:
    backbone = feature_extractor(runs.load_learner(run_dir, device="cpu"))
    with torch.no_grad():
        out = backbone.forward_features(torch.from_numpy(images).float() / 255)  # type: ignore[operator]
    return out.numpy()


def test_export_features_npy_and_csv(
    protonet_run: Path, image_folder: tuple[Path, np.ndarray, list[str]], tmp_path: Path
) -> None:
    folder, images, names = image_folder
    expected = features_by_hand(protonet_run, images)
    assert expected.shape == (5, 16)

    matrix = export_features(protonet_run, folder, tmp_path / "f.npy", progress=False)
    saved = np.load(tmp_path / "f.npy", allow_pickle=False)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(saved, matrix)

    export_features(protonet_run, folder, tmp_path / "f.csv", batch_size=2, progress=False)
    with open(tmp_path / "f.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file"] + [f"f{i}" for i in range(16)]
    assert [r[0] for r in rows[1:]] == names
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


def test_export_features_through_the_cli(
    protonet_run: Path,
    image_folder: tuple[Path, np.ndarray, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, images, _ = image_folder
    out = tmp_path / "f.npy"
    code, stdout, err = run_cli(
        ["features", str(protonet_run), "--images", str(folder), "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert f"wrote 5 x 16 features to {out}" in stdout
    np.testing.assert_allclose(np.load(out), features_by_hand(protonet_run, images), atol=1e-6)
    code, _, err = run_cli(
        ["features", str(protonet_run), "--images", str(folder), "--out", str(tmp_path / "f.txt")],
        capsys,
    )
    assert code == 2 and "must end in .npy, .csv or .parquet" in err


def test_export_features_parquet_works_or_says_what_is_missing(
    protonet_run: Path, image_folder: tuple[Path, np.ndarray, list[str]], tmp_path: Path
) -> None:
    folder, images, names = image_folder
    out = tmp_path / "f.parquet"
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"\.parquet needs .*pip install"):
            export_features(protonet_run, folder, out, progress=False)
        assert not out.exists()
    else:
        export_features(protonet_run, folder, out, progress=False)
        frame = pd.read_parquet(out)
        assert list(frame["file"]) == names
        expected = features_by_hand(protonet_run, images)
        np.testing.assert_allclose(frame.drop(columns="file").to_numpy(), expected, atol=1e-6)


def test_parquet_without_an_engine_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pandas present but neither pyarrow nor fastparquet: a clear error, raised before the
    # run is even read (the folders here do not exist).
    monkeypatch.setitem(sys.modules, "pandas", types.ModuleType("pandas"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(UserError, match=r"\.parquet needs pyarrow \(pip install pyarrow\)"):
        export_features(tmp_path / "no-run", tmp_path / "no-images", tmp_path / "f.parquet")


def test_images_of_another_size_are_brought_to_the_runs_input(
    protonet_run: Path, tmp_path: Path
) -> None:
    # The npz data records no image size: the run's 6x6 inputs are the target.
    assert run_preprocessing(protonet_run) == {
        "image_size": [6, 6], "channels": 1, "invert": False, "resample": "lanczos",
    }  # fmt: skip
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        (tmp_path / "big").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / "big" / name)
    features = export_features(protonet_run, tmp_path / "big", tmp_path / "f.npy", progress=False)
    assert features.shape == (2, 16)
