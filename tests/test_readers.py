"""Readers: image folders and zips, IDX, npz; the decoded-data cache; errors on bad input."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaml.data import ClassDataset, load, read_folder, read_idx, read_npz, read_zip, readers
from metaml.errors import UserError


def _png(path: Path, value: int, size: tuple[int, int] = (6, 6), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def _png_bytes(value: int, size: tuple[int, int] = (6, 6)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, "PNG")
    return buf.getvalue()


def _grouped_tree(root: Path) -> Path:
    """root/<group>/<class>/<image>: value = 10 * class + example; classes in sorted order."""
    layout = {"alpha/char1": 2, "alpha/char2": 3, "beta/char1": 2}
    for c, (cls, n) in enumerate(layout.items()):
        for e in range(n):
            _png(root / cls / f"{e:02d}.png", 10 * c + e)
    return root


def _values(ds: ClassDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].tolist()


# -- image trees -------------------------------------------------------------------------------


def test_grouped_folder(tmp_path: Path) -> None:
    ds = read_folder(_grouped_tree(tmp_path / "d"), cache=False)
    assert ds.class_names == ["alpha/char1", "alpha/char2", "beta/char1"]
    assert ds.class_groups == ["alpha", "alpha", "beta"]
    assert ds.targets.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert _values(ds) == [0, 1, 10, 11, 12, 20, 21]
    assert ds.shape == (1, 6, 6) and ds.config["reader"] == "folder"


def test_flat_folder_ignores_root_files_and_hidden(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        _png(tmp_path / c / "a.png", 5)
    (tmp_path / "README.txt").write_text("about my images")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "cat" / ".hidden").write_bytes(b"\0")
    ds = read_folder(tmp_path, cache=False)
    assert ds.class_names == ["cat", "dog"] and ds.class_groups == ["", ""]


def test_zip_with_wrapper_folder(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wrapper/", b"")
        for c, cls in enumerate(["alpha/char1", "alpha/char2", "beta/char1"]):
            for e in range(2):
                z.writestr(f"wrapper/{cls}/{e}.png", _png_bytes(10 * c + e))
        z.writestr("__MACOSX/wrapper/._x", b"junk")
    ds = read_zip(path, cache=False)
    assert ds.class_names == ["alpha/char1", "alpha/char2", "beta/char1"]
    assert ds.groups == ["alpha", "beta"] and _values(ds) == [0, 1, 10, 11, 20, 21]


def test_zip_flat_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        for cls in ("a", "b", "c"):
            z.writestr(f"{cls}/0.png", _png_bytes(1))
    ds = read_zip(path, cache=False)
    assert ds.class_names == ["a", "b", "c"] and ds.class_groups == [""] * 3


def test_preprocessing_resize_rgb_invert(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", 40, size=(10, 8), mode="RGB")
    _png(tmp_path / "b" / "0.png", 40, size=(10, 8), mode="RGB")
    rgb = read_folder(tmp_path, cache=False)
    assert rgb.shape == (3, 8, 10) and rgb.config["channels"] == 3
    small = read_folder(
        tmp_path, image_size=4, channels=1, invert=True, resample="bilinear", cache=False
    )
    assert small.shape == (1, 4, 4)
    # luma of (40, 0, 215) is 0.299*40 + 0.114*215 = 36.5; inverted: 255 - 36/37
    assert int(small.images[0, 0, 0, 0]) in (218, 219)
    assert small.config["image_size"] == [4, 4] and small.config["invert"] is True


# -- IDX and npz ------------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path: Path, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    labels = np.array([7, 3, 7, 3, 5, 5], dtype=np.uint8)
    ipath = _idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    _idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    ds = read_idx(ipath, cache=False)  # labels file found by the MNIST naming
    assert ds.class_names == ["3", "5", "7"] and ds.targets.tolist() == [2, 0, 2, 0, 1, 1]
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    spec = load(f"idx:{ipath},{tmp_path / f'train-labels-idx1-ubyte{suffix}'}", cache=False)
    assert isinstance(spec, ClassDataset) and torch.equal(spec.images, ds.images)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((4, 5, 6), (1, 5, 6)),
        ((4, 5, 6, 3), (3, 5, 6)),
        ((4, 3, 5, 6), (3, 5, 6)),
        ((4, 5, 6, 1), (1, 5, 6)),
    ],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([1, 0, 1, 0]))
    ds = read_npz(tmp_path / "d.npz", cache=False)
    assert ds.shape == expected and ds.num_classes == 2
    if shape == (4, 5, 6, 3):
        assert torch.equal(ds.images[2], torch.from_numpy(images[2]).permute(2, 0, 1))


def test_npz_names_and_groups(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz",
        images=np.zeros((4, 2, 2), np.uint8),
        labels=np.array([2, 0, 2, 0]),
        class_names=np.array(["ant", "bee", "cat"]),
        groups=np.array(["insect", "insect", "mammal"]),
    )
    ds = read_npz(tmp_path / "d.npz", cache=False)
    assert ds.class_names == ["ant", "cat"] and ds.class_groups == ["insect", "mammal"]


# -- cache ------------------------------------------------------------------------------------


def test_cache_hit_on_second_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAML_CACHE", str(tmp_path / "cache"))
    root = _grouped_tree(tmp_path / "d")
    first = read_folder(root, image_size=3)
    files = list((tmp_path / "cache").glob("folder-*.npz"))
    assert len(files) == 1

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(readers, "_read_tree", fail)
    second = read_folder(root, image_size=3)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert second.class_names == first.class_names and second.config == first.config
    with np.load(files[0], allow_pickle=False) as z:  # readable without pickle
        assert z["images"].dtype == np.uint8


def test_cache_invalidated_by_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAML_CACHE", str(tmp_path / "cache"))
    root = _grouped_tree(tmp_path / "d")
    read_folder(root)
    read_folder(root, invert=True)  # other preprocessing, other entry
    _png(root / "beta" / "char1" / "09.png", 99)
    assert len(read_folder(root)) == 8  # a new file, a new entry
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_corrupt_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAML_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 2, 2), np.uint8), labels=np.array([0, 1]))
    read_npz(tmp_path / "d.npz")
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    assert read_npz(tmp_path / "d.npz").num_classes == 2


# -- bad input --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    for reader in (read_folder, read_zip, read_npz, read_idx):
        with pytest.raises(UserError, match=r"nope.*does not exist"):
            reader(tmp_path / "nope")


def test_non_image_file_is_named(tmp_path: Path) -> None:
    _grouped_tree(tmp_path)
    (tmp_path / "alpha" / "char1" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"cannot read image .*alpha/char1/notes.txt"):
        read_folder(tmp_path, cache=False)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    _grouped_tree(tmp_path)
    (tmp_path / "beta" / "char1" / "bad.png").write_bytes(_png_bytes(3)[:30])
    with pytest.raises(UserError, match=r"bad\.png"):
        read_folder(tmp_path, cache=False)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _grouped_tree(tmp_path)
    (tmp_path / "beta" / "char7").mkdir()
    with pytest.raises(UserError, match=r"class folder .*beta/char7 is empty"):
        read_folder(tmp_path, cache=False)


def test_empty_class_folder_in_zip(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/0.png", _png_bytes(1))
        z.writestr("b/", b"")
    with pytest.raises(UserError, match="b is empty"):
        read_zip(path, cache=False)


def test_folder_without_class_subfolders(tmp_path: Path) -> None:
    _png(tmp_path / "0.png", 1)
    with pytest.raises(UserError, match="no class subfolders"):
        read_folder(tmp_path, cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        read_folder(tmp_path / "empty", cache=False)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", 1, size=(6, 6))
    _png(tmp_path / "b" / "0.png", 1, size=(7, 6))
    with pytest.raises(UserError, match="image_size="):
        read_folder(tmp_path, cache=False)
    assert read_folder(tmp_path, image_size=5, cache=False).shape == (1, 5, 5)


def test_bad_zip_and_bad_arrays(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"x.zip as a zip"):
        read_zip(tmp_path / "x.zip", cache=False)
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 2, 2), np.float32), labels=np.array([0, 1]))
    with pytest.raises(UserError, match="uint8"):
        read_npz(tmp_path / "f.npz", cache=False)
    np.savez(tmp_path / "k.npz", pictures=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(UserError, match=r"lacks key.*images"):
        read_npz(tmp_path / "k.npz", cache=False)
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(
            tmp_path / "bad-images-idx3-ubyte", tmp_path / "bad-images-idx3-ubyte", cache=False
        )
    _idx(tmp_path / "lonely.idx", np.zeros((2, 2, 2)), gz=False)
    with pytest.raises(UserError, match="no labels file"):
        read_idx(tmp_path / "lonely.idx", cache=False)


def test_unwritable_cache_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("METAML_CACHE", str(blocker / "cache"))
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 2, 2), np.uint8), labels=np.array([0, 1]))
    with pytest.warns(UserWarning, match="data cache"):
        assert read_npz(tmp_path / "d.npz").num_classes == 2
