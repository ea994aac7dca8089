"""The fused BatchNorm-pool-ReLU CPU kernel against torch's own kernels (metaml.nn.fused)."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_batch, meta_gradient

from metaml.algorithms.gbml import FOMAML, MAML
from metaml.algorithms.protonet import ProtoNet
from metaml.nn import channels_last_input, create_backbone, fused
from metaml.nn.fused import batch_norm_pool_relu, fused_kernels, fused_kernels_available
from metaml.tasks import TaskBatch

CL = torch.channels_last

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler: the fused kernel cannot be built here",
)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """The shapes the fused kernels ran on (a first block, with its convolution, is marked
    ``"conv"``), so a test can tell they were used."""
    assert fused_kernels_available(), "a C++ compiler is here, so the kernel must build"
    calls: list[tuple[int, ...]] = []
    for function, mark in (
        (fused._BatchNormPoolReLU, ()),
        (fused._ConvBatchNormPoolReLU, ("conv",)),
    ):

        def spy(
            x: torch.Tensor, *args: object, real: Any = function.apply, mark: tuple = mark
        ) -> object:
            calls.append((*mark, *x.shape))
            return real(x, *args)

        monkeypatch.setattr(function, "apply", spy)
    yield calls


def _reference(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    return F.relu(F.max_pool2d(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5), 2))


@pytest.mark.parametrize("shape", [(6, 8, 7, 7), (5, 64, 28, 28), (4, 3, 6, 5), (2, 5, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_equal_torchs_kernels(
    kernel_calls: list, shape: tuple[int, ...], affine: bool
) -> None:
    """float64, odd sizes included (the last row and column fall in no window)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    x.requires_grad_()
    c = shape[1]
    w, b = (
        (torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
        if affine
        else (None, None)
    )
    got, ref = batch_norm_pool_relu(x, w, b), _reference(x, w, b)
    assert kernel_calls == [shape] and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, r in zip(
        torch.autograd.grad(got, inputs, upstream),
        torch.autograd.grad(ref, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def _double_backward(
    block: Any, inputs: list[torch.Tensor], upstream: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """The gradients at (upstream, *inputs) of a random weighting of ``block``'s gradients,
    as second-order MAML takes them (zeros where one does not depend on a tensor)."""
    upstream = upstream.detach().requires_grad_()
    grads = torch.autograd.grad(block(*inputs), inputs, upstream, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    weighted = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in grads)
    wrt = [upstream, *inputs]
    found = torch.autograd.grad(weighted, wrt, allow_unused=True)
    return [torch.zeros_like(t) if f is None else f for f, t in zip(found, wrt, strict=True)]


@pytest.mark.parametrize("shape", [(6, 8, 7, 7), (5, 16, 6, 5), (2, 5, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_equals_torchs(
    kernel_calls: list, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], affine: bool
) -> None:
    """float64, odd sizes included: the kernel's hand-derived double backward against
    torch's autograd through F.batch_norm, F.max_pool2d and F.relu."""
    assert fused._extension is not None
    double_backward_calls: list[int] = []
    real = fused._extension.double_backward

    class Spy:  # the compiled module's attributes are read-only: wrap it
        def __getattr__(self, name: str) -> Any:
            return getattr(real_module, name)

        def double_backward(self, *args: Any) -> Any:
            double_backward_calls.append(1)
            return real(*args)

    real_module = fused._extension
    monkeypatch.setattr(fused, "_extension", Spy())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    c = shape[1]
    params = (
        [
            torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(c, generator=g).double(),
        ]
        if affine
        else []
    )
    inputs = [t.requires_grad_() for t in (x, *params)]
    pooled = (shape[0], c, shape[2] // 2, shape[3] // 2)
    upstream = torch.randn(pooled, generator=g, dtype=torch.float64)

    def fused_block(x: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        return batch_norm_pool_relu(x, *(wb or (None, None)))

    def torch_block(x: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        return _reference(x, *(wb or (None, None)))

    got = _double_backward(fused_block, inputs, upstream, seed=6)
    ref = _double_backward(torch_block, inputs, upstream, seed=6)
    assert kernel_calls == [shape] and double_backward_calls == [1]
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def _first_block_inputs(
    seed: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 channels-last images of ``shape`` and a first block's conv weight and bias and
    BatchNorm weight and bias (8 channels), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(*shape, generator=g, dtype=torch.float64).clone(memory_format=CL)
    params = [
        torch.randn(8, shape[1], 3, 3, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.rand(8, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(8, generator=g, dtype=torch.float64),
    ]
    return images, [p.requires_grad_() for p in params]


def test_first_block_double_backward_equals_torchs(kernel_calls: list) -> None:
    images, params = _first_block_inputs(7, (4, 1, 9, 8))
    upstream = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(7)).double()

    def fused_block(*params: torch.Tensor) -> torch.Tensor:
        return fused._ConvBatchNormPoolReLU.apply(images, *params, 1e-5)[0]

    def torch_block(cw: torch.Tensor, cb: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        return _reference(F.conv2d(images, cw, cb, padding=1), *wb)

    got = _double_backward(fused_block, params, upstream, seed=8)
    ref = _double_backward(torch_block, params, upstream, seed=8)
    assert kernel_calls == [("conv", 4, 1, 9, 8)]
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


def test_gradcheck_and_gradgradcheck(kernel_calls: list) -> None:
    """Finite differences for the kernel's backward and its double backward (create_graph),
    both in the kernel."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    w = torch.rand(2, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(2, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(batch_norm_pool_relu, inputs)
    assert torch.autograd.gradgradcheck(batch_norm_pool_relu, inputs)
    assert kernel_calls  # the function under check was the fused one


def test_ties_go_to_the_first_maximum_as_in_torch(kernel_calls: list) -> None:
    """Few distinct values, so most windows tie: the gradient goes where torch sends it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (4, 3, 6, 6), generator=g).double().contiguous(memory_format=CL)
    x.requires_grad_()
    upstream = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(batch_norm_pool_relu(x, None, None), x, upstream)[0]
    ref = torch.autograd.grad(_reference(x, None, None), x, upstream)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_nan_propagates_as_in_torch(kernel_calls: list) -> None:
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=CL)
    x[0, 1, 0, 1] = float("nan")
    got, ref = batch_norm_pool_relu(x, None, None), _reference(x, None, None)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()


def test_conv4_trains_the_same_with_and_without_it(kernel_calls: list) -> None:
    """Outputs, gradients and BatchNorm's running statistics (both momentum kinds) of a
    conv4 in training mode, then its eval-mode outputs."""
    images = conv_batch(1).query_x[0]
    results = []
    for enabled in (True, False):
        with fused_kernels(enabled):
            torch.manual_seed(0)
            net = create_backbone("conv4", num_outputs=5, hidden=8).double()
            net.features[5].momentum = None  # the second block: a cumulative average
            batch = channels_last_input(net, images)
            out = [net(batch) for _ in range(2)]
            grads = torch.autograd.grad(sum(o.square().sum() for o in out), list(net.parameters()))
            net.eval()
            results.append((out, grads, [t.clone() for t in net.buffers()], net(batch)))
    # 4 blocks x 2 training passes, the first with its convolution; eval runs torch's kernels
    assert [c[0] == "conv" for c in kernel_calls] == [True, False, False, False] * 2
    (out, grads, buffers, evaluated), (out_ref, grads_ref, buffers_ref, evaluated_ref) = results
    for a, b in zip(
        [*out, *grads, *buffers, evaluated],
        [*out_ref, *grads_ref, *buffers_ref, evaluated_ref],
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [MAML, FOMAML])
def test_maml_meta_gradient_unchanged(kernel_calls: list, cls: type) -> None:
    """Every pass in the kernel, the support passes of second-order inner steps (differentiated
    twice: the kernel's double backward) included."""
    batch = conv_batch(2)
    results = []
    for enabled in (True, False):
        with fused_kernels(enabled):
            torch.manual_seed(0)
            net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
            learner = cls(net.double(), inner_lr=0.4, inner_steps=2, vectorize="loop").double()
            results.append(meta_gradient(learner, batch))
    # 2 tasks x (2 support passes of 5 images + 1 query pass of 10) x 4 blocks
    assert sorted(c[-4] for c in kernel_calls) == [5] * 16 + [10] * 8
    (metrics, grads), (metrics_ref, grads_ref) = results
    assert metrics["loss"] == pytest.approx(metrics_ref["loss"], rel=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_protonet_episode_uses_it(kernel_calls: list) -> None:
    learner = ProtoNet(create_backbone("conv4", num_outputs=0, hidden=8))
    b = conv_batch(1)
    learner.meta_loss(TaskBatch(b.support_x.float(), b.support_y, b.query_x.float(), b.query_y))
    assert kernel_calls == [("conv", 10 + 5, 1, 28, 28), *((15, 8, s, s) for s in (14, 7, 3))]


def test_torchs_kernels_run_where_the_fused_one_does_not_apply(kernel_calls: list) -> None:
    x = torch.randn(4, 3, 6, 6)
    assert torch.allclose(batch_norm_pool_relu(x, None, None), _reference(x, None, None))  # NCHW
    cl = x.contiguous(memory_format=CL)
    batch_norm_pool_relu(cl.bfloat16(), None, None)  # bf16 outside autocast: not built for it
    strided = torch.ones(6)[::2]  # a weight the kernel cannot read as a plain array
    torch.testing.assert_close(
        batch_norm_pool_relu(cl, strided, None), _reference(cl, strided, None)
    )
    torch.func.grad(lambda t: batch_norm_pool_relu(t, None, None).sum())(cl)  # a transform
    with fused_kernels(False):
        batch_norm_pool_relu(cl, None, None)
    assert kernel_calls == []
    batch_norm_pool_relu(cl, None, None)
    assert kernel_calls == [(4, 3, 6, 6)]


def test_a_bf16_activation_under_autocast_is_normalised_in_float32(kernel_calls: list) -> None:
    """The kernel reads a float32 copy of a convolution's bfloat16 output and returns float32,
    and the gradient goes back in bfloat16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 7, 7, generator=g).contiguous(memory_format=CL).bfloat16()
    x.requires_grad_()
    w, b = (torch.randn(8, generator=g).requires_grad_() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = batch_norm_pool_relu(x, w, b)
        assert torch.is_autocast_enabled("cpu") and kernel_calls == [(6, 8, 7, 7)]
    ref = _reference(x.float(), w, b)  # torch's kernels on the same float32 copy
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(got, (x, w, b), upstream)
    grads_ref = torch.autograd.grad(ref, (x, w, b), upstream)
    assert grads[0].dtype == torch.bfloat16
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 in: float32, as torch does
        assert batch_norm_pool_relu(x.detach().float(), w, b).dtype == torch.float32
    assert len(kernel_calls) == 2


def test_bf16_autocast_maml_runs_every_block_in_the_kernel(kernel_calls: list) -> None:
    """conv4's first block (its convolution in float32) and the three blocks after bfloat16
    convolutions all take the kernel, and the meta-gradient is fp32's up to bf16's rounding."""
    b = conv_batch(2)
    batch = TaskBatch(b.support_x.float(), b.support_y, b.query_x.float(), b.query_y)
    torch.manual_seed(0)
    net = create_backbone("conv4", num_outputs=5, track_running_stats=False)
    learner = MAML(net, inner_lr=0.4, inner_steps=1, vectorize="loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics, grads = meta_gradient(learner, batch)
    # 2 tasks x (a support pass of 5 images + a query pass of 10) x 4 blocks
    assert sorted(c[-4] for c in kernel_calls) == [5] * 8 + [10] * 8
    assert [c[0] for c in kernel_calls].count("conv") == 4
    with fused_kernels(False):
        metrics32, grads32 = meta_gradient(learner, batch)
    assert metrics["loss"] == pytest.approx(metrics32["loss"], rel=0.01)
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    for name, a, r in zip(names, grads, grads32, strict=True):
        # a bias before BatchNorm has a zero gradient, of which both hold rounding noise only
        if name.endswith(("0.bias", "4.bias", "8.bias", "12.bias")):
            continue
        # measured 0.988-1.0 (torch's own bf16 kernels: 0.976-0.999)
        assert F.cosine_similarity(a.flatten(), r.flatten(), dim=0) > 0.97, name


def test_running_statistics_as_torchs_batch_norm(kernel_calls: list) -> None:
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=CL)
    stats = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    stats_ref = [t.clone() for t in stats]
    batch_norm_pool_relu(x, None, None, 1e-5, *stats, momentum=0.3)
    F.batch_norm(x, *stats_ref, None, None, True, 0.3, 1e-5)
    assert kernel_calls
    for a, b in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _conv_reference(images: torch.Tensor, conv: torch.nn.Conv2d, w: Any, b: Any) -> torch.Tensor:
    return _reference(conv(images), w, b)


@pytest.mark.parametrize(
    ("shape", "channels"), [((5, 1, 28, 28), 16), ((4, 3, 7, 9), 8), ((3, 1, 6, 6), 8)]
)
def test_first_block_with_its_convolution_equals_torchs_kernels(
    kernel_calls: list, shape: tuple[int, ...], channels: int
) -> None:
    """float64: the convolution's output is recomputed inside the kernel, never stored; its
    weight gradient is folded from the output gradient and the image patches."""
    from metaml.nn import BatchNorm2d

    g = torch.Generator().manual_seed(3)
    images = torch.randn(*shape, generator=g, dtype=torch.float64).clone(memory_format=CL)
    conv = torch.nn.Conv2d(shape[1], channels, 3, padding=1).double()
    norm = BatchNorm2d(channels, track_running_stats=False).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    pool, act = torch.nn.MaxPool2d(2), torch.nn.ReLU()
    got = fused.conv_block(conv, norm, pool, act, images)
    ref = _conv_reference(images, conv, norm.weight, norm.bias)
    assert kernel_calls == [("conv", *shape)] and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = [conv.weight, conv.bias, norm.weight, norm.bias]
    grads = torch.autograd.grad(got, params, upstream)
    grads_ref = torch.autograd.grad(ref, params, upstream)
    for a, r in zip(grads, grads_ref, strict=True):
        # the conv bias's gradient is zero up to rounding (BatchNorm removes any shift): atol
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


def test_first_block_gradgradcheck(kernel_calls: list) -> None:
    images, (conv_w, conv_b, w, b) = _first_block_inputs(4, (3, 1, 5, 4))

    def block(cw: torch.Tensor, cb: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fused._ConvBatchNormPoolReLU.apply(images, cw, cb, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(block, (conv_w, conv_b, w, b))
    assert torch.autograd.gradgradcheck(block, (conv_w, conv_b, w, b))
    assert kernel_calls


def test_first_block_only_where_the_kernel_can_compute_it(kernel_calls: list) -> None:
    """Images that need a gradient, a 1-channel batch in the default layout, and a width that
    is no multiple of 8 go to torch's convolution; what follows it is still fused where it
    can be."""
    from metaml.nn import BatchNorm2d

    rest = BatchNorm2d(8, track_running_stats=False), torch.nn.MaxPool2d(2), torch.nn.ReLU()
    conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    images = torch.randn(4, 1, 6, 6)
    fused.conv_block(conv, *rest, images)  # default layout: torch's conv, then NCHW: no fusion
    fused.conv_block(conv, *rest, images.clone(memory_format=CL).requires_grad_())
    assert kernel_calls == [(4, 8, 6, 6)]
    kernel_calls.clear()
    odd = torch.nn.Conv2d(1, 6, 3, padding=1)
    rest6 = BatchNorm2d(6, track_running_stats=False), *rest[1:]
    fused.conv_block(odd, *rest6, images.clone(memory_format=CL))
    assert kernel_calls == [(4, 6, 6, 6)]


def _no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to build the kernel fail as it does without ninja."""
    from torch.utils import cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)


def test_a_failed_build_warns_once_and_runs_on_torchs_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No compiler or ninja: one RuntimeWarning that names the fix, then the same values."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build there
    _no_compiler(monkeypatch)
    monkeypatch.setattr(fused, "_extension", None)
    monkeypatch.setattr(fused, "_build_error", None)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=CL)
    with pytest.warns(RuntimeWarning, match="pip install ninja"):
        y = batch_norm_pool_relu(x, None, None)
    assert not fused_kernels_available()
    torch.testing.assert_close(y, _reference(x, None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again
        batch_norm_pool_relu(x, None, None)


@pytest.mark.skipif(not fused_kernels_available(), reason="the kernel did not build here")
def test_a_cached_build_is_imported_without_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later process imports the finished build directly: no compiler run, no warning."""
    _no_compiler(monkeypatch)
    monkeypatch.setattr(fused, "_extension", None)
    monkeypatch.setattr(fused, "_build_error", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_kernels_available()


def test_a_build_in_progress_or_half_written_is_not_imported(tmp_path: Path) -> None:
    """While another process holds torch's lock, or when the library does not load, the cached
    import steps aside (and ``cpp_extension`` waits for, or redoes, the build)."""
    name = "metaml_bn_pool_relu_test"
    (tmp_path / f"{name}.so").write_bytes(b"\x7fELF truncated")
    assert fused._import_cached(name, tmp_path) is None
    (tmp_path / "lock").touch()
    assert fused._import_cached(name, tmp_path) is None
    assert fused._import_cached(name, tmp_path / "missing") is None
