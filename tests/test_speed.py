"""The speed options keep MAML's meta-gradients: low-memory mode, channels-last inputs and
bf16 autocast training; and CPU memory reuse does what it says."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GRADIENT_LEARNER_CASES, conv_batch, meta_gradient

from metaml.algorithms.gbml import ANIL, FOMAML, MAML
from metaml.algorithms.protonet import ProtoNet
from metaml.nn import channels_last_input, create_backbone
from metaml.tasks import TaskBatch

CL = torch.channels_last


@pytest.mark.parametrize(("cls", "kwargs"), GRADIENT_LEARNER_CASES)
def test_per_task_loop_gives_the_vmap_meta_gradient(cls: type, kwargs: dict) -> None:
    """The loop frees each task's graph after its own backward (``low_memory`` forces the loop)
    and gives conv4 channels-last inputs; the meta-gradient equals vmap's, which
    differentiates the whole batch's graph at once in the default layout."""
    batch = conv_batch()

    def learner(**options: object) -> torch.nn.Module:
        torch.manual_seed(0)
        net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
        return cls(net.double(), inner_lr=0.4, **kwargs, **options).double()  # type: ignore[no-any-return]

    metrics_ref, ref = meta_gradient(learner(vectorize="vmap"), batch)
    for options in ({"vectorize": "loop"}, {"vectorize": "auto", "low_memory": True}):
        metrics, got = meta_gradient(learner(**options), batch)
        assert metrics["loss"] == pytest.approx(metrics_ref["loss"], rel=1e-12)
        assert len(ref) == len(got)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _is_channels_last(x: torch.Tensor) -> bool:
    # A 1-channel batch is "contiguous" in both layouts; its strides tell which one it is in.
    return x.stride(1) == 1 and x.is_contiguous(memory_format=CL)


def test_channels_last_input_only_for_models_and_batches_it_pays_for() -> None:
    conv4, mlp = create_backbone("conv4"), create_backbone("mlp")
    x = torch.rand(5, 1, 28, 28)
    y = channels_last_input(conv4, x)
    assert _is_channels_last(y) and not _is_channels_last(x) and torch.equal(x, y)
    assert _is_channels_last(channels_last_input(conv4, torch.rand(2, 3, 8, 8)))
    assert channels_last_input(mlp, x) is x  # not a model that prefers it
    flat, labels = torch.rand(5, 784), torch.zeros(5, 1, 28, 28, dtype=torch.long)
    assert channels_last_input(conv4, flat) is flat and channels_last_input(conv4, labels) is labels
    same = []

    def inside(batch: torch.Tensor) -> torch.Tensor:
        same.append(channels_last_input(conv4, batch) is batch)
        return batch.sum()

    torch.func.vmap(inside)(x[None])
    assert same == [True]  # untouched under torch.func transforms


def test_conv4_computes_the_same_function_on_channels_last_inputs() -> None:
    torch.manual_seed(0)
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False).double()
    x = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    outputs = [net(v) for v in (x, channels_last_input(net, x))]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(o.square().sum(), list(net.parameters())) for o in outputs]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("cls", "kwargs", "support_layouts"),
    [
        (MAML, {}, [True, True]),  # second order: the fused kernel's double backward
        (FOMAML, {}, [True, True]),
        (ANIL, {}, [True]),  # the inner steps adapt the head only: the backbone runs once
    ],
)
def test_gradient_learners_run_every_conv4_pass_channels_last(
    cls: type, kwargs: dict, support_layouts: list[bool]
) -> None:
    """Channels-last for every conv4 pass, a second-order step's support pass (differentiated
    twice) included; the same in adaptation."""
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
    learner = cls(net, inner_lr=0.4, inner_steps=2, vectorize="loop", **kwargs)
    seen: list[tuple[int, bool]] = []
    net.features[0].register_forward_pre_hook(
        lambda _, args: seen.append((len(args[0]), _is_channels_last(args[0])))
    )
    b = conv_batch(1)  # 5 support images, 10 queries
    batch = TaskBatch(b.support_x.float(), b.support_y, b.query_x.float(), b.query_y)
    learner.meta_loss(batch)[0].backward()
    assert [cl for n, cl in seen if n == 5] == support_layouts
    assert [cl for n, cl in seen if n == 10] == [True]
    seen.clear()
    learner.adapt(batch.support_x[0], batch.support_y[0], steps=1)(batch.query_x[0])
    assert [cl for _, cl in seen] == [True, True]  # one support pass (1 step), one query pass


def test_protonet_loss_and_gradient_are_the_same_in_either_layout() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", num_outputs=0, hidden=8).double()
    learner = ProtoNet(backbone).double()
    batch = conv_batch(2)
    results = []
    for prefers in (True, False):
        backbone.prefers_channels_last = prefers
        loss, _ = learner.meta_loss(batch)
        results.append((loss, torch.autograd.grad(loss, list(learner.parameters()))))
    (loss_cl, grads_cl), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss_cl, loss_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_cl, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_low_memory_off_the_training_path_is_the_ordinary_loss() -> None:
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False).double()
    learner = MAML(net, inner_lr=0.4, low_memory=True, vectorize="loop")
    with torch.no_grad():
        loss, metrics = learner.meta_loss(conv_batch(2))
    assert not loss.requires_grad and set(metrics) == {"loss", "acc"}


