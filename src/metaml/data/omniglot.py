"""Omniglot (Lake et al., 2015): handwritten characters of many alphabets, 20 drawings each.

The archives are read in place (zip, or the same folder extracted) from a *root* folder:

=======================  =====================================================  ===========
name                     archives                                               alphabets
=======================  =====================================================  ===========
``omniglot-small1``      ``images_background_small1``                           5 (136 chars)
``omniglot-small2``      ``images_background_small2``                           5 (156 chars)
``omniglot-small``       both; Greek and Latin are in both, kept once            8 (242 chars)
``omniglot-background``  ``images_background``                                  30
``omniglot-evaluation``  ``images_evaluation``                                  20
``omniglot``             background + evaluation                                50 (1623)
=======================  =====================================================  ===========

Defaults: 28x28 (Lanczos, as in the MAML reference code), grayscale, inverted so that strokes
are 1 on a 0 background. Classes are named ``<alphabet>/<character>``; groups are alphabets.
metaml never downloads: get the zips from https://github.com/brendenlake/omniglot (``python/``).

Example:
    >>> ds = load_omniglot("omniglot-small1", root="../shared/data/omniglot")  # doctest: +SKIP
    >>> ds.describe()["classes"], ds.shape  # doctest: +SKIP
    (136, (1, 28, 28))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metaml.data.class_dataset import ClassDataset
from metaml.data.readers import read_folder, read_zip
from metaml.errors import UserError, unknown_name_error

ARCHIVES: dict[str, tuple[str, ...]] = {
    "omniglot-small1": ("images_background_small1",),
    "omniglot-small2": ("images_background_small2",),
    "omniglot-small": ("images_background_small1", "images_background_small2"),
    "omniglot-background": ("images_background",),
    "omniglot-evaluation": ("images_evaluation",),
    "omniglot": ("images_background", "images_evaluation"),
}
DESCRIPTIONS = {
    "omniglot-small1": "Omniglot background 'small1' subset: 5 alphabets, 136 characters",
    "omniglot-small2": "Omniglot background 'small2' subset: 5 alphabets, 156 characters",
    "omniglot-small": "both small subsets: 8 alphabets, 242 characters (shared ones once)",
    "omniglot-background": "Omniglot background set: 30 alphabets, 964 characters",
    "omniglot-evaluation": "Omniglot evaluation set: 20 alphabets, 659 characters",
    "omniglot": "all of Omniglot: 50 alphabets, 1623 characters",
}
DEFAULTS: dict[str, Any] = {"image_size": 28, "channels": 1, "invert": True, "resample": "lanczos"}


def candidate_roots(root: str | Path | None = None) -> list[Path]:
    """Where Omniglot is looked for: ``root``, else ``$METAML_DATA`` (and its ``omniglot/``),
    ``./data/omniglot``, ``../shared/data/omniglot``.

    Example:
        >>> candidate_roots("/data/omni")
        [PosixPath('/data/omni')]
    """
    if root is not None:
        return [Path(root).expanduser()]
    found = []
    env = os.environ.get("METAML_DATA")
    if env:
        found += [Path(env), Path(env) / "omniglot"]
    return [*found, Path("data/omniglot"), Path("../shared/data/omniglot")]


def find_archive(archive: str, root: str | Path | None = None) -> Path:
    """The zip (or extracted folder) of ``archive``, looked up in :func:`candidate_roots`.

    Example:
        >>> try:
        ...     find_archive("images_background_small1", "/nowhere")
        ... except UserError as e:
        ...     print(str(e)[:60])
        Omniglot archive images_background_small1.zip not found in /
    """
    roots = candidate_roots(root)
    for r in roots:
        for p in (r / f"{archive}.zip", r / archive):
            if p.exists():
                return p.resolve()
    where = ", ".join(str(r) for r in roots)
    raise UserError(
        f"Omniglot archive {archive}.zip not found in {where}; pass root=/--root with the "
        "folder that holds it (get it from https://github.com/brendenlake/omniglot, python/)"
    )


def load_omniglot(
    name: str = "omniglot-small", root: str | Path | None = None, **preprocess: Any
) -> ClassDataset:
    """Load an Omniglot variant (see the module table); ``preprocess`` overrides the defaults.

    ``cache=False`` skips the decoded-array cache.

    Example:
        >>> ds = load_omniglot("omniglot-small", root="../shared/data/omniglot")  # doctest: +SKIP
        >>> ds.describe()["groups"]  # doctest: +SKIP
        8
    """
    if name not in ARCHIVES:
        raise unknown_name_error("Omniglot variant", name, ARCHIVES)
    options = {**DEFAULTS, **preprocess}
    parts = []
    for archive in ARCHIVES[name]:
        path = find_archive(archive, root)
        read = read_zip if path.suffix == ".zip" else read_folder
        parts.append(read(path, **options))
    # The small archives overlap (Greek and Latin, identical drawings): keep each class once.
    ds = parts[0] if len(parts) == 1 else ClassDataset.concat(parts, drop_duplicates=True)
    ds.config = {**ds.config, "dataset": name}
    return ds
