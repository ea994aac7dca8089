"""Shared fixtures: the real Omniglot folder, an isolated data cache, a tiny synthetic dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from metaml.data import ClassDataset

# The shared data sits beside the repository: <workspace>/shared/data/omniglot.
OMNIGLOT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded-data cache in a temporary folder, so tests never touch ~/.cache/metaml."""
    old = os.environ.get("METAML_CACHE")
    path = tmp_path_factory.mktemp("metaml-cache")
    os.environ["METAML_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("METAML_CACHE", None)
    else:
        os.environ["METAML_CACHE"] = old


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The folder holding the Omniglot zips; tests using it are skipped when it is absent."""
    if not (OMNIGLOT_ROOT / "images_background_small1.zip").exists():
        pytest.skip(f"Omniglot data not found in {OMNIGLOT_ROOT}")
    return OMNIGLOT_ROOT


@dataclass(repr=False)
class IdDataset:
    """A ClassDataset whose every image (and each of its rotations) is unique.

    ``identify(x)`` maps a float image gathered by a sampler back to ``(example id, quarter
    turns)``, so tests can check which examples an episode used without trusting the sampler.
    """

    dataset: ClassDataset
    lookup: dict[bytes, tuple[int, int]]

    def identify(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """``(example id, rotation)`` of each image of ``x (n, C, H, W)`` float in [0, 1]."""
        u8 = (x * 255).round().to(torch.uint8).numpy()
        return [self.lookup[img.tobytes()] for img in u8]


def make_id_dataset(
    group_sizes: tuple[int, ...] = (2, 3, 4, 5), seed: int = 0, size: int = 5
) -> IdDataset:
    """Groups ``g0, g1, ...`` with ``group_sizes`` classes; 6 to 12 examples per class."""
    rng = np.random.default_rng(seed)
    groups = [f"g{g}" for g, n in enumerate(group_sizes) for _ in range(n)]
    counts = rng.integers(6, 13, size=len(groups))
    targets = np.repeat(np.arange(len(groups)), counts)
    rng.shuffle(targets)  # examples of a class are not contiguous, as in real data
    images = rng.integers(0, 256, size=(len(targets), 1, size, size), dtype=np.uint8)
    lookup = {
        np.ascontiguousarray(np.rot90(img, r, axes=(-2, -1))).tobytes(): (i, r)
        for i, img in enumerate(images)
        for r in range(4)
    }
    assert len(lookup) == 4 * len(images), "random images collided; change the seed"
    ds = ClassDataset(
        torch.from_numpy(images),
        torch.from_numpy(targets),
        [f"c{c}" for c in range(len(groups))],
        groups,
        config={"reader": "synthetic"},
    )
    return IdDataset(ds, lookup)


@pytest.fixture(scope="session")
def id_dataset() -> IdDataset:
    """14 classes in 4 groups (2, 3, 4, 5 classes), 6-12 examples each, 1x5x5 images."""
    return make_id_dataset()


@pytest.fixture
def tiny_dataset() -> ClassDataset:
    """6 classes in 3 groups, 4 examples each; image value = 10 * class + example."""
    targets = torch.arange(24) // 4
    images = (10 * targets + torch.arange(24) % 4).to(torch.uint8).view(24, 1, 1, 1)
    images = images.expand(24, 1, 3, 3).contiguous()
    names = [f"c{c}" for c in range(6)]
    return ClassDataset(images, targets, names, ["a", "a", "b", "b", "c", "c"])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run several times faster on one thread of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
