"""Backbones: plain ``nn.Module`` networks created by name from a registry (timm-style).

Every backbone meets one contract, so that learners never special-case a network:

* ``num_features``: the width of the feature vector;
* ``forward_features(x) -> (n, num_features)``;
* ``forward(x) = head(forward_features(x))``;
* ``reset_head(num_outputs)``: a fresh ``nn.Linear`` head (``0`` gives an identity head, so
  ``forward`` returns the features, as metric-based learners want).

Example:
    >>> net = create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=5)
    >>> net(torch.zeros(2, 1, 28, 28)).shape, net.num_features
    (torch.Size([2, 5]), 64)
    >>> list_backbones("res*")
    ['resnet12']
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from metaml.errors import UserError, did_you_mean, unknown_name_error
from metaml.nn.fused import conv_block

Norm = Literal["batch", "none"]
BackboneFactory = Callable[..., "Backbone"]
F = TypeVar("F", bound=BackboneFactory)

_REGISTRY: dict[str, BackboneFactory] = {}


class Backbone(nn.Module):
    """Base class: a feature extractor plus a resettable linear head.

    Subclasses set ``num_features`` and implement :meth:`forward_features`, then call
    :meth:`reset_head` at the end of ``__init__``.

    Example:
        >>> class Flat(Backbone):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_features = 4
        ...         self.reset_head(2)
        ...     def forward_features(self, x):
        ...         return x.flatten(1)
        >>> Flat()(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    num_features: int
    num_outputs: int
    head: nn.Module
    #: Whether this network runs faster on channels-last inputs on the CPU (measured for
    #: :class:`Conv4`); learners read it through :func:`channels_last_input`.
    prefers_channels_last: bool = False

    def forward_features(self, x: Tensor) -> Tensor:
        """Map inputs ``(n, *in_shape)`` to features ``(n, num_features)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``head(forward_features(x))``: ``(n, num_outputs)`` (features for an identity head)."""
        return self.head(self.forward_features(x))

    def reset_head(self, num_outputs: int) -> None:
        """Replace the head by a fresh ``nn.Linear(num_features, num_outputs)``.

        ``num_outputs=0`` gives an identity head, so that ``forward`` returns the features.

        Example:
            >>> net = create_backbone("mlp", in_shape=(1,), num_outputs=1)
            >>> net.reset_head(0)
            >>> net(torch.zeros(3, 1)).shape
            torch.Size([3, 40])
        """
        if num_outputs < 0:
            raise UserError(f"num_outputs must be >= 0, got {num_outputs}")
        self.num_outputs = num_outputs
        self.head = nn.Linear(self.num_features, num_outputs) if num_outputs else nn.Identity()


def register_backbone(factory: F) -> F:
    """Register a backbone factory under its function name (a decorator).

    Example:
        >>> @register_backbone
        ... def tiny_mlp(in_shape=(1,), num_outputs=1):
        ...     return MLP(in_shape, num_outputs, hidden=(8,))
        >>> create_backbone("tiny_mlp").num_features
        8
        >>> _ = _REGISTRY.pop("tiny_mlp")
    """
    _REGISTRY[factory.__name__] = factory
    return factory


def list_backbones(pattern: str = "*") -> list[str]:
    """The registered backbone names matching an fnmatch ``pattern``, sorted.

    Example:
        >>> list_backbones()
        ['conv4', 'mlp', 'resnet12']
    """
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def backbone_factory(name: str) -> BackboneFactory:
    """The factory registered as ``name`` (raises :class:`UserError` with a suggestion if unknown).

    Example:
        >>> "hidden" in inspect.signature(backbone_factory("conv4")).parameters
        True
    """
    if name not in _REGISTRY:
        raise unknown_name_error("backbone", name, _REGISTRY)
    return _REGISTRY[name]


def create_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name`` with keyword options.

    Unknown names and unknown options raise :class:`UserError` naming the valid choices.

    Example:
        >>> create_backbone("conv4", in_shape=(3, 84, 84), num_outputs=5).num_features
        1600
        >>> create_backbone("conv4", hiden=32)
        Traceback (most recent call last):
        ...
        metaml.errors.UserError: backbone 'conv4' has no option 'hiden' (did you mean 'hidden'?); \
valid options: in_shape, num_outputs, hidden, track_running_stats, norm
    """
    factory = backbone_factory(name)
    valid = list(inspect.signature(factory).parameters)
    for key in kwargs:
        if key not in valid:
            raise UserError(
                f"backbone {name!r} has no option {key!r}{did_you_mean(key, valid)}; "
                f"valid options: {', '.join(valid)}"
            )
    return factory(**kwargs)


def _check_in_shape(in_shape: Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != dims or any(s < 1 for s in shape):
        example = "(1, 28, 28)" if dims == 3 else "(1,)"
        raise UserError(
            f"{name} needs in_shape of {dims} positive sizes such as {example}, got {in_shape}"
        )
    return shape


def batch_norm_batch_stats(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Batch normalisation with the statistics of ``x`` itself, written with elementary ops.

    Equal to ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``, but
    ``torch.func.vmap`` differentiates it correctly to second order: in torch 2.13 the native
    kernel's double backward under ``vmap`` returns wrong meta-gradients (checked against finite
    differences in tests/test_functional.py).

    Example:
        >>> x = torch.randn(6, 3, 4, 4)
        >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(batch_norm_batch_stats(x, None, None, 1e-5), ref, atol=1e-5)
        True
    """
    dims = [0, *range(2, x.dim())]  # every dim but the channels
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(dims, keepdim=True)  # biased variance, as BatchNorm uses
    y = centred * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)  # (C,) -> (1, C, 1, ...)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class _BatchStatsMixin(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, without running statistics, normalises with elementary (vmap-safe) ops."""

    def forward(self, x: Tensor) -> Tensor:
        if self.running_mean is not None:
            return super().forward(x)
        self._check_input_dim(x)
        if not _under_vmap():  # the native kernel is faster and correct outside vmap
            return nn.functional.batch_norm(
                x, None, None, self.weight, self.bias, True, 0.0, self.eps
            )
        return batch_norm_batch_stats(x, self.weight, self.bias, self.eps)


