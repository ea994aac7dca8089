"""The training loop: exact resume (in-process and after SIGKILL), divergence, best, logs."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaml.engine import (
    MetricsLogger,
    Trainer,
    TrainingDiverged,
    is_better,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    read_metrics,
    truncate_metrics,
)
from metaml.engine.checkpoint import checkpoint_dir
from metaml.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
toy = importlib.import_module("_train_script")
SCRIPT = Path(__file__).with_name("_train_script.py")


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.learner.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def poison_gradient(trainer: Trainer, at_step: int) -> None:
    """Make the outer gradient of ``head.bias`` infinite during step ``at_step`` (1-based)."""

    def hook(param: torch.Tensor) -> None:
        # After accumulation: only the outer backward, not the inner loop's autograd.grad.
        if trainer.step == at_step - 1 and param.grad is not None:
            param.grad.mul_(torch.inf)

    trainer.learner.head.bias.register_post_accumulate_grad_hook(hook)


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Weights and metric records of an uninterrupted 60-step run."""
    run = tmp_path_factory.mktemp("reference")
    trainer = toy.make_trainer(run)
    trainer.fit()
    return weights(trainer), without_time(read_metrics(run / "metrics.jsonl"))


def test_training_draws_random_numbers(tmp_path: Path) -> None:
    # Otherwise the resume tests could not notice a missing RNG restore.
    learner = toy.ToyLearner().train()
    batch = toy.ToySampler(seed=1).batch(0)
    assert learner.meta_loss(batch)[0].item() != learner.meta_loss(batch)[0].item()


def test_resume_is_bitwise_exact(tmp_path: Path, reference: tuple) -> None:
    ref_weights, ref_metrics = reference
    first = toy.make_trainer(tmp_path)
    assert first.fit(steps=30)["step"] == 30
    assert not torch.equal(weights(first)["head.weight"], ref_weights["head.weight"])

    resumed = toy.make_trainer(tmp_path).resume()
    assert resumed.step == 30
    summary = resumed.fit()
    assert summary["step"] == 60
    assert_bitwise_equal(weights(resumed), ref_weights)
    assert without_time(read_metrics(tmp_path / "metrics.jsonl")) == ref_metrics


def assert_resumes_exactly(run: Path, reference: tuple) -> None:
    """A run killed while drawing batch 36 (step 37) resumes from step-30 to the reference."""
    ref_weights, ref_metrics = reference
    # Steps 31..36 were logged but not checkpointed.
    assert latest_checkpoint(run).name == "step-30.json"
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 36
    resumed = toy.make_trainer(run).resume()
    assert resumed.step == 30
    resumed.fit()
    assert_bitwise_equal(weights(resumed), ref_weights)
    assert without_time(read_metrics(run / "metrics.jsonl")) == ref_metrics


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_resume_after_sigkill_between_checkpoints(tmp_path: Path, reference: tuple) -> None:
    # A forked child shares our imports (a fresh interpreter spends seconds importing torch).
    pid = os.fork()
    if pid == 0:  # the child trains until it SIGKILLs itself; it must never return into pytest
        try:
            toy.make_trainer(tmp_path, kill_at=36).fit()
        finally:
            os._exit(1)
    deadline = time.monotonic() + 60
    while (status := os.waitpid(pid, os.WNOHANG)[1]) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if status == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the training child hung")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert_resumes_exactly(tmp_path, reference)


