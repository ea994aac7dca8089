"""Use a trained run on a user's own images: label a query folder, or export embeddings.

Images are read and preprocessed exactly as the run's training data was (resize, channels,
invert, then scaling to [0, 1]), so a folder of raw images behaves like the run's episodes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metaml import runs
from metaml.algorithms.features import embed, feature_extractor
from metaml.data import read_folder, read_images
from metaml.errors import UserError
from metaml.io import atomic_write


@dataclass(frozen=True)
class Prediction:
    """The predicted class of one query file and its probability."""

    file: str
    label: str
    probability: float


def run_preprocessing(run_dir: str | Path) -> dict[str, Any]:
    """The image preprocessing of a run's training data (image_size, channels, invert, resample).

    Read from the run's ``model.json``, so the training data need not be present.

    Example:
        >>> # run_preprocessing("runs/protonet-omniglot")
        >>> # {'image_size': [28, 28], 'channels': 1, 'invert': True, 'resample': 'lanczos'}
    """
    spec = runs.read_model_spec(run_dir)
    pre = (
        spec["preprocess"]
        if spec is not None
        else runs.build_samplers(runs.read_config(run_dir)).preprocess
    )
    if pre is None:
        cfg = runs.read_config(run_dir)
        raise UserError(
            f"run {run_dir} was trained on {cfg.data.dataset!r}, not on images; predict and features need an image run"
        )
    return dict(pre)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the float32 [0, 1] tensors the learners see (as the sampler does).

    Example:
        >>> to_float(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist()
        [[0.0, 1.0]]
    """
    return images.float().div_(255)


def predict_folder(
    run_dir: str | Path,
    support: str | Path,
    query: str | Path,
    *,
    steps: int | None = None,
    checkpoint: str = "best",
    device: str = "auto",
) -> list[Prediction]:
    """Adapt a run's learner to ``support`` (one subfolder per class) and label every image in ``query``.

    ``steps=None`` adapts as ``metaml eval`` does: the run's ``eval.steps`` when set, else the
    learner's own default (``test_inner_steps``, ``inner_steps`` or ``finetune_steps``).

    Example:
        >>> # for p in predict_folder("runs/protonet", "my_support", "my_queries"):
        >>> #     print(p.file, p.label, f"{p.probability:.2f}")
    """
    pre = run_preprocessing(run_dir)
    support_set = read_folder(support, cache=False, **pre)
    if support_set.num_classes < 2:
        raise UserError(
            f"support folder {support} has {support_set.num_classes} class; give at least two class subfolders"
        )
    query_images, names = read_images(query, **pre)
    learner = runs.load_learner(run_dir, checkpoint=checkpoint, device=device)
    if steps is None:
        steps = runs.read_config(run_dir).eval.steps
    target = next(learner.parameters()).device
    predictor = learner.adapt(
        to_float(support_set.images).to(target), support_set.targets.to(target), steps=steps
    )
    with torch.no_grad():
        proba = torch.softmax(predictor(to_float(query_images).to(target)), dim=-1).cpu()
    best, index = proba.max(dim=-1)
    return [
        Prediction(n, support_set.class_names[i], float(p))
        for n, i, p in zip(names, index.tolist(), best.tolist(), strict=True)
    ]


def write_predictions(predictions: list[Prediction], out: str | Path) -> None:
    """Write predictions as CSV (file, label, probability), atomically.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "p.csv"
        >>> write_predictions([Prediction("a.png", "cat", 0.9)], path)
        >>> path.read_text().splitlines()[1]
        'a.png,cat,0.900000'
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["file", "label", "probability"])
            writer.writerows([p.file, p.label, f"{p.probability:.6f}"] for p in predictions)

    atomic_write(out, write)


def export_features(
    run_dir: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Embed every image in a folder with a run's backbone and save ``(n, d)`` features.

    ``out`` ends in ``.npy``, ``.csv`` (a ``file`` column, then ``f0..f{d-1}``) or ``.parquet``
    (needs pandas with pyarrow).

    Example:
        >>> # export_features("runs/protonet", "my_images", "features.npy").shape
    """
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".csv", ".parquet"):
        raise UserError(f"--out {out} must end in .npy, .csv or .parquet")
    if out.suffix.lower() == ".parquet":
        _require_parquet()  # before the embedding work, not after it
    pre = run_preprocessing(run_dir)
    image_u8, names = read_images(images, **pre)
    backbone = feature_extractor(runs.load_learner(run_dir, checkpoint=checkpoint, device=device))
    target = next(backbone.parameters()).device
    chunks = []
    for start in tqdm(
        range(0, len(names), batch_size), desc="features", disable=not progress, unit="batch"
    ):
        chunks.append(
            embed(backbone, to_float(image_u8[start : start + batch_size]).to(target)).cpu()
        )
    features = torch.cat(chunks).numpy()
    _save_features(features, names, out)
    return features


def _require_parquet() -> None:
    """Raise a :class:`UserError` unless pandas and a parquet engine (pyarrow, fastparquet) import."""
    missing = []
    try:
        import pandas  # noqa: F401
    except ImportError:
        missing.append("pandas")
    engines = 0
    for engine in ("pyarrow", "fastparquet"):
        try:
            __import__(engine)
            engines += 1
        except ImportError:
            pass
    if not engines:
        missing.append("pyarrow")
    if missing:
        raise UserError(
            f"writing .parquet needs {' and '.join(missing)} (pip install {' '.join(missing)}); "
            "or use .npy or .csv"
        )


def _save_features(features: np.ndarray, names: list[str], out: Path) -> None:
    suffix = out.suffix.lower()
    if suffix == ".npy":

        def write_npy(tmp: str) -> None:
            # A file object, because np.save would append ".npy" to the temporary name.
            with open(tmp, "wb") as fh:
                np.save(fh, features, allow_pickle=False)

        atomic_write(out, write_npy)
        return
    columns = [f"f{i}" for i in range(features.shape[1])]
    if suffix == ".csv":

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["file", *columns])
                writer.writerows(
                    [name, *map(repr, row.tolist())]
                    for name, row in zip(names, features, strict=True)
                )

        atomic_write(out, write)
        return
    _require_parquet()
    import pandas as pd

    frame = pd.DataFrame(features, columns=columns)
    frame.insert(0, "file", names)
    atomic_write(out, lambda tmp: frame.to_parquet(tmp, index=False))
