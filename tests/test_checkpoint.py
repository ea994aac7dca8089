"""Checkpoints: exact round trips, the file format, and skipping broken checkpoints."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from metaml.engine.checkpoint import (
    FORMAT,
    checkpoint_dir,
    discard_after,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    require_checkpoint,
    save_checkpoint,
)
from metaml.errors import UserError

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
}


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], dict):
            for x, y in zip(a[key], b[key], strict=True):
                assert_states_equal(x, y)
        else:
            assert a[key] == b[key], key
            assert type(a[key]) is type(b[key]), key


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    net = make_net(0)
    optimizer = OPTIMIZERS[name](list(net.parameters()))
    train_steps(net, optimizer, 3, seed=1)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = save_checkpoint(tmp_path, 3, net, optimizer, sampler_position=3, sampler_seed=9)
    expected_draws = (torch.rand(4), np.random.rand(4), random.random())

    other = make_net(1)
    other_optimizer = OPTIMIZERS[name](list(other.parameters()))
    state = load_checkpoint(path, other, other_optimizer)
    assert (state.step, state.sampler_position, state.sampler_seed) == (3, 3, 9)
    assert_states_equal(other.state_dict(), net.state_dict())
    assert_states_equal(other_optimizer.state_dict(), optimizer.state_dict())
    assert torch.equal(torch.rand(4), expected_draws[0])
    assert np.array_equal(np.random.rand(4), expected_draws[1])
    assert random.random() == expected_draws[2]

    # The restored pair keeps training exactly like the original.
    train_steps(net, optimizer, 2, seed=2)
    train_steps(other, other_optimizer, 2, seed=2)
    assert_states_equal(other.state_dict(), net.state_dict())


def test_adam_step_counter_is_restored(tmp_path: Path) -> None:
    net = make_net(0)
    optimizer = torch.optim.Adam(net.parameters())
    train_steps(net, optimizer, 7, seed=1)
    other = make_net(1)
    other_optimizer = torch.optim.Adam(other.parameters())
    load_checkpoint(save_checkpoint(tmp_path, 7, net, optimizer), other, other_optimizer)
    steps = [s["step"] for s in other_optimizer.state.values()]
    assert steps and all(torch.equal(s, torch.tensor(7.0)) for s in steps)
    assert other_optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_file_format(tmp_path: Path) -> None:
    net = make_net(0)
    optimizer = torch.optim.Adam(net.parameters())
    train_steps(net, optimizer, 1, seed=1)
    best = {"metric": "accuracy", "value": 0.5, "step": 4}
    path = save_checkpoint(tmp_path, 4, net, optimizer, best=best, metadata={"note": "x"})
    assert path == checkpoint_dir(tmp_path) / "step-4.json"
    record = json.loads(path.read_text())
    assert record["format"] == FORMAT
    assert (record["step"], record["sampler"]["position"], record["best"]) == (4, 4, best)
    assert record["metadata"] == {"note": "x"}
    assert record["optimizer"]["param_groups"][0]["lr"] == 0.001
    weights = path.with_suffix(".safetensors")
    assert record["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
    assert {"model/0.weight", "model/1.running_mean", "rng/torch", "rng/numpy"} <= keys
    assert {"optim/0/step", "optim/0/exp_avg", "optim/0/exp_avg_sq"} <= keys
    assert {k.split("/")[0] for k in keys} == {"model", "optim", "rng"}


def test_tied_weights_can_be_saved(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    net[1].weight = net[0].weight
    other = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_checkpoint(save_checkpoint(tmp_path, 1, net), other, restore_rng=False)
    assert torch.equal(other[0].weight, net[0].weight)


def test_scheduler_round_trip(tmp_path: Path) -> None:
    net = make_net(0)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    path = save_checkpoint(tmp_path, 5, net, optimizer, scheduler)
    other_optimizer = torch.optim.SGD(make_net(1).parameters(), lr=1.0)
    other = torch.optim.lr_scheduler.StepLR(other_optimizer, step_size=2, gamma=0.5)
    load_checkpoint(path, make_net(1), other_optimizer, other)
    assert other.last_epoch == 5
    scheduler.step()
    other.step()
    assert other.get_last_lr() == scheduler.get_last_lr() == [0.125]


def _orphan_weights(folder: Path) -> None:
    folder.joinpath("step-3.json").unlink()


def _torn_json(folder: Path) -> None:
    text = folder.joinpath("step-3.json").read_text()
    folder.joinpath("step-3.json").write_text(text[: len(text) // 2])


def _missing_weights(folder: Path) -> None:
    folder.joinpath("step-3.safetensors").unlink()


def _truncated_weights(folder: Path) -> None:
    blob = folder.joinpath("step-3.safetensors").read_bytes()
    folder.joinpath("step-3.safetensors").write_bytes(blob[:-10])


def _flipped_bit(folder: Path) -> None:
    blob = bytearray(folder.joinpath("step-3.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 1
    folder.joinpath("step-3.safetensors").write_bytes(bytes(blob))


def _foreign_json(folder: Path) -> None:
    folder.joinpath("step-3.json").write_text('{"step": 3}')


@pytest.mark.parametrize(
    "damage",
    [
        _orphan_weights,
        _torn_json,
        _missing_weights,
        _truncated_weights,
        _flipped_bit,
        _foreign_json,
    ],
)
def test_latest_checkpoint_skips_broken_ones(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    net = make_net(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, net)
    damage(checkpoint_dir(tmp_path))
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path) / "step-2.json"
    with pytest.raises(UserError, match="step-3"):
        load_checkpoint(checkpoint_dir(tmp_path) / "step-3.json", make_net(1))


def test_steps_are_ordered_numerically(tmp_path: Path) -> None:
    for step in (9, 10, 100):
        save_checkpoint(tmp_path, step, make_net(0))
    assert latest_checkpoint(tmp_path).name == "step-100.json"


def test_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(
        UserError, match="has no checkpoint; start a new run with metaml train CONFIG"
    ):
        require_checkpoint(tmp_path)


def test_prune_keeps_newest_and_best(tmp_path: Path) -> None:
    net = make_net(0)
    save_checkpoint(tmp_path, 2, net, name="best")
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, net, keep=2)
    checkpoint_dir(tmp_path).joinpath("step-7.safetensors").write_bytes(b"in progress")
    prune_checkpoints(tmp_path, 2)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == [
        "best.json",
        "best.safetensors",
        "step-4.json",
        "step-4.safetensors",
        "step-5.json",
        "step-5.safetensors",
        "step-7.safetensors",  # newer than every checkpoint: maybe a write in progress
    ]
    discard_after(tmp_path, 4)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).glob("step-*")) == [
        "step-4.json",
        "step-4.safetensors",
    ]


def test_mismatched_model_is_a_user_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, make_net(0))
    with pytest.raises(UserError, match="does not fit this model"):
        load_checkpoint(path, nn.Linear(3, 1), restore_rng=False)


def test_missing_optimizer_state_is_a_user_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, make_net(0))
    net = make_net(1)
    with pytest.raises(UserError, match="holds no optimizer state"):
        load_checkpoint(path, net, torch.optim.Adam(net.parameters()))
