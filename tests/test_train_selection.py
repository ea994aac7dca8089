"""Task selection from the run config: ``data.task_selection`` through ``metaml train``.

Config parsing and its errors; ``nearest`` drawing the classes near the target more often;
``hard`` moving the class weights toward the classes the learner confuses; and ``--resume`` of a
``hard`` run continuing bitwise exactly as the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from helpers import run_cli

from metaml import runs
from metaml.config import config_from_dict, load_config
from metaml.data import ClassDataset
from metaml.engine import Trainer
from metaml.engine.checkpoint import checkpoint_dir
from metaml.errors import UserError
from metaml.taskrep.selection import HardClassTracker
from metaml.tasks import EpisodeSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def twin_npz(path: Path, classes: int = 20, per_class: int = 6, size: int = 16) -> Path:
    """Classes ``2k`` and ``2k+1`` share a random pattern (twins); examples add noise."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    patterns = rng.integers(0, 256, size=(classes // 2, 1, size, size))
    noisy = patterns[labels // 2] + rng.normal(0, 20, size=(len(labels), 1, size, size))
    np.savez(path, images=np.clip(noisy, 0, 255).astype(np.uint8), labels=labels)
    return path


def base_overrides(data: Path) -> list[str]:
    return [
        f"data.dataset=npz:{data}",
        "data.split_by=class",
        "data.ways=3",
        "data.shots=1",
        "data.queries=2",
        "data.meta_batch_size=2",
        "model.backbone=mlp",
        "model.backbone_options={hidden: [16]}",
        "device=cpu",
    ]


# -- config ------------------------------------------------------------------------------------


def test_selection_config_parses_and_round_trips() -> None:
    assert load_config(None).data.task_selection == "uniform"
    cfg = load_config(None, ["algorithm.name=protonet", "data.task_selection=hard",
                             "data.selection.decay=0.5", "data.selection.update_every=3"])  # fmt: skip
    assert (cfg.data.selection.decay, cfg.data.selection.update_every) == (0.5, 3)
    nearest = load_config(None, ["data.task_selection=nearest", "data.selection.target=test",
                                 "data.selection.temperature=0.05"])  # fmt: skip
    for c in (cfg, nearest):  # config.yaml of the run must load again as the same config
        assert config_from_dict(yaml.safe_load(c.to_yaml())) == c


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.task_selection=nearest"], "needs data.selection.target"),
        (["data.task_selection=nearest", "data.selection.target=val"], "use 'test' or a dataset"),
        (["data.task_selection=hard", "algorithm.name=baseline"], "baseline does not"),
        (["data.task_selection=hard", "algorithm.name=mann"], "data.task_selection=uniform or nearest"),
        (["data.task_selection=hard", "algorithm.name=protonet", "data.selection.target=test"],
         "data.selection.target is used by task_selection=nearest, not hard"),
        (["data.selection.decay=0.5"], "set data.task_selection=hard"),
        (["data.task_selection=hardest"], "data.task_selection"),
        (["data.task_selection=hard", "algorithm.name=protonet", "data.selection.decai=0.5"],
         "did you mean 'decay'"),
        (["data.task_selection=hard", "algorithm.name=protonet", "data.selection.decay=1.0"],
         "data.selection.decay"),
    ],
)  # fmt: skip
def test_invalid_selection_configs_name_the_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_selection_on_a_task_family_is_a_user_error() -> None:
    cfg = load_config(None, ["data.task_selection=hard", "data.dataset=sinusoid"])
    with pytest.raises(UserError, match=r"task family .* set data\.task_selection=uniform"):
        runs.build_samplers(cfg, selection=True)
    assert runs.build_samplers(cfg).train.task_selection == "uniform"  # evaluation is unaffected


