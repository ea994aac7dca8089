"""Glyphs: a bundled Omniglot-like corpus of real writing systems, drawn from the Noto fonts.

Scripts (Armenian, Ethiopic, Tifinagh, ...) are groups, characters are classes, and every
character has 20 renderings by different "drawers" (font, random affine transform, elastic
distortion, pen width and tremor), 28x28 uint8, bright strokes on black like the inverted
Omniglot the loader gives. It ships inside the package (``metaml/data/assets/glyphs.npz`` and
``glyphs.json``), so it needs no download; ``tools/build_glyphs.py`` rebuilds it and
``docs/glyphs.md`` says how.

The train / val / test split is fixed and by script: it is ``ClassDataset.split("group",
(0.6, 0.2, 0.2), seed=0)`` of the whole corpus (the split a run makes with the default
``split_by``, ``split_fractions`` and ``split_seed``), and the manifest records its script lists.

Example:
    >>> ds = load_glyphs()
    >>> ds.shape, int(ds.examples_per_class().min())
    ((1, 28, 28), 20)
    >>> train = load_glyphs(split="train")
    >>> set(train.groups) == set(glyphs_manifest()["split"]["train"])
    True
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metaml.data.class_dataset import ClassDataset
from metaml.errors import UserError

SPLITS = ("train", "val", "test")
NPZ, MANIFEST = "glyphs.npz", "glyphs.json"


def glyphs_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """The corpus manifest: scripts, classes (character, code point, fonts), split, licence.

    ``root`` is a folder with a rebuilt ``glyphs.npz`` and ``glyphs.json``; by default the copy
    bundled with metaml is read.

    Example:
        >>> m = glyphs_manifest()
        >>> m["classes"][0]["script"], m["classes"][0]["codepoint"]
        ('Latin', 'U+0041')
    """
    with _asset(root, MANIFEST).open("r", encoding="utf-8") as fh:
        manifest: dict[str, Any] = json.load(fh)
    return manifest


def load_glyphs(
    root: str | Path | None = None,
    split: str | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> ClassDataset:
    """Load the glyph corpus (all of it, or its fixed ``"train"``, ``"val"`` or ``"test"`` split).

    Classes are named ``<script>/U+XXXX`` and grouped by script; ``image_size`` resizes with
    Lanczos (the stored images are 28x28).

    Example:
        >>> ds = load_glyphs(split="test")
        >>> ds.class_names[0].split("/")[1].startswith("U+")
        True
        >>> load_glyphs(split="val", image_size=14).shape
        (1, 14, 14)
    """
    if split is not None and split not in SPLITS:
        raise UserError(f"glyphs split must be one of {', '.join(SPLITS)} (or none); got {split!r}")
    manifest = glyphs_manifest(root)
    with _asset(root, NPZ).open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        images = z["images"]  # (classes, drawers, H, W) uint8
        codepoints = z["codepoints"]
    _check_matches(manifest, images, codepoints)
    ds = _to_dataset(images, manifest, image_size)
    if split is None:
        return ds
    rule = manifest["split"]
    parts = ds.split(rule["by"], rule["fractions"], rule["seed"])
    return parts[SPLITS.index(split)]


def _asset(root: str | Path | None, name: str) -> Any:
    # importlib.resources finds the bundled files in any install (site-packages, editable, zip).
    if root is None:
        return resources.files("metaml.data").joinpath("assets", name)
    path = Path(root).expanduser() / name
    if not path.exists():
        raise UserError(
            f"{path} not found; pass a root holding {NPZ} and {MANIFEST} "
            "(made by tools/build_glyphs.py --out DIR), or no root for the bundled corpus"
        )
    return path


def _check_matches(manifest: dict[str, Any], images: np.ndarray, codepoints: np.ndarray) -> None:
    # A hand-edited or half-copied corpus would silently mislabel classes: refuse it.
    listed = [int(c["codepoint"][2:], 16) for c in manifest["classes"]]
    if images.ndim != 4 or images.dtype != np.uint8 or listed != codepoints.tolist():
        raise UserError(
            f"{NPZ} does not match {MANIFEST} ({len(listed)} classes listed, images "
            f"{images.dtype} {images.shape}); rebuild both with tools/build_glyphs.py"
        )


def _to_dataset(
    images: np.ndarray, manifest: dict[str, Any], image_size: int | tuple[int, int] | None
) -> ClassDataset:
    classes, drawers = images.shape[:2]
    flat = images.reshape(classes * drawers, *images.shape[2:])  # (n, H, W), class-major
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None and tuple(size) != flat.shape[1:]:
        if min(size) < 1:
            raise UserError(f"image_size must be positive; got {image_size!r}")
        flat = np.stack([_resize(im, (int(size[0]), int(size[1]))) for im in flat])
    meta = manifest["classes"]
    config = {
        "reader": "glyphs",
        "dataset": "glyphs",
        "format_version": manifest.get("format_version"),
        "image_size": list(flat.shape[1:]),
        "channels": 1,
        # Like inverted Omniglot: new black-on-white drawings need invert=True to match.
        "invert": True,
        "resample": "lanczos",
    }
    return ClassDataset(
        torch.from_numpy(np.ascontiguousarray(flat[:, None])),
        torch.arange(classes).repeat_interleave(drawers),
        [f"{c['script']}/{c['codepoint']}" for c in meta],
        [c["script"] for c in meta],
        config=config,
    )


def _resize(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = Image.fromarray(im).resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(out)
