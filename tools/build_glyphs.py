"""Build the bundled glyph corpus: characters of many real scripts, 20 "drawers" each, 28x28.

The corpus is Omniglot-like: scripts are groups (alphabets), characters are classes, and every
character gets ``DRAWERS`` renderings that imitate different people writing it. Each rendering
takes the character's outline from a Noto font (Sans, Serif or another style, Regular or Bold),
thins it to a one-pixel skeleton, bends the skeleton with a smooth random displacement field
(elastic distortion plus a faint high-frequency pen tremor), applies a random affine transform
(rotation, shear, scale, aspect, shift) and redraws it with a round pen of random width at 4x
resolution before a Lanczos downscale to 28x28. Redrawing the skeleton is what makes a typeface
look hand-drawn: Omniglot's strokes are an even ~1.7 px wide, whereas a font's stems are thick,
have serifs and vary in contrast.

Characters are chosen per script from the fonts' cmaps: letters only (Unicode categories Lu, Ll,
Lo), no precomposed or compatibility characters (a decomposition means "base + mark" or a
presentation form), never the missing-glyph box or an empty rendering, at most
``MAX_PER_SCRIPT`` per script (evenly spread over the script's code points), and no near
duplicates across the corpus (the Latin, Greek and Cyrillic look-alikes, ``o``/``O``): the first
script in the build order keeps the character.

The fonts come from Debian's ``fonts-noto-core``; this tool never downloads anything.

Example:
    $ apt-get install fonts-noto-core
    $ python tools/build_glyphs.py                      # writes src/metaml/data/assets/
    $ python tools/build_glyphs.py --preview docs/glyphs.png
    $ python tools/build_glyphs.py --scripts Latin,Greek --max-per-script 5 --out /tmp/g
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import re
import sys
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from metaml.data import ClassDataset

FONT_DIR = Path("/usr/share/fonts/truetype/noto")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "metaml" / "data" / "assets"
FORMAT_VERSION = 1

SEED = 0
DRAWERS = 20
SIZE = 28  # output side, as Omniglot in the MAML reference pipeline
SUPERSAMPLE = 4  # draw at 112x112, then Lanczos down: antialiased strokes like Omniglot's
LEVEL = 17  # images keep 16 grey levels, multiples of 17
RENDER_PX = 72  # font size of the outline that is thinned; big enough for clean skeletons
MAX_PER_SCRIPT = 30  # so that Yi (1164 syllables) or Arabic do not dominate
MIN_PER_SCRIPT = 12  # a script needs enough characters for within-script 5-way episodes
DEDUPE_CORRELATION = 0.94  # canonical renderings more alike are one character drawn twice
MIN_COMPLEXITY = 0.6  # a dot-like glyph would become a blob when scaled to the glyph box
MAX_COMPLEXITY = 5.0  # skeleton length / glyph side (Omniglot: 1.2-2.8); denser ones blur
SPLIT: dict[str, Any] = {"by": "group", "fractions": [0.6, 0.2, 0.2], "seed": 0}

# Families that are not a writing system's letters (symbols, numerals, notation) or whose shapes
# are not strokes (cuneiform wedges are filled triangles; Tangut is as dense as CJK).
SKIP_SCRIPTS = {
    "Music", "Math", "Symbols", "Symbols2", "IndicSiyaqNumbers", "MayanNumerals",
    "SignWriting", "TamilSupplement", "Display", "Cuneiform", "Tangut",
}  # fmt: skip
# Families that are another style of a script (Naskh and Kufi Arabic, Rashi Hebrew, ...).
SCRIPT_ALIASES = {"Urdu": "Arabic", "AdlamUnjoined": "Adlam", "TamilSlanted": "Tamil"}
STYLE_PREFIXES = ("Sans", "Serif", "Kufi", "Naskh", "Nastaliq", "Rashi", "Looped", "Traditional")
STYLES = ("Regular", "Bold", "Italic", "BoldItalic")
# NotoSans/NotoSerif hold Latin, Greek and Cyrillic: only their basic letters are taken (the
# hundreds of accented Latin letters are the same shapes plus a mark).
LGC_RANGES = {
    "Latin": [*range(0x41, 0x5B), *range(0x61, 0x7B)],
    "Greek": list(range(0x391, 0x3CA)),
    "Cyrillic": list(range(0x410, 0x450)),
}
LICENSE_NOTE = (
    "The glyph shapes come from the Noto fonts (https://notofonts.github.io, Debian package "
    "fonts-noto-core), Copyright the Noto Project Authors, licensed under the SIL Open Font "
    "License 1.1 (https://openfontlicense.org). The OFL lets fonts be used to make images such "
    "as these renderings; the renderings are not fonts and carry no font software."
)


@dataclass
class Script:
    """A writing system: its display name, font files (best first) and code points to draw."""

    name: str
    fonts: list[Path] = field(default_factory=list)
    codepoints: list[int] = field(default_factory=list)


@dataclass
class Glyph:
    """One character: its script, code point, the fonts that draw it and their skeletons."""

    script: str
    codepoint: int
    fonts: list[str]
    skeletons: list[np.ndarray]  # (m, 2) points (y, x), glyph box scaled to [-0.5, 0.5]
    complexity: float = 0.0  # skeleton length / glyph side, in the first font


# -- fonts and scripts ---------------------------------------------------------------------------


def parse_font_name(path: Path) -> tuple[str, str, str] | None:
    """``NotoSerifArmenian-Bold.ttf`` -> ``("Armenian", "Serif", "Bold")``; None if not used.

    Example:
        >>> parse_font_name(Path("NotoNastaliqUrdu-Regular.ttf"))
        ('Arabic', 'Nastaliq', 'Regular')
        >>> parse_font_name(Path("NotoSans-Italic.ttf"))
        ('LGC', 'Sans', 'Italic')
    """
    family, _, style = path.stem.partition("-")
    if not family.startswith("Noto") or style not in STYLES:
        return None
    rest = family.removeprefix("Noto")
    kind = next((p for p in STYLE_PREFIXES if rest.startswith(p)), None)
    if kind is None:
        return None
    key = rest.removeprefix(kind) or "LGC"
    key = "Tifinagh" if key.startswith("Tifinagh") else SCRIPT_ALIASES.get(key, key)
    if key in SKIP_SCRIPTS:
        return None
    return key, kind, style


def _font_rank(kind: str, style: str) -> tuple[int, int]:
    # Sans Regular first: it draws the canonical rendering used for de-duplication.
    kinds = ("Sans", "Serif")
    return (STYLES.index(style), kinds.index(kind) if kind in kinds else len(kinds))


def discover_scripts(font_dir: Path) -> dict[str, list[Path]]:
    """Map script key -> its font files, best first (Sans Regular, Serif Regular, ..., Bold).

    Example:
        >>> fonts = discover_scripts(FONT_DIR)  # doctest: +SKIP
        >>> [p.name for p in fonts["Armenian"]]  # doctest: +SKIP
        ['NotoSansArmenian-Regular.ttf', 'NotoSerifArmenian-Regular.ttf', ...]
    """
    found: dict[str, list[tuple[tuple[int, int], str, Path]]] = collections.defaultdict(list)
    for path in sorted(font_dir.glob("Noto*.ttf")):
        parsed = parse_font_name(path)
        if parsed is not None:
            key, kind, style = parsed
            found[key].append((_font_rank(kind, style), path.name, path))
    return {k: [p for *_, p in sorted(v)] for k, v in sorted(found.items())}


def display_name(key: str) -> str:
    """``CanadianAboriginal`` -> ``Canadian Aboriginal``.

    Example:
        >>> display_name("OldSouthArabian"), display_name("NKo")
        ('Old South Arabian', 'NKo')
    """
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", key)


def is_letter(cp: int) -> bool:
    """A letter of a script: category Lu/Ll/Lo, and no decomposition (not "base + mark" and not
    a presentation or compatibility form).

    Example:
        >>> is_letter(ord("a")), is_letter(ord("é")), is_letter(ord("5")), is_letter(0xFE8D)
        (True, False, False, False)
    """
    ch = chr(cp)
    return unicodedata.category(ch) in ("Lu", "Ll", "Lo") and not unicodedata.decomposition(ch)


def _name_word(cp: int) -> str:
    return unicodedata.name(chr(cp), "?").split(" ")[0]


def script_codepoints(fonts: Sequence[Path], exclude: set[int]) -> list[int]:
    """The letters of a script font's cmap, minus ``exclude`` and letters of other scripts.

    A script font also maps a few letters of neighbours (Vedic signs in Devanagari, a Tamil
    letter in Grantha): only letters whose Unicode name starts with the most common first word
    (``ARMENIAN``, ``OLD``, ...) are kept.

    Example:
        >>> cps = script_codepoints([FONT_DIR / "NotoSansArmenian-Regular.ttf"], set())  # doctest: +SKIP
        >>> hex(cps[0])  # doctest: +SKIP
        '0x531'
    """
    cmap = TTFont(fonts[0], lazy=True).getBestCmap()
    letters = [cp for cp in sorted(cmap) if cp not in exclude and is_letter(cp)]
    if not letters:
        return []
    word, _ = collections.Counter(_name_word(cp) for cp in letters).most_common(1)[0]
    return [cp for cp in letters if _name_word(cp) == word]


def collect_scripts(font_dir: Path, only: Iterable[str] | None = None) -> list[Script]:
    """The scripts to build, in build order: Latin, Greek, Cyrillic, then by name.

    The order matters: de-duplication keeps a character in the first script that has it.

    Example:
        >>> [s.name for s in collect_scripts(FONT_DIR, ["Greek", "Latin"])]  # doctest: +SKIP
        ['Latin', 'Greek']
    """
    by_key = discover_scripts(font_dir)
    lgc = by_key.pop("LGC", [])
    lgc_cmap = set(TTFont(lgc[0], lazy=True).getBestCmap()) if lgc else set()
    scripts = [
        Script(name, lgc, [cp for cp in cps if is_letter(cp) and cp in lgc_cmap])
        for name, cps in LGC_RANGES.items()
        if lgc
    ]
    claimed = set(lgc_cmap)
    for key, fonts in by_key.items():
        cps = script_codepoints(fonts, claimed)
        claimed.update(cps)
        scripts.append(Script(display_name(key), fonts, cps))
    if only is not None:
        wanted = {s.strip().lower() for s in only}
        scripts = [s for s in scripts if s.name.lower() in wanted]
    return scripts


# -- outlines and skeletons ----------------------------------------------------------------------


class FontCache:
    """Open each font file once (Pillow for drawing, fontTools for the cmap)."""

    def __init__(self) -> None:
        self._pil: dict[Path, ImageFont.FreeTypeFont] = {}
        self._cmap: dict[Path, set[int]] = {}
        self._notdef: dict[Path, bytes] = {}

    def font(self, path: Path) -> ImageFont.FreeTypeFont:
        """The Pillow font at ``RENDER_PX``; the basic layout (FreeType only) for determinism."""
        if path not in self._pil:
            self._pil[path] = ImageFont.truetype(
                str(path), RENDER_PX, layout_engine=ImageFont.Layout.BASIC
            )
        return self._pil[path]

    def path(self, name: str) -> Path:
        """The path of an opened font, by file name."""
        return next(p for p in self._pil if p.name == name)

    def has(self, path: Path, cp: int) -> bool:
        """Whether the font's cmap maps ``cp`` to a glyph."""
        if path not in self._cmap:
            self._cmap[path] = set(TTFont(path, lazy=True).getBestCmap())
        return cp in self._cmap[path]

    def notdef(self, path: Path) -> bytes:
        """The missing-glyph box's bitmap (a noncharacter is never in a cmap)."""
        if path not in self._notdef:
            self._notdef[path] = _mask_bytes(self.font(path), "\ufffe")
        return self._notdef[path]


