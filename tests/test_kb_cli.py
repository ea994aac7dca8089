"""``metaml kb``: the whole flow on a tiny trained run, and bad input exiting with status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from metaml import runs
from metaml.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step ProtoNet run on a 12-class npz dataset in groups g0, g1, g2; (run dir, data)."""
    folder = tmp_path_factory.mktemp("kbcli")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12 * 6, 16, 16), dtype=np.uint8)
    data = folder / "toy.npz"
    np.savez(
        data, images=images, labels=np.repeat(np.arange(12), 6),
        class_names=np.array([f"c{i}" for i in range(12)]),
        groups=np.array([f"g{i // 4}" for i in range(12)]),
    )  # fmt: skip
    cfg = load_config(
        None,
        [f"data.dataset=npz:{data}", "data.split_by=class", "data.split_fractions=[0.5, 0.25, 0.25]",
         "data.ways=2", "data.shots=1", "data.queries=2", "model.backbone=conv4", "algorithm.name=protonet",
         "train.steps=2", "train.val_every=2", "train.val_tasks=2", "train.checkpoint_every=2"],
    )  # fmt: skip
    return runs.train(cfg, folder / "run", quiet=True), data


@pytest.mark.slow
def test_kb_cli_flow(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, data = trained
    kb = str(tmp_path / "kb")
    code, out, _ = run_cli(["kb", "init", kb, "--input-shape", "1,16,16"], capsys)
    assert code == 0 and "128-d" in out
    for group in ("g0", "g1"):
        code, out, err = run_cli(
            ["kb", "add", kb, str(run_dir), "--group", group, "--shots", "2", "--meta", f"alphabet={group}",
             "--metric", "acc=0.5", "--name", f"model-{group}"], capsys,
        )  # fmt: skip
        assert code == 0, err
    code, out, _ = run_cli(["kb", "list", kb, "--json"], capsys)
    listed = json.loads(out)
    assert [e["name"] for e in listed] == ["model-g0", "model-g1"]
    assert listed[0]["classes"] == ["c0", "c1", "c2", "c3"] and listed[0]["ways"] == 4
    assert listed[0]["metadata"] == {"alphabet": "g0", "group": "g0"} and listed[0]["metrics"] == {
        "acc": 0.5
    }
    code, out, _ = run_cli(["kb", "show", kb, "2", "--json"], capsys)
    assert json.loads(out)["name"] == "model-g1"
    # the same task as entry 1's (same classes, same seed) finds entry 1 first, at distance 0
    code, out, _ = run_cli(
        ["kb", "query", kb, "--dataset", f"npz:{data}", "--group", "g0", "--shots", "2", "--json"],
        capsys,
    )
    found = json.loads(out)
    assert [f["id"] for f in found] == [1, 2] and found[0]["distance"] == pytest.approx(0, abs=1e-6)
    export = tmp_path / "start"
    code, out, err = run_cli(
        ["kb", "warm-start", kb, "--dataset", f"npz:{data}", "--classes", "c8,c9", "--shots", "3",
         "--strategy", "model-based", "-k", "2", "--export", str(export), "--json"], capsys,
    )  # fmt: skip
    assert code == 0, err
    chosen = json.loads(out)
    assert set(chosen["scores"]) == {"1", "2"}
    ranked = list(chosen["scores"])  # nearest first; the lowest loss wins, ties to the nearer
    best = min(ranked, key=lambda i: (chosen["scores"][i], ranked.index(i)))
    assert str(chosen["entry"]["id"]) == best
    exported = runs.load_learner(export, device="cpu")
    original = runs.load_learner(run_dir, device="cpu")
    for (key, a), (_, b) in zip(
        original.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    code, out, _ = run_cli(["kb", "verify", kb], capsys)
    assert code == 0 and out.startswith("ok: 2 entries")
    weights = next((tmp_path / "kb" / "weights").iterdir())
    weights.write_bytes(b"corrupt")
    code, out, err = run_cli(["kb", "verify", kb], capsys)
    assert code == 1 and "corrupt" in out and "metaml kb remove" in err
    code, out, _ = run_cli(["kb", "remove", kb, "1"], capsys)
    assert code == 0 and "removed entry 1" in out


def test_kb_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["kb", "list", str(tmp_path / "none")], capsys)
    assert code == 2 and "metaml kb init" in err
    kb = str(tmp_path / "kb")
    assert run_cli(["kb", "init", kb, "--input-shape", "1,16,16"], capsys)[0] == 0
    code, _, err = run_cli(["kb", "init", kb], capsys)
    assert code == 2 and "already holds" in err
    code, _, err = run_cli(["kb", "init", str(tmp_path / "b"), "--input-shape", "1x28"], capsys)
    assert code == 2 and "C,H,W" in err
    code, _, err = run_cli(["kb", "query", kb, "--dataset", "glyphs"], capsys)
    assert code == 2 and "--classes" in err
    code, _, err = run_cli(["kb", "show", kb, "7"], capsys)
    assert code == 2 and "no entry" in err
    code, _, err = run_cli(
        ["kb", "warm-start", kb, "--dataset", "sinusoid", "--group", "x"], capsys
    )
    assert code == 2 and "task family" in err
