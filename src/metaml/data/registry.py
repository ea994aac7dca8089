"""The dataset registry: ``load(name_or_spec, root=None, **options)`` and ``list_datasets()``.

Names (``sinusoid``, ``omniglot-small``, ...) load a known dataset; specs read a user's data:

- ``folder:PATH`` -- ``PATH/<class>/<image>`` or ``PATH/<group>/<class>/<image>``;
- ``zip:PATH`` -- the same layouts inside a zip, read without extracting;
- ``idx:IMAGES[,LABELS]`` -- MNIST-family IDX files, gzipped or not;
- ``npz:PATH`` -- arrays ``images`` (uint8) and ``labels``.

Options are the preprocessing (``image_size``, ``channels``, ``invert``, ``resample``,
``cache``) for image data, or the family's parameters for a task family; ``None`` values mean
"the dataset's default", so a config can pass its fields straight through.

Example:
    >>> load("sinusoid").task_type
    'regression'
    >>> [d["name"] for d in list_datasets()][:2]
    ['sinusoid', 'omniglot-small1']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaml.data.class_dataset import ClassDataset
from metaml.data.glyphs import load_glyphs
from metaml.data.omniglot import ARCHIVES, DESCRIPTIONS, load_omniglot
from metaml.data.readers import read_folder, read_idx, read_npz, read_zip
from metaml.data.sinusoid import Sinusoid
from metaml.errors import UserError, did_you_mean, unknown_name_error

if TYPE_CHECKING:
    from metaml.tasks import TaskFamily

IMAGE_OPTIONS = ("image_size", "channels", "invert", "resample", "cache")


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: how to load it and which options it takes.

    Example:
        >>> DatasetEntry("toy", "regression", "a toy", lambda root=None: Sinusoid(), ()).kind
        'regression'
    """

    name: str
    kind: str  # "classification" (a ClassDataset) or "regression" (a TaskFamily)
    description: str
    loader: Callable[..., ClassDataset | TaskFamily]
    options: tuple[str, ...]


_REGISTRY: dict[str, DatasetEntry] = {}
_SPECS = {
    "folder": "a folder of <class>/<image> or <group>/<class>/<image>",
    "zip": "a zip of <class>/<image> or <group>/<class>/<image>",
    "idx": "MNIST-family IDX files: idx:IMAGES[,LABELS]",
    "npz": "an .npz with images (uint8) and labels",
}


def register_dataset(
    name: str,
    kind: str,
    description: str,
    loader: Callable[..., ClassDataset | TaskFamily],
    options: tuple[str, ...] = IMAGE_OPTIONS,
) -> None:
    """Add a dataset to the registry; ``loader(root=..., **options)`` builds it.

    Example:
        >>> register_dataset("sinusoid-wide", "regression", "wider x",
        ...                  lambda root=None: Sinusoid(x_range=(-10.0, 10.0)), ())
        >>> load("sinusoid-wide").x_range
        (-10.0, 10.0)
    """
    _REGISTRY[name] = DatasetEntry(name, kind, description, loader, options)


def list_datasets() -> list[dict[str, str]]:
    """Known datasets and spec forms: ``[{"name", "kind", "description"}, ...]``.

    Example:
        >>> "omniglot-small" in [d["name"] for d in list_datasets()]
        True
    """
    rows = [
        {"name": e.name, "kind": e.kind, "description": e.description} for e in _REGISTRY.values()
    ]
    specs = [
        {"name": f"{k}:PATH", "kind": "classification", "description": v} for k, v in _SPECS.items()
    ]
    return rows + specs


def load(
    name_or_spec: str, root: str | Path | None = None, **options: Any
) -> ClassDataset | TaskFamily:
    """Load a registered dataset by name, or a user's data by spec (``folder:PATH``, ...).

    ``root`` is where a named dataset's files live (e.g. the folder holding the Omniglot
    zips); for specs, a relative ``PATH`` is taken relative to ``root`` when given.

    Example:
        >>> fam = load("sinusoid", amplitude_range=(1.0, 2.0))
        >>> fam.amplitude_range
        (1.0, 2.0)
    """
    options = {k: v for k, v in options.items() if v is not None}
    kind, sep, rest = name_or_spec.partition(":")
    if sep and kind in _SPECS:
        _check_options(name_or_spec, options, IMAGE_OPTIONS)
        return _load_spec(kind, rest, root, options)
    entry = _REGISTRY.get(name_or_spec)
    if entry is None:
        known = [*_REGISTRY, *(f"{k}:PATH" for k in _SPECS)]
        raise unknown_name_error("dataset", name_or_spec, known)
    _check_options(name_or_spec, options, entry.options)
    return entry.loader(root=root, **options)


def _check_options(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in options:
        if key not in allowed:
            raise UserError(
                f"dataset {name!r} takes no option {key!r}{did_you_mean(key, allowed)}; "
                f"it takes: {', '.join(allowed) or 'none'}"
            )


def _load_spec(
    kind: str, rest: str, root: str | Path | None, options: dict[str, Any]
) -> ClassDataset:
    def resolve(p: str) -> Path:
        path = Path(p.strip()).expanduser()
        return Path(root) / path if root is not None and not path.is_absolute() else path

    if not rest.strip():
        raise UserError(f"{kind}: needs a path, e.g. {kind}:/data/my_images")
    if kind == "idx":
        paths = [resolve(p) for p in rest.split(",") if p.strip()]
        if len(paths) > 2:
            raise UserError("idx: takes IMAGES or IMAGES,LABELS (two paths at most)")
        return read_idx(paths[0], paths[1] if len(paths) > 1 else None, **options)
    reader = {"folder": read_folder, "zip": read_zip, "npz": read_npz}[kind]
    return reader(resolve(rest), **options)


def _sinusoid(root: str | Path | None = None, **options: Any) -> Sinusoid:
    # YAML gives lists; the family keeps tuples so that it stays hashable and comparable.
    ranges = {k: _pair(k, v) for k, v in options.items()}
    return Sinusoid(**ranges)


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be two numbers [low, high]; got {value!r}") from None
    return (low, high)


def _omniglot(name: str) -> Callable[..., ClassDataset]:
    def loader(root: str | Path | None = None, **options: Any) -> ClassDataset:
        return load_omniglot(name, root=root, **options)

    return loader


register_dataset(
    "sinusoid",
    "regression",
    "MAML sinusoid regression: A in [0.1, 5], phase in [0, pi], x in [-5, 5]",
    _sinusoid,
    ("amplitude_range", "phase_range", "x_range"),
)
for _name in ARCHIVES:
    register_dataset(_name, "classification", DESCRIPTIONS[_name], _omniglot(_name))
register_dataset(
    "glyphs",
    "classification",
    "bundled: letters of 80+ real scripts drawn from the Noto fonts, 20 drawers each, 28x28",
    load_glyphs,
    ("split", "image_size"),
)