def _mask_bytes(font: ImageFont.FreeTypeFont, ch: str) -> bytes:
    mask = font.getmask(ch)
    return repr(mask.size).encode() + bytes(mask)


def render_outline(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    """The character's filled outline as a bool array cropped to its ink (may be empty).

    Example:
        >>> bool(render_outline(ImageFont.load_default(), "A").any())
        True
    """
    left, top, right, bottom = (int(v) for v in font.getbbox(ch))
    pad = 4
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(im).text((pad - left, pad - top), ch, font=font, fill=255)
    ink = np.asarray(im) >= 128
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not len(rows):
        return ink[:0, :0]
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each 8-neighbourhood code, whether Zhang-Suen's first / second sub-step removes the
    centre pixel. Bit ``i`` of a code is neighbour P(i+2), clockwise from north."""
    codes = np.arange(256)
    p = [(codes >> i) & 1 for i in range(8)]  # P2..P9
    count = sum(p)
    transitions = sum((p[i] == 0) & (p[(i + 1) % 8] == 1) for i in range(8))
    core = (count >= 2) & (count <= 6) & (transitions == 1)
    p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
    first = core & (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
    second = core & (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
    return first, second


_THIN_STEPS = _thinning_tables()


def thin(ink: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (1984): the one-pixel-wide skeleton of a bool image.

    Example:
        >>> bar = np.zeros((7, 12), bool); bar[2:5, 1:11] = True
        >>> thin(bar).sum(1).tolist()
        [0, 0, 0, 7, 0, 0, 0]
    """
    img = np.pad(ink, 1).astype(np.uint8)
    centre = img[1:-1, 1:-1]  # a view: removing pixels here updates img
    changed = True
    while changed:
        changed = False
        for table in _THIN_STEPS:
            neighbours = (
                img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:],
                img[2:, 1:-1], img[2:, :-2], img[1:-1, :-2], img[:-2, :-2],
            )  # fmt: skip
            code = np.zeros(centre.shape, np.uint8)
            for bit, q in enumerate(neighbours):
                code |= q << bit
            remove = table[code] & (centre == 1)
            if remove.any():
                centre[remove] = 0
                changed = True
    return centre.astype(bool)