@pytest.mark.slow
def test_resume_after_sigkill_of_a_training_script(tmp_path: Path, reference: tuple) -> None:
    # The same crash in a separate program, as when a user kill -9s `metaml train`.
    command = [sys.executable, str(SCRIPT), str(tmp_path), "--kill-at", "36"]
    command += ["--threads", str(torch.get_num_threads())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_resumes_exactly(tmp_path, reference)


def test_corrupt_latest_checkpoint_falls_back(tmp_path: Path, reference: tuple) -> None:
    ref_weights, _ = reference
    toy.make_trainer(tmp_path, toy.toy_config(keep_checkpoints=3)).fit(steps=30)
    folder = checkpoint_dir(tmp_path)
    blob = bytearray((folder / "step-30.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the last tensor
    (folder / "step-30.safetensors").write_bytes(bytes(blob))
    (folder / "step-20.json").write_text('{"format": "metaml-checkpoint/1", "step": 2')  # torn
    (folder / ".step-40.safetensors.abc.tmp").write_bytes(b"half a write")

    resumed = toy.make_trainer(tmp_path, toy.toy_config(keep_checkpoints=3)).resume()
    assert resumed.step == 10
    resumed.fit()
    assert_bitwise_equal(weights(resumed), ref_weights)
    assert not list(folder.glob(".*.tmp"))
    assert sorted(p.name for p in folder.glob("step-*.json")) == [
        "step-40.json",
        "step-50.json",
        "step-60.json",
    ]


def test_missing_latest_json_falls_back(tmp_path: Path) -> None:
    toy.make_trainer(tmp_path).fit(steps=30)
    (checkpoint_dir(tmp_path) / "step-30.json").unlink()
    assert toy.make_trainer(tmp_path).resume().step == 20


def test_resume_without_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no checkpoint; start a new run with metaml train"):
        toy.make_trainer(tmp_path).resume()


def test_new_run_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    toy.make_trainer(tmp_path).fit(steps=10)
    with pytest.raises(UserError, match="already has a checkpoint"):
        toy.make_trainer(tmp_path).fit()


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path: Path) -> None:
    trainer = toy.make_trainer(tmp_path, nan_at=36)  # batch 36 is step 37
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert message.startswith("loss became nan at step 37; the last good checkpoint is step-30;")
    assert "lower train.lr or set train.grad_clip" in message
    assert info.value.step == 37
    assert latest_checkpoint(tmp_path).name == "step-30.json"
    steps = sorted(int(p.stem.split("-")[1]) for p in checkpoint_dir(tmp_path).glob("step-*.*"))
    assert max(steps) == 30
    learner = toy.ToyLearner()
    assert load_checkpoint(latest_checkpoint(tmp_path), learner).step == 30
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) <= 36


def test_nan_weights_are_never_checkpointed(tmp_path: Path) -> None:
    trainer = toy.make_trainer(tmp_path)
    # The loss of step 20 is finite; its gradient is not, so Adam writes NaN into the weights.
    poison_gradient(trainer, at_step=20)
    with pytest.raises(TrainingDiverged, match=r"weight .* became nan at step 20; the last good"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-10.json"
    assert not (checkpoint_dir(tmp_path) / "step-20.safetensors").exists()


def test_gradient_clipping_catches_inf_gradient(tmp_path: Path) -> None:
    trainer = toy.make_trainer(tmp_path, toy.toy_config(grad_clip=1.0))
    poison_gradient(trainer, at_step=5)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became (inf|nan) at step 5; no "):
        trainer.fit()
    assert latest_checkpoint(tmp_path) is None


def test_metrics_log_and_best_checkpoint(tmp_path: Path) -> None:
    summary = toy.make_trainer(tmp_path, toy.toy_config(grad_clip=5.0)).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_mse" in r]
    assert [r["step"] for r in train] == list(range(3, 61, 3))
    assert [r["step"] for r in val] == [15, 30, 45, 60]
    assert {"loss", "mse", "lr", "time", "grad_norm"} <= train[0].keys()
    assert all(r["val_mse_ci95"] > 0 for r in val)

    best = min(val, key=lambda r: r["val_mse"])
    assert summary["best_metric"] == "mse"
    assert summary["best_value"] == best["val_mse"]
    assert summary["best_step"] == best["step"]
    record = json.loads((checkpoint_dir(tmp_path) / "best.json").read_text())
    assert record["step"] == best["step"]
    assert record["best"]["value"] == best["val_mse"]
    assert sorted(p.name for p in checkpoint_dir(tmp_path).glob("*.json")) == [
        "best.json",
        "step-50.json",
        "step-60.json",
    ]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_logged_learning_rate_follows_schedule(tmp_path: Path, schedule: str) -> None:
    config = toy.toy_config(steps=12, log_every=1, scheduler=schedule, lr=0.1, val_every=100)
    toy.make_trainer(tmp_path, config).fit()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    # Step s (1-based) uses the factor at s - 1 updates done: it starts at the full rate.
    assert lrs == [0.1 * lr_factor(schedule, s, 12) for s in range(12)]
    assert lrs[0] == 0.1


def test_lr_factor_and_is_better() -> None:
    assert lr_factor("linear", 0, 10) == 1.0
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert is_better("accuracy", 0.9, 0.8) and not is_better("accuracy", 0.7, 0.8)
    assert is_better("mse", 0.7, 0.8) and not is_better("mse", 0.9, 0.8)
    assert not is_better("mse", math.nan, None)


def test_fit_beyond_configured_steps_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"beyond train\.steps=60"):
        toy.make_trainer(tmp_path).fit(steps=61)


def test_metrics_logger_appends_reads_and_truncates(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as log:
        for step in (1, 2, 3):
            log.log({"step": step, "loss": step / 10})
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by SIGKILL
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert truncate_metrics(path, 2) == 2
    with MetricsLogger(path) as log:
        log.log({"step": 3, "loss": 0.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3
    assert read_metrics(tmp_path / "absent.jsonl") == []