@pytest.mark.parametrize(
    ("cls", "kwargs", "recomputed"),
    [
        (MAML, {"low_memory": True}, True),
        (MAML, {"low_memory": True, "first_order": True}, False),  # no second-order graph
        (ANIL, {"low_memory": True}, False),  # its steps' graphs are the head's
        (MAML, {}, False),
    ],
)
def test_low_memory_recomputes_the_steps_of_second_order_training(
    cls: type, kwargs: dict, recomputed: bool
) -> None:
    """``low_memory`` second-order steps go through recomputed_inner_loop (their meta-gradient
    is tested above against vmap's); first order and ANIL keep the ordinary steps."""
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
    learner = cls(net.double(), inner_lr=0.4, inner_steps=2, **kwargs)
    b = conv_batch(1)
    fast = learner._adapt_fast(
        learner._embed(b.support_x[0]), b.support_y[0], 2, learner.first_order
    )
    kinds = {type(t.grad_fn).__name__ for t in fast.values()}
    assert (kinds == {"_RecomputedStepBackward"}) is recomputed, kinds


def test_trainer_precision_bf16_runs_meta_loss_under_autocast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from metaml.config import TrainConfig
    from metaml.data import Sinusoid
    from metaml.engine.trainer import Trainer
    from metaml.tasks import EpisodeSampler

    seen = []

    class Recording(MAML):
        def meta_loss(self, batch: TaskBatch):  # type: ignore[no-untyped-def]
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return super().meta_loss(batch)

    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=5, meta_batch_size=2)
    learner = Recording(create_backbone("mlp"), task_type="regression", vectorize="loop")
    config = TrainConfig(steps=2, precision="bf16", log_every=1, checkpoint_every=2)
    summary = Trainer(learner, sampler, None, config, tmp_path / "run", quiet=True).fit()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert summary["step"] == 2 and summary["loss"] is not None
    assert all(p.dtype == torch.float32 for p in learner.parameters())


@pytest.mark.parametrize(
    ("flags", "fast"),
    [
        ("flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni", True),  # Zen 4
        ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile", True),  # Sapphire Rapids
        ("Features\t: fp asimd sve bf16 i8mm", True),  # Arm (Graviton 3)
        ("flags\t\t: fpu sse2 avx2 fma", False),  # Zen 3: AVX2 only
        ("flags\t\t: avx512f avx512bw avx512_vnni", False),  # AVX-512 without BF16
    ],
)
def test_has_fast_bf16_reads_the_cpus_bf16_units(monkeypatch, flags: str, fast: bool) -> None:  # type: ignore[no-untyped-def]
    from metaml import device

    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    assert device.has_fast_bf16("cpu") is fast


@pytest.mark.parametrize("fast", [True, False])
def test_trainer_warns_of_bf16_without_bf16_units(tmp_path, monkeypatch, fast: bool) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from metaml.config import TrainConfig
    from metaml.data import Sinusoid
    from metaml.engine.trainer import Trainer
    from metaml.tasks import EpisodeSampler

    monkeypatch.setattr("metaml.engine.trainer.has_fast_bf16", lambda device: fast)
    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=5, meta_batch_size=2)
    learner = MAML(create_backbone("mlp"), task_type="regression", vectorize="loop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(learner, sampler, None, TrainConfig(precision="bf16"), tmp_path, quiet=True)
        Trainer(learner, sampler, None, TrainConfig(precision="fp32"), tmp_path, quiet=True)
    said = [str(w.message) for w in caught if "bf16 units" in str(w.message)]
    assert len(said) == (0 if fast else 1)
    assert fast or "train.precision=fp32" in said[0]


@pytest.mark.slow
def test_compiled_meta_loss_gives_the_second_order_meta_gradient() -> None:
    torch.manual_seed(0)
    batch = TaskBatch(*(torch.randn(3, 5, 1, dtype=torch.float64) for _ in range(4)))
    grads = []
    for compile in (False, True):
        torch.manual_seed(0)
        net = create_backbone("mlp", in_shape=(1,), num_outputs=1, hidden=(8, 8)).double()
        learner = MAML(net, task_type="regression", inner_lr=0.3, inner_steps=2,
                       vectorize="vmap", compile=compile)  # fmt: skip
        learner.meta_loss(batch)[0].backward()
        grads.append([p.grad for p in learner.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


# Fills a fresh 64 MiB tensor 12 times and prints the page faults of the last fill; argv[1] ==
# "reuse" turns reuse_cpu_memory on first. glibc needs a few rounds to settle: torch asks for
# 64-byte aligned blocks, which do not fit exactly into the hole the last one left.
_FAULTS_OF_A_LATER_FILL = """
import resource, sys, torch
from metaml.device import reuse_cpu_memory
if sys.argv[1] == "reuse":
    assert reuse_cpu_memory()
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_a_later_fill(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_A_LATER_FILL, mode],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_cpu_memory_fills_a_freed_block_without_page_faults() -> None:
    # In a fresh process each: the setting is process-wide and cannot be undone.
    assert _faults_of_a_later_fill("reuse") < 100
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.is_file() and "[always]" in thp.read_text()):  # else 2 MiB pages: 32 faults
        assert _faults_of_a_later_fill("default") > 10_000  # 16,384 pages of 4 KiB, anew


def test_runs_reuse_cpu_memory_unless_the_config_says_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from metaml.config import load_config
    from metaml.runs import build_learner, build_samplers

    calls: list[bool] = []
    monkeypatch.setattr("metaml.runs.reuse_cpu_memory", lambda: calls.append(True) or True)
    cfg = load_config(None, [])
    build_learner(cfg, build_samplers(cfg).train)
    assert calls == [True]
    cfg = load_config(None, ["reuse_cpu_memory=false"])
    build_learner(cfg, build_samplers(cfg).train)
    assert calls == [True]