def skeleton_points(ink: np.ndarray) -> tuple[np.ndarray, float]:
    """The skeleton as points ``(m, 2)`` ``(y, x)``, its box mapped into ``[-0.5, 0.5]``, and
    its length in units of the ink box's side (about 1.2-2.8 for Omniglot).

    The points are the skeleton pixels plus two points between each pair of touching pixels,
    so that a pen drawing the points leaves no gaps after the glyph is scaled up. Scaling the
    skeleton's box (not the ink's) makes short thick strokes as big as any other glyph.

    Example:
        >>> bar = np.zeros((3, 10), bool); bar[:, :] = True
        >>> pts, length = skeleton_points(bar)
        >>> float(pts[:, 1].min()), float(pts[:, 1].max()), length
        (-0.5, 0.5, 0.7)
    """
    skeleton = thin(ink)
    ys, xs = np.nonzero(skeleton)
    if not len(ys):  # a speck that thinning removed entirely
        return np.zeros((0, 2)), 0.0
    points = [np.stack([ys, xs], 1).astype(np.float64)]
    padded = np.pad(skeleton, 1)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each touching pair once
        touch = padded[1 + ys + dy, 1 + xs + dx]
        start = points[0][touch]
        points += [start + t * np.array([dy, dx]) for t in (1 / 3, 2 / 3)]
    pts = np.concatenate(points)
    lo, hi = pts.min(0), pts.max(0)
    side = max(float((hi - lo).max()), 1.0)
    return (pts - (lo + hi) / 2) / side, len(ys) / max(ink.shape)


