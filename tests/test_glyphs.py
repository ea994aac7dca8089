"""The bundled glyph corpus (metaml.data.glyphs) and its builder (tools/build_glyphs.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from metaml.data import ClassDataset, glyphs_manifest, load, load_glyphs
from metaml.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "metaml" / "data" / "assets"
FONT_DIR = Path("/usr/share/fonts/truetype/noto")


@pytest.fixture(scope="module")
def corpus() -> ClassDataset:
    return load_glyphs()


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    """tools/build_glyphs.py as a module; skipped without the Noto fonts or its tool deps."""
    pytest.importorskip("fontTools")
    pytest.importorskip("scipy")
    if not (FONT_DIR / "NotoSans-Regular.ttf").exists():
        pytest.skip(f"Noto fonts not installed in {FONT_DIR} (apt-get install fonts-noto-core)")
    spec = importlib.util.spec_from_file_location("build_glyphs", REPO / "tools/build_glyphs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_glyphs"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# -- the shipped corpus --------------------------------------------------------------------------


def test_corpus_size_and_format(corpus: ClassDataset) -> None:
    assert len(corpus.groups) >= 80
    assert corpus.num_classes >= 2000
    assert corpus.examples_per_class().tolist() == [20] * corpus.num_classes
    assert corpus.images.dtype == torch.uint8
    assert corpus.shape == (1, 28, 28)


def test_no_blank_or_boxed_images(corpus: ClassDataset) -> None:
    images = corpus.images[:, 0].numpy()
    ink = (images >= 128).sum((1, 2))
    assert images.max((1, 2)).min() >= 200  # every image has a strong stroke
    assert ink.min() >= 10  # not a dot or a blank
    # Strokes, not filled blobs or boxes: ink stays well below half of the image.
    assert ink.max() < 0.4 * 28 * 28
    # No stroke crosses the border (nothing was cut off); at most a faint antialiasing halo.
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert border.max() < 64


def test_every_image_is_distinct(corpus: ClassDataset) -> None:
    # No two drawers (of one character or of two) made the same picture.
    assert len({bytes(im) for im in corpus.images.numpy()}) == len(corpus)


def test_manifest_matches_data(corpus: ClassDataset) -> None:
    m = glyphs_manifest()
    classes = m["classes"]
    assert len(classes) == corpus.num_classes
    assert corpus.class_names == [f"{c['script']}/{c['codepoint']}" for c in classes]
    assert corpus.class_groups == [c["script"] for c in classes]
    assert all(int(c["codepoint"][2:], 16) == ord(c["character"]) for c in classes)
    assert len({c["codepoint"] for c in classes}) == len(classes)
    assert all(c["fonts"] and set(c["fonts"]) <= set(m["fonts"]) for c in classes)
    counts = {s["name"]: s["characters"] for s in m["scripts"]}
    assert counts == {g: corpus.class_groups.count(g) for g in corpus.groups}
    assert "SIL Open Font License" in m["license"]
    assert m["drawers"] == 20 and m["image_size"] == [28, 28]


def test_asset_size_limit() -> None:
    size = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert size <= 10 * 1024 * 1024


# -- the fixed split -----------------------------------------------------------------------------


def test_split_is_fixed_and_by_script(corpus: ClassDataset) -> None:
    m = glyphs_manifest()
    parts = {name: load_glyphs(split=name) for name in ("train", "val", "test")}
    groups = {name: set(p.groups) for name, p in parts.items()}
    assert groups["train"].isdisjoint(groups["val"] | groups["test"])
    assert groups["val"].isdisjoint(groups["test"])
    assert groups["train"] | groups["val"] | groups["test"] == set(corpus.groups)
    assert all(groups[name] == set(m["split"][name]) for name in groups)
    # The same split a run makes from the whole corpus with the default split settings.
    by_run = corpus.split("group", (0.6, 0.2, 0.2), seed=0)
    assert [p.class_names for p in by_run] == [parts[n].class_names for n in parts]
    assert torch.equal(load("glyphs", split="val").images, parts["val"].images)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="split must be one of"):
        load_glyphs(split="training")
    with pytest.raises(UserError, match="takes no option 'invert'"):
        load("glyphs", invert=True)
    with pytest.raises(UserError, match="not found"):
        load_glyphs(root="/nowhere")


def test_image_size_option() -> None:
    small = load("glyphs", split="test", image_size=14)
    assert isinstance(small, ClassDataset)
    assert small.shape == (1, 14, 14) and small.config["image_size"] == [14, 14]


def test_mismatched_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "glyphs.json").write_text((ASSETS / "glyphs.json").read_text("utf-8"), "utf-8")
    np.savez(tmp_path / "glyphs.npz", images=np.zeros((2, 20, 28, 28), np.uint8),
             codepoints=np.array([65, 66], np.int32))  # fmt: skip
    with pytest.raises(UserError, match="does not match"):
        load_glyphs(root=tmp_path)


# -- the builder (needs the Noto fonts) ----------------------------------------------------------


def _small_build(tool: ModuleType, out: Path, scripts: list[str]) -> None:
    corpus = tool.build(scripts=scripts, max_per_script=4, min_per_script=1, drawers=3)
    tool.write_corpus(corpus, out)


def test_build_is_byte_identical(tool: ModuleType, tmp_path: Path) -> None:
    scripts = ["Latin", "Greek", "Armenian"]
    _small_build(tool, tmp_path / "a", scripts)
    _small_build(tool, tmp_path / "b", scripts)
    for name in ("glyphs.npz", "glyphs.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # A small build is a valid corpus for the loader (given as root).
    ds = load_glyphs(root=tmp_path / "a")
    assert ds.groups == ["Armenian", "Greek", "Latin"] and ds.examples_per_class().max() == 3


def test_drawings_do_not_depend_on_the_other_scripts(tool: ModuleType) -> None:
    alone = tool.build(scripts=["Armenian"], max_per_script=4, min_per_script=1, drawers=2)
    mixed = tool.build(scripts=["Latin", "Armenian"], max_per_script=4, min_per_script=1,
                       drawers=2)  # fmt: skip
    rows = {int(cp): i for i, cp in enumerate(mixed.codepoints)}
    shared = [(i, rows[int(cp)]) for i, cp in enumerate(alone.codepoints) if int(cp) in rows]
    assert shared
    for i, j in shared:
        assert np.array_equal(alone.images[i], mixed.images[j])


def test_missing_and_non_letters_are_dropped(tool: ModuleType) -> None:
    fonts = tool.FontCache()
    latin = FONT_DIR / "NotoSans-Regular.ttf"
    assert tool.outline(fonts, latin, ord("A")) is not None
    assert tool.outline(fonts, latin, 0x0D05) is None  # Malayalam: not in the Latin font's cmap
    assert tool.outline(fonts, latin, ord(" ")) is None  # in the cmap, but draws nothing
    assert not any(tool.is_letter(ord(c)) for c in "5é\u0301 ")


def test_latin_look_alikes_are_kept_once(tool: ModuleType) -> None:
    corpus = tool.build(scripts=["Latin", "Greek", "Cyrillic"], max_per_script=60,
                        min_per_script=1, drawers=1)  # fmt: skip
    chars = {c["character"] for c in corpus.manifest["classes"]}
    assert "A" in chars and "\u0391" not in chars and "\u0410" not in chars  # Latin A wins
    assert not {"o", "O"} <= chars  # the same shape once scaled to the glyph box
