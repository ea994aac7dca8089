"""The backbone contract, checked over the whole registry, plus per-backbone specifics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from metaml.errors import UserError
from metaml.nn import Backbone, create_backbone, list_backbones, register_backbone

# Small options keep the contract test fast; unknown (newly registered) names use defaults.
SMALL: dict[str, dict[str, Any]] = {
    "conv4": {"in_shape": (1, 28, 28), "hidden": 8},
    "resnet12": {"in_shape": (1, 28, 28), "widths": (8, 8, 16, 16)},
    "mlp": {"in_shape": (1,)},
}


def _build(name: str, seed: int = 0, num_outputs: int = 3) -> Backbone:
    torch.manual_seed(seed)
    return create_backbone(name, num_outputs=num_outputs, **SMALL.get(name, {}))


def _inputs(net: Backbone, name: str, n: int = 4) -> torch.Tensor:
    shape = SMALL.get(name, {}).get("in_shape", (1, 28, 28))
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list_backbones())
def test_contract(name: str, tmp_path: Path) -> None:
    net = _build(name)
    x = _inputs(net, name)
    features = net.forward_features(x)
    out = net(x)
    assert features.shape == (4, net.num_features)
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    # (a conv bias right before BatchNorm has a mathematically zero gradient, so only
    # presence and finiteness are checked per parameter)
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # safetensors round trip into a differently-seeded twin gives identical outputs
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    twin = _build(name, seed=123)
    twin.load_state_dict(load_file(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.equal(twin(x), net(x))
    # determinism under a fixed seed
    with torch.no_grad():
        assert torch.equal(_build(name)(x), _build(name)(x))


@pytest.mark.parametrize("name", list_backbones())
def test_reset_head(name: str) -> None:
    net = _build(name)
    x = _inputs(net, name, n=2)
    net.reset_head(7)
    assert net(x).shape == (2, 7)
    net.reset_head(0)
    assert torch.equal(net(x), net.forward_features(x))


@pytest.mark.parametrize(
    ("name", "in_shape", "features"),
    [
        ("conv4", (1, 28, 28), 64),
        ("conv4", (3, 84, 84), 1600),
        ("resnet12", (1, 28, 28), 640),
        ("resnet12", (3, 84, 84), 640),
        ("mlp", (1,), 40),
    ],
)
def test_default_feature_sizes(name: str, in_shape: tuple[int, ...], features: int) -> None:
    net = create_backbone(name, in_shape=in_shape, num_outputs=5)
    assert net.num_features == features
    with torch.no_grad():
        assert net.forward_features(torch.randn(2, *in_shape)).shape == (2, features)


def test_conv4_options() -> None:
    net = create_backbone("conv4", hidden=16, norm="none")
    assert net.num_features == 16
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    bn = [
        m
        for m in create_backbone("conv4", track_running_stats=False).modules()
        if hasattr(m, "running_mean")
    ]
    assert bn and all(m.running_mean is None for m in bn)


def test_list_backbones_pattern() -> None:
    assert list_backbones("res*") == ["resnet12"]
    assert set(list_backbones()) >= {"conv4", "mlp", "resnet12"}


def test_unknown_name_suggests() -> None:
    with pytest.raises(UserError, match=r"unknown backbone 'conv5'.*did you mean 'conv4'"):
        create_backbone("conv5")


def test_unknown_kwarg_names_valid_ones() -> None:
    with pytest.raises(
        UserError, match=r"no option 'hiden'.*did you mean 'hidden'.*valid options: in_shape"
    ):
        create_backbone("conv4", hiden=3)


def test_bad_shapes_are_user_errors() -> None:
    with pytest.raises(UserError, match="in_shape"):
        create_backbone("conv4", in_shape=(28, 28))
    with pytest.raises(UserError, match="at least 16"):
        create_backbone("conv4", in_shape=(1, 8, 8))


def test_register_backbone() -> None:
    from metaml.nn import backbones

    @register_backbone
    def tiny_test_mlp(in_shape: tuple[int, ...] = (2,), num_outputs: int = 1) -> Backbone:
        return backbones.MLP(in_shape, num_outputs, hidden=(3,))

    try:
        assert "tiny_test_mlp" in list_backbones("tiny*")
        assert create_backbone("tiny_test_mlp", num_outputs=2)(torch.zeros(1, 2)).shape == (1, 2)
    finally:
        backbones._REGISTRY.pop("tiny_test_mlp")


def _textbook(net: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The published block order, activation *then* max-pool, written out by hand."""
    import torch.nn.functional as F

    if isinstance(net, create_backbone("conv4").__class__):
        for i in range(4):
            conv, norm = net.features[4 * i], net.features[4 * i + 1]
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)
        return net.head(x.flatten(1))
    for block in net.blocks:
        x = F.max_pool2d(F.leaky_relu(block.body(x) + block.shortcut(x), 0.1), 2)
    return net.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_pooling_before_the_activation_is_the_textbook_function(name: str) -> None:
    # The blocks max-pool before their (monotone) activation for speed; outputs, gradients and
    # the second-order gradients MAML takes must be those of activation-then-pool.
    net = _build(name).double()
    x = _inputs(net, name, n=6).double()

    def grads(forward: Any) -> list[torch.Tensor]:
        params = list(net.parameters())
        inner = torch.autograd.grad(forward(x).square().mean(), params, create_graph=True)
        outer = sum(g.square().sum() for g in inner) + forward(x).sum()
        return [*inner, *torch.autograd.grad(outer, params)]

    torch.testing.assert_close(net(x), _textbook(net, x))
    for ours, textbook in zip(grads(net), grads(lambda v: _textbook(net, v)), strict=True):
        torch.testing.assert_close(ours, textbook)
