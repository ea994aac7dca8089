"""A fused CPU kernel for conv4's blocks: (convolution,) BatchNorm, 2x2 max-pooling and ReLU.

In a conv4 step on the CPU, BatchNorm (with the batch's own statistics), max-pooling and ReLU
run as separate memory-bound kernels that each read and write the full-size activation, and
max-pooling's backward zero-fills one more. :func:`norm_pool_relu` (and
:func:`batch_norm_pool_relu`) does the three in one C++ kernel (``csrc/bn_pool_relu.cpp``),
forward and backward; :func:`conv_block` also folds in the first block's 1- or 3-channel
convolution, whose full-resolution output is then never stored. A block takes 1.6-3.2x less
time, a ProtoNet 20-way episode 1.3x (docs/speed.md). A backward with ``create_graph=True``
(second-order MAML's inner steps) stays in the kernel: its double backward is hand-derived
there too. The values are those of torch's kernels up to rounding (tested in float64, the
double backward against torch's and with ``gradgradcheck``).

The kernel is compiled with ``torch.utils.cpp_extension`` the first time it is needed (once
per machine and torch version, about a minute; it needs a C++ compiler and ninja) and cached
under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``); later processes
import the cached build directly. Where it cannot
compile, or ``METAML_FUSED_KERNELS=0`` is set, or :func:`set_fused_kernels` turned it off,
everything runs on torch's own kernels, as it does on CUDA, under ``torch.func`` transforms
and ``torch.compile``, for other dtypes than float32/float64, and for inputs that are not
channels-last. Under bf16 autocast the kernel normalises the convolutions' bfloat16 outputs
in float32 (and computes the first block, convolution included, in float32).

Example:
    >>> x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    >>> y = batch_norm_pool_relu(x, None, None)
    >>> ref = F.relu(F.max_pool2d(F.batch_norm(x, None, None, training=True), 2))
    >>> y.shape, torch.allclose(y, ref, atol=1e-5)
    (torch.Size([4, 3, 3, 3]), True)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.device import cpu_flags

log = logging.getLogger("metaml.nn.fused")

_SOURCE = Path(__file__).with_name("csrc") / "bn_pool_relu.cpp"
_ENV = "METAML_FUSED_KERNELS"
_lock = threading.Lock()
_enabled = os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
_extension: ModuleType | None = None
_build_error: str | None = None


def set_fused_kernels(enabled: bool) -> bool:
    """Turn the fused CPU kernel on or off for this process; returns the previous setting.

    The default is on, unless the environment sets ``METAML_FUSED_KERNELS=0``. Off, conv4
    runs BatchNorm, pooling and ReLU on torch's kernels (same values up to rounding).

    Example:
        >>> previous = set_fused_kernels(False)
        >>> fused_kernels_available()
        False
        >>> _ = set_fused_kernels(previous)
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, the fused CPU kernel on or off; the previous setting after it.

    Example:
        >>> with fused_kernels(False):
        ...     fused_kernels_available()
        False
    """
    previous = set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(previous)


def fused_kernels_available() -> bool:
    """Whether the fused kernel is on and compiled; compiles it on the first call.

    Example:
        >>> isinstance(fused_kernels_available(), bool)
        True
    """
    return _enabled and _load() is not None


def _build_name() -> str:
    """The extension's name: a digest of the source, torch's version and the CPU.

    It is compiled with ``-march=native``, so a cache shared between machines (a home directory
    on a cluster) must not hand one CPU's build to another.
    """
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(f"{torch.version.cuda} {torch.version.hip}".encode())
    digest.update(sys.implementation.cache_tag.encode())  # the Python ABI it is built for
    digest.update(platform.machine().encode())
    digest.update(cpu_flags().encode())
    return f"metaml_bn_pool_relu_{digest.hexdigest()[:16]}"


def _load() -> ModuleType | None:
    global _extension, _build_error
    if _extension is not None or _build_error is not None:
        return _extension
    with _lock:  # one thread compiles; torch's own lock file keeps other processes waiting
        if _extension is None and _build_error is None:
            _extension, _build_error = _compile()
    return _extension


def _build_directory(name: str) -> Path:
    """Where the build lives: ``$TORCH_EXTENSIONS_DIR/<name>``, else under the user's cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
        )
    return Path(root) / name


def _import_cached(name: str, directory: Path) -> ModuleType | None:
    """The finished build in ``directory``, imported without ``torch.utils.cpp_extension``
    (whose import and up-to-date check add ~4 MiB and a ninja run to every process); ``None``
    while there is none, or while another process is building it (torch's lock file)."""
    library = directory / f"{name}.so"
    if not library.is_file() or (directory / "lock").exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:  # half-written or stale: cpp_extension rebuilds it
        log.info("not using the cached %s: %s", library, exc)
        return None
    return module


