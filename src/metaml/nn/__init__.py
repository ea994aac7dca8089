"""Networks: backbones created by name from a registry.

Example:
    >>> from metaml.nn import create_backbone, list_backbones
    >>> list_backbones()
    ['conv4', 'mlp', 'resnet12']
    >>> create_backbone("mlp").num_features
    40
"""

from __future__ import annotations

from metaml.nn.backbones import (
    MLP,
    Backbone,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    Conv4,
    ResNet12,
    backbone_factory,
    channels_last_input,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "MLP",
    "Backbone",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv4",
    "ResNet12",
    "backbone_factory",
    "channels_last_input",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