def test_trainer_refuses_hard_selection_for_a_learner_without_outputs(tmp_path: Path) -> None:
    data = twin_npz(tmp_path / "d.npz")
    cfg = load_config(None, [*base_overrides(data), "algorithm.name=baseline"])
    train = runs.build_samplers(cfg).train
    hard = EpisodeSampler(train.source, ways=3, shots=1, queries=2, task_selection="hard")
    learner = runs.build_learner(cfg, train)
    with pytest.raises(UserError, match="Baseline does not expose"):
        Trainer(learner, hard, None, cfg.train, tmp_path / "run")
    protonet = runs.build_learner(
        load_config(None, [*base_overrides(data), "algorithm.name=protonet"]), train
    )
    with pytest.raises(UserError, match="tracker drives task_selection='hard'"):
        Trainer(protonet, train, None, cfg.train, tmp_path / "run", tracker=HardClassTracker(12))


# -- nearest -----------------------------------------------------------------------------------


def test_nearest_draws_the_test_classes_twins_more_often(tmp_path: Path) -> None:
    """Target = the test split: training classes whose twin is a test class are drawn more."""
    data = twin_npz(tmp_path / "d.npz")
    cfg = load_config(None, [*base_overrides(data), "data.task_selection=nearest",
                             "data.selection.target=test"])  # fmt: skip
    built = runs.build_samplers(cfg, selection=True)
    train, test = built.train, built.test
    assert isinstance(train.source, ClassDataset) and isinstance(test.source, ClassDataset)
    twin = {str(int(n) ^ 1) for n in test.source.class_names}  # the test classes' twins
    near = np.array([n in twin for n in train.source.class_names])
    assert 0 < near.sum() < len(near)  # the split left some twins in training, not all

    def share_near(sampler: EpisodeSampler) -> float:
        drawn = np.concatenate([sampler.episode(i).classes.numpy() for i in range(300)])  # type: ignore[union-attr]
        return float(near[drawn].mean())

    uniform = runs.build_samplers(cfg).train  # same config without selection: uniform draws
    assert share_near(uniform) < near.mean() + 0.1
    most = min(int(near.sum()), 3) / 3  # at most this share of an episode's 3 classes is near
    assert share_near(train) > 0.9 * most > 2 * share_near(uniform)
    assert built.val.task_selection == test.task_selection == "uniform"


def test_nearest_toward_another_dataset(tmp_path: Path) -> None:
    """Target = a dataset of its own: the training classes with its pattern get the weight."""
    data = twin_npz(tmp_path / "d.npz")
    cfg = load_config(None, base_overrides(data))
    train_names = runs.build_samplers(cfg).train.source.class_names  # type: ignore[union-attr]
    chosen = int(train_names[0])
    pair = {str(chosen), str(chosen ^ 1)}  # its twin shares the pattern
    source = np.load(data)
    pick = source["labels"] == chosen
    np.savez(tmp_path / "t.npz", images=source["images"][pick], labels=source["labels"][pick])
    nearest = ["data.task_selection=nearest", f"data.selection.target=npz:{tmp_path / 't.npz'}"]
    train = runs.build_samplers(
        load_config(None, [*base_overrides(data), *nearest, "data.selection.target_examples=3"]),
        selection=True,
    ).train
    assert isinstance(train.source, ClassDataset) and train.class_weights is not None
    expected = pair & set(train.source.class_names)
    top = np.argsort(-train.class_weights)[: len(expected)]
    assert {train.source.class_names[c] for c in top} == expected

    small = source["images"][pick][:, :, :8, :8]  # 8x8 images against 16x16 training images
    np.savez(tmp_path / "t.npz", images=small, labels=source["labels"][pick])
    with pytest.raises(UserError, match="shaped like the training data"):
        runs.build_samplers(load_config(None, [*base_overrides(data), *nearest]), selection=True)


# -- hard --------------------------------------------------------------------------------------


