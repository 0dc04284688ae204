"""What refinement minimises, one object per head kind; each says how many views of an image a step needs.

- `ClassifierObjective`: cross-entropy of the attribute classifier on one random view (the tutorial's).
- `LookalikeObjective`: for two random views of every image in the batch, each part of the lookalike
  embedding is pulled to its attribute's proxy (NormSoftmax cross-entropy; each attribute member to its own
  proxies, their losses averaged), and the visual part must also
  pick out the other view of the same photo among the batch's other photos (a symmetric InfoNCE term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.heads import AttributeHead, Head, LookalikeHead


class ClassifierObjective:
    views = 1

    def __init__(self, label_smoothing: float = 0.0):
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, head: Head, descriptors: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, attribute logits of the first view)."""
        logits = head.logits(descriptors[0]).float()
        return self.loss(logits, target), logits


def view_contrast(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` must be most alike to row i of `b` among all rows of `b`, and back."""
    similarity = a @ b.T / temperature
    same = torch.arange(len(a), device=a.device)
    return F.cross_entropy(similarity, same) + F.cross_entropy(similarity.T, same)


class LookalikeObjective:
    views = 2

    def __init__(self, view_weight: float = 1.0, view_temperature: float = 0.1, label_smoothing: float = 0.0):
        self.view_weight, self.view_temperature, self.label_smoothing = view_weight, view_temperature, label_smoothing

    def __call__(self, head: LookalikeHead, descriptors: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the attribute members' mean logits for the first view); each member is pulled to its own proxies."""
        parts = [head.parts(d) for d in descriptors]
        members = [head.member_logits(attribute.float()) for attribute, _ in parts]
        loss = sum(self._cross_entropy(scores, target) for view in members for scores in view) / head.attribute_members
        loss = loss + sum(self._cross_entropy(head.proxy_logits(visual.float(), head.visual_proxies.float()), target) for _, visual in parts)
        if self.view_weight:
            loss = loss + self.view_weight * view_contrast(parts[0][1].float(), parts[1][1].float(), self.view_temperature)
        return loss, members[0].mean(0)

    def _cross_entropy(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, target, label_smoothing=self.label_smoothing)


def objective_for(head: Head, view_weight: float, view_temperature: float, label_smoothing: float):
    if isinstance(head, AttributeHead):
        return ClassifierObjective(label_smoothing)
    return LookalikeObjective(view_weight, view_temperature, label_smoothing)
