"""The speed suite: its quick mode runs end to end and its FLOP counting matches a hand count.

No timing is asserted anywhere: only the structure of the results.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.run import conv4_forward_flops, count_flops, render
from metaml.nn import create_backbone

ROOT = Path(__file__).resolve().parents[1]


def test_flop_counter_matches_the_hand_count_of_conv4() -> None:
    net = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=5, hidden=64)
    x = torch.randn(7, 1, 28, 28)
    assert count_flops(lambda: net(x)) == conv4_forward_flops(7, ways=5)
    # The backward pass of a convolution costs twice its forward (input and weight gradients);
    # the first layer's input needs no gradient, so its backward costs once its forward.
    first = 2 * 9 * 1 * 64 * 28 * 28 * 7
    counted = count_flops(lambda: net(x).sum().backward())
    assert counted == 3 * conv4_forward_flops(7, ways=5) - first


@pytest.mark.slow
def test_quick_suite_runs_and_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    w = results["workloads"]
    conv4 = ["conv4-1-so", "conv4-5-so", "conv4-1-fo", "conv4-5-fo"]
    all_cores = [f"{name}-all" for name in conv4]
    assert set(w) == {
        "peak", "sinusoid", *conv4, *all_cores, "protonet", "protonet-default-malloc", "adapt",
        "adapt-all", "sampling",
    }  # fmt: skip
    assert w["protonet"]["reuse_cpu_memory"] is (platform.libc_ver()[0] == "glibc")
    assert w["protonet-default-malloc"]["reuse_cpu_memory"] is False
    assert all(result["workload"] == name for name, result in w.items())
    for name in ["sinusoid", *conv4, *all_cores]:
        assert {"metaml-loop", "higher", "plain"} <= set(w[name]["rates"]), name
        assert all(r["median"] > 0 and r["runs"] >= 1 for r in w[name]["rates"].values())
    for name in all_cores:  # metaml's tasks on task threads, beside the references on all cores
        assert "metaml-taskthreads" in w[name]["rates"] and w[name]["threads"] >= 1
    assert w["conv4-1-so"]["flops_per_task"] > 0 and w["peak"]["1"]["fp32_gflops"] > 0
    # every fraction of peak has its own matmul probe, timed in the workload's rounds
    for name in [*conv4, *all_cores, "protonet", "protonet-default-malloc"]:
        assert w[name]["peak_gflops"]["median"] > 0 and "matmul-peak" not in w[name]["rates"]
    assert {"metaml-taskthreads", "metaml", "higher-1thread", "plain-1thread"} <= set(
        w["adapt-all"]["seconds"]
    )
    assert set(results["rss"]) == {"metaml-loop", "metaml-lowmem", "higher", "plain", "floor"}
    assert all(r["peak_rss_mb"] > 0 for r in results["rss"].values())
    table = render(results)
    assert "| sinusoid (meta-iterations/s) |" in table and "Sampling (e)" in table
    assert "| adapt-all, the same on the whole CPU (seconds) |" in table
    assert "| protonet 20w1s, glibc's default malloc" in table
    if shutil.which("c++") or shutil.which("g++"):  # the fused kernel builds: (c) times both
        assert w["protonet"]["fused_kernel"] and "metaml-unfused" in w["protonet"]["rates"]
        assert "| protonet 20w1s (episodes/s), without the fused kernel |" in table
    probe = w["protonet"]["peak_gflops"]["median"]
    assert f"% of {probe:.1f} |" in table.split("| protonet 20w1s (episodes/s)")[1].splitlines()[0]
    assert done.stdout.count("| conv4-") >= 8  # the table was printed


def test_mann_synthetic_episodes_hold_new_classes_ten_times_each() -> None:
    from benchmarks.mann_synthetic import first_crossing, synthetic_batch

    x, y = synthetic_batch(torch.Generator().manual_seed(0))
    assert x.shape == (16, 50, 400)
    assert all(torch.bincount(row, minlength=5).tolist() == [10] * 5 for row in y)
    # instances of a class are nearer each other than to other classes (noise 0.5 vs spread 1)
    first = x[0][y[0] == 0]
    other = x[0][y[0] == 1]
    assert torch.cdist(first, first).mean() < torch.cdist(first, other).mean()
    history = [torch.full((10,), 0.2)] * 200 + [torch.full((10,), 0.9)] * 100
    assert first_crossing(history, 5, 0.5) == 300
    assert first_crossing(history[:200], 5, 0.5) is None


def test_conv_ceiling_times_every_kernel_with_the_counted_flops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import conv_ceiling

    ops = conv_ceiling.conv_ops(3, 2, 6, hidden=4)
    assert count_flops(ops["forward"]) == 2 * 9 * 2 * 4 * 6 * 6 * 3  # the formula measure() uses
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's count
    results = conv_ceiling.measure(quick=True)
    assert len(results["rows"]) == len(conv_ceiling.LAYERS) * len(conv_ceiling.KINDS)
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in results["rows"])
    text = conv_ceiling.render(results)
    assert text.count("\n| 5 | ") == len(conv_ceiling.LAYERS) and "convolutions alone" in text
    channels_last = conv_ceiling.measure(quick=True, channels_last=True)
    assert "channels-last layout" in conv_ceiling.render(channels_last)
    x = conv_ceiling.conv_ops(3, 2, 6, hidden=4, channels_last=True)["forward"]()
    assert x.stride(1) == 1  # the convolution ran on (and kept) channels-last images


def test_conv_ceiling_in_workloads_times_the_convolution_kernels_of_each_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import conv_ceiling

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's count
    results = conv_ceiling.measure_in_workloads(quick=True)
    rows = {r["workload"]: r for r in results["rows"]}
    assert set(rows) == {"conv4-1-so", "conv4-5-so", "conv4-1-fo", "conv4-5-fo", "protonet"}
    assert all(r["conv_s"] > 0 and r["step_s"] > 0 and r["peak"] > 0 for r in rows.values())
    # the quick ProtoNet episode: 5 ways x (1 shot + 2 queries) through a 64-wide conv4; its
    # convolutions' forward, input and weight gradients, but no input gradient of the images
    images = 15
    first = 2 * 9 * 1 * 64 * 28 * 28 * images
    assert rows["protonet"]["conv_flops"] == 3 * conv4_forward_flops(images, ways=0) - first
    # second order differentiates the inner step's convolutions once more
    assert rows["conv4-1-so"]["conv_flops"] > rows["conv4-1-fo"]["conv_flops"]
    text = conv_ceiling.render_in_workloads(results)
    assert text.count("\n| conv4-") == 4 and "\n| protonet | " in text


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)
def test_fused_block_times_both_implementations_of_the_same_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import fused_block

    for first in (False, True):  # both implementations compute the same block
        calls = fused_block.block_calls(3, 6, channels=8, first=first)
        torch.testing.assert_close(calls["fused forward"](), calls["torch forward"]())
        for a, b in zip(calls["fused fwd+bwd"](), calls["torch fwd+bwd"](), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's count
    results = fused_block.measure(quick=True)
    assert [r["first"] for r in results["rows"]] == [True, False]
    assert all(
        row[f"{impl} {kind}"] > 0
        for row in results["rows"]
        for impl in fused_block.IMPLS
        for kind in ("forward", "fwd+bwd")
    )
    text = fused_block.render(results)
    assert "\n| 5x8x8x8 | " in text and "\n| 5x8x8x8, with the 1-channel conv before it | " in text