def _compile() -> tuple[ModuleType | None, str | None]:
    name = _build_name()
    directory = _build_directory(name)
    cached = _import_cached(name, directory)
    if cached is not None:
        return cached, None
    from torch.utils import cpp_extension

    # Say so only when it takes long, i.e. when it compiles rather than loads a cached build.
    notice = threading.Timer(
        2.0,
        lambda: print(
            "metaml: compiling the fused CPU kernel for conv4's blocks "
            "(once per machine and torch version, about a minute)...",
            file=sys.stderr,
            flush=True,
        ),
    )
    notice.start()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name, [str(_SOURCE)], extra_cflags=["-O3", "-march=native"],
            build_directory=str(directory), verbose=False,
        )  # fmt: skip
    except Exception as exc:  # no compiler, no ninja, an unsupported flag: run on torch's kernels
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
        warnings.warn(
            f"metaml could not compile its fused CPU kernel ({reason}); conv4 runs on torch's "
            f"kernels instead, slower (1.3x per ProtoNet episode here). Install a C++ compiler and `pip install ninja` "
            f"to use it, or set {_ENV}=0 to stop trying.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    finally:
        notice.cancel()
    log.info("loaded %s", name)
    return module, None


class _BatchNormPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert _extension is not None
        out, argmax, mean, var, invstd = _extension.forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, out, argmax, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, weight, out, argmax, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second-order inner step: keep the graph of this backward
            grads = _BatchNormPoolReLUGrad.apply(
                grad_out, x, weight, out.detach(), argmax, mean, invstd
            )
        else:
            assert _extension is not None
            grads = _extension.backward(grad_out, out, argmax, x, mean, invstd, weight)
        return (*_wanted(grads, ctx.needs_input_grad), None)


def _wanted(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [g if need else None for g, need in zip(grads, needs, strict=False)]


class _BatchNormPoolReLUGrad(torch.autograd.Function):
    """The fused block's backward as a function of (grad_out, x, weight), so that a backward
    with ``create_graph=True`` runs in the kernel too; its own backward, the double backward
    that second-order MAML takes, is in the kernel as well (``double_backward``)."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor | None,
        out: Tensor,
        argmax: Tensor,
        mean: Tensor,
        invstd: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert _extension is not None
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        dx, dw, db = _extension.backward(grad_out, out, argmax, x, mean, invstd, weight)
        ctx.save_for_backward(grad_out, x, weight, out, argmax, mean, invstd)
        return dx, dw, db

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_dx: Tensor | None, grad_dw: Tensor | None, grad_db: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        assert _extension is not None
        grad_out, x, weight, out, argmax, mean, invstd = ctx.saved_tensors
        if grad_dx is None:
            grad_dx = torch.zeros_like(x)
        # the kernel reads the per-channel gradients as plain arrays (autograd may expand them)
        grad_dw, grad_db = (None if t is None else t.contiguous() for t in (grad_dw, grad_db))
        grads = _extension.double_backward(
            grad_dx, grad_dw, grad_db, grad_out, out, argmax, x, mean, invstd, weight
        )
        return (*_wanted(grads, ctx.needs_input_grad), None, None, None, None)


class _ConvBatchNormPoolReLU(torch.autograd.Function):
    """conv4's first block, its 3x3 convolution included (no gradient for the images)."""

    @staticmethod
    def forward(
        ctx: Any,
        images: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert _extension is not None
        out, argmax, mean, var, invstd = _extension.conv_forward(
            images, conv_weight, conv_bias, weight, bias, eps
        )
        ctx.save_for_backward(images, conv_weight, conv_bias, weight, out, argmax, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        images, conv_weight, conv_bias, weight, out, argmax, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second-order inner step: keep the graph of this backward
            grads = _ConvBatchNormPoolReLUGrad.apply(
                grad_out, conv_weight, conv_bias, weight, images, out.detach(), argmax, mean, invstd
            )
        else:
            assert _extension is not None
            grads = _extension.conv_backward(
                grad_out, out, argmax, images, conv_weight, conv_bias, mean, invstd, weight
            )
        return (None, *_wanted(grads, ctx.needs_input_grad[1:5]), None)


class _ConvBatchNormPoolReLUGrad(torch.autograd.Function):
    """The first block's backward as a differentiable function of (grad_out, conv weight,
    conv bias, weight), as :class:`_BatchNormPoolReLUGrad` is for the other blocks. Its
    backward recomputes the convolution's output, which the kernel never stores."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_out: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor,
        weight: Tensor | None,
        images: Tensor,
        out: Tensor,
        argmax: Tensor,
        mean: Tensor,
        invstd: Tensor,
    ) -> tuple[Tensor, ...]:
        assert _extension is not None
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grads = _extension.conv_backward(
            grad_out, out, argmax, images, conv_weight, conv_bias, mean, invstd, weight
        )
        ctx.save_for_backward(
            grad_out, conv_weight, conv_bias, weight, images, out, argmax, mean, invstd
        )
        return tuple(grads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_grads: Tensor | None) -> tuple[Tensor | None, ...]:
        assert _extension is not None
        grad_out, conv_weight, conv_bias, weight, images, out, argmax, mean, invstd = (
            ctx.saved_tensors
        )
        g_conv_weight, g_conv_bias, g_weight, g_bias = (
            None if g is None else g.contiguous() for g in grad_grads
        )
        (conv_out,) = _extension.first_conv(images, conv_weight, conv_bias)
        # The convolution's weight and bias gradients are (the images correlated with, the sum
        # of) the gradient at its output: linear in it, with the convolution as their adjoint.
        (g_conv_grad,) = _extension.first_conv(
            images,
            torch.zeros_like(conv_weight) if g_conv_weight is None else g_conv_weight,
            torch.zeros_like(conv_bias) if g_conv_bias is None else g_conv_bias,
        )
        g_grad_out, g_conv_out, g_weight = _extension.double_backward(
            g_conv_grad, g_weight, g_bias, grad_out, out, argmax, conv_out, mean, invstd, weight
        )
        g_conv = _extension.first_conv_weight_grad(images, g_conv_out)
        grads = (g_grad_out, *g_conv, g_weight)
        return (*_wanted(grads, ctx.needs_input_grad), None, None, None, None, None)


def _fusable(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the fused kernel computes ``x``'s block (else torch's kernels do)."""
    from metaml.nn.backbones import _inside_transform

    # transforms first: under vmap, x.is_contiguous(memory_format=...) raises
    if not _enabled or _inside_transform() or x.device.type != "cpu" or x.dim() != 4:
        return False
    dtype = _compute_dtype(x)
    if dtype is None or x.size(2) < 2 or x.size(3) < 2:
        return False
    if x.size(0) * x.size(2) * x.size(3) < 2 or not x.is_contiguous(
        memory_format=torch.channels_last
    ):
        return False
    for p in (weight, bias):
        if p is not None and (
            p.dtype != dtype
            or p.device != x.device
            or p.shape != (x.size(1),)
            or not p.is_contiguous()
        ):
            return False
    return _load() is not None


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the kernel computes ``x``'s block in, or None where it does not apply.

    float32 and float64 as they come. Under CPU autocast (``train.precision: bf16``), a
    convolution's bfloat16 output is normalised in float32: the kernel reads a float32 copy
    and returns float32, which the next convolution casts back to bfloat16 (torch's BatchNorm
    would accumulate in float32 too, but round its output to bfloat16). A bfloat16 model
    outside autocast keeps torch's kernels.
    """
    if x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
        return torch.float32
    return x.dtype if x.dtype in (torch.float32, torch.float64) else None


def batch_norm_pool_relu(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
) -> Tensor:
    """``relu(max_pool2d(batch_norm(x, training=True), 2))``, fused on the CPU where it can be.

    BatchNorm normalises with the statistics of ``x`` itself and, given ``running_mean`` and
    ``running_var``, updates them in place as ``F.batch_norm(..., training=True)`` does. The
    fused kernel runs for 4-D float32/float64 channels-last CPU tensors (bfloat16 ones under
    autocast, computed and returned in float32) outside ``torch.func`` transforms and
    ``torch.compile``; every other input goes through torch's kernels. A
    backward with ``create_graph=True`` is differentiable again, in the kernel, so
    second-order MAML gets the exact double backward.

    Example:
        >>> x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        >>> batch_norm_pool_relu(x, torch.ones(4), torch.zeros(4)).shape
        torch.Size([2, 4, 2, 2])
    """
    if not _fusable(x, weight, bias):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        return F.relu(F.max_pool2d(y, 2))
    dtype = _compute_dtype(x)
    assert dtype is not None
    x = x.to(dtype)  # a bfloat16 activation under autocast: a float32 copy
    out, mean, var = _BatchNormPoolReLU.apply(x, weight, bias, eps)
    _update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.size(1))
    return out


def norm_pool_relu(norm: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(pool(norm(x)))`` for one conv4 block, fused where :func:`batch_norm_pool_relu` can.

    Fused only when ``norm`` is a BatchNorm2d normalising with batch statistics (training
    mode, or no running statistics), ``pool`` a 2x2 max-pool and ``act`` a ReLU, none with
    hooks; the running statistics and ``num_batches_tracked`` are updated as
    ``nn.BatchNorm2d`` does.

    Example:
        >>> from metaml.nn import BatchNorm2d
        >>> x = torch.randn(3, 2, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> norm_pool_relu(BatchNorm2d(2), nn.MaxPool2d(2), nn.ReLU(), x).shape
        torch.Size([3, 2, 2, 2])
    """
    if not _block_fusable(norm, pool, act):
        return act(pool(norm(x)))
    assert isinstance(norm, nn.BatchNorm2d)
    if not _fusable(x, norm.weight, norm.bias):
        return act(pool(norm(x)))
    momentum, update = _running_stats_step(norm)
    return batch_norm_pool_relu(
        x,
        norm.weight,
        norm.bias,
        norm.eps,
        norm.running_mean if update else None,
        norm.running_var if update else None,
        momentum,
    )


def conv_block(
    conv: nn.Module, norm: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor
) -> Tensor:
    """``act(pool(norm(conv(x))))`` for one conv4 block, as fused as the kernels allow.

    A first block (a 3x3 convolution of 1 or 3 channels of channels-last images that need no
    gradient, into a multiple of 8 channels) runs entirely in the fused kernel; its
    convolution's full-resolution output is never stored. Other blocks fuse what follows the
    convolution (:func:`norm_pool_relu`).

    Example:
        >>> from metaml.nn import BatchNorm2d
        >>> conv = nn.Conv2d(1, 8, 3, padding=1)
        >>> x = torch.randn(3, 1, 6, 6).clone(memory_format=torch.channels_last)
        >>> conv_block(conv, BatchNorm2d(8), nn.MaxPool2d(2), nn.ReLU(), x).shape
        torch.Size([3, 8, 3, 3])
    """
    if not _first_block_fusable(conv, norm, pool, act, x):
        return norm_pool_relu(norm, pool, act, conv(x))
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
    momentum, update = _running_stats_step(norm)
    out, mean, var = _ConvBatchNormPoolReLU.apply(
        x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps
    )
    if update:
        _update_running_stats(
            norm.running_mean, norm.running_var, mean, var, momentum, x.numel() // x.size(1)
        )
    return out


def _running_stats_step(norm: nn.BatchNorm2d) -> tuple[float, bool]:
    """As ``nn.BatchNorm2d.forward``: count the batch; the momentum and whether to update."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # a cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    return momentum, bool(norm.training and norm.track_running_stats)


def _update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    values_per_channel: int,
) -> None:
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():  # as torch's kernel: the unbiased variance goes into the average
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        unbiased = var * (values_per_channel / (values_per_channel - 1))
        running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def _block_fusable(norm: nn.Module, pool: nn.Module, act: nn.Module) -> bool:
    """A BatchNorm2d on batch statistics, a plain 2x2 max-pool and a ReLU, without hooks."""
    if not isinstance(norm, nn.BatchNorm2d) or not isinstance(act, nn.ReLU):
        return False
    if not (norm.training or norm.running_mean is None):
        return False  # eval mode with running statistics: an affine map, left to torch
    if not isinstance(pool, nn.MaxPool2d) or not _is_plain_2x2(pool):
        return False
    return not _hooked(norm, pool, act)


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )


def _first_block_fusable(
    conv: nn.Module, norm: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor
) -> bool:
    """Whether :class:`_ConvBatchNormPoolReLU` computes this block."""
    if not isinstance(conv, nn.Conv2d) or conv.in_channels not in (1, 3):
        return False  # not a first block: blocks 2-4 go straight to norm_pool_relu
    if not _block_fusable(norm, pool, act) or _hooked(conv):
        return False
    plain_3x3 = (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )  # fmt: skip
    if (
        not plain_3x3
        or conv.bias is None
        or conv.in_channels not in (1, 3)
        or conv.out_channels % 8
    ):
        return False
    # channels-last images only (an NCHW batch keeps torch's layout and kernels for all its
    # blocks); a 1-channel batch is in both layouts, so its strides tell which one was chosen
    if x.dim() != 4 or x.requires_grad or (x.size(1) == 1 and x.stride(1) != 1):
        return False
    assert isinstance(norm, nn.BatchNorm2d)
    if norm.num_features != conv.out_channels or not _fusable(x, None, None):
        return False
    params = (conv.weight, conv.bias, norm.weight, norm.bias)
    return all(p is None or (p.dtype == x.dtype and p.is_contiguous()) for p in params)


def _is_plain_2x2(pool: nn.MaxPool2d) -> bool:
    def pair(v: Any) -> tuple[Any, Any]:
        return (v, v) if isinstance(v, int) else tuple(v)

    stride = pool.kernel_size if pool.stride is None else pool.stride
    return (
        pair(pool.kernel_size) == (2, 2)
        and pair(stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )
