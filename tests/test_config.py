"""The run config: YAML loading, overrides, and clear errors for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaml.config import RunConfig, apply_override, config_from_dict, load_config
from metaml.errors import UserError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        None, ["train.lr=1e-4", "data.rotations=true", "model.backbone_options={hidden: [8, 8]}"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.rotations is True
    assert cfg.model.backbone_options == {"hidden": [8, 8]}


def test_algorithm_section_is_chosen_by_name() -> None:
    cfg = load_config(None, ["algorithm.name=reptile", "algorithm.inner_steps=7"])
    assert cfg.algorithm.name == "reptile"
    assert cfg.algorithm.inner_steps == 7


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'data.wyas'.*did you mean 'ways'"):
        load_config(None, ["data.wyas=5"])


def test_unknown_algorithm_key_suggests_within_that_algorithm() -> None:
    with pytest.raises(UserError, match=r"'algorithm.inner_lrr'.*did you mean 'inner_lr'"):
        load_config(None, ["algorithm.name=maml", "algorithm.inner_lrr=0.1"])


def test_unknown_algorithm_name_lists_known_ones() -> None:
    with pytest.raises(UserError, match=r"unknown algorithm 'mamll'.*did you mean 'maml'"):
        load_config(None, ["algorithm.name=mamll"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(UserError, match=r"config key 'train.steps'.*got 'many'"):
        load_config(None, ["train.steps=many"])


def test_out_of_range_value_is_rejected() -> None:
    with pytest.raises(UserError, match=r"data.ways"):
        load_config(None, ["data.ways=0"])


def test_malformed_override_says_the_form() -> None:
    with pytest.raises(UserError, match="key=value"):
        apply_override({}, "train.steps")


def test_missing_file_and_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["algorithm.name=protonet", "data.ways=20"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


def test_config_from_dict_rejects_unknown_top_level_key() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {}})


def test_algorithm_override_without_name_means_the_default_algorithm() -> None:
    assert load_config(None, ["algorithm.inner_steps=3"]).algorithm.inner_steps == 3
