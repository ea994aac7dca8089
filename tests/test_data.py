"""ClassDataset, splits, the registry, Omniglot on the real archives, and the sinusoid family."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metaml.data import ClassDataset, Sinusoid, list_datasets, load
from metaml.data.sinusoid import SinusoidParams
from metaml.errors import UserError

# -- ClassDataset -------------------------------------------------------------------------------


def test_basics(tiny_dataset: ClassDataset) -> None:
    ds = tiny_dataset
    assert (ds.num_classes, ds.shape, ds.groups) == (6, (1, 3, 3), ["a", "b", "c"])
    assert ds.examples_per_class().tolist() == [4] * 6
    assert ds.class_indices(2).tolist() == [8, 9, 10, 11]
    assert ds.describe() == {
        "classes": 6, "groups": 3, "examples": 24, "examples_per_class_min": 4,
        "examples_per_class_max": 4, "shape": [1, 3, 3],
    }  # fmt: skip


def test_subset_classes_reindexes(tiny_dataset: ClassDataset) -> None:
    sub = tiny_dataset.subset_classes([4, 1])
    assert sub.class_names == ["c4", "c1"] and sub.class_groups == ["c", "a"]
    # image value = 10 * original class + example: check images moved with their labels
    for img, t in zip(sub.images[:, 0, 0, 0].tolist(), sub.targets.tolist(), strict=True):
        assert img // 10 == [4, 1][t]
    with pytest.raises(UserError, match="twice"):
        tiny_dataset.subset_classes([1, 1])


def test_invalid_construction() -> None:
    with pytest.raises(UserError, match="uint8"):
        ClassDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), "ab")
    with pytest.raises(UserError, match="'b' has no examples"):
        ClassDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0]), "ab")
    with pytest.raises(UserError, match="group"):
        ClassDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), "ab", ["x"])


def _grouped(n_groups: int, per_group: int = 3) -> ClassDataset:
    n = n_groups * per_group
    targets = torch.arange(2 * n) % n
    groups = [f"g{c // per_group}" for c in range(n)]
    return ClassDataset(
        torch.zeros(2 * n, 1, 1, 1, dtype=torch.uint8), targets, [f"c{i}" for i in range(n)], groups
    )


@pytest.mark.parametrize("by", ["group", "class"])
def test_split_deterministic_disjoint_complete(by: str) -> None:
    ds = _grouped(10)
    parts = ds.split(by, (0.6, 0.2, 0.2), seed=3)
    again = ds.split(by, (0.6, 0.2, 0.2), seed=3)
    other = ds.split(by, (0.6, 0.2, 0.2), seed=4)
    names = [set(p.class_names) for p in parts]
    assert names == [set(p.class_names) for p in again]
    assert names != [set(p.class_names) for p in other]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == set(ds.class_names)
    if by == "group":
        assert [p.num_classes for p in parts] == [18, 6, 6]
        groups = [set(p.class_groups) for p in parts]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        # whole groups: each group's every class on one side
        for p in parts:
            assert all(p.class_groups.count(g) == 3 for g in p.groups)
    else:
        assert [p.num_classes for p in parts] == [18, 6, 6]


def test_split_gives_every_side_a_group() -> None:
    for n in (3, 4, 5):
        sizes = [len(p.groups) for p in _grouped(n).split("group", (0.8, 0.1, 0.1))]
        assert min(sizes) >= 1 and sum(sizes) == n


def test_split_errors() -> None:
    with pytest.raises(UserError, match=r"2 group\(s\).*by='class'"):
        _grouped(2).split("group")
    with pytest.raises(UserError, match="summing to 1"):
        _grouped(4).split("group", (0.5, 0.5, 0.5))
    with pytest.raises(UserError, match="by='group' or by='class'"):
        _grouped(4).split("alphabet")  # type: ignore[arg-type]


def test_concat_drops_duplicate_classes(tiny_dataset: ClassDataset) -> None:
    both = ClassDataset.concat([tiny_dataset, tiny_dataset.subset_classes([0, 5])])
    assert both.num_classes == 6
    with pytest.raises(UserError, match="appears twice"):
        ClassDataset.concat([tiny_dataset, tiny_dataset], drop_duplicates=False)


# -- registry ---------------------------------------------------------------------------------


def test_list_datasets() -> None:
    rows = list_datasets()
    names = [r["name"] for r in rows]
    for expected in (
        "sinusoid",
        "omniglot-small1",
        "omniglot-small2",
        "omniglot-small",
        "folder:PATH",
    ):
        assert expected in names
    assert all(set(r) == {"name", "kind", "description"} for r in rows)


def test_unknown_name_suggests() -> None:
    with pytest.raises(
        UserError, match=r"unknown dataset 'omniglot-smal'.*did you mean 'omniglot-small'"
    ):
        load("omniglot-smal")


def test_unknown_option_suggests() -> None:
    with pytest.raises(UserError, match=r"no option 'image_sise'.*did you mean 'image_size'"):
        load("omniglot-small1", image_sise=28)
    with pytest.raises(UserError, match="no option 'image_size'"):
        load("sinusoid", image_size=28)
    assert load("sinusoid", image_size=None).task_type == "regression"  # None = default


def test_specs_and_relative_root(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz", images=np.zeros((4, 3, 3), np.uint8), labels=np.array([0, 1, 0, 1])
    )
    ds = load("npz:d.npz", root=tmp_path, cache=False)
    assert isinstance(ds, ClassDataset) and ds.num_classes == 2
    with pytest.raises(UserError, match="needs a path"):
        load("folder:")


def test_omniglot_not_found_says_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"images_background_small1.zip not found.*root="):
        load("omniglot-small1", root=tmp_path)


def test_omniglot_found_via_env(omniglot_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAML_DATA", str(omniglot_root))
    monkeypatch.chdir(omniglot_root)  # no ./data/omniglot here
    ds = load("omniglot-small1")
    assert isinstance(ds, ClassDataset) and ds.num_classes == 136


# -- Omniglot, real archives ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "groups", "classes", "examples"),
    [
        ("omniglot-small1", 5, 136, 2720),
        ("omniglot-small2", 5, 156, 3120),
        ("omniglot-small", 8, 242, 4840),
    ],
)
def test_omniglot_counts(
    omniglot_root: Path, name: str, groups: int, classes: int, examples: int
) -> None:
    ds = load(name, root=omniglot_root)
    assert isinstance(ds, ClassDataset)
    d = ds.describe()
    assert (d["groups"], d["classes"], d["examples"]) == (groups, classes, examples)
    assert d["shape"] == [1, 28, 28] and d["examples_per_class_min"] == 20
    assert ds.config["dataset"] == name


def test_omniglot_preprocessing(omniglot_root: Path) -> None:
    ds = load("omniglot-small1", root=omniglot_root)
    assert isinstance(ds, ClassDataset)
    assert ds.config["image_size"] == [28, 28] and ds.config["invert"] is True
    assert ds.class_names[0] == "Balinese/character01" and ds.groups[0] == "Balinese"
    # inverted: mostly-empty background is 0 and strokes are bright
    assert int(ds.images[:, :, 0, 0].max()) == 0 and int(ds.images.max()) == 255
    assert float(ds.images.float().mean()) / 255 < 0.2
    big = load("omniglot-small1", root=omniglot_root, image_size=105, invert=False)
    assert isinstance(big, ClassDataset) and big.shape == (1, 105, 105)
    assert set(torch.unique(big.images).tolist()) == {0, 255}  # binary at full size


def test_omniglot_small_archives_share_identical_alphabets(omniglot_root: Path) -> None:
    a, b = (load(n, root=omniglot_root) for n in ("omniglot-small1", "omniglot-small2"))
    assert isinstance(a, ClassDataset) and isinstance(b, ClassDataset)
    assert set(a.groups) & set(b.groups) == {"Greek", "Latin"}
    for c in (b.class_names.index("Greek/character01"), b.class_names.index("Latin/character26")):
        ca = a.class_names.index(b.class_names[c])
        assert torch.equal(a.images[a.class_indices(ca)], b.images[b.class_indices(c)])


# -- sinusoid ---------------------------------------------------------------------------------


def test_sinusoid_ranges() -> None:
    fam = Sinusoid()
    rng = np.random.default_rng(0)
    params = [fam.sample_params(rng) for _ in range(4000)]
    amps = np.array([p.amplitude for p in params])
    phases = np.array([p.phase for p in params])
    assert 0.1 <= amps.min() < 0.2 and 4.9 < amps.max() <= 5.0
    assert 0.0 <= phases.min() < 0.05 and math.pi - 0.05 < phases.max() <= math.pi
    x, y = fam.points(SinusoidParams(2.0, 1.0), rng, 5000)
    assert x.shape == (5000, 1) and x.dtype == torch.float32 and y.dtype == torch.float32
    assert -5.0 <= float(x.min()) < -4.95 and 4.95 < float(x.max()) <= 5.0
    assert torch.allclose(y, 2.0 * torch.sin(x - 1.0), atol=1e-5)


def test_sinusoid_task_is_one_curve() -> None:
    rng = np.random.default_rng(7)
    t = Sinusoid().sample(rng, shots=10, queries=20)
    assert t.support_x.shape == (10, 1) and t.query_y.shape == (20, 1)
    p = Sinusoid().sample_params(np.random.default_rng(7))  # the same first draws
    x = torch.cat([t.support_x, t.query_x])
    y = torch.cat([t.support_y, t.query_y])
    assert torch.allclose(y, p.amplitude * torch.sin(x - p.phase), atol=1e-5)


def test_sinusoid_from_registry_with_options() -> None:
    fam = load("sinusoid", amplitude_range=[1, 2])
    assert isinstance(fam, Sinusoid) and fam.amplitude_range == (1.0, 2.0)
    with pytest.raises(UserError, match="low <= high"):
        Sinusoid(x_range=(5.0, -5.0))
