"""Opening user images safely: every odd format becomes an upright RGB picture or a clear BadImageError."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: Largest image we decode, in pixels (Pillow's own bomb threshold, about 9.5k x 9.5k); larger files are refused.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file with a supported image extension (any case)."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every visible image file below `root` (hidden folders skipped), folder by folder in name order; symlinks kept."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_file(name):
                yield Path(dirpath) / name


def unreadable_reason(error: OSError) -> str:
    """The reason given for a file the operating system would not let us read."""
    return f"cannot read file ({error.strerror or error})"


def open_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode `path` into an upright 8-bit RGB image.

    EXIF rotation is applied; palette, alpha, CMYK, greyscale and 16-bit images are converted;
    zero-byte, truncated, non-image and oversized files raise BadImageError. `draft_size` lets
    JPEG decoding downscale in the DCT domain when the image is much larger than needed.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "file is empty (0 bytes)")
    except OSError as e:
        raise BadImageError(path, unreadable_reason(e)) from None
    return _decode(path, path, draft_size)


def open_image_bytes(data: bytes, name: str = "<upload>", draft_size: int | None = None) -> Image.Image:
    """Like open_image, for bytes already in memory (uploads, downloads)."""
    if not data:
        raise BadImageError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, draft_size)


def _decode(source, name, draft_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as img:
                _check_size(name, img)
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImageError(name, f"image is larger than {MAX_PIXELS:,} pixels (possible decompression bomb)") from None
        except UnidentifiedImageError:
            raise BadImageError(name, "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(name, f"corrupt or truncated image ({e})") from None


def _check_size(path, img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadImageError(path, f"image is {w}x{h} = {w * h:,} pixels, over the {MAX_PIXELS:,} limit (possible decompression bomb)")
    if w < 1 or h < 1:
        raise BadImageError(path, f"image has no pixels ({w}x{h})")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited onto white, 16-bit is scaled down rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
