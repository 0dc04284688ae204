"""A trunk as an ordered list of stages, and the descriptor computed from them.

The stages (stem, each residual/MBConv block, head) share the trunk's weights; running them in order gives
the trunk's last feature maps. The descriptor is what an embedding head sees: the last stage's average-pooled
features, or, with taps, each tapped stage's per-channel mean and standard deviation. Those first- and
second-order statistics of mid- and high-level activations are classic texture descriptors (Gatys et al.,
2015), and on folder-per-attribute texture sets they separate attributes better than the last layer alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def trunk_stages(trunk: nn.Module, name: str = "backbone") -> list[nn.Module]:
    """The trunk's stages in order; they share the trunk's weights."""
    if hasattr(trunk, "_blocks"):
        rate = trunk._global_params.drop_connect_rate or 0.0
        n = len(trunk._blocks)
        blocks = [_EfficientNetBlock(b, rate * i / n) for i, b in enumerate(trunk._blocks)]
        return [_ConvBnAct(trunk._conv_stem, trunk._bn0, trunk._swish), *blocks, _ConvBnAct(trunk._conv_head, trunk._bn1, trunk._swish)]
    if hasattr(trunk, "layer4"):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        return [stem, *trunk.layer1, *trunk.layer2, *trunk.layer3, *trunk.layer4]
    raise LookalikeError(f"backbone '{name}' cannot be split into stages")


def resolve_taps(taps: Sequence[int], n_stages: int) -> tuple[int, ...]:
    """Stage indices (negative ones count from the end) as sorted, distinct, non-negative indices."""
    out = set()
    for t in taps:
        if not -n_stages <= t < n_stages:
            raise LookalikeError(f"stage {t} does not exist: this trunk has {n_stages} stages (0 .. {n_stages - 1}, or -{n_stages} .. -1)")
        out.add(t % n_stages)
    return tuple(sorted(out))


def channel_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C): each channel's spatial mean, then its spatial standard deviation."""
    mean = x.mean((2, 3))
    var = (x - mean[:, :, None, None]).square().mean((2, 3))
    return torch.cat([mean, (var + 1e-6).sqrt()], 1)


class StageRun(nn.Module):
    """Stages [start, stop) of a trunk: runs them and returns the descriptor pieces they contribute.

    With taps, a piece is the channel statistics of each tapped stage in the range; without taps, the only
    piece is the average-pooled output of the trunk's last stage. `stop` may end before the trunk does:
    stages after the last tap do not change the descriptor, so they are never run.
    """

    def __init__(self, stages: Sequence[nn.Module], start: int, stop: int, taps: tuple[int, ...], n_stages: int):
        super().__init__()
        self.blocks = nn.ModuleList(stages[start:stop])
        self.start, self.taps, self.last = start, taps, n_stages - 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pieces = []
        for i, block in enumerate(self.blocks, self.start):
            x = block(x)
            if i in self.taps:
                pieces.append(channel_statistics(x))
            elif not self.taps and i == self.last:
                pieces.append(x.mean((2, 3)))
        return x, pieces


def pooled_features(stages: Sequence[nn.Module], x: torch.Tensor, size: int) -> torch.Tensor:
    """The whole trunk's average-pooled output for the images resized to `size` (bilinear, exportable to ONNX).

    The pretrained network sees objects best at the size it was trained at; texture statistics want more pixels.
    """
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    for stage in stages:
        x = stage(x)
    return x.mean((2, 3))


def used_stages(taps: tuple[int, ...], n_stages: int) -> int:
    """How many leading stages the descriptor needs."""
    return taps[-1] + 1 if taps else n_stages

