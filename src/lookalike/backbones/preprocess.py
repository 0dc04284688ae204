"""Image -> normalised tensor, exactly as the backbone expects it (shared by featurize, refine, index and serve)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..images import check_shape, open_image
from .config import BackboneConfig


class Preprocessor:
    """Resize the shorter side to the input size, centre-crop a square, scale and normalise."""

    def __init__(self, config: BackboneConfig):
        self.size = config.input_size
        self.mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add per pixel.
        self._scale = 1.0 / (255.0 * self.std)
        self._bias = -self.mean / self.std

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Decode a file (JPEG downscaled while decoding) into a (3, S, S) float32 array."""
        return self.array(open_image(path, draft_size=self.size))

    def resize(self, img: Image.Image) -> Image.Image:
        """Shorter side to the input size, then the centre square; a strip over MAX_ASPECT_RATIO:1 is refused before resizing."""
        w, h = img.size
        check_shape("image", w, h)
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None if max(w, h) < 3 * self.size else 2.0)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def array(self, img: Image.Image) -> np.ndarray:
        return self.normalize(np.asarray(self.resize(img)))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 pixels, already resized and cropped, into the (3, S, S) float32 the network takes."""
        # Channels first before the arithmetic: a multiply-add over whole planes is ~10x faster than one
        # broadcast over Pillow's 3-wide channels-last rows, and gives the same floats.
        x = pixels.transpose(2, 0, 1).astype(np.float32, order="C")
        x *= self._scale
        x += self._bias
        return x
