"""Augmented views that keep a texture recognisable: random resized crop, flips, mild colour jitter, and the
losses of a re-photographed or re-posted copy (a smaller picture scaled back up, JPEG re-encoding).

Each view is a pure function of (image content hash, view number, seed), so a view computed once can be
cached and shared by every split and every run that asks for it.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..backbones import BackboneConfig, Preprocessor
from ..images import open_image

_GLOBAL_RNG = threading.Lock()


@dataclass(frozen=True)
class AugmentParams:
    """What a random view may change; everything here is part of the activation cache key."""

    crop_scale_min: float = 0.25
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = 0.3
    hue_jitter: float = 0.02
    degrade: float = 0.5


class Degrade:
    """With probability p each: shrink to 35-90% and scale back (lost detail), re-encode as JPEG at quality 30-95.

    Draws from torch's global generator, like torchvision's transforms, so a view stays a function of its seed.
    """

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) < self.p:
            factor = float(torch.empty(()).uniform_(0.35, 0.9))
            w, h = img.size
            img = img.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.BILINEAR).resize((w, h), Image.BILINEAR)
        if float(torch.rand(())) < self.p:
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=int(torch.randint(30, 96, ())))
            buffer.seek(0)
            img = Image.open(buffer).convert("RGB")
        return img


class ViewMaker:
    """Normalised arrays of an image: view 0 is exactly what featurize sees, views 1, 2, ... are random crops."""

    def __init__(self, config: BackboneConfig, params: AugmentParams, seed: int = 0):
        # imported here, not with the module: a run whose views are all cached never needs torchvision (2 s to import)
        import torchvision.transforms.v2 as T

        self.pre = Preprocessor(config)
        self.size = config.input_size
        self.seed = seed
        steps: list = [T.RandomResizedCrop(self.size, scale=(params.crop_scale_min, 1.0), antialias=True)]
        if params.hflip:
            steps.append(T.RandomHorizontalFlip())
        if params.vflip:
            steps.append(T.RandomVerticalFlip())
        if params.color_jitter > 0 or params.hue_jitter > 0:
            j = params.color_jitter
            steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=params.hue_jitter))
        if params.degrade > 0:
            steps.append(Degrade(params.degrade))
        self.random = T.Compose(steps)

    def views(self, path: str | os.PathLike, digest: str, numbers: list[int]) -> list[np.ndarray]:
        """The requested views of one image file, decoding it at most twice."""
        out: dict[int, np.ndarray] = {}
        if 0 in numbers:
            out[0] = self.pre.load(path)
        random = [v for v in numbers if v != 0]
        if random:
            # decoded at about twice the input size, so a crop of a quarter of the picture keeps full detail
            img = open_image(path, draft_size=2 * self.size)
            out.update((v, self.random_view(img, digest, v)) for v in random)
        return [out[v] for v in numbers]

    def random_view(self, img: Image.Image, digest: str, view: int) -> np.ndarray:
        """A random view that depends only on (image, view number, seed), so it can be cached and shared."""
        seed = int.from_bytes(hashlib.sha256(f"{digest}:{view}:{self.seed}".encode()).digest()[:8], "little")
        # torchvision's transforms draw from torch's global generator, so views made in parallel threads take turns
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.random(img)
        x = np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.pre.mean) / self.pre.std