def outline(fonts: FontCache, path: Path, cp: int) -> np.ndarray | None:
    """The font's outline of ``cp`` (see :func:`render_outline`), or None when the cmap lacks
    it, the font draws its missing-glyph box, or the drawing is empty.

    Example:
        >>> outline(FontCache(), FONT_DIR / "NotoSans-Regular.ttf", 0x41).shape  # doctest: +SKIP
        (69, 63)
    """
    if not fonts.has(path, cp):
        return None
    font = fonts.font(path)
    if _mask_bytes(font, chr(cp)) == fonts.notdef(path):
        return None
    ink = render_outline(font, chr(cp))
    if not ink.any():
        return None
    side = max(ink.shape)
    if side < RENDER_PX // 2:
        # A small glyph (shorthand strokes, a raised letter) gets too few skeleton pixels to
        # draw a continuous line once scaled up: render it again, bigger.
        size = min(4 * RENDER_PX, round(RENDER_PX * 0.75 * RENDER_PX / side))
        ink = render_outline(font.font_variant(size=size), chr(cp))
    return ink


def make_glyph(fonts: FontCache, script: Script, cp: int, all_fonts: bool = False) -> Glyph | None:
    """The skeleton of ``cp`` in the script's first font that draws it (every such font, up to
    one per drawer, with ``all_fonts``); None if no font does.

    Candidates get one skeleton (enough to judge and de-duplicate them); only the chosen ones
    pay for the rest.

    Example:
        >>> g = make_glyph(FontCache(), Script("Latin", [FONT_DIR / "NotoSans-Regular.ttf"]), 65)  # doctest: +SKIP
        >>> g.fonts  # doctest: +SKIP
        ['NotoSans-Regular.ttf']
    """
    names, skeletons, lengths = [], [], []
    for path in script.fonts:
        ink = outline(fonts, path, cp)
        pts, length = skeleton_points(ink) if ink is not None else (np.zeros((0, 2)), 0.0)
        if len(pts) >= 2:
            names.append(path.name)
            skeletons.append(pts)
            lengths.append(length)
            if not all_fonts or len(skeletons) == DRAWERS:
                break
    if not skeletons:
        return None
    return Glyph(script.name, cp, names, skeletons, lengths[0])


# -- drawing -------------------------------------------------------------------------------------


def smooth_field(
    points: np.ndarray, rng: np.random.Generator, amplitude: float, freq: tuple[float, float]
) -> np.ndarray:
    """A smooth random displacement of each point: a sum of three random plane waves per axis.

    ``freq`` is in cycles per glyph side; ``amplitude`` is the field's standard deviation.

    Example:
        >>> pts = np.zeros((5, 2))
        >>> smooth_field(pts, np.random.default_rng(0), 0.1, (1.0, 2.0)).shape
        (5, 2)
    """
    waves = 3  # per axis
    angle = rng.uniform(0, 2 * np.pi, (2, waves))
    k = rng.uniform(*freq, (2, waves, 1)) * np.stack([np.cos(angle), np.sin(angle)], -1)
    phase = rng.uniform(0, 2 * np.pi, (2, waves))
    amp = rng.normal(0, amplitude * math.sqrt(2 / waves), (2, waves))
    # (m, 2) @ (2, 2*waves) -> (m, 2*waves): every wave at every point, then sum per axis.
    waves_at = np.sin(2 * np.pi * points @ k.reshape(-1, 2).T + phase.ravel())
    return (waves_at.reshape(len(points), 2, waves) * amp).sum(-1)


def affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(A, shift)``: glyph box coordinates -> output pixels (rotation +-10 deg,
    shear, skeleton side 13-19 px so that the ink is Omniglot's ~19 px, aspect +-10%, shift
    +-1.5 px).

    Example:
        >>> a, t = affine(np.random.default_rng(0))
        >>> a.shape, t.shape
        ((2, 2), (2,))
    """
    theta = np.deg2rad(rng.uniform(-10, 10))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shear = np.array([[1.0, 0.0], [rng.uniform(-0.2, 0.2), 1.0]])  # x += s * y: a slant
    side, aspect = rng.uniform(13, 19), math.exp(rng.uniform(-0.1, 0.1))
    scale = np.diag([side * aspect, side / aspect])
    shift = SIZE / 2 + rng.uniform(-1.5, 1.5, 2)
    return rot @ shear @ scale, shift


def draw(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One hand-drawn-looking rendering of a skeleton: ``(SIZE, SIZE)`` uint8, strokes bright.

    Example:
        >>> pts = np.stack([np.linspace(-0.5, 0.5, 50), np.zeros(50)], 1)  # a vertical bar
        >>> im = draw(pts, np.random.default_rng(0))
        >>> im.shape, im.dtype, int(im.max()) > 200
        ((28, 28), dtype('uint8'), True)
    """
    bent = points + smooth_field(points, rng, 0.035, (0.4, 1.2))  # elastic: the hand's shape
    bent += smooth_field(points, rng, 0.006, (3.0, 5.0))  # pen tremor
    a, shift = affine(rng)
    pen = rng.uniform(1.0, 1.8)  # pen width in output pixels, to match Omniglot's ink
    hi = SIZE * SUPERSAMPLE
    yx = (fit_inside(bent @ a.T + shift, pen / 2 + 1.5) * SUPERSAMPLE).astype(np.int64)  # (m, 2)
    big = Image.fromarray(pen_strokes(yx, pen * SUPERSAMPLE / 2, hi))
    small = np.asarray(big.resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    # 16 grey levels (0, 17, ..., 255): invisible to a network, and half the compressed size.
    return (np.round(small / LEVEL) * LEVEL).astype(np.uint8)


def fit_inside(q: np.ndarray, margin: float) -> np.ndarray:
    """Move (and if need be shrink) points ``(m, 2)`` so that they keep ``margin`` pixels from
    every edge of the ``SIZE`` image: no drawing is ever cut off.

    Example:
        >>> fit_inside(np.array([[-5.0, 3.0], [40.0, 3.0]]), 2.0)[:, 0].tolist()
        [2.0, 26.0]
    """
    lo, hi = q.min(0), q.max(0)
    fit = min(1.0, (SIZE - 2 * margin) / max(float((hi - lo).max()), 1e-9))
    half = (hi - lo) / 2 * fit
    centre = np.clip((lo + hi) / 2, margin + half, SIZE - margin - half)
    return (q - (lo + hi) / 2) * fit + centre


def pen_strokes(yx: np.ndarray, radius: float, side: int) -> np.ndarray:
    """Ink of a round pen of ``radius`` (pixels) over the dots ``yx``: ``(side, side)`` uint8
    with a one-pixel soft edge.

    Example:
        >>> pen_strokes(np.array([[5, 5]]), 2.0, 11)[5, 3:8].tolist()
        [128, 255, 255, 255, 128]
    """
    out = np.zeros((side, side), np.uint8)
    if not len(yx):
        return out
    # The distance transform is the cost: compute it only around the dots.
    margin = math.ceil(radius) + 2
    lo = np.maximum(yx.min(0) - margin, 0)
    hi = np.minimum(yx.max(0) + margin + 1, side)
    dots = np.ones(tuple(hi - lo), bool)
    dots[yx[:, 0] - lo[0], yx[:, 1] - lo[1]] = False
    ink = np.clip(radius + 0.5 - ndimage.distance_transform_edt(dots), 0.0, 1.0)
    out[lo[0] : hi[0], lo[1] : hi[1]] = np.round(ink * 255).astype(np.uint8)
    return out


def canonical(points: np.ndarray) -> np.ndarray:
    """The undistorted rendering (no affine, fixed pen), blurred and unit-normalised: the
    vector whose dot products are the correlations used to find near-duplicates.

    Example:
        >>> pts = np.stack([np.linspace(-0.5, 0.5, 50), np.zeros(50)], 1)
        >>> v = canonical(pts)
        >>> v.shape, round(float(v @ v), 6)
        ((784,), 1.0)
    """
    hi = SIZE * SUPERSAMPLE
    yx = ((points * 20 + SIZE / 2) * SUPERSAMPLE).astype(np.int64).clip(0, hi - 1)
    ink = pen_strokes(yx, 1.8 * SUPERSAMPLE / 2, hi) / 255.0
    small = ink.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))
    # Blur so that a one-pixel offset (a slightly different stem) still counts as the same.
    v = ndimage.gaussian_filter(small, 1.0).ravel()
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-12)


def drawer_rng(seed: int, cp: int, drawer: int) -> np.random.Generator:
    """The random stream of one (character, drawer): independent of build order and subset.

    Example:
        >>> int(drawer_rng(0, 65, 3).integers(100)) == int(drawer_rng(0, 65, 3).integers(100))
        True
    """
    return np.random.default_rng([seed, cp, drawer])