def channels_last_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the memory layout ``model`` runs fastest on.

    A channels-last copy of ``x`` when ``model`` prefers it (``prefers_channels_last``, as
    :class:`Conv4` does) and ``x`` is a 4-D floating-point batch on the CPU, outside
    ``torch.func`` transforms and ``torch.compile``; otherwise ``x`` itself. The values are
    the same; only their order in memory changes, and every layer after the first keeps it.
    On conv4 that makes torch's CPU max-pooling and BatchNorm forward kernels 12x and 2x
    faster, and lets metaml's fused kernel (:mod:`metaml.nn.fused`) run its blocks, double
    backward included (docs/speed.md).

    Example:
        >>> net = create_backbone("conv4")
        >>> x = torch.rand(5, 1, 28, 28)
        >>> y = channels_last_input(net, x)
        >>> y.stride(), torch.equal(x, y)
        ((784, 1, 28, 1), True)
        >>> channels_last_input(create_backbone("mlp"), x) is x
        True
    """
    if not getattr(model, "prefers_channels_last", False) or x.dim() != 4:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or _inside_transform():
        return x
    # clone, not contiguous: a 1-channel NCHW batch already counts as channels-last
    # contiguous, so contiguous() would return it unchanged and torch would not switch layout.
    return x.clone(memory_format=torch.channels_last)


def _inside_transform() -> bool:
    """Whether a torch.func transform (vmap, grad) is active or torch.compile is tracing."""
    return bool(torch._C._functorch.get_interpreter_stack()) or torch.compiler.is_compiling()


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` transform is active (at any level)."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


class BatchNorm1d(_BatchStatsMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose batch-statistics mode is safe under ``vmap`` (same state dict).

    Example:
        >>> BatchNorm1d(3, track_running_stats=False)(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """


class BatchNorm2d(_BatchStatsMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch-statistics mode is safe under ``vmap`` (same state dict).

    Example:
        >>> BatchNorm2d(3, track_running_stats=False)(torch.randn(4, 3, 5, 5)).shape
        torch.Size([4, 3, 5, 5])
    """


class BatchNorm3d(_BatchStatsMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose batch-statistics mode is safe under ``vmap`` (same state dict)."""


def _norm2d(channels: int, norm: Norm, track_running_stats: bool) -> nn.Module:
    if norm == "batch":
        return BatchNorm2d(channels, track_running_stats=track_running_stats)
    if norm == "none":
        return nn.Identity()
    raise UserError(f"norm must be 'batch' or 'none', got {norm!r}")


class Conv4(Backbone):
    """The 4-block convnet of MAML / ProtoNets: 4 × [conv3×3(hidden), BN, ReLU, maxpool 2×2].

    Each block pools before its ReLU: ReLU is monotone, so ``relu(maxpool(x)) ==
    maxpool(relu(x))`` exactly (same outputs, same gradients), and the ReLU and its backward
    then run on a quarter of the values. Parameters and checkpoints are those of the textbook
    order.

    Features are the flattened last feature map: ``hidden`` on 28×28, ``25 * hidden`` on 84×84.
    Runs faster on channels-last inputs on the CPU (``prefers_channels_last``).

    Example:
        >>> Conv4((1, 28, 28), num_outputs=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_outputs: int = 5,
        hidden: int = 64,
        track_running_stats: bool = True,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        channels, height, width = _check_in_shape(in_shape, 3, "conv4")
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [
                nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1),
                _norm2d(hidden, norm, track_running_stats),
                nn.MaxPool2d(2),  # before the ReLU: the same function, 4x less ReLU work
                nn.ReLU(),
            ]
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise UserError(f"conv4 needs images of at least 16×16, got in_shape {tuple(in_shape)}")
        self.features = nn.Sequential(*blocks)
        self.num_features = hidden * height * width
        self.reset_head(num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(n, C, H, W) -> (n, num_features)``.

        Each block runs as one fused CPU kernel where :func:`metaml.nn.fused.conv_block` can
        (channels-last CPU batches, batch statistics), else as its four modules.
        """
        layers = list(self.features)
        for i in range(0, len(layers), 4):
            conv, norm, pool, act = layers[i : i + 4]
            x = conv_block(conv, norm, pool, act, x)
        return x.flatten(1)  # (n, hidden, h, w) -> (n, hidden*h*w)

    prefers_channels_last = True


class _ResBlock(nn.Module):
    """3 × [conv3×3, BN] with LeakyReLU between, a 1×1 conv shortcut, then LeakyReLU and maxpool."""

    def __init__(self, cin: int, cout: int, norm: Norm, track_running_stats: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False))
            layers.append(_norm2d(cout, norm, track_running_stats))
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), _norm2d(cout, norm, track_running_stats)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)  # 84 -> 42 -> 21 -> 10 -> 5; 28 -> 14 -> 7 -> 3 -> 1

    def forward(self, x: Tensor) -> Tensor:
        # Pool first: LeakyReLU is monotone, so this is act-then-pool on a quarter of the values.
        return self.act(self.pool(self.body(x) + self.shortcut(x)))


