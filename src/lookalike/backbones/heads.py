"""Learned heads on the descriptor: what a refined backbone outputs as its embedding.

Both standardise the descriptor first (shift and scale from the training images), because texture
statistics of several stages differ in scale by orders of magnitude.

- `LookalikeHead` (the default): two unit vectors side by side. The attribute part is a projection
  trained against one proxy per attribute with a temperature (NormSoftmax), so each attribute gathers
  around its proxy without collapsing onto one point: photos keep their own place within the attribute.
  The visual part is trained to find another view of the same photo among the other photos (crops,
  flips, colour changes), so copies find their original and patterns the attributes never named stay apart.
  With a pretrained visual part (`keep_pretrained_visual`, chosen when the learned one does not carry to
  attributes it never saw, see refine/visual_part.py) the visual part is the backbone's own pooled features,
  untouched, and the attribute part shrinks where the attribute members doubt a photo shows any attribute
  they know: an object class never trained on keeps the pretrained network's neighbours.
- `AttributeHead`: a linear classifier whose posterior (or logits) is the embedding; every confidently
  classified photo of an attribute lands on one corner of the simplex.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LookalikeError


class Head(nn.Module):
    """Standardised descriptor -> embedding; `logits` scores the attributes (for training and monitoring)."""

    kind = ""

    def __init__(self, in_features: int, classes: list[str], dropout: float = 0.0):
        super().__init__()
        self.classes = list(classes)
        self.in_features = in_features
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.dropout = nn.Dropout(dropout)

    def standardize(self, descriptors: torch.Tensor) -> "Head":
        """Take the shift and scale from these (training) descriptors.

        A feature that barely varies on the training images is not blown up: no scale is below a tenth of the mean one.
        """
        descriptors = descriptors[:, : self.in_features]
        std = descriptors.std(0)
        self.shift.copy_(descriptors.mean(0))
        self.scale.copy_(std.clamp_min(0.1 * float(std.mean()) + 1e-12))
        return self

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """The first `in_features` descriptor columns, standardised (a pretrained part may trail them)."""
        return self.dropout((x[:, : self.in_features] - self.shift) / self.scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Fresh initial weights (drawn from torch's generator, so a seeded fit starts the same way)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "classes": self.classes}


class AttributeHead(Head):
    """A linear classifier over the attributes; its posterior (or logits) is the embedding."""

    kind = "attribute-classifier"
    OUTPUTS = ("posterior", "logits")

    def __init__(self, in_features: int, classes: list[str], output: str = "posterior", dropout: float = 0.0):
        super().__init__(in_features, classes, dropout)
        if output not in self.OUTPUTS:
            raise LookalikeError(f"unknown attribute head output '{output}'; choose {' or '.join(self.OUTPUTS)}")
        self.output = output
        self.linear = nn.Linear(in_features, len(self.classes))

    @property
    def embedding_dim(self) -> int:
        return len(self.classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardized(x))

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        return logits.softmax(-1) if self.output == "posterior" else logits

    def describe(self) -> dict:
        return super().describe() | {"output": self.output}


class LookalikeHead(Head):
    """[attribute part, visual part] / sqrt(2): two unit vectors, so the embedding has unit length (at most, with a
    pretrained visual part, whose attribute part shrinks for doubtful photos).

    The attribute part is an ensemble: `attribute_members` projections, each with its own proxies and each
    scaled to unit length, side by side and divided by sqrt(members). Its squared distance is the members'
    mean, so members that disagree on a doubtful photo average out instead of one of them deciding.
    `visual_dim` trailing coordinates are the visual part; the learned distance gives them one shared weight.
    """

    kind = "lookalike-embedding"

    def __init__(
        self,
        in_features: int,
        classes: list[str],
        attribute_dim: int = 64,
        visual_dim: int = 64,
        temperature: float = 0.1,
        dropout: float = 0.0,
        attribute_members: int = 1,
    ):
        super().__init__(in_features, classes, dropout)
        self.attribute_dim, self.visual_dim, self.temperature = attribute_dim, visual_dim, temperature
        self.attribute_members = attribute_members
        self.attribute = nn.Linear(in_features, attribute_members * attribute_dim, bias=False)
        self.visual = nn.Linear(in_features, visual_dim, bias=False)
        # member m's proxies are rows m*classes .. (m+1)*classes; one member keeps the single-projection layout
        self.attribute_proxies = nn.Parameter(torch.randn(attribute_members * len(self.classes), attribute_dim))
        self.visual_proxies = nn.Parameter(torch.randn(len(self.classes), visual_dim))
        self.pretrained_dim, self.gate_power = 0, 1

    def keep_pretrained_visual(self, pretrained_dim: int, gate_reference: float, gate_power: int = 1) -> "LookalikeHead":
        """Output the `pretrained_dim` descriptor columns after `in_features` (the pooled features) as the visual part.

        The attribute part is then scaled by g = (confidence / gate_reference)^gate_power, clipped to 1, where
        confidence is the members' mean cosine to their nearest proxy and gate_reference its median over photos
        the head was not trained on; one more coordinate, sqrt(1 - g^2), keeps the embedding at unit length.
        Models saved before gate_power was recorded squared the ratio.
        """
        self.pretrained_dim, self.gate_power = pretrained_dim, gate_power
        self.register_buffer("gate_reference", torch.tensor(float(gate_reference)))
        return self

    @property
    def embedding_dim(self) -> int:
        if self.pretrained_dim:
            return self.attribute_members * self.attribute_dim + 1 + self.pretrained_dim
        return self.attribute_members * self.attribute_dim + self.visual_dim

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attribute and the visual part, each of unit length."""
        z = self.standardized(x)
        members = F.normalize(self.attribute(z).unflatten(1, (self.attribute_members, self.attribute_dim)), dim=2)
        return members.flatten(1) / self.attribute_members**0.5, F.normalize(self.visual(z), dim=1)

    def proxy_logits(self, part: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        """Cosine to each attribute's proxy, sharpened by the temperature (NormSoftmax)."""
        return part @ F.normalize(proxies, dim=1).T / self.temperature

    def member_logits(self, attribute: torch.Tensor) -> torch.Tensor:
        """(members, images, attributes): each member's NormSoftmax logits for an attribute part."""
        members = attribute.unflatten(1, (self.attribute_members, self.attribute_dim)) * self.attribute_members**0.5
        proxies = F.normalize(self.attribute_proxies.view(self.attribute_members, len(self.classes), self.attribute_dim), dim=2)
        return torch.einsum("nmd,mcd->mnc", members, proxies) / self.temperature

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(self.parts(x)[0]).mean(0)

    def attribute_confidence(self, attribute: torch.Tensor) -> torch.Tensor:
        """(images,): the members' mean cosine to their nearest proxy; low where no trained attribute fits."""
        return (self.member_logits(attribute) * self.temperature).amax(-1).mean(0)

    def pretrained_part(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features trailing the texture statistics in the descriptor, at unit length."""
        return F.normalize(x[:, self.in_features : self.in_features + self.pretrained_dim], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attribute, visual = self.parts(x)
        if self.pretrained_dim:
            gate = (self.attribute_confidence(attribute) / self.gate_reference).clamp(0, 1) ** self.gate_power
            # the attribute part's lost length goes into one more coordinate: every consumer scales embeddings
            # to unit length, which would otherwise grow a doubtful photo's pooled features back
            rest = (1 - gate.square()).clamp_min(0).sqrt()
            attribute, visual = torch.cat([attribute * gate[:, None], rest[:, None]], 1), self.pretrained_part(x)
        return torch.cat([attribute, visual], 1) * 0.5**0.5

    def reset_parameters(self) -> None:
        for layer in (self.attribute, self.visual):
            layer.reset_parameters()
        for proxies in (self.attribute_proxies, self.visual_proxies):
            nn.init.normal_(proxies)

    def describe(self) -> dict:
        return super().describe() | {
            "attribute_dim": self.attribute_dim,
            "attribute_members": self.attribute_members,
            "visual_dim": self.visual_dim,
            "temperature": self.temperature,
        } | ({"pretrained_dim": self.pretrained_dim, "gate_power": self.gate_power} if self.pretrained_dim else {})


def head_from_description(desc: dict) -> Head:
    """An untrained head shaped as `Head.describe()` says, ready for its saved weights."""
    kind = desc.get("kind")
    if kind == AttributeHead.kind:
        return AttributeHead(desc["in_features"], desc["classes"], desc["output"])
    if kind == LookalikeHead.kind:
        head = LookalikeHead(
            desc["in_features"], desc["classes"], desc["attribute_dim"], desc["visual_dim"], desc["temperature"], attribute_members=desc.get("attribute_members", 1)
        )
        # the reference is a saved buffer; 1.0 only gives it a shape until the weights are loaded
        return head.keep_pretrained_visual(desc["pretrained_dim"], 1.0, desc.get("gate_power", 2)) if desc.get("pretrained_dim") else head
    raise LookalikeError(f"unknown embedding head kind '{kind}'")


def visual_dims(desc: dict | None) -> int:
    """How many trailing embedding coordinates a head's description marks as its visual part (0 when none)."""
    desc = desc or {}
    return int(desc.get("pretrained_dim") or desc.get("visual_dim", 0))


def pretrained_visual(desc: dict | None) -> bool:
    """Whether a head's visual part is the backbone's pooled features rather than a learned projection."""
    return bool((desc or {}).get("pretrained_dim"))