def render_glyph(glyph: Glyph, seed: int, drawers: int = DRAWERS) -> np.ndarray:
    """All drawers of a character, ``(drawers, SIZE, SIZE)`` uint8; drawer ``d`` uses the
    character's fonts in turn.

    Example:
        >>> pts = np.stack([np.linspace(-0.5, 0.5, 50), np.zeros(50)], 1)
        >>> render_glyph(Glyph("X", 65, ["f"], [pts]), seed=0, drawers=2).shape
        (2, 28, 28)
    """
    return np.stack(
        [
            draw(glyph.skeletons[d % len(glyph.skeletons)], drawer_rng(seed, glyph.codepoint, d))
            for d in range(drawers)
        ]
    )


# -- selection -----------------------------------------------------------------------------------


def evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (all of them when there are ``n`` or fewer).

    Example:
        >>> evenly(list(range(10)), 3)
        [0, 4, 9]
    """
    if len(items) <= n:
        return list(items)
    idx = np.round(np.linspace(0, len(items) - 1, n)).astype(int)
    return [items[i] for i in idx]


class Seen:
    """The canonical vectors of the characters kept so far, to find a newcomer's closest twin.

    Example:
        >>> seen = Seen()
        >>> seen.add(np.eye(SIZE * SIZE)[0], "Latin U+0041")
        >>> seen.closest(np.eye(SIZE * SIZE)[0])
        (1.0, 'Latin U+0041')
    """

    def __init__(self) -> None:
        self._vecs = np.zeros((64, SIZE * SIZE))  # grown by doubling: one matmul per lookup
        self._labels: list[str] = []

    def closest(self, vec: np.ndarray) -> tuple[float, str]:
        """The highest correlation with a kept character, and that character's label."""
        if not self._labels:
            return -1.0, ""
        r = self._vecs[: len(self._labels)] @ vec
        i = int(np.argmax(r))
        return float(r[i]), self._labels[i]

    def add(self, vec: np.ndarray, label: str) -> None:
        """Keep ``vec`` (a :func:`canonical` vector) under ``label``."""
        if len(self._labels) == len(self._vecs):
            self._vecs = np.concatenate([self._vecs, np.zeros_like(self._vecs)])
        self._vecs[len(self._labels)] = vec
        self._labels.append(label)


def _label(script: str, cp: int) -> str:
    return f"{script} U+{cp:04X} {chr(cp)}"


def select_glyphs(
    fonts: FontCache,
    script: Script,
    seen: Seen,
    limits: tuple[int, int],
    log: list[str],
) -> list[Glyph]:
    """The characters of one script that pass every filter: ``limits = (min, max)`` of them,
    or none at all when fewer than ``min`` pass.

    ``seen`` holds every character kept so far (all scripts); the chosen ones are added to it.

    Example:
        >>> latin = collect_scripts(FONT_DIR, ["Latin"])[0]  # doctest: +SKIP
        >>> select_glyphs(FontCache(), latin, Seen(), (1, 5), [])  # doctest: +SKIP
        [Glyph(script='Latin', codepoint=65, ...), ...]
    """
    min_per_script, max_per_script = limits
    # Look at twice the cap: some candidates will be dropped as duplicates or too dense.
    here = Seen()  # this script's survivors: not yet in ``seen``, since the cap may drop some
    chosen: list[tuple[Glyph, np.ndarray]] = []
    for cp in evenly(script.codepoints, 2 * max_per_script):
        glyph = make_glyph(fonts, script, cp)
        if glyph is None:
            log.append(f"{_label(script.name, cp)}: no font draws it")
            continue
        if glyph.complexity > MAX_COMPLEXITY:
            log.append(f"{_label(script.name, cp)}: too dense for {SIZE}x{SIZE}")
            continue
        if glyph.complexity < MIN_COMPLEXITY:
            log.append(f"{_label(script.name, cp)}: a dot, not a stroke")
            continue
        vec = canonical(glyph.skeletons[0])
        r, twin = max(seen.closest(vec), here.closest(vec))
        if r > DEDUPE_CORRELATION:
            log.append(f"{_label(script.name, cp)}: looks like {twin} (r={r:.3f})")
            continue
        here.add(vec, _label(script.name, cp))
        chosen.append((glyph, vec))
    chosen = evenly(chosen, max_per_script)
    if len(chosen) < min_per_script:
        log.append(f"{script.name}: dropped, only {len(chosen)} characters")
        return []
    for glyph, vec in chosen:
        seen.add(vec, _label(script.name, glyph.codepoint))
    return [make_glyph(fonts, script, g.codepoint, all_fonts=True) or g for g, _ in chosen]


# -- the build -----------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The built corpus: images ``(classes, drawers, SIZE, SIZE)`` uint8 and its manifest."""

    images: np.ndarray
    codepoints: np.ndarray
    manifest: dict[str, Any]


