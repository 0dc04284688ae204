"""A backbone's trunk as an ordered list of blocks, so refinement can freeze a prefix and train the rest.

Running the blocks in order gives exactly `Backbone.feature_maps`; the cut point between the frozen
and the trained blocks is what the cached CPU mode stores activations at.
"""

from __future__ import annotations

from torch import nn

from ..backbones import Backbone
from ..errors import LookalikeError


class _ConvBnAct(nn.Module):
    """EfficientNet's stem or head: convolution, batch norm, activation (the trunk's own modules)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _EfficientNetBlock(nn.Module):
    """One MBConv block with the drop-connect rate the original model gives it at this depth."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x):
        return self.block(x, drop_connect_rate=self.drop_connect_rate or None)


def trunk_stages(backbone: Backbone) -> list[nn.Module]:
    """The trunk's blocks in order (stem, each residual/MBConv block, head); they share the trunk's weights."""
    trunk = backbone.trunk
    if hasattr(trunk, "_blocks"):
        rate = trunk._global_params.drop_connect_rate or 0.0
        n = len(trunk._blocks)
        blocks = [_EfficientNetBlock(b, rate * i / n) for i, b in enumerate(trunk._blocks)]
        return [_ConvBnAct(trunk._conv_stem, trunk._bn0, trunk._swish), *blocks, _ConvBnAct(trunk._conv_head, trunk._bn1, trunk._swish)]
    if hasattr(trunk, "layer4"):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        return [stem, *trunk.layer1, *trunk.layer2, *trunk.layer3, *trunk.layer4]
    raise LookalikeError(f"backbone '{backbone.config.name}' cannot be split into blocks for refinement")


def split_stages(backbone: Backbone, trainable_blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen prefix, trained suffix); trainable_blocks < 0 trains the whole trunk, 0 none of it."""
    stages = trunk_stages(backbone)
    cut = 0 if trainable_blocks < 0 else max(0, len(stages) - trainable_blocks)
    return nn.Sequential(*stages[:cut]), nn.Sequential(*stages[cut:])
