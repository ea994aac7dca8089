"""Readers: image trees (folders or zips), IDX files (MNIST family) and ``.npz`` -> ClassDataset.

Layouts of an image tree (a folder, or a zip read in place without extracting):

- ``<group>/<class>/<image>`` (Omniglot: group = alphabet, class = character);
- ``<class>/<image>`` (a user's own images; every class gets group ``""``).

A zip (or folder) whose content sits under one wrapper folder, such as
``images_background_small1/``, is read as if the wrapper were not there. Files directly in the
root (a README, a LICENSE) and hidden files (``.DS_Store``, ``__MACOSX/``) are ignored.

Preprocessing, recorded in ``ClassDataset.config``:

- ``image_size``: resize to ``(s, s)`` (or ``(h, w)``) with Pillow; ``resample="lanczos"``
  (default, as in the MAML reference code's Omniglot pipeline; antialiased when downscaling)
  or ``"bilinear"``;
- ``channels``: 1 (grayscale) or 3 (RGB); ``None`` picks 1 when every image is grayscale;
- ``invert``: ``255 - x`` (Omniglot is black strokes on white; inverted, strokes are 1 on 0).

Decoded arrays are cached as ``.npz`` (no pickle) under ``$METAML_CACHE`` or
``~/.cache/metaml``, keyed by the source path, its size and mtime, and the preprocessing, so a
second load skips decoding.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.npz"
    >>> np.savez(p, images=np.zeros((4, 5, 5), np.uint8), labels=np.array([0, 0, 1, 1]))
    >>> read_npz(p, cache=False).describe()["classes"]
    2
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metaml.data.class_dataset import ClassDataset
from metaml.errors import UserError
from metaml.io import atomic_write

CACHE_VERSION = 1
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """How decoded images are turned into the stored uint8 array.

    Example:
        >>> Preprocess(image_size=28, channels=1, invert=True).size
        (28, 28)
    """

    image_size: int | tuple[int, int] | None = None
    channels: int | None = None
    invert: bool = False
    resample: str = "lanczos"

    def __post_init__(self) -> None:
        if self.channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 (grayscale) or 3 (RGB); got {self.channels!r}")
        if self.resample not in _RESAMPLE:
            raise UserError(f"resample must be one of {sorted(_RESAMPLE)}; got {self.resample!r}")
        size = self.size
        if size is not None and min(size) < 1:
            raise UserError(f"image_size must be positive; got {self.image_size!r}")

    @property
    def size(self) -> tuple[int, int] | None:
        """The target ``(height, width)``, or ``None`` to keep the original size."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        h, w = self.image_size
        return (int(h), int(w))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the image size as a list)."""
        d = asdict(self)
        d["image_size"] = list(self.size) if self.size else None
        return d


# -- public readers -----------------------------------------------------------------------------


def read_folder(path: str | Path, *, cache: bool = True, **preprocess: Any) -> ClassDataset:
    """Read a folder of ``<group>/<class>/<image>`` or ``<class>/<image>``.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for c in "ab":
        ...     (root / c).mkdir()
        ...     Image.new("L", (8, 8)).save(root / c / "0.png")
        >>> read_folder(root, cache=False).class_names
        ['a', 'b']
    """
    root = _existing(path, "folder")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; use zip:{root} for a zip file")
    files, dirs = _walk_folder(root)
    pre = Preprocess(**preprocess)
    # A folder's own mtime misses edits inside it, so fingerprint every file.
    stats = [(f, *_stat(root / f)) for f in files]
    key = {"reader": "folder", "path": str(root), "files": stats, **pre.to_dict()}
    return _cached(
        key,
        lambda: _read_tree(
            str(root), files, dirs, lambda f: (root / f).read_bytes(), pre, "folder"
        ),
        cache,
    )


def read_images(path: str | Path, **preprocess: Any) -> tuple[torch.Tensor, list[str]]:
    """Read every image file directly inside a folder, sorted by name: ``(uint8 (n, C, H, W), names)``.

    The images to label or embed (``metaml predict``, ``metaml features``); ``preprocess`` is a
    run's own (image_size, channels, invert, resample) so they match what the model was trained on.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("L", (8, 8)).save(root / "q1.png")
        >>> images, names = read_images(root, image_size=4)
        >>> images.shape, names
        (torch.Size([1, 1, 4, 4]), ['q1.png'])
    """
    root = _existing(path, "folder")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give a folder of image files")
    files = sorted(f.name for f in root.iterdir() if f.is_file() and not _hidden(f.name))
    if not files:
        raise UserError(f"folder {root} has no image files; put the images to use directly in it")
    pre = Preprocess(**preprocess)
    pils = [_decode((root / f).read_bytes(), str(root / f)) for f in files]
    channels = pre.channels or (1 if all(im.mode in _GRAY_MODES for im in pils) else 3)
    arrays = [_to_array(im, channels, pre) for im in pils]
    _check_same_size(arrays, files)
    images = np.stack(arrays).transpose(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
    if pre.invert:
        images = 255 - images
    return torch.from_numpy(np.ascontiguousarray(images)), files


def read_zip(path: str | Path, *, cache: bool = True, **preprocess: Any) -> ClassDataset:
    """Read a zip of ``<group>/<class>/<image>`` or ``<class>/<image>`` without extracting it.

    Example:
        >>> import tempfile, pathlib, zipfile, io
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.zip"
        >>> buf = io.BytesIO(); Image.new("L", (8, 8)).save(buf, "PNG")
        >>> with zipfile.ZipFile(p, "w") as z:
        ...     for name in ["top/g/a/0.png", "top/g/b/0.png", "top/h/c/0.png"]:
        ...         z.writestr(name, buf.getvalue())
        >>> read_zip(p, cache=False).class_names
        ['g/a', 'g/b', 'h/c']
    """
    zpath = _existing(path, "zip file")
    pre = Preprocess(**preprocess)
    key = {"reader": "zip", "path": str(zpath), "stat": _stat(zpath), **pre.to_dict()}

    def build() -> ClassDataset:
        try:
            zf = zipfile.ZipFile(zpath)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"cannot open {zpath} as a zip file ({e}); check the file") from None
        with zf:
            names = zf.namelist()
            files = [n for n in names if not n.endswith("/") and not _hidden(n)]
            dirs = {n.rstrip("/") for n in names if n.endswith("/") and not _hidden(n)}
            return _read_tree(str(zpath), files, dirs, zf.read, pre, "zip")

    return _cached(key, build, cache)


def read_idx(
    images_path: str | Path,
    labels_path: str | Path | None = None,
    *,
    cache: bool = True,
    **preprocess: Any,
) -> ClassDataset:
    """Read an IDX images file and its labels file (MNIST family), gzipped or not.

    Without ``labels_path`` the labels file is guessed from the MNIST naming
    (``train-images-idx3-ubyte`` -> ``train-labels-idx1-ubyte``). Class names are the labels.

    Example:
        >>> import tempfile, pathlib, struct
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> images = struct.pack(">4B3I", 0, 0, 8, 3, 2, 2, 2) + bytes(8)  # 2 images of 2x2
        >>> labels = struct.pack(">4BI", 0, 0, 8, 1, 2) + bytes([3, 7])
        >>> _ = (d / "x-images-idx3-ubyte").write_bytes(images)
        >>> _ = (d / "x-labels-idx1-ubyte").write_bytes(labels)
        >>> read_idx(d / "x-images-idx3-ubyte", cache=False).class_names
        ['3', '7']
    """
    ipath = _existing(images_path, "IDX images file")
    lpath = _existing(labels_path, "IDX labels file") if labels_path else _guess_labels(ipath)
    pre = Preprocess(**preprocess)
    key = {"reader": "idx", "path": [str(ipath), str(lpath)], "stat": [_stat(ipath), _stat(lpath)]}

    def build() -> ClassDataset:
        images = _read_idx_array(ipath)
        labels = _read_idx_array(lpath)
        if images.ndim not in (3, 4) or labels.ndim != 1:
            raise UserError(
                f"{ipath.name} must hold images (n, H, W) and {lpath.name} labels (n,); "
                f"got {images.shape} and {labels.shape}"
            )
        config = {"reader": "idx", "path": str(ipath), "labels_path": str(lpath)}
        return _from_arrays(images, labels, None, None, pre, config, ipath.name)

    return _cached({**key, **pre.to_dict()}, build, cache)


def read_npz(path: str | Path, *, cache: bool = True, **preprocess: Any) -> ClassDataset:
    """Read an ``.npz`` of ``images`` uint8 (n,H,W), (n,H,W,C) or (n,C,H,W) and ``labels``.

    Optional keys: ``class_names`` (one per label value ``0..L-1``) and ``groups`` (one per
    class, or one per example). Arrays must be plain (saved without pickle).

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.npz"
        >>> np.savez(p, images=np.zeros((2, 3, 4, 4), np.uint8), labels=np.array([0, 1]),
        ...          class_names=np.array(["cat", "dog"]))
        >>> ds = read_npz(p, cache=False)
        >>> ds.class_names, ds.shape
        (['cat', 'dog'], (3, 4, 4))
    """
    npath = _existing(path, "npz file")
    pre = Preprocess(**preprocess)
    key = {"reader": "npz", "path": str(npath), "stat": _stat(npath), **pre.to_dict()}

    def build() -> ClassDataset:
        try:
            with np.load(npath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(
                f"cannot read {npath} as npz without pickle ({e}); save plain arrays "
                "(strings as np.array(names), not object arrays)"
            ) from None
        missing = [k for k in ("images", "labels") if k not in arrays]
        if missing:
            raise UserError(f"{npath.name} lacks key(s) {missing}; it has {sorted(arrays)}")
        config = {"reader": "npz", "path": str(npath)}
        images = _npz_to_nhwc(arrays["images"], npath.name)
        return _from_arrays(
            images, arrays["labels"], arrays.get("class_names"), arrays.get("groups"), pre,
            config, npath.name,
        )  # fmt: skip

    return _cached(key, build, cache)


def cache_dir() -> Path:
    """The decoded-data cache folder: ``$METAML_CACHE`` or ``~/.cache/metaml``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    env = os.environ.get("METAML_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "metaml"


def cache_path(key: dict[str, Any]) -> Path:
    """The cache file for a reader's key (a hash of the source and the preprocessing).

    Example:
        >>> cache_path({"a": 1}) == cache_path({"a": 1})
        True
    """
    blob = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
    return cache_dir() / f"{key.get('reader', 'data')}-{digest}.npz"


# -- cache ------------------------------------------------------------------------------------


def _cached(key: dict[str, Any], build: Callable[[], ClassDataset], cache: bool) -> ClassDataset:
    if not cache:
        return build()
    path = cache_path(key)
    if path.exists():
        ds = _load_cache(path)
        if ds is not None:
            return ds
    ds = build()
    _save_cache(path, ds)
    return ds


def _load_cache(path: Path) -> ClassDataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return ClassDataset(
                torch.from_numpy(z["images"].copy()),
                torch.from_numpy(z["targets"].astype(np.int64)),
                [str(s) for s in z["class_names"]],
                [str(s) for s in z["class_groups"]],
                config=json.loads(str(z["config"])),
            )
    except Exception:  # a stale or truncated cache file is rebuilt, never fatal
        return None


def _save_cache(path: Path, ds: ClassDataset) -> None:
    def write(tmp: str) -> None:
        # A file object, because np.savez appends ".npz" to a bare name that lacks it.
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                images=ds.images.numpy(),
                targets=ds.targets.numpy(),
                class_names=np.array(ds.class_names, dtype=np.str_),
                class_groups=np.array(ds.class_groups, dtype=np.str_),
                config=np.array(json.dumps(ds.config)),
            )

    try:
        atomic_write(path, write)
    except OSError as e:  # a read-only home must not stop training; it only costs speed
        warnings.warn(f"could not write the data cache {path}: {e}", stacklevel=3)