def build(
    font_dir: Path = FONT_DIR,
    seed: int = SEED,
    scripts: Iterable[str] | None = None,
    max_per_script: int = MAX_PER_SCRIPT,
    min_per_script: int = MIN_PER_SCRIPT,
    drawers: int = DRAWERS,
    verbose: bool = False,
) -> Corpus:
    """Select characters, render every drawer, and assemble the manifest.

    Example:
        >>> c = build(scripts=["Latin", "Greek"], max_per_script=3, min_per_script=1)  # doctest: +SKIP
        >>> c.images.shape  # doctest: +SKIP
        (6, 20, 28, 28)
    """
    fonts, log = FontCache(), list[str]()
    seen = Seen()
    glyphs: list[Glyph] = []
    for script in collect_scripts(font_dir, scripts):
        chosen = select_glyphs(fonts, script, seen, (min_per_script, max_per_script), log)
        glyphs += chosen
        if verbose and chosen:
            print(f"{script.name:28s} {len(chosen):3d} characters", file=sys.stderr)
    images = np.stack([render_glyph(g, seed, drawers) for g in glyphs]) if glyphs else None
    if images is None:
        raise SystemExit("no script had enough characters; are the Noto fonts installed?")
    manifest = make_manifest(glyphs, fonts, seed, drawers, max_per_script, log)
    return Corpus(images, np.array([g.codepoint for g in glyphs], np.int32), manifest)


def font_version(path: Path) -> str:
    """The font's version string (name ID 5), e.g. ``Version 2.013``.

    Example:
        >>> font_version(FONT_DIR / "NotoSans-Regular.ttf")  # doctest: +SKIP
        'Version 2.013; ttfautohint (v1.8.4.7-5d5b)'
    """
    record = TTFont(path, lazy=True)["name"].getName(5, 3, 1, 0x409)
    return str(record) if record is not None else "unknown"


def split_scripts(script_names: list[str]) -> dict[str, list[str]]:
    """The fixed train/val/test scripts: exactly what ``ClassDataset.split`` with ``SPLIT``'s
    by, fractions and seed makes (also what a run with ``split_by=group`` and seed 0 makes).

    Example:
        >>> split_scripts(["a", "b", "c", "d", "e"])["val"]
        ['a']
    """
    if len(set(script_names)) < 3:  # a small test build: nothing to hold out
        return {"train": sorted(set(script_names)), "val": [], "test": []}
    # One stand-in image per class: the split only looks at the groups.
    n = len(script_names)
    stand_in = ClassDataset(
        torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n), script_names, script_names
    )
    parts = stand_in.split(SPLIT["by"], SPLIT["fractions"], SPLIT["seed"])
    return {k: part.groups for k, part in zip(("train", "val", "test"), parts, strict=True)}


def make_manifest(
    glyphs: list[Glyph],
    fonts: FontCache,
    seed: int,
    drawers: int,
    max_per_script: int,
    log: list[str],
) -> dict[str, Any]:
    """The JSON manifest: what each class is, the fonts and versions, the split, the licence.

    Example:
        >>> m = make_manifest([], FontCache(), 0, 20, 30, [])
        >>> m["name"], m["classes"]
        ('glyphs', [])
    """
    per_script: dict[str, set[str]] = collections.defaultdict(set)
    for g in glyphs:
        per_script[g.script].update(g.fonts)
    used = sorted({f for fs in per_script.values() for f in fs})
    names = [g.script for g in glyphs]
    return {
        "name": "glyphs",
        "format_version": FORMAT_VERSION,
        "description": "characters of real scripts drawn from the Noto fonts, 20 drawers each",
        "image_size": [SIZE, SIZE],
        "drawers": drawers,
        "images": "glyphs.npz: images (classes, drawers, 28, 28) uint8, strokes 255 on 0",
        "seed": seed,
        "license": LICENSE_NOTE,
        "build": {
            "tool": "tools/build_glyphs.py",
            "fonts_package": "fonts-noto-core",
            "render_px": RENDER_PX,
            "supersample": SUPERSAMPLE,
            "max_per_script": max_per_script,
            "dedupe_correlation": DEDUPE_CORRELATION,
            "min_complexity": MIN_COMPLEXITY,
            "max_complexity": MAX_COMPLEXITY,
            "pillow": Image.__version__,
            "numpy": np.__version__,
        },
        "split": {**SPLIT, **split_scripts(names)},
        "fonts": {f: font_version(fonts.path(f)) for f in used},
        "scripts": [
            {"name": s, "characters": names.count(s), "fonts": sorted(per_script[s])}
            for s in dict.fromkeys(names)
        ],
        "classes": [
            {
                "script": g.script,
                "character": chr(g.codepoint),
                "codepoint": f"U+{g.codepoint:04X}",
                "unicode_name": unicodedata.name(chr(g.codepoint), ""),
                "fonts": g.fonts[:drawers],
            }
            for g in glyphs
        ],
        "dropped": log,
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-identical for identical arrays: fixed zip
    timestamps and member order (numpy stamps members with the current time).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.npz"
        >>> write_npz(p, {"x": np.arange(3)})
        >>> np.load(p, allow_pickle=False)["x"].tolist()
        [0, 1, 2]
    """
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def write_corpus(corpus: Corpus, out: Path) -> None:
    """Write ``glyphs.npz`` and ``glyphs.json`` into ``out``.

    Example:
        >>> write_corpus(build(scripts=["Latin"]), Path("/tmp/glyphs"))  # doctest: +SKIP
    """
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / "glyphs.npz", {"images": corpus.images, "codepoints": corpus.codepoints})
    (out / "glyphs.json").write_text(manifest_text(corpus.manifest), encoding="utf-8")


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON with one list item per line: compact, and diffs show which
    characters changed.

    Example:
        >>> print(manifest_text({"name": "g", "classes": [{"a": 1}, {"a": 2}]}), end="")
        {
        "name": "g",
        "classes": [
          {"a": 1},
          {"a": 2}
        ]
        }
    """
    fields = []
    for key, value in manifest.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"  {json.dumps(v, ensure_ascii=False)}" for v in value)
            fields.append(f"{json.dumps(key)}: [\n{items}\n]")
        else:
            fields.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