def confusable_dataset() -> ClassDataset:
    """12 classes of 1x6x6 images: classes 0-3 share one pattern (confusable), 4-11 distinct."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 8)
    patterns = rng.integers(0, 256, size=(12, 1, 6, 6))
    patterns[1:4] = patterns[0]
    noisy = patterns[labels] + rng.normal(0, 20, size=(len(labels), 1, 6, 6))
    images = torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8))
    return ClassDataset(images, torch.from_numpy(labels), [f"c{c}" for c in range(12)])


ALGORITHM_OPTIONS = {
    "protonet": [],
    "maml": ["algorithm.vectorize=loop", "algorithm.inner_lr=0.5"],
    "reptile": ["algorithm.batched=false", "algorithm.inner_lr=0.01"],
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_OPTIONS))
def test_hard_weights_move_toward_the_confused_classes(tmp_path: Path, algorithm: str) -> None:
    maml = ALGORITHM_OPTIONS[algorithm]
    cfg = load_config(None, [f"algorithm.name={algorithm}", *maml, "data.task_selection=hard",
                             "data.selection.decay=0.7", "data.selection.update_every=5",
                             "model.backbone=mlp", "model.backbone_options={hidden: [32]}",
                             "train.steps=40", "train.lr=0.01", "train.checkpoint_every=40"])  # fmt: skip
    torch.manual_seed(0)
    sampler = EpisodeSampler(confusable_dataset(), ways=3, shots=1, queries=3,
                             meta_batch_size=2, seed=0, task_selection="hard")  # fmt: skip
    learner = runs.build_learner(cfg, sampler)
    tracker = runs.hard_tracker(cfg, sampler)
    assert tracker is not None and tracker.decay == 0.7
    Trainer(learner, sampler, None, cfg.train, tmp_path, "cpu", quiet=True, tracker=tracker,
            tracker_every=5).fit()  # fmt: skip
    weights = sampler.class_weights
    assert weights is not None
    confused, distinct = weights[:4].mean(), weights[4:].mean()
    assert confused > 2 * distinct, weights.round(3)
    assert np.allclose(weights, tracker.weights(), rtol=1e-12, atol=0)  # refreshed at step 40


# -- resume ------------------------------------------------------------------------------------


def selection_and_tensors(json_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    record = json.loads(json_path.read_text())
    blob = (json_path.parent / record["weights"]["file"]).read_bytes()
    tensors = {k: v for k, v in safetensors.torch.load(blob).items() if not k.startswith("rng/")}
    return record["sampler"]["selection"], tensors


def test_resume_of_hard_selection_is_bitwise_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = twin_npz(tmp_path / "d.npz")
    cfg = load_config(None, [*base_overrides(data), "algorithm.name=protonet",
                             "data.task_selection=hard", "data.selection.update_every=2",
                             "train.steps=8", "train.checkpoint_every=4", "train.val_every=4",
                             "train.val_tasks=3", "train.keep_checkpoints=3"])  # fmt: skip
    reference = runs.train(cfg, tmp_path / "reference", quiet=True)
    ref_state, ref_tensors = selection_and_tensors(checkpoint_dir(reference) / "step-8.json")

    # A run killed after the step-4 checkpoint: the same run with its later files gone.
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed)
    for path in checkpoint_dir(crashed).glob("step-8.*"):
        path.unlink()
    mid_state, _ = selection_and_tensors(checkpoint_dir(crashed) / "step-4.json")
    # Without these the resumed run would draw its batches uniformly: the test could not pass.
    assert len(set(mid_state["class_weights"])) > 1 and mid_state["tracker"]["error"]
    assert mid_state["class_weights"] != ref_state["class_weights"]

    code, _, err = run_cli(["train", "--resume", str(crashed), "--quiet"], capsys)
    assert code == 0, err
    state, tensors = selection_and_tensors(checkpoint_dir(crashed) / "step-8.json")
    assert state == ref_state  # JSON floats: every bit of the class weights and error rates
    assert tensors.keys() == ref_tensors.keys()
    for key in tensors:
        assert torch.equal(tensors[key], ref_tensors[key]), key


def test_resume_with_another_task_selection_is_refused(tmp_path: Path) -> None:
    data = twin_npz(tmp_path / "d.npz")
    cfg = load_config(None, [*base_overrides(data), "algorithm.name=protonet",
                             "data.task_selection=hard", "train.steps=2"])  # fmt: skip
    run = runs.train(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(UserError, match="trained with task_selection=hard, not uniform"):
        runs.resume(run, ["data.task_selection=uniform", "train.steps=4"])
