"""The trunk cut into a frozen prefix and a trained suffix, so refinement can cache the prefix's outputs.

The frozen part turns an image into one flat row: the descriptor pieces of the stages before the cut, then
(when trained stages follow) the activation map at the cut. The trained part turns that row, or an image
when nothing is frozen, into the whole descriptor. Together they compute exactly `Backbone.descriptor`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone
from ..backbones.stages import StageRun, used_stages


class FrozenPart(nn.Module):
    """image -> [descriptor pieces before the cut, activation map at the cut (when trained stages follow)], flat."""

    def __init__(self, run: StageRun, keep_map: bool):
        super().__init__()
        self.run, self.keep_map = run, keep_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pieces = self.run(x)
        return torch.cat(pieces + ([x.flatten(1)] if self.keep_map else []), 1)


class TrainedPart(nn.Module):
    """A frozen part's row (or an image) -> the whole descriptor."""

    def __init__(self, run: StageRun, frozen_dim: int, map_shape: tuple[int, ...]):
        super().__init__()
        self.run, self.frozen_dim, self.map_shape = run, frozen_dim, map_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = []
        if x.dim() == 2:
            pieces.append(x[:, : self.frozen_dim])
            x = x[:, self.frozen_dim :].reshape(-1, *self.map_shape)
        if len(self.run.blocks):
            pieces += self.run(x)[1]
        return torch.cat(pieces, 1)


def split_trunk(backbone: Backbone, trained_stages: int) -> tuple[FrozenPart | None, TrainedPart]:
    """(frozen part, trained part) with the last `trained_stages` of the stages the descriptor needs trained.

    trained_stages < 0 trains them all, and then there is no frozen part.
    """
    stages = backbone.stages()
    taps, n = backbone.config.taps, len(stages)
    used = used_stages(taps, n)
    cut = 0 if trained_stages < 0 else max(0, used - trained_stages)
    trained_run = StageRun(stages, cut, used, taps, n)
    if cut == 0:
        return None, TrainedPart(trained_run, 0, ())
    frozen = FrozenPart(StageRun(stages, 0, cut, taps, n), keep_map=cut < used)
    size = backbone.config.input_size
    with torch.no_grad():
        x, pieces = frozen.run(torch.zeros(1, 3, size, size))
    return frozen, TrainedPart(trained_run, sum(p.shape[1] for p in pieces), tuple(x.shape[1:]))