# -- preview -------------------------------------------------------------------------------------


def preview(corpus: Corpus, path: Path, rows: int = 24, chars: int = 10, drawers: int = 6) -> None:
    """A grid for the README: per script (``rows`` spread over the corpus), ``chars``
    characters by drawer 0, then ``drawers`` drawers of its first character.

    Example:
        >>> preview(build(scripts=["Latin"]), Path("docs/glyphs.png"))  # doctest: +SKIP
    """
    classes = corpus.manifest["classes"]
    by_script: dict[str, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(classes):
        by_script[c["script"]].append(i)
    shown = evenly(list(by_script), rows)
    cell, label_w, gap = 2 * SIZE + 4, 190, 24
    width = label_w + (chars + drawers) * cell + gap
    sheet = Image.new("L", (width, len(shown) * cell + 4), 0)
    pen = ImageDraw.Draw(sheet)
    label_font = _label_font()
    for r, name in enumerate(shown):
        y = r * cell + 2
        pen.text((8, y + cell // 2), name, fill=200, font=label_font, anchor="lm")
        ids = evenly(by_script[name], chars)
        tiles = [corpus.images[i, 0] for i in ids]
        tiles += [corpus.images[ids[0], d] for d in range(1, drawers + 1)]
        for k, tile in enumerate(tiles):
            x = label_w + k * cell + (gap if k >= len(ids) else 0)
            sheet.paste(Image.fromarray(tile).resize((2 * SIZE, 2 * SIZE)), (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def _label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    sans = FONT_DIR / "NotoSans-Regular.ttf"
    return ImageFont.truetype(str(sans), 15) if sans.exists() else ImageFont.load_default()


# -- command line --------------------------------------------------------------------------------


def check_fonts(font_dir: Path) -> None:
    """Exit with install instructions when the Noto fonts are missing (never download).

    Example:
        >>> check_fonts(FONT_DIR)  # doctest: +SKIP
    """
    if not (font_dir / "NotoSans-Regular.ttf").exists():
        raise SystemExit(
            f"Noto fonts not found in {font_dir}. Install Debian's fonts-noto-core:\n"
            "    sudo apt-get install fonts-noto-core\n"
            "or pass --fonts DIR with the Noto .ttf files; this tool downloads nothing."
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the corpus into ``--out`` and optionally draw ``--preview``.

    Example:
        >>> main(["--scripts", "Latin,Greek", "--out", "/tmp/g"])  # doctest: +SKIP
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fonts", type=Path, default=FONT_DIR, help="folder of Noto .ttf files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where glyphs.npz/json go")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--scripts", help="comma-separated script names (default: all)")
    ap.add_argument("--max-per-script", type=int, default=MAX_PER_SCRIPT)
    ap.add_argument("--min-per-script", type=int, default=MIN_PER_SCRIPT)
    ap.add_argument("--preview", type=Path, help="also write a PNG grid of samples here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    check_fonts(args.fonts)
    start = time.perf_counter()
    corpus = build(
        args.fonts, args.seed, args.scripts.split(",") if args.scripts else None,
        args.max_per_script, args.min_per_script, verbose=not args.quiet,
    )  # fmt: skip
    write_corpus(corpus, args.out)
    if args.preview:
        preview(corpus, args.preview)
    n_scripts = len(corpus.manifest["scripts"])
    size = (args.out / "glyphs.npz").stat().st_size / 1e6
    print(
        f"{n_scripts} scripts, {len(corpus.images)} characters x {corpus.images.shape[1]} "
        f"drawers -> {args.out} ({size:.1f} MB) in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