class ResNet12(Backbone):
    """The few-shot ResNet-12 (TADAM / MetaOptNet): 4 residual blocks of 3 convs, global avg pool.

    Widths default to (64, 160, 320, 640); blocks use LeakyReLU(0.1) and a 1×1 conv shortcut.
    DropBlock regularisation of MetaOptNet is not included. Works on 28×28 and 84×84 inputs.

    Example:
        >>> net = ResNet12((1, 28, 28), num_outputs=5, widths=(8, 16, 32, 64))
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.num_features
        (torch.Size([2, 5]), 64)
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 84, 84),
        num_outputs: int = 5,
        widths: Sequence[int] = (64, 160, 320, 640),
        track_running_stats: bool = True,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        channels, height, width = _check_in_shape(in_shape, 3, "resnet12")
        if min(height, width) < 16:
            raise UserError(
                f"resnet12 needs images of at least 16×16, got in_shape {tuple(in_shape)}"
            )
        if len(widths) != 4:
            raise UserError(f"resnet12 needs 4 widths such as (64, 160, 320, 640), got {widths}")
        blocks = []
        for out in widths:
            blocks.append(_ResBlock(channels, int(out), norm, track_running_stats))
            channels = int(out)
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        self.reset_head(num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(n, C, H, W) -> (n, widths[-1])`` by global average pooling."""
        return self.blocks(x).mean(dim=(2, 3))  # (n, c, h, w) -> (n, c)


class MLP(Backbone):
    """A ReLU multilayer perceptron: the sinusoid-regression network of MAML (40-40 hidden units).

    Example:
        >>> MLP((1,), num_outputs=1)(torch.zeros(4, 1)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1,),
        num_outputs: int = 1,
        hidden: Sequence[int] = (40, 40),
    ) -> None:
        super().__init__()
        width = math.prod(int(s) for s in in_shape)
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.reset_head(num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(n, *in_shape) -> (n, hidden[-1])``."""
        return self.features(x.flatten(1))  # (n, *in_shape) -> (n, prod(in_shape))


@register_backbone
def conv4(
    in_shape: Sequence[int] = (1, 28, 28),
    num_outputs: int = 5,
    hidden: int = 64,
    track_running_stats: bool = True,
    norm: Norm = "batch",
) -> Backbone:
    """The 4-block convnet of MAML and ProtoNets (see :class:`Conv4`).

    Example:
        >>> conv4(in_shape=(1, 28, 28), num_outputs=5).num_features
        64
    """
    return Conv4(in_shape, num_outputs, hidden, track_running_stats, norm)


@register_backbone
def resnet12(
    in_shape: Sequence[int] = (3, 84, 84),
    num_outputs: int = 5,
    widths: Sequence[int] = (64, 160, 320, 640),
    track_running_stats: bool = True,
    norm: Norm = "batch",
) -> Backbone:
    """The few-shot ResNet-12 (see :class:`ResNet12`).

    Example:
        >>> resnet12(in_shape=(1, 28, 28), widths=(8, 8, 8, 8)).num_features
        8
    """
    return ResNet12(in_shape, num_outputs, widths, track_running_stats, norm)


@register_backbone
def mlp(
    in_shape: Sequence[int] = (1,), num_outputs: int = 1, hidden: Sequence[int] = (40, 40)
) -> Backbone:
    """A ReLU MLP, by default the 1-40-40-1 sinusoid network of MAML (see :class:`MLP`).

    Example:
        >>> mlp().num_features
        40
    """
    return MLP(in_shape, num_outputs, hidden)


__all__ = [
    "MLP",
    "Backbone",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv4",
    "ResNet12",
    "backbone_factory",
    "batch_norm_batch_stats",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
