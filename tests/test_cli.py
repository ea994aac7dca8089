"""The ``metaml`` command: help, version, a tiny train/eval/resume cycle, and bad input -> exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

TINY = [
    "--set",
    "train.steps=6",
    "--set",
    "train.val_every=3",
    "--set",
    "train.val_tasks=4",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "data.meta_batch_size=2",
    "--set",
    "data.shots=5",
]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("metaml 0.")


@pytest.mark.parametrize("command", ["train", "eval", "datasets", "demo"])
def test_every_command_has_help_with_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    assert "Example" in out and f"metaml {command}" in out


def test_console_script_exit_status_is_two_on_user_error(tmp_path: Path) -> None:
    # A real process, so the exit status and the absence of a traceback are what a shell sees.
    proc = subprocess.run(
        [sys.executable, "-m", "metaml.cli", "train", "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_train_eval_resume_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "configs/maml-sinusoid.yaml", "--run-dir", str(run_dir), "--quiet", *TINY], capsys
    )
    assert code == 0, err
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    code, out, err = run_cli(
        ["eval", str(run_dir), "--episodes", "5", "--json", "--quiet", "--steps", "2"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["metric"] == "mse" and len(result["scores"]) == 5
    assert np.isclose(result["mean"], np.mean(result["scores"]))
    eval_on_threads = ["eval", str(run_dir), "--episodes", "5", "--json", "--quiet", "--steps", "2"]
    threads_set: list[int] = []  # recorded, not applied: later tests keep this process's count
    monkeypatch.setattr("torch.set_num_threads", threads_set.append)
    code, out, err = run_cli([*eval_on_threads, "--task-threads", "2"], capsys)
    assert code == 0, err  # the same episodes, two at a time
    assert np.allclose(json.loads(out)["scores"], result["scores"], rtol=1e-6, atol=0)
    assert threads_set == [1]  # the run's `threads: 1` stands (no sharing out of the cores)
    code, _, err = run_cli(
        ["train", "--resume", str(run_dir), "--set", "train.steps=9", "--quiet"], capsys
    )
    assert code == 0, err
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) == 9


def test_train_refuses_to_overwrite_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            ["train", "configs/maml-sinusoid.yaml", "--run-dir", str(run_dir), "--quiet", *TINY],
            capsys,
        )[0]
        == 0
    )
    code, _, err = run_cli(
        ["train", "configs/maml-sinusoid.yaml", "--run-dir", str(run_dir), "--quiet", *TINY], capsys
    )
    assert code == 2 and "--resume" in err


def _class_folders(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
    return root


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    images = _class_folders(tmp_path / "imgs", classes=3, per_class=4)
    empty = _class_folders(tmp_path / "with_empty", classes=2, per_class=4)
    (empty / "class_empty").mkdir()
    broken = _class_folders(tmp_path / "broken", classes=2, per_class=4)
    (broken / "class0" / "oops.png").write_text("not an image")
    base = ["train", "configs/maml-sinusoid.yaml", "--run-dir", str(tmp_path / "r"), "--quiet"]
    image_run = [
        *base,
        "--set",
        "model.backbone=conv4",
        "--set",
        "data.split_by=class",
        "--set",
        "data.split_fractions=[0.34, 0.33, 0.33]",
    ]
    return {
        "unknown key": ([*base, "--set", "train.stpes=3"], "did you mean 'steps'"),
        "wrong type": ([*base, "--set", "train.steps=lots"], "train.steps"),
        "missing data path": (
            [*base, "--set", f"data.dataset=folder:{tmp_path / 'nowhere'}"],
            "nowhere",
        ),
        "unreadable file": ([*image_run, "--set", f"data.dataset=folder:{broken}"], "oops.png"),
        "empty class folder": (
            [*image_run, "--set", f"data.dataset=folder:{empty}"],
            "class_empty",
        ),
        "ways > classes": (
            [*image_run, "--set", f"data.dataset=folder:{images}", "--set", "data.ways=5"],
            "ways",
        ),
        "shots + queries > examples": (
            [
                *image_run,
                "--set",
                f"data.dataset=folder:{images}",
                "--set",
                "data.ways=1",
                "--set",
                "data.queries=9",
            ],
            "queries",
        ),
        "resume without checkpoint": (["train", "--resume", str(tmp_path)], "no checkpoint"),
        "unknown dataset": (["datasets", "show", "omniglott"], "did you mean"),
        "config file missing": (["train", str(tmp_path / "none.yaml")], "not found"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown key",
        "wrong type",
        "missing data path",
        "unreadable file",
        "empty class folder",
        "ways > classes",
        "shots + queries > examples",
        "resume without checkpoint",
        "unknown dataset",
        "config file missing",
    ],
)
def test_bad_input_exits_two_with_a_clear_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = _bad_input_cases(tmp_path)[case]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and expected in err
    assert len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_datasets_list_and_show_json(
    capsys: pytest.CaptureFixture[str], omniglot_root: Path
) -> None:
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "omniglot-small" in out and "sinusoid" in out
    code, out, err = run_cli(
        ["datasets", "show", "omniglot-small1", "--root", str(omniglot_root), "--json"], capsys
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["classes"] == 136 and info["groups"] == 5 and info["examples"] == 2720
    assert info["shape"] == [1, 28, 28]


@pytest.mark.slow
def test_demo_end_to_end_on_glyphs_and_omniglot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], omniglot_root: Path
) -> None:
    args = ["demo", "--out", str(tmp_path), "--steps", "4", "--episodes", "3", "--quiet"]
    code, out, err = run_cli([*args, "--omniglot", str(omniglot_root), "--device", "cpu"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        f"{learner}, {data}, 5-way {shots}-shot"
        for learner in ("protonet", "maml")
        for data in ("glyphs", "Omniglot")
        for shots in (1, 5)
    }
    assert all(0.0 <= r["mean"] <= 1.0 and r["episodes"] == 3 for r in results.values())
    assert "protonet, glyphs, 5-way 1-shot" in out and "paired:" in out
    html = (tmp_path / "report.html").read_text()
    assert "demo-protonet-glyphs" in html and "demo-maml-glyphs" in html