# -- image trees ------------------------------------------------------------------------------


def _existing(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise UserError(f"no {what} given; pass its path")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist; check the path (or pass root=/--root)")
    return p.resolve()


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return (st.st_size, st.st_mtime_ns)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _walk_folder(root: Path) -> tuple[list[str], set[str]]:
    files: list[str] = []
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        dirs.update(prefix + d for d in dirnames)
        files += [prefix + f for f in filenames if not _hidden(f)]
    return sorted(files), dirs


def _strip_wrapper(files: list[str], dirs: set[str]) -> tuple[list[str], set[str], str]:
    """Drop single wrapper folders (``images_background_small1/``) above the class tree.

    Only when every image is at least 4 deep: ``wrapper/group/class/image``. A 3-deep tree
    reads as ``group/class/image`` (a single wrapper then simply becomes the only group).
    """
    prefix = ""
    while files and all(f.count("/") >= 3 for f in files):
        tops = {f.split("/", 1)[0] for f in files} | {d.split("/", 1)[0] for d in dirs}
        if len(tops) != 1:
            break
        top = tops.pop() + "/"
        prefix += top
        files = [f[len(top) :] for f in files]
        dirs = {d[len(top) :] for d in dirs if d.startswith(top)}
    return files, dirs, prefix


def _class_folders(
    where: str, files: list[str], dirs: set[str]
) -> tuple[dict[str, list[str]], int]:
    """Map ``class folder -> sorted image paths``; return it and the depth of class folders."""
    nested = [f for f in files if "/" in f]  # files in the root itself (README) are ignored
    depths = {f.count("/") for f in nested}
    if not nested:
        raise UserError(
            f"{where} has no class subfolders; expected {where}/<class>/<image> or "
            f"{where}/<group>/<class>/<image>"
        )
    if len(depths) > 1 or max(depths) > 2:
        deepest = max(nested, key=lambda f: f.count("/"))
        raise UserError(
            f"{where} has images at an unexpected depth (e.g. {deepest}); use <class>/<image> "
            "or <group>/<class>/<image> throughout"
        )
    depth = nested[0].count("/")  # 1: <class>/<image>, 2: <group>/<class>/<image>
    classes: dict[str, list[str]] = {d: [] for d in dirs if d.count("/") == depth - 1}
    for f in nested:
        classes.setdefault(f.rsplit("/", 1)[0], []).append(f)
    empty = sorted(c for c, fs in classes.items() if not fs)
    if empty:
        raise UserError(
            f"class folder {where}/{empty[0]} is empty; add images or remove the folder"
        )
    return {c: sorted(classes[c]) for c in sorted(classes)}, depth


def _read_tree(
    where: str,
    files: list[str],
    dirs: set[str],
    read: Callable[[str], bytes],
    pre: Preprocess,
    reader: str,
) -> ClassDataset:
    stripped, sdirs, prefix = _strip_wrapper(files, dirs)
    classes, depth = _class_folders(
        where + ("/" + prefix.rstrip("/") if prefix else ""), stripped, sdirs
    )
    pils: list[Image.Image] = []
    targets: list[int] = []
    for c, paths in enumerate(classes.values()):
        for rel in paths:
            pils.append(_decode(read(prefix + rel), f"{where}/{prefix}{rel}"))
            targets.append(c)
    channels = pre.channels or (1 if all(im.mode in _GRAY_MODES for im in pils) else 3)
    arrays = [_to_array(im, channels, pre) for im in pils]
    _check_same_size(arrays, [p for ps in classes.values() for p in ps])
    images = np.stack(arrays).transpose(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
    if pre.invert:
        images = 255 - images
    names = list(classes)
    groups = [n.split("/", 1)[0] if depth == 2 else "" for n in names]
    config = {"reader": reader, "path": where, **pre.to_dict(), "channels": channels}
    return ClassDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.tensor(targets, dtype=torch.int64),
        names,
        groups,
        config=config,
    )


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(
            f"cannot read image {name} ({type(e).__name__}); remove it or replace it with a "
            "valid image"
        ) from None
    return im


def _to_array(im: Image.Image, channels: int, pre: Preprocess) -> np.ndarray:
    im = im.convert("L" if channels == 1 else "RGB")
    if pre.size is not None and (im.height, im.width) != pre.size:
        im = im.resize((pre.size[1], pre.size[0]), resample=_RESAMPLE[pre.resample])
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_same_size(arrays: Iterable[np.ndarray], names: list[str]) -> None:
    shapes: dict[tuple[int, ...], str] = {}
    for arr, name in zip(arrays, names, strict=True):
        shapes.setdefault(arr.shape[:2], name)
    if len(shapes) > 1:
        (s1, n1), (s2, n2) = list(shapes.items())[:2]
        raise UserError(
            f"images have different sizes ({n1}: {s1[0]}x{s1[1]}, {n2}: {s2[0]}x{s2[1]}); "
            "pass image_size= to resize them all"
        )


# -- arrays (IDX, npz) --------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx_array(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"cannot gunzip {path.name} ({e}); the file may be truncated") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path.name} is not an IDX file (bad magic number); check the path")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise UserError(
            f"{path.name}: header says {dims} but the file holds {len(body)} bytes of data; "
            "the file may be truncated"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _guess_labels(images: Path) -> Path:
    name = images.name
    candidates = [name.replace("images", "labels").replace("idx3", "idx1")]
    candidates += [c[:-3] if c.endswith(".gz") else c + ".gz" for c in candidates]
    for c in candidates:
        if c != name and (images.parent / c).exists():
            return images.parent / c
    raise UserError(
        f"no labels file found next to {images.name}; pass it as idx:IMAGES,LABELS "
        "(or labels_path=)"
    )


def _npz_to_nhwc(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images.transpose(0, 2, 3, 1)
    raise UserError(
        f"{name}: images must be (n,H,W), (n,H,W,C) or (n,C,H,W) with C in (1, 3); "
        f"got {images.shape}"
    )


def _from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: np.ndarray | None,
    groups: np.ndarray | None,
    pre: Preprocess,
    config: dict[str, Any],
    name: str,
) -> ClassDataset:
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        raise UserError(
            f"{name}: images must be uint8; got {images.dtype} (convert with "
            "(x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{name}: need one integer label per image; got {len(labels)} labels "
            f"({labels.dtype}) for {len(images)} images"
        )
    values, targets = np.unique(labels, return_inverse=True)
    names = _class_names(values, class_names, name)
    images = _preprocess_nhwc(images, pre)
    config = {**config, **pre.to_dict(), "channels": int(images.shape[-1])}
    return ClassDataset(
        torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        torch.from_numpy(targets.astype(np.int64)),
        names,
        _class_groups(groups, values, labels, name),
        config=config,
    )


def _class_names(values: np.ndarray, class_names: np.ndarray | None, name: str) -> list[str]:
    if class_names is None:
        return [str(v) for v in values]
    if values.min() < 0 or values.max() >= len(class_names):
        raise UserError(
            f"{name}: labels run {values.min()}..{values.max()} but there are "
            f"{len(class_names)} class_names; labels must index class_names"
        )
    return [str(class_names[v]) for v in values]


def _class_groups(
    groups: np.ndarray | None, values: np.ndarray, labels: np.ndarray, name: str
) -> list[str]:
    if groups is None:
        return [""] * len(values)
    groups = np.asarray(groups).reshape(-1)
    if len(groups) == len(labels) and len(groups) != len(values):
        # one group per example: each class must sit in exactly one group
        per_class = [np.unique(groups[labels == v]) for v in values]
        if any(len(g) != 1 for g in per_class):
            raise UserError(f"{name}: some class has examples in several groups")
        return [str(g[0]) for g in per_class]
    if len(groups) > int(values.max()):
        return [str(groups[v]) for v in values]
    raise UserError(
        f"{name}: groups must have one entry per class ({len(values)}) or per example "
        f"({len(labels)}); got {len(groups)}"
    )


def _preprocess_nhwc(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    c = images.shape[-1]
    target = pre.channels or c
    if target == 1 and c == 3:
        # ITU-R 601-2 luma, the same weights as Pillow's convert("L")
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        images = np.round(luma).clip(0, 255).astype(np.uint8)[..., None]
    elif target == 3 and c == 1:
        images = np.repeat(images, 3, axis=-1)
    if pre.size is not None and images.shape[1:3] != pre.size:
        images = np.stack([_resize(im, pre) for im in images])
    if pre.invert:
        images = 255 - images
    return images


def _resize(im: np.ndarray, pre: Preprocess) -> np.ndarray:
    assert pre.size is not None
    pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
    out = np.asarray(pil.resize((pre.size[1], pre.size[0]), resample=_RESAMPLE[pre.resample]))
    return out[..., None] if out.ndim == 2 else out
